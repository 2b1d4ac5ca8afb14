"""Hugging Face checkpoints in and out: one declarative name map, read in both directions.

`NAME_MAP` maps each of our parameter names to the Hugging Face tensor names it is made of. A fused parameter
(q/k/v, gate/up) lists several names, joined along dim 0 on import and split back with `SPLIT_SIZES` on export,
so import then export returns the same tensors bit for bit. Checkpoints are read lazily tensor by tensor
(`safe_open`) into a model built on the meta device, and every tensor the model keeps is a copy with memory of its
own, never a view of the file's memory map (one kept view would keep every page read while loading resident for
the model's life). Trade-offs: a dtype/device cast happens per tensor rather than once, and until the file is
closed at the end of loading its pages read so far (clean, reclaimable file pages) count in the process's
resident set beside the copies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unitrain.errors import UnitrainError
from unitrain.files import follow_umask
from unitrain.model.config import ModelConfig
from unitrain.model.llama import Transformer

# ours -> Hugging Face name(s); `{i}` is the layer index, `{p}` is weight or bias
NAME_MAP: dict[str, tuple[str, ...]] = {
    "embed.weight": ("model.embed_tokens.weight",),
    "norm.weight": ("model.norm.weight",),
    "lm_head.weight": ("lm_head.weight",),
    "layers.{i}.attention_norm.weight": ("model.layers.{i}.input_layernorm.weight",),
    "layers.{i}.mlp_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight",),
    "layers.{i}.attention.qkv.{p}": (
        "model.layers.{i}.self_attn.q_proj.{p}",
        "model.layers.{i}.self_attn.k_proj.{p}",
        "model.layers.{i}.self_attn.v_proj.{p}",
    ),
    "layers.{i}.attention.out.{p}": ("model.layers.{i}.self_attn.o_proj.{p}",),
    "layers.{i}.attention.q_norm.weight": ("model.layers.{i}.self_attn.q_norm.weight",),
    "layers.{i}.attention.k_norm.weight": ("model.layers.{i}.self_attn.k_norm.weight",),
    "layers.{i}.mlp.gate_up.{p}": ("model.layers.{i}.mlp.gate_proj.{p}", "model.layers.{i}.mlp.up_proj.{p}"),
    "layers.{i}.mlp.down.{p}": ("model.layers.{i}.mlp.down_proj.{p}",),
}
SPLIT_SIZES: dict[str, Callable[[ModelConfig], list[int]]] = {
    "layers.{i}.attention.qkv.{p}": lambda c: [c.num_heads * c.head_dim] + [c.num_kv_heads * c.head_dim] * 2,
    "layers.{i}.mlp.gate_up.{p}": lambda c: [c.intermediate_size] * 2,
}
# tensors some checkpoints carry that the model recomputes or shares
IGNORED_HF_NAMES = re.compile(r".*rotary_emb\.inv_freq$")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def _template(name: str) -> tuple[str, str, str]:
    """'layers.3.attention.qkv.bias' -> ('layers.{i}.attention.qkv.{p}', '3', 'bias')."""
    match = re.fullmatch(r"layers\.(\d+)\.(.*)", name)
    layer, rest = (match.group(1), match.group(2)) if match else ("", name)
    prefix = "layers.{i}." if match else ""
    if f"{prefix}{rest}" in NAME_MAP:
        return f"{prefix}{rest}", layer, ""
    stem, _, kind = rest.rpartition(".")
    return f"{prefix}{stem}.{{p}}", layer, kind


def hf_names(name: str) -> tuple[str, list[str]]:
    """Our parameter name -> (its NAME_MAP template, the concrete Hugging Face names it is made of)."""
    template, layer, kind = _template(name)
    return template, [hf.format(i=layer, p=kind) for hf in NAME_MAP[template]]


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face names (fused ones split); tied models omit `lm_head.weight`."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        template, names = hf_names(name)
        parts = tensor.split(SPLIT_SIZES[template](model.config)) if len(names) > 1 else [tensor]
        for hf_name, part in zip(names, parts, strict=True):
            tensors[hf_name] = part.detach().contiguous()
    return tensors


def from_hf_tensors(
    our_names: list[str], read: Callable[[str], torch.Tensor | None], source: str
) -> dict[str, torch.Tensor]:
    """Our state dict from a reader of Hugging Face tensors (None when absent); missing tensors are refused."""
    state = {}
    for name in our_names:
        _, names = hf_names(name)
        parts = [read(hf_name) for hf_name in names]
        missing = [hf_name for hf_name, part in zip(names, parts) if part is None]
        if missing:
            raise UnitrainError(f"{source}: checkpoint has no tensor {missing[0]} (needed for {name})")
        state[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return state


class _CheckpointReader:
    """Lazy access to the tensors of `model.safetensors` or a sharded safetensors index."""

    def __init__(self, directory: Path) -> None:
        index_path, single = directory / SAFETENSORS_INDEX, directory / "model.safetensors"
        if index_path.exists():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        elif single.exists():
            with safe_open(single, framework="pt") as handle:
                self.files = {name: single for name in handle.keys()}
        else:
            raise UnitrainError(f"{directory}: no model.safetensors or {SAFETENSORS_INDEX}")
        self.handles: dict[Path, object] = {}
        self.used: set[str] = set()

    def __call__(self, name: str) -> torch.Tensor | None:
        file = self.files.get(name)
        if file is None:
            return None
        if file not in self.handles:
            if not file.exists():
                raise UnitrainError(f"{file}: shard listed in {SAFETENSORS_INDEX} is missing")
            self.handles[file] = safe_open(file, framework="pt")
        self.used.add(name)
        return self.handles[file].get_tensor(name)


def from_pretrained(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    backend: str = "auto",
    trust_remote_code: bool = False,
) -> Transformer:
    """Load a Hugging Face checkpoint directory. `dtype` None = float32 (training master weights). `backend`
    (auto | native | transformers) picks the decoder (`model/hf_backend/build.py` for the transformers one)."""
    from unitrain.model.hf_backend.build import load_hf_model, resolve_backend

    directory = Path(path)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise UnitrainError(f"{directory}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise UnitrainError(f"{config_path}: invalid JSON ({error})") from None
    if resolve_backend(hf_config, backend, str(config_path)) == "transformers":
        return load_hf_model(directory, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    config = ModelConfig.from_hf(hf_config, source=str(config_path))
    with torch.device("meta"):
        model = Transformer(config)
    reader = _CheckpointReader(directory)
    state = from_hf_tensors(list(model.state_dict()), reader, str(directory))
    for name, tensor in model.state_dict().items():
        if state[name].shape != tensor.shape:
            raise UnitrainError(
                f"{directory}: tensor for {name} has shape {tuple(state[name].shape)}, "
                f"config.json implies {tuple(tensor.shape)}"
            )
    unexpected = [
        name
        for name in reader.files
        if name not in reader.used
        and not IGNORED_HF_NAMES.fullmatch(name)
        and not (config.tie_word_embeddings and name == "lm_head.weight")
    ]
    if unexpected:
        raise UnitrainError(f"{directory}: unexpected tensor {unexpected[0]} for {config.architecture}")
    dtype = dtype or torch.float32
    for name in list(state):  # one at a time: a tensor read is let go as soon as its copy exists
        joined = len(hf_names(name)[1]) > 1  # made by torch.cat: memory of its own already
        state[name] = _owned(state.pop(name), device, dtype, joined)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _owned(tensor: torch.Tensor, device, dtype: torch.dtype, joined: bool) -> torch.Tensor:
    """`tensor` in `dtype` on `device`, in memory of its own. One read in the file's dtype is a view of
    safetensors' memory map, and one such view kept by the model keeps the whole map alive: every page read while
    loading, the q/k/v and gate/up parts of the fused weights included, 0.27 GB per SmolLM2-135M model."""
    moved = tensor.to(device=device, dtype=dtype)
    return moved.clone() if moved is tensor and not joined else moved


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if match is None:
        raise UnitrainError(f"max_shard_size: expected bytes or a size such as '5GB', got {size!r}")
    return int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)])


def _write_generation_config(hf_config: dict, directory: Path) -> None:
    """generation_config.json with the special token ids, so that `generate` stops at EOS."""
    ids = {key: hf_config.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    ids = {key: value for key, value in ids.items() if value is not None}
    if ids:
        generation = {"_from_model_config": True, **ids}
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def save_pretrained(model: Transformer, path: str | Path, max_shard_size: int | str = "5GB") -> None:
    """Write config.json, generation_config.json (when BOS/EOS/PAD are known) and safetensors weights that
    `transformers.AutoModelForCausalLM` loads as is.

    Above `max_shard_size` the weights are split into `model-0000k-of-0000n.safetensors` plus an index. A
    transformers-backend model is written by its own `save_pretrained`.
    """
    directory = Path(path)
    if not isinstance(model, Transformer):
        model.save_pretrained(directory, max_shard_size=max_shard_size)
        return
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.cpu() for name, tensor in to_hf_state_dict(model).items()}
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    hf_config = model.config.to_hf()
    hf_config.pop("torch_dtype", None)
    hf_config["dtype"] = str(model.lm_head_weight.dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    _write_generation_config(hf_config, directory)
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        follow_umask(directory / "model.safetensors")
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        follow_umask(directory / file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
