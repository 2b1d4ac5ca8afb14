"""Reference log-probs: frozen model equals the standalone forward; the cache is reused, rebuilt, or refused."""

from __future__ import annotations

import functools
import re

import pytest
import torch

import unitrain.train.step.reference as reference_module
from unitrain.errors import UnitrainError
from unitrain.model import save_pretrained
from unitrain.train.step.reference import CACHE_FILE, make_reference

from .conftest import build_tiny_model, packed_batch, random_groups, random_pairs, standalone_response_logps


def expected_logps(model, dataset, batch):
    """Each response's standalone log-prob, in the batch's response order (a pair: chosen, then rejected)."""
    alone = [standalone_response_logps(model, dataset[int(i)]).detach() for i in batch.group_index]
    return torch.stack([alone[g][n] for g, n in zip(batch.response_group, batch.response_number)])  # (Rb,)


def test_none_and_model_references(tmp_path, memmap_pairs):
    model = build_tiny_model(4)
    save_pretrained(model, tmp_path / "ref")
    dataset = memmap_pairs(random_pairs(6, seed=31))
    batch = packed_batch(dataset, "packed", True)
    assert make_reference("none").response_logps(batch) is None
    frozen = make_reference("model", model_path=tmp_path / "ref")
    assert not frozen.model.training and not any(p.requires_grad for p in frozen.model.parameters())
    torch.testing.assert_close(
        frozen.response_logps(batch), expected_logps(model, dataset, batch), rtol=1e-5, atol=1e-4
    )


def test_cache_is_reused_rebuilt_on_data_or_weight_change_and_refused_on_request(
    tmp_path, memmap_pairs, monkeypatch, capsys
):
    model = build_tiny_model(5)
    save_pretrained(model, tmp_path / "ref")
    first = memmap_pairs(random_pairs(8, seed=32), "first")
    cached_reference = functools.partial(
        make_reference, "cached", model_path=tmp_path / "ref", cache_dir=tmp_path / "cache"
    )
    cached = cached_reference(datasets=[first], sequence_length=16, micro_batch_size=2)
    assert (tmp_path / "cache" / CACHE_FILE).exists()
    batch = packed_batch(first)
    torch.testing.assert_close(
        cached.response_logps(batch), expected_logps(model, first, batch), rtol=1e-5, atol=1e-4
    )

    built = []
    real_from_pretrained = reference_module.from_pretrained
    monkeypatch.setattr(
        reference_module, "from_pretrained", lambda *a, **k: built.append(1) or real_from_pretrained(*a, **k)
    )
    again = cached_reference(datasets=[first])
    assert built == []  # valid cache: the reference model is not built at all
    torch.testing.assert_close(again.response_logps(batch), cached.response_logps(batch))

    second = memmap_pairs(random_pairs(8, seed=33), "second")
    changed = f"dataset 0 ({first.path}, now {second.path}) changed"  # named, not only by fingerprint
    with pytest.raises(UnitrainError, match=re.escape(changed)):
        cached_reference(datasets=[second], on_mismatch="error")
    rebuilt = cached_reference(datasets=[second])
    assert built == [1] and changed in capsys.readouterr().out
    batch = packed_batch(second)
    torch.testing.assert_close(
        rebuilt.response_logps(batch), expected_logps(model, second, batch), rtol=1e-5, atol=1e-4
    )

    changed = build_tiny_model(6)
    save_pretrained(changed, tmp_path / "ref")
    with pytest.raises(UnitrainError, match="reference weights changed"):
        cached_reference(datasets=[second], on_mismatch="error")
    fresh = cached_reference(datasets=[second])
    assert built == [1, 1]
    torch.testing.assert_close(
        fresh.response_logps(batch), expected_logps(changed, second, batch), rtol=1e-5, atol=1e-4
    )
    with pytest.raises(UnitrainError, match="computed in float32, this run's reference runs in bfloat16"):
        cached_reference(datasets=[second], on_mismatch="error", dtype=torch.bfloat16)
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [CACHE_FILE]  # no partial left


def test_cache_covers_several_datasets_with_blended_and_local_indices(tmp_path, memmap_pairs):
    model = build_tiny_model(9)
    save_pretrained(model, tmp_path / "ref")
    first, second = memmap_pairs(random_pairs(3, seed=34), "a"), memmap_pairs(random_pairs(4, seed=35), "b")
    cached = make_reference(
        "cached", model_path=tmp_path / "ref", datasets=[first, second], cache_dir=tmp_path / "cache"
    )
    local = packed_batch(second)
    expected = expected_logps(model, second, local)
    torch.testing.assert_close(
        cached.response_logps(local, dataset_position=1), expected, rtol=1e-5, atol=1e-4
    )
    local.group_index += len(first)  # the BatchStream convention for a second source
    torch.testing.assert_close(cached.response_logps(local), expected, rtol=1e-5, atol=1e-4)


def test_cache_of_groups_and_pairs_holds_one_logprob_per_response(tmp_path, memmap_pairs, memmap_groups):
    """A pair dataset and a group dataset in one cache: every response equals the frozen model's and the
    standalone forward, whether the group was split over a wide row or not."""
    model = build_tiny_model(10)
    save_pretrained(model, tmp_path / "ref")
    pairs, groups = memmap_pairs(random_pairs(4, seed=36), "p"), memmap_groups(random_groups(6, seed=37), "g")
    cached = make_reference(
        "cached", model_path=tmp_path / "ref", datasets=[pairs, groups], cache_dir=tmp_path / "cache"
    )
    frozen = make_reference("model", model_path=tmp_path / "ref")
    for length in (200, 16):  # 16 slots split most groups
        batch = packed_batch(groups, "packed", True, length)
        expected = expected_logps(model, groups, batch)
        torch.testing.assert_close(
            cached.response_logps(batch, dataset_position=1), expected, rtol=1e-5, atol=1e-4
        )
        torch.testing.assert_close(frozen.response_logps(batch), expected, rtol=1e-5, atol=1e-4)
    assert batch.num_rows > batch.num_groups
    pair_batch = packed_batch(pairs)
    torch.testing.assert_close(
        cached.response_logps(pair_batch), expected_logps(model, pairs, pair_batch), rtol=1e-5, atol=1e-4
    )


def test_unknown_kind_and_missing_inputs_are_refused():
    with pytest.raises(UnitrainError, match="must be one of"):
        make_reference("frozen")
    with pytest.raises(UnitrainError, match="needs a reference model path"):
        make_reference("model")
