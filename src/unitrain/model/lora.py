"""LoRA on the decoder's own linears: a frozen base plus one low-rank update per Hugging Face projection.

The decoder fuses q/k/v (`attention.qkv`) and gate/up (`mlp.gate_up`) into one linear each. `LoraLinear` keeps
that fused base matmul and adds `B(A(dropout(x))) * alpha / rank` to the slice of the output that belongs to each
targeted projection, so a LoRA on `q_proj` touches exactly the q columns, as `peft` on a `transformers` model
does, and the export maps each adapter to PEFT's per-projection names. `A` starts as PEFT's default (uniform in
±1/sqrt(fan_in), the default of `nn.Linear`) and `B` at zero, so a fresh adapter leaves the model unchanged.

Inside `reference_adapters(model)` every LoRA linear computes the DPO reference instead: its base alone, or the
base plus a frozen copy of the adapter a run started from (`keep_as_reference`). The trade-off: the policy and
its reference are one module that switches per forward, so no second model exists; the reference of a run that
starts from an adapter keeps one extra copy of that (small) adapter.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from unitrain.model.hf import SPLIT_SIZES, hf_names
from unitrain.model.llama import Transformer

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projections(model: Transformer, module_name: str) -> list[tuple[str, int]]:
    """(Hugging Face projection name, output width) of each part of our linear `module_name`, in order.

    'layers.0.attention.qkv' -> [('q_proj', H*Dh), ('k_proj', Hkv*Dh), ('v_proj', Hkv*Dh)]."""
    template, names = hf_names(f"{module_name}.weight")
    parts = [name.split(".")[-2] for name in names]
    linear = model.get_submodule(module_name)
    widths = SPLIT_SIZES[template](model.config) if len(parts) > 1 else [linear.out_features]
    return list(zip(parts, widths, strict=True))


class LoraLinear(nn.Linear):
    """A frozen (possibly fused) linear with trainable low-rank updates on some of its output slices.

    `weight` and `bias` are the base linear's own parameters (same names, so checkpoints and the Hugging Face map
    see an ordinary linear); `lora_A[name]` (r, in) and `lora_B[name]` (width, r) are the adapter of projection
    `name`."""

    def __init__(
        self,
        base: nn.Linear,
        parts: list[tuple[str, int]],
        targets: list[str],
        rank: int,
        alpha: float,
        dropout: float,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.scale = alpha / rank
        self.dropout = dropout
        self.use_reference = False
        self.reference: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # frozen starting adapter
        starts = [sum(width for _, width in parts[:index]) for index in range(len(parts))]
        self.slices = {name: (start, width) for (name, width), start in zip(parts, starts) if name in targets}
        self.lora_A = nn.ParameterDict(
            {
                name: nn.Parameter(torch.empty(rank, self.in_features, dtype=torch.float32))
                for name in self.slices
            }
        )
        self.lora_B = nn.ParameterDict(
            {
                name: nn.Parameter(torch.zeros(width, rank, dtype=torch.float32))
                for name, (_, width) in self.slices.items()
            }
        )

    def reset_adapters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a=sqrt(5)), B = 0."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            for name in self.slices:
                values = torch.rand(self.lora_A[name].shape, generator=generator, dtype=torch.float32)
                self.lora_A[name].copy_(values * (2 * bound) - bound)
                self.lora_B[name].zero_()

    def _adapters(self) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        if not self.use_reference:
            for name, (start, width) in self.slices.items():
                yield start, width, self.lora_A[name], self.lora_B[name]
        elif self.reference is not None:
            for name, (start, width) in self.slices.items():
                yield start, width, *self.reference[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # (..., O): the fused base matmul, unchanged
        for start, width, lora_a, lora_b in self._adapters():
            inputs = x if torch.is_autocast_enabled(x.device.type) else x.to(lora_a.dtype)
            if self.dropout and self.training and not self.use_reference:
                inputs = F.dropout(inputs, self.dropout)  # its own mask per projection, as PEFT
            delta = F.linear(F.linear(inputs, lora_a), lora_b) * self.scale  # (..., width)
            # in place on this projection's columns: the base matmul's backward does not need its output
            out.narrow(-1, start, width).add_(delta.to(out.dtype))
        return out

    def merged_weight(self) -> torch.Tensor:
        """The base weight (O, in) with every adapter folded in: W[slice] + scale * B @ A, computed in fp32."""
        weight = self.weight.detach().float().clone()
        for start, width, lora_a, lora_b in self._adapters():
            weight[start : start + width] += (lora_b.detach().float() @ lora_a.detach().float()) * self.scale
        return weight.to(self.weight.dtype)


def lora_linears(model: nn.Module) -> dict[str, LoraLinear]:
    """Module name -> LoraLinear, in model order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}


def apply_lora(
    model: Transformer,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | tuple[str, ...],
    seed: int = 0,
) -> dict[str, LoraLinear]:
    """Freeze every parameter of `model` and put LoRA adapters (fp32, on the weights' device) on the targeted
    projections of every layer, in place. `seed` draws the A matrices identically on every rank."""
    unknown = sorted(set(target_modules) - set(LORA_TARGET_MODULES))
    if unknown:
        raise ValueError(
            f"unknown LoRA target module {unknown[0]!r}; valid: {', '.join(LORA_TARGET_MODULES)}"
        )
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, LoraLinear) or name == "lm_head":
            continue
        parts = projections(model, name)
        targets = [part for part, _ in parts if part in target_modules]
        if not targets:
            continue
        lora = LoraLinear(module, parts, targets, rank, alpha, dropout)
        lora.reset_adapters(generator)
        lora.to(module.weight.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lora)
    return lora_linears(model)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our names -> adapter tensors ('layers.0.attention.qkv.lora_A.q_proj': (r, in)), nothing of the base."""
    return {
        f"{module_name}.lora_{kind}.{name}": tensor
        for module_name, module in lora_linears(model).items()
        for kind, tensors in (("A", module.lora_A), ("B", module.lora_B))
        for name, tensor in tensors.items()
    }


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy adapter tensors (our names) into `model`'s adapters: exactly the same names and shapes, or a
    one-line error naming `source`."""
    from unitrain.errors import UnitrainError

    targets = adapter_state_dict(model)
    missing, unexpected = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
    if missing or unexpected:
        what = f"no adapter {missing[0]}" if missing else f"unexpected adapter {unexpected[0]}"
        raise UnitrainError(f"{source}: {what} (its LoRA settings differ from the model's)")
    with torch.no_grad():
        for name, target in targets.items():
            if state[name].shape != target.shape:
                raise UnitrainError(
                    f"{source}: adapter {name} has shape {tuple(state[name].shape)}, the model's is "
                    f"{tuple(target.shape)}"
                )
            target.copy_(state[name])


def keep_as_reference(model: nn.Module) -> None:
    """Freeze a copy of the current adapters as the DPO reference (a run that starts from an adapter)."""
    for module in lora_linears(model).values():
        module.reference = {
            name: (module.lora_A[name].detach().clone(), module.lora_B[name].detach().clone())
            for name in module.slices
        }


@contextlib.contextmanager
def reference_adapters(model: nn.Module) -> Iterator[None]:
    """Within: each LoRA linear computes the reference (its base, or base + the frozen starting adapter)."""
    modules = lora_linears(model).values()
    for module in modules:
        module.use_reference = True
    try:
        yield
    finally:
        for module in modules:
            module.use_reference = False


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight and put plain linears back, in place; returns `model`."""
    for name, module in lora_linears(model).items():
        linear = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta"
        )
        linear.weight = nn.Parameter(module.merged_weight(), requires_grad=False)
        linear.bias = module.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model
