"""How long a run trains and how each step is taken: the top-level keys of the training TOML read
by training/ (the loop, the LR schedule) and passed to DeepSpeed. Declared in config/ so that
config imports nothing above it; the train config (config/train_config.py) composes this section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from config.schema import check, positive


@dataclass(kw_only=True)
class TrainingSettings:
    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    micro_batch_size_per_gpu: int = 1
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0
    warmup_steps: int = 0
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    steps_per_print: int = 1
    seed: int = 42

    def validate(self, file, prefix):
        check(self.epochs is not None or self.max_steps is not None, file, "epochs",
              "or 'max_steps' must be set (how long to train)")
        positive(self, file, ["epochs", "max_steps", "micro_batch_size_per_gpu", "gradient_accumulation_steps",
                              "steps_per_print"])
        check(self.gradient_clipping >= 0, file, "gradient_clipping", "must be >= 0 (0 turns it off)")
        check(self.warmup_steps >= 0, file, "warmup_steps", "must be >= 0")
