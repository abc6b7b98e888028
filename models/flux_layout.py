"""Flux transformer key layout: diffusers <-> original (BFL release / ComfyUI) layout.

The whole mapping is one declarative table (``flux_layout``): each entry names one module of the
original checkpoint and the diffusers module(s) it holds, concatenated along dim 0 in order.
Every conversion (weights both ways, lazy per-key loading, LoRA export) reads that table; the
machinery is shared with the other models in models/key_layout.py.

Split sizes of fused modules are symbolic ("inner", "mlp") and resolved from the model config
or from tensor shapes, so this works at any model size (diffusers' own converter assumes 3072).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from models.key_layout import DOUBLE_BLOCK_RE, GUIDANCE_PREFIXES, SINGLE_BLOCK_RE, Layout, attention_dims
from models.key_layout import block, block_counts, entry, repeat, single_stream_dims
# Re-exported: this module's names since before the machinery moved to models/key_layout.py.
from models.key_layout import LINEAR, ORIGINAL_PREFIXES, LayoutEntry, detect_original_prefix  # noqa: F401

__all__ = [
    "LayoutEntry",
    "FluxLayout",
    "flux_layout",
    "flux_dims",
    "detect_original_prefix",
    "diffusers_to_original",
    "original_to_diffusers",
    "original_to_diffusers_keys",
    "load_diffusers_keys_from_original",
    "lora_to_original",
]

# (diffusers parameter name, original parameter name)
RMS_NORM = (("weight", "scale"),)

# --- The table. "{i}" is the block index. ---------------------------------------------------------
_EMBEDDERS = (
    entry("img_in", "x_embedder"),
    entry("txt_in", "context_embedder"),
    entry("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    entry("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    entry("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    entry("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
)
_GUIDANCE = (
    entry("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    entry("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
)
_DOUBLE_BLOCK = block("double_blocks.{i}.", "transformer_blocks.{i}.", (
    ("img_mod.lin", ["norm1.linear"], {}),
    ("txt_mod.lin", ["norm1_context.linear"], {}),
    ("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"], {"dims": ["inner"] * 3}),
    ("txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"], {"dims": ["inner"] * 3}),
    ("img_attn.norm.query_norm", ["attn.norm_q"], {"params": RMS_NORM}),
    ("img_attn.norm.key_norm", ["attn.norm_k"], {"params": RMS_NORM}),
    ("txt_attn.norm.query_norm", ["attn.norm_added_q"], {"params": RMS_NORM}),
    ("txt_attn.norm.key_norm", ["attn.norm_added_k"], {"params": RMS_NORM}),
    ("img_attn.proj", ["attn.to_out.0"], {}),
    ("txt_attn.proj", ["attn.to_add_out"], {}),
    ("img_mlp.0", ["ff.net.0.proj"], {}),
    ("img_mlp.2", ["ff.net.2"], {}),
    ("txt_mlp.0", ["ff_context.net.0.proj"], {}),
    ("txt_mlp.2", ["ff_context.net.2"], {}),
))
_SINGLE_BLOCK = block("single_blocks.{i}.", "single_transformer_blocks.{i}.", (
    ("modulation.lin", ["norm.linear"], {}),
    # q, k, v and the MLP input all read the same normed hidden state: one matmul in the original.
    ("linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], {"dims": ["inner"] * 3 + ["mlp"]}),
    ("norm.query_norm", ["attn.norm_q"], {"params": RMS_NORM}),
    ("norm.key_norm", ["attn.norm_k"], {"params": RMS_NORM}),
    ("linear2", ["proj_out"], {}),
))
_FINAL = (
    entry("final_layer.linear", "proj_out"),
    # The original stores (shift, scale); diffusers' AdaLayerNormContinuous (scale, shift).
    entry("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True),
)


def flux_layout(num_layers: int, num_single_layers: int, guidance_embeds: bool = True) -> tuple[LayoutEntry, ...]:
    """The full mapping table for a Flux transformer of the given depth."""
    entries = list(_EMBEDDERS) + (list(_GUIDANCE) if guidance_embeds else [])
    entries += repeat(_DOUBLE_BLOCK, num_layers) + repeat(_SINGLE_BLOCK, num_single_layers)
    return tuple(entries + list(_FINAL))


def flux_dims(config: Mapping) -> dict[str, int]:
    """Sizes of the symbolic part dims: inner = heads * head_dim, mlp = mlp_ratio (4) * inner."""
    # diffusers' FluxSingleTransformerBlock is built with its default mlp_ratio of 4.0.
    return attention_dims(config)


class FluxLayout(Layout):
    """A ``flux_layout`` table with lookups by original and by diffusers module name."""

    name = "Flux"

    @classmethod
    def for_config(cls, config: Mapping) -> "FluxLayout":
        """Layout for a diffusers FluxTransformer2DModel config (``model.config`` or config.json dict)."""
        return cls(flux_layout(config["num_layers"], config["num_single_layers"], config.get("guidance_embeds", True)))

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> "FluxLayout":
        """Layout big enough for the given (unprefixed) original or diffusers keys."""
        keys = list(keys)
        num_layers, num_single = block_counts(keys, (DOUBLE_BLOCK_RE, SINGLE_BLOCK_RE))
        return cls(flux_layout(num_layers, num_single, any(k.startswith(GUIDANCE_PREFIXES) for k in keys)))

    dims = staticmethod(flux_dims)

    @staticmethod
    def dims_from_original(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
        return single_stream_dims(sd, "img_in.weight")


# The conversions, as this module has always exported them (see models/key_layout.Layout).
diffusers_to_original = FluxLayout.diffusers_to_original
original_to_diffusers = FluxLayout.original_to_diffusers
original_to_diffusers_keys = FluxLayout.original_to_diffusers_keys
load_diffusers_keys_from_original = FluxLayout.load_diffusers_keys_from_original
lora_to_original = FluxLayout.lora_to_original
