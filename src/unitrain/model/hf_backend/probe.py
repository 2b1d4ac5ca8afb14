"""The load-time probe of the transformers backend: what a config check cannot see, one tiny forward can.

A model is built, then run on two short documents packed in one row and on the second one alone (fp32, no
gradients): the second must get the same hidden states either way, which any layer that sees the whole row (a
state-space scan, a convolution, linear attention, a router with a capacity) breaks; every layer must have run
unitrain's attention (counted by `HFCausalLM._run`); and the chunked head (with the model's soft-cap and scale)
must give the log-probs of the model's own logits, which catches a head transform the backend does not know. The
trade-off: two forwards of a few tokens at load, on the model's device, skipped for weights not in fp32 (whose
rounding would hide a small leak) and on the meta device.
"""

from __future__ import annotations

import torch

from unitrain.data.batch import PackedBatch
from unitrain.errors import UnitrainError


def probe(model, source: str) -> None:  # noqa: ANN001 (an HFCausalLM)
    """Two tiny forwards in fp32: a document packed after another gets the hidden states it gets alone (no layer
    mixes the row), every layer runs unitrain's attention (counted in `_run`), and the chunked head gives the
    log-probs of the model's own logits. Skipped for weights on the meta device or not in fp32 (bf16 rounding
    would hide a small leak)."""
    from unitrain.losses.logprobs import target_logprobs

    weight = model.lm_head_weight
    if weight.device.type == "meta" or weight.dtype != torch.float32:
        return
    device = weight.device
    ids = torch.randint(
        0, min(model.config.vocab_size, 1000), (11,), generator=torch.Generator().manual_seed(0)
    )
    second = ids[5:].to(device)[None]  # (1, 6)
    documents = torch.cat([torch.zeros(5), torch.ones(6)]).long()[None].to(device)
    positions = torch.cat([torch.arange(5), torch.arange(6)])[None].to(device)
    zeros = torch.zeros_like(second)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = PackedBatch.layout_only(
                ids.to(device)[None], positions, documents, torch.zeros_like(positions)
            )
            packed_hidden = model.hidden_states(packed)[0, 5:]  # (6, D)
            alone = PackedBatch.layout_only(second, positions[:, 5:], zeros, zeros)
            hidden = model.hidden_states(alone)  # (1, 6, D)
            where = torch.arange(5, device=device)
            ours = target_logprobs(hidden, weight, where, second[0, 1:], softcap=model.logit_softcap).logps
            logits = model(second)[0, :-1].float()  # (5, V) the model's own
            theirs = torch.log_softmax(logits, -1).gather(1, second[0, 1:, None]).squeeze(1)
    except (RuntimeError, ValueError, IndexError) as error:  # e.g. a config whose shapes do not fit together
        first_line = str(error).split("\n")[0]
        raise UnitrainError(
            f"{source}: a first forward of {model.config.architecture} fails ({first_line})"
        ) from None
    finally:
        model.train(was_training)
    mixed = float((packed_hidden - hidden[0]).abs().max() / hidden.abs().max().clamp(min=1e-12))
    if not mixed <= 1e-4:
        raise UnitrainError(
            f"{source}: {model.config.architecture} gives a document packed after another other hidden states than "
            f"the same document alone (relative difference {mixed:.1e}): a layer mixes the documents of a row"
        )
    error = float((ours - theirs).abs().max())
    if not error <= 1e-4 * max(1.0, float(theirs.abs().max())):
        raise UnitrainError(
            f"{source}: {model.config.architecture}'s own logits differ from its hidden states times its LM head "
            f"(log-prob difference {error:.1e}); its head transform is not supported"
        )
