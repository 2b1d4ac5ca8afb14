"""The decoder: one implementation of Llama 2/3, Mistral, Qwen2 and Qwen3 that returns hidden states.

RMSNorm, RoPE (plain, linear or Llama-3 scaled, from explicit positions), grouped-query attention, SwiGLU, tied or
untied embeddings. The model never applies the LM head during training: `hidden_states(batch)` stops after the
final norm and the loss applies `lm_head_weight` in chunks (`unitrain.losses.logprobs`), so full logits never
exist. q/k/v and gate/up are each one fused linear (one matmul instead of three/two, which matters on CPU); the
Hugging Face name map in `hf.py` splits and joins them. Numerics follow `transformers`: norms and RoPE tables in
fp32, cast back to the activation dtype. What a layer keeps for the backward is trimmed without changing a bit:
the norms' outputs, silu(gate) * up and the attention output's copy that the output projection consumes are
rebuilt in backward from tensors the graph keeps anyway (`recomputed_in_backward`): for SmolLM2-135M a layer keeps
23 KB per token instead of 36 KB.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unitrain.data.batch import PackedBatch
from unitrain.model.attention import Attention, build_attention, causal_attention
from unitrain.model.config import ModelConfig


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """weight * x / rms(x) (computed in fp32, fp64 stays fp64) and the (..., 1) reciprocal rms."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    return weight * (x32 * rstd).to(x.dtype), rstd


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


_top_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_recomputed: list[
    tuple[tuple[int, int], list]
] = []  # ((address, bytes), [recipe or its value]) of open contexts


def _pack(saved: torch.Tensor):  # noqa: ANN202
    storage = saved.untyped_storage()
    memory = (storage.data_ptr(), storage.nbytes())
    for known, recipe in _recomputed:
        if known == memory:
            return recipe, saved.size(), saved.stride(), saved.storage_offset()
    return saved  # kept as autograd would keep it


def _unpack(packed) -> torch.Tensor:  # noqa: ANN001
    if isinstance(packed, torch.Tensor):
        return packed
    recipe, shape, stride, offset = packed
    if callable(recipe[0]):  # the first save asked for: recompute, shared by the others until they are freed
        with torch.no_grad():
            recipe[0] = recipe[0]()
    return recipe[0].as_strided(shape, stride, offset)


def _foreign_hooks_in_force() -> bool:
    """Saved-tensor hooks other than ours are in force (activation checkpointing's, a caller's), or this torch
    cannot tell."""
    if _top_saved_tensors_hooks is None:
        return True
    top = _top_saved_tensors_hooks(False)
    return top is not None and top[0] is not _pack


@contextlib.contextmanager
def recomputed_in_backward(tensor: torch.Tensor, recompute: Callable[[], torch.Tensor]):
    """A context in which every op that saves `tensor` (or a view of it) for the backward, such as the Linear or
    the LoRA projection that consumes it, saves a recipe instead: `recompute()` runs when the backward first asks
    for it, so `tensor` is not kept from forward to backward. `recompute` must repeat the forward's ops on inputs
    the graph keeps anyway: the backward sees the same bits and the recipe costs no memory. Contexts nest (one
    list of open recipes serves every level).

    Nothing changes without autograd, and nothing changes under another saved-tensor hook (activation
    checkpointing's, which recomputes the whole layer anyway, or a caller's): it is never shadowed."""
    storage = tensor.untyped_storage()
    if (
        not torch.is_grad_enabled() or _foreign_hooks_in_force() or storage.data_ptr() == 0
    ):  # 0: a meta tensor
        yield
        return
    _recomputed.append(((storage.data_ptr(), storage.nbytes()), [recompute]))
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _recomputed.pop()


class _RMSNormFunction(torch.autograd.Function):
    """weight * (x / rms(x)) saving only x and the (..., 1) reciprocal rms: the normalized x is recomputed in
    backward instead of being kept per layer beside the norm's output (one (T, D) activation less per norm)."""

    @staticmethod
    def forward(ctx, x, weight, eps):  # noqa: ANN001, ANN205
        out, rstd = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd  # (..., D) fp32
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad * weight).to(rstd.dtype)  # (..., D)
            grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)

    def recomputed(self, x: torch.Tensor, normed: torch.Tensor):
        """A context in which the consumers of `normed` = self(x) keep `x` (kept by the norm anyway) instead."""
        x, weight = x.detach(), self.weight.detach()
        return recomputed_in_backward(normed, lambda: _rms_norm(x, weight, self.eps)[0])


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up from the fused (..., 2F) gate/up projection, saving only that projection: silu(gate) is
    recomputed in backward instead of being kept per layer (one (T, F) activation less per MLP)."""

    @staticmethod
    def forward(ctx, gate_up):  # noqa: ANN001, ANN205
        ctx.save_for_backward(gate_up)
        return _silu_mul(gate_up)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        sigmoid = torch.sigmoid(gate)
        silu = gate * sigmoid
        grad_gate = grad * up * (sigmoid + silu * (1 - sigmoid))  # d silu / d gate = s + g s (1 - s)
        return torch.cat([grad_gate, grad * silu], dim=-1)


def rope_inverse_frequencies(config: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """(Dh/2,) fp32 inverse frequencies, with linear or Llama-3 scaling applied."""
    head_dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    # long wavelengths are slowed by `factor`, short ones kept, and the band between interpolated smoothly
    smooth = (original / wavelength - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    in_band = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(in_band, interpolated, scaled)


def rope_tables(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """positions (R, T) -> cos, sin (R, T, 1, Dh) in `dtype`, computed in fp32."""
    angles = positions.float()[..., None] * inv_freq  # (R, T, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]  # (R, T, 1, Dh)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (R, T, H, Dh) rotated by the half-split convention of `transformers`."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        qkv_width = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.qkv = nn.Linear(config.hidden_size, qkv_width, bias=config.qkv_bias)
        self.out = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=config.output_bias)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: Attention
    ) -> torch.Tensor:
        rows, length, _ = x.shape
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_width, kv_width, kv_width], dim=-1)  # (R, T, H*Dh), (R, T, Hkv*Dh) x2
        q = q.view(rows, length, self.num_heads, self.head_dim)  # (R, T, H, Dh)
        k = k.view(rows, length, self.num_kv_heads, self.head_dim)  # (R, T, Hkv, Dh)
        v = v.view(rows, length, self.num_kv_heads, self.head_dim)  # (R, T, Hkv, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y, recipe = attention.with_recipe(q, k, v)  # (R, T, H, Dh)
        y = y.reshape(rows, length, q_width)
        with recomputed_in_backward(y, lambda: recipe().reshape(rows, length, q_width)):
            return self.out(y)  # (R, T, D)


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)  # (R, T, 2F), kept by _SiluMul
        hidden = _SiluMul.apply(gate_up)  # (R, T, F)
        with recomputed_in_backward(hidden, lambda: _silu_mul(gate_up.detach())):
            return self.down(hidden)  # (R, T, D)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = SelfAttention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: Attention
    ) -> torch.Tensor:
        normed = self.attention_norm(x)
        with self.attention_norm.recomputed(x, normed):  # q/k/v's projection keeps x, not its norm
            x = x + self.attention(normed, cos, sin, attention)  # (R, T, D)
        normed = self.mlp_norm(x)
        with self.mlp_norm.recomputed(x, normed):
            return x + self.mlp(normed)  # (R, T, D)


class Transformer(nn.Module):
    """Decoder-only transformer. `hidden_states(batch)` for training, `forward(input_ids)` -> logits for checks."""

    def __init__(self, config: ModelConfig, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = gradient_checkpointing
        self.attention_backend = "auto"  # see unitrain.model.attention.BACKENDS
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, D): the output projection (the input embedding when tied)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def _decode(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention: Attention
    ) -> torch.Tensor:
        x = self.embed(input_ids)  # (R, T, D)
        inv_freq = rope_inverse_frequencies(self.config, device=input_ids.device)
        dtype = (
            torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        )
        cos, sin = rope_tables(inv_freq, position_ids, dtype)  # (R, T, 1, Dh) each
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, attention, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attention)
        return self.norm(x)  # (R, T, D)

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        """Final-norm hidden states (R, T, D) of a packed batch; the mask is built here, once, for all layers."""
        attention = build_attention(batch, self.attention_backend, self.config.sliding_window)
        return self._decode(batch.input_ids, batch.position_ids, attention)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) of unpacked, unpadded sequences -> logits (B, T, V)."""
        rows, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).expand(rows, length)  # (B, T)
        window = self.config.sliding_window
        if window is None or length <= window:
            attention = causal_attention()
        else:
            plain = torch.zeros_like(input_ids)
            batch = PackedBatch.layout_only(input_ids, positions, plain, plain)
            attention = build_attention(batch, "dense", window)
        hidden = self._decode(input_ids, positions, attention)  # (B, T, D)
        return hidden @ self.lm_head_weight.T  # (B, T, V)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Trainable parameter count; `exclude_embeddings` drops the input embedding (not a tied LM head)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.lm_head is not None:
            total -= self.embed.weight.numel()
        return total

    def flops_per_token(self, attended_keys: float) -> float:
        """Training FLOPs (forward + backward) per token: 6 x matmul parameters + attention scores and values.

        `attended_keys` is the mean number of keys a token attends to (about T/2 for causal rows of length T;
        the mean document length / 2 for packed documents). The input embedding is a lookup, not a matmul.
        """
        config = self.config
        matmul_params = self.num_parameters() - (0 if self.lm_head is None else self.embed.weight.numel())
        attention = 12 * config.num_layers * config.num_heads * config.head_dim * attended_keys
        return 6 * matmul_params + attention


def init_weights(model: Transformer) -> None:
    """Normal(0, initializer_range) for matmul weights and embeddings, zero biases, unit norms."""
    std = model.config.initializer_range
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


def build_model(config: ModelConfig, gradient_checkpointing: bool = False) -> Transformer:
    """A randomly initialized model; seeded by the caller's torch seed."""
    model = Transformer(config, gradient_checkpointing=gradient_checkpointing)
    init_weights(model)
    return model
