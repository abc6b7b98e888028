"""Where and how often a run writes its files: the top-level keys of the training TOML read by
saving/ and by the trainer's save and checkpoint cadence. Declared in config/ so that config
imports nothing above it; the train config (config/train_config.py) composes this section."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from config.schema import check, path_is, positive, required


@dataclass(kw_only=True)
class SavingSettings:
    # The folder that holds the run folders.
    output_dir: Path = required()
    save_every_n_epochs: Optional[int] = None
    save_every_n_steps: Optional[int] = None
    save_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    checkpoint_every_n_minutes: Optional[float] = None
    checkpoint_every_n_epochs: Optional[int] = None
    checkpoint_every_n_steps: Optional[int] = None
    checkpoints_to_keep: int = 3

    def validate(self, file, prefix):
        positive(self, file, ["save_every_n_epochs", "save_every_n_steps", "checkpoint_every_n_epochs",
                              "checkpoint_every_n_steps", "checkpoints_to_keep"])
        check(self.checkpoint_every_n_minutes is None or self.checkpoint_every_n_minutes > 0, file,
              "checkpoint_every_n_minutes", "must be > 0")
        check(not path_is(self.output_dir, "exists") or path_is(self.output_dir, "dir"), file, "output_dir",
              f"is a file, not a folder: {self.output_dir}")
