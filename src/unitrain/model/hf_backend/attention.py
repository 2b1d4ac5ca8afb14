"""unitrain's attention rule inside any `transformers` model: one function registered through transformers'
`AttentionInterface` under the name `unitrain`.

A model built with `attn_implementation="unitrain"` calls `packed_attention(module, query, key, value, mask,
scaling=..., sliding_window=..., softcap=...)` in every attention layer. transformers builds no mask for an
implementation it has no mask function for (its mask preparation returns None), so no (T, T) mask ever exists on
this path; the function runs the backends of `unitrain.model.attention` (blocks on CPU, flex on CUDA) from the
layout of the batch being run, which `use_layout` makes current for the length of one forward. The layout is
reached through a context rather than the model's keyword arguments because not every architecture passes its
keyword arguments down to the attention call (StableLM does not); activation checkpointing re-enters the same
layout when it recomputes a layer (`recompute_context`). Trade-off: a forward of a model built this way needs a
current layout; outside one (a plain `model(input_ids)` call) every row is taken as one causal sequence.

Per layer the function honours the layer's own `scaling` (Gemma's `query_pre_attn_scalar`, Granite's
`attention_multiplier`), `softcap` (Gemma 2) and sliding window: the `sliding_window` argument when the layer
passes it, else the window the config assigns to the layer (`layer_types[i] == "sliding_attention"`, as Qwen2-MoE
applies it through the mask alone). Anything else it cannot honour (an attention mask or bias it was handed,
attention sinks, dropout while training) is refused instead of ignored, and `PackedLayout.calls` counts the
layers that went through it, so a model whose attention bypasses the interface is caught after one forward.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from unitrain.data.batch import SEGMENT_PLAIN, PackedBatch
from unitrain.errors import UnitrainError
from unitrain.model.attention import Attention, build_attention

ATTENTION_NAME = "unitrain"
# keyword arguments transformers' attention layers pass that change nothing here (when None/False/0)
IGNORED = {"position_ids", "use_cache", "output_router_logits", "cache_position", "output_attentions"}
_state = threading.local()


class PackedLayout:
    """The attention of one batch, built lazily per sliding window (Gemma 2/3 alternate two) and reused by every
    layer of one forward."""

    def __init__(
        self, batch: PackedBatch, backend: str = "auto", layer_windows: list[int | None] | None = None
    ):
        self.batch = batch
        self.backend = backend
        self.layer_windows = layer_windows or []
        self.calls = 0
        self._attention: dict[int | None, Attention] = {}

    def attention(self, window: int | None) -> Attention:
        if window is not None and int(self.batch.position_ids.max()) < window:
            window = None  # no two slots are that far apart: the window changes nothing
        if window not in self._attention:
            self._attention[window] = build_attention(self.batch, self.backend, window)
        return self._attention[window]


def plain_layout(input_ids: torch.Tensor, layer_windows: list[int | None]) -> PackedLayout:
    """Every row one unpadded causal sequence (a plain `model(input_ids)` call)."""
    rows, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device).expand(rows, length)
    plain = torch.full_like(input_ids, SEGMENT_PLAIN)
    return PackedLayout(PackedBatch.layout_only(input_ids, positions, plain, plain), "auto", layer_windows)


def current_layout() -> PackedLayout | None:
    return getattr(_state, "layout", None)


@contextlib.contextmanager
def use_layout(layout: PackedLayout | None) -> Iterator[None]:
    """Make `layout` the one attention layers read for the length of the block."""
    previous = current_layout()
    _state.layout = layout
    try:
        yield
    finally:
        _state.layout = previous


def recompute_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` of torch.utils.checkpoint: the recomputation in backward runs under the layout of the forward
    it recomputes."""
    return contextlib.nullcontext(), use_layout(current_layout())


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (B, H, T, Dh), key/value (B, Hkv, T, Dh) -> ((B, T, H, Dh), None), transformers' convention."""
    layout = current_layout()
    if layout is None:
        raise UnitrainError(
            f"{type(module).__name__}: unitrain attention called outside a unitrain forward (no packed layout)"
        )
    name = type(module).__name__
    if attention_mask is not None:
        raise UnitrainError(f"{name}: got an attention mask or bias; unitrain's attention cannot apply it")
    if dropout:
        raise UnitrainError(
            f"{name}: attention dropout {dropout} is not supported (set it to 0 in the config)"
        )
    if kwargs.pop("is_causal", None) is False:
        raise UnitrainError(f"{name}: a bidirectional (non-causal) attention layer is not supported")
    unknown = sorted(key_ for key_, v in kwargs.items() if key_ not in IGNORED and v is not None)
    if unknown:
        raise UnitrainError(f"{name}: attention argument(s) {', '.join(unknown)} are not supported")
    if sliding_window is None:
        layer = getattr(module, "layer_idx", None)
        if layer is not None and layer < len(layout.layer_windows):
            sliding_window = layout.layer_windows[layer]
    layout.calls += 1
    attention = layout.attention(int(sliding_window) if sliding_window else None)
    out = attention(  # (B, T, H, Dh)
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scaling, softcap=softcap
    )
    return out, None


def register() -> str:
    """Register the function with transformers (idempotent); returns the implementation's name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention)
    return ATTENTION_NAME
