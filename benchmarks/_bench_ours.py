"""Worker process: unitrain's DPO step on the benchmark's checkpoint and prepared pairs, timed phase by phase.

Run by `dpo_vs_trl.py` as `python benchmarks/_bench_ours.py SPEC VARIANT MODE SHARE_PROMPT OUT`, VARIANT one of
`online` (frozen reference model), `cached` (reference log-probs computed once, before training) or `gate` (step-0
per-pair log-probs and losses against a distinct reference, in every packing layout, plus our token ids).
The step is the library's own pieces in the trainer's order (plan_rows -> collate -> hidden_states ->
target_logprobs -> response_logps -> preference_losses -> backward -> clip -> AdamW); step k trains on pairs
[k*B, (k+1)*B), as TRL's sequential sampler does. Trade-off: a synchronize at each phase boundary (CUDA only)
makes the breakdown exact and costs a little overlap.
"""

from __future__ import annotations

import sys
import tempfile
import time

import numpy as np
import torch
from _bench_common import Spec, current_rss_mib, peak_device_mib, peak_rss_mib, sync, write_json

LAYOUTS = [("separate", False), ("pair", False), ("pair", True), ("packed", False), ("packed", True)]


def load(spec: Spec):
    from unitrain.data.memmap.reader import GPTMemmapDataset
    from unitrain.model import from_pretrained

    dataset = GPTMemmapDataset(spec.dataset_path)
    model = from_pretrained(spec.model_path, dtype=spec.torch_dtype, device=spec.device)
    return dataset, model


def step_batch(spec: Spec, dataset, indices: np.ndarray, mode: str, share_prompt: bool):
    from unitrain.data.batches.collate import collate
    from unitrain.data.epoch.plan import plan_rows

    plan = plan_rows(
        dataset,
        indices,
        objective="dpo",
        mode=mode,
        share_prompt=share_prompt,
        sequence_length=spec.sequence_length,
    )
    if plan.dropped:
        raise RuntimeError(f"{plan.dropped} pairs do not fit sequence_length={spec.sequence_length}")
    batch = collate(dataset, plan, range(len(plan)), objective="dpo", mode=mode, share_prompt=share_prompt)
    return batch.to(spec.device)


def policy_pair_logps(model, batch):
    from unitrain.losses.logprobs import target_logprobs
    from unitrain.losses.preference import pair_view, response_logps

    hidden = model.hidden_states(batch)  # (R, T, D)
    logps = target_logprobs(hidden, model.lm_head_weight, batch.target_positions, batch.target_tokens).logps
    sums, counts = response_logps(logps, batch.target_response, batch.num_responses)  # (Rb,) x 2
    return pair_view(sums, batch.pair_responses), pair_view(counts, batch.pair_responses)  # (P, 2) x 2


def run_training(spec: Spec, variant: str, mode: str, share_prompt: bool) -> dict:
    from unitrain.losses.preference import PreferenceLossConfig, pair_view, preference_losses
    from unitrain.model.attention import build_attention
    from unitrain.train.step.reference import make_reference

    start = time.perf_counter()
    dataset, model = load(spec)
    setup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    reference = make_reference(
        "model" if variant == "online" else "cached",
        model_path=spec.model_path,
        datasets=[dataset],
        sequence_length=spec.sequence_length,
        micro_batch_size=spec.pairs_per_step,
        cache_dir=tempfile.mkdtemp(prefix="ours-cache-", dir=spec.workdir),
        device=spec.device,
        dtype=spec.torch_dtype,
    )
    precompute_seconds = time.perf_counter() - start if variant == "cached" else 0.0
    loss_config = PreferenceLossConfig(losses=["sigmoid"], beta=spec.beta)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=spec.learning_rate,
        betas=spec.adam_betas,
        eps=spec.adam_eps,
        weight_decay=spec.weight_decay,
        fused=True,  # as unitrain's trainer; TRL gets its fused AdamW too (`adamw_torch_fused`)
    )
    model.train()
    rss_before_train = current_rss_mib()
    steps, losses, slots, real = [], [], [], []
    for step in range(spec.total_steps):
        marks = [time.perf_counter()]
        indices = np.arange(step * spec.pairs_per_step, (step + 1) * spec.pairs_per_step)
        batch = step_batch(spec, dataset, indices, mode, share_prompt)
        sync(spec.device)
        marks.append(time.perf_counter())
        sums, counts = policy_pair_logps(model, batch)
        sync(spec.device)
        marks.append(time.perf_counter())
        reference_logps = reference.response_logps(batch)  # (Rb,)
        if reference_logps is not None:
            reference_logps = pair_view(reference_logps, batch.pair_responses)  # (P, 2)
        sync(spec.device)
        marks.append(time.perf_counter())
        output = preference_losses(sums, reference_logps, counts, loss_config)
        loss = output.losses.sum() / spec.pairs_per_step
        losses.append(float(loss.detach()))
        marks.append(time.perf_counter())
        loss.backward()
        sync(spec.device)
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(spec.device)
        marks.append(time.perf_counter())
        phases = np.diff(marks)
        names = ("data", "policy_forward", "reference", "loss", "backward", "optimizer")
        steps.append({"wall": marks[-1] - marks[0], **dict(zip(names, phases.tolist()))})
        slots.append(int(batch.input_ids.numel()))
        real.append(batch.num_tokens)
    result = {
        "trainer": f"ours-{variant}-{mode}-{'shared' if share_prompt else 'dup'}",
        "steps": steps,
        "losses": losses,
        "setup_seconds": setup_seconds,
        "precompute_seconds": precompute_seconds,
        "rss_before_train_mib": rss_before_train,
        "peak_rss_mib": peak_rss_mib(),
        "peak_device_mib": peak_device_mib(spec.device),
        "padded_slots": slots,
        "real_slots": real,
        "attention_backend": build_attention(batch, model.attention_backend).backend,
    }
    if variant == "cached":
        result["reference_logps"] = reference.table.tolist()
    return result


def run_gate(spec: Spec) -> dict:
    """Per-pair log-probs and losses of the first `gate_pairs` pairs in every layout, against a distinct reference."""
    from unitrain.losses.preference import PreferenceLossConfig, pair_view, preference_losses
    from unitrain.model import from_pretrained
    from unitrain.train.step.reference import ModelReference

    dataset, model = load(spec)
    reference = ModelReference(
        from_pretrained(spec.gate_reference_path, dtype=spec.torch_dtype, device=spec.device)
    )
    loss_config = PreferenceLossConfig(losses=["sigmoid"], beta=spec.beta)
    token_ids = []
    for index in range(len(dataset)):
        sample = dataset[index]
        token_ids.append(
            {
                "prompt": sample.prompt_ids.tolist(),
                "chosen": sample.chosen_ids.tolist(),
                "rejected": sample.rejected_ids.tolist(),
            }
        )
    layouts = {}
    indices = np.arange(min(spec.gate_pairs, len(dataset)))
    for mode, share_prompt in LAYOUTS:
        batch = step_batch(spec, dataset, indices, mode, share_prompt)
        with torch.no_grad():
            sums, counts = policy_pair_logps(model, batch)
            reference_logps = pair_view(reference.response_logps(batch), batch.pair_responses)
            output = preference_losses(sums, reference_logps, counts, loss_config)
        order = torch.argsort(batch.group_index.cpu())  # report in dataset order (one group per pair)
        layouts[f"{mode}-{'shared' if share_prompt else 'dup'}"] = [
            {
                "policy": sums[k].float().tolist(),
                "reference": reference_logps[k].float().tolist(),
                "loss": float(output.losses[k]),
            }
            for k in order.tolist()
        ]
    return {"trainer": "ours-gate", "layouts": layouts, "token_ids": token_ids}


def main(argv: list[str]) -> int:
    spec_path, variant, mode, share_prompt, out_path = argv
    spec = Spec.start_worker(spec_path, variant)
    if variant == "gate":
        result = run_gate(spec)
    else:
        result = run_training(spec, variant, mode, share_prompt == "shared")
    write_json(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
