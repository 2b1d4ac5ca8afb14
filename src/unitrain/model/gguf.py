"""A GGUF file (llama.cpp's format) → a Hugging Face checkpoint directory that `model.path` takes.

transformers reads the GGUF (dequantizing its tensors with the `gguf` package; `gguf` and `accelerate` form an
optional extra, imported only here) and rebuilds its tokenizer, chat template included, from the file's
metadata; the weights then go through our own `from_hf_tensors`/`save_pretrained`, so the checkpoint is written
exactly as every export is. transformers marks a model read from a GGUF as quantized and refuses to save it,
which this route never asks it to. The file's architecture is checked first, from its metadata alone, so an
architecture that transformers cannot read or that unitrain does not train is one line before any tensor is
read. Trade-off: a quantized file is dequantized to fp32 (a Q4 file grows about 8x on disk); the quantization
error stays in the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unitrain.errors import UnitrainError

# GGUF `general.architecture` values whose transformers models unitrain trains (Mistral files say "llama")
TRAINABLE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file, read from its metadata (no tensor is loaded)."""
    import importlib.util

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:  # transformers reads a GGUF through both
        raise UnitrainError(f"import-gguf needs {' and '.join(missing)}: pip install 'unitrain[gguf]'")
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields["general.architecture"]
    except KeyError:
        raise UnitrainError(f"{path}: no general.architecture in its metadata") from None
    except Exception as error:  # the reader raises ValueError and friends on anything that is not a GGUF
        raise UnitrainError(f"{path}: not a readable GGUF file ({error})") from None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def import_gguf(path: str | Path, output: str | Path) -> Path:
    """Write `output` (config.json, generation_config.json, model.safetensors, tokenizer files with the chat
    template) from the GGUF at `path`; built beside `output` and moved into place whole."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from unitrain.files import written_whole

    path, output = Path(path), Path(output)
    if not path.is_file():
        raise UnitrainError(f"{path}: no such GGUF file")
    architecture = gguf_architecture(path)
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UnitrainError(
            f"{path}: transformers cannot read GGUF architecture {architecture!r} (it reads "
            f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    if architecture not in TRAINABLE:
        raise UnitrainError(
            f"{path}: GGUF architecture {architecture!r} is not one unitrain trains ({', '.join(sorted(TRAINABLE))})"
        )
    with written_whole(output) as staging:
        _write_checkpoint(path, staging)
    return output


def _write_checkpoint(path: Path, directory: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unitrain.model.config import ModelConfig
    from unitrain.model.hf import from_hf_tensors, save_pretrained
    from unitrain.model.llama import Transformer

    hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    hf_config = hf_model.config.to_diff_dict()
    for key in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
        "dtype",
    ):
        hf_config.pop(key, None)
    hf_config["architectures"] = [type(hf_model).__name__]
    config = ModelConfig.from_hf(hf_config, source=str(path))
    state = hf_model.state_dict()
    with torch.device("meta"):
        model = Transformer(config)
    ours = from_hf_tensors(list(model.state_dict()), state.get, str(path))
    model.load_state_dict(ours, strict=True, assign=True)
    del hf_model, state
    save_pretrained(model, directory)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.save_pretrained(directory)
