"""PackedBatch: the one batch type of all three objectives, and the one place that moves a batch to a device.

A batch is R rows of T token slots (T = the longest row of this batch; shorter rows are padded).
Per token slot:
  input_ids    (R, T) int64  token id (0 on padding)
  position_ids (R, T) int64  RoPE position; restarts at 0 for each document. In the shared-prompt layout the
                             rejected response continues from the end of the prompt, as if chosen were not there.
  document_id  (R, T) int64  -1 on padding, else an id unique within the row (a shared-prompt pair is one document)
  segment      (R, T) int64  SEGMENT_PAD / PLAIN / PROMPT / CHOSEN / REJECTED

Attention rule (derived from this metadata once per batch by `unitrain.model.attention`): slot q attends to
slot k of the same row iff k <= q, document_id[q] == document_id[k] != -1, and not
(segment[q] == REJECTED and segment[k] == CHOSEN). With row order prompt, chosen, rejected this gives: chosen sees
the prompt and earlier chosen tokens; rejected sees the prompt and earlier rejected tokens, never chosen ones.

Per target (N targets in the whole batch, only tokens that count for the loss or the log-probs):
  target_tokens    (N,) int64  the token to predict
  target_positions (N,) int64  flat slot index r * T + t whose hidden state predicts it (explicit, not a shift
                               by one: the first rejected token is predicted by the last prompt slot)
  target_pair      (N,) int64  batch-local pair index in [0, P), or -1 for LM/SFT targets
  target_response  (N,) int64  RESPONSE_CHOSEN / RESPONSE_REJECTED, or -1 for LM/SFT targets
Per pair:
  pair_index       (P,) int64  dataset index of each pair (to look up cached reference log-probs and to report
                               results in dataset order)
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

SEGMENT_PAD = -1
SEGMENT_PLAIN = 0
SEGMENT_PROMPT = 1
SEGMENT_CHOSEN = 2
SEGMENT_REJECTED = 3

RESPONSE_CHOSEN = 0
RESPONSE_REJECTED = 1


@dataclass
class PackedBatch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    document_id: torch.Tensor
    segment: torch.Tensor
    target_tokens: torch.Tensor
    target_positions: torch.Tensor
    target_pair: torch.Tensor
    target_response: torch.Tensor
    pair_index: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def row_length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_targets(self) -> int:
        return self.target_tokens.shape[0]

    @property
    def num_pairs(self) -> int:
        return self.pair_index.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) token slots."""
        return int((self.document_id >= 0).sum())

    @property
    def is_plain_causal(self) -> bool:
        """True when every row is one unpadded document without preference segments: plain causal attention."""
        return bool(
            (self.document_id == self.document_id[:, :1]).all()
            and (self.document_id >= 0).all()
            and (self.segment <= SEGMENT_PLAIN).all()
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)}
        return replace(self, **moved)
