"""Training: config-driven loop, optimizer/schedule, checkpoints, ranks, metrics (see docs/training.md)."""

__all__ = ["TrainResult", "train"]


def __getattr__(name: str):
    # Imported on first use, so submodules (checkpoint, reference) load without the whole trainer.
    if name in __all__:
        from unitrain.train import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
