"""Optimizers and learning-rate schedules built from the config."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from transformers.optimization import Adafactor

from utils.config import OptimizerConfig


class GradNormClipping:
    """Mixin for a torch optimizer: before each step, measure the global gradient norm (over all
    pipeline stages), clip to `max_grad_norm` and keep the norm in `_global_grad_norm`, where
    DeepSpeed's engine reads it for `get_global_grad_norm()`.

    DeepSpeed clips too, but throws the norm away; doing it here lets us log it.
    """

    max_grad_norm: float = 0.0
    norm_group = None  # the pipeline-parallel group: each stage holds a slice of the parameters

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        squared = torch.zeros((), dtype=torch.float32, device=device)
        for g in grads:
            squared += g.detach().float().pow(2).sum()
        if self.norm_group is not None and dist.get_world_size(self.norm_group) > 1:
            dist.all_reduce(squared, group=self.norm_group)
        norm = squared.sqrt()
        self._global_grad_norm = norm.item()
        if self.max_grad_norm > 0 and math.isfinite(self._global_grad_norm):
            factor = self.max_grad_norm / (self._global_grad_norm + 1e-6)
            if factor < 1:
                for g in grads:
                    g.mul_(factor)
        return super().step(closure)


class ClippedAdamW(GradNormClipping, torch.optim.AdamW):
    pass


class ClippedAdafactor(GradNormClipping, Adafactor):
    pass


def build_optimizer(params, config: OptimizerConfig, max_grad_norm: float, norm_group) -> torch.optim.Optimizer:
    """AdamW, or Adafactor (factored second moments: far less optimizer memory)."""
    params = list(params)
    if config.type == "adamw":
        opt = ClippedAdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, eps=config.eps)
    else:
        opt = ClippedAdafactor(params, lr=config.lr, beta1=None, weight_decay=config.weight_decay,
                               scale_parameter=False, relative_step=False, warmup_init=False)
    opt.max_grad_norm = max_grad_norm
    opt.norm_group = norm_group
    return opt


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the base learning rate at each step: linear warm-up, then the schedule."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup_steps, total_steps))
