"""Fixtures of the preference area: random preference/SFT/pretraining samples and tiny memmap datasets."""

from __future__ import annotations

import numpy as np
import pytest

from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.data.memmap.writer import write_dataset
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
    """In-memory stand-in with the dataset interface packing needs (len, [i], kind and the per-document columns
    `document_lengths`, `preference_spans`, `sft_target_counts`, here counted sample by sample)."""

    def __init__(self, samples: list[GPTSample], kind: str) -> None:
        from unitrain.data.epoch.rules import sft_targets

        self.samples = samples
        self.kind = kind
        self.document_lengths = np.array([len(s.token_ids) for s in samples], dtype=np.int64)
        self.preference_spans = np.array(
            [(s.chosen_span[0], s.rejected_span[0]) if s.is_preference else (0, 0) for s in samples], np.int32
        ).reshape(-1, 2)
        self.sft_target_counts = np.array([len(sft_targets(s)[0]) for s in samples], np.int64)
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


def packed_batch(dataset, mode="pair", share_prompt=False, sequence_length=64, group_pairs="best_vs_rest"):
    """Every pair (or group) of `dataset` planned and collated into one DPO batch."""
    from unitrain.data.batches.collate import collate
    from unitrain.data.epoch.plan import plan_rows

    layout = {"objective": "dpo", "mode": mode, "share_prompt": share_prompt, "group_pairs": group_pairs}
    plan = plan_rows(dataset, range(len(dataset)), sequence_length=sequence_length, **layout)
    return collate(dataset, plan, range(len(plan)), **layout)


def recount(batch) -> list[int]:
    """A batch's pairs, targets, chosen-response targets and groups, counted from its own columns: what a plan's
    row counts must sum to. A response is the chosen side of as many pairs as it wins."""
    import torch

    wins = torch.bincount(batch.pair_responses[:, 0], minlength=batch.num_responses)  # (Rb,)
    preference = batch.target_response[batch.target_response >= 0]
    return [batch.num_pairs, batch.num_targets, int(wins[preference].sum()), batch.num_groups]


def build_tiny_model(seed: int = 0):
    """A 2-layer, width-32 random Llama with grouped-query attention, fp32."""
    import torch

    from unitrain.model import ModelConfig, build_model

    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
    )
    return build_model(config)


def standalone_response_logps(model, sample: GPTSample):
    """(N,) summed log-probs of each response from a plain causal forward of prompt+response, each run alone."""
    import torch

    sums = []
    for number in range(len(sample.group_scores)):
        response = sample.response_ids(number)
        ids = torch.tensor(np.concatenate([sample.prompt_ids, response]), dtype=torch.int64)[None]  # (1, L)
        logps = torch.log_softmax(model(ids)[0].float(), dim=-1)  # (L, V)
        start = len(sample.prompt_ids)
        sums.append(logps[start - 1 : -1].gather(1, ids[0, start:, None]).sum())
    return torch.stack(sums)  # (N,)


def standalone_pair_logps(model, sample: GPTSample):
    """(chosen, rejected) summed log-probs from a plain causal forward of prompt+response, each run alone."""
    return standalone_response_logps(model, sample)  # (2,)


def random_groups(count: int, seed: int, prompt=(1, 9), response=(1, 8), responses=(2, 5)) -> list[GPTSample]:
    """Groups of ranked responses with random lengths, random token ids below VOCAB and scores with ties."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        n = int(rng.integers(*responses, endpoint=True))
        lengths = rng.integers(*response, size=n, endpoint=True)
        bounds = np.cumsum([rng.integers(*prompt, endpoint=True), *lengths])
        scores = rng.choice([0.0, 1.0, 2.5, 4.0], size=n)
        scores[:2] = [4.5, -1.0]  # never all equal
        samples.append(
            GPTSample(
                rng.integers(1, VOCAB, size=bounds[-1]),
                response_spans=np.stack([bounds[:-1], bounds[1:]], axis=1),
                scores=rng.permutation(scores),
            )
        )
    return samples


@pytest.fixture
def memmap_groups(memmap_pairs):
    """Write group samples to a memmap dataset and open it: the same writer, which makes it format version 2."""
    return memmap_pairs


@pytest.fixture
def tiny_model():
    return build_tiny_model
