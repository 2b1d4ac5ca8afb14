"""Checkpoints: round trip, keep_last, atomicity (a save interrupted, even by SIGKILL, leaves the last one)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from unitrain.train import checkpoint as ckpt


def save(output_dir, step, value=1.0, keep_last=3):
    return ckpt.save_checkpoint(
        output_dir,
        step,
        model_state={"w": torch.full((2, 3), value), "tied": torch.ones(4)},
        optimizer_state={
            "state": {0: {"exp_avg": torch.ones(2)}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        trainer_state={"step": step, "sampler": {"epoch": 1, "cursor": 7}, "rng": ckpt.rng_state()},
        model_config={"hidden_size": 8},
        config_yaml="objective: sft\n",
        meta={"tokenizer_path": None},
        keep_last=keep_last,
    )


def test_round_trip_and_keep_last(tmp_path):
    for step in (2, 4, 6, 8):
        save(tmp_path, step, value=float(step), keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000006", "step-00000008"]
    loaded = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    torch.testing.assert_close(loaded["model_state"]["w"], torch.full((2, 3), 8.0))
    assert loaded["trainer_state"]["sampler"] == {"epoch": 1, "cursor": 7}
    assert loaded["optimizer_state"]["param_groups"][0]["lr"] == 0.1
    assert loaded["meta"]["step"] == 8


def test_rng_state_round_trip(tmp_path):
    state = ckpt.rng_state()
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == drawn


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 3)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken)
    with pytest.raises(OSError):
        save(tmp_path, 6)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"
    monkeypatch.undo()
    save(tmp_path, 9)  # the next save clears the leftover staging directory
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_sigkill_mid_save_resumes_from_previous(tmp_path):
    save(tmp_path, 3)
    marker = tmp_path / "in-save"
    child = textwrap.dedent(
        f"""
        import pathlib, time, torch
        from unitrain.train import checkpoint as ckpt
        real_save = torch.save
        def slow_save(obj, path):
            real_save(obj, path)
            pathlib.Path({str(marker)!r}).touch()
            time.sleep(60)
        ckpt.torch.save = slow_save
        ckpt.save_checkpoint({str(tmp_path)!r}, 6, model_state={{"w": torch.zeros(2)}}, optimizer_state={{}},
                             trainer_state={{}}, model_config={{}}, config_yaml="", meta={{}}, keep_last=3)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "child never reached the middle of the save"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert list((tmp_path / "checkpoints").glob(".tmp-*")), "the interrupted save left its staging directory"
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-00000003"
    torch.testing.assert_close(ckpt.load_checkpoint(latest)["model_state"]["w"], torch.ones(2, 3))


def test_export_and_plot_refuse_a_directory_without_a_run(tmp_path, capsys):
    from unitrain.cli import main

    assert main(["export", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert main(["plot", str(tmp_path)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [
        f"error: {tmp_path}: neither a checkpoint nor a run directory with checkpoints",
        f"error: {tmp_path / 'metrics.jsonl'}: no metrics to plot",
    ]
