"""The Flux key map: diffusers <-> original (BFL release / ComfyUI) weight names.

The whole mapping is one declarative table (``flux_table``): each entry names one module of the
original checkpoint and the diffusers module(s) it holds, concatenated along dim 0 in order.
Every conversion (weights both ways, lazy per-key loading, LoRA export) reads that table; the
machinery is shared with the other models in models/keymaps/keymap.py.

Split sizes of fused modules are symbolic ("inner", "mlp") and resolved from the model config
or from tensor shapes, so this works at any model size (diffusers' own converter assumes 3072).

The VAE's single file (``FLUX_VAE``, BFL's ae.safetensors) has the latent-diffusion names (below).
"""

from __future__ import annotations

import re

from models.keymaps.single_file import SingleFileLayout
from models.keymaps.keymap import KeymapEntry, TableKeymap, block, entry, kohya_lora, stream_table

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
    head = list(_EMBEDDERS) + (list(_GUIDANCE) if guidance_embeds else [])
    return stream_table(head, _DOUBLE_BLOCK, _SINGLE_BLOCK, _FINAL, num_layers, num_single_layers)


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


# --- The VAE as a single file ------------------------------------------------------------------------
# BFL's ae.safetensors (what ComfyUI loads) keeps the latent-diffusion autoencoder's names: blocks
# as down.<i>.block.<j> and up.<i>.block.<j> (the decoder's up levels numbered from the highest
# resolution, diffusers' up_blocks from the lowest), mid.block_1 / attn_1 / block_2, nin_shortcut,
# norm_out, and the mid attention's q, k, v and proj_out as 1x1 convolutions.
_BFL_VAE_RENAMES = (
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_([qkv])\.", r"\1.mid.attn_1.\2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
)
_MID_RESNET = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.")
_UP_BLOCK = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.")


def bfl_vae_names(keys: list[str]) -> dict[str, str]:
    """{diffusers AutoencoderKL key: its name in BFL's ae.safetensors}, for the keys of one VAE."""
    levels = 1 + max((int(m.group(1)) for k in keys if (m := _UP_BLOCK.match(k))), default=-1)
    names = {}
    for key in keys:
        name = _MID_RESNET.sub(lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.", key)
        name = _UP_BLOCK.sub(lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}."
                                       f"{'block' if m.group(2) == 'resnets' else 'upsample'}.", name)
        for pattern, replacement in _BFL_VAE_RENAMES:
            name = re.sub(pattern, replacement, name)
        names[key] = name
    return names


FLUX_VAE = SingleFileLayout("FLUX.1 VAE", "ae.safetensors", prefixes=("", "vae.", "first_stage_model."),
                            file_names=bfl_vae_names, conv_kernels=r".*\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
