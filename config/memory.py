"""The memory levers' top-level keys of the training TOML, read by memory/ (the plan, block swap,
activation checkpointing). Declared in config/ so that config imports nothing above it; the train
config (config/train_config.py) composes this section with the others into one flat namespace."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from config.schema import check


@dataclass(kw_only=True)
class MemorySettings:
    # The last N transformer blocks keep their frozen weights in CPU memory (memory/block_swap.py).
    blocks_to_swap: int = 0
    activation_checkpointing: Union[bool, Literal["selective"]] = False
    # Pretend each GPU has this many GiB (and on CUDA, limit the process to it): the memory plan
    # (memory/plan.py) chooses for this size; also makes the plan work on CPU.
    memory_budget_gib: Optional[float] = None

    def validate(self, file, prefix):
        check(self.memory_budget_gib is None or self.memory_budget_gib > 0, file, "memory_budget_gib", "must be > 0")
        check(self.blocks_to_swap >= 0, file, "blocks_to_swap", f"must be >= 0, got {self.blocks_to_swap}")
