"""The training TOML's top-level keys read by data/: which dataset TOML to train on and how the
cache is filled. Declared in config/ so that config imports nothing above it; the dataset TOML
itself is config/dataset_config.py."""

from __future__ import annotations

from dataclasses import dataclass

from config.schema import positive, required


@dataclass(kw_only=True)
class DataSettings:
    dataset: str = required()
    caching_batch_size: int = 1

    def validate(self, file, prefix):
        positive(self, file, ["caching_batch_size"])
