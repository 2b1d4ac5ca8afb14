"""Atomic checkpoints (model, optimizer, schedule step, sampler position, RNG states, config) and HF export.

Layout: `OUTPUT/checkpoints/step-00000012/` holding `model.safetensors` (the model's own parameter names),
`optimizer.pt` and `trainer.pt` (plain tensors/containers, loaded with `weights_only=True`), `model_config.json`
(Hugging Face keys), `config.yaml` and `meta.json`. A checkpoint is written into a temporary directory, fsynced,
then renamed into place, so a process killed mid-save leaves only a `.tmp-*` directory that `latest_checkpoint`
ignores and the next save removes. Trade-off: one full copy per checkpoint (simple, resumable on any world size)
rather than sharded distributed-checkpoint files.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from unitrain.errors import UnitrainError
from unitrain.files import follow_umask, written_whole

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")


def check_output_dir(output_dir: Path) -> Path:
    """`output_dir`, after refusing in one line (not a NotADirectoryError later) a run's directory, or one above
    it, that exists as a file."""
    existing = next((path for path in (output_dir, *output_dir.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UnitrainError(f"run.output_dir {output_dir}: {existing} is a file, not a directory")
    return output_dir


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for _, path in sorted(found) if (path / "meta.json").is_file()]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    trainer_state: dict,
    model_config: dict,
    config_yaml: str,
    meta: dict,
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`. Returns its directory."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    staging = root / f".tmp-step-{step:08d}-{os.getpid()}"
    staging.mkdir()
    # Cloned, contiguous CPU copies: safetensors refuses shared storage (tied embeddings) and views.
    save_file(
        {name: t.detach().to("cpu").contiguous().clone() for name, t in model_state.items()},
        str(staging / "model.safetensors"),
    )
    follow_umask(staging / "model.safetensors")
    torch.save(optimizer_state, staging / "optimizer.pt")
    torch.save(trainer_state, staging / "trainer.pt")
    _write_json(staging / "model_config.json", model_config)
    (staging / "config.yaml").write_text(config_yaml)
    _write_json(staging / "meta.json", {**meta, "step": step})  # written last: marks the directory complete
    for item in staging.iterdir():
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(staging)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(root)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint directory: `model_state`, `optimizer_state`, `trainer_state`, `model_config`, `meta`."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise UnitrainError(f"{path}: not a complete checkpoint (no meta.json)")
    return {
        "model_state": load_file(str(path / "model.safetensors")),
        "optimizer_state": torch.load(path / "optimizer.pt", weights_only=True),
        "trainer_state": torch.load(path / "trainer.pt", weights_only=True),
        "model_config": json.loads((path / "model_config.json").read_text()),
        "meta": json.loads((path / "meta.json").read_text()),
    }


def rng_state() -> dict:
    """Every generator a training step may draw from, as plain tensors/containers (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_tokenizer_files(tokenizer_path: str | Path | None, eos_id: int | None, output: Path) -> None:
    """Copy the dataset's complete tokenizer next to exported weights: every file of its `tokenizer/` directory
    (chat template, special-token map, vocabulary files), its tokenizer file as `tokenizer.json` whatever it was
    called, and a `tokenizer_config.json` naming EOS when it has none, so that transformers loads the copy."""
    if tokenizer_path is None:
        return
    from unitrain.train.compat import tokenizer_file_name

    source = Path(tokenizer_path)
    if not source.exists():
        raise UnitrainError(f"{source}: tokenizer recorded in the dataset metadata no longer exists")
    if source.is_file():
        shutil.copyfile(source, output / "tokenizer.json")
    else:
        files = sorted(path for path in source.iterdir() if path.is_file())
        main = tokenizer_file_name([path.name for path in files])
        for file in files:
            shutil.copyfile(file, output / ("tokenizer.json" if file.name == main else file.name))
    config_path = output / "tokenizer_config.json"
    if (output / "tokenizer.json").exists():
        config = json.loads(config_path.read_text()) if config_path.exists() else None
        if config is not None and not isinstance(config, dict):
            raise UnitrainError(f"{source}: tokenizer_config.json is not a JSON object")
        if config is None or (eos_id is not None and config.get("eos_token") is None):
            from tokenizers import Tokenizer

            config = {"tokenizer_class": "PreTrainedTokenizerFast", **(config or {})}
            if eos_id is not None:
                config["eos_token"] = Tokenizer.from_file(str(output / "tokenizer.json")).id_to_token(eos_id)
            _write_json(config_path, config)


def export_hf(checkpoint: str | Path, output: str | Path, merge: bool = False) -> Path:
    """Write a Hugging Face checkpoint (safetensors weights, config.json, tokenizer files) from a checkpoint.

    A LoRA checkpoint gives a PEFT adapter directory, or with `merge` its base with the adapters merged in. The
    export is written beside `output` and moved into place whole: never a half-written directory, and nothing left
    over from what `output` held before."""
    checkpoint, output = Path(checkpoint), Path(output)
    if not (checkpoint / "meta.json").is_file():
        raise UnitrainError(f"{checkpoint}: not a complete checkpoint (no meta.json)")
    meta = json.loads((checkpoint / "meta.json").read_text())
    lora = meta.get("lora")
    if merge and not lora:
        raise UnitrainError(f"{checkpoint}: holds full weights, not LoRA adapters; export it without --merge")
    with written_whole(output) as staging:
        if lora:
            from unitrain.train.lora import export_checkpoint

            export_checkpoint(checkpoint, meta, staging, merge)
        else:
            _export_full(checkpoint, staging)
        write_tokenizer_files(meta.get("tokenizer_path"), meta.get("eos_id"), staging)
        if merge or not lora:  # full weights: the starting checkpoint's generation defaults
            keep_generation_config(meta.get("model_path"), staging)
    return output


def _export_full(checkpoint: Path, directory: Path) -> None:
    from unitrain.model import ModelConfig, build_model, save_pretrained
    from unitrain.model.hf_backend.build import BACKEND_KEY, build_empty

    hf = json.loads((checkpoint / "model_config.json").read_text())
    if hf.get(BACKEND_KEY) == "transformers":  # the model's own class and save_pretrained
        model = build_empty(hf, str(checkpoint / "model_config.json"))
    else:
        with torch.device(
            "meta"
        ):  # no random init and no second copy of the weights: they are assigned below
            model = build_model(ModelConfig.from_hf(hf))
    model.load_state_dict(load_file(str(checkpoint / "model.safetensors")), assign=True)
    if hf.get(BACKEND_KEY) == "transformers":
        model.hf.tie_weights()  # assign=True replaced the shared tensor of a tied head by two copies
    save_pretrained(model, directory)


def keep_generation_config(start: str | None, output: Path) -> None:
    """The starting checkpoint's own generation_config.json (its sampling defaults, and every EOS id of, e.g., an
    instruct model that stops at several) replaces the one written from config.json's ids."""
    source = None if start is None else Path(start) / "generation_config.json"
    if source is not None and source.is_file():
        shutil.copyfile(source, output / "generation_config.json")


def gather_states(
    wrapped: torch.nn.Module, model: torch.nn.Module, optimizer, sharded: bool, trainable_only: bool = False
) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts; collective on every rank when `sharded` (FSDP2).
    `trainable_only` leaves out frozen parameters (a LoRA base, which the checkpoint does not hold)."""
    if not sharded:
        if trainable_only:
            return {
                n: p.detach() for n, p in model.named_parameters() if p.requires_grad
            }, optimizer.state_dict()
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    model_state, optimizer_state = get_state_dict(wrapped, optimizer, options=options)
    # The wrapper holds the Transformer as `model`: store the Transformer's own names.
    return {name.removeprefix("model."): tensor for name, tensor in model_state.items()}, optimizer_state


def restore_states(
    wrapped: torch.nn.Module,
    model: torch.nn.Module,
    optimizer,
    sharded: bool,
    model_state: dict,
    optimizer_state: dict,
    trainable_only: bool = False,
    source: str | Path = "checkpoint",
) -> None:
    """Inverse of `gather_states`: load full state dicts into a (possibly sharded) model and its optimizer.
    `trainable_only`: the state holds exactly the trainable parameters (the frozen ones are not in it)."""
    if not sharded:
        keys = model.load_state_dict(model_state, strict=not trainable_only)
        _check_trainable_keys(model, keys.missing_keys, keys.unexpected_keys, trainable_only, source)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    prefixed = {f"model.{name}": tensor for name, tensor in model_state.items()}
    keys = set_state_dict(
        wrapped,
        optimizer,
        model_state_dict=prefixed,
        optim_state_dict=optimizer_state,
        options=StateDictOptions(full_state_dict=True, strict=not trainable_only),
    )
    strip = lambda names: [name.removeprefix("model.") for name in names]  # noqa: E731
    _check_trainable_keys(
        model, strip(keys.missing_keys), strip(keys.unexpected_keys), trainable_only, source
    )


def _check_trainable_keys(model: torch.nn.Module, missing, unexpected, trainable_only: bool, source) -> None:
    """A state of the trainable parameters only must still hold every one of them, and nothing else."""
    if not trainable_only:
        return
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    missing = sorted(set(missing) & trainable)
    if missing or unexpected:
        problem = (
            f"lacks {', '.join(missing[:3])}" if missing else f"holds {', '.join(sorted(unexpected)[:3])}"
        )
        raise UnitrainError(
            f"cannot resume from {source}: its model state {problem} (this run trains other parameters)"
        )
