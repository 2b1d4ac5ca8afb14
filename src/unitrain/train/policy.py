"""The policy a run trains: the model loaded or built (and checked against the data), and the module that maps a
batch to target log-probs, which DDP/FSDP wrap. Trade-off: the LM head is applied inside that module, in chunks,
so that the wrapped forward returns only (N,) log-probs and full logits never exist.
"""

from __future__ import annotations

import torch

from unitrain.config import TrainConfig
from unitrain.data.batch import PackedBatch
from unitrain.train.compat import check_tokenizer, check_vocab_size
from unitrain.train.data import TrainingData


class PolicyLogprobs(torch.nn.Module):
    """Transformer + chunked target log-probs as one module, so DDP/FSDP wrap the call that makes the graph."""

    def __init__(self, model: torch.nn.Module, chunk_size: int | None = None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        from unitrain.losses.logprobs import target_logprobs

        hidden = self.model.hidden_states(batch)  # (R, T, D)
        return target_logprobs(
            hidden,
            self.model.lm_head_weight,
            batch.target_positions,
            batch.target_tokens,
            chunk_size=self.chunk_size,
            softcap=getattr(self.model, "logit_softcap", None),
        ).logps  # (N,)


def load_policy(
    config: TrainConfig, data: TrainingData, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    from unitrain.model import ModelConfig, build_model, from_pretrained
    from unitrain.model.hf_backend.build import build_hf_model, resolve_backend

    for checkpoint in (config.model.path, config.dpo.reference_model):
        if checkpoint is not None:
            allowed = config.data.allow_tokenizer_mismatch
            check_tokenizer(checkpoint, data.datasets, allowed, "data.allow_tokenizer_mismatch=true")
    backend, remote = config.model.backend, config.model.trust_remote_code
    if config.model.path is not None:
        model = from_pretrained(config.model.path, dtype=dtype, backend=backend, trust_remote_code=remote)
    else:
        torch.manual_seed(config.train.seed)
        # BOS/EOS of the data's tokenizer go into config.json, so that an export's `generate` stops at EOS
        special = {"bos_token_id": data.datasets[0].bos_id, "eos_token_id": data.eos_id}
        hf = {"vocab_size": data.vocab_size, **special, **config.model.config}
        if "architectures" not in hf and "model_type" not in hf:
            hf["architectures"] = ["LlamaForCausalLM"]
        if resolve_backend(hf, backend, "model.config") == "transformers":
            model = build_hf_model(hf, "model.config", trust_remote_code=remote).to(dtype)
        else:
            model = build_model(ModelConfig.from_hf(hf, source="model.config"))
    check_vocab_size(model.config.vocab_size, data.vocab_size, config.model.path or "model.config")
    model.gradient_checkpointing = config.train.activation_checkpointing  # training forwards only
    return model
