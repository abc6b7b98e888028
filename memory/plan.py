"""The memory plan: the fastest memory-saving settings that the estimate says fit the GPU.

Three settings trade speed for memory: `activation_checkpointing`, `model.transformer_dtype =
"float8"` and `blocks_to_swap`. Those the config file does not set are chosen here, before any
weight loads, from memory/estimate.py's estimate of every pipeline stage against the GPU's memory
(or `memory_budget_gib`) less a headroom; those it sets are kept as they are. The order, fastest
first, follows docs/benchmarks.md: keeping every activation, then recomputing the layers
"selective" names, then all of them; float8 storage only after those (it costs some step time
eager and changes the numerics slightly); swapping blocks to CPU memory last, as few as fit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from memory.estimate import GIB, estimate
from utils.dist import Distributed
from utils.errors import ConfigError

# The share of the budget the estimate may not use: the estimate was within 5% of measured peaks
# on an H200 (docs/full_finetune.md), and the caching allocator's fragmentation comes on top.
HEADROOM = 0.10
# On a GPU without memory_budget_gib, what a process holds outside torch's allocator (nvidia-smi's
# peak less the allocator's reserve, FLUX.1 LoRA on H100s: docs/benchmarks.md, "Several GPUs, fourth run"):
# the CUDA context and libraries' workspaces, 1.7 GiB alone; NCCL's buffers add 2.2-3.2 GiB in a
# job of several processes.
CUDA_CONTEXT = int(1.75 * GIB)
NCCL_BUFFERS = int(3.25 * GIB)
LEVERS = ("activation_checkpointing", "model.transformer_dtype", "blocks_to_swap")


def g(size: int) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Plan:
    checkpointing: bool | str
    float8: bool
    blocks_to_swap: int

    def settings(self) -> str:
        ckpt = self.checkpointing if isinstance(self.checkpointing, str) else str(self.checkpointing).lower()
        ckpt = f'"{ckpt}"' if ckpt == "selective" else ckpt
        return (f"activation_checkpointing = {ckpt}, blocks_to_swap = {self.blocks_to_swap}"
                + (', transformer_dtype = "float8"' if self.float8 else ""))


def user_plan(config) -> Plan:
    """The plan the config's values (set or default) make."""
    return Plan(config.settings.activation_checkpointing, config.model.transformer_dtype == "float8",
                config.settings.blocks_to_swap)


def options(model, config) -> tuple[list, list[bool], bool]:
    """What each lever may take here: checkpointing modes, float8 or not, whether blocks may swap;
    a lever the config file sets takes only its value."""
    s, given = config.settings, config.given
    ckpt = [False] + (["selective"] if model.selective_checkpoint_layers else []) + [True]
    lora = s.adapter is not None
    # DoRA normalises the base weights, which float8 storage does not offer; it is for LoRA linears.
    float8 = [False, True] if lora and s.adapter.type == "lora" and not s.adapter.use_dora else [False]
    swap = lora and s.pipeline_stages == 1
    if "activation_checkpointing" in given:
        ckpt = [s.activation_checkpointing]
    if "model.transformer_dtype" in given:
        float8 = [config.model.transformer_dtype == "float8"]
    if "blocks_to_swap" in given:
        swap = False
    return ckpt, float8, swap


def ordered(model, config) -> list[Plan]:
    """Every plan the levers allow without swapping, fastest first: each checkpointing mode
    without float8, then with it. Compiled without float8_matmul, float8 storage without
    checkpointing is left out: the compiled graph kept a dequantized copy of the weights for the
    backward and used more memory than bfloat16 (docs/benchmarks.md), which the estimate does not
    model."""
    ckpt, float8, _ = options(model, config)
    s = config.settings
    swap = s.blocks_to_swap if "blocks_to_swap" in config.given else 0
    plans = [Plan(c, f8, swap) for f8 in (False, True) if f8 in float8 for c in ckpt]
    if s.compile and not config.model.float8_matmul:
        plans = [p for p in plans if p.checkpointing or not p.float8] or plans
    return plans


def with_plan(config, plan: Plan):
    """A copy of `config` with the plan's settings."""
    dtype = "float8" if plan.float8 else (None if config.model.transformer_dtype == "float8" else
                                          config.model.transformer_dtype)
    settings = dataclasses.replace(config.settings, activation_checkpointing=plan.checkpointing,
                                   blocks_to_swap=plan.blocks_to_swap)
    return dataclasses.replace(config, settings=settings, model=dataclasses.replace(config.model, transformer_dtype=dtype))


def peak(model, layers, parts, config, plan: Plan, tokens, hidden, replicas: int = 1) -> int:
    """The estimated peak of the fullest stage under `plan`."""
    return max(e.total for e in estimate(model, layers, parts, with_plan(config, plan), tokens, hidden,
                                        replicas=replicas))


def choose(model, layers, parts, config, tokens, hidden, budget: int, partition,
           replicas: int = 1) -> tuple[Plan, list[tuple[Plan, int]]]:
    """The fastest plan whose fullest stage fits `budget` less the headroom, and the faster plans
    tried with their peaks; a ConfigError naming what would fit when none does. `partition(k)`:
    the stage boundaries with k stages (for that error's suggestions)."""
    usable = int(budget * (1 - HEADROOM))
    n_blocks = max(len(layers) - 2, 0)
    tried = []
    for plan in ordered(model, config):
        need = peak(model, layers, parts, config, plan, tokens, hidden, replicas)
        if need <= usable:
            return plan, tried
        tried.append((plan, need))
    if options(model, config)[2] and n_blocks:
        # The leanest plan without swapping, then the fewest swapped blocks that fit (memory only
        # falls as more blocks swap, so bisect).
        lean = min(tried, key=lambda t: t[1])[0]
        fits = lambda n: peak(model, layers, parts, config, dataclasses.replace(lean, blocks_to_swap=n),  # noqa: E731
                              tokens, hidden, replicas) <= usable
        if fits(n_blocks):
            low, high = 1, n_blocks
            while low < high:
                mid = (low + high) // 2
                low, high = (low, mid) if fits(mid) else (mid + 1, high)
            return dataclasses.replace(lean, blocks_to_swap=low), tried
        full = dataclasses.replace(lean, blocks_to_swap=n_blocks)
        tried.append((full, peak(model, layers, parts, config, full, tokens, hidden, replicas)))
    raise ConfigError(f"{config.file}: "
                      f"{no_fit(model, layers, config, tokens, hidden, budget, tried, partition, replicas)}")


def no_fit(model, layers, config, tokens, hidden, budget: int, tried: list[tuple[Plan, int]], partition,
           replicas: int = 1) -> str:
    """The one line for a run that fits no plan: the leanest tried, and what would fit."""
    s = config.settings
    leanest, need = min(tried, key=lambda t: t[1])
    usable = int(budget * (1 - HEADROOM))
    hints = []
    given = sorted(config.given & set(LEVERS))
    if given:  # would the plan find one with every lever free?
        try:
            plan, _ = choose(model, layers, partition(s.pipeline_stages), dataclasses.replace(config, given=frozenset()),
                             tokens, hidden, budget, partition, replicas)
            hints.append(f"{plan.settings()} (leave {', '.join(given)} unset and the plan chooses)")
        except ConfigError:
            pass
    for stages in (2, 4, 8):
        if s.pipeline_stages < stages <= len(layers):
            staged = dataclasses.replace(config, settings=dataclasses.replace(s, pipeline_stages=stages))
            if peak(model, layers, partition(stages), staged, dataclasses.replace(leanest, blocks_to_swap=0),
                    tokens, hidden) <= usable:
                hints.append(f"pipeline_stages = {stages} (a multiple of {stages} GPUs)")
                break
    if s.micro_batch_size_per_gpu > 1:
        small = dataclasses.replace(config, settings=dataclasses.replace(s, micro_batch_size_per_gpu=1))
        if peak(model, layers, partition(s.pipeline_stages), small, leanest, tokens, hidden, replicas) <= usable:
            hints.append("micro_batch_size_per_gpu = 1")
    return (f"memory plan: the fullest pipeline stage needs about {g(need)} even with {leanest.settings()}, more "
            f"than the {g(usable)} it may use ({100 - round(HEADROOM * 100)}% of {g(budget)} per GPU); what would "
            f"fit: " + (" or ".join(hints) if hints else "a GPU with more memory, more pipeline_stages or smaller samples"))


def outside_allocator(processes: int) -> int:
    """Bytes a training process on a GPU holds outside torch's allocator, in a job of `processes`."""
    return CUDA_CONTEXT + (NCCL_BUFFERS if processes > 1 else 0)


def device_budget(config, place: Distributed) -> int | None:
    """Bytes each GPU offers the plan: `memory_budget_gib`, else the GPU's memory less what the
    process holds outside torch's allocator (outside_allocator); the smallest over all ranks (they
    must choose alike); None on CPU without the key."""
    s, device = config.settings, place.device
    if s.memory_budget_gib is not None:
        budget = int(s.memory_budget_gib * GIB)
        if device.type == "cuda":
            # Make the pretended size real, so that a run that does not fit fails rather than
            # passing on a larger card.
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    elif device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory - outside_allocator(place.world)
    else:
        budget = -1
    smallest = place.min_over_ranks(budget if budget >= 0 else 2**62)
    budget = smallest if smallest < 2**62 else -1
    return budget if budget >= 0 else None


def plan_memory(model, layers, parts, config, tokens, hidden, budget: int | None, partition,
                replicas: int = 1) -> str:
    """Choose and apply (in place) the plan for the levers the config leaves unset; returns the
    line that says what was chosen and why."""
    given = sorted(config.given & set(LEVERS))
    kept = f" (kept as set: {', '.join(given)})" if given else ""
    if budget is None:
        return (f"memory plan: none (no GPU and no memory_budget_gib): {user_plan(config).settings()}{kept}")
    if len(given) == len(LEVERS):
        return f"memory plan: all of {', '.join(LEVERS)} are set in the config; nothing to choose"
    plan, tried = choose(model, layers, parts, config, tokens, hidden, budget, partition, replicas)
    need = peak(model, layers, parts, config, plan, tokens, hidden, replicas)
    s, m = config.settings, config.model
    s.activation_checkpointing, s.blocks_to_swap = plan.checkpointing, plan.blocks_to_swap
    if plan.float8:
        m.transformer_dtype = "float8"
    several = replicas * s.pipeline_stages > 1
    source = ("memory_budget_gib" if s.memory_budget_gib is not None
              else "the GPU's memory less the CUDA context" + (" and NCCL's buffers" if several else ""))
    faster = "; ".join(f"{p.settings()}: {g(n)}" for p, n in tried)
    return (f"memory plan for {g(budget)} per GPU ({source}; plans fit {g(int(budget * (1 - HEADROOM)))}, "
            f"{100 - round(HEADROOM * 100)}%): {plan.settings()}, about {g(need)} at the fullest stage{kept}"
            + (f"; faster plans need more: {faster}" if faster else "; the fastest plan"))
