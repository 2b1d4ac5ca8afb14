"""The epoch-plan cache: read back equal, shared by processes (one builds), stale or corrupted files rebuilt."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from unitrain.data.batches.stream import BatchStream
from unitrain.data.epoch.plan_cache import load_or_build, read_plan, write_plan
from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.data.memmap.writer import DatasetWriter


@pytest.fixture
def documents(tmp_path) -> GPTMemmapDataset:
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 90, 400)
    with DatasetWriter(tmp_path / "docs", "pretraining", vocab_size=100, eos_id=0) as writer:
        writer.add_batch(rng.integers(0, 100, int(lengths.sum())), lengths)
    return GPTMemmapDataset(tmp_path / "docs")


def make_stream(dataset, cache_dir, seed=1, rank=0):
    return BatchStream(
        [(dataset, np.arange(len(dataset)), 1.0)],
        objective="pretrain",
        mode="packed",
        share_prompt=True,
        sequence_length=64,
        micro_batch_size=2,
        accumulation_steps=1,
        seed=seed,
        window=50,
        cache_dir=cache_dir,
        rank=rank,
    )


def same_plan(a, b) -> bool:
    arrays = ("item_document", "item_part", "row_start", "row_items", "row_counts")
    scalars = ("sequence_length", "dropped", "num_tokens", "num_slots")
    return all(
        (getattr(a, n) is None and getattr(b, n) is None) or np.array_equal(getattr(a, n), getattr(b, n))
        for n in arrays
    ) and all(getattr(a, n) == getattr(b, n) for n in scalars)


def plan_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("plan-*.bin"))


def test_a_cached_plan_reads_back_equal_and_is_not_rebuilt(documents, tmp_path, monkeypatch):
    uncached = make_stream(documents, None)
    cached = make_stream(documents, tmp_path / "plans")
    assert same_plan(cached.plan, uncached.plan)
    assert len(plan_files(tmp_path / "plans")) == 1
    reader = make_stream(documents, tmp_path / "plans")
    monkeypatch.setattr(BatchStream, "_build", lambda self: pytest.fail("a valid cached plan was rebuilt"))
    assert same_plan(reader.plan, uncached.plan)
    assert not reader.plan.item_document.flags.writeable  # a view of the mapped file
    for _ in range(3):
        assert [b.input_ids.tolist() for b in reader.next_step().micro_batches] == [
            b.input_ids.tolist() for b in uncached.next_step().micro_batches
        ]


def test_corrupted_truncated_and_stale_files_are_rebuilt(documents, tmp_path, capsys):
    stream = make_stream(documents, tmp_path / "plans")
    assert len(stream.plan)
    expected = make_stream(documents, None).plan  # not a view of the file this test overwrites in place
    path = plan_files(tmp_path / "plans")[0]
    key = {**stream._plan_key(), "epoch": 0}
    data = bytearray(path.read_bytes())
    data[-70] ^= 0x01  # one bit of the last array
    path.write_bytes(bytes(data))
    assert read_plan(path, key)[1].startswith("corrupted")
    assert same_plan(make_stream(documents, tmp_path / "plans").plan, expected)
    assert "corrupted" in capsys.readouterr().out and read_plan(path, key)[1] is None
    path.write_bytes(path.read_bytes()[:-100])
    assert "truncated" in read_plan(path, key)[1]
    assert same_plan(make_stream(documents, tmp_path / "plans").plan, expected)
    assert "seed" in read_plan(path, {**key, "seed": 2})[1]
    path.write_bytes(b"not a plan at all")
    assert same_plan(make_stream(documents, tmp_path / "plans").plan, expected)


def rewrite_header(path: Path, edit) -> None:
    """Replace the JSON header of a plan file by `edit(header)`, still valid JSON, padded to the same length so
    the arrays stay where they are."""
    data = path.read_bytes()
    length = int.from_bytes(data[8:16], "little")
    header = json.dumps(edit(json.loads(data[16 : 16 + length])), separators=(",", ":")).encode()
    assert len(header) <= length
    path.write_bytes(data[:16] + header.ljust(length) + data[16 + length :])


def _first_entry(header: dict) -> dict:
    return next(iter(header["arrays"].values()))


DAMAGES = {
    "key renamed": lambda h: {("kez" if k == "key" else k): v for k, v in h.items()},
    "arrays missing": lambda h: {k: v for k, v in h.items() if k != "arrays"},
    "scalar missing": lambda h: {k: v for k, v in h.items() if k != "dropped"},
    "not an object": lambda h: [h["format"]],
    "dtype <i5": lambda h: _first_entry(h).update(dtype="<i5") or h,
    "shape of strings": lambda h: _first_entry(h).update(shape=["x"]) or h,
    "offset a string": lambda h: _first_entry(h).update(offset="0") or h,
    "negative offset": lambda h: _first_entry(h).update(offset=-4096) or h,
    "arrays a list": lambda h: {**h, "arrays": list(h["arrays"])},
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_a_damaged_header_is_rebuilt(documents, tmp_path, capsys, damage):
    stream = make_stream(documents, tmp_path / "plans")
    assert len(stream.plan)
    expected = make_stream(documents, None).plan
    path = plan_files(tmp_path / "plans")[0]
    key = {**stream._plan_key(), "epoch": 0}
    del stream  # its plan maps the file rewritten below
    rewrite_header(path, DAMAGES[damage])
    plan, reason = read_plan(path, key)
    assert plan is None and reason.startswith("corrupted header")
    assert same_plan(make_stream(documents, tmp_path / "plans").plan, expected)
    assert "corrupted header" in capsys.readouterr().out and read_plan(path, key)[1] is None


def test_other_settings_get_their_own_file_and_old_epochs_are_pruned(documents, tmp_path):
    for seed in (1, 2):
        assert len(make_stream(documents, tmp_path / "plans", seed=seed).plan)
    assert len(plan_files(tmp_path / "plans")) == 2
    stream = make_stream(documents, tmp_path / "plans")
    for epoch in range(1, 4):
        stream.epoch = epoch
        assert len(stream.plan)
    names = [p.name for p in plan_files(tmp_path / "plans")]
    assert len(names) == 3 and sum("epoch2" in n or "epoch3" in n for n in names) == 2


def _build_in_process(directory: str, dataset_path: str, builds: str) -> None:
    dataset = GPTMemmapDataset(dataset_path)
    stream = make_stream(dataset, directory)
    build = stream._build

    def counted():
        with open(builds, "a") as handle:
            handle.write("built\n")
        return build()

    stream._build = counted
    np.save(
        Path(directory).parent / f"items-{multiprocessing.current_process().pid}.npy", stream.plan.row_start
    )


def test_processes_sharing_a_cache_build_the_plan_once(documents, tmp_path):
    builds = tmp_path / "builds.txt"
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(
            target=_build_in_process, args=(str(tmp_path / "plans"), str(documents.path), str(builds))
        )
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert builds.read_text().count("built") == 1
    starts = [np.load(p) for p in tmp_path.glob("items-*.npy")]
    assert len(starts) == 3 and all(np.array_equal(s, starts[0]) for s in starts)


def test_write_then_read_round_trips_a_plan_without_parts(tmp_path, documents):
    plan = make_stream(documents, None).plan
    plan.item_part = None
    write_plan(tmp_path / "p.bin", {"k": 1}, plan)
    again, reason = read_plan(tmp_path / "p.bin", {"k": 1})
    assert reason is None and again.item_part is None and same_plan(again, plan)
    built = load_or_build(tmp_path / "dir", {"epoch": 0}, lambda: plan)
    assert same_plan(built, plan)
