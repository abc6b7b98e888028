"""Optimizers and learning-rate schedules built from the config."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from transformers.optimization import Adafactor

from config.training import OptimizerConfig
from utils.seeding import stable_seed


class GradNormClipping:
    """Mixin for a torch optimizer: before each step, measure the global gradient norm (over all
    pipeline stages), clip to `max_grad_norm` and keep the norm in `_global_grad_norm`, where
    the trainer reads it (`last_step`).

    DeepSpeed clips too, but throws the norm away; doing it here lets us log it.

    A norm that is NaN or infinite skips the step, so the weights and the optimizer state stay
    as they were; `skipped_step` says so. The norm is summed over `norm_group`, which together
    holds every gradient once: the pipeline stages (the gradients are already averaged over the
    data-parallel replicas), or under ZeRO-1 every rank, each stepping its slice of its stage's
    weights. So every rank skips together.
    """

    max_grad_norm: float = 0.0
    norm_group = None  # the pipeline-parallel group: each stage holds a slice of the parameters
    skipped_step: bool = False  # whether the last step was skipped for a non-finite gradient

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        # One multi-tensor kernel per (device, dtype) group, not several launches per gradient:
        # a LoRA of FLUX.1 has about 1,500 of them.
        groups: dict[tuple, list[torch.Tensor]] = {}
        for g in grads:
            groups.setdefault((g.device, g.dtype), []).append(g)
        squared = torch.zeros((), dtype=torch.float32, device=device)
        for group in groups.values():
            norms = torch._foreach_norm(group, 2.0, dtype=torch.float32)
            squared += torch.stack(norms).to(device).square().sum()
        if self.norm_group is not None and dist.get_world_size(self.norm_group) > 1:
            dist.all_reduce(squared, group=self.norm_group)
        norm = squared.sqrt()
        self._global_grad_norm = norm.item()
        self.skipped_step = not math.isfinite(self._global_grad_norm)
        if self.skipped_step:
            return None  # one NaN would spread to every weight the step touches
        if self.max_grad_norm > 0:
            factor = self.max_grad_norm / (self._global_grad_norm + 1e-6)
            if factor < 1:
                for group in groups.values():
                    torch._foreach_mul_(group, factor)
        return super().step(closure)


def stochastic_round_to_bf16(value: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round float32 `value` to bfloat16, up or down with probability given by the distance to
    each neighbour, so the expected result is `value` itself (plain rounding would drop any
    change smaller than half a bfloat16 step).

    bfloat16 is the upper 16 bits of a float32: add 16 random bits to the low half of the bit
    pattern, then cut it off. The carry into the upper half happens with probability
    low_half / 2^16. On the magnitude bits of the sign-magnitude format this rounds |value|, so
    it is unbiased for negative numbers too; a carry into the exponent is the correct next step.
    """
    bits = value.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=generator)
    rounded = ((bits + noise) & -65536).view(torch.float32)  # -65536 == 0xFFFF0000
    # NaN payloads may sit in the low bits only; cutting them off would make an infinity.
    rounded = torch.where(torch.isnan(value), value.float(), rounded)
    return rounded.to(torch.bfloat16)  # exact: the low 16 bits are zero


class StochasticRounding:
    """Mixin for a torch optimizer: update bfloat16 parameters in float32 and round the result
    stochastically back into them (`stochastic_rounding = True`).

    For each slice of bfloat16 parameters (at most `chunk_elements` elements unless one
    parameter is larger), the parameter and its gradient are swapped for float32 copies, the
    base optimizer steps on that slice alone (so its state is float32 too), and the result is
    rounded into the bfloat16 weight. Only one slice's float32 copies exist at a time. The
    rounding noise is seeded by (seed, parameter name, step): runs are reproducible whatever
    the pipeline split, and a resumed run draws the noise the uninterrupted one would have.
    """

    stochastic_rounding: bool = False
    rounding_seed: int = 0
    param_names: dict[int, str] = {}  # id(parameter) -> name, for the noise seeds
    chunk_elements: int = 1 << 26

    @torch.no_grad()
    def step(self, closure=None):
        if not self.stochastic_rounding:
            return super().step(closure)
        loss = closure() if closure is not None else None
        groups = [group["params"] for group in self.param_groups]
        low = [[p for p in params if p.dtype == torch.bfloat16 and p.grad is not None] for params in groups]
        step = self.param_groups[0].get("rounding_step", 0)
        try:
            # Everything else (e.g. float32 LoRA weights) steps as usual, in one call.
            for group, params, bf16 in zip(self.param_groups, groups, low):
                ids = {id(p) for p in bf16}
                group["params"] = [p for p in params if id(p) not in ids]
            super().step()
            for index, bf16 in enumerate(low):
                for chunk in _chunks(bf16, self.chunk_elements):
                    for i, group in enumerate(self.param_groups):
                        group["params"] = chunk if i == index else []
                    with _in_float32(chunk, rounding=lambda p: self._noise(p, step)):
                        super().step()
        finally:
            for group, params in zip(self.param_groups, groups):
                group["params"] = params
        # Kept in the param groups, so checkpoints carry it.
        self.param_groups[0]["rounding_step"] = step + 1
        return loss

    def load_state_dict(self, state_dict):
        if not self.stochastic_rounding:
            return super().load_state_dict(state_dict)
        # torch casts loaded state to its parameter's dtype: with the bfloat16 parameters shown
        # as float32 the float32 state comes back exactly. Costs no more memory than the
        # gradients of a training step, which do not exist yet.
        low = [p for group in self.param_groups for p in group["params"] if p.dtype == torch.bfloat16]
        with _in_float32(low, rounding=None):
            super().load_state_dict(state_dict)

    def _noise(self, param, step: int) -> torch.Generator:
        seed = stable_seed(self.rounding_seed, self.param_names.get(id(param), ""), step)
        return torch.Generator(device=param.device).manual_seed(seed)


@contextlib.contextmanager
def _in_float32(params: list[torch.Tensor], rounding):
    """Show bfloat16 `params` (and their gradients) as float32 inside the block; afterwards
    round them back stochastically (`rounding(param)` gives the noise generator), or plainly
    when `rounding` is None (exact if nothing changed them)."""
    grads = [p.grad for p in params]
    for p, g in zip(params, grads):
        p.grad = None  # a parameter's gradient must match its dtype
        p.data = p.data.float()
        if g is not None:
            p.grad = g.float()
    try:
        yield
    finally:
        for p, g in zip(params, grads):
            p.grad = None
            p.data = p.data.to(torch.bfloat16) if rounding is None else stochastic_round_to_bf16(p.data, rounding(p))
            p.grad = g


def _chunks(params: list[torch.Tensor], limit: int):
    chunk, size = [], 0
    for p in params:
        if chunk and size + p.numel() > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += p.numel()
    if chunk:
        yield chunk


class ClippedAdamW(GradNormClipping, StochasticRounding, torch.optim.AdamW):
    pass


class ClippedAdafactor(GradNormClipping, StochasticRounding, Adafactor):
    pass


def _adamw8bit_class():
    # bitsandbytes is optional (CUDA only); the config check has made sure it is there.
    import bitsandbytes

    class ClippedAdamW8bit(GradNormClipping, StochasticRounding, bitsandbytes.optim.AdamW8bit):
        pass

    return ClippedAdamW8bit


def last_step(engine) -> tuple[float | None, bool]:
    """The gradient norm of the engine's last optimizer step and whether it was skipped, as our
    optimizer measured them (under ZeRO-1 DeepSpeed's wrapper around it does neither)."""
    optimizer = engine.basic_optimizer
    return getattr(optimizer, "_global_grad_norm", None), getattr(optimizer, "skipped_step", False)


def lora_plus_groups(params: list[torch.Tensor], names: dict[int, str], lr: float, ratio: float | None) -> list:
    """LoRA+ (Hayou, Ghosh and Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models",
    arXiv:2402.12354): the lora_B matrices learn `ratio` times faster than the rest, in a param
    group of their own. `names` maps id(parameter) to its name; None (the default) or 1 keeps
    one group, exactly as without LoRA+."""
    if ratio is None or ratio == 1:
        return params
    b = [p for p in params if ".lora_B." in names.get(id(p), "")]
    ids = {id(p) for p in b}
    return [{"params": [p for p in params if id(p) not in ids]}, {"params": b, "lr": lr * ratio}]


def build_optimizer(params, config: OptimizerConfig, max_grad_norm: float, norm_group,
                    param_names: dict[int, str] | None = None, seed: int = 0,
                    low_memory: bool = False) -> torch.optim.Optimizer:
    """AdamW, bitsandbytes' 8-bit AdamW (1 byte per state value) or Adafactor (factored second
    moments: far less optimizer memory), with gradient clipping and optional stochastic rounding.

    `param_names` (id(parameter) -> name) and `seed` seed the stochastic rounding. `low_memory`
    (full fine-tuning) steps AdamW one tensor at a time: its default multi-tensor path makes
    temporaries as large as all the weights together.
    """
    params = list(params)
    if config.type == "adamw":
        opt = ClippedAdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, eps=config.eps,
                           foreach=False if low_memory else None)
    elif config.type == "adamw8bit":
        opt = _adamw8bit_class()(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                                 eps=config.eps)
    else:
        opt = ClippedAdafactor(params, lr=config.lr, beta1=None, weight_decay=config.weight_decay,
                               scale_parameter=False, relative_step=False, warmup_init=False)
    opt.max_grad_norm = max_grad_norm
    opt.norm_group = norm_group
    opt.stochastic_rounding = config.stochastic_rounding
    opt.param_names = dict(param_names or {})
    opt.rounding_seed = seed
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
