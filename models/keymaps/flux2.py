"""The FLUX.2 key map: diffusers <-> original (BFL release flux2-dev.safetensors / ComfyUI) weight names.

One declarative table, read by the shared machinery in models/keymaps/keymap.py. Only the double
blocks' attention projections are fused in the original (``img_attn.qkv``, ``txt_attn.qkv``); the
single blocks' fused ``linear1`` / ``linear2`` are fused in diffusers too (``to_qkv_mlp_proj``,
``to_out``), and the three modulation projections shared by all blocks are one module each in both.
No FLUX.2 linear has a bias.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from models.keymaps.keymap import TableKeymap, block, block_counts, entry, kohya_lora, stream_table

# (diffusers parameter name, original parameter name): FLUX.2 linears have no bias.
WEIGHT = (("weight", "weight"),)
RMS_NORM = (("weight", "scale"),)

# --- The table. "{i}" is the block index. ---------------------------------------------------------
_EMBEDDERS = (
    entry("img_in", "x_embedder", params=WEIGHT),
    entry("txt_in", "context_embedder", params=WEIGHT),
    entry("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1", params=WEIGHT),
    entry("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2", params=WEIGHT),
)
_GUIDANCE = (
    entry("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1", params=WEIGHT),
    entry("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2", params=WEIGHT),
)
# The modulations every double (image, text) and single block shares, computed once per step.
_MODULATION = (
    entry("double_stream_modulation_img.lin", "double_stream_modulation_img.linear", params=WEIGHT),
    entry("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear", params=WEIGHT),
    entry("single_stream_modulation.lin", "single_stream_modulation.linear", params=WEIGHT),
)
_DOUBLE_BLOCK = block("double_blocks.{i}.", "transformer_blocks.{i}.", (
    ("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"], {"dims": ["inner"] * 3, "params": WEIGHT}),
    ("txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
     {"dims": ["inner"] * 3, "params": WEIGHT}),
    ("img_attn.norm.query_norm", ["attn.norm_q"], {"params": RMS_NORM}),
    ("img_attn.norm.key_norm", ["attn.norm_k"], {"params": RMS_NORM}),
    ("txt_attn.norm.query_norm", ["attn.norm_added_q"], {"params": RMS_NORM}),
    ("txt_attn.norm.key_norm", ["attn.norm_added_k"], {"params": RMS_NORM}),
    ("img_attn.proj", ["attn.to_out.0"], {"params": WEIGHT}),
    ("txt_attn.proj", ["attn.to_add_out"], {"params": WEIGHT}),
    ("img_mlp.0", ["ff.linear_in"], {"params": WEIGHT}),
    ("img_mlp.2", ["ff.linear_out"], {"params": WEIGHT}),
    ("txt_mlp.0", ["ff_context.linear_in"], {"params": WEIGHT}),
    ("txt_mlp.2", ["ff_context.linear_out"], {"params": WEIGHT}),
))
_SINGLE_BLOCK = block("single_blocks.{i}.", "single_transformer_blocks.{i}.", (
    ("linear1", ["attn.to_qkv_mlp_proj"], {"params": WEIGHT}),
    ("linear2", ["attn.to_out"], {"params": WEIGHT}),
    ("norm.query_norm", ["attn.norm_q"], {"params": RMS_NORM}),
    ("norm.key_norm", ["attn.norm_k"], {"params": RMS_NORM}),
))
_FINAL = (
    entry("final_layer.linear", "proj_out", params=WEIGHT),
    # The original stores (shift, scale); diffusers' AdaLayerNormContinuous (scale, shift).
    entry("final_layer.adaLN_modulation.1", "norm_out.linear", params=WEIGHT, swap=True),
)


def flux2_table(num_layers: int, num_single_layers: int, guidance_embeds: bool = True) -> tuple:
    """The full mapping table for a FLUX.2 transformer of the given depth."""
    head = list(_EMBEDDERS) + (list(_GUIDANCE) if guidance_embeds else []) + list(_MODULATION)
    return stream_table(head, _DOUBLE_BLOCK, _SINGLE_BLOCK, _FINAL, num_layers, num_single_layers)


class Flux2Keymap(TableKeymap):
    """The ``flux2_table`` with lookups by original and by diffusers module name."""

    name = "FLUX.2"
    table = staticmethod(flux2_table)
    image_in_weight = "img_in.weight"

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> "Flux2Keymap":
        # FLUX.2's diffusers guidance embedder sits under time_guidance_embed, not time_text_embed.
        keys = list(keys)
        counts = block_counts(keys, cls.block_patterns)
        guidance = any(k.startswith(("guidance_in.", "time_guidance_embed.guidance_embedder.")) for k in keys)
        return cls(cls.table(*counts, guidance))

    @staticmethod
    def dims(config: Mapping) -> dict[str, int]:
        # Only the double blocks' q/k/v are fused, each heads x head_dim wide.
        return {"inner": config["num_attention_heads"] * config["attention_head_dim"]}

    @classmethod
    def dims_from_original(cls, sd) -> dict[str, int]:
        return {"inner": sd[cls.image_in_weight].shape[0]}

    @classmethod
    def comfyui_lora(cls, lora_state_dict, config):
        # The original key layout (fused q/k/v) in kohya's naming: ComfyUI loads it, and so does
        # Flux2Pipeline.load_lora_weights through its kohya converter (which splits the
        # block-diagonal fused LoRAs back exactly).
        return kohya_lora(cls.lora_to_original(lora_state_dict, config, prefix=""))
