"""The transformers backend: any decoder-only causal LM that `transformers` can build, trained in unitrain's packed
layouts.

`HFCausalLM` wraps a `transformers` `*ForCausalLM` built with `attn_implementation="unitrain"`
(`model/hf_backend/attention.py`) and offers what unitrain's own decoder offers: `hidden_states(batch)` (the decoder's final
hidden states of a PackedBatch, run once with the batch's layout current), `lm_head_weight`, the head's transform
(`logit_softcap`, Gemma 2; a scale, Granite and Cohere, folded into the hidden states), `forward(input_ids)` (the
model's own logits, for checks), `gradient_checkpointing`, `config.to_hf()`. Loading and saving are the model's own
(`from_pretrained`/`save_pretrained`), so every architecture round-trips. The trade-off against the native decoder:
no fused q/k/v or gate/up matmuls and one wrapper more per layer, in exchange for every architecture transformers
implements.

What cannot be trained exactly is refused in one line when the model is built, never trained wrong:
encoder-decoder, vision-language and non-causal classes; remote code unless `trust_remote_code`; layers that are
not attention (`layer_types`, or the probe of `transformers_probe.py`: a document packed after another must get
the hidden states it gets alone, which any state-space, convolution or linear-attention layer mixing the row
breaks); attention that does not go through transformers' `AttentionInterface` (the calls are counted); an LM
head with a bias. Dropout is set
to 0 (unitrain trains without dropout, as its native decoder has none).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unitrain.data.batch import PackedBatch
from unitrain.errors import UnitrainError
from unitrain.model.hf_backend.attention import (
    PackedLayout,
    plain_layout,
    recompute_context,
    register,
    use_layout,
)
from unitrain.model.hf_backend.probe import probe

ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
# configuration keys of layers that are not attention (state-space, linear attention, convolutions)
NON_ATTENTION_KEYS = (
    "mamba",
    "ssm",
    "conv_",
    "linear_num",
    "linear_key",
    "linear_value",
    "attn_layer_period",
)
BACKEND_KEY = "unitrain_backend"  # marks a checkpoint's model_config.json as a transformers-backend model


class HFConfig:
    """What unitrain reads of a transformers config; `to_hf()` is the config dict a checkpoint records."""

    def __init__(self, config: Any) -> None:
        self.hf = config

    @property
    def architecture(self) -> str:
        return (self.hf.architectures or [causal_lm_class_name(self.hf.model_type)])[0]

    @property
    def vocab_size(self) -> int:
        return int(self.hf.vocab_size)

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(getattr(self.hf, "tie_word_embeddings", False))

    def to_hf(self) -> dict[str, Any]:
        hf = self.hf.to_dict()
        for key in (
            "transformers_version",
            "dtype",
            "torch_dtype",
            "_attn_implementation_autoset",
            "_name_or_path",
        ):
            hf.pop(key, None)
        hf["architectures"] = [self.architecture]
        return {**hf, BACKEND_KEY: "transformers"}


def resolve_backend(hf: dict[str, Any], backend: str, source: str) -> str:
    """`native` or `transformers` for a config.json dict: `auto` picks native for the architectures unitrain's
    decoder implements (when it implements every feature the config asks for), transformers for every other."""
    from unitrain.model.config import REQUIRED_HF_FIELDS, SUPPORTED_ARCHITECTURES, ModelConfig

    if hf.get(BACKEND_KEY) == "transformers" and backend == "auto":
        return "transformers"
    architecture = (hf.get("architectures") or [None])[0]
    by_type = {model_type: name for name, model_type in SUPPORTED_ARCHITECTURES.items()}
    architecture = architecture or by_type.get(hf.get("model_type"), f"model_type={hf.get('model_type')}")
    if backend == "transformers":
        return backend
    if architecture not in SUPPORTED_ARCHITECTURES:
        if backend == "native":
            raise UnitrainError(
                f"{source}: model.backend native implements {', '.join(SUPPORTED_ARCHITECTURES)}, not "
                f"{architecture}; use model.backend transformers (or auto)"
            )
        return "transformers"
    if backend == "native":
        return backend
    if any(key not in hf for key in REQUIRED_HF_FIELDS):
        return "native"  # an incomplete config gets the native decoder's error naming the missing fields
    try:  # a native architecture with a feature the native decoder lacks (yarn RoPE, per-layer windows, ...)
        ModelConfig.from_hf(hf, source)
    except UnitrainError:
        return "transformers"
    return "native"


def causal_lm_class_name(model_type: str | None) -> str | None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type or "")


def _vision_language(architecture: str, config: Any) -> bool:
    from transformers.models.auto import modeling_auto

    names = set()
    for mapping in ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES"):
        names.update(getattr(modeling_auto, mapping, {}).values())
    return architecture in names or getattr(config, "vision_config", None) is not None


def check_config(config: Any, architecture: str, source: str) -> None:
    """Refuse in one line what the backend cannot train exactly (see the module docstring)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        raise UnitrainError(
            f"{source}: {architecture} is an encoder-decoder model; unitrain trains decoder-only LMs"
        )
    if _vision_language(architecture, config):
        raise UnitrainError(
            f"{source}: {architecture} is a vision-language model; unitrain trains text-only LMs"
        )
    remote = getattr(config, "auto_map", None)  # the checkpoint's own class (trust_remote_code was given)
    if architecture not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() and not remote:
        raise UnitrainError(
            f"{source}: {architecture} is not a causal LM class of transformers (expected a *ForCausalLM)"
        )
    if not getattr(config, "is_causal", True):
        raise UnitrainError(
            f"{source}: {architecture} is configured with bidirectional attention (is_causal false)"
        )
    other = sorted(set(getattr(config, "layer_types", None) or ()) - set(ATTENTION_LAYER_TYPES))
    keys = [key for key in config.to_dict() if key.startswith(NON_ATTENTION_KEYS)]
    if other or keys:
        what = f"layer_types {', '.join(map(str, other))}" if other else f"config key {keys[0]}"
        raise UnitrainError(
            f"{source}: {architecture} has layers that are not attention ({what}); they would mix the documents "
            "packed in a row"
        )


def layer_windows(config: Any) -> list[int | None]:
    """The sliding window of each layer as the config assigns it (None: full attention)."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if not types or not window:
        return []
    return [int(window) if kind == "sliding_attention" else None for kind in types]


def _without_dropout(config: Any) -> Any:
    for key, value in config.to_dict().items():
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float) and value:
            setattr(config, key, 0.0)
    return config  # use_cache stays as it is (exports keep it); every forward here passes use_cache=False


class HFCausalLM(nn.Module):
    """A transformers causal LM with unitrain's training interface (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model
        config = model.config
        self.config = HFConfig(config)
        self.attention_backend = "auto"  # see unitrain.model.attention.BACKENDS
        self.layer_windows = layer_windows(config)
        self.num_attention_layers = int(config.num_hidden_layers)
        head = model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise UnitrainError(f"{self.config.architecture}: an LM head with a bias is not supported")
        self.logit_softcap = getattr(config, "final_logit_softcapping", None) or None
        scale = 1.0
        if getattr(config, "logits_scaling", None):  # Granite: logits / logits_scaling
            scale /= float(config.logits_scaling)
        if getattr(config, "logit_scale", None):  # Cohere: logits * logit_scale
            scale *= float(config.logit_scale)
        self.hidden_scale = scale
        self._checkpointing = False

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.hf.get_output_embeddings().weight

    @property
    def gradient_checkpointing(self) -> bool:
        return self._checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self._checkpointing = bool(enabled)
        if enabled:  # the recomputation re-enters the layout of the forward it recomputes
            kwargs = {"use_reentrant": False, "context_fn": recompute_context}
            self.hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif self.hf.is_activation_checkpointing:
            self.hf.activation_checkpointing_disable()

    def _run(self, layout: PackedLayout, input_ids: torch.Tensor, position_ids: torch.Tensor, full: bool):
        with use_layout(layout):
            module = self.hf if full else self.hf.base_model
            out = module(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        if layout.calls != self.num_attention_layers:
            raise UnitrainError(
                f"{self.config.architecture}: {layout.calls} of {self.num_attention_layers} layers ran unitrain's "
                "attention; its attention does not go through transformers' AttentionInterface"
            )
        return out

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        """(R, T, D) final hidden states, scaled so that `hidden @ lm_head_weight.T` are the model's logits before
        its soft-cap."""
        layout = PackedLayout(batch, self.attention_backend, self.layer_windows)
        hidden = self._run(layout, batch.input_ids, batch.position_ids, full=False).last_hidden_state
        return hidden if self.hidden_scale == 1.0 else hidden * self.hidden_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) of unpacked sequences -> the model's own logits (B, T, V), for checks."""
        layout = plain_layout(input_ids, self.layer_windows)
        return self._run(layout, input_ids, layout.batch.position_ids, full=True).logits

    def fsdp_units(self) -> list[nn.Module]:
        """The decoder layers, each its own FSDP2 unit: the modules of the classes transformers keeps unsplit."""
        names = set(getattr(self.hf, "_no_split_modules", None) or ())
        return [module for module in self.hf.modules() if type(module).__name__ in names]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        return self.hf.num_parameters(exclude_embeddings=exclude_embeddings)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        self.hf.save_pretrained(str(path), max_shard_size=max_shard_size)


def hf_config_from_dict(hf: dict[str, Any], source: str) -> Any:
    """A transformers config from `model.config` keys (`model_type`, or `architectures` naming a transformers class)."""
    import transformers
    from transformers import AutoConfig

    hf = {key: value for key, value in hf.items() if key != BACKEND_KEY}
    model_type = hf.pop("model_type", None)
    architecture = (hf.get("architectures") or [None])[0]
    if model_type is None and architecture is not None:
        model_class = getattr(transformers, architecture, None)
        model_type = getattr(getattr(model_class, "config_class", None), "model_type", None)
    if model_type is None:
        raise UnitrainError(
            f"{source}: {architecture or 'no architecture'} is not a model transformers knows"
        )
    try:
        config = AutoConfig.for_model(model_type, **hf)
    except (ValueError, TypeError) as error:
        raise UnitrainError(
            f"{source}: transformers cannot build model_type {model_type!r} ({error})"
        ) from None
    if not config.architectures:
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

        name = causal_lm_class_name(model_type) or MODEL_MAPPING_NAMES.get(
            model_type, f"model_type={model_type}"
        )
        config.architectures = [name]
    return config


def _build(config: Any, source: str, build) -> HFCausalLM:  # noqa: ANN001
    architecture = (config.architectures or ["?"])[0]
    check_config(config, architecture, source)
    name = register()
    try:
        model = build(_without_dropout(config), name)
    except (ValueError, ImportError, OSError) as error:
        raise UnitrainError(
            f"{source}: transformers cannot build {architecture} ({error})".split("\n")[0]
        ) from None
    return HFCausalLM(model)


def build_hf_model(
    hf: dict[str, Any], source: str = "model.config", trust_remote_code: bool = False
) -> HFCausalLM:
    """A randomly initialized model (seeded by the caller's torch seed), checked by the probe."""
    from transformers import AutoModelForCausalLM

    config = hf_config_from_dict(hf, source)

    def build(config, name):  # noqa: ANN001, ANN202
        return AutoModelForCausalLM.from_config(
            config, attn_implementation=name, trust_remote_code=trust_remote_code, dtype=torch.float32
        )

    model = _build(config, source, build)
    probe(model, source)
    return model


def build_empty(hf: dict[str, Any], source: str) -> HFCausalLM:
    """The model of a checkpoint's model_config.json on the meta device, for its state dict to be assigned."""
    from transformers import AutoModelForCausalLM

    config = hf_config_from_dict(hf, source)
    with torch.device("meta"):
        return _build(config, source, lambda c, n: AutoModelForCausalLM.from_config(c, attn_implementation=n))


def load_hf_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
) -> HFCausalLM:
    """A Hugging Face checkpoint directory through transformers' own loader, checked by the probe."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(path)
    source = str(directory / "config.json")
    raw = json.loads((directory / "config.json").read_text())
    if raw.get("auto_map") and not trust_remote_code:
        raise UnitrainError(
            f"{source}: the model needs its own Python code (auto_map); set model.trust_remote_code: true to run it"
        )
    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as error:
        raise UnitrainError(f"{source}: transformers cannot read it ({error})".split("\n")[0]) from None

    def build(config, name):  # noqa: ANN001, ANN202
        return AutoModelForCausalLM.from_pretrained(
            str(directory), config=config, attn_implementation=name, dtype=dtype or torch.float32,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip

    model = _build(config, source, build)
    probe(model, source)
    return model.to(device) if device is not None else model
