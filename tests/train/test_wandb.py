"""Weights & Biases, offline (no network): the offline run directory holds the history metrics.jsonl holds,
under the same names, with the run config and the final summary; a resumed run continues the same W&B run."""

from __future__ import annotations

import json
import struct
import sys
import time

import pytest

from unitrain.errors import UnitrainError
from unitrain.train import train
from unitrain.train.logs.metrics import read_metrics

WANDB = {
    "enabled": True,
    "project": "unitrain-test",
    "name": "tiny",
    "tags": ["ci", "dpo"],
    "mode": "offline",
}
BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of chunks with a 7-byte header


def wandb_records(path):
    """Every protobuf Record of an offline run's `run-ID.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data, pending, position = path.read_bytes(), b"", 7  # after the ':W&B' file header
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a header is padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if position + 7 + length > len(data):  # a chunk still being written
            return
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_runs(output_dir, timeout: float = 60.0) -> list[list]:
    """The records of each offline run under `output_dir/wandb`, oldest first. W&B's service process may still
    be flushing a run's file when `finish()` has returned (seen on a loaded machine: the file held no record
    yet), so each file is read until it ends with the run's exit record."""
    files = sorted((output_dir / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    runs, deadline = [], time.monotonic() + timeout
    for path in files:
        records = list(wandb_records(path))
        while (
            not (records and records[-1].WhichOneof("record_type") == "exit") and time.monotonic() < deadline
        ):
            time.sleep(0.1)
            records = list(wandb_records(path))
        runs.append(records)
    return runs


def history(records) -> list[dict]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            rows.append({key: value for key, value in items.items() if not key.startswith("_")})
    return rows


def test_wandb_offline_run_holds_the_history_config_and_summary(preference_data, tmp_path, tiny_config):
    pytest.importorskip("wandb")
    run = {"eval_every": 1}
    train(tiny_config("dpo", preference_data, tmp_path, train={"max_steps": 2}, run=run, wandb=WANDB))
    resumed = tiny_config("dpo", preference_data, tmp_path, train={"max_steps": 4}, run=run, wandb=WANDB)
    train(resumed, resume=True)

    runs = offline_runs(tmp_path)
    assert len(runs) == 2, "the resumed run continues in a second offline directory of the same run"
    run_id = json.loads((tmp_path / "wandb.json").read_text())["id"]
    headers = [next(r.run for r in records if r.WhichOneof("record_type") == "run") for records in runs]
    assert [header.run_id for header in headers] == [run_id, run_id]
    assert (headers[0].project, headers[0].display_name, list(headers[0].tags)) == (
        "unitrain-test",
        "tiny",
        ["ci", "dpo"],
    )
    config = {item.key: json.loads(item.value_json) for item in headers[1].config.update}
    assert (
        config["objective"] == "dpo"
        and config["train"]["max_steps"] == 4
        and config["wandb"]["mode"] == "offline"
    )

    logged = [row for records in runs for row in history(records)]
    expected = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in logged] == [row["step"] for row in expected] == [0, 1, 2, 2, 3, 4, 4]
    for got, want in zip(logged, expected):
        assert got.keys() == want.keys()
        assert got == pytest.approx(want, rel=1e-6)

    summary = {}
    for record in runs[1]:
        if record.WhichOneof("record_type") == "summary":
            summary.update(
                {item.key: json.loads(item.value_json) for item in record.summary.update if item.key}
            )
    assert summary["steps"] == 4 and summary["eval/loss"] == pytest.approx(expected[-1]["eval/loss"])


def test_wandb_enabled_without_the_extra_is_one_line(pretrain_data, tmp_path, tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if it were not installed
    with pytest.raises(
        UnitrainError, match=r"wandb.enabled needs the wandb extra: pip install 'unitrain\[wandb\]'"
    ):
        train(tiny_config("pretrain", pretrain_data, tmp_path, train={"max_steps": 2}, wandb=WANDB))
    assert not (tmp_path / "initial").exists(), "refused before the run sets anything up"
