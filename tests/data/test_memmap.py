"""The memmap format: round trips against the written samples, sharding, and refusal of bad files at open."""

from __future__ import annotations

import json
import os
import pickle
import struct

import numpy as np
import pytest

from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.data.memmap.writer import DatasetWriter, write_dataset
from unitrain.data.sample import GPTSample
from unitrain.errors import UnitrainError


def random_samples(kind: str, count: int, vocab: int, seed: int = 0) -> list[GPTSample]:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        length = int(rng.integers(3, 40))
        ids = rng.integers(0, vocab, length)
        if kind == "preference":
            chosen, rejected = sorted(rng.choice(np.arange(1, length), 2, replace=False))
            samples.append(GPTSample(ids, chosen_span=(chosen, rejected), rejected_span=(rejected, length)))
        elif kind == "sft":
            cuts = np.sort(rng.choice(np.arange(length + 1), 2 * int(rng.integers(0, 3)), replace=False))
            samples.append(GPTSample(ids, loss_masking_spans=cuts.reshape(-1, 2)))
        else:
            samples.append(GPTSample(ids))
    return samples


def assert_same(read: GPTSample, written: GPTSample) -> None:
    np.testing.assert_array_equal(read.token_ids, written.token_ids)
    assert read.chosen_span == written.chosen_span and read.rejected_span == written.rejected_span
    if written.loss_masking_spans is None:
        assert read.loss_masking_spans is None
    else:
        np.testing.assert_array_equal(read.loss_masking_spans, written.loss_masking_spans.reshape(-1, 2))


@pytest.mark.parametrize("kind", ["pretraining", "sft", "preference"])
@pytest.mark.parametrize("vocab", [1000, 70000])
def test_round_trip_across_shards(tmp_path, kind, vocab):
    samples = random_samples(kind, 50, vocab)
    path = write_dataset(tmp_path / "ds", samples, kind, vocab_size=vocab, eos_id=0, max_shard_tokens=200)
    dataset = GPTMemmapDataset(path)
    assert len(dataset.metadata["shards"]) > 1
    assert dataset.kind == kind and len(dataset) == 50 and dataset.vocab_size == vocab
    assert dataset[0].token_ids.dtype == (np.uint16 if vocab <= 65536 else np.uint32)
    np.testing.assert_array_equal(dataset.document_lengths, [len(s.token_ids) for s in samples])
    for index, sample in enumerate(samples):
        assert_same(dataset[index], sample)
    assert_same(dataset[-1], samples[-1])
    assert_same(pickle.loads(pickle.dumps(dataset))[7], samples[7])
    with pytest.raises(IndexError):
        dataset[50]
    dataset.verify()


def test_reads_are_zero_copy_views(tmp_path):
    dataset = GPTMemmapDataset(
        write_dataset(tmp_path / "ds", random_samples("pretraining", 3, 100), "pretraining")
    )
    token_ids = dataset[1].token_ids
    assert not token_ids.flags.owndata and not token_ids.flags.writeable


def test_fingerprint_is_stable_and_content_keyed(tmp_path):
    samples = random_samples("preference", 10, 500)
    first = write_dataset(tmp_path / "a", samples, "preference", vocab_size=500)
    second = write_dataset(tmp_path / "b", samples, "preference", vocab_size=500)
    changed = samples[:-1] + [
        GPTSample(samples[-1].token_ids, chosen_span=(1, 2), rejected_span=(2, len(samples[-1].token_ids)))
    ]
    third = write_dataset(tmp_path / "c", changed, "preference", vocab_size=500)
    fingerprints = [GPTMemmapDataset(p).fingerprint for p in (first, second, third)]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_empty_dataset_and_existing_target(tmp_path):
    path = write_dataset(tmp_path / "empty", [], "sft")
    assert len(GPTMemmapDataset(path)) == 0 and GPTMemmapDataset(path).document_lengths.shape == (0,)
    with pytest.raises(UnitrainError, match="already exists"):
        write_dataset(path, [], "sft")


def test_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        with DatasetWriter(target, "pretraining", vocab_size=100, eos_id=0) as writer:
            for sample in random_samples("pretraining", 5, 100):
                writer.add(sample)
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_a_write_killed_by_sigkill_is_cleaned_up_by_the_next_write(tmp_path):
    """A SIGKILL leaves `.ds.tmp-PID` behind; the next write to the same target removes it (its process is gone)
    and leaves a live process's temporary directory alone."""
    import subprocess
    import sys

    code = (
        "import os, signal, sys; from unitrain.data.memmap.writer import DatasetWriter; "
        "w = DatasetWriter(sys.argv[1], 'pretraining', vocab_size=100, eos_id=0); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ds")])
    assert killed.returncode == -9
    (stale,) = tmp_path.glob(".ds.tmp-*")
    live = tmp_path / f".ds.tmp-{os.getppid()}"  # the test runner's parent: alive
    live.mkdir()
    write_dataset(tmp_path / "ds", random_samples("pretraining", 3, 100), "pretraining", vocab_size=100)
    assert not stale.exists()
    assert live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ds", live.name])


@pytest.fixture
def dataset_dir(tmp_path):
    return write_dataset(tmp_path / "ds", random_samples("sft", 20, 300), "sft", vocab_size=300)


def test_truncated_token_file_fails_at_open(dataset_dir):
    tokens = dataset_dir / "shard-00000.tokens"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(UnitrainError, match=r"shard-00000\.tokens.*truncated"):
        GPTMemmapDataset(dataset_dir)


def test_truncated_index_fails_at_open(dataset_dir):
    index = dataset_dir / "shard-00000.index"
    index.write_bytes(index.read_bytes()[:-8])
    with pytest.raises(UnitrainError, match=r"shard-00000\.index.*truncated"):
        GPTMemmapDataset(dataset_dir)


def test_bad_magic_and_tiny_file(dataset_dir):
    tokens = dataset_dir / "shard-00000.tokens"
    tokens.write_bytes(b"GARBAGE!" + tokens.read_bytes()[8:])
    with pytest.raises(UnitrainError, match="bad magic"):
        GPTMemmapDataset(dataset_dir)
    tokens.write_bytes(b"abc")
    with pytest.raises(UnitrainError, match="too short"):
        GPTMemmapDataset(dataset_dir)


def test_corrupted_offsets_and_spans(dataset_dir):
    index = dataset_dir / "shard-00000.index"
    data = bytearray(index.read_bytes())
    original = bytes(data)
    data[64 + 8 : 64 + 16] = struct.pack("<q", 10**6)  # second document offset far past the end
    index.write_bytes(bytes(data))
    with pytest.raises(UnitrainError, match="offsets do not add up"):
        GPTMemmapDataset(dataset_dir)
    spans_at = 64 + 2 * 21 * 8  # after the two (n + 1) int64 offset arrays
    data = bytearray(original)
    data[spans_at : spans_at + 8] = struct.pack("<ii", 5, 2)  # a reversed span
    index.write_bytes(bytes(data))
    with pytest.raises(UnitrainError, match="loss-masking spans out of range"):
        GPTMemmapDataset(dataset_dir)


def test_newer_version_and_foreign_metadata(dataset_dir):
    metadata_path = dataset_dir / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata_path.write_text(json.dumps({**metadata, "format_version": 3}))
    with pytest.raises(UnitrainError, match="format version 3 is newer"):
        GPTMemmapDataset(dataset_dir)
    metadata_path.write_text(json.dumps({"some": "other tool"}))
    with pytest.raises(UnitrainError, match="not a unitrain dataset"):
        GPTMemmapDataset(dataset_dir)
    metadata_path.write_text(json.dumps(metadata))
    tokens = dataset_dir / "shard-00000.tokens"
    data = bytearray(tokens.read_bytes())
    data[8:12] = struct.pack("<I", 9)
    tokens.write_bytes(bytes(data))
    with pytest.raises(UnitrainError, match=r"shard-00000\.tokens: format version 9 is newer"):
        GPTMemmapDataset(dataset_dir)
    (dataset_dir / "metadata.json").unlink()
    with pytest.raises(UnitrainError, match="no metadata.json"):
        GPTMemmapDataset(dataset_dir)


def test_dataset_without_span_sections_reads_as_pretraining(tmp_path):
    """A shard written without span sections is a plain pretraining dataset: spans are optional sections."""
    samples = random_samples("pretraining", 4, 100)
    dataset = GPTMemmapDataset(write_dataset(tmp_path / "ds", samples, "pretraining"))
    assert dataset.kind == "pretraining"
    for index, sample in enumerate(samples):
        read = dataset[index]
        assert read.loss_masking_spans is None and not read.is_preference
        np.testing.assert_array_equal(read.token_ids, sample.token_ids)
    metadata = json.loads((tmp_path / "ds" / "metadata.json").read_text())
    metadata["kind"] = "preference"  # metadata claiming spans the shards lack is refused
    (tmp_path / "ds" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(UnitrainError, match="do not match kind"):
        GPTMemmapDataset(tmp_path / "ds")


def test_prepare_and_inspect_do_not_import_torch():
    """torch's import alone takes seconds; the data commands never need it."""
    import subprocess
    import sys

    code = (
        "import sys, unitrain.cli, unitrain.commands.prepare, unitrain.commands.inspect, unitrain.data.prepare, "
        "unitrain.data.memmap; from unitrain.data import GPTSample, GPTMemmapDataset; "
        "print('torch' in sys.modules)"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        == "False\n"
    )


def test_writer_refuses_negative_ids_and_accepts_an_empty_span_list(tmp_path):
    with pytest.raises(ValueError, match="negative token id -1"):
        write_dataset(tmp_path / "negative", [GPTSample(np.array([-1, 3]))], "pretraining", vocab_size=10)
    assert not (tmp_path / "negative").exists()
    path = write_dataset(
        tmp_path / "sft", [GPTSample(np.array([1, 2, 3]), loss_masking_spans=[])], "sft", vocab_size=10
    )
    sample = GPTMemmapDataset(path)[0]
    assert sample.token_ids.tolist() == [1, 2, 3] and len(sample.loss_masking_spans) == 0


@pytest.mark.parametrize("kind", ["pretraining", "preference"])
def test_content_hashes_are_equal_exactly_for_equal_documents(tmp_path, kind, monkeypatch):
    """Against a naive partition by token tuples (and response begins): copies hash equal, others never do,
    across shards and across the chunks of a hashing pass."""
    from unitrain.data.memmap import columns

    monkeypatch.setattr(columns, "HASH_TOKENS", 50)  # several passes per shard
    samples = random_samples(kind, 60, 7, seed=3)
    rng = np.random.default_rng(4)
    samples += [samples[k] for k in rng.integers(0, 60, 25)]  # copies
    samples += [
        GPTSample(samples[0].token_ids[::-1].copy(), **_spans_of(samples[0]))
    ]  # same tokens, reordered
    if kind == "preference":  # the same tokens, split elsewhere into chosen and rejected
        ids = samples[1].token_ids
        c0, c1 = samples[1].chosen_span
        samples.append(GPTSample(ids, chosen_span=(c0, c1 + 1), rejected_span=(c1 + 1, len(ids))))
    samples = [samples[k] for k in rng.permutation(len(samples))]
    dataset = GPTMemmapDataset(
        write_dataset(tmp_path / "d", samples, kind, vocab_size=7, max_shard_tokens=300)
    )
    assert len(dataset._shards) > 1
    hashes = dataset.content_hashes()
    key = [(tuple(s.token_ids), s.chosen_span if kind == "preference" else None) for s in samples]
    naive = np.unique([key.index(k) for k in key], return_inverse=True)[1]
    ours = np.unique(hashes, return_inverse=True)[1]
    assert len(np.unique(naive)) < len(samples)  # there are copies
    assert (
        np.unique(naive[:, None] * len(samples) + ours[:, None]).size
        == len(np.unique(naive))
        == len(np.unique(ours))
    )


def _spans_of(sample: GPTSample) -> dict:
    if sample.chosen_span is None:
        return {}
    return {"chosen_span": sample.chosen_span, "rejected_span": sample.rejected_span}
