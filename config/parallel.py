"""The parallel layout's top-level keys of the training TOML, read by parallel/ (stages, the
DeepSpeed engine, compile and attention set-up). Declared in config/ so that config imports
nothing above it; the train config (config/train_config.py) composes this section with the others."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from config.schema import check, check_regex, positive


@dataclass(kw_only=True)
class ParallelSettings:
    pipeline_stages: int = 1
    # None: "cost" with an adapter (LoRA), "parameters" for full fine-tuning
    # (parallel/stages.resolve_partition_method).
    partition_method: Optional[str] = None
    # 1: DeepSpeed's ZeRO stage 1, the optimizer state sharded over the data-parallel replicas.
    zero_stage: int = 0
    # torch.compile every pipeline layer (models/pipeline_layers.PipelineLayer.compile_run).
    # None: on where the stage runs on a CUDA GPU and a tiny compiled call checks out there
    # (parallel/engine.resolve_compile), off on CPU.
    compile: Optional[bool] = None
    # A diffusers attention backend for the transformer (ModelMixin.set_attention_backend), e.g.
    # "_native_cudnn"; None: "_native_cudnn" on a CUDA GPU where its probe passes
    # (parallel/stages.resolve_attention_backend), else torch's scaled-dot-product attention
    # without cuDNN (parallel/launch.py), as "native" gives it.
    attention_backend: Optional[str] = None

    def validate(self, file, prefix):
        positive(self, file, ["pipeline_stages"])
        check(self.zero_stage in (0, 1), file, "zero_stage",
              f"must be 0 or 1, got {self.zero_stage}: stages 2 and 3 shard gradients and weights, which "
              f"DeepSpeed's pipeline engine does not support")
        method = self.partition_method
        check(method is None or method in ("blocks", "cost", "parameters", "uniform") or method.startswith("type:"),
              file, "partition_method", "must be 'blocks', 'cost', 'parameters', 'uniform' or 'type:<regex>'")
        if method is not None and method.startswith("type:"):
            check_regex(self.partition_method.removeprefix("type:"), file, "partition_method")
        if self.attention_backend is not None:
            # only for this key: reading a config does not load diffusers
            from diffusers.models.attention_dispatch import AttentionBackendName

            known = [b.value for b in AttentionBackendName]
            check(self.attention_backend in known, file, "attention_backend",
                  f"= '{self.attention_backend}' is not a diffusers attention backend; one of: {', '.join(known)}")


# Below this share of busy time, a pipelined run warns (with the accumulation that reaches it).
PIPELINE_EFFICIENCY_WARNING = 0.75


def pipeline_efficiency(stages: int, accumulation: int) -> float:
    """The most of a step each GPU can compute under DeepSpeed's 1F1B schedule: the first
    micro-batch takes stages - 1 slots to reach the last stage and the last one as long to
    drain, so accumulation / (accumulation + stages - 1) (1.0 without a pipeline)."""
    return accumulation / (accumulation + stages - 1)


def accumulation_for_efficiency(stages: int, target: float) -> int:
    """The fewest accumulation steps whose pipeline efficiency reaches `target`."""
    m = math.ceil(target * (stages - 1) / (1 - target) - 1e-9)
    return max(1, m)


# Below this, the start of a pipelined run suggests the split by declared layer costs.
STAGE_BALANCE_HINT = 0.9


def stage_balance(stage_costs: list[float]) -> float:
    """How evenly the stages share a micro-batch's work: every stage waits for the slowest one,
    so each computes sum / (stages x slowest) of the time at best (1.0: all equal)."""
    slowest = max(stage_costs)
    return sum(stage_costs) / (len(stage_costs) * slowest) if slowest > 0 else 1.0


def pipeline_summary(stages: int, accumulation: int, stage_costs: list[float] | None = None,
                     method: str | None = None) -> str:
    """The line printed at the start of a pipelined run: the 1F1B bubble's bound and, given each
    stage's summed layer cost (parallel/stages.stage_costs), what the split's balance leaves of it."""
    bubble = pipeline_efficiency(stages, accumulation)
    line = (f"pipeline: {stages} stages, {accumulation} micro-batches a step: each GPU computes at most "
            f"{bubble:.0%} of the time (1F1B: accumulation / (accumulation + stages - 1))")
    if stage_costs is None or stages < 2:
        return line
    balance = stage_balance(stage_costs)
    total = sum(stage_costs) or 1.0
    shares = " / ".join(f"{c / total:.0%}" for c in stage_costs)
    line += (f"; by the layers' declared costs the stages carry {shares} of the work, so about "
             f"{bubble * balance:.0%} (the slowest stage sets the pace)")
    if balance < STAGE_BALANCE_HINT and method != "cost":
        line += "; partition_method = 'cost' balances the costs"
    return line


def pipeline_warnings(path: Path, stages: int, accumulation: int) -> list[str]:
    """A pipeline of K stages needs many more than K micro-batches in flight to keep every stage
    busy: below PIPELINE_EFFICIENCY_WARNING, say so and which accumulation reaches it (allowed:
    memory or the samples per step may decide)."""
    k, m = stages, accumulation
    efficiency = pipeline_efficiency(k, m)
    if k > 1 and efficiency < PIPELINE_EFFICIENCY_WARNING:
        target = PIPELINE_EFFICIENCY_WARNING
        return [f"{path}: 'gradient_accumulation_steps' = {m} with 'pipeline_stages' = {k}: each GPU idles "
                f"{1 - efficiency:.0%} of each step (a pipeline fills and drains once a step: the idle share is "
                f"(stages - 1) / (accumulation + stages - 1)); set gradient_accumulation_steps to at least "
                f"{accumulation_for_efficiency(k, target)} for {target:.0%} busy (more is better)"]
    return []
