"""The parallel layout's top-level keys of the training TOML, read by parallel/ (stages, the
DeepSpeed engine, compile and attention set-up). Declared in config/ so that config imports
nothing above it; the train config (config/train_config.py) composes this section with the others."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from config.schema import check, check_regex, positive


@dataclass(kw_only=True)
class ParallelSettings:
    pipeline_stages: int = 1
    partition_method: str = "parameters"
    # 1: DeepSpeed's ZeRO stage 1, the optimizer state sharded over the data-parallel replicas.
    zero_stage: int = 0
    # torch.compile every pipeline layer (models/pipeline_layers.PipelineLayer.compile_run).
    # None: on where the stage runs on a CUDA GPU and a tiny compiled call checks out there
    # (parallel/engine.resolve_compile), off on CPU.
    compile: Optional[bool] = None
    # A diffusers attention backend for the transformer (ModelMixin.set_attention_backend), e.g.
    # "_native_cudnn"; None: torch's scaled-dot-product attention without cuDNN (parallel/launch.py).
    attention_backend: Optional[str] = None

    def validate(self, file, prefix):
        positive(self, file, ["pipeline_stages"])
        check(self.zero_stage in (0, 1), file, "zero_stage",
              f"must be 0 or 1, got {self.zero_stage}: stages 2 and 3 shard gradients and weights, which "
              f"DeepSpeed's pipeline engine does not support")
        check(self.partition_method in ("blocks", "parameters", "uniform")
              or self.partition_method.startswith("type:"),
              file, "partition_method", "must be 'blocks', 'parameters', 'uniform' or 'type:<regex>'")
        if self.partition_method.startswith("type:"):
            check_regex(self.partition_method.removeprefix("type:"), file, "partition_method")
        if self.attention_backend is not None:
            # only for this key: reading a config does not load diffusers
            from diffusers.models.attention_dispatch import AttentionBackendName

            known = [b.value for b in AttentionBackendName]
            check(self.attention_backend in known, file, "attention_backend",
                  f"= '{self.attention_backend}' is not a diffusers attention backend; one of: {', '.join(known)}")
