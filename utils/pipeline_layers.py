"""What flows between pipeline layers, declared once per model by name.

DeepSpeed's pipeline engine passes a tuple of tensors from layer to layer and between stages.
A model declares the names of that tuple's fields once (`PipelineFields`); each layer reads
and writes them by name through `PipelineLayer`, never by position.

DeepSpeed sends back a gradient for every floating-point tensor that crosses a stage boundary,
so a field that carries no gradient (positions, masks) must be an integer or bool tensor, and
every floating-point field is kept in the autograd graph (see `PipelineLayer.forward`).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


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


class PipelineLayer(nn.Module):
    """One entry of a model's layer list.

    Subclasses implement `run(state) -> state` on a dict of named tensors. `in_fields` and
    `out_fields` say what the layer reads and returns; fields it does not change pass through.
    `module_names` lists what of the transformer the layer owns, so that only the layers of the
    local pipeline stage get their weights loaded: submodules, or parameters of the transformer
    itself (LTX-Video's `scale_shift_table`), which the layer registers as its own parameters
    (`bind_root_parameters`).
    """

    def __init__(self, in_fields: PipelineFields, out_fields: PipelineFields, module_names: list[str]):
        super().__init__()
        self.in_fields = in_fields
        self.out_fields = out_fields
        self.module_names = module_names
        # With low-precision base weights, run under autocast so that fp32 LoRA weights do their
        # matrix products in that precision too, without an fp32 copy of every input kept for
        # the backward. None: no autocast (float32 training).
        self.autocast_dtype: torch.dtype | None = None

    def bind_root_parameters(self, transformer: nn.Module) -> None:
        """Register the transformer's own parameters named in `module_names` as this layer's, so
        that DeepSpeed trains, averages and checkpoints them with the layer. Loading replaces
        parameter objects (a meta tensor cannot be filled in place): call this when the layer is
        built and again once its weights are loaded (utils/engine.load_stage)."""
        for name in self.module_names:
            if name in transformer._parameters:
                self.register_parameter(name, transformer._parameters[name])

    def run(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, packed):
        if isinstance(packed, torch.Tensor):
            packed = (packed,)
        state = self.in_fields.unpack(packed)
        device_type = packed[0].device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            state = self.run(state)
        out = self.out_fields.pack(state)
        if torch.is_grad_enabled():
            # DeepSpeed calls backward on every floating-point output of a stage, so each must
            # be in the graph. An output computed only from frozen weights (e.g. the timestep
            # embedding under LoRA) is a leaf without grad: mark it, so its gradient is simply
            # accumulated and the backward stays valid.
            for t in out:
                if t.is_floating_point() and not t.requires_grad:
                    t.requires_grad_(True)
        return out[0] if len(out) == 1 else out

    def extra_repr(self) -> str:
        return ", ".join(self.module_names)


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
