"""The decoder (Llama 2/3, Mistral, Qwen2, Qwen3), its config, packed-batch attention and Hugging Face I/O; every
other causal LM through the transformers backend (`hf_backend/`)."""

from unitrain.model.config import SUPPORTED_ARCHITECTURES, ModelConfig
from unitrain.model.hf import from_pretrained, save_pretrained
from unitrain.model.llama import Transformer, build_model

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelConfig",
    "Transformer",
    "build_model",
    "from_pretrained",
    "save_pretrained",
]
