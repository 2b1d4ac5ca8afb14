"""Next-token loss for pretraining and SFT as (sum, count), never a per-micro-batch mean.

The trainer divides the sum by the number of loss tokens of the whole global batch (every micro-batch, every
rank), so gradient accumulation and data parallelism give the gradient of one big batch. The targets of a
PackedBatch already exclude masked tokens, so every log-prob given here counts.
"""

from __future__ import annotations

import torch


def lm_loss_sum(logps: torch.Tensor) -> tuple[torch.Tensor, int]:
    """logps (N,) of the target tokens → (sum of -logp (scalar, differentiable), N)."""
    return -logps.sum(), logps.numel()
