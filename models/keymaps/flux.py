"""The Flux key map: diffusers <-> original (BFL release / ComfyUI) weight names.

The whole mapping is one declarative table (``flux_table``): each entry names one module of the
original checkpoint and the diffusers module(s) it holds, concatenated along dim 0 in order.
Every conversion (weights both ways, lazy per-key loading, LoRA export) reads that table; the
machinery is shared with the other models in models/keymaps/keymap.py.

Split sizes of fused modules are symbolic ("inner", "mlp") and resolved from the model config
or from tensor shapes, so this works at any model size (diffusers' own converter assumes 3072).
"""

from __future__ import annotations

from models.keymaps.keymap import KeymapEntry, TableKeymap, block, entry, kohya_lora, repeat

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


def flux_table(num_layers: int, num_single_layers: int, guidance_embeds: bool = True) -> tuple[KeymapEntry, ...]:
    """The full mapping table for a Flux transformer of the given depth."""
    entries = list(_EMBEDDERS) + (list(_GUIDANCE) if guidance_embeds else [])
    entries += repeat(_DOUBLE_BLOCK, num_layers) + repeat(_SINGLE_BLOCK, num_single_layers)
    return tuple(entries + list(_FINAL))


class FluxKeymap(TableKeymap):
    """The ``flux_table`` with lookups by original and by diffusers module name."""

    name = "Flux"
    table = staticmethod(flux_table)
    image_in_weight = "img_in.weight"

    @classmethod
    def comfyui_lora(cls, lora_state_dict, config):
        # The original key layout (fused q/k/v and linear1, as ComfyUI's model) in kohya's naming:
        # ComfyUI loads it, and so does diffusers' FluxPipeline.load_lora_weights through its kohya
        # converter (which splits the block-diagonal fused LoRAs back exactly, at FLUX.1's width).
        return kohya_lora(cls.lora_to_original(lora_state_dict, config, prefix=""))
