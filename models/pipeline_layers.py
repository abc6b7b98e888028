"""What flows between pipeline layers, declared once per model by name.

DeepSpeed's pipeline engine passes a tuple of tensors from layer to layer and between stages.
A model declares the names of that tuple's fields once (`PipelineFields`); each layer reads
and writes them by name through `PipelineLayer`, never by position.

DeepSpeed sends back a gradient for every floating-point tensor that crosses a stage boundary,
so a field that carries no gradient (positions, masks) must be an integer or bool tensor, and
every floating-point field is kept in the autograd graph (see `PipelineLayer.forward`).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class PipelineFields:
    """An ordered set of field names, packing a dict to the engine's tuple and back."""

    def __init__(self, *names: str):
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate pipeline field names: {names}")
        self.names = tuple(names)

    def pack(self, values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        missing = [n for n in self.names if n not in values]
        if missing:
            raise KeyError(f"pipeline fields not set: {missing}")
        return tuple(values[n] for n in self.names)

    def unpack(self, packed: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
        packed = tuple(packed)
        if len(packed) != len(self.names):
            raise ValueError(f"expected {len(self.names)} pipeline tensors {self.names}, got {len(packed)}")
        return dict(zip(self.names, packed))


class _ZeroGradient(torch.autograd.Function):
    """Identity on `out`; gives `inputs` a zero gradient, so that they take part in the backward
    pass without the layer computing anything for them."""

    @staticmethod
    def forward(ctx, out, *inputs):
        ctx.specs = [(t.shape, t.dtype, t.device) for t in inputs]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.specs))


class _LastOutputCarriesGradients(torch.autograd.Function):
    """Identity on a stage's last floating-point output; its backward also passes on the gradients
    that the stage's other floating-point outputs (detached leaves, `leaves`) received before it.

    DeepSpeed's pipeline engine (0.19) runs a separate backward pass from each floating-point
    output of a stage that is not the last (`_exec_backward_pass`, with retain_graph), so every
    layer behind two outputs ran its backward twice: FLUX.1's double blocks on stage 0 (hidden
    states and text states), a quarter more backward time than one GPU spends on the whole model
    (docs/benchmarks.md, "Several GPUs, fifth run"). Here the other outputs end the graph, their
    passes only store a gradient, and the last one's pass carries all of them through the stage once.
    """

    @staticmethod
    def forward(ctx, leaves, last, *others):
        ctx.leaves = leaves
        return last.view_as(last)

    @staticmethod
    def backward(ctx, grad):
        missing = [i for i, leaf in enumerate(ctx.leaves) if leaf.grad is None]
        if missing:
            # Gradients silently dropped would train wrong weights: refuse instead.
            raise RuntimeError(f"pipeline stage outputs {missing} got no gradient before the last one's backward "
                               f"pass: DeepSpeed's backward no longer runs one pass per output, in order "
                               f"(models/pipeline_layers.one_backward_pass)")
        return (None, grad, *(leaf.grad for leaf in ctx.leaves))


def one_backward_pass(out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A stage's outputs, re-linked so that DeepSpeed's backward pass per floating-point output
    runs the stage's layers once in all (`_LastOutputCarriesGradients`): the outputs before the
    last float are detached leaves that collect their gradients, the last float carries them."""
    floats = [i for i, t in enumerate(out) if t.is_floating_point()]
    if len(floats) < 2 or not torch.is_grad_enabled():
        return out
    *before, last = floats
    leaves = {i: out[i].detach().requires_grad_(True) for i in before}
    carrier = _LastOutputCarriesGradients.apply(list(leaves.values()), out[last], *(out[i] for i in before))
    return tuple(leaves.get(i, carrier if i == last else t) for i, t in enumerate(out))


class InferenceMemo:
    """Values that every block computes again from the same unchanged inputs (the rotary
    embedding from the positions, an attention mask from the text mask), kept from the first
    block that computes them for the next ones while gradients are off: a diffusers forward
    computes them once, and in eager inference each of their kernels is a launch per block.

    One entry per label; an entry holds only while its key's tensors are the very same objects
    (inputs passed through unchanged) and its other values are equal. A compiled `run` computes
    them in its graph instead, where they cost nothing."""

    def __init__(self):
        self._entries: dict[str, tuple[tuple, object]] = {}

    def __call__(self, label: str, key: tuple, compute):
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return compute()
        entry = self._entries.get(label)
        if entry is not None and len(entry[0]) == len(key) and all(
                a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(entry[0], key)):
            return entry[1]
        value = compute()
        self._entries[label] = (key, value)  # holding the key's tensors: no other tensor can reuse their ids
        return value

    def clear(self) -> None:
        self._entries.clear()


class PipelineLayer(nn.Module):
    """One entry of a model's layer list.

    Subclasses set `kind` and implement `run(state) -> state` on a dict of named tensors. `in_fields`
    and `out_fields` say what the layer reads and returns; fields it does not change pass through.
    `module_names` lists what of the transformer the layer owns, so that only the layers of the
    local pipeline stage get their weights loaded: submodules, or parameters of the transformer
    itself (LTX-Video's `scale_shift_table`), which the layer registers as its own parameters
    (`bind_root_parameters`).
    """

    # What the layer is: "input" (the embeddings before the first block), "block" (one
    # transformer block: what block swapping, float8 storage and partitioning by block count act
    # on) or "output" (the final norm and projection). A model with two kinds of block gives each
    # its own class: DeepSpeed's `checkpointable_layers` (activation_checkpointing = "selective")
    # and partition_method = "type:..." select layers by class name.
    kind: str

    # The relative time of one training pass (forward, recompute, backward) of this layer, for
    # partition_method = "cost"; measured with bench/layer_costs.py. None: 1 for a block, 0 for
    # the input and output layers.
    cost: float | None = None

    # The output fields this layer computes; it passes the others through unchanged. None: all of
    # them (always safe; naming fewer lets `mark_frozen_fields` find more fields without gradient).
    writes: tuple[str, ...] | None = None

    def __init__(self, in_fields: PipelineFields, out_fields: PipelineFields, module_names: list[str]):
        super().__init__()
        self.in_fields = in_fields
        self.out_fields = out_fields
        self.module_names = module_names
        # With low-precision base weights, run under autocast so that fp32 LoRA weights do their
        # matrix products in that precision too, without an fp32 copy of every input kept for
        # the backward. None: no autocast (float32 training).
        self.autocast_dtype: torch.dtype | None = None
        # `plain_precision` turns autocast off for inference in the base dtype.
        self.autocast_off = False
        # Shared by all layers of a model (`ModelRecipe.pipeline_layers`).
        self.memo = InferenceMemo()
        self._compiled_run = None
        # The last layer of a pipeline stage that sends its outputs to another (set by
        # parallel/engine.build_engine): its outputs go through `one_backward_pass`.
        self.ends_stage = False
        # Float input fields that no trainable weight has touched (set by `mark_frozen_fields`).
        self.frozen_fields: frozenset[str] = frozenset()

    def bind_root_parameters(self, transformer: nn.Module) -> None:
        """Register the transformer's own parameters named in `module_names` as this layer's, so
        that DeepSpeed trains, averages and checkpoints them with the layer. Loading replaces
        parameter objects (a meta tensor cannot be filled in place): call this when the layer is
        built and again once its weights are loaded (utils/engine.load_stage)."""
        for name in self.module_names:
            if name in transformer._parameters:
                self.register_parameter(name, transformer._parameters[name])

    def compile_run(self, recompute: bool = False) -> None:
        """Run `run` through torch.compile from now on (the packing around it stays eager);
        `recompute`: with activation checkpointing inside the compiled graph
        (memory/checkpointing.recomputes_inside_graph).

        Blocks of one class share their compiled code: the module's weights are graph inputs,
        not constants, so Flux's 57 blocks compile a few graphs (two per block kind), not 57. A
        new tensor shape (another bucket) compiles once more, then shapes are treated as dynamic
        (parallel/engine.compile_layers raises Dynamo's recompile limit to fit these variants).
        """
        self._compiled_run = torch.compile(self._run_recomputed if recompute else self.run)

    def _run_recomputed(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Traced by torch.compile: only the inputs are saved, the backward graph recomputes the rest.
        return checkpoint(self.run, state, use_reentrant=False)

    def run(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, packed):
        if isinstance(packed, torch.Tensor):
            packed = (packed,)
        state = self.in_fields.unpack(packed)
        # A frozen field still requires grad when it crossed a stage (DeepSpeed marks every float
        # it receives) or was marked below. Run on a detached copy: otherwise every product with
        # it (e.g. the timestep modulation, x * (1 + scale)) keeps its other factor for a gradient
        # nobody needs (about 12 GiB for FLUX.1 at 1024x1024 without checkpointing).
        frozen = {k: v for k, v in state.items() if k in self.frozen_fields and v.requires_grad}
        if frozen:
            state = {**state, **{k: v.detach() for k, v in frozen.items()}}
        device_type = packed[0].device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None and not self.autocast_off):
            result = (self._compiled_run or self.run)(state)
        consumed = []
        for k, original in frozen.items():
            if k in result and result[k] is state[k]:
                result[k] = original  # passed through: the stage's input goes on, in the graph
            else:
                consumed.append(original)
        out = self.out_fields.pack(result)
        if consumed:
            # DeepSpeed sends a gradient back for every float a stage received: a zero one.
            i = next(i for i, t in enumerate(out) if t.is_floating_point())
            out = (*out[:i], _ZeroGradient.apply(out[i], *consumed), *out[i + 1:])
        if torch.is_grad_enabled():
            # DeepSpeed calls backward on every floating-point output of a stage, so each must
            # be in the graph. An output computed only from frozen weights (e.g. the timestep
            # embedding under LoRA) is a leaf without grad: mark it, so its gradient is simply
            # accumulated and the backward stays valid.
            for t in out:
                if t.is_floating_point() and not t.requires_grad:
                    t.requires_grad_(True)
            if self.ends_stage:
                out = one_backward_pass(out)
        return out[0] if len(out) == 1 else out

    def extra_repr(self) -> str:
        return ", ".join(self.module_names)


# What peft names the trained weights of its LoRA, LoKr and LoHa layers.
ADAPTER_WEIGHT_MARKERS = ("lora_", "lokr_", "hada_")


def is_adapter_weight(name: str) -> bool:
    """Whether a parameter name is an adapter's trained weight (not a base weight)."""
    return any(m in name for m in ADAPTER_WEIGHT_MARKERS)


@contextlib.contextmanager
def plain_precision(layers: list[PipelineLayer]) -> Iterator[bool]:
    """Inference (no gradients) through `layers` as the diffusers pipelines run it: every weight
    in the layers' compute dtype and no autocast. Autocast casts each float32 adapter weight at
    every call and each activation for every reader: launch-bound work on a fast GPU. Here the
    adapter's weights are swapped for compute-dtype copies (the adapter's size in that dtype, made
    once) and put back on exit; the base weights are already in that dtype. Yields whether it
    took effect: not where a weight other than an adapter's is in another dtype (full
    fine-tuning in float32, where a copy would be a second model), which keeps autocast."""
    dtypes = {layer.autocast_dtype for layer in layers} - {None}
    if len(dtypes) != 1:  # float32 layers: nothing is cast anyway
        yield False
        return
    (dtype,) = dtypes
    named = {id(p): (n, p) for layer in layers for n, p in layer.named_parameters()}  # a shared one once
    swapped = [p for n, p in named.values() if p.is_floating_point() and p.dtype != dtype and not p.is_meta]
    if any(not is_adapter_weight(named[id(p)][0]) for p in swapped):
        yield False
        return
    originals = [p.data for p in swapped]
    try:
        for p in swapped:
            # .data keeps the Parameter object (peft, the engine and the optimizer hold it)
            p.data = p.data.to(dtype)
        for layer in layers:
            layer.autocast_off = True
        yield True
    finally:
        for layer in layers:
            layer.autocast_off = False
        for p, original in zip(swapped, originals):
            p.data = original


def named_weights(transformer: nn.Module, module_names: Iterable[str]) -> list[tuple[str, nn.Parameter]]:
    """The transformer's parameters under `module_names` (submodules, or parameters of the
    transformer itself), named as `transformer.named_parameters()` names them."""
    out = []
    for name in module_names:
        if name in transformer._parameters:
            out.append((name, transformer._parameters[name]))
        else:
            module = transformer.get_submodule(name) if name else transformer
            out += list(module.named_parameters(prefix=name))
    return out


def mark_frozen_fields(layers: list[PipelineLayer]) -> None:
    """Set each layer's `frozen_fields`: the inputs whose value no trainable weight has touched
    (in a LoRA run, e.g. the timestep embedding and the first block's input), which it then
    computes with as constants. Reads `requires_grad` of the layers' parameters (meta is fine)."""
    with_grad: set[str] = set()  # fields whose current value depends on a trainable weight
    for layer in layers:
        layer.frozen_fields = frozenset(n for n in layer.in_fields.names if n not in with_grad)
        writes = layer.out_fields.names if layer.writes is None else layer.writes
        trainable = any(p.requires_grad for p in layer.parameters())
        if trainable or with_grad & set(layer.in_fields.names):
            with_grad |= set(writes)
        else:
            with_grad -= set(writes)
        # Fields a layer neither reads nor writes do not reach the next layer.
        with_grad &= set(layer.out_fields.names)
