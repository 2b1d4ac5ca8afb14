"""One training loop for pretraining, SFT and DPO: forward → loss → backward per micro-batch → clip → step.

Normalization is global: the LM/SFT loss of a micro-batch is its sum of token NLLs divided by the number of
target tokens of the whole optimizer step (every micro-batch, every rank), and the DPO loss is its sum of
per-pair losses divided by the pairs of the whole step, so accumulation and data parallelism give the gradient
of one big batch. Only the last micro-batch synchronizes gradients (`no_sync` before it). Everything a step
reports is a sum reduced once over ranks. Trade-off: the step waits for the global counts, which the data
stream knows in advance on every rank (it plans the whole step), so no extra communication is needed.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unitrain.config import TrainConfig, config_to_yaml, resolve_hub_ids
from unitrain.data.batch import PackedBatch
from unitrain.errors import UnitrainError
from unitrain.train import checkpoint as ckpt
from unitrain.train import lora
from unitrain.train.data import describe_rows, load_training_data, write_validation_record
from unitrain.train.dist import DistContext, any_rank, barrier, init_distributed, shutdown, wrap_model
from unitrain.train.evaluation import samples
from unitrain.train.evaluation.validation import Validation
from unitrain.train.logs.memory import PhaseMemory
from unitrain.train.logs.metrics import MetricsWriter, Progress, preference_metrics, reduce_sums
from unitrain.train.logs.wandb_logger import require_wandb
from unitrain.train.optim import build_optimizer, learning_rate_at, set_learning_rate
from unitrain.train.policy import PolicyLogprobs, load_policy
from unitrain.train.step.objectives import MixedObjectives


@dataclass
class TrainResult:
    steps: int  # optimizer steps completed (including resumed ones)
    skipped_steps: int  # steps skipped for a non-finite loss or gradient
    stopped_by: str | None  # signal name when SIGINT/SIGTERM ended the run early
    output_dir: Path
    last_metrics: dict[str, float]
    held_out: int = 0  # validation documents (or pairs), every one of them evaluated
    memory: str = ""  # peak memory per phase, one line
    report: list[str] = field(default_factory=list)  # the final DPO validation's per-pair report


# token ids written to config.json, not architecture: a run saved before they were filled in still resumes
SPECIAL_TOKEN_KEYS = {"bos_token_id", "eos_token_id", "pad_token_id"}


class Trainer:
    def __init__(
        self, config: TrainConfig, context: DistContext, resume: bool, memory: PhaseMemory | None = None
    ):
        self.config, self.context = config, context
        self.memory = memory or PhaseMemory(context.device)
        self.output_dir = Path(config.run.output_dir)
        latest = ckpt.latest_checkpoint(ckpt.check_output_dir(self.output_dir))
        if latest is not None and not resume:
            raise UnitrainError(
                f"{self.output_dir} already holds the checkpoints of a run (latest {latest.name}); pass --resume "
                "to continue it, or choose another run.output_dir"
            )
        if latest is None and resume:  # a typo in the directory must not restart a run unnoticed
            raise UnitrainError(
                f"--resume: no checkpoint in {ckpt.checkpoint_dir(self.output_dir)} (run.output_dir); check "
                "run.output_dir, or leave out --resume to start a new run"
            )
        if config.wandb.enabled and context.is_main:
            require_wandb()
        self.resume_from = latest if resume else None
        self.data = load_training_data(config, context)
        if context.is_main:  # the rows a run packs; the held-out record `unitrain score --held-out` reads
            print("\n".join(describe_rows(self.data)))
            write_validation_record(self.output_dir, self.data, config)
        base_dtype = lora.base_dtype(config, context.device)  # fp32 unless a frozen LoRA base is kept in bf16
        self.model = load_policy(config, self.data, base_dtype).to(context.device)
        if self.resume_from is None and config.model.path is None and context.is_main:
            # a random start exists nowhere else; a checkpoint start is already on disk (no multi-GB copy)
            self._export_model(self.model, self.output_dir / "initial")
        barrier(context)  # the reference may load `initial`, written by rank 0
        resuming = self.resume_from is not None
        self.lora = lora.LoraRun(config, self.model, self.output_dir, resuming) if config.lora.rank else None
        self.reference = None
        if "dpo" in config.loss_weights:
            self.loss_config = config.preference_loss_config()
            from unitrain.train.step.reference import run_reference

            self.reference = run_reference(self)
        self.policy = PolicyLogprobs(self.model, config.train.logprob_chunk_size)
        self.validation, self.samples = Validation(self), samples.Samples(self)
        self.mixed = MixedObjectives.attach(self)  # None unless several objectives or named validation sets
        self.wrapped = wrap_model(self.policy, context, config.parallel.fsdp)
        sharded = config.parallel.fsdp and context.is_distributed
        self.optimizer = build_optimizer(self.model, config.optimizer, sharded=sharded)
        self.step = 0
        self.skipped = 0
        if self.resume_from is not None:
            self._load(self.resume_from)
        self.autocast = torch.autocast(
            context.device.type, torch.bfloat16, enabled=config.train.dtype == "bfloat16"
        )
        self._signal: str | None = None  # set by the handler on this rank
        self._stopping = False  # agreed by all ranks in the step's reduction: they all save and stop together

    def _export_model(self, model: torch.nn.Module, directory: Path) -> None:
        from unitrain.model import save_pretrained

        directory.mkdir(parents=True, exist_ok=True)
        save_pretrained(model, directory)
        ckpt.write_tokenizer_files(self.data.tokenizer_path, self.data.eos_id, directory)

    # -- state ----------------------------------------------------------------------------------------------
    def save(self) -> None:
        with self.memory.phase("checkpoint"):
            self._save()

    def _save(self) -> None:
        sharded = self.config.parallel.fsdp and self.context.is_distributed
        model_state, optimizer_state = ckpt.gather_states(
            self.wrapped, self.model, self.optimizer, sharded, trainable_only=self.lora is not None
        )
        if self.context.is_main:
            ckpt.save_checkpoint(
                self.output_dir,
                self.step,
                model_state=model_state,
                optimizer_state=optimizer_state,
                trainer_state={
                    "step": self.step,
                    "skipped": self.skipped,
                    "sampler": self.data.stream.state_dict(),
                    "rng": ckpt.rng_state(),
                },
                model_config=self.model.config.to_hf(),
                config_yaml=config_to_yaml(self.config),
                meta={
                    "tokenizer_path": str(self.data.tokenizer_path) if self.data.tokenizer_path else None,
                    "eos_id": self.data.eos_id,
                    "objective": self.config.run_objective or "mixed",
                    "model_path": self.config.model.path,  # its generation_config.json goes into exports
                    **(self.lora.meta() if self.lora else {}),
                },
                keep_last=self.config.run.keep_last,
            )
        barrier(self.context)

    def _load(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path)
        current = json.loads(json.dumps(self.model.config.to_hf()))  # as stored: tuples become lists
        changed = sorted(
            key
            for key in (set(current) | set(state["model_config"])) - SPECIAL_TOKEN_KEYS
            if current.get(key) != state["model_config"].get(key)
        )
        if changed:
            raise UnitrainError(
                f"cannot resume from {path}: the model differs from the checkpoint's in {', '.join(changed)} "
                "(resume with the run's original model settings)"
            )
        lora.check_resume(self.lora, path, state["meta"])
        sharded = self.config.parallel.fsdp and self.context.is_distributed
        ckpt.restore_states(
            self.wrapped,
            self.model,
            self.optimizer,
            sharded,
            state["model_state"],
            state["optimizer_state"],
            trainable_only=self.lora is not None,
            source=path,
        )
        trainer_state = state["trainer_state"]
        self.step, self.skipped = int(trainer_state["step"]), int(trainer_state["skipped"])
        self.data.stream.load_state_dict(trainer_state["sampler"])
        ckpt.set_rng_state(trainer_state["rng"])

    # -- one step -------------------------------------------------------------------------------------------
    def _sync_context(self, sync: bool):
        """Gradients are reduced across ranks only in the backward of the step's last micro-batch."""
        if not self.context.is_distributed:
            return contextlib.nullcontext()
        if self.config.parallel.fsdp:
            self.wrapped.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else self.wrapped.no_sync()

    def batch_loss(
        self, module, batch: PackedBatch, chosen_per_pair, position=None, reference=None, table=None
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """Loss summed over this micro-batch's targets (LM/SFT) or pairs (DPO), the listwise loss summed over its
        groups (None without one), and metric sums. `batch` is still on the CPU: its counts are read there,
        without waiting for the device. Validation passes a `reference` that remembers its batches' log-probs
        and a `table` list; `chosen_per_pair` and `table`: see `preference_loss_sums`."""
        if self.config.mixed:
            return self.mixed.batch_loss(module, batch, position)
        sums = {"tokens": batch.num_tokens, "slots": batch.input_ids.numel(), "targets": batch.num_targets}
        batch = batch.to(self.context.device)
        if self.config.objective != "dpo":
            from unitrain.losses.lm import lm_loss_sum

            with self.memory.phase("forward"):
                loss_sum, _ = lm_loss_sum(module(batch).float())
            return loss_sum, None, sums
        from unitrain.train.step.preference import preference_loss_sums

        # The reference first: its forward's buffers (a layer's intermediates, a chunk of logits) are freed before
        # the policy's forward keeps its activations for the backward, instead of adding to that peak.
        with self.memory.phase("reference"):
            reference = (reference or self.reference).response_logps(batch, position)  # (Rb,) or None
        with self.memory.phase("forward"):
            logps = module(batch)  # (N,)
            loss_sum, group_loss, preference_sums = preference_loss_sums(
                logps.float(), batch, reference, self.loss_config, chosen_per_pair, self.data.groups, table
            )
        return loss_sum, group_loss, {**sums, **preference_sums}

    def train_step(self) -> dict[str, float] | None:
        """One optimizer step; returns its metrics, or None when it was skipped (non-finite loss/gradient)."""
        started = time.perf_counter()
        step_batches = self.data.stream.next_step()
        is_dpo, mixed = self.config.run_objective == "dpo", self.config.mixed
        count = step_batches.global_pairs if is_dpo else step_batches.global_targets
        denominator = self.mixed.set_step(step_batches) if mixed else max(count, 1)  # mixed: 1 (own counts)
        chosen_per_pair = (
            step_batches.global_chosen_targets / max(step_batches.global_pairs, 1) if is_dpo else None
        )
        lr = learning_rate_at(
            self.step, self.config.optimizer.lr, self.data.total_steps, self.config.schedule
        )
        set_learning_rate(self.optimizer, lr)
        self.wrapped.train()
        totals: dict[str, float | torch.Tensor] = {"loss": 0.0}
        last = len(step_batches.micro_batches) - 1
        for index, batch in enumerate(step_batches.micro_batches):
            with self._sync_context(index == last), self.autocast:
                loss_sum, group_loss, sums = self.batch_loss(self.wrapped, batch, chosen_per_pair)
                # DDP/FSDP average gradients over ranks; the global normalization needs their sum.
                loss = loss_sum * (self.context.world_size / denominator)
                if group_loss is not None:  # a listwise loss: averaged over the step's groups
                    loss = loss + group_loss * (self.context.world_size / max(step_batches.global_groups, 1))
            with self.memory.phase("backward"):
                loss.backward()
            del loss, group_loss  # the graph is freed: nothing of this micro-batch outlives its backward
            totals["loss"] = totals["loss"] + loss_sum.detach()
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + value
        totals["stop"] = float(self._signal is not None)
        reduced = reduce_sums(totals, self.context)
        with self.memory.phase("optimizer"):
            grad_norm = self._clip_gradients()
            finite = math.isfinite(reduced["loss"]) and math.isfinite(grad_norm)
            if finite:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        self._stopping = reduced["stop"] > 0
        if not finite:
            return None
        metrics = {
            "loss": reduced["loss"] / denominator
            + reduced.get("group_loss", 0.0) / max(step_batches.global_groups, 1),
            "grad_norm": grad_norm,
            "learning_rate": lr,
            "tokens_per_second": reduced["tokens"] / elapsed,
            "step_seconds": elapsed,
            "padding_fraction": 1.0 - reduced["tokens"] / max(reduced["slots"], 1),
            "epoch": self.data.stream.epoch,
        }
        if is_dpo:
            metrics.update(preference_metrics(reduced))
            metrics["pairs_per_second"] = reduced["pairs"] / elapsed
        metrics.update(self.mixed.metrics(reduced, elapsed) if mixed else {})
        return metrics

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.config.optimizer.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the shards
            norm = norm.full_tensor()
        return float(norm)

    # -- validation -----------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Loss (and DPO metrics) over every validation document/pair/group, reduced over ranks; eval.samples."""
        if not self.data.validation:
            return {}
        with self.memory.phase("validation", exclusive=True):
            metrics = self.validation.evaluate()
        return {**metrics, **self.samples.log(self.step)}

    # -- the loop -------------------------------------------------------------------------------------------
    @property
    def stop_requested(self) -> bool:
        """All ranks agreed in the last reduction; a single process stops as soon as its handler ran."""
        return self._stopping or (not self.context.is_distributed and self._signal is not None)

    def _on_signal(self, signum, frame) -> None:
        self._signal = signal.Signals(signum).name

    def fit(self) -> TrainResult:
        run = self.config.run
        total = self.data.total_steps
        writer = self.writer = MetricsWriter(
            self.output_dir,
            self.context.is_main,
            run.tensorboard,
            resume_step=self.step if self.resume_from is not None else None,
            wandb=self.config.wandb,
            run_config=self.config.model_dump(mode="json"),
        )
        finished = self.resume_from is not None and self.step >= total
        if finished and self.context.is_main:
            print(
                f"{self.output_dir}: the run already finished at step {self.step}; nothing to train (raise "
                "train.max_steps or train.epochs to train further)"
            )
        progress = Progress(total, self.step, run.progress and self.context.is_main)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        consecutive_bad, last_metrics, saved_at = 0, {}, self.step if self.resume_from is not None else -1
        try:
            if self.resume_from is None:
                writer.log(0, self.evaluate())  # the starting point of the validation curves
            while self.step < total:
                metrics = self.train_step()
                if metrics is None:
                    self.skipped += 1
                    consecutive_bad += 1
                    if consecutive_bad >= self.config.train.max_nonfinite_steps:
                        raise UnitrainError(
                            f"stopping at step {self.step}: {consecutive_bad} steps in a row had a non-finite loss "
                            f"or gradient (lower optimizer.lr, set optimizer.grad_clip, or check the data)"
                        )
                else:
                    consecutive_bad = 0
                    self.step += 1
                    metrics["skipped_steps"] = self.skipped
                    last_metrics = metrics
                    progress.update(metrics)
                    if run.eval_every and self.step % run.eval_every == 0 and self.step < total:
                        metrics.update(self.evaluate())
                    if self.step % run.log_every == 0 or self.step == total:
                        writer.log(self.step, metrics)
                if self.stop_requested or (metrics and run.save_every and self.step % run.save_every == 0):
                    self.save()
                    saved_at = self.step
                if self.stop_requested:
                    break
            if not self.stop_requested:
                if saved_at != self.step:
                    self.save()  # before the final evaluation: nothing trained is lost if it fails
                # saved: the AdamW moments and gradients are freed before the export and the final validation
                self.optimizer.state.clear()
                self.model.zero_grad(set_to_none=True)
                if self.context.is_main:
                    with self.memory.phase("export"):
                        ckpt.export_hf(ckpt.latest_checkpoint(self.output_dir), self.output_dir / "hf")
                last_metrics = {**last_metrics, **self._final_evaluation(writer, finished)}
                writer.summarize({"steps": self.step, "skipped_steps": self.skipped, **last_metrics})
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            progress.close()
            writer.close()
        stopped_by = (self._signal or "SIGTERM on another rank") if self.stop_requested else None
        return TrainResult(
            self.step, self.skipped, stopped_by, self.output_dir, last_metrics, self.data.held_out,
            self.memory.describe(), self.validation.report,
        )  # fmt: skip

    def _final_evaluation(self, writer: MetricsWriter, finished: bool) -> dict[str, float]:
        """Validation after the last step, logged once: a finished run resumed again keeps the one it logged.
        Rank 0 alone reads metrics.jsonl; every rank follows its answer (validation may be collective)."""
        if finished:
            logged = {
                key: value for key, value in writer.logged(self.step).items() if key.startswith("eval/")
            }
            if any_rank(bool(logged), self.context):
                return logged
        final = self.evaluate()
        writer.log(self.step, {**final, **self.memory.summary()})  # with the run's peak memory per phase
        return final


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Run (or resume) training as described by `config`; joins the torchrun process group when launched so."""
    context = init_distributed(config.train.device)
    try:
        memory = PhaseMemory(context.device)
        with memory.phase("startup"):
            trainer = Trainer(resolve_hub_ids(config), context, resume, memory)
        return trainer.fit()
    finally:
        shutdown(context)
