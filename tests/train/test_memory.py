"""Memory of a run: validation keeps no autograd state and its memory does not grow with the held-out set; the
per-phase peak recorder. Memory is counted from torch's own allocation events (the profiler's `[memory]` records),
not from the process's RSS, so the numbers are exact and the same on a busy machine."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from unitrain.data.memmap.writer import write_dataset
from unitrain.data.sample import GPTSample
from unitrain.train import checkpoint as ckpt
from unitrain.train.dist import init_distributed
from unitrain.train.logs.memory import PhaseMemory
from unitrain.train.trainer import Trainer, train

from .conftest import VOCAB


def peak_live_bytes(function) -> int:
    """The most bytes that tensors allocated while `function` runs held at once (frees of older ones count)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):  # stable: ties keep the recorded order
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _same_pairs(path, copies: int):
    """`copies` identical pairs of 33 tokens, one per 64-slot row: every validation micro-batch is the same, only
    their number changes."""
    tokens = np.arange(1, 34, dtype=np.int64) % VOCAB
    pair = GPTSample(tokens, chosen_span=(13, 23), rejected_span=(23, 33))
    return write_dataset(path, [pair] * copies, "preference", vocab_size=VOCAB, eos_id=0)


def _trainer(tiny_config, data, validation, tmp_path, **sections) -> Trainer:
    config = tiny_config(
        "dpo", data, tmp_path, data={"validation": str(validation)}, train={"max_steps": 2}, **sections
    )
    return Trainer(config, init_distributed("cpu"), resume=False)


def test_validation_saves_nothing_for_a_backward(preference_data, tmp_path, tiny_config):
    """No tensor is saved for a backward pass while validating, and no module of the policy outputs a graph."""
    trainer = _trainer(tiny_config, preference_data, _same_pairs(tmp_path / "val", 8), tmp_path / "run")
    saved, graphs = [], []
    for module in trainer.model.modules():
        module.register_forward_hook(lambda module, args, output: graphs.append(output.grad_fn))

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        metrics = trainer.evaluate()
    assert metrics["eval/pairs"] == 8
    assert saved == [] and graphs and all(g is None for g in graphs)


def test_validation_memory_does_not_grow_with_the_held_out_pairs(preference_data, tmp_path, tiny_config):
    """Four times the held-out pairs (identical micro-batches): the same peak of live tensor bytes. Keeping
    anything of a micro-batch (a graph, a loss with its history) past the next one makes it grow. The validation
    peak also stays below a training step's."""
    peaks = {}
    for copies in (4, 16):
        trainer = _trainer(
            tiny_config, preference_data, _same_pairs(tmp_path / f"val{copies}", copies), tmp_path / f"{copies}",
            batch={"micro_batch_size": 1},
        )  # fmt: skip
        trainer.evaluate()  # counts the validation set once (its plan)
        peaks[copies] = peak_live_bytes(trainer.evaluate)
        assert trainer.evaluate()["eval/pairs"] == copies
    assert peaks[16] <= peaks[4] * 1.02, peaks
    assert peaks[4] < peak_live_bytes(trainer.train_step)


def test_phase_peaks_nest_and_keep_their_highest():
    """An outer phase's peak covers its inner phases; a phase entered twice keeps the higher peak."""
    memory = PhaseMemory("cpu")
    with memory.phase("step"):
        for size in (1, 64):
            with memory.phase("inner"):
                block = bytearray(size << 20)
                block[::4096] = b"x" * len(block[::4096])  # touch every page: resident
                del block
    with memory.phase("after"):
        pass
    summary = memory.summary()
    assert summary["memory/step_rss_mib"] >= summary["memory/inner_rss_mib"] >= 64
    assert summary["memory/peak_rss_mib"] >= max(v for k, v in summary.items() if k != "memory/peak_rss_mib")
    with memory.phase("validation", exclusive=True), memory.phase("forward"):
        pass
    assert "memory/forward_rss_mib" not in memory.summary()
    assert "memory/validation_rss_mib" in memory.summary()


def test_a_run_reports_its_peak_memory_per_phase(preference_data, tmp_path, tiny_config):
    config = tiny_config("dpo", preference_data, tmp_path, train={"max_steps": 2}, run={"eval_every": 1})
    result = train(config)
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    phases = (
        "startup",
        "reference",
        "forward",
        "backward",
        "optimizer",
        "validation",
        "checkpoint",
        "export",
    )
    for phase in phases:
        assert last[f"memory/{phase}_rss_mib"] > 0, phase
    assert last["memory/peak_rss_mib"] >= max(last[f"memory/{phase}_rss_mib"] for phase in phases)
    assert result.memory.startswith("peak memory (MiB RSS): startup ")


def test_a_run_without_validation_reports_no_validation_phase(preference_data, tmp_path, tiny_config):
    config = tiny_config("dpo", preference_data, tmp_path, data={"validation": None}, train={"max_steps": 2})
    train(config)
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert "memory/backward_rss_mib" in last and "memory/validation_rss_mib" not in last


def test_the_lm_head_chunk_keeps_about_64_mib_of_logits_whatever_the_vocabulary():
    """By default a chunk of the log-prob pass holds about 2^24 fp32 logits: with a 49k vocabulary (SmolLM2's)
    341 targets (67 MB), not the 1024 that cost 201 MB; small vocabularies keep 1024. One chunk's logits at a time: the
    next chunk's product is not made while the last one's is still held."""
    from unitrain.losses.logprobs import auto_chunk_size, target_logprobs

    assert [auto_chunk_size(v) for v in (256, 16384, 49152, 128256, 1 << 20)] == [1024, 1024, 341, 130, 64]
    generator = torch.Generator().manual_seed(0)
    vocab, width, targets = 49152, 16, 2048
    hidden = torch.randn(1, targets, width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator) * 0.1
    positions, tokens = torch.arange(targets), torch.randint(0, vocab, (targets,), generator=generator)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def forward_backward(chunk):
        target_logprobs(hidden, weight, positions, tokens, chunk_size=chunk).logps.sum().backward()

    peak = {chunk: peak_live_bytes(functools.partial(forward_backward, chunk)) for chunk in (None, 1024)}
    logits = 4 * vocab  # bytes of one target's fp32 logits
    gradients = 2 * weight.numel() * 4  # the fp32 head gradient, accumulated and returned
    assert peak[None] < 1.1 * 341 * logits + gradients < 1024 * logits <= peak[1024], peak


def test_a_finished_run_frees_its_optimizer_state_before_export(preference_data, tmp_path, tiny_config):
    """Once the last checkpoint is saved, the AdamW moments and the gradients (two and one copies of the weights)
    are freed: the export and the final validation do not carry them."""
    trainer = _trainer(tiny_config, preference_data, _same_pairs(tmp_path / "val", 4), tmp_path / "run")
    exported = []
    real_export = ckpt.export_hf

    def export(*args, **kwargs):
        exported.append((len(trainer.optimizer.state), [p.grad is None for p in trainer.model.parameters()]))
        return real_export(*args, **kwargs)

    ckpt.export_hf = export
    try:
        trainer.fit()
    finally:
        ckpt.export_hf = real_export
    ((states, no_grads),) = exported
    assert states == 0 and all(no_grads)
    state = torch.load(ckpt.latest_checkpoint(tmp_path / "run") / "optimizer.pt", weights_only=True)
    assert state["state"], "the checkpoint keeps the optimizer state a resume needs"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_entering_a_phase_returns_the_heaps_free_pages():
    """On glibc the C heap keeps what tensors freed (small blocks below a live one cannot shrink the heap): a
    phase's RSS would count an earlier phase's garbage. Entering a phase hands those pages back."""
    import pytest

    from unitrain.train.logs.memory import _malloc_trim

    if _malloc_trim() is None or not os.path.exists("/proc/self/statm"):
        pytest.skip("glibc's malloc_trim and /proc are needed")
    memory = PhaseMemory("cpu")
    blocks = [torch.ones(16384) for _ in range(3072)]  # 64 KiB each, on the heap: 192 MiB touched
    pinned = torch.ones(16384)  # allocated after them: the heap's top stays in use
    del blocks
    before = _rss_bytes()
    with memory.phase("next"):
        inside = _rss_bytes()
    assert before - inside > 128 * (1 << 20), (before, inside)
    del pinned
