"""GPTSample: the one record shared by pretraining, SFT and preference data.

| field                | pretraining  | SFT                             | preference pair                        | preference group                  |
|----------------------|--------------|---------------------------------|----------------------------------------|-----------------------------------|
| `token_ids`          | the document | the document                    | prompt ++ chosen ++ rejected           | prompt ++ r_1 ++ ... ++ r_N       |
| `loss_masking_spans` | None         | (n, 2) token ranges not trained | None                                   | None                              |
| `chosen_span`        | None         | None                            | [begin, end) of chosen in `token_ids`  | None                              |
| `rejected_span`      | None         | None                            | [begin, end) of rejected; begins where chosen ends | None                  |
| `response_spans`     | None         | None                            | None                                   | (N, 2) [begin, end) of each response, back to back to the end |
| `scores`             | None         | None                            | None                                   | (N,) float32, higher is better    |

The prompt is stored once: `prompt_ids = token_ids[:first response begin]`. A pair is a group of two responses
scored (1, 0): `group_spans` and `group_scores` give that view of a pair, so code that handles groups handles
pairs too; `chosen_*` / `rejected_*` exist for pairs only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAIR_SCORES = np.array([1.0, 0.0], dtype=np.float32)  # a pair as a group: chosen scores 1, rejected 0
PAIR_SCORES.flags.writeable = False  # shared by every pair: no caller may change it


@dataclass(frozen=True)
class GPTSample:
    token_ids: np.ndarray  # (L,) integer token ids
    loss_masking_spans: np.ndarray | None = None  # (n, 2) [begin, end) token ranges excluded from the loss
    chosen_span: tuple[int, int] | None = None
    rejected_span: tuple[int, int] | None = None
    response_spans: np.ndarray | None = None  # (N, 2) of a group
    scores: np.ndarray | None = None  # (N,) of a group

    def __post_init__(self) -> None:
        if (self.chosen_span is None) != (self.rejected_span is None):
            raise ValueError("chosen_span and rejected_span must be given together")
        if (self.response_spans is None) != (self.scores is None):
            raise ValueError("response_spans and scores must be given together")
        if self.chosen_span is not None and self.response_spans is not None:
            raise ValueError(
                "a sample is a pair (chosen/rejected spans) or a group (response spans), not both"
            )
        if self.chosen_span is not None:
            c0, c1 = self.chosen_span
            r0, r1 = self.rejected_span
            if not (0 <= c0 < c1 == r0 < r1 == len(self.token_ids)):
                raise ValueError(
                    f"preference spans must tile token_ids as prompt|chosen|rejected, got chosen={self.chosen_span} "
                    f"rejected={self.rejected_span} for {len(self.token_ids)} tokens"
                )
        if self.response_spans is not None:
            self._check_group()

    def _check_group(self) -> None:
        spans = np.asarray(self.response_spans).reshape(-1, 2)
        scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        begins, ends = spans[:, 0], spans[:, 1]
        tiled = (
            len(spans) >= 2
            and 0 <= begins[0]
            and (begins < ends).all()
            and (begins[1:] == ends[:-1]).all()
            and ends[-1] == len(self.token_ids)
        )
        if not tiled:
            raise ValueError(
                f"response spans must tile token_ids as prompt|r_1|...|r_N with N >= 2, got {spans.tolist()} "
                f"for {len(self.token_ids)} tokens"
            )
        if len(scores) != len(spans) or not np.isfinite(scores).all():
            raise ValueError(f"a group needs one finite score per response, got {scores.tolist()}")
        object.__setattr__(self, "response_spans", spans)
        object.__setattr__(self, "scores", scores)

    @property
    def is_preference(self) -> bool:
        return self.chosen_span is not None or self.response_spans is not None

    @property
    def is_group(self) -> bool:
        return self.response_spans is not None

    @property
    def group_spans(self) -> np.ndarray:
        """(N, 2) [begin, end) of every response; a pair gives its chosen and rejected spans."""
        if self.response_spans is not None:
            return self.response_spans
        self._require_pair()
        return np.array([self.chosen_span, self.rejected_span], dtype=np.int64)

    @property
    def group_scores(self) -> np.ndarray:
        """(N,) score of every response; a pair gives (1, 0)."""
        if self.scores is not None:
            return self.scores
        self._require_pair()
        return PAIR_SCORES

    @property
    def prompt_ids(self) -> np.ndarray:
        return self.token_ids[: int(self.group_spans[0, 0])]

    def response_ids(self, number: int) -> np.ndarray:
        begin, end = self.group_spans[number]
        return self.token_ids[int(begin) : int(end)]

    @property
    def chosen_ids(self) -> np.ndarray:
        self._require_pair()
        return self.token_ids[self.chosen_span[0] : self.chosen_span[1]]

    @property
    def rejected_ids(self) -> np.ndarray:
        self._require_pair()
        return self.token_ids[self.rejected_span[0] : self.rejected_span[1]]

    def _require_pair(self) -> None:
        if self.chosen_span is None:
            what = "a group of responses (use response_ids / group_spans)" if self.is_group else "not a pair"
            raise AttributeError(f"this sample is {what}: it has no chosen/rejected spans")
