"""Activation checkpointing: which pipeline layers recompute their forward in the backward pass,
and where: DeepSpeed's PipelineModule recomputes the eager ones; a compiled block recomputes inside
its own compiled graph (recomputes_inside_graph says why)."""

from __future__ import annotations


def checkpointed(layer, mode, model) -> bool:
    """Whether this layer recomputes its forward in the backward pass under `activation_checkpointing = mode`."""
    if mode is True:  # DeepSpeed's default: every layer with parameters
        return any(True for _ in layer.parameters())
    if mode == "selective":
        return layer.__class__.__name__ in model.selective_checkpoint_layers
    return False


def recomputes_inside_graph(layer, settings, model) -> bool:
    """Whether a checkpointed layer does its own checkpointing, torch.utils.checkpoint traced into
    its compiled graph, so that the backward graph holds the recomputation. Against DeepSpeed's
    checkpoint around a compiled layer this drops, per layer and micro-batch, a second compiled call
    (the recompute forward, with its guards and wrappers) and a Python hook for every tensor the
    graph saves (about 60 per FLUX.1 block): CPU time a fast GPU waits for (docs/benchmarks.md,
    "Several GPUs, fourth run"). Blocks only: an input layer may hold random ops the compiled
    recomputation refuses (HunyuanVideo's token refiner), and those layers are cheap. Not with
    block swapping, whose weights load in a forward pre-hook the recomputation would not call."""
    return (bool(settings.compile) and not settings.blocks_to_swap and layer.kind == "block"
            and checkpointed(layer, settings.activation_checkpointing, model))


def checkpointing_args(settings, model, layers) -> dict:
    """PipelineModule's activation-checkpointing arguments for `activation_checkpointing`.

    true: every layer with weights (DeepSpeed's default); "selective": only the layer classes
    the model names in `selective_checkpoint_layers`; false: none. Layers that recompute inside
    their compiled graph are left out.
    """
    mode = settings.activation_checkpointing
    inside = [recomputes_inside_graph(layer, settings, model) for layer in layers]
    if any(inside):
        outside = sorted({type(layer).__name__ for layer, own in zip(layers, inside)
                          if checkpointed(layer, mode, model) and not own})
        return {"activation_checkpoint_interval": 1, "checkpointable_layers": outside}
    if mode == "selective":
        return {"activation_checkpoint_interval": 1, "checkpointable_layers": list(model.selective_checkpoint_layers)}
    return {"activation_checkpoint_interval": 1 if mode else 0}
