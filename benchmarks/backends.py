"""The native decoder against the transformers backend on the same Llama: pairs/s and peak memory of DPO.

    python benchmarks/backends.py                # CPU, fp32: a ~120M-parameter random Llama, 2 repeats
    python benchmarks/backends.py --quick        # smoke run: tiny model, one repeat
    python benchmarks/backends.py --device cuda  # GPU, bf16

Both configurations run unitrain's own trainer (`Trainer(config)`, then `train_step()` calls) with the same config
but `model.backend` (`native`: unitrain's decoder with fused q/k/v and gate/up; `transformers`: the transformers
`LlamaForCausalLM` with unitrain's attention registered through `AttentionInterface`) on the same random Llama
checkpoint, the same prepared HH-RLHF pairs and packing (shared-prompt packed rows), the same seed, hence the same
pairs in every step (checked), full DPO against `dpo.reference: model`. As in `lora.py` (whose worker plumbing this
reuses), each configuration is its own process (its own peak memory), the two take turns step by step with the
order flipping every step, warm-up steps are dropped, and medians and min-max are reported.
"""

from __future__ import annotations

import sys

from _bench_common import spread
from lora import common_parser, run_benchmark, settings_line, worker

VARIANTS = ("native", "transformers")


def parse_args(argv: list[str] | None):
    parser = common_parser(__doc__.split("\n")[0], hidden_size=768)
    parser.set_defaults(rank=16, activation_checkpointing=False)  # read by lora.prepare
    return parser.parse_args(argv)


def backend_sections(variant: str, spec: dict) -> dict:
    """The one config setting that differs: `model.backend`."""
    return {"model": {"backend": variant}}


def markdown(summary: dict, device: str) -> str:
    memory = "peak allocated MiB" if device.startswith("cuda") else "peak RSS MiB"
    lines = [
        f"| backend | model class | parameters | {memory}: whole run | of it, training steps | pairs/s |",
        "|---|---|---:|---:|---:|---:|",
    ]

    for variant in VARIANTS:
        row = summary[variant]
        lines.append(
            f"| {variant} | {row['model_class']} | {row['parameters']:,} | {spread(row['peak_memory_mib'], 0)} | "
            f"{spread(row['training_peak_mib'], 0)} | {spread(row['pairs_per_second'], 3)} |"
        )
    native, other = summary["native"], summary["transformers"]
    memory_ratio = other["peak_memory_mib"][0] / native["peak_memory_mib"][0]
    speed_ratio = other["pairs_per_second"][0] / native["pairs_per_second"][0]
    lines += [
        "",
        f"transformers / native (medians): pairs/s {speed_ratio:.2f}x (aim >= 0.7x), peak memory {memory_ratio:.2f}x "
        f"(aim <= 1.3x); per step, native's time / transformers' time {spread(summary['step_ratio'], 2)}; "
        f"largest step-loss difference {summary['max_loss_difference']:.1e}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker, sections=backend_sections)
        return 0
    report = run_benchmark(args, "backends.py", VARIANTS, "backends-bench-")
    print(markdown(report["summary"], args.device))
    print(settings_line(args, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
