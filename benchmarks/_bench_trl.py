"""Worker process: TRL's DPOTrainer on the benchmark's checkpoint and pairs, timed step by step.

Run by `dpo_vs_trl.py` as `python benchmarks/_bench_trl.py SPEC VARIANT OUT`, VARIANT one of `online`
(frozen reference model), `precomputed` (TRL's `precompute_ref_log_probs`) or `gate` (step-0 per-pair log-probs and
losses against a distinct reference, plus TRL's token ids). The trainer is used as shipped; timings come from
thin wrappers around its own methods and callbacks, so nothing in its step changes.
Trade-off: wrapper timing splits the step at method boundaries only (backward = training_step - compute_loss).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from _bench_common import (
    EOS_TOKEN,
    GPT2_TOKENIZER,
    Spec,
    current_rss_mib,
    peak_device_mib,
    peak_rss_mib,
    sync,
    write_json,
)


def build_trainer(spec: Spec, variant: str):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(spec.pairs_path).read_text().splitlines()]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(GPT2_TOKENIZER), eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    model = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=spec.torch_dtype).to(spec.device)
    reference = None
    if variant == "gate":
        reference = AutoModelForCausalLM.from_pretrained(spec.gate_reference_path, dtype=spec.torch_dtype)
        reference = reference.to(spec.device)
    config = DPOConfig(
        output_dir=str(Path(spec.workdir) / "trl-output"),
        per_device_train_batch_size=spec.pairs_per_step,
        gradient_accumulation_steps=1,
        max_steps=spec.total_steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="constant",
        optim="adamw_torch_fused",
        adam_beta1=spec.adam_betas[0],
        adam_beta2=spec.adam_betas[1],
        adam_epsilon=spec.adam_eps,
        weight_decay=spec.weight_decay,
        max_grad_norm=spec.max_grad_norm,
        gradient_checkpointing=spec.trl_gradient_checkpointing,
        beta=spec.beta,
        loss_type=["sigmoid"],
        max_length=None,  # the slice is chosen so that nothing needs truncation on either side
        precompute_ref_log_probs=variant == "precomputed",
        precompute_ref_batch_size=spec.pairs_per_step,
        train_sampling_strategy="sequential",  # step k trains on the same pairs as our step k
        logging_steps=10**6,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=spec.device == "cpu",
        bf16=spec.dtype == "bfloat16",
        seed=spec.seed,
    )
    return DPOTrainer(
        model=model,
        ref_model=reference,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


class _Clock:
    """Accumulates seconds per phase for the current step; `close_step` files them under the step."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.losses: list[float] = []
        self.last_mark = time.perf_counter()
        self.training_step_end = self.last_mark

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            result = function(*args, **kwargs)
            sync(self.device)
            end = time.perf_counter()
            self.current[name] += end - start
            if name == "training_step":
                self.training_step_end = end
            return result

        return timed

    def close_step(self) -> None:
        sync(self.device)
        now = time.perf_counter()
        step = dict(self.current)
        step["wall"] = now - self.last_mark
        self.steps.append(step)
        self.current = defaultdict(float)
        self.last_mark = now


def _callback(clock: _Clock):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.last_mark = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            sync(clock.device)
            clock.current["optimizer"] += time.perf_counter() - clock.training_step_end

        def on_step_end(self, args, state, control, **kwargs):
            clock.close_step()

    return StepClock()


def run_training(spec: Spec, variant: str) -> dict:
    from trl import DPOTrainer

    precompute = {"seconds": 0.0}
    original_precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *args, **kwargs):
        start = time.perf_counter()
        result = original_precompute(self, *args, **kwargs)
        precompute["seconds"] += time.perf_counter() - start
        return result

    DPOTrainer._precompute_ref_logps = timed_precompute
    start = time.perf_counter()
    trainer = build_trainer(spec, variant)
    setup_seconds = time.perf_counter() - start
    clock = _Clock(spec.device)
    trainer.add_callback(_callback(clock))
    trainer.get_batch_samples = clock.wrap("data", trainer.get_batch_samples)
    trainer.training_step = clock.wrap("training_step", trainer.training_step)
    original_compute_loss = trainer.compute_loss

    def compute_loss(*args, **kwargs):
        loss = original_compute_loss(*args, **kwargs)
        clock.losses.append(float(loss.detach()))
        return loss

    trainer.compute_loss = clock.wrap("compute_loss", compute_loss)
    trainer.model.forward = clock.wrap("policy_forward", trainer.model.forward)
    if trainer.ref_model is not None:
        trainer.ref_model.forward = clock.wrap("reference", trainer.ref_model.forward)
    rss_before_train = current_rss_mib()
    trainer.train()
    steps = []
    for raw in clock.steps:
        forward_loss = raw.get("compute_loss", 0.0)
        steps.append(
            {
                "wall": raw["wall"],
                "data": raw.get("data", 0.0),
                "policy_forward": raw.get("policy_forward", 0.0),
                "reference": raw.get("reference", 0.0),
                "loss": forward_loss - raw.get("policy_forward", 0.0) - raw.get("reference", 0.0),
                "backward": raw.get("training_step", 0.0) - forward_loss,
                "optimizer": raw.get("optimizer", 0.0),
            }
        )
    result = {
        "trainer": f"trl-{variant}",
        "steps": steps,
        "losses": clock.losses,
        "setup_seconds": setup_seconds,
        "precompute_seconds": precompute["seconds"],
        "rss_before_train_mib": rss_before_train,
        "peak_rss_mib": peak_rss_mib(),
        "peak_device_mib": peak_device_mib(spec.device),
        "padded_slots": _padded_slots(trainer, spec),
    }
    if variant == "precomputed":
        dataset = trainer.train_dataset
        result["reference_logps"] = [
            list(p) for p in zip(dataset["ref_chosen_logps"], dataset["ref_rejected_logps"])
        ]
    return result


def _padded_slots(trainer, spec: Spec) -> list[int]:
    """Token slots (rows x padded length) of each step's batch, as TRL's collator builds them."""
    dataset = trainer.train_dataset
    slots = []
    for step in range(spec.total_steps):
        begin = step * spec.pairs_per_step
        examples = [dataset[i] for i in range(begin, begin + spec.pairs_per_step)]
        batch = trainer.data_collator(examples)
        slots.append(int(batch["input_ids"].numel()))
    return slots


def run_gate(spec: Spec) -> dict:
    """Per-pair log-probs (policy, reference) and losses from TRL's own code, one pair per batch (no padding)."""
    trainer = build_trainer(spec, "gate")
    dataset = trainer.train_dataset
    token_ids = [
        {
            "prompt": dataset[i]["prompt_ids"],
            "chosen": dataset[i]["chosen_ids"],
            "rejected": dataset[i]["rejected_ids"],
        }
        for i in range(len(dataset))
    ]
    pairs = []
    for index in range(min(spec.gate_pairs, len(dataset))):
        batch = trainer._prepare_inputs(trainer.data_collator([dataset[index]]))
        with torch.no_grad():
            policy = trainer.compute_ref_log_probs(trainer.model, batch)
            reference = trainer.compute_ref_log_probs(trainer.ref_model, batch)
            loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
        pairs.append(
            {
                "policy": [float(policy[0][0]), float(policy[1][0])],
                "reference": [float(reference[0][0]), float(reference[1][0])],
                "loss": float(loss),
            }
        )
    return {"trainer": "trl-gate", "pairs": pairs, "token_ids": token_ids}


def main(argv: list[str]) -> int:
    spec_path, variant, out_path = argv
    spec = Spec.start_worker(spec_path, variant)
    # A fresh datasets cache per process: TRL must really precompute, never reuse an earlier worker's file.
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="trl-cache-", dir=spec.workdir)
    result = run_gate(spec) if variant == "gate" else run_training(spec, variant)
    write_json(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
