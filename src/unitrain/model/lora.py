"""LoRA on the decoder's own linears: a frozen base plus one low-rank update per Hugging Face projection.

The decoder fuses q/k/v (`attention.qkv`) and gate/up (`mlp.gate_up`) into one linear each. `LoraLinear` keeps
that fused base matmul and adds `B(A(dropout(x))) * alpha / rank` to the slice of the output that belongs to each
targeted projection, so a LoRA on `q_proj` touches exactly the q columns, as `peft` on a `transformers` model
does, and the export maps each adapter to PEFT's per-projection names. `A` starts as PEFT's default (uniform in
±1/sqrt(fan_in), the default of `nn.Linear`) and `B` at zero, so a fresh adapter leaves the model unchanged.

Inside `reference_adapters(model)` every LoRA linear computes the DPO reference instead: its base alone, or the
base plus a frozen copy of the adapter a run started from (`keep_as_reference`). The trade-off: the policy and
its reference are one module that switches per forward, so no second model exists, but the reference forward
costs as much as the policy's (it is not cached by the module); a run that starts from an adapter keeps one
extra copy of that (small) adapter.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from unitrain.config_sections import LORA_TARGET_MODULES  # the Hugging Face projections an adapter can target
from unitrain.model.hf import SPLIT_SIZES, hf_names
from unitrain.model.llama import Transformer


def projections(model: Transformer, module_name: str) -> list[tuple[str, int]]:
    """(Hugging Face projection name, output width) of each part of our linear `module_name`, in order.

    'layers.0.attention.qkv' -> [('q_proj', H*Dh), ('k_proj', Hkv*Dh), ('v_proj', Hkv*Dh)]."""
    template, names = hf_names(f"{module_name}.weight")
    parts = [name.split(".")[-2] for name in names]
    linear = model.get_submodule(module_name)
    widths = SPLIT_SIZES[template](model.config) if len(parts) > 1 else [linear.out_features]
    return list(zip(parts, widths, strict=True))


class LoraLinear(nn.Linear):
    """A frozen (possibly fused) linear with trainable low-rank updates on some of its output slices.

    `weight` and `bias` are the base linear's own parameters (same names, so checkpoints and the Hugging Face map
    see an ordinary linear); `lora_A[name]` (r, in) and `lora_B[name]` (width, r) are the adapter of projection
    `name`. The forward runs all of a linear's adapters as two matmuls: x @ [A_q; A_k; A_v]^T, then one
    accumulate into the base output with the block-diagonal of the B matrices (zero rows for parts without an
    adapter), so the extra cost is a few thin matmuls and no extra (tokens, out) tensor."""

    def __init__(
        self,
        base: nn.Linear,
        parts: list[tuple[str, int]],
        targets: list[str],
        rank: int,
        alpha: float,
        dropout: float,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.scale = alpha / rank
        self.dropout = dropout
        self.use_reference = False
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None  # frozen starting adapter, stacked
        self.parts = parts  # (projection, width) of every part of the output, in order
        self.targets = [name for name, _ in parts if name in targets]
        widths = dict(parts)
        self.lora_A = nn.ParameterDict(
            {
                name: nn.Parameter(torch.empty(rank, self.in_features, dtype=torch.float32))
                for name in self.targets
            }
        )
        self.lora_B = nn.ParameterDict(
            {
                name: nn.Parameter(torch.zeros(widths[name], rank, dtype=torch.float32))
                for name in self.targets
            }
        )

    def reset_adapters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a=sqrt(5)), B = 0."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            for name in self.targets:
                values = torch.rand(self.lora_A[name].shape, generator=generator, dtype=torch.float32)
                self.lora_A[name].copy_(values * (2 * bound) - bound)
                self.lora_B[name].zero_()

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainable adapters as A (S*r, in) and a block-diagonal B (O, S*r); differentiable."""
        empty = self.lora_B[self.targets[0]].new_zeros(0, 0)
        blocks = [
            self.lora_B[name] if name in self.lora_B else empty.new_zeros(width, 0)
            for name, width in self.parts
        ]
        return torch.cat([self.lora_A[name] for name in self.targets]), torch.block_diag(*blocks)

    def _active(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.use_reference:
            return self.reference
        return self.stacked()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (N, in)
        out = F.linear(flat, self.weight, self.bias)  # (N, O): the fused base matmul, unchanged
        adapters = self._active()
        if adapters is not None:
            lora_a, lora_b = adapters  # (S*r, in), (O, S*r)
            if not torch.is_autocast_enabled(x.device.type):
                flat = flat.to(lora_a.dtype)
            if self.dropout and self.training and not self.use_reference:
                # its own dropout mask per projection, as PEFT
                rank = lora_a.shape[0] // len(self.targets)
                hidden = torch.cat(
                    [F.linear(F.dropout(flat, self.dropout), a) for a in lora_a.split(rank)], dim=-1
                )  # (N, S*r)
            else:
                hidden = F.linear(flat, lora_a)  # (N, S*r)
            # in place: the base matmul's backward does not need its output
            out.addmm_(hidden.to(out.dtype), lora_b.to(out.dtype).T, alpha=self.scale)
        return out.view(*x.shape[:-1], self.out_features)  # (..., O)

    def merged_weight(self) -> torch.Tensor:
        """The base weight (O, in) with the active adapters folded in: W + scale * B @ A, computed in fp32."""
        adapters = self._active()
        if adapters is None:
            return self.weight.detach().clone()
        lora_a, lora_b = (tensor.detach().float() for tensor in adapters)
        return (self.weight.detach().float() + (lora_b @ lora_a) * self.scale).to(self.weight.dtype)


def lora_linears(model: nn.Module) -> dict[str, LoraLinear]:
    """Module name -> LoraLinear, in model order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | tuple[str, ...],
    seed: int = 0,
) -> dict[str, LoraLinear]:
    """Freeze every parameter of `model` and put LoRA adapters (fp32, on the weights' device) on the targeted
    projections of every layer, in place. `seed` draws the A matrices identically on every rank. On the
    transformers backend (`HFCausalLM`) the targets are the model's own linear modules, named by their last name
    component as `peft` names them (`query_key_value`, `q_proj`, ...), each a `LoraLinear` of one part."""
    native = isinstance(model, Transformer)
    head = None if native else model.hf.get_output_embeddings()
    linears = {  # the transformers backend: every linear but the head, by its leaf name
        name.rpartition(".")[2]
        for name, module in model.named_modules()
        if type(module) is nn.Linear and module is not head
    }
    valid = LORA_TARGET_MODULES if native else sorted(linears)
    unknown = sorted(set(target_modules) - set(valid))
    if unknown:
        from unitrain.errors import UnitrainError

        what = "unitrain's decoder" if native else type(model.hf).__name__
        names = (
            ", ".join(valid) or "none (its projections are not torch.nn.Linear modules, e.g. GPT-2's Conv1D)"
        )
        raise UnitrainError(f"unknown LoRA target module {unknown[0]!r} for {what}; valid: {names}")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, LoraLinear) or name == "lm_head":
            continue
        if module is head:
            continue
        leaf = name.rpartition(".")[2]
        parts = projections(model, name) if native else [(leaf, module.out_features)]
        targets = [part for part, _ in parts if part in target_modules]
        if not targets:
            continue
        lora = LoraLinear(module, parts, targets, rank, alpha, dropout)
        lora.reset_adapters(generator)
        lora.to(module.weight.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lora)
    return lora_linears(model)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our names -> adapter tensors ('layers.0.attention.qkv.lora_A.q_proj': (r, in)), nothing of the base."""
    return {
        f"{module_name}.lora_{kind}.{name}": tensor
        for module_name, module in lora_linears(model).items()
        for kind, tensors in (("A", module.lora_A), ("B", module.lora_B))
        for name, tensor in tensors.items()
    }


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy adapter tensors (our names) into `model`'s adapters: exactly the same names and shapes, or a
    one-line error naming `source`."""
    from unitrain.errors import UnitrainError

    targets = adapter_state_dict(model)
    missing, unexpected = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
    if missing or unexpected:
        what = f"no adapter {missing[0]}" if missing else f"unexpected adapter {unexpected[0]}"
        raise UnitrainError(f"{source}: {what} (its LoRA settings differ from the model's)")
    with torch.no_grad():
        for name, target in targets.items():
            if state[name].shape != target.shape:
                raise UnitrainError(
                    f"{source}: adapter {name} has shape {tuple(state[name].shape)}, the model's is "
                    f"{tuple(target.shape)}"
                )
            target.copy_(state[name])


def keep_as_reference(model: nn.Module) -> None:
    """Freeze a copy of the current adapters as the DPO reference (a run that starts from an adapter)."""
    with torch.no_grad():
        for module in lora_linears(model).values():
            module.reference = tuple(tensor.detach().clone() for tensor in module.stacked())


@contextlib.contextmanager
def reference_adapters(model: nn.Module) -> Iterator[None]:
    """Within: each LoRA linear computes the reference (its base, or base + the frozen starting adapter)."""
    modules = lora_linears(model).values()
    for module in modules:
        module.use_reference = True
    try:
        yield
    finally:
        for module in modules:
            module.use_reference = False


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain linears back, in place; returns `model`."""
    for name, module in lora_linears(model).items():
        linear = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta"
        )
        linear.weight = nn.Parameter(module.merged_weight(), requires_grad=False)
        linear.bias = module.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model
