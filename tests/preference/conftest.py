"""Fixtures of the preference area: random preference/SFT/pretraining samples and tiny memmap datasets."""

from __future__ import annotations

import numpy as np
import pytest

from unitrain.data.memmap import GPTMemmapDataset, write_dataset
from unitrain.data.sample import GPTSample

VOCAB = 61


def random_pairs(count: int, seed: int, prompt=(1, 9), response=(1, 8)) -> list[GPTSample]:
    """Preference samples with random lengths in [low, high] and random token ids below VOCAB."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        p, c, r = rng.integers(*prompt, endpoint=True), *rng.integers(*response, size=2, endpoint=True)
        tokens = rng.integers(1, VOCAB, size=p + c + r)
        samples.append(GPTSample(tokens, chosen_span=(p, p + c), rejected_span=(p + c, p + c + r)))
    return samples


def random_documents(count: int, seed: int, length=(1, 30), spans: bool = False) -> list[GPTSample]:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        tokens = rng.integers(1, VOCAB, size=rng.integers(*length, endpoint=True))
        masked = None
        if spans:
            begin = int(rng.integers(0, len(tokens)))
            masked = np.array([[begin, int(rng.integers(begin, len(tokens), endpoint=True))]])
        samples.append(GPTSample(tokens, loss_masking_spans=masked))
    return samples


class ListDataset:
    """In-memory stand-in with the dataset interface packing needs (len, [i], document_lengths, kind)."""

    def __init__(self, samples: list[GPTSample], kind: str) -> None:
        self.samples = samples
        self.kind = kind
        self.document_lengths = np.array([len(s.token_ids) for s in samples], dtype=np.int64)
        self.fingerprint = f"list-{len(samples)}-{int(self.document_lengths.sum())}"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> GPTSample:
        return self.samples[index]


@pytest.fixture
def pairs_factory():
    return random_pairs


@pytest.fixture
def documents_factory():
    return random_documents


@pytest.fixture
def list_dataset():
    return ListDataset


@pytest.fixture
def memmap_pairs(tmp_path):
    """Write preference samples to a memmap dataset and open it."""

    def make(samples: list[GPTSample], name: str = "pairs") -> GPTMemmapDataset:
        return GPTMemmapDataset(
            write_dataset(tmp_path / name, samples, "preference", vocab_size=VOCAB, eos_id=0)
        )

    return make
