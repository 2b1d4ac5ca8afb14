"""Run configuration: `TrainConfig`, assembled from the sections of `config_sections.py` and loaded from one YAML
file plus dotted `key=value` overrides.

Every field carries a description, so `docs/configuration.md` is generated from these models and cannot drift
(`python -m unitrain.config_docs docs/configuration.md`). Validation happens once, here, at the boundary: unknown
keys are refused with the closest valid key, contradictions with a reason, and the trainer trusts what it gets.
Trade-off: the models stay flat and explicit (one class per YAML section) rather than pluggable components, so
adding an option means adding a field, and the docs follow automatically.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from unitrain.config_sections import (
    BatchSection,
    DataSection,
    DPOSection,
    EvalSection,
    LoraSection,
    ModelSection,
    OptimizerSection,
    PackingSection,
    ParallelSection,
    RunSection,
    ScheduleSection,
    Section,
    TrainSection,
    WandbSection,
    model_classes,
)
from unitrain.errors import UnitrainError

OBJECTIVES = ("pretrain", "sft", "dpo")


class TrainConfig(Section):
    objective: Literal["pretrain", "sft", "dpo"] | None = Field(
        None,
        description="Training loss: LM, masked LM, or DPO-family; the default of every `data.train` entry "
        "(required unless every entry names its own `objective`).",
    )
    objectives: dict[Literal["pretrain", "sft", "dpo"], float] | None = Field(
        None,
        description="Loss weight of each objective of a mixed run, e.g. `{dpo: 1.0, pretrain: 0.1}`: the loss is "
        "the weighted sum of each objective's own mean (docs/training.md); default 1.0 each. An objective at "
        "weight 0 is left out: its datasets are not sampled.",
    )
    model: ModelSection = Field(description="Where the starting weights come from.")
    data: DataSection = Field(description="Training and validation datasets.")
    packing: PackingSection = Field(default_factory=PackingSection, description="How documents fill rows.")
    batch: BatchSection = Field(default_factory=BatchSection, description="Batch shape.")
    dpo: DPOSection = Field(default_factory=DPOSection, description="Preference loss (objective `dpo`).")
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection, description="AdamW settings.")
    schedule: ScheduleSection = Field(default_factory=ScheduleSection, description="Learning-rate schedule.")
    train: TrainSection = Field(description="Length, seed, precision.")
    run: RunSection = Field(default_factory=RunSection, description="Output, logging and checkpoint cadence.")
    eval: EvalSection = Field(
        default_factory=EvalSection, description="What validation shows besides metrics."
    )
    parallel: ParallelSection = Field(default_factory=ParallelSection, description="Multi-process settings.")
    wandb: WandbSection = Field(
        default_factory=WandbSection, description="Weights & Biases logging (off by default)."
    )
    lora: LoraSection = Field(
        default_factory=LoraSection, description="Low-rank adapters on a frozen base (any objective)."
    )

    @model_validator(mode="after")
    def _contradictions(self) -> TrainConfig:
        self._check_objectives()
        if "dpo" not in self.loss_weights:
            # Compared with the defaults (not with the keys given) so that a dumped config loads again.
            if self.dpo != DPOSection():
                raise ValueError(f"dpo settings are given but objective is {self.objective}")
            if self.packing.mode != "packed" or not self.packing.share_prompt:
                raise ValueError(
                    f"packing.mode and packing.share_prompt only apply to objective dpo, not {self.objective}"
                )
        if self.train.max_steps is not None and self.schedule.warmup_steps >= self.train.max_steps:
            raise ValueError(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) must be below train.max_steps "
                f"({self.train.max_steps})"
            )
        if self.mixed and "dpo" in self.loss_weights and self.packing.mode != "packed":
            raise ValueError(
                "a mixed run packs preference pairs with the other documents: packing.mode must be packed, not "
                f"{self.packing.mode}"
            )
        if "dpo" in self.loss_weights:
            self.preference_loss_config()
        return self

    def _check_objectives(self) -> None:
        for index, source in enumerate(self.data.sources):
            if source.objective is None and self.objective is None:
                raise ValueError(f"data.train[{index}] needs an objective (or set the run's objective)")
        if isinstance(self.data.validation, list):
            for index, entry in enumerate(self.data.validation):
                if entry.objective is None and self.objective is None:
                    raise ValueError(
                        f"data.validation[{index}] needs an objective (or set the run's objective)"
                    )
        given = set(self.source_objectives)
        for name, weight in (self.objectives or {}).items():
            if name not in given:
                raise ValueError(f"objectives.{name}: no data.train entry has objective {name}")
            if not weight >= 0:
                raise ValueError(f"objectives.{name}: a loss weight must be >= 0, got {weight}")
        if not self.loss_weights:
            raise ValueError("objectives: every objective has loss weight 0, nothing would train")
        for index, entry in enumerate(self.data.validation if isinstance(self.data.validation, list) else []):
            if (entry.objective or self.objective) == "dpo" and "dpo" not in self.loss_weights:
                raise ValueError(f"data.validation[{index}]: a dpo set needs dpo trained in this run")
        if self.mixed and isinstance(self.data.validation, str):
            raise ValueError(
                "data.validation: a mixed run names its validation sets as a list of {name, path}"
            )
        if not self.mixed and self.objective is None:  # e.g. every entry `dpo`, or `{pretrain: 0}` beside dpo
            self.objective = self.run_objective

    @property
    def source_objectives(self) -> list[str]:
        """The objective of each `data.train` entry."""
        return [source.objective or self.objective for source in self.data.sources]

    @property
    def loss_weights(self) -> dict[str, float]:
        """Objectives trained (loss weight > 0) → loss weight, in the order pretrain, sft, dpo."""
        given = set(self.source_objectives)
        weights = {name: (self.objectives or {}).get(name, 1.0) for name in OBJECTIVES if name in given}
        return {name: weight for name, weight in weights.items() if weight > 0}

    @property
    def mixed(self) -> bool:
        """Several objectives (or one at a loss weight other than 1): the mixed path of the trainer. A run of one
        objective at weight 1 takes the single-objective path, exactly as before mixing existed."""
        weights = self.loss_weights
        return len(weights) != 1 or next(iter(weights.values())) != 1.0

    @property
    def run_objective(self) -> str | None:
        """The one objective of a single-objective run (None for a mixed run)."""
        return None if self.mixed else next(iter(self.loss_weights))

    @model_validator(mode="after")
    def _lora_adapter_matches(self) -> TrainConfig:
        path = None if self.model.path is None else Path(self.model.path)
        if self.lora.adapter is None and path is not None and (path / "adapter_config.json").is_file():
            if not (path / "config.json").is_file():
                raise ValueError(
                    f"model.path {path} is a PEFT adapter directory, not a checkpoint: use lora.adapter={path} "
                    "(with lora.rank and lora.alpha of the adapter) and the base it was trained on as model.path"
                )
        if self.lora.adapter is None:
            return self
        if self.model.path is None:
            raise ValueError("lora.adapter needs model.path: the base checkpoint the adapter was trained on")
        from unitrain.model.adapter import check_adapter

        try:
            check_adapter(
                self.lora.adapter, self.lora.rank, self.lora.alpha, self.lora.target_modules, self.model.path
            )
        except UnitrainError as error:
            raise ValueError(f"lora.adapter: {error}") from None
        return self

    def preference_loss_config(self):
        """The losses module's own config; constructing it runs its validation of loss/weight contradictions."""
        from unitrain.losses.preference import PreferenceLossConfig

        try:
            return PreferenceLossConfig(
                losses=self.dpo.loss,
                weights=self.dpo.loss_weights,
                beta=self.dpo.beta,
                label_smoothing=self.dpo.label_smoothing,
                simpo_gamma=self.dpo.simpo_gamma,
                discopop_tau=self.dpo.discopop_tau,
            )
        except ValueError as error:
            raise ValueError(f"dpo: {error}") from None


class ConfigProblem(UnitrainError):
    """A config that does not validate; `location` is the dotted key path of the problem (empty: several keys)."""

    def __init__(self, message: str, location: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.location = location


def _refuse_unknown(raw: dict, valid: list[str], prefix: str) -> None:
    for key in raw:
        if key not in valid:
            full = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"
            raise ConfigProblem(f"unknown key '{full}'{hint}", tuple(full.split(".")))


def _native(model: dict) -> bool:
    """Whether a `model` section with a `config` builds unitrain's own decoder, whose keys are known (the
    transformers backend takes any key its architecture's config class does)."""
    from unitrain.model.config import SUPPORTED_ARCHITECTURES

    if model.get("backend", "auto") == "transformers":
        return False
    architectures, model_type = model["config"].get("architectures"), model["config"].get("model_type")
    architecture = architectures[0] if isinstance(architectures, list) and architectures else None
    if architecture is None and model_type is None:
        return True  # a Llama
    return architecture in SUPPORTED_ARCHITECTURES or model_type in SUPPORTED_ARCHITECTURES.values()


def _check_keys(raw: Any, model: type[BaseModel], prefix: str) -> None:
    """Refuse unknown keys before pydantic sees them, naming the closest valid key; in `model.config` too, where
    a key the architecture does not read would train a default-sized model."""
    if not isinstance(raw, dict):
        return
    _refuse_unknown(raw, list(model.model_fields), prefix)
    if model is ModelSection and isinstance(raw.get("config"), dict) and _native(raw):
        from unitrain.model.config import HF_CONFIG_KEYS

        _refuse_unknown(raw["config"], sorted(HF_CONFIG_KEYS), f"{prefix}config.")
    for key, value in raw.items():
        for sub_model in model_classes(model.model_fields[key].annotation):
            items = value if isinstance(value, list) else [value]
            for item in items:
                _check_keys(item, sub_model, f"{prefix}{key}.")


OVERRIDE_SOURCE = "command line override '{}'"


def apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as a YAML scalar or flow list/mapping."""
    source = OVERRIDE_SOURCE.format(override)
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise UnitrainError(f"{source}: expected key=value (e.g. dpo.beta=0.2)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UnitrainError(f"{source}: value is not valid YAML ({error})".replace("\n", " ")) from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UnitrainError(f"{source}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


# what pydantic adds to an error's location inside a union (`str`, `list[DataSource]`, `function-after[...]`)
UNION_TAG = re.compile(r"^(str|int|float|bool|none|[\w-]+\[.*\]|[A-Z]\w*)$")


def _problem(error: ValidationError) -> ConfigProblem:
    """The problem to report: within a union (`data.train`: a path or a list), the member that got furthest,
    e.g. a negative weight in the blend list rather than 'Input should be a valid string'."""
    errors = error.errors()
    first = max(errors, key=lambda e: len(e["loc"]))
    location = tuple(str(part) for part in first["loc"] if not UNION_TAG.match(str(part)))
    message = first["msg"].removeprefix("Value error, ")
    return ConfigProblem(f"{'.'.join(location)}: {message}" if location else message, location)


def _validate(raw: dict) -> TrainConfig:
    """A TrainConfig, or a `ConfigProblem` (one line, without the source) for the first problem."""
    _check_keys(raw, TrainConfig, "")
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        raise _problem(error) from None


def parse_config(raw: Any, source: str = "config") -> TrainConfig:
    """Validate a plain dict into a TrainConfig; any problem is one `UnitrainError` line naming `source`."""
    if not isinstance(raw, dict):
        raise UnitrainError(f"{source}: expected a mapping of sections at the top level")
    try:
        return _validate(raw)
    except ConfigProblem as problem:
        raise UnitrainError(f"{source}: {problem}") from None


def _blamed_override(problem: ConfigProblem, overrides: list[str], states: list[dict]) -> str | None:
    """The override a problem comes from: the last one that sets its key (or a section around or inside it);
    for a problem of several keys, the first override after which it appears. None: the file's own problem."""
    for override in reversed(overrides):
        key = tuple(override.partition("=")[0].split("."))
        common = min(len(key), len(problem.location))
        if common and key[:common] == problem.location[:common]:
            return override
    if problem.location:
        return None
    for override, state in zip([None, *overrides], states):
        try:
            _validate(state)
        except ConfigProblem as earlier:
            if str(earlier) == str(problem):
                return override
    return None


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config, apply dotted overrides in order, validate. A problem names the file, or the
    command-line override it comes from."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise UnitrainError(f"{path}: cannot read config ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise UnitrainError(f"{path}: not valid YAML ({error})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise UnitrainError(f"{path}: expected a mapping of sections at the top level")
    states = [copy.deepcopy(raw)]  # the file alone, then after each override
    for override in overrides:
        apply_override(raw, override)
        states.append(copy.deepcopy(raw))
    try:
        return _validate(raw)
    except ConfigProblem as problem:
        override = _blamed_override(problem, list(overrides), states)
        source = path if override is None else OVERRIDE_SOURCE.format(override)
        raise UnitrainError(f"{source}: {problem}") from None


def config_to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def resolve_hub_ids(config: TrainConfig) -> TrainConfig:
    """A copy of `config` whose `model.path`, `dpo.reference_model` and `lora.adapter` are local directories:
    Hugging Face Hub ids (`org/name[@revision]`) resolved through the cache (unitrain.files); a local path wins."""
    from unitrain.files import resolve_model

    resolved = config.model_copy(deep=True)
    resolved.model.path = resolve_model(config.model.path, "model.path")
    resolved.dpo.reference_model = resolve_model(config.dpo.reference_model, "dpo.reference_model")
    resolved.lora.adapter = resolve_model(config.lora.adapter, "lora.adapter")
    return resolved
