"""Weights & Biases beside metrics.jsonl: the same metrics under the same names, the run config, the summary.

An optional extra (`pip install 'unitrain[wandb]'`), imported only when `wandb.enabled`, and used on rank 0 only
(by `MetricsWriter`). Every row is logged with its `step`, declared as the x-axis of every metric, and W&B's own
step is left to count rows: a run killed outright and resumed logs again the steps past its last checkpoint, and
W&B drops rows whose own step goes backwards. The W&B run id is kept in `run.output_dir/wandb.json`, so that
`--resume` continues the same W&B run (offline: a second directory with the same id, merged by `wandb sync`).
"""

from __future__ import annotations

import json
from pathlib import Path

from unitrain.errors import UnitrainError

RUN_FILE = "wandb.json"
MISSING = "wandb.enabled needs the wandb extra: pip install 'unitrain[wandb]'"


def require_wandb() -> None:
    """Refuse `wandb.enabled` without the extra before a run sets anything up (not when the first metric comes)."""
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise UnitrainError(MISSING)


class WandbLogger:
    """One W&B run for one training run; `section` is the config's `wandb` section."""

    def __init__(self, section, run_config: dict, output_dir: Path, resume: bool) -> None:
        try:
            import wandb
        except ImportError:
            raise UnitrainError(
                "wandb.enabled needs the wandb extra: pip install 'unitrain[wandb]'"
            ) from None
        record = output_dir / RUN_FILE
        run_id = json.loads(record.read_text())["id"] if resume and record.is_file() else None
        directory = Path(section.dir) if section.dir else output_dir
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=section.project,
            entity=section.entity,
            name=section.name or output_dir.resolve().name,
            tags=section.tags,
            config=run_config,
            dir=str(directory),
            mode=section.mode,
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        record.write_text(json.dumps({"id": self.run.id, "project": section.project}) + "\n")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({"step": step, **metrics})

    def log_table(self, step: int, name: str, columns: list[str], rows: list[dict]) -> None:
        import wandb

        table = wandb.Table(columns=columns, data=[[row[column] for column in columns] for row in rows])
        self.run.log({"step": step, name: table})

    def summarize(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def close(self) -> None:
        self.run.finish()
