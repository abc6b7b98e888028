"""The training TOML's top-level keys read by data/: which dataset TOML to train on and how the
cache is filled. Declared in config/ so that config imports nothing above it; the dataset TOML
itself is config/dataset_config.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from config.schema import check, positive, required


@dataclass(kw_only=True)
class DataSettings:
    # The dataset TOML (key `dataset`); the dataset it describes is TrainConfig.dataset.
    dataset_file: Path = required("dataset")
    caching_batch_size: int = 1
    # Processes per GPU that read and resize media files while the VAE encodes; None:
    # data.cache.default_caching_workers (the cores shared by this machine's ranks, at most 8).
    caching_workers: Optional[int] = None

    def validate(self, file, prefix):
        positive(self, file, ["caching_batch_size"])
        check(self.caching_workers is None or self.caching_workers >= 0, file, "caching_workers",
              f"must be >= 0 (0: read media files in the training process), got {self.caching_workers}")
