"""A GPU memory estimate per pipeline stage, printed before the weights load.

Weights, gradients and optimizer state follow from the parameter shapes and dtypes and are
exact for the optimizers we build (tests/test_memory.py checks them against real optimizer
steps). Activations are a rough model-specific figure: tokens x hidden size x bytes x a per-layer
factor measured once (`ModelRecipe.activation_factors`, or `full_finetune_activation_factors`;
bench/activation_factors.py), by activation-checkpointing mode. Not counted: the
CUDA context and allocator slack (often 1-2 GiB), and the pipeline's send/receive buffers.
The total is the peak: gradients grow while the backward pass frees activations, and the step's
scratch comes after both (against measured peaks: docs/benchmarks.md, "Estimate vs earlier measured peak";
bench/peak_breakdown.py shows what is alive at the peak on a GPU). With float8 storage the peak
can come while the weights load (`StageEstimate.loading`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from config.training import OptimizerConfig
from memory.block_swap import BLOCK_SWAP_RESIDENT, block_layer_indices, swapped_layer_indices
from memory.checkpointing import checkpointed
from models.pipeline_layers import is_adapter_weight
from utils.dtypes import DTYPES

GIB = 2**30
# bitsandbytes' 8-bit AdamW: tensors below this size keep float32 state; larger ones keep two
# uint8 states plus a float32 scale per block of 256 values for each.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
# Stochastic rounding steps bfloat16 weights in float32 slices of this many elements
# (training/optimizers.StochasticRounding.chunk_elements).
ROUNDING_CHUNK = 1 << 26
# zero_stage = 1: elements of DeepSpeed's gradient-reduction and weight all-gather buckets
# (parallel/engine.start_engine); DeepSpeed's default, 5e8, would hold 1 GiB of bfloat16 gradients.
ZERO_BUCKET_ELEMENTS = 1 << 26


@dataclass
class ParamInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    trainable: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _size(self.dtype)


@dataclass
class StageEstimate:
    stage: int
    weights: dict[str, int] = field(default_factory=dict)  # dtype name -> bytes
    trainable_params: int = 0
    gradients: int = 0
    optimizer: int = 0
    step_scratch: int = 0
    activations: int | None = None
    in_flight: int = 1
    # Gradients, activations and the step's scratch at the worst moment: they do not all exist at
    # once (gradients appear as the backward pass frees activations; scratch only in the step).
    working: int = 0
    swapped: int = 0  # frozen weight bytes of swapped blocks kept in CPU memory (blocks_to_swap)
    # While the weights load: with float8 storage they arrive in model.dtype and are quantized
    # once all are there (parallel/stages.load_stage), so this peak can exceed training's.
    loading: int = 0
    # Drawing [sample]s between steps (training/sampling.py): the weights, optimizer state and
    # gradients stay; a forward without gradients holds about one layer's activations at a time.
    sampling: int | None = None

    @property
    def training(self) -> int:
        """The training peak: weights and optimizer state stay, the rest overlaps (`working`)."""
        return sum(self.weights.values()) + self.optimizer + self.working

    @property
    def total(self) -> int:
        """The estimated peak, loading included."""
        return max(self.training, self.loading)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def optimizer_state_bytes(p: ParamInfo, optimizer: OptimizerConfig) -> int:
    """Bytes of optimizer state the optimizers of training/optimizers.py keep for one parameter."""
    n = p.numel
    # Stochastic rounding steps bfloat16 weights as float32, so their state is float32.
    state_dtype = torch.float32 if optimizer.stochastic_rounding and p.dtype == torch.bfloat16 else p.dtype
    if optimizer.type == "adamw":  # exp_avg and exp_avg_sq, like the parameter
        return 2 * n * _size(state_dtype)
    if optimizer.type == "adamw8bit":
        if n < BNB_MIN_8BIT_SIZE:
            return 2 * n * 4
        return 2 * n + 2 * math.ceil(n / BNB_BLOCK) * 4
    # Adafactor (no first moment), always float32: row and column means of the squared
    # gradient for matrices, the full second moment for vectors.
    if len(p.shape) >= 2:
        return (math.prod(p.shape[:-1]) + math.prod(p.shape[:-2]) * p.shape[-1]) * 4
    return n * 4


def step_scratch_bytes(trainable: list[ParamInfo], optimizer: OptimizerConfig) -> int:
    """Rough temporary memory of one optimizer step: float32 copies of what is stepped at once."""
    if not trainable:
        return 0
    largest = max(p.numel for p in trainable)
    if optimizer.stochastic_rounding:
        bf16 = sum(p.numel for p in trainable if p.dtype == torch.bfloat16)
        # weight and gradient as float32, random bits and the rounded value, per slice
        return 16 * min(bf16, max(ROUNDING_CHUNK, largest))
    # weight, gradient and update of one tensor in float32
    return 12 * largest


def param_infos(model, layers, config) -> list[list[tuple[str, ParamInfo]]]:
    """Per layer, each parameter with the shape, dtype and trainability it will have once loaded
    (the transformer is still on the meta device): LoRA weights in adapter.dtype; base weights
    in model.dtype and frozen, or with full fine-tuning trainable in the trained dtype."""
    s = config.settings
    base_dtype = DTYPES[config.trained_dtype if s.adapter is None else config.model.dtype]
    # transformer_dtype = "float8": the LoRA base linears of the block layers keep a float8 weight
    # and a float32 scale per output row (memory/float8.py).
    float8 = s.adapter is not None and config.model.transformer_dtype == "float8"
    out = []
    for layer in layers:
        infos = []
        block = layer.kind == "block"
        for name, p in layer.named_parameters():
            if is_adapter_weight(name):
                info = ParamInfo(tuple(p.shape), DTYPES[s.adapter.dtype], True)
            elif float8 and block and name.endswith(".base_layer.weight") and p.dim() == 2:
                infos.append((name + "_scale", ParamInfo((p.shape[0], 1), torch.float32, False)))
                info = ParamInfo(tuple(p.shape), torch.float8_e4m3fn, False)
            else:
                info = ParamInfo(tuple(p.shape), base_dtype, s.adapter is None)
            infos.append((name, info))
        out.append(infos)
    return out


def zero_shard_bytes(trainable: list[ParamInfo], replicas: int) -> tuple[int, int]:
    """zero_stage = 1: (optimizer state, step scratch) of one replica's slice of `trainable`.

    DeepSpeed's ZeRO-1 keeps, for its 1/replicas slice of the flattened weights, float32 master
    weights and AdamW's two float32 moments; the step makes the slice's gradient flat in the
    weights' dtype and then float32, after the gradients were reduced through one bucket."""
    if not trainable:
        return 0, 0
    shard = math.ceil(sum(p.numel for p in trainable) / replicas)
    grad_size = _size(trainable[0].dtype)
    bucket = min(ZERO_BUCKET_ELEMENTS, sum(p.numel for p in trainable)) * grad_size
    return 12 * shard, shard * (grad_size + 4) + bucket


def estimate(model, layers, parts: list[int], config, tokens: int | None, hidden: int | None,
             sample_tokens: int | None = None, replicas: int = 1) -> list[StageEstimate]:
    """The estimate for every pipeline stage; `tokens`: the most tokens one sample gives;
    `sample_tokens`: the most one [sample] request gives (None: no samples); `replicas`: the
    data-parallel replicas, over which zero_stage = 1 shards the optimizer state."""
    s = config.settings
    infos = param_infos(model, layers, config)
    compute = model.dtype
    stages = len(parts) - 1
    result = []
    for stage in range(stages):
        est = StageEstimate(stage)
        local = range(parts[stage], parts[stage + 1])
        params = [info for i in local for _, info in infos[i]]
        for p in params:
            key = str(p.dtype).removeprefix("torch.")
            est.weights[key] = est.weights.get(key, 0) + p.nbytes
        # blocks_to_swap (one stage only): the last N blocks' frozen weights live in CPU memory;
        # at most BLOCK_SWAP_RESIDENT of them are on the device at once (the running one and the
        # prefetched next), counted at the largest ones.
        n_blocks = len(block_layer_indices(layers))
        swapped = swapped_layer_indices(layers, min(s.blocks_to_swap, n_blocks)) if stages == 1 else []
        frozen = sorted(([p for _, p in infos[i] if not p.trainable] for i in swapped),
                        key=lambda ps: -sum(p.nbytes for p in ps))
        float8_resident = [p for p in params if p.dtype == torch.float8_e4m3fn]
        for rank, layer_params in enumerate(frozen):
            if rank < BLOCK_SWAP_RESIDENT:
                continue
            for p in layer_params:
                key = str(p.dtype).removeprefix("torch.")
                est.weights[key] -= p.nbytes
                est.swapped += p.nbytes
                if p.dtype == torch.float8_e4m3fn:
                    float8_resident.remove(p)
        if float8_resident:
            # The resident float8 weights first sit on the device in model.dtype; quantizing one
            # makes two float32 copies of it (memory/float8.quantize_rows).
            est.loading = (sum(est.weights.values()) + sum(p.numel for p in float8_resident) * (_size(compute) - 1)
                           + 8 * max(p.numel for p in float8_resident))
        trainable = [p for p in params if p.trainable]
        est.trainable_params = sum(p.numel for p in trainable)
        est.gradients = sum(p.nbytes for p in trainable)  # gradients have their parameter's dtype
        if s.zero_stage:
            est.optimizer, est.step_scratch = zero_shard_bytes(trainable, replicas)
        else:
            est.optimizer = sum(optimizer_state_bytes(p, s.optimizer) for p in trainable)
            est.step_scratch = step_scratch_bytes(trainable, s.optimizer)
        est.working = est.gradients + est.step_scratch  # the optimizer step
        # 1F1B: stage k of K holds the activations of up to K - k micro-batches at once.
        est.in_flight = min(stages - stage, s.gradient_accumulation_steps)
        table = model.full_finetune_activation_factors if s.adapter is None else model.activation_factors
        factors = [table.get(layers[i].__class__.__name__) for i in local]
        if tokens and hidden and all(f is not None for f in factors):
            unit = tokens * hidden * _size(compute) * s.micro_batch_size_per_gpu
            kept, recompute = 0, 0
            # Backward through layer k (last to first) of a micro-batch: the gradients of layers
            # k.. exist, the activations of layers ..k are still kept, layer k may be recomputed.
            grads = [sum(p.nbytes for _, p in infos[i] if p.trainable) for i in local]
            sweep = []
            for i, factor in zip(local, factors):
                # Trainable float32 weights under low-precision autocast: each linear keeps a
                # low-precision copy of its weight for the backward pass.
                copies = sum(p.numel for _, p in infos[i] if p.trainable and p.dtype == torch.float32
                             and compute != torch.float32) * _size(compute)
                full = factor * unit + copies
                if checkpointed(layers[i], s.activation_checkpointing, model):
                    kept += unit  # only the layer's input stays
                    recompute = max(recompute, full)  # one layer at a time, in the backward
                    sweep.append((kept, full))
                else:
                    kept += full
                    sweep.append((kept, 0))
            est.activations = int(kept * est.in_flight + recompute)
            if s.gradient_accumulation_steps > 1:
                # After the first micro-batch's backward pass every gradient of the stage exists.
                during = est.gradients + est.activations
            else:
                during = max(sum(grads[j:]) + kept_j + recompute_j for j, (kept_j, recompute_j) in enumerate(sweep))
            est.working = int(max(est.working, during))
            if sample_tokens:
                # One micro-batch per sample, two rows with classifier-free guidance; the largest
                # layer's kept-activation factor stands for its forward's transient memory.
                rows = 2 if model.sample_guidance == "classifier_free" else 1
                transient = max(factors, default=0) * sample_tokens * hidden * _size(compute) * rows
                # The adapter's weights are copied to the compute dtype for the round
                # (models/pipeline_layers.plain_precision); full fine-tuning copies nothing.
                copies = 0 if s.adapter is None else sum(p.numel for p in trainable if p.dtype != compute)
                copies *= _size(compute)
                est.sampling = int(sum(est.weights.values()) + est.optimizer + est.gradients + transient + copies)
        result.append(est)
    return result


def describe(estimates: list[StageEstimate], config, tokens: int | None, device_total: int | None = None,
             replicas: int = 1) -> str:
    """The estimate as printed at start, and a warning for stages that exceed `device_total`."""
    s = config.settings
    g = lambda b: f"{b / GIB:.2f} GiB" if b >= GIB else f"{b / 2**20:.1f} MiB"  # noqa: E731
    head = (f"memory estimate per GPU ({'full fine-tuning' if s.adapter is None else 'LoRA'}, "
            f"optimizer {s.optimizer.type}{' + stochastic rounding' if s.optimizer.stochastic_rounding else ''}"
            f"{f', ZeRO-1 over {replicas} replicas (float32 master weights)' if s.zero_stage else ''}, "
            f"micro-batch {s.micro_batch_size_per_gpu} x {tokens or '?'} tokens, "
            f"activation_checkpointing = {str(s.activation_checkpointing).lower()}):")
    lines = [head]
    for e in estimates:
        weights = ", ".join(f"{k} {g(v)}" for k, v in sorted(e.weights.items()))
        activations = (f"{g(e.activations)} ({e.in_flight} micro-batch{'es' if e.in_flight > 1 else ''} in flight)"
                       if e.activations is not None else "not estimated for this model")
        count = f"{e.trainable_params / 1e9:.2f}B" if e.trainable_params >= 1e9 else f"{e.trainable_params / 1e6:.2f}M"
        lines.append(f"  stage {e.stage}: weights {weights}; {count} trainable params: "
                     f"gradients {g(e.gradients)}, optimizer state {g(e.optimizer)}, step scratch "
                     f"{g(e.step_scratch)}; activations {activations}; total {g(e.total)}"
                     + (f" (while the weights load, before float8 quantization; training {g(e.training)})"
                        if e.loading > e.training else "")
                     + (f"; plus {g(e.swapped)} of swapped blocks' weights in CPU memory" if e.swapped else ""))
    sampling = [e for e in estimates if e.sampling is not None]
    if sampling:
        lines.append("  while drawing samples: " + ", ".join(f"stage {e.stage} {g(e.sampling)}" for e in sampling)
                     + "; rank 0 also loads the VAE to decode them (its weights and decoding activations)")
    if device_total:
        for e in estimates:
            if e.total > device_total:
                lines.append(f"WARNING: stage {e.stage} needs about {g(e.total)}, more than the GPU's "
                             f"{g(device_total)}: expect out of memory (what saves memory: pipeline_stages, activation_checkpointing, "
                             f"optimizer type, micro_batch_size_per_gpu)")
    return "\n".join(lines)
