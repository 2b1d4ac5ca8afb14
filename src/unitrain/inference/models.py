"""What a model path names, loaded the one way every command loads it: a Hugging Face checkpoint directory, a PEFT
adapter directory (merged into its base), or a training run (`checkpoints/step-*`, or a run directory: its latest
checkpoint, full weights or LoRA adapters over their recorded base).

Each source also knows its tokenizer, its `generation_config.json` (sampling defaults and every EOS id) and the
model it started from (an adapter's base, a run's `model.path`, its starting adapter or its `initial/` export), so
`generate --reference` needs no second path. The result is our `Transformer` (unitrain.model.generate decodes
from it). Trade-off: a LoRA run's base is hashed before its adapters are merged in (seconds per GB), so a changed
base is refused rather than silently generating from another model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from unitrain.errors import UnitrainError


@dataclass
class ModelSource:
    path: Path  # what was named (a run directory resolves to its latest checkpoint)
    kind: str  # "checkpoint", "adapter" or "run"
    base: Path | None = None  # base checkpoint of an adapter

    def load(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        """Our Transformer with these weights (adapters merged in)."""
        from unitrain.model.adapter import load_model

        if self.kind == "run":
            return _load_run_checkpoint(self.path, dtype, device)
        return load_model(self.path, base=self.base, dtype=dtype, device=device)

    @property
    def meta(self) -> dict:
        return json.loads((self.path / "meta.json").read_text()) if self.kind == "run" else {}

    @property
    def tokenizer(self) -> Path | None:
        """The tokenizer directory (or `tokenizer.json`) that goes with the weights."""
        if self.kind == "run":
            recorded = self.meta.get("tokenizer_path")
            return Path(recorded) if recorded else None
        for directory in (self.path, self.base):
            if directory is not None and (directory / "tokenizer.json").is_file():
                return directory
        return None

    @property
    def generation_config(self) -> Path | None:
        """generation_config.json of the weights, else of the checkpoint they started from."""
        candidates = [self.path, self.base]
        if self.kind == "run":
            meta = self.meta
            start = meta.get("lora", {}).get("base_model") or meta.get("model_path")
            candidates = [Path(start)] if start else [_run_dir(self.path) / "initial"]
        for directory in candidates:
            if directory is not None and (directory / "generation_config.json").is_file():
                return directory / "generation_config.json"
        return None

    def start(self) -> ModelSource | None:
        """The model these weights started from: an adapter's base, a run's starting checkpoint (its starting
        adapter over its base, or its `initial/` export for a random start); None for a plain checkpoint."""
        if self.kind == "adapter":
            return ModelSource(self.base, "checkpoint")
        if self.kind != "run":
            return None
        meta = self.meta
        lora = meta.get("lora")
        if lora:
            base = Path(lora["base_model"])
            adapter = lora.get("adapter")
            return ModelSource(Path(adapter), "adapter", base) if adapter else ModelSource(base, "checkpoint")
        start = meta.get("model_path")
        return ModelSource(Path(start) if start else _run_dir(self.path) / "initial", "checkpoint")


def _run_dir(checkpoint: Path) -> Path:
    return checkpoint.parent.parent  # RUN/checkpoints/step-*


def model_source(path: str | Path, base: str | Path | None = None) -> ModelSource:
    """Name what `path` is, in one line if it is none of the three."""
    from unitrain.model.adapter import adapter_base, is_adapter_dir
    from unitrain.train.checkpoint import latest_checkpoint

    path = Path(path)
    if not path.exists():
        raise UnitrainError(f"{path}: no such model directory")
    if is_adapter_dir(path):
        from unitrain.train.lora import check_adapter_base

        resolved = adapter_base(path, base)
        check_adapter_base(path, resolved)
        return ModelSource(path, "adapter", resolved)
    if base is not None:
        raise UnitrainError(f"{path}: --base is given but this is not an adapter directory")
    if (path / "config.json").is_file():
        return ModelSource(path, "checkpoint")
    checkpoint = path if (path / "meta.json").is_file() else latest_checkpoint(path)
    if checkpoint is None:
        raise UnitrainError(
            f"{path}: neither a Hugging Face checkpoint (config.json), a PEFT adapter (adapter_config.json), a "
            "training checkpoint (meta.json) nor a run directory with checkpoints"
        )
    return ModelSource(checkpoint, "run")


def _load_run_checkpoint(checkpoint: Path, dtype: torch.dtype, device):
    """A training checkpoint's model: its full weights, or its LoRA adapters merged into their base."""
    from safetensors.torch import load_file

    from unitrain.model import ModelConfig, build_model, from_pretrained
    from unitrain.model.lora import apply_lora, load_adapter_state, merge_lora
    from unitrain.train.step.reference import weights_hash

    meta = json.loads((checkpoint / "meta.json").read_text())
    state = load_file(str(checkpoint / "model.safetensors"))
    lora = meta.get("lora")
    if lora is None:
        config = ModelConfig.from_hf(json.loads((checkpoint / "model_config.json").read_text()))
        with torch.device("meta"):
            model = build_model(config)
        model.load_state_dict(state, assign=True)
        return model.to(device=device, dtype=dtype)
    base = Path(lora["base_model"])
    if not (base / "config.json").is_file():
        raise UnitrainError(f"{checkpoint}: its base model {base} is not a checkpoint directory here")
    if weights_hash(base) != lora["base_sha256"]:
        raise UnitrainError(f"{checkpoint}: the base model {base} changed since the adapters were trained")
    model = from_pretrained(base, device=device)
    apply_lora(model, lora["rank"], lora["alpha"], 0.0, lora["target_modules"])
    load_adapter_state(model, {name: tensor.to(device) for name, tensor in state.items()}, str(checkpoint))
    return merge_lora(model).to(dtype=dtype)
