"""Activation checkpointing: which layers DeepSpeed's PipelineModule recomputes in the backward
pass, and the arguments that tell it so."""

from __future__ import annotations


def checkpointing_args(mode, model) -> dict:
    """PipelineModule's activation-checkpointing arguments for `activation_checkpointing`.

    true: every layer with weights (DeepSpeed's default); "selective": only the layer classes
    the model names in `selective_checkpoint_layers`; false: none.
    """
    if mode == "selective":
        return {"activation_checkpoint_interval": 1, "checkpointable_layers": list(model.selective_checkpoint_layers)}
    return {"activation_checkpoint_interval": 1 if mode else 0}


def checkpointed(layer, mode, model) -> bool:
    """Whether DeepSpeed's PipelineModule recomputes this layer, given `checkpointing_args(mode, model)`."""
    if mode is True:  # DeepSpeed's default: every layer with parameters
        return any(True for _ in layer.parameters())
    if mode == "selective":
        return layer.__class__.__name__ in model.selective_checkpoint_layers
    return False
