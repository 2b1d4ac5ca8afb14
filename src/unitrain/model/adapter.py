"""PEFT adapter directories in and out: `adapter_config.json` + `adapter_model.safetensors`, PEFT's own names.

A LoRA adapter of `model.layers.3.self_attn.q_proj` is stored as
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (and `lora_B`), the names `peft` writes and
`peft.PeftModel.from_pretrained` reads; they are derived from the Hugging Face name map in `hf.py`, so the fused
q/k/v and gate/up linears need no special case. Reading refuses what `LoraLinear` cannot reproduce (DoRA, rsLoRA,
per-module ranks, LoRA biases, extra trained modules) instead of loading it half. `peft` itself is never
imported: the format is plain JSON and safetensors. Trade-off: only the plain-LoRA subset of PEFT's options is
read, each refusal named in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unitrain.errors import UnitrainError
from unitrain.files import follow_umask
from unitrain.model.hf import from_pretrained, hf_names
from unitrain.model.llama import Transformer
from unitrain.model.lora import (
    LORA_TARGET_MODULES,
    adapter_state_dict,
    apply_lora,
    load_adapter_state,
    merge_lora,
)

# the weight dtypes `score` and `generate` load a model in (--dtype)
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
HF_PREFIX = "hf."  # a transformers-backend model holds the transformers model as `hf`
BASE_HASH_KEY = "unitrain_base_sha256"  # safetensors metadata: the base weights the adapter was trained on
# PEFT options whose non-default value changes what the adapter computes; LoraLinear implements the defaults only
UNSUPPORTED = {
    "use_dora": False,
    "use_rslora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "bias": "none",
    "modules_to_save": None,
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "exclude_modules": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
}


def peft_name(our_name: str) -> str:
    """'layers.3.attention.qkv.lora_A.q_proj' -> 'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight'."""
    module_name, kind, projection = our_name.rsplit(".", 2)
    if module_name.startswith(HF_PREFIX):  # the transformers backend: already the model's own names
        return f"{PEFT_PREFIX}{module_name.removeprefix(HF_PREFIX)}.{kind}.weight"
    _, names = hf_names(f"{module_name}.weight")
    (hf_weight,) = [name for name in names if name.split(".")[-2] == projection]
    return f"{PEFT_PREFIX}{hf_weight.removesuffix('.weight')}.{kind}.weight"


def adapter_hash(directory: str | Path) -> str:
    """SHA-256 of an adapter directory's config and weights (small files): what a reference built on it depends on."""
    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        digest.update(name.encode() + b"\0" + (Path(directory) / name).read_bytes())
    return digest.hexdigest()


def _write_atomically(path: Path, write) -> None:
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    write(partial)
    os.replace(partial, path)


def save_adapter(
    adapters: dict[str, torch.Tensor],
    directory: str | Path,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str],
    base_model: str,
    base_hash: str | None = None,
) -> Path:
    """Write adapters (our names, as `adapter_state_dict` gives them) as a PEFT LoRA directory for the base
    checkpoint `base_model`.

    Each file is written under a temporary name and renamed; the config goes last, so a directory with an
    `adapter_config.json` always has its weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {peft_name(name): tensor.detach().cpu().contiguous() for name, tensor in adapters.items()}
    metadata = {"format": "pt", **({BASE_HASH_KEY: base_hash} if base_hash else {})}

    def write_weights(path: Path) -> None:
        save_file(tensors, path, metadata=metadata)
        follow_umask(path)  # safetensors writes 0600

    _write_atomically(directory / ADAPTER_WEIGHTS, write_weights)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(target_modules),
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
        **UNSUPPORTED,
    }
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _write_atomically(directory / ADAPTER_CONFIG, lambda path: path.write_text(text))
    return directory


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(directory: str | Path) -> dict:
    """adapter_config.json of a plain PEFT LoRA adapter; anything else is a one-line `UnitrainError`."""
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise UnitrainError(f"{directory}: no {ADAPTER_CONFIG} (expected a PEFT adapter directory)")
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise UnitrainError(f"{directory}: no {ADAPTER_WEIGHTS} next to {ADAPTER_CONFIG}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UnitrainError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(config, dict):
        raise UnitrainError(f"{path}: expected a JSON object, found {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise UnitrainError(
            f"{path}: peft_type is {config.get('peft_type')!r}, only LORA adapters are supported"
        )
    for key, default in UNSUPPORTED.items():
        value = config.get(key, default)
        if value != default and not (value in (None, [], {}) and default in (None, {})):
            raise UnitrainError(f"{path}: {key}={value!r} is not supported (plain LoRA only)")
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        raise UnitrainError(f"{path}: target_modules must be a list of module names, got {targets!r}")
    # which projections a model has is checked when the adapter is applied (`apply_lora`); heads never
    refused = sorted(
        name for name in targets if not isinstance(name, str) or name == "lm_head" or "embed" in name
    )
    if refused:
        raise UnitrainError(
            f"{path}: target module {refused[0]!r} is not supported; adapters go on the linears of the decoder "
            f"layers (unitrain's decoder: {', '.join(LORA_TARGET_MODULES)}; the transformers backend: the model's own)"
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), int | float) or config[key] <= 0:
            raise UnitrainError(f"{path}: {key} must be a positive number, got {config.get(key)!r}")
    return config


def check_adapter(
    directory: str | Path, rank: int, alpha: float, target_modules: list[str], base: str
) -> None:
    """Refuse, in one line, an adapter to start a run from whose rank, alpha, targets or base differ from the run's."""
    config = read_adapter_config(directory)
    where = Path(directory) / ADAPTER_CONFIG
    if config["r"] != rank or config["lora_alpha"] != alpha:
        raise UnitrainError(
            f"{where}: r={config['r']}, lora_alpha={config['lora_alpha']}, but lora.rank={rank}, lora.alpha={alpha}"
        )
    if sorted(config["target_modules"]) != sorted(target_modules):
        raise UnitrainError(
            f"{where}: target_modules {sorted(config['target_modules'])} differ from lora.target_modules "
            f"{sorted(target_modules)}"
        )
    recorded = config.get("base_model_name_or_path")
    if not recorded or Path(recorded).resolve() != Path(base).resolve():
        raise UnitrainError(
            f"{where}: the adapter was trained on base {recorded!r}, not model.path {base!r} (point model.path at "
            "its base, or correct base_model_name_or_path if the base was moved)"
        )


def base_hash_of(directory: str | Path) -> str | None:
    """The base weights hash a unitrain-written adapter records (None for adapters written elsewhere)."""
    with safe_open(Path(directory) / ADAPTER_WEIGHTS, framework="pt") as handle:
        return (handle.metadata() or {}).get(BASE_HASH_KEY)


def load_adapter(model: torch.nn.Module, directory: str | Path) -> None:
    """Copy an adapter directory's tensors into `model`'s LoRA linears; every adapter must be present, no other."""
    path = Path(directory) / ADAPTER_WEIGHTS
    ours = {peft_name(name): name for name in adapter_state_dict(model)}
    with safe_open(path, framework="pt") as handle:
        unexpected = sorted(set(handle.keys()) - set(ours))
        if unexpected:
            raise UnitrainError(f"{path}: unexpected tensor {unexpected[0]} for this model")
        state = {ours[name]: handle.get_tensor(name) for name in handle.keys()}
    load_adapter_state(model, state, str(path))


def adapter_base(directory: str | Path, base: str | Path | None = None) -> Path:
    """The base checkpoint directory of an adapter: `base` when given, else its `base_model_name_or_path`."""
    from unitrain.files import resolve_model

    base = base or read_adapter_config(directory).get("base_model_name_or_path")
    base = (
        resolve_model(base, f"{Path(directory) / ADAPTER_CONFIG}: base_model_name_or_path") if base else base
    )
    if not base or not (Path(base) / "config.json").is_file():
        raise UnitrainError(
            f"{Path(directory) / ADAPTER_CONFIG}: its base model {base!r} is not a checkpoint directory here "
            "(give the base's directory)"
        )
    return Path(base)


def load_merged(
    directory: str | Path,
    base: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Transformer:
    """Base checkpoint (`base`, else the adapter's `base_model_name_or_path`) with the adapter merged in."""
    config = read_adapter_config(directory)
    base = adapter_base(directory, base)
    model = from_pretrained(base, dtype=dtype, device=device)
    apply_lora(model, int(config["r"]), config["lora_alpha"], 0.0, config["target_modules"])
    load_adapter(model, directory)
    return merge_lora(model)  # merged in fp32, stored in `dtype`


def load_model(
    path: str | Path,
    base: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Transformer:
    """A Hugging Face checkpoint directory, or a PEFT adapter directory merged into its base (`base` overrides
    the adapter's `base_model_name_or_path`); a `base` for a plain checkpoint is refused."""
    if is_adapter_dir(path):
        return load_merged(path, base=base, dtype=dtype, device=device)
    if base is not None:
        raise UnitrainError(
            f"{path}: --base is given but this is not an adapter directory (no {ADAPTER_CONFIG})"
        )
    return from_pretrained(path, dtype=dtype, device=device)
