"""DatasetWriter.add_batch: the same dataset as one `add` per document, byte for byte; bad batches refused whole;
the reader's per-document columns equal a count sample by sample."""

from __future__ import annotations

import numpy as np
import pytest

from unitrain.data.epoch.rules import sft_targets
from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.data.memmap.writer import DatasetWriter, write_dataset
from unitrain.data.sample import GPTSample

from .test_memmap import random_samples


def flat(samples):
    lengths = np.array([len(s.token_ids) for s in samples], np.int64)
    tokens = np.concatenate([s.token_ids for s in samples])
    extra = {}
    if samples[0].is_preference:
        extra["preference_spans"] = np.array([(s.chosen_span[0], s.rejected_span[0]) for s in samples])
    elif samples[0].loss_masking_spans is not None:
        spans = [np.asarray(s.loss_masking_spans).reshape(-1, 2) for s in samples]
        extra["loss_span_counts"] = np.array([len(s) for s in spans])
        extra["loss_spans"] = np.concatenate(spans)
    return tokens, lengths, extra


def sliced(extra: dict, first: int, last: int) -> dict:
    if "preference_spans" in extra:
        return {"preference_spans": extra["preference_spans"][first:last]}
    if "loss_spans" in extra:
        ends = np.cumsum(extra["loss_span_counts"])
        begin = int(ends[first - 1]) if first else 0
        return {
            "loss_span_counts": extra["loss_span_counts"][first:last],
            "loss_spans": extra["loss_spans"][begin : int(ends[last - 1])],
        }
    return {}


@pytest.mark.parametrize("kind", ["pretraining", "sft", "preference"])
def test_batches_write_the_same_dataset_as_one_add_per_document(tmp_path, kind):
    samples = random_samples(kind, 60, 500, seed=1)
    reference = GPTMemmapDataset(
        write_dataset(tmp_path / "one", samples, kind, vocab_size=500, eos_id=0, max_shard_tokens=300)
    )
    tokens, lengths, extra = flat(samples)
    ends = np.concatenate([[0], np.cumsum(lengths)])
    with DatasetWriter(tmp_path / "bulk", kind, vocab_size=500, eos_id=0, max_shard_tokens=300) as writer:
        writer.add(samples[0])  # documents of `add` and of `add_batch` keep their order
        for first, last in ((1, 5), (5, 5), (5, 41), (41, 59)):
            writer.add_batch(
                tokens[ends[first] : ends[last]], lengths[first:last], **sliced(extra, first, last)
            )
        writer.add(samples[59])
    bulk = GPTMemmapDataset(tmp_path / "bulk")
    assert len(bulk.metadata["shards"]) > 1
    assert bulk.metadata["shards"] == reference.metadata["shards"]
    assert bulk.fingerprint == reference.fingerprint


def test_bad_batches_are_refused_before_anything_is_written(tmp_path):
    with DatasetWriter(tmp_path / "p", "preference", vocab_size=10, eos_id=0) as writer:
        good = dict(preference_spans=[[1, 2], [1, 3]])
        with pytest.raises(ValueError, match="add up to 5 tokens but token_ids has 6"):
            writer.add_batch(np.arange(6), [2, 3], **good)
        with pytest.raises(ValueError, match="token id 12 is outside"):
            writer.add_batch(np.array([1, 2, 3, 12, 4]), [3, 2], preference_spans=[[1, 2], [0, 1]])
        with pytest.raises(ValueError, match="document 1 of the batch: need 0 <= chosen"):
            writer.add_batch(np.arange(7), [3, 4], preference_spans=[[1, 2], [2, 4]])
        with pytest.raises(ValueError, match="preference_spans are required"):
            writer.add_batch(np.arange(7), [3, 4])
        assert writer.current is None or writer.current.num_documents == 0
        writer.add_batch(np.arange(7), [3, 4], preference_spans=[[1, 2], [1, 3]])
    with DatasetWriter(tmp_path / "s", "sft", vocab_size=10, eos_id=0) as writer:
        with pytest.raises(ValueError, match="document 1 of the batch: loss-masking span out of range"):
            writer.add_batch(np.arange(7), [3, 4], loss_span_counts=[1, 1], loss_spans=[[0, 1], [2, 5]])
        with pytest.raises(ValueError, match="loss_span_counts add up to 1 but 2 spans"):
            writer.add_batch(np.arange(7), [3, 4], loss_span_counts=[1, 0], loss_spans=[[0, 1], [2, 3]])
        writer.add_batch(np.arange(7), [3, 4])
    assert (
        len(GPTMemmapDataset(tmp_path / "s")) == 2
        and GPTMemmapDataset(tmp_path / "s")[1].loss_masking_spans.size == 0
    )


def test_columns_equal_counts_sample_by_sample(tmp_path):
    rng = np.random.default_rng(5)
    samples = random_samples("sft", 80, 300, seed=2)
    for k, sample in enumerate(samples[:40]):  # overlapping, unsorted spans and spans at position 0
        n = len(sample.token_ids)
        spans = [(int(b), int(rng.integers(b + 1, n + 1))) for b in rng.integers(0, n, 3)] + [(0, 1)] * (
            k % 2
        )
        samples[k] = type(sample)(sample.token_ids, loss_masking_spans=np.array(spans[::-1]))
    dataset = GPTMemmapDataset(
        write_dataset(tmp_path / "sft", samples, "sft", vocab_size=300, max_shard_tokens=400)
    )
    assert dataset.sft_target_counts.tolist() == [len(sft_targets(s)[0]) for s in samples]
    assert dataset.document_lengths.dtype == np.int32 and len(dataset.metadata["shards"]) > 1
    shuffled = rng.permutation(80)
    assert dataset.lengths_of(shuffled).tolist() == dataset.document_lengths[shuffled].tolist()
    pairs = random_samples("preference", 30, 300, seed=3)
    dataset = GPTMemmapDataset(write_dataset(tmp_path / "pairs", pairs, "preference", vocab_size=300))
    assert dataset.preference_spans.tolist() == [[s.chosen_span[0], s.rejected_span[0]] for s in pairs]


def test_a_group_after_a_batch_of_pairs_is_refused(tmp_path):
    group = GPTSample(np.arange(6), response_spans=np.array([[2, 4], [4, 6]]), scores=np.array([1.0, 0.5]))
    with DatasetWriter(tmp_path / "mixed", "preference", vocab_size=10, eos_id=0) as writer:
        writer.add_batch(np.arange(7), [3, 4], preference_spans=[[1, 2], [1, 3]])
        with pytest.raises(ValueError, match="started with pairs"):
            writer.add(group)
    assert len(GPTMemmapDataset(tmp_path / "mixed")) == 2
