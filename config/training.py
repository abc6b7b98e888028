"""How long a run trains and how each step is taken (top-level keys of the training TOML), and
the [adapter], [optimizer], [ema] and [monitoring] tables: what training/ reads. Declared in config/ so that
config imports nothing above it; the train config (config/train_config.py) composes this section."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from config.schema import check, check_regex, key, positive

DType = Literal["float32", "bfloat16", "float16"]


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


@dataclass
class AdapterConfig:
    # "lora", or LyCORIS' LoKr (Kronecker product) / LoHa (Hadamard product) through peft.
    type: Literal["lora", "lokr", "loha"] = "lora"
    rank: int = 16
    alpha: Optional[float] = None
    dropout: float = 0.0
    dtype: DType = "float32"
    target_modules: Optional[Union[str, list[str]]] = None
    # Regexes searched in module names: linear modules to add, targeted modules to leave out.
    target_include: list[str] = field(default_factory=list)
    target_exclude: list[str] = field(default_factory=list)
    init_from_existing: Optional[str] = None
    # LoRA+: lora_B's learning rate is this times optimizer.lr (training/optimizers.lora_plus_groups).
    lora_plus_ratio: Optional[float] = None
    # DoRA (peft's use_dora): a trained magnitude per output row besides the LoRA.
    use_dora: bool = False

    def validate(self, file, prefix):
        if self.lora_plus_ratio is not None:
            check(self.lora_plus_ratio > 0, file, key(prefix, "lora_plus_ratio"), "must be > 0")
        if self.type != "lora":
            # LoRA's own options: peft's LoKr and LoHa have no B matrix, magnitude or input dropout.
            for name, unset in (("lora_plus_ratio", self.lora_plus_ratio is None), ("use_dora", not self.use_dora),
                                ("dropout", self.dropout == 0.0)):
                check(unset, file, key(prefix, name), f"is a LoRA option; remove it with type = '{self.type}'")
        check(self.rank >= 1, file, key(prefix, "rank"), "must be at least 1")
        check(0.0 <= self.dropout < 1.0, file, key(prefix, "dropout"), "must be in [0, 1)")
        if self.alpha is None:
            self.alpha = float(self.rank)
        check(self.alpha > 0, file, key(prefix, "alpha"), "must be > 0")
        if self.target_modules is not None:
            check(len(self.target_modules) > 0, file, key(prefix, "target_modules"), "must not be empty")
            if isinstance(self.target_modules, str):
                check_regex(self.target_modules, file, key(prefix, "target_modules"))
        for name in ("target_include", "target_exclude"):
            for i, pattern in enumerate(getattr(self, name)):
                check_regex(pattern, file, f"{key(prefix, name)}[{i}]")


@dataclass
class OptimizerConfig:
    type: Literal["adamw", "adamw8bit", "adafactor"] = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    eps: float = 1e-8
    # Update bfloat16 weights in float32 and round the result stochastically (see training/optimizers.py).
    stochastic_rounding: bool = False

    def validate(self, file, prefix):
        check(self.lr > 0, file, key(prefix, "lr"), "must be > 0")
        check(self.eps > 0, file, key(prefix, "eps"), "must be > 0")
        check(all(0 <= b < 1 for b in self.betas), file, key(prefix, "betas"), "must be in [0, 1)")
        check(self.weight_decay >= 0, file, key(prefix, "weight_decay"), "must be >= 0")
        if self.type == "adamw8bit":
            missing = adamw8bit_missing()
            check(not missing, file, key(prefix, "type"), f"= 'adamw8bit' needs {missing} "
                  f"(bitsandbytes is optional: pip install bitsandbytes, on a CUDA machine)")


def adamw8bit_missing() -> str:
    """What 'adamw8bit' lacks here ('' when usable): bitsandbytes' 8-bit AdamW runs on CUDA GPUs only."""
    import torch  # only for this key: reading a config does not load torch

    lacking = []
    if importlib.util.find_spec("bitsandbytes") is None:
        lacking.append("the bitsandbytes package, which is not installed")
    if not torch.cuda.is_available():
        lacking.append("a CUDA GPU, and none is available")
    return " and ".join(lacking)


@dataclass
class MonitoringConfig:
    """Weights & Biases logging beside TensorBoard, with diffusion-pipe's key names."""

    enable_wandb: bool = False
    # Better left empty: `wandb login` or the WANDB_API_KEY environment variable keep it out of files.
    wandb_api_key: str = ""
    wandb_tracker_name: str = ""
    wandb_run_name: str = ""

    def validate(self, file, prefix):
        if self.enable_wandb:
            check(wandb_missing() == "", file, key(prefix, "enable_wandb"), wandb_missing())


def wandb_missing() -> str:
    """Why Weights & Biases logging cannot run here ('' when it can)."""
    if importlib.util.find_spec("wandb") is None:
        return ("= true needs the wandb package, which is not installed: pip install wandb "
                "(or set enable_wandb = false)")
    return ""


@dataclass
class EmaConfig:
    """An exponential moving average of the trained weights (training/ema.py)."""

    decay: float = 0.999
    update_every: int = 1
    device: Literal["gpu", "cpu"] = "gpu"
    # Also evaluate the averaged weights (eval/<name>/ema).
    eval: bool = False
    # Draw the [sample] pictures with the averaged weights instead of the trained ones.
    samples: bool = False

    def validate(self, file, prefix):
        check(0.0 < self.decay < 1.0, file, key(prefix, "decay"), "must be in (0, 1)")
        check(self.update_every >= 1, file, key(prefix, "update_every"), "must be at least 1")
