"""GPTSample: the one record shared by pretraining, SFT and preference data.

| field                | pretraining  | SFT                             | preference (DPO)                       |
|----------------------|--------------|---------------------------------|----------------------------------------|
| `token_ids`          | the document | the document                    | prompt ++ chosen ++ rejected           |
| `loss_masking_spans` | None         | (n, 2) token ranges not trained | None (ignored)                         |
| `chosen_span`        | None         | None                            | [begin, end) of chosen in `token_ids`  |
| `rejected_span`      | None         | None                            | [begin, end) of rejected; begins where chosen ends |

The prompt is stored once: `prompt_ids = token_ids[:chosen_span[0]]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GPTSample:
    token_ids: np.ndarray  # (L,) integer token ids
    loss_masking_spans: np.ndarray | None = None  # (n, 2) [begin, end) token ranges excluded from the loss
    chosen_span: tuple[int, int] | None = None
    rejected_span: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if (self.chosen_span is None) != (self.rejected_span is None):
            raise ValueError("chosen_span and rejected_span must be given together")
        if self.chosen_span is not None:
            c0, c1 = self.chosen_span
            r0, r1 = self.rejected_span
            if not (0 <= c0 < c1 == r0 < r1 == len(self.token_ids)):
                raise ValueError(
                    f"preference spans must tile token_ids as prompt|chosen|rejected, got chosen={self.chosen_span} "
                    f"rejected={self.rejected_span} for {len(self.token_ids)} tokens"
                )

    @property
    def is_preference(self) -> bool:
        return self.chosen_span is not None

    @property
    def prompt_ids(self) -> np.ndarray:
        self._require_preference()
        return self.token_ids[: self.chosen_span[0]]

    @property
    def chosen_ids(self) -> np.ndarray:
        self._require_preference()
        return self.token_ids[self.chosen_span[0] : self.chosen_span[1]]

    @property
    def rejected_ids(self) -> np.ndarray:
        self._require_preference()
        return self.token_ids[self.rejected_span[0] : self.rejected_span[1]]

    def _require_preference(self) -> None:
        if self.chosen_span is None:
            raise AttributeError("this sample is not a preference pair (no chosen/rejected spans)")
