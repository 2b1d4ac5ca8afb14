"""Rank logic in one place: process-group setup from torchrun's environment, model wrapping, reductions.

One process (no torchrun) is world size 1 and never touches `torch.distributed`. Under torchrun the backend is
gloo on CPU and NCCL on GPU; the model is replicated with DDP by default or sharded with FSDP2 `fully_shard`.
Trade-off: the loss is normalized by global counts on every rank, and DDP averages gradients over ranks, so the
trainer multiplies its loss by `world_size` (`gradient_scale`) instead of changing DDP's reduction.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from unitrain.errors import UnitrainError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(choice: str, local_rank: int = 0, setting: str = "train.device=") -> torch.device:
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` (device `local_rank`) or any torch device name.
    A device this machine cannot use is refused in one line that names `setting` (`train.device=`, `--device `)."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(choice)
    except (RuntimeError, ValueError):
        raise UnitrainError(f"{setting}{choice}: not a torch device (use auto, cpu or cuda)") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
        raise UnitrainError(
            f"{setting}{choice}: {why} (torch {torch.__version__}); use {setting}auto (CUDA when available, "
            f"else CPU) or {setting}cpu"
        )
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise UnitrainError(
            f"{setting}{choice}: CUDA device {index} asked for, {torch.cuda.device_count()} visible"
        )
    return torch.device("cuda", index)


def init_distributed(device_choice: str) -> DistContext:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(context: DistContext) -> None:
    if context.is_distributed and dist.is_initialized():
        # A DDP wrapper (kept alive by reference cycles) still holding the group when it is destroyed makes the
        # gloo process abort at exit now and then ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def wrap_model(module: torch.nn.Module, context: DistContext, fsdp: bool) -> torch.nn.Module:
    """DDP (or FSDP2 when `fsdp`) around `module` in a multi-process run; the module itself otherwise."""
    if not context.is_distributed:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(getattr(module, "model", None), "fsdp_units", list)():
            fully_shard(layer)  # each decoder layer its own unit (the transformers backend)
        return fully_shard(module)
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def all_reduce_sum(values: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Sum a tensor over ranks (in place, also returned); identity in a single process."""
    if context.is_distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flag: bool, context: DistContext) -> bool:
    """True when `flag` is true on any rank (e.g. a stop signal that reached only one process)."""
    if not context.is_distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def barrier(context: DistContext) -> None:
    if context.is_distributed:
        dist.barrier()
