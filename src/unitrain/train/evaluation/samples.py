"""`eval.samples`: completions of a few fixed held-out prompts at every validation, so the change training makes
is visible as text while it runs.

The prompts are the first `eval.samples` held-out items (a pair's or group's prompt, an SFT document's masked
prompt, the first half of a pretraining document up to 32 tokens), the same at every validation. Rank 0 decodes
them greedily through transformers' `generate` on a copy of the current weights (LoRA adapters folded in) and
hands the rows to the metrics writer (`samples.jsonl`, TensorBoard text, a W&B table); the seconds it took are
logged as `eval/samples_seconds`. Trade-offs: that copy holds the weights a second time while the samples are
decoded (it is freed right after), and the other ranks wait at their next collective meanwhile. Weights sharded
by FSDP over several processes are refused (rank 0 does not hold them whole).
"""

from __future__ import annotations

import functools
import time

import torch

from unitrain.errors import UnitrainError

PRETRAIN_PROMPT_TOKENS = 32


class Samples:
    """`log(step)` for a Trainer: generate, hand the rows to its `writer.log_samples`, return the time it took."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.count = trainer.config.eval.samples
        if self.count and trainer.config.parallel.fsdp and trainer.context.is_distributed:
            raise UnitrainError(
                "eval.samples needs the whole weights on rank 0, but parallel.fsdp shards them over the processes; "
                "set eval.samples: 0"
            )

    @functools.cached_property
    def prompts(self) -> list[tuple[int, list[int]]]:
        """(document index, prompt token ids) of the first `count` held-out items."""
        prompts = []
        for position, indices in self.trainer.data.validation:
            dataset = self.trainer.data.datasets[position]
            for index in indices[: self.count - len(prompts)].tolist():
                prompts.append((index, _prompt(dataset[index])))
        return prompts

    @functools.cached_property
    def tokenizer(self):
        from unitrain.data.prepare.tokenize import TextTokenizer

        path = self.trainer.data.tokenizer_path
        return None if path is None else TextTokenizer(path)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else " ".join(map(str, ids))

    def log(self, step: int) -> dict[str, float]:
        if not (self.count and self.trainer.context.is_main and self.prompts):
            return {}
        from unitrain.model.generate import Sampling, complete, to_transformers

        started = time.perf_counter()
        eos = self.trainer.data.eos_id
        sampling = Sampling(
            max_new_tokens=self.trainer.config.eval.max_new_tokens,
            eos_ids=[] if eos is None else [eos],
            pad_id=0 if eos is None else eos,
        )
        with torch.no_grad():
            model = to_transformers(self.trainer.model)
            training, batch = model.training, self.trainer.config.batch.micro_batch_size
            model.eval()  # no dropout while generating (the transformers backend hands the trained module itself)
            try:
                results = complete(model, [ids for _, ids in self.prompts], sampling, batch_size=batch)
            finally:
                model.train(training)
            del model
        rows = []
        for (index, prompt), (ids, finish) in zip(self.prompts, results):
            text_ids = ids[:-1] if finish == "eos" else ids
            rows.append(
                {"step": step, "index": index, "prompt": self.decode(prompt), "completion": self.decode(text_ids),
                 "tokens": len(ids), "finish": finish}
            )  # fmt: skip
        seconds = time.perf_counter() - started
        writer = getattr(self.trainer, "writer", None)  # the run's MetricsWriter, made when training starts
        if writer is not None:
            writer.log_samples(step, rows)
        return {"eval/samples_seconds": seconds}


def _prompt(sample) -> list[int]:
    """What a held-out item's completion starts from."""
    if sample.is_preference:
        ids = sample.prompt_ids
    elif (
        sample.loss_masking_spans is not None
        and len(sample.loss_masking_spans)
        and sample.loss_masking_spans[0, 0] == 0
    ):
        ids = sample.token_ids[: int(sample.loss_masking_spans[0, 1])]
    else:
        ids = sample.token_ids[: max(1, min(len(sample.token_ids) // 2, PRETRAIN_PROMPT_TOKENS))]
    return [int(token) for token in ids]
