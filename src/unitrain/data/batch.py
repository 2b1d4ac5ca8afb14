"""PackedBatch: the one batch type of all three objectives, and the one place that moves a batch to a device.

A batch is R rows of T token slots (T = the longest row of this batch; shorter rows are padded).
Per token slot:
  input_ids    (R, T) int64  token id (0 on padding)
  position_ids (R, T) int64  RoPE position; restarts at 0 for each document. In a shared-prompt layout every
                             response continues from the end of the prompt, as if no other response were there.
  document_id  (R, T) int64  -1 on padding, else an id unique within the row (a prompt with its responses is one
                             document)
  segment      (R, T) int64  SEGMENT_PAD / PLAIN / PROMPT, or SEGMENT_RESPONSE + k for the k-th response of its
                             document in this row (a pair: CHOSEN = RESPONSE, REJECTED = RESPONSE + 1)

Attention rule (derived from this metadata once per batch by `unitrain.model.attention`): slot q attends to
slot k of the same row iff k <= q, document_id[q] == document_id[k] != -1, and k is not a response slot of
another response than q's (segment[k] <= PROMPT or segment[k] == segment[q]). With row order prompt, r_1, ...,
r_N this gives: every response sees the prompt and its own earlier tokens, never another response.

Per target (N targets in the whole batch, only tokens that count for the loss or the log-probs):
  target_tokens    (N,) int64  the token to predict
  target_positions (N,) int64  flat slot index r * T + t whose hidden state predicts it (explicit, not a shift
                               by one: the first token of every response is predicted by the last prompt slot)
  target_response  (N,) int64  batch-local response index in [0, Rb), or -1 for LM/SFT targets
  target_objective (N,) int64  or None: which objective each target trains (`OBJECTIVE_CODES`: 0 pretrain, 1 sft,
                               2 dpo), set in the batches of a mixed run only (None: the run's one objective)
Per response (Rb responses; a group split over several rows still lists each response once):
  response_group   (Rb,) int64   batch-local group index in [0, G)
  response_number  (Rb,) int64   the response's number within its group in the dataset
  response_score   (Rb,) float32 its score (a pair: chosen 1, rejected 0)
Per pair (P pairs: what `group_pairs` makes of each group; a pair dataset gives one per group):
  pair_responses   (P, 2) int64  batch-local (preferred, other) response indices
Per group:
  group_index      (G,) int64  dataset index of each group (to look up cached reference log-probs and to report
                               results in dataset order)
For a pair dataset the responses are chosen, rejected, chosen, ... so response 2p + k is pair p's response k.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

SEGMENT_PAD = -1
SEGMENT_PLAIN = 0
SEGMENT_PROMPT = 1
SEGMENT_RESPONSE = 2  # + k for a document's k-th response in the row
SEGMENT_CHOSEN = SEGMENT_RESPONSE
SEGMENT_REJECTED = SEGMENT_RESPONSE + 1
OBJECTIVE_CODES = {"pretrain": 0, "sft": 1, "dpo": 2}  # values of `target_objective`


@dataclass
class PackedBatch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    document_id: torch.Tensor
    segment: torch.Tensor
    target_tokens: torch.Tensor
    target_positions: torch.Tensor
    target_response: torch.Tensor
    response_group: torch.Tensor
    response_number: torch.Tensor
    response_score: torch.Tensor
    pair_responses: torch.Tensor
    group_index: torch.Tensor
    target_objective: torch.Tensor | None = None

    @classmethod
    def layout_only(cls, input_ids, position_ids, document_id, segment) -> PackedBatch:
        """A batch of slots without targets or responses (for attention checks and plain forward passes)."""
        empty = input_ids.new_zeros(0)
        return cls(
            input_ids, position_ids, document_id, segment, empty, empty, empty, empty, empty,
            empty.float(), input_ids.new_zeros(0, 2), empty,
        )  # fmt: skip

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
    def num_responses(self) -> int:
        return self.response_group.shape[0]

    @property
    def num_pairs(self) -> int:
        return self.pair_responses.shape[0]

    @property
    def num_groups(self) -> int:
        return self.group_index.shape[0]

    @property
    def num_chosen_targets(self) -> int:
        """Targets of each pair's preferred response, counted once per pair that prefers it: the token count that
        normalizes the `sft` term of a preference loss."""
        wins = torch.bincount(self.pair_responses[:, 0], minlength=self.num_responses)  # (Rb,)
        return int(wins[self.target_response[self.target_response >= 0]].sum())

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
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if getattr(self, f.name) is not None
        }
        return replace(self, **moved)
