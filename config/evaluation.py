"""Eval datasets and how often they are evaluated: the top-level keys of the training TOML read
by the trainer's evals (training/trainer.py) and the eval plans (data/batches.py). Declared in
config/ so that config imports nothing above it; the train config composes this section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from config.schema import check, positive, required


@dataclass
class EvalDatasetConfig:
    name: str = required()
    config: str = required()


@dataclass(kw_only=True)
class EvalSettings:
    eval_datasets: list[EvalDatasetConfig] = field(default_factory=list)
    eval_every_n_epochs: Optional[int] = None
    eval_every_n_steps: Optional[int] = None
    eval_at_start: bool = True

    def validate(self, file, prefix):
        positive(self, file, ["eval_every_n_epochs", "eval_every_n_steps"])
        names = [e.name for e in self.eval_datasets]
        check(len(names) == len(set(names)), file, "eval_datasets", "names must be unique")
