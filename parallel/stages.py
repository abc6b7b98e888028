"""The pipeline split: the topology, the partition of the layer list (which DeepSpeed's
PipelineModule is given: parallel/engine.PartitionedPipelineModule), and the local stage's weights.

The transformer is built on the meta device and only the local stage's layers get real
weights, so host memory does not grow with the number of GPUs.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
from peft.tuners.tuners_utils import BaseTunerLayer

from config.train_config import TrainConfig
from memory.block_swap import block_layer_indices, swapped_layer_indices
from memory.float8 import quantize_lora_base_layers
from training.lora import add_lora, init_lora, load_lora_into
from training.weights import load_weights, make_trainable
from utils.dist import Distributed
from utils.dtypes import DTYPES
from utils.errors import ConfigError


def make_topology(world_size: int, stages: int, config_file) -> PipeDataParallelTopology:
    if world_size % stages != 0:
        raise ConfigError(f"{config_file}: 'pipeline_stages' = {stages} does not divide the number of GPUs "
                          f"({world_size}); use a GPU count that is a multiple of it")
    return PipeDataParallelTopology(num_pp=stages, num_dp=world_size // stages)


def resolve_partition_method(method: str | None, layers, full_finetune: bool) -> str:
    """`partition_method` as DeepSpeed's PipelineModule takes it.

    Unset: "cost" for an adapter on a model whose layers declare their costs (its stages hold
    little memory, so their time is what to balance); otherwise "parameters", which for full
    fine-tuning balances what decides the fit, each stage's weights and optimizer state. "blocks"
    puts the same number of transformer blocks on every stage (the input and output layers count
    as nothing).
    """
    if method is None:
        declared = any(layer.cost is not None for layer in layers)
        return "cost" if declared and not full_finetune else "parameters"
    if method == "blocks":
        names = dict.fromkeys(layers[i].__class__.__name__ for i in block_layer_indices(layers))
        return "type:^(" + "|".join(re.escape(n) for n in names) + ")$"
    return method


def layer_cost(layer) -> float:
    """A layer's relative training time: its class's `cost`, else 1 for a block, 0 otherwise."""
    if layer.cost is not None:
        return layer.cost
    return 1.0 if layer.kind == "block" else 0.0


def partition(layers, stages: int, method: str) -> list[int]:
    """Stage boundaries for `method`: parameters, uniform and type:regex as DeepSpeed computes them,
    "cost" balancing the layers' declared training times (`layer_cost`)."""
    if method == "uniform":
        return ds_utils.partition_uniform(num_items=len(layers), num_parts=stages)
    if method == "parameters":
        weights = [sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in layers]
    elif method == "cost":
        weights = [layer_cost(layer) for layer in layers]
    else:
        pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        weights = [1 if pattern.search(layer.__class__.__name__) else 0 for layer in layers]
    return ds_utils.partition_balanced(weights=weights, num_parts=stages)


def stage_costs(layers, parts: list[int]) -> list[float]:
    """Each stage's summed `layer_cost`: its share of a micro-batch's training time, as far as the
    declared costs know it."""
    return [sum(layer_cost(layer) for layer in layers[a:b]) for a, b in zip(parts, parts[1:])]


def describe_partition(layers, parts: list[int]) -> str:
    """Which layers each stage holds, with parameter counts (the memory estimate follows it; the
    parameters are still on the meta device here, in no meaningful dtype)."""
    lines = []
    for stage in range(len(parts) - 1):
        chunk = layers[parts[stage]:parts[stage + 1]]
        params = [p for layer in chunk for p in layer.parameters()]
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        names = [f"{parts[stage] + i}:{layer.__class__.__name__}({', '.join(layer.module_names)})"
                 for i, layer in enumerate(chunk)]
        if len(names) > 6:
            names = names[:3] + ["..."] + names[-2:]
        lines.append(f"stage {stage}: layers {parts[stage]}-{parts[stage + 1] - 1}, {total / 1e6:.2f}M params "
                     f"({trainable / 1e6:.3f}M trainable): {' '.join(names)}")
    return "\n".join(lines)


def describe_targets(transformer) -> str:
    """The modules that carry an adapter, compactly: names that differ only in their first block
    index share a line, "transformer_blocks.{0-18}: attn.to_q, attn.to_k, ...", per set of names."""
    names = [n for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer)]
    groups: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    per_block: dict[tuple[str, int], list[str]] = {}
    alone = []
    for name in names:
        match = re.match(r"^(.*?)\.(\d+)\.(.+)$", name)
        if match:
            per_block.setdefault((match.group(1), int(match.group(2))), []).append(match.group(3))
        else:
            alone.append(name)
    for (stem, index), rests in per_block.items():
        groups.setdefault((stem, tuple(rests)), []).append(index)
    lines = [f"adapter on {len(names)} modules:"]
    for (stem, rests), indices in groups.items():
        lines.append(f"  {stem}.{{{_ranges(indices)}}}: {', '.join(rests)}")
    if alone:
        lines.append(f"  {', '.join(alone)}")
    return "\n".join(lines)


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    parts, start = [], None
    numbers = sorted(numbers)
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(str(n) if n == start else f"{start}-{n}")
            start = None
    return ",".join(parts)


def plan_stages(model, config: TrainConfig):
    """The transformer on the meta device, set up for LoRA or full fine-tuning, as pipeline layers
    and their stage boundaries: (transformer, layers, parts)."""
    transformer = model.build_empty_transformer()
    if config.full_finetune:
        # Before partitioning: "parameters" balances the trainable parameters, here all of them.
        transformer.requires_grad_(True)
    else:
        add_lora(model, transformer, config.settings.adapter)
    layers = model.pipeline_layers(transformer)
    method = resolve_partition_method(config.settings.partition_method, layers, config.full_finetune)
    names = list(dict.fromkeys(layer.__class__.__name__ for layer in layers))
    if method.startswith("type:") and not any(re.search(method[5:], n, re.IGNORECASE) for n in names):
        # DeepSpeed would refuse it too, but only once the weights are loaded.
        raise ConfigError(f"{config.file}: 'partition_method' = '{method}' matches none of the {model.name} "
                          f"layer classes ({', '.join(names)})")
    return transformer, layers, partition(layers, config.settings.pipeline_stages, method)


def load_stage(model, config: TrainConfig, transformer, layers, parts: list[int], stage: int,
               device: torch.device) -> None:
    """Materialise pipeline stage `stage`: its base weights, then its LoRA or, with full
    fine-tuning, the base weights made trainable in the trained dtype. Layers then register the
    loaded objects of the transformer's own parameters they hold (`bind_root_parameters`)."""
    s = config.settings
    local_names = [n for layer in layers[parts[stage]:parts[stage + 1]] for n in layer.module_names]
    # blocks_to_swap: the swapped blocks' base weights go to CPU memory straight from disk, so the
    # device never holds all of them (BlockSwap takes them from there).
    swapped = {n for i in swapped_layer_indices(layers, s.blocks_to_swap, config.file) for n in layers[i].module_names}
    load_weights(model, transformer, [n for n in local_names if n not in swapped], device)
    if swapped:
        load_weights(model, transformer, [n for n in local_names if n in swapped], torch.device("cpu"))
    if config.full_finetune:
        make_trainable(transformer, DTYPES[config.trained_dtype])
    else:
        init_lora(transformer, local_names, s.adapter, device, s.seed)
        if s.adapter.init_from_existing:
            load_lora_into(model, transformer, Path(s.adapter.init_from_existing), s.adapter)
        if config.model.transformer_dtype == "float8":
            blocks = set(block_layer_indices(layers))
            block_modules = [transformer.get_submodule(n) for i in range(parts[stage], parts[stage + 1])
                             if i in blocks for n in layers[i].module_names]
            quantize_lora_base_layers(block_modules, model.dtype, config.model.float8_matmul)
    if s.attention_backend is not None:
        apply_attention_backend(transformer, s.attention_backend, device, model.dtype, config.file)
    for layer in layers:
        layer.bind_root_parameters(transformer)


# The attention backend used when `attention_backend` is not set and its probe passes on the GPU:
# cuDNN's kernel, about twice flash attention's rate, and it takes masks (docs/benchmarks.md).
DEFAULT_ATTENTION_BACKEND = "_native_cudnn"
CPU = torch.device("cpu")


def attention_probe(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when diffusers' attention backend `name` runs a tiny attention forward and backward on
    `device`, without a mask and with a key mask (as HunyuanVideo and LTX-Video pass one), and
    matches torch's math kernel in float32 to `dtype`'s round-off; otherwise why not, in one line."""
    generator = torch.Generator().manual_seed(0)
    # (batch, tokens, heads, head dim), as the models' attention processors call it. 192 tokens:
    # a length of 64 mod 128, where cuDNN's masked backward is known to have failed (pytorch/pytorch#196678).
    q, k, v = (torch.randn(2, 192, 2, 64, generator=generator) for _ in range(3))
    mask = torch.ones(2, 1, 1, 192, dtype=torch.bool)
    mask[1, ..., 150:] = False  # the second sample's last keys are padding
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for attn_mask in (None, mask):
        results = []
        for backend, run_dtype, run_device in ((name, dtype, device), ("_native_math", torch.float32, CPU)):
            leaves = [t.to(run_device, run_dtype, copy=True).requires_grad_(True) for t in (q, k, v)]
            try:
                out = dispatch_attention_fn(*leaves, attn_mask=None if attn_mask is None else attn_mask.to(run_device),
                                            backend=AttentionBackendName(backend))
                out.float().square().sum().backward()
            # A backend fails in many ways (no kernel for this GPU, dtype or shape; a missing
            # package; a cuDNN or driver error), each its own exception type: any means "not here".
            except Exception as e:  # noqa: BLE001
                return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            results.append([t.detach().float().cpu() for t in (out, *(leaf.grad for leaf in leaves))])
        for what, got, expected in zip(("output", "query gradient", "key gradient", "value gradient"), *results):
            error = (got - expected).abs().max().item()
            if not error <= tolerance * max(1.0, expected.abs().max().item()):  # NaN fails too
                return (f"its {what} differs from the math kernel's by {error:.3g}"
                        + (" with a key mask" if attn_mask is not None else ""))
    return None


def resolve_attention_backend(config: TrainConfig, place: Distributed, dtype: torch.dtype, log=print) -> TrainConfig:
    """`config` with `attention_backend` decided: as set, or (not set) DEFAULT_ATTENTION_BACKEND on
    a CUDA GPU where its probe passes, with one line saying which and why; on CPU torch's default."""
    s = config.settings
    if s.attention_backend is not None or place.device.type != "cuda":
        return config
    failure = attention_probe(DEFAULT_ATTENTION_BACKEND, place.device, dtype)
    if failure:
        log(f"attention: torch's default kernels on rank {place.rank}; cuDNN's ({DEFAULT_ATTENTION_BACKEND}) failed "
            f"its probe: {failure}")
        return config
    if place.is_main:
        log("attention: cuDNN's kernel (the default on a CUDA GPU where it checks out; attention_backend = "
            "\"native\" turns it off)")
    return dataclasses.replace(config, settings=dataclasses.replace(s, attention_backend=DEFAULT_ATTENTION_BACKEND))


def apply_attention_backend(transformer, name: str, device: torch.device, dtype: torch.dtype, config_file) -> None:
    """Run the transformer's attention through the diffusers backend `name`, after one tiny
    attention call through it on `device`: a backend that cannot run here (its package missing,
    a GPU kernel on the CPU, a dtype it does not take) is a config error naming the key, not a
    traceback at the first step."""
    try:
        transformer.set_attention_backend(name)
        # (batch, tokens, heads, head dim), as the models' attention processors call it
        probe = torch.randn(1, 128, 2, 64, device=device, dtype=dtype)
        dispatch_attention_fn(probe, probe, probe, backend=AttentionBackendName(name))
    except (RuntimeError, ImportError, ValueError, TypeError) as e:
        transformer.set_attention_backend("native")  # diffusers also keeps the choice process-wide
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{config_file}: 'attention_backend' = '{name}' cannot run on this {device.type} device "
                          f"with {str(dtype).removeprefix('torch.')}: {reason}") from None
