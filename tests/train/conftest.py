"""Tiny synthetic datasets (vocabulary 48) and configs for the trainer tests; real HH-RLHF data lives in test_e2e."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unitrain.config import parse_config
from unitrain.data.memmap.writer import write_dataset
from unitrain.data.sample import GPTSample

VOCAB = 48


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest (and identically) on one thread, especially on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _counting(rng, length: int) -> np.ndarray:
    """A learnable document: runs of consecutive token ids (mod VOCAB) from a random start."""
    return ((rng.integers(1, VOCAB) + np.arange(length)) % (VOCAB - 1) + 1).astype(np.int64)


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory):
    rng = np.random.default_rng(1)
    docs = [GPTSample(_counting(rng, int(rng.integers(8, 40)))) for _ in range(48)]
    return write_dataset(
        tmp_path_factory.mktemp("data") / "pretrain", docs, "pretraining", vocab_size=VOCAB, eos_id=0
    )


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory):
    rng = np.random.default_rng(2)
    docs = []
    for _ in range(48):
        prompt = rng.integers(1, VOCAB, size=int(rng.integers(3, 10)))  # random: not learnable, masked
        answer = _counting(rng, int(rng.integers(5, 20)))
        docs.append(
            GPTSample(np.concatenate([prompt, answer]), loss_masking_spans=np.array([[0, len(prompt)]]))
        )
    return write_dataset(tmp_path_factory.mktemp("data") / "sft", docs, "sft", vocab_size=VOCAB, eos_id=0)


@pytest.fixture(scope="session")
def preference_data(tmp_path_factory):
    """Chosen responses count upwards from the prompt's last token; rejected ones are random."""
    rng = np.random.default_rng(3)
    docs = []
    for _ in range(48):
        prompt = _counting(rng, int(rng.integers(3, 10)))
        chosen = (prompt[-1] + np.arange(1, int(rng.integers(4, 10)))) % (VOCAB - 1) + 1
        rejected = rng.integers(1, VOCAB, size=int(rng.integers(4, 10)))
        tokens = np.concatenate([prompt, chosen, rejected]).astype(np.int64)
        c0, c1 = len(prompt), len(prompt) + len(chosen)
        docs.append(GPTSample(tokens, chosen_span=(c0, c1), rejected_span=(c1, len(tokens))))
    return write_dataset(
        tmp_path_factory.mktemp("data") / "pref", docs, "preference", vocab_size=VOCAB, eos_id=0
    )


@pytest.fixture(scope="session")
def group_data(tmp_path_factory):
    """Groups of 3-5 responses: the top-scored one counts upwards from the prompt's last token, the others are
    random and scored lower (with ties among them)."""
    rng = np.random.default_rng(4)
    docs = []
    for _ in range(48):
        prompt = _counting(rng, int(rng.integers(3, 10)))
        good = (prompt[-1] + np.arange(1, int(rng.integers(4, 10)))) % (VOCAB - 1) + 1
        others = [
            rng.integers(1, VOCAB, size=int(rng.integers(4, 10))) for _ in range(int(rng.integers(2, 5)))
        ]
        responses = [good, *others]
        scores = np.array([5.0] + rng.choice([1.0, 2.0, 3.0], size=len(others)).tolist(), np.float32)
        order = rng.permutation(len(responses))  # the best one anywhere in the group
        bounds = np.cumsum([len(prompt)] + [len(responses[k]) for k in order])
        tokens = np.concatenate([prompt] + [responses[k] for k in order]).astype(np.int64)
        spans = np.stack([bounds[:-1], bounds[1:]], axis=1)
        docs.append(GPTSample(tokens, response_spans=spans, scores=scores[order]))
    return write_dataset(
        tmp_path_factory.mktemp("data") / "groups", docs, "preference", vocab_size=VOCAB, eos_id=0
    )


def tiny_raw(objective: str, data_dir, output_dir, **sections) -> dict:
    raw = {
        "objective": objective,
        "model": {
            "config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
            }
        },
        "data": {"train": str(data_dir), "validation": 0.125},
        "packing": {"sequence_length": 64},
        "batch": {"micro_batch_size": 2, "gradient_accumulation_steps": 2},
        "optimizer": {"lr": 1e-2, "weight_decay": 0.01},
        "schedule": {"kind": "cosine", "warmup_steps": 1},
        "train": {"max_steps": 6, "seed": 0, "device": "cpu"},
        "run": {"output_dir": str(output_dir), "progress": False, "tensorboard": False},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return raw


@pytest.fixture(scope="session")
def tiny_config():
    """Factory: `tiny_config(objective, data_dir, output_dir, section={key: value}, ...)` -> TrainConfig."""

    def make(objective: str, data_dir, output_dir, **sections):
        return parse_config(tiny_raw(objective, data_dir, output_dir, **sections))

    return make
