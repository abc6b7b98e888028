"""The DeepSpeed pipeline engine: the local stage planned and loaded (parallel/stages.py), the
memory plan and levers applied, the optimizer built, then PipelineModule and deepspeed.initialize.
"""

from __future__ import annotations

import dataclasses
import functools

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.module import PipelineModule
from torch.utils.checkpoint import checkpoint

from config.parallel import pipeline_summary
from config.train_config import TrainConfig
from memory.block_swap import attach_block_swap
from memory.checkpointing import checkpointing_args, recomputes_inside_graph
from memory.estimate import ZERO_BUCKET_ELEMENTS, describe, estimate
from memory.plan import device_budget, plan_memory
from parallel.stages import (describe_partition, describe_targets, load_stage, make_topology, partition, plan_stages,
                             resolve_partition_method, stage_costs)
from training.objective import loss
from training.optimizers import build_optimizer, build_scheduler, lora_plus_groups
from utils.dist import Distributed
from utils.errors import ConfigError


def build_engine(model, config: TrainConfig, place: Distributed, total_steps: int, log=print,
                 tokens: int | None = None):
    """Build the local stage, the optimizer and the DeepSpeed pipeline engine.

    Without an [adapter] table the whole transformer trains (full fine-tuning): the local
    stage's weights in `config.trained_dtype`, all of them in the optimizer. `tokens`, the most
    tokens one training sample gives, sizes the activations in the printed memory estimate.
    """
    s = config.settings
    full = config.full_finetune
    topology = make_topology(place.world, s.pipeline_stages, config.file)
    transformer, layers, parts = plan_stages(model, config)
    if full:
        # DeepSpeed averages gradients over replicas and checkpoints only the parameters of the
        # layer modules: a weight a layer reaches some other way would silently not train.
        owned = {id(p) for layer in layers for p in layer.parameters()}
        outside = [n for n, p in transformer.named_parameters() if id(p) not in owned]
        if outside:
            raise ConfigError(f"{config.file}: full fine-tuning (no [adapter] table) is not available for model "
                              f"type '{model.name}': its weights {outside[:3]} are not parameters of its pipeline "
                              f"layers; train a LoRA instead")
    stage = topology.get_coord(place.rank).pipe
    replicas = place.world // s.pipeline_stages
    method = resolve_partition_method(s.partition_method, layers, full)
    # Every rank chooses (alike: the smallest GPU's budget), before any weight loads.
    plan = plan_memory(model, layers, parts, config, tokens, model.hidden_size(transformer),
                       device_budget(config, place), lambda stages: partition(layers, stages, method), replicas)
    if place.is_main:
        if s.pipeline_stages > 1:
            log(pipeline_summary(s.pipeline_stages, s.gradient_accumulation_steps, stage_costs(layers, parts), method))
        log(describe_partition(layers, parts))
        log(plan)
        if not full:
            log(describe_targets(transformer))
        sample_tokens = max((model.tokens_per_sample(r.width, r.height, r.frames) or 0 for r in config.samples),
                            default=0) or None
        estimates = estimate(model, layers, parts, config, tokens, model.hidden_size(transformer),
                             sample_tokens=sample_tokens, replicas=replicas)
        device = place.device
        device_total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        log(describe(estimates, config, tokens, device_total, replicas))
        if full and config.trained_dtype == "bfloat16" and not s.optimizer.stochastic_rounding and not s.zero_stage:
            log("WARNING: full fine-tuning bfloat16 weights with plain rounding loses every update smaller "
                "than half a bfloat16 step (about 0.4% of the weight); set [optimizer] stochastic_rounding = true, "
                "full_finetune_dtype = 'float32', or with several replicas zero_stage = 1")
    for boundary in parts[1:-1]:
        layers[boundary - 1].ends_stage = True  # its outputs cross to the next stage
    load_stage(model, config, transformer, layers, parts, stage, place.device)
    attach_block_swap(model, config, transformer, layers, place.device)
    if s.compile:
        compile_layers(layers[parts[stage]:parts[stage + 1]], lambda layer: recomputes_inside_graph(layer, s, model))

    pipe = PartitionedPipelineModule(
        parts, layers=layers, loss_fn=functools.partial(loss, model), topology=topology,
        **checkpointing_args(s, model, layers),
        # non-reentrant checkpointing: several tensors flow between layers, some without grad
        activation_checkpoint_func=functools.partial(checkpoint, use_reentrant=False),
        dynamic_shape=True)  # buckets give micro-batches of different shapes

    trainable = [p for p in pipe.parameters() if p.requires_grad]
    names = {id(p): n for n, p in transformer.named_parameters()}
    if not full:
        trainable = lora_plus_groups(trainable, names, s.optimizer.lr, s.adapter.lora_plus_ratio)
    # The gradient norm sums over what each rank steps: its stage's weights, or under ZeRO its
    # replica's slice of them, so then over every rank of the job.
    norm_group = dist.group.WORLD if s.zero_stage else pipe.mpu().get_pipe_parallel_group()
    optimizer = build_optimizer(trainable, s.optimizer, s.gradient_clipping, norm_group,
                                param_names=names, seed=s.seed, low_memory=full)
    scheduler = build_scheduler(optimizer, s.lr_scheduler, s.warmup_steps, total_steps)
    engine = start_engine(pipe, optimizer, scheduler, s.micro_batch_size_per_gpu, s.gradient_accumulation_steps,
                          s.zero_stage)
    return engine, transformer


class PartitionedPipelineModule(PipelineModule):
    """DeepSpeed's PipelineModule on the stage boundaries `parts` computed by parallel/stages.py
    (which the memory plan read), so that partition methods DeepSpeed lacks ("cost") apply too."""

    def __init__(self, parts: list[int], **kwargs):
        self._given_parts = [int(p) for p in parts]  # read by _partition_layers during __init__
        super().__init__(**kwargs)

    def _partition_layers(self, method="uniform"):
        if len(self._given_parts) != self.num_stages + 1 or self._given_parts[-1] != len(self._layer_specs):
            raise ValueError(f"stage boundaries {self._given_parts} do not fit {self.num_stages} stages "
                             f"of {len(self._layer_specs)} layers")
        self.parts = self._given_parts
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


# Compiled variants allowed per layer function (compile_layers says why): enough for every kind
# sharing one function, each with and without gradients, static and dynamic shapes.
COMPILED_VARIANTS_LIMIT = 64


def compile_probe(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when a tiny compiled layer (linear, layer norm, GELU) runs forward and backward on
    `device` and matches eager to `dtype`'s round-off; otherwise the reason, in one line."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 64, generator=generator).to(device, dtype)
    x = torch.randn(8, 64, generator=generator).to(device, dtype)

    def layer(x):
        return torch.nn.functional.gelu(torch.nn.functional.layer_norm(x @ weight, (64,)))

    try:
        results = []
        for fn in (layer, torch.compile(layer)):
            leaf = x.clone().requires_grad_(True)
            out = fn(leaf)
            out.float().square().sum().backward()
            results += [out.float(), leaf.grad.float()]
    # The compiler stack fails in many ways (a missing Triton or C++ compiler, a GPU or driver
    # Triton does not support, a backend bug), each its own exception type: any of them means eager.
    except Exception as e:  # noqa: BLE001
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for eager, compiled in ((results[0], results[2]), (results[1], results[3])):
        if not torch.allclose(eager, compiled, atol=tolerance, rtol=tolerance):
            return f"compiled and eager results differ by {(eager - compiled).abs().max().item():.3g}"
    return None


def resolve_compile(config: TrainConfig, place: Distributed, dtype: torch.dtype, log=print) -> TrainConfig:
    """`config` with `compile` decided: as set, or (not set) on for a CUDA GPU whose compile probe
    passes, with one line saying which and why; off on CPU, where compiling costs more than it saves."""
    s = config.settings
    if s.compile is not None:
        return config
    failure = compile_probe(place.device, dtype) if place.device.type == "cuda" else "no CUDA GPU"
    if failure and place.device.type == "cuda":
        log(f"compile: off on rank {place.rank}, its probe failed ({failure}); set compile = false to skip the "
            f"probe, or compile = true to compile anyway")
    elif not failure and place.is_main:
        log("compile: on (the default on a CUDA GPU; compile = false turns it off)")
    return dataclasses.replace(config, settings=dataclasses.replace(s, compile=failure is None))


def compile_layers(layers, recompute=lambda layer: False) -> None:
    """`compile = true`: every given layer runs its `run` through torch.compile; those for which
    `recompute(layer)` is true with their activation checkpointing inside the compiled graph."""
    # DeepSpeed's pipeline engine runs one backward per stage output, with retain_graph for all
    # but the last; compiled graphs that donate their saved buffers to the backward refuse that.
    # A process-wide torch setting, read when each backward runs.
    torch._functorch.config.donated_buffer = False
    # Blocks of a kind share their compiled graphs (their `run` is one function), but each kind
    # has a few variants (its first block's input needs no gradient, a sliced input's strides,
    # every bucket shape compiled dynamic once, evaluation without gradients), and one function
    # can serve several kinds (FluxBlockLayer.run: double and single blocks). Past Dynamo's
    # default limit of 8 per function the rest would run eagerly without a word.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_VARIANTS_LIMIT)
    for layer in layers:
        layer.compile_run(recompute(layer))


def start_engine(pipe: PipelineModule, optimizer, scheduler, micro_batch_size: int, accumulation: int,
                 zero_stage: int = 0):
    """DeepSpeed's pipeline engine around `pipe`, configured the one way we use it."""
    ds_config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        # DeepSpeed clips by default (1.0) and throws the norm away; our optimizer wrapper
        # clips once and records the norm.
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,  # we print our own progress
        "wall_clock_breakdown": False,
    }
    if zero_stage:
        ds_config["zero_optimization"] = {
            "stage": zero_stage,
            # Under a pipeline, DeepSpeed's ZeRO norm counts only the first stage's gradients (it
            # counts a parameter once per model-parallel group, and takes the stages for one);
            # our optimizer measures the norm over every rank's slice instead.
            "compute_grad_norm": False,
            "reduce_bucket_size": ZERO_BUCKET_ELEMENTS,
            "allgather_bucket_size": ZERO_BUCKET_ELEMENTS,
        }
        # Our AdamW subclass: an elementwise update, so stepping flat slices of the weights is exact.
        ds_config["zero_allow_untested_optimizer"] = True
    engine, _, _, _ = deepspeed.initialize(model=pipe, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if engine.grid.get_data_parallel_world_size() == 1 and not zero_stage:
        # One replica: nothing to average, so skip the engine's flatten/all-reduce/unflatten
        # of every gradient each step (the attribute DeepSpeed exposes for this). ZeRO needs the
        # pass: it is where its optimizer collects the gradients of its slice.
        engine.pipeline_enable_backward_allreduce = False
    return engine
