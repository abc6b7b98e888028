"""The training TOML's top-level keys read by data/: which dataset TOML to train on and how the
cache is filled. Declared in config/ so that config imports nothing above it; the dataset TOML
itself is config/dataset_config.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from config.schema import positive, required


@dataclass(kw_only=True)
class DataSettings:
    # The dataset TOML (key `dataset`); the dataset it describes is TrainConfig.dataset.
    dataset_file: Path = required("dataset")
    caching_batch_size: int = 1

    def validate(self, file, prefix):
        positive(self, file, ["caching_batch_size"])
