"""Preference groups on disk (format version 2): round trips, the checked-in v2 fixture, pairs still written as
version 1 byte for byte, and refusal of bad group sections at open."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.data.memmap.writer import write_dataset
from unitrain.data.sample import GPTSample
from unitrain.errors import UnitrainError

FIXTURES = Path(__file__).parent / "fixtures"


def random_groups(count: int, vocab: int, seed: int = 0) -> list[GPTSample]:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        responses = int(rng.integers(2, 7))
        lengths = rng.integers(1, 9, responses + 1)  # prompt, then each response
        bounds = np.cumsum(lengths)
        spans = np.stack([bounds[:-1], bounds[1:]], axis=1)
        scores = rng.choice([0.0, 1.5, 2.0, 7.25], responses).astype(np.float32)  # ties included
        samples.append(GPTSample(rng.integers(0, vocab, bounds[-1]), response_spans=spans, scores=scores))
    return samples


@pytest.mark.parametrize("vocab", [1000, 70000])
def test_groups_round_trip_across_shards(tmp_path, vocab):
    samples = random_groups(40, vocab)
    path = write_dataset(tmp_path / "groups", samples, "preference", vocab_size=vocab, max_shard_tokens=60)
    dataset = GPTMemmapDataset(path)
    assert len(dataset.metadata["shards"]) > 3 and dataset.metadata["format_version"] == 2
    for index, written in enumerate(samples):
        read = dataset[index]
        assert read.is_group and read.is_preference and read.chosen_span is None
        np.testing.assert_array_equal(read.token_ids, written.token_ids)
        np.testing.assert_array_equal(read.response_spans, written.response_spans)
        np.testing.assert_array_equal(read.scores, written.scores)
        np.testing.assert_array_equal(read.prompt_ids, written.token_ids[: written.response_spans[0, 0]])
    dataset.verify()


def test_v2_fixture_reads_with_these_values():
    dataset = GPTMemmapDataset(FIXTURES / "v2" / "groups")
    first, second = dataset[0], dataset[1]
    assert first.prompt_ids.tolist() == [5, 6]
    assert [first.response_ids(k).tolist() for k in range(3)] == [[7, 8], [9], [10, 11, 12]]
    assert first.scores.tolist() == [7.5, 2.0, 7.5] and second.scores.tolist() == [0.25, -1.0]
    assert second.prompt_ids.tolist() == [70000] and second.group_spans.tolist() == [[1, 2], [2, 4]]
    assert dataset.fingerprint == "f857717fede7745058f216bdd36d79f57f9c56054af6cc2fc162b678afd6f5b9"
    with pytest.raises(AttributeError, match="a group of responses"):
        _ = first.chosen_ids
    dataset.verify()


@pytest.mark.parametrize("kind", ["pretraining", "sft", "preference"])
def test_version_1_data_is_still_written_byte_for_byte(tmp_path, kind):
    """Rewriting the v1 fixtures' documents gives their exact bytes and fingerprints: pairs are not groups."""
    fixture = GPTMemmapDataset(FIXTURES / "v1" / kind)
    shard_tokens = max(shard["num_tokens"] for shard in fixture.metadata["shards"])
    tokenizer = fixture.metadata["tokenizer"]
    copy = write_dataset(
        tmp_path / kind,
        [fixture[k] for k in range(len(fixture))],
        kind,
        vocab_size=tokenizer["vocab_size"],
        eos_id=tokenizer["eos_id"],
        bos_id=tokenizer["bos_id"],
        max_shard_tokens=shard_tokens if len(fixture.metadata["shards"]) > 1 else 1 << 30,
    )
    assert GPTMemmapDataset(copy).fingerprint == fixture.fingerprint
    for shard in fixture.metadata["shards"]:
        for suffix in (".tokens", ".index"):
            name = shard["name"] + suffix
            assert (copy / name).read_bytes() == (FIXTURES / "v1" / kind / name).read_bytes()
    assert json.loads((copy / "metadata.json").read_text()) == fixture.metadata


def test_a_pair_after_a_group_becomes_a_group_and_not_the_other_way(tmp_path):
    group = random_groups(1, 50)[0]
    pair = GPTSample(np.arange(6), chosen_span=(2, 4), rejected_span=(4, 6))
    dataset = GPTMemmapDataset(write_dataset(tmp_path / "mixed", [group, pair], "preference", vocab_size=50))
    assert dataset[1].group_spans.tolist() == [[2, 4], [4, 6]] and dataset[1].scores.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="started with pairs"):
        write_dataset(tmp_path / "refused", [pair, group], "preference", vocab_size=50)


@pytest.mark.parametrize(
    ("spans", "scores", "message"),
    [
        ([[2, 4]], [1.0], "N >= 2"),
        ([[2, 4], [5, 8]], [1.0, 0.0], "tile"),
        ([[2, 4], [4, 7]], [1.0, 0.0], "tile"),
        ([[2, 2], [2, 8]], [1.0, 0.0], "tile"),
        ([[2, 4], [4, 8]], [1.0, float("nan")], "finite score"),
        ([[2, 4], [4, 8]], [1.0], "one finite score per response"),
    ],
)
def test_sample_refuses_bad_groups(spans, scores, message):
    with pytest.raises(ValueError, match=message):
        GPTSample(np.arange(8), response_spans=np.array(spans), scores=np.array(scores))


def _patch_index(path: Path, offset: int, fmt: str, value) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "message"),
    [
        (64 + 3 * 8 + 8, "<q", 1, "group offsets do not add up"),  # group 0 with one response
        (64 + 3 * 8 + 3 * 8 + 4, "<i", 1, "response spans out of range"),  # response 1 begins before 0 ends
        (64 + 3 * 8 + 3 * 8 + 8, "<i", 99, "response spans out of range"),
        (64 + 3 * 8 + 3 * 8 + 5 * 4 + 4 + 4, "<f", float("inf"), "score is not finite"),
    ],
)
def test_bad_group_sections_are_refused_at_open(tmp_path, offset, fmt, value, message):
    copy = tmp_path / "groups"
    shutil.copytree(FIXTURES / "v2" / "groups", copy)
    _patch_index(copy / "shard-00000.index", offset, fmt, value)
    with pytest.raises(UnitrainError, match=rf"shard-00000\.index: .*{message}"):
        GPTMemmapDataset(copy)
