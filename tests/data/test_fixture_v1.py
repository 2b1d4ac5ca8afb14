"""Datasets written by format version 1 (checked in under fixtures/v1) must keep reading, with these values."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unitrain.data.memmap.reader import GPTMemmapDataset

FIXTURES = Path(__file__).parent / "fixtures" / "v1"


def test_pretraining_fixture_two_shards():
    dataset = GPTMemmapDataset(FIXTURES / "pretraining")
    assert dataset.kind == "pretraining" and len(dataset) == 2 and len(dataset.metadata["shards"]) == 2
    assert dataset[0].token_ids.tolist() == [1, 2, 3] and dataset[1].token_ids.tolist() == [4, 5]
    assert dataset[1].loss_masking_spans is None and not dataset[1].is_preference
    assert dataset.document_lengths.tolist() == [3, 2]
    assert (dataset.vocab_size, dataset.eos_id, dataset.bos_id, dataset.tokenizer_path) == (
        100,
        0,
        None,
        None,
    )
    assert dataset.fingerprint == "46d4cc9a13d215c872d72d8a204b86eb627d2133b3065e0df44b790d2c85ca1b"
    dataset.verify()


def test_sft_fixture():
    dataset = GPTMemmapDataset(FIXTURES / "sft")
    assert dataset.kind == "sft" and dataset.document_lengths.tolist() == [4, 2]
    assert dataset[0].token_ids.tolist() == [10, 11, 12, 13]
    assert dataset[0].loss_masking_spans.tolist() == [[0, 2]]
    assert dataset[1].loss_masking_spans.shape == (0, 2)
    assert dataset.fingerprint == "81c9dce36cc9bd745287920880255beffc520a2c4b3b01fb16bd7e23474fd0ee"
    dataset.verify()


def test_preference_fixture_uint32():
    dataset = GPTMemmapDataset(FIXTURES / "preference")
    assert dataset.kind == "preference" and dataset.metadata["token_dtype"] == "uint32"
    first, second = dataset[0], dataset[1]
    assert first.prompt_ids.tolist() == [5, 6] and first.chosen_ids.tolist() == [7, 8]
    assert first.rejected_ids.tolist() == [9]
    assert second.token_ids.dtype == np.uint32 and second.prompt_ids.tolist() == [70000]
    assert (second.chosen_span, second.rejected_span) == ((1, 2), (2, 3))
    assert (dataset.vocab_size, dataset.eos_id, dataset.bos_id) == (70001, 0, 3)
    assert dataset.fingerprint == "a02b46e88385c1371fe746b8f7c4d48e7db55b3eb5f216fe476fc63a929091c9"
    dataset.verify()
