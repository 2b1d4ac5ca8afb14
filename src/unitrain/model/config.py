"""ModelConfig: the decoder's shape, and its translation to and from a Hugging Face `config.json`.

One dataclass covers Llama 2/3, Mistral, Qwen2 and Qwen3: the architectures differ only in a few switches (q/k/v
bias, q/k RMSNorm, RoPE scaling, sliding window), so each is a field rather than a subclass. The trade-off: the
architecture-specific defaults live in `from_hf`/`to_hf` instead of in four classes, and any architecture outside
the four is refused at the boundary instead of half-loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from unitrain.errors import UnitrainError

# architecture name in config.json -> model_type written back on export
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

# the config.json keys `from_hf` reads (any other is kept in `extra` and written back, but shapes nothing)
HF_CONFIG_KEYS = frozenset({
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "sliding_window", "use_sliding_window", "bos_token_id", "eos_token_id", "pad_token_id",
    "initializer_range", "hidden_act", "transformers_version",
})  # fmt: skip


# The config.json fields the native decoder cannot do without.
REQUIRED_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


@dataclass
class ModelConfig:
    """Decoder hyper-parameters. Invalid or contradictory values raise `UnitrainError` at construction."""

    vocab_size: int  # rows of the embedding and the LM head
    hidden_size: int  # model width D
    intermediate_size: int  # SwiGLU inner width
    num_layers: int  # decoder blocks
    num_heads: int  # query heads
    num_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = num_heads
    head_dim: int | None = None  # per-head width; None = hidden_size // num_heads
    architecture: str = "LlamaForCausalLM"  # Hugging Face class name, one of SUPPORTED_ARCHITECTURES
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3" | "linear", ...} as in config.json
    max_position_embeddings: int = 4096  # longest position the checkpoint was trained for (metadata)
    tie_word_embeddings: bool = False  # LM head shares the input embedding
    qkv_bias: bool = False  # bias on the q/k/v projections (Qwen2; Llama/Qwen3 `attention_bias`)
    output_bias: bool = False  # bias on the attention output projection (Llama/Qwen3 `attention_bias`)
    mlp_bias: bool = False  # bias on the SwiGLU projections (Llama `mlp_bias`)
    qk_norm: bool = False  # RMSNorm over each query/key head before RoPE (Qwen3)
    sliding_window: int | None = None  # Mistral: attend at most this many positions back; None = unlimited
    bos_token_id: int | None = None  # written back to config.json on export
    eos_token_id: int | list[int] | None = None  # written back to config.json on export
    pad_token_id: int | None = None  # written back to config.json on export
    initializer_range: float = 0.02  # std of the normal init of `build_model`
    extra: dict[str, Any] = field(default_factory=dict)  # unrelated config.json keys, kept for export

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_heads, 1)
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise UnitrainError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnitrainError(
                f"model config: architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.sliding_window is not None and self.model_type != "mistral":
            raise UnitrainError("model config: sliding_window is only supported for MistralForCausalLM")
        if self.num_heads % self.num_kv_heads:
            raise UnitrainError(
                f"model config: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise UnitrainError(
                f"model config: head_dim must be positive and even for RoPE, got {self.head_dim}"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UnitrainError(
                    f"model config: rope_type {rope_type!r} is not supported; "
                    f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
                )
            required = ROPE_SCALING_KEYS.get(rope_type, ())
            missing = [key for key in required if key not in self.rope_scaling]
            if missing:
                raise UnitrainError(
                    f"model config: rope_scaling of type {rope_type} needs {', '.join(missing)}"
                )
            if rope_type == "default":
                self.rope_scaling = None
            else:
                self.rope_scaling = {**self.rope_scaling, "rope_type": rope_type}
                self.rope_scaling.pop("type", None)
                self.rope_scaling.pop("rope_theta", None)

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a Hugging Face config dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters` form)."""
        architectures = hf.get("architectures") or []
        architecture = architectures[0] if architectures else None
        if architecture is None:
            by_type = {model_type: name for name, model_type in SUPPORTED_ARCHITECTURES.items()}
            architecture = by_type.get(hf.get("model_type"), f"model_type={hf.get('model_type')}")
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise UnitrainError(
                f"{source}: architecture {architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        missing = [key for key in REQUIRED_HF_FIELDS if key not in hf]
        if missing:
            raise UnitrainError(f"{source}: missing field(s) {', '.join(missing)}")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        family = SUPPORTED_ARCHITECTURES[architecture]
        attention_bias = bool(hf.get("attention_bias", False))
        sliding = hf.get("sliding_window") if family == "mistral" else None
        if hf.get("use_sliding_window", False):
            raise UnitrainError(f"{source}: use_sliding_window=true (per-layer windows) is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise UnitrainError(
                f"{source}: hidden_act {hf['hidden_act']!r} is not supported; supported: silu"
            )
        try:
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=int(hf["num_attention_heads"]),
                num_kv_heads=hf.get("num_key_value_heads"),
                head_dim=hf.get("head_dim"),
                architecture=architecture,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope or None,
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=True if family == "qwen2" else attention_bias,
                output_bias=attention_bias if family in ("llama", "qwen3") else False,
                mlp_bias=bool(hf.get("mlp_bias", False)) if family == "llama" else False,
                qk_norm=family == "qwen3",
                sliding_window=int(sliding) if sliding else None,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
                initializer_range=float(hf.get("initializer_range", 0.02)),
                extra={key: value for key, value in hf.items() if key not in HF_CONFIG_KEYS},
            )
        except UnitrainError as error:
            raise UnitrainError(f"{source}: {str(error).removeprefix('model config: ')}") from None
        except (TypeError, ValueError) as error:  # e.g. hidden_size: "abc", rms_norm_eps: null
            raise UnitrainError(f"{source}: a field has a value of the wrong type ({error})") from None

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that `transformers` (4.46+ and 5.x) loads as the same model."""
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        hf: dict[str, Any] = {
            **self.extra,
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.rope_scaling is not None:
            hf["rope_scaling"] = dict(self.rope_scaling)
        if self.model_type in ("llama", "qwen3"):
            hf["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            hf["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            hf["use_sliding_window"] = False
        return hf

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
