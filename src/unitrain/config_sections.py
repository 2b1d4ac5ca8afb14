"""The sections of a run's configuration, one pydantic model per YAML section; `config.py` assembles them into
`TrainConfig` and loads it. Every field carries a description: docs/configuration.md is generated from them.
Trade-off: flat, explicit sections (a field per option) rather than pluggable components, so adding an option is
adding a field, and its documentation comes with it.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def model_classes(annotation: Any) -> list[type[BaseModel]]:
    """BaseModel classes reachable in a field annotation (through unions, lists and tuples)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [cls for arg in typing.get_args(annotation) for cls in model_classes(arg)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    path: str | None = Field(
        None,
        description="Hugging Face checkpoint directory to start from (config.json + safetensors: a hub snapshot, "
        "a run's `hf/`, an export; not a `checkpoints/step-*` or a PEFT adapter), or a Hub id `org/name[@revision]` "
        "(resolved through the Hugging Face cache; a local directory of that name wins; `HF_HUB_OFFLINE=1`: the "
        "cache only).",
    )
    config: dict[str, Any] | None = Field(
        None,
        description="From-scratch architecture as Hugging Face `config.json` keys (e.g. `hidden_size`, "
        "`num_hidden_layers`); a Llama unless `architectures` or `model_type` names another; `vocab_size` defaults "
        "to the dataset's; for the native backend a key it does not read is refused. Weights are randomly initialised.",
    )
    backend: Literal["auto", "native", "transformers"] = Field(
        "auto",
        description="`native`: unitrain's own decoder (Llama, Mistral, Qwen2, Qwen3); `transformers`: any decoder-only "
        "causal LM transformers builds, with unitrain's attention inside it (docs/models.md); `auto`: native for "
        "the four families it implements, transformers for every other.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run a checkpoint's own Python modeling code (`auto_map` in config.json; transformers backend). "
        "Never done unless true.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.path is None) == (self.config is None):
            raise ValueError(
                "set exactly one of model.path (a checkpoint) and model.config (an architecture)"
            )
        return self


Objective = Literal["pretrain", "sft", "dpo"]


class DataSource(Section):
    path: str = Field(description="A prepared dataset directory (`unitrain prepare` output).")
    weight: float = Field(1.0, description="Sampling weight of this dataset in the blend (> 0).")
    objective: Objective | None = Field(
        None,
        description="The loss this dataset's documents train: `pretrain`, `sft` or `dpo`; default: the run's "
        "`objective`. Datasets of different objectives make a mixed run (see `objectives`).",
    )
    name: str | None = Field(
        None,
        description="Name of its held-out share in the validation metrics (`eval/NAME/...`) when "
        "`data.validation` is a fraction of a mixed run; default: the directory's name.",
    )

    @field_validator("weight")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"weight must be > 0, got {value}")
        return value

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


class ValidationSet(Section):
    name: str = Field(description="Prefix of this set's validation metrics: `eval/NAME/loss`, ...")
    path: str = Field(description="A prepared dataset directory.")
    objective: Objective | None = Field(
        None, description="The loss it is evaluated with; default: the run's `objective`."
    )


class DataSection(Section):
    train: str | list[DataSource] = Field(
        description="A prepared dataset directory, or a list of `{path, weight, objective, name}` to blend several "
        "(of one objective or several)."
    )
    validation: str | float | list[ValidationSet] | None = Field(
        None,
        description="A prepared dataset directory, a fraction in (0, 1) of each training dataset held out "
        "(every copy of a held-out document or pair with it, so none is trained on), or a list of "
        "`{name, path, objective}` sets, each reported under its name; none disables validation.",
    )
    drop_duplicates: bool = Field(
        False,
        description="Train (and validate) on the first copy only of documents or pairs that occur several times "
        "in a dataset (same tokens; `unitrain prepare` reports how many).",
    )
    allow_tokenizer_mismatch: bool = Field(
        False,
        description="Train although `model.path` (or `dpo.reference_model`) ships a `tokenizer.json` that is not "
        "the one the datasets were prepared with; only for tokenizers known to give the same ids.",
    )

    @field_validator("validation")
    @classmethod
    def _fraction(cls, value: str | float | list | None) -> str | float | list | None:
        if isinstance(value, float) and not 0.0 < value < 1.0:
            raise ValueError(f"a held-out fraction must be in (0, 1), got {value}")
        if isinstance(value, list):
            names = [entry.name for entry in value]
            if not value or len(set(names)) < len(names):
                raise ValueError(f"validation sets need distinct names, got {names}")
        return value

    @property
    def sources(self) -> list[DataSource]:
        return [DataSource(path=self.train)] if isinstance(self.train, str) else list(self.train)


class PackingSection(Section):
    mode: Literal["separate", "pair", "packed"] = Field(
        "packed",
        description="DPO only. `separate`: prompt+chosen and prompt+rejected as two documents (as TRL); "
        "`pair`: one pair per row; `packed`: several pairs per row.",
    )
    share_prompt: bool = Field(
        True,
        description="DPO only, `pair`/`packed`: store the prompt once per pair. `separate` always duplicates it.",
    )
    sequence_length: int = Field(
        1024,
        gt=0,
        description="Token slots per row. A longer pretraining document is cut into row-sized pieces; a longer "
        "pair or group is split over a wide row (one row per part, each with its prompt), dropped only when a "
        "response does not fit a row with its prompt (or, in `separate` mode, prompt + longest response does not "
        "fit); a longer SFT document is dropped. The run's first lines count what is left out.",
    )
    window: int = Field(
        65536,
        gt=0,
        description="Documents (or pairs) of the shuffled epoch packed together by exact best fit; rows never "
        "span two windows. Larger: fuller rows, more memory while planning; measured fill in docs/BENCHMARKS.md.",
    )


class BatchSection(Section):
    micro_batch_size: int = Field(8, gt=0, description="Rows per micro-batch on each rank.")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Micro-batches per optimizer step on each rank."
    )


class DPOSection(Section):
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL penalty (DPO temperature).")
    loss: str | list[str] = Field(
        "sigmoid",
        description="Preference loss name, or a list of names combined with `loss_weights`: the per-pair losses "
        "of docs/dpo.md, and `plackett_luce` (listwise, per group).",
    )
    loss_weights: list[float] | None = Field(None, description="One weight per loss in `loss` (a list).")
    group_pairs: Literal["all", "best_vs_rest", "best_vs_worst"] = Field(
        "best_vs_rest",
        description="Which pairs a group of ranked responses yields for the per-pair losses and metrics (ties "
        "yield none): `all` ordered pairs, the top-scored against every lower one, or against the bottom-scored "
        "ones. A pair dataset gives its one pair in every mode; the listwise `plackett_luce` loss uses the whole "
        "ranking.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Label smoothing: conservative DPO (`sigmoid`, < 0.5), robust DPO's flip rate (`robust`, < 0.5), "
        "EXO's ε (`exo_pair`, required > 0), conservative SimPO (`simpo`, < 0.5).",
    )
    simpo_gamma: float = Field(0.5, description="SimPO target reward margin γ (loss `simpo`).")
    discopop_tau: float = Field(0.05, gt=0, description="DiscoPOP temperature τ (loss `discopop`).")
    reference: Literal["model", "cached", "none"] = Field(
        "model",
        description="Reference log-probs: `model` (a frozen model run alongside), `cached` (computed once into "
        "a cache next to the run), `none` (reference-free losses only).",
    )
    reference_model: str | None = Field(
        None,
        description="Checkpoint of the reference model (a directory or a Hub id `org/name[@revision]`, as "
        "`model.path`); default: the starting policy.",
    )
    reference_cache_dir: str | None = Field(
        None,
        description="Directory of the `cached` reference log-probs, keyed by the dataset fingerprints and the "
        "reference weights' hash; point several runs at one directory to share it. Default: "
        "`run.output_dir/reference-cache`.",
    )
    reference_on_mismatch: Literal["recompute", "error"] = Field(
        "recompute",
        description="When the cache's key does not match the data or the reference weights: `recompute` it "
        "(saying why), or stop with an `error`.",
    )

    @model_validator(mode="after")
    def _reference_consistency(self) -> DPOSection:
        if self.reference == "none" and self.reference_model is not None:
            raise ValueError("dpo.reference_model is set but dpo.reference is none")
        return self


class OptimizerSection(Section):
    lr: float = Field(1e-5, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(
        0.0, ge=0, description="Decoupled weight decay, on matrices only (not norms)."
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW beta1, beta2.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this; none: no clip."
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"both betas must be in [0, 1), got {list(betas)}")
        return betas


class ScheduleSection(Section):
    kind: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="Learning-rate shape after warmup, decaying to `min_lr_ratio * lr` at the end."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to `optimizer.lr`.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate as a fraction of the peak.")


class TrainSection(Section):
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run (exclusive with `epochs`).")
    epochs: float | None = Field(
        None, gt=0, description="Passes over the training data (exclusive with `max_steps`)."
    )
    seed: int = Field(0, description="Seed of model init, data order and every random generator.")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Compute dtype: `bfloat16` runs the forward under autocast; weights stay fp32."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto`: CUDA when available, else CPU."
    )
    max_nonfinite_steps: int = Field(
        5, gt=0, description="Stop after this many consecutive steps with a non-finite loss or gradient."
    )
    logprob_chunk_size: int | None = Field(
        None,
        gt=0,
        description="Targets per chunk of the LM-head log-prob pass; null: as many as keep a chunk's fp32 logits "
        "near 64 MiB (2^24 / vocabulary size, between 64 and 1024: 341 for a 49k vocabulary).",
    )
    activation_checkpointing: bool = Field(
        False,
        description="Keep only each decoder layer's input and recompute the layer in the backward: far less "
        "activation memory for about one more forward pass of compute.",
    )

    @model_validator(mode="after")
    def _one_length(self) -> TrainSection:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.max_steps and train.epochs")
        return self


class RunSection(Section):
    output_dir: str = Field("runs/default", description="Where metrics, checkpoints and the `hf` export go.")
    log_every: int = Field(1, gt=0, description="Write training metrics every this many steps.")
    eval_every: int | None = Field(None, gt=0, description="Validate every this many steps (and at the end).")
    save_every: int | None = Field(
        None, gt=0, description="Checkpoint every this many steps (and at the end)."
    )
    keep_last: int = Field(2, gt=0, description="Checkpoints kept; older ones are deleted.")
    progress: bool = Field(
        True, description="Show a tqdm progress bar (step, loss, reward accuracy, tokens/s, ETA) on rank 0."
    )
    tensorboard: bool = Field(
        True, description="Also log to TensorBoard when the `tensorboard` extra is installed."
    )


class EvalSection(Section):
    samples: int = Field(
        0,
        ge=0,
        description="Completions of this many fixed held-out prompts at every validation (rank 0, greedy), in "
        "`samples.jsonl`, TensorBoard's text tab and a W&B table; 0: none.",
    )
    max_new_tokens: int = Field(64, gt=0, description="Longest completion of `samples`, in tokens.")


class ParallelSection(Section):
    fsdp: bool = Field(
        False, description="Shard parameters with FSDP2 `fully_shard` instead of replicating (DDP)."
    )


class WandbSection(Section):
    enabled: bool = Field(
        False,
        description="Also log to Weights & Biases (the `wandb` extra: `pip install 'unitrain[wandb]'`) from rank 0: "
        "the metrics of `metrics.jsonl` under the same names, this config, and the final summary.",
    )
    project: str = Field("unitrain", description="W&B project.")
    entity: str | None = Field(None, description="W&B user or team; default: the logged-in user's default.")
    name: str | None = Field(None, description="W&B run name; default: the name of `run.output_dir`.")
    tags: list[str] = Field([], description="W&B run tags.")
    mode: Literal["online", "offline"] = Field(
        "online",
        description="`offline`: write the run under `dir` only (no network), for `wandb sync` later.",
    )
    dir: str | None = Field(
        None, description="Directory of W&B's files (a `wandb/` inside it); default: `run.output_dir`."
    )


LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSection(Section):
    rank: int | None = Field(
        None, description="LoRA rank r; null: LoRA off (full fine-tuning). See docs/training.md#lora."
    )
    alpha: float = Field(32.0, gt=0, description="LoRA alpha: the update is scaled by `alpha / rank`.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input (training only).")
    target_modules: list[str] = Field(
        list(LORA_TARGET_MODULES),
        description="Hugging Face projections that get an adapter, in every layer: "
        + ", ".join(f"`{name}`" for name in LORA_TARGET_MODULES)
        + " (unitrain's decoder); on the transformers backend the model's own linear modules by name (e.g. "
        "`query_key_value` for GPT-NeoX), checked against the model when it is built.",
    )
    adapter: str | None = Field(
        None,
        description="A PEFT LoRA adapter directory (or a Hub id `org/name[@revision]`, as `model.path`) to start "
        "from (e.g. the `hf` export of a LoRA SFT run); its rank, alpha, target modules and base (`model.path`) "
        "must match. It is also the DPO reference.",
    )

    @field_validator("rank")
    @classmethod
    def _positive_rank(cls, rank: int | None) -> int | None:
        if rank is not None and rank <= 0:
            raise ValueError(f"must be positive, got {rank} (null turns LoRA off)")
        return rank

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, names: list[str]) -> list[str]:
        if not names:
            raise ValueError("name at least one module")
        for name in names:  # the model's own names on the transformers backend: checked against the model
            if not name.isidentifier():
                close = difflib.get_close_matches(name, LORA_TARGET_MODULES, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ValueError(f"unknown module '{name}' ({hint}valid: {', '.join(LORA_TARGET_MODULES)})")
        if len(set(names)) != len(names):
            raise ValueError(f"a module is listed twice in {names}")
        return names

    @model_validator(mode="after")
    def _settings_need_rank(self) -> LoraSection:
        # compared with the defaults (not the keys given) so that a dumped config loads again
        defaults = LoraSection.model_construct().model_dump()  # construct: no validation, no recursion
        if self.rank is None and self.adapter is not None:
            raise ValueError("adapter is given but rank is null; set lora.rank to the adapter's r")
        if self.rank is None and self.model_dump() != defaults:
            raise ValueError("settings are given but rank is null (LoRA off); set lora.rank")
        return self
