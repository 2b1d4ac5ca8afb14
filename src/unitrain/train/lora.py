"""LoRA in a training run: freeze and store the base, add the adapters, the adapter-off reference, resume, export.

The trainer calls in through a few hooks; everything LoRA-specific about a run lives here. The base is a
checkpoint directory (`model.path`, or the run's own `initial/` export for a random start): checkpoints hold
only the adapters and their optimizer state, and record which base they need by path and by a SHA-256 of its
files, so a resume, an export or a merge against another base is refused instead of silently producing a
different model. Trade-off: that hash reads the base once per process that needs it (a few seconds per 10 GB).

The DPO reference with `dpo.reference: model` is the policy module itself run under `reference_adapters`: the
base alone, or, when the run starts from an adapter (`lora.adapter`, e.g. a LoRA SFT result), the base plus a
frozen copy of that starting adapter, so the reference is the model training started from (docs/dpo.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch

from unitrain.config import TrainConfig
from unitrain.data.batch import PackedBatch
from unitrain.errors import UnitrainError
from unitrain.model.adapter import base_hash_of, load_adapter, save_adapter
from unitrain.model.lora import apply_lora, keep_as_reference, reference_adapters
from unitrain.train.step.reference import Reference, weights_hash

SETTINGS = ("rank", "alpha", "dropout", "target_modules", "adapter")


def base_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """Storage dtype of the frozen base: bf16 on GPU under bf16 training (half the bytes; the matmuls run in
    bf16 anyway), else fp32 (also on CPU, where bf16 elementwise kernels are slow and runs are for checking)."""
    bf16 = config.lora.rank is not None and config.train.dtype == "bfloat16" and device.type == "cuda"
    return torch.bfloat16 if bf16 else torch.float32


class AdapterReference(Reference):
    """`dpo.reference: model` under LoRA: the policy's own module with the adapters off, under no_grad."""

    kind = "model"

    def __init__(self, model: torch.nn.Module, policy: Callable[[], torch.nn.Module]) -> None:
        self.model = model  # holds the LoRA linears to switch
        self.policy = policy  # the module that maps a batch to target log-probs (FSDP-wrapped when sharded)

    def response_logps(self, batch: PackedBatch, dataset_position: int | None = None) -> torch.Tensor:
        from unitrain.losses.preference import response_logps

        with torch.no_grad(), reference_adapters(self.model):
            logps = self.policy()(batch)  # (N,)
        return response_logps(logps.float(), batch.target_response, batch.num_responses)[0]  # (Rb,)


class LoraRun:
    """The LoRA side of one run: built right after the base is loaded (and `initial/` written)."""

    def __init__(self, config: TrainConfig, model: torch.nn.Module, output_dir: Path, resume: bool) -> None:
        self.settings = config.lora
        self.model = model
        self.base_path = Path(config.model.path or output_dir / "initial").resolve()
        if resume and config.model.path is None:
            # the random start is on disk: resume from it, not from a re-drawn one
            from unitrain.model import from_pretrained

            with torch.no_grad():
                backend, remote = config.model.backend, config.model.trust_remote_code
                base = from_pretrained(self.base_path, backend=backend, trust_remote_code=remote)
                for name, tensor in base.state_dict().items():
                    model.get_parameter(name).copy_(tensor)
        device = next(model.parameters()).device
        model.to(base_dtype(config, device))
        lora = config.lora
        apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules, seed=config.train.seed)
        if lora.adapter is not None:
            check_adapter_base(lora.adapter, self.base_path, self.base_hash)
            load_adapter(model, lora.adapter)
            keep_as_reference(model)

    @functools.cached_property
    def base_hash(self) -> str:
        return weights_hash(self.base_path)

    def meta(self) -> dict:
        """What a checkpoint records: the settings and the base they need."""
        settings = self.settings.model_dump(mode="json")
        return {"lora": {**settings, "base_model": str(self.base_path), "base_sha256": self.base_hash}}

    def reference(self, policy: Callable[[], torch.nn.Module]) -> AdapterReference:
        return AdapterReference(self.model, policy)


def check_adapter_base(adapter: str | Path, base: str | Path, base_hash: str | None = None) -> None:
    """Refuse an adapter written by unitrain (it records its base's hash) on other base weights than its own."""
    recorded = base_hash_of(adapter)
    if recorded is None:
        return
    base_hash = base_hash or weights_hash(base)
    if recorded != base_hash:
        raise UnitrainError(
            f"{adapter} was trained on other base weights than {base} (sha256 {recorded[:12]}, here {base_hash[:12]})"
        )


def check_resume(run: LoraRun | None, path: Path, meta: dict) -> None:
    """Refuse in one line a resume whose LoRA settings or base differ from the checkpoint's."""
    stored = meta.get("lora")
    if stored is None and run is None:
        return
    if run is None:
        raise UnitrainError(
            f"cannot resume from {path}: it holds LoRA adapters (lora.rank {stored['rank']}); resume with the "
            "run's lora settings"
        )
    if stored is None:
        raise UnitrainError(f"cannot resume from {path}: it holds fully trained weights; resume without lora")
    current = run.settings.model_dump(mode="json")  # as meta.json stores them: lists, not tuples
    changed = [key for key in SETTINGS if current[key] != stored.get(key)]
    if changed:
        raise UnitrainError(
            f"cannot resume from {path}: the lora settings differ from the checkpoint's in {', '.join(changed)}"
        )
    if run.base_hash != stored["base_sha256"]:
        raise UnitrainError(
            f"cannot resume from {path}: the base model {run.base_path} differs from the one its adapters were "
            f"trained on ({stored['base_model']}; weights sha256 {run.base_hash[:12]}, checkpoint "
            f"{stored['base_sha256'][:12]})"
        )


def export_checkpoint(checkpoint: Path, meta: dict, output: Path, merge: bool) -> None:
    """A LoRA checkpoint -> a PEFT adapter directory, or with `merge` a full Hugging Face checkpoint of the base
    with the adapters folded in. The tokenizer files are written by the caller."""
    from safetensors.torch import load_file

    lora = meta["lora"]
    adapters = load_file(str(checkpoint / "model.safetensors"))
    if not merge:
        settings = {key: lora[key] for key in ("rank", "alpha", "dropout", "target_modules")}
        save_adapter(
            adapters, output, **settings, base_model=lora["base_model"], base_hash=lora["base_sha256"]
        )
        return
    from unitrain.model import from_pretrained, save_pretrained
    from unitrain.model.lora import load_adapter_state, merge_lora

    base = Path(lora["base_model"])
    if not (base / "config.json").is_file():
        raise UnitrainError(f"{checkpoint}: its base model {base} is not a checkpoint directory here")
    if weights_hash(base) != lora["base_sha256"]:
        raise UnitrainError(f"{checkpoint}: the base model {base} changed since the adapters were trained")
    transformers = any(name.startswith("hf.") for name in adapters)  # trained on the transformers backend
    model = from_pretrained(base, backend="transformers" if transformers else "auto")
    apply_lora(model, lora["rank"], lora["alpha"], 0.0, lora["target_modules"])
    load_adapter_state(model, adapters, str(checkpoint / "model.safetensors"))
    save_pretrained(merge_lora(model), output)
