"""Turns the workers' JSON results into the benchmark's numbers and Markdown tables.

Every rate is computed from the timed steps only (warm-up steps discarded), per repeat, then summarized as the
median and the min-max spread over repeats. Token counts come from the token ids both trainers reported, so
unique tokens, padding and prompt duplication are exact counts, not estimates. Trade-off: the useful-FLOP count
is analytic (see `_bench_common.useful_flops`), so utilization compares like with like for both trainers but
ignores non-matmul work (norms, softmax, elementwise ops).
"""

from __future__ import annotations

from _bench_common import Spec, median_spread, pair_token_counts, useful_flops

PHASES = ("data", "policy_forward", "reference", "loss", "backward", "optimizer")


def gate_report(trl_gate: dict, ours_gate: dict, tolerance: float) -> dict:
    """Token-id agreement on every pair and step-0 agreement of every layout with TRL (log-probs relative to
    their magnitude, losses absolute)."""
    differing = [
        index
        for index, (theirs, ours) in enumerate(zip(trl_gate["token_ids"], ours_gate["token_ids"]))
        if theirs != ours
    ]
    if len(trl_gate["token_ids"]) != len(ours_gate["token_ids"]):
        differing.append(-1)
    layouts = {}
    for name, pairs in ours_gate["layouts"].items():
        logp_abs = logp_rel = loss_abs = 0.0
        for ours, theirs in zip(pairs, trl_gate["pairs"]):
            for key in ("policy", "reference"):
                for a, b in zip(ours[key], theirs[key]):
                    logp_abs = max(logp_abs, abs(a - b))
                    logp_rel = max(logp_rel, abs(a - b) / max(1.0, abs(b)))
            loss_abs = max(loss_abs, abs(ours["loss"] - theirs["loss"]))
        layouts[name] = {
            "logp_max_abs": logp_abs,
            "logp_max_rel": logp_rel,
            "loss_max_abs": loss_abs,
            "passed": logp_rel <= tolerance and loss_abs <= tolerance,
        }
    return {
        "differing_pairs": differing,
        "layouts": layouts,
        "losses_at_step0": [pair["loss"] for pair in trl_gate["pairs"]],
        "passed": not differing and all(layout["passed"] for layout in layouts.values()),
    }


def step_lengths(spec: Spec, token_ids: list[dict]) -> list[list[tuple[int, int, int]]]:
    """(prompt, chosen, rejected) lengths of the pairs of each step."""
    lengths = [(len(p["prompt"]), len(p["chosen"]), len(p["rejected"])) for p in token_ids]
    batch = spec.pairs_per_step
    return [lengths[step * batch : (step + 1) * batch] for step in range(spec.total_steps)]


def summarize(spec: Spec, runs: list[dict], per_step_lengths, matmul_peak: float) -> dict:
    """One trainer's repeats → medians and spreads of every reported quantity."""
    timed = range(spec.warmup_steps, spec.total_steps)
    lengths = [pair for step in timed for pair in per_step_lengths[step]]
    counts = pair_token_counts(*zip(*lengths))
    online = "online" in runs[0]["trainer"]
    flops = useful_flops(spec.shape, lengths, online_reference=online)
    seconds = [sum(run["steps"][step]["wall"] for step in timed) for run in runs]
    pairs = len(lengths)
    slots = sum(runs[0]["padded_slots"][step] for step in timed)
    real = sum(runs[0]["real_slots"][step] for step in timed)
    pairs_per_s = median_spread([pairs / s for s in seconds])
    breakdown = {
        phase: median_spread([sum(run["steps"][step][phase] for step in timed) / len(timed) for run in runs])[
            0
        ]
        for phase in PHASES
    }
    breakdown["wall"] = median_spread([s / len(timed) for s in seconds])[0]
    precompute = median_spread([run["precompute_seconds"] for run in runs])[0]
    amortized = None
    if precompute:
        # One epoch of the slice: every pair pays its share of the one-off precompute pass.
        per_pair_precompute = precompute / (spec.total_steps * spec.pairs_per_step)
        amortized = 1.0 / (1.0 / pairs_per_s[0] + per_pair_precompute)
    peak_device = [run["peak_device_mib"] for run in runs if run.get("peak_device_mib") is not None]
    return {
        "trainer": runs[0]["trainer"],
        "repeats": len(runs),
        "pairs_per_s": pairs_per_s,
        "unique_tokens_per_s": median_spread([counts["unique"] / s for s in seconds]),
        "useful_flops_per_s": median_spread([flops / s for s in seconds]),
        "utilization": median_spread([flops / s / matmul_peak for s in seconds]),
        "padding_fraction": 1.0 - real / slots,
        "prompt_duplication_fraction": (real - counts["unique"]) / real,
        "slots_per_unique_token": slots / counts["unique"],
        "peak_rss_mib": median_spread([run["peak_rss_mib"] for run in runs]),
        "peak_device_mib": median_spread(peak_device) if peak_device else None,
        "precompute_seconds": precompute,
        "amortized_pairs_per_s": amortized,
        "breakdown_seconds_per_step": breakdown,
        "losses": runs[0]["losses"],
    }


def trl_real_slots(spec: Spec, per_step_lengths) -> list[int]:
    """Non-padding slots of TRL's batches: prompt+chosen and prompt+rejected rows."""
    return [sum(2 * p + c + r for p, c, r in step) for step in per_step_lengths]


def _fmt_spread(triple, scale: float = 1.0, digits: int = 2) -> str:
    median, low, high = (value * scale for value in triple)
    return f"{median:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def markdown_tables(results: dict) -> str:
    """The headline table, the time breakdown and the checks, as Markdown."""
    summaries = results["summaries"]
    lines = [
        "| trainer | pairs/s (min–max) | × TRL | unique tok/s | padding | prompt dup. | slots/unique tok "
        "| useful-FLOP util. | peak RSS MiB | precompute s | amortized pairs/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, summary in summaries.items():
        baseline = summaries["trl-online" if "online" in name else "trl-precomputed"]["pairs_per_s"][0]
        device = summary["peak_device_mib"]
        memory = _fmt_spread(summary["peak_rss_mib"], digits=0)
        if device is not None:
            memory += f" / GPU {device[0]:.0f}"
        amortized = summary["amortized_pairs_per_s"]
        lines.append(
            f"| {name} | {_fmt_spread(summary['pairs_per_s'], digits=3)} "
            f"| {summary['pairs_per_s'][0] / baseline:.2f} "
            f"| {summary['unique_tokens_per_s'][0]:.0f} | {summary['padding_fraction']:.1%} "
            f"| {summary['prompt_duplication_fraction']:.1%} | {summary['slots_per_unique_token']:.2f} "
            f"| {summary['utilization'][0]:.1%} | {memory} "
            f"| {summary['precompute_seconds']:.1f} | {'' if amortized is None else f'{amortized:.3f}'} |"
        )
    lines += ["", "Time per optimizer step (s, median over repeats):", ""]
    lines.append("| trainer | " + " | ".join(PHASES) + " | total |")
    lines.append("|---|" + "---|" * (len(PHASES) + 1))
    for name, summary in summaries.items():
        breakdown = summary["breakdown_seconds_per_step"]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{breakdown[p]:.3f}" for p in PHASES)
            + f" | {breakdown['wall']:.3f} |"
        )
    return "\n".join(lines)
