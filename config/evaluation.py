"""Eval datasets and how often they are evaluated: the top-level keys of the training TOML read
by the trainer's evals (training/trainer.py) and the eval plans (data/batches.py). Declared in
config/ so that config imports nothing above it; the train config composes this section."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from config.dataset_config import Dataset
from config.schema import check, keyed, positive, required


@dataclass
class EvalDatasetConfig:
    name: str = required()
    # Its dataset TOML; the dataset it describes is EvalDataset.dataset.
    config: Path = required()


@dataclass(kw_only=True)
class EvalSettings:
    # The [[eval_datasets]] tables (key `eval_datasets`); the datasets they name are TrainConfig.eval_datasets.
    eval_dataset_configs: list[EvalDatasetConfig] = keyed("eval_datasets", default_factory=list)
    eval_every_n_epochs: Optional[int] = None
    eval_every_n_steps: Optional[int] = None
    eval_at_start: bool = True

    def validate(self, file, prefix):
        positive(self, file, ["eval_every_n_epochs", "eval_every_n_steps"])
        names = [e.name for e in self.eval_dataset_configs]
        check(len(names) == len(set(names)), file, "eval_datasets", "names must be unique")


@dataclass
class EvalDataset:
    name: str
    dataset: Dataset


def eval_overlap_warnings(path: Path, dataset: Dataset, eval_datasets: list[EvalDataset]) -> list[str]:
    """A warning for each eval dataset that reads a training folder: allowed (a loss curve on
    the training data is a fine smoke test) but its loss then says nothing about unseen data."""
    training = {d.path for d in dataset.directories}
    warnings = []
    for e in eval_datasets:
        shared = [d.path for d in e.dataset.directories if d.path in training]
        if shared:
            folders = ", ".join(str(f) for f in dict.fromkeys(shared))
            warnings.append(f"{path}: eval dataset '{e.name}' ({e.dataset.file}) reads training folder(s) {folders}: "
                            f"its eval loss measures fitting the training data, not how the model does on unseen "
                            f"data; give it a folder of held-out items")
    return warnings
