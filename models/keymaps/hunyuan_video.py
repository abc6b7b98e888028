"""The HunyuanVideo key map: diffusers <-> original (Tencent release / ComfyUI) weight names.

The whole mapping is one declarative table (``hunyuan_video_table``): each entry names one module
of the original checkpoint and the diffusers module(s) it holds, concatenated along dim 0 in order. The
original fuses q, k, v into one linear (``img_attn_qkv``, ``txt_attn_qkv``, the token refiner's
``self_attn_qkv``), and in the single-stream blocks q, k, v and the MLP input into ``linear1``.
Every conversion (weights both ways, lazy per-key loading, LoRA export) reads that table; the
machinery is shared with the other models in models/keymaps/keymap.py.

Split sizes of fused modules are symbolic ("inner", "mlp") and resolved from the model config or
from tensor shapes, so this works at any model size (diffusers' own converter assumes 3072).

The VAE's and the Llama text encoder's single files (``HUNYUAN_VIDEO_VAE``, ``LLAVA_LLAMA3``) differ
from the diffusers / transformers layout by a key prefix only (models/keymaps/single_file.py).
"""

from __future__ import annotations

import re

from models.keymaps.keymap import DOUBLE_BLOCK_RE, SINGLE_BLOCK_RE, KeymapEntry, TableKeymap, block, entry, repeat
from models.keymaps.single_file import SingleFileLayout

WEIGHT = (("weight", "weight"),)  # RMSNorm: a scale only

QKV = {"dims": ["inner"] * 3}

# --- The table. "{i}" is the block index. ---------------------------------------------------------
_EMBEDDERS = (
    entry("img_in.proj", "x_embedder.proj"),
    entry("time_in.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    entry("time_in.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    entry("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    entry("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    # The text token refiner: its own timestep / pooled-text embedding, input projection and blocks.
    entry("txt_in.input_embedder", "context_embedder.proj_in"),
    entry("txt_in.t_embedder.mlp.0", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
    entry("txt_in.t_embedder.mlp.2", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
    entry("txt_in.c_embedder.linear_1", "context_embedder.time_text_embed.text_embedder.linear_1"),
    entry("txt_in.c_embedder.linear_2", "context_embedder.time_text_embed.text_embedder.linear_2"),
)
_GUIDANCE = (
    entry("guidance_in.mlp.0", "time_text_embed.guidance_embedder.linear_1"),
    entry("guidance_in.mlp.2", "time_text_embed.guidance_embedder.linear_2"),
)
_REFINER_BLOCK = block("txt_in.individual_token_refiner.blocks.{i}.", "context_embedder.token_refiner.refiner_blocks.{i}.", (
    ("norm1", ["norm1"], {}),
    ("self_attn_qkv", ["attn.to_q", "attn.to_k", "attn.to_v"], QKV),
    ("self_attn_proj", ["attn.to_out.0"], {}),
    ("norm2", ["norm2"], {}),
    ("mlp.fc1", ["ff.net.0.proj"], {}),
    ("mlp.fc2", ["ff.net.2"], {}),
    ("adaLN_modulation.1", ["norm_out.linear"], {}),
))
_DOUBLE_BLOCK = block("double_blocks.{i}.", "transformer_blocks.{i}.", (
    ("img_mod.linear", ["norm1.linear"], {}),
    ("img_attn_qkv", ["attn.to_q", "attn.to_k", "attn.to_v"], QKV),
    ("img_attn_q_norm", ["attn.norm_q"], {"params": WEIGHT}),
    ("img_attn_k_norm", ["attn.norm_k"], {"params": WEIGHT}),
    ("img_attn_proj", ["attn.to_out.0"], {}),
    ("img_mlp.fc1", ["ff.net.0.proj"], {}),
    ("img_mlp.fc2", ["ff.net.2"], {}),
    ("txt_mod.linear", ["norm1_context.linear"], {}),
    ("txt_attn_qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"], QKV),
    ("txt_attn_q_norm", ["attn.norm_added_q"], {"params": WEIGHT}),
    ("txt_attn_k_norm", ["attn.norm_added_k"], {"params": WEIGHT}),
    ("txt_attn_proj", ["attn.to_add_out"], {}),
    ("txt_mlp.fc1", ["ff_context.net.0.proj"], {}),
    ("txt_mlp.fc2", ["ff_context.net.2"], {}),
))
_SINGLE_BLOCK = block("single_blocks.{i}.", "single_transformer_blocks.{i}.", (
    # q, k, v and the MLP input all read the same normed hidden state: one matmul in the original.
    ("linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], {"dims": ["inner"] * 3 + ["mlp"]}),
    ("linear2", ["proj_out"], {}),
    ("q_norm", ["attn.norm_q"], {"params": WEIGHT}),
    ("k_norm", ["attn.norm_k"], {"params": WEIGHT}),
    ("modulation.linear", ["norm.linear"], {}),
))
_FINAL = (
    entry("final_layer.linear", "proj_out"),
    # The original stores (shift, scale); diffusers' AdaLayerNormContinuous (scale, shift).
    entry("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True),
)


def hunyuan_video_table(num_layers: int, num_single_layers: int, num_refiner_layers: int,
                   guidance_embeds: bool = True) -> tuple[KeymapEntry, ...]:
    """The full mapping table for a HunyuanVideo transformer of the given depth."""
    entries = list(_EMBEDDERS) + (list(_GUIDANCE) if guidance_embeds else [])
    entries += repeat(_REFINER_BLOCK, num_refiner_layers)
    entries += repeat(_DOUBLE_BLOCK, num_layers) + repeat(_SINGLE_BLOCK, num_single_layers)
    return tuple(entries + list(_FINAL))


_REFINER_RE = re.compile(r"^(?:context_embedder\.token_refiner\.refiner_blocks|txt_in\.individual_token_refiner\.blocks)"
                         r"\.(\d+)\.")


class HunyuanVideoKeymap(TableKeymap):
    """The ``hunyuan_video_table`` with lookups by original and by diffusers module name."""

    name = "HunyuanVideo"
    # load_diffusers_keys_from_original also reads the release's .pt file (a state dict, or one under
    # "module"), memory-mapped; a key the file lacks raises KeyError naming the original key.
    reads_torch_files = True
    table = staticmethod(hunyuan_video_table)
    block_patterns = (DOUBLE_BLOCK_RE, SINGLE_BLOCK_RE, _REFINER_RE)
    block_config = (("num_layers", None), ("num_single_layers", None), ("num_refiner_layers", 2))
    image_in_weight = "img_in.proj.weight"


# --- The VAE and text encoders as single files ------------------------------------------------------
# The release's VAE (vae/pytorch_model.pt: the weights under "vae.", in a "state_dict" entry) and
# ComfyUI's hunyuan_video_vae_bf16.safetensors (no prefix) name every module as diffusers'
# AutoencoderKLHunyuanVideo does: diffusers' own conversion of the release renames no VAE key.
HUNYUAN_VIDEO_VAE = SingleFileLayout(
    "HunyuanVideo VAE", "hunyuan_video_vae_bf16.safetensors, or the release's vae/pytorch_model.pt",
    prefixes=("", "vae.", "first_stage_model."))
# The text encoder, the Llama of LLaVA-Llama-3-8B, as ComfyUI's llava_llama3_fp16.safetensors holds it:
# transformers' LlamaForCausalLM names ("model." before LlamaModel's; its lm_head is not read).
LLAVA_LLAMA3 = SingleFileLayout(
    "LLaVA-Llama-3 text encoder", "llava_llama3_fp16.safetensors",
    prefixes=("model.", "", "language_model.model.", "model.language_model."))
