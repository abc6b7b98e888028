"""The LTX-Video key map: diffusers <-> original (Lightricks release / ComfyUI) layout.

The original layout keeps q, k and v separate and names most modules as diffusers does, so the
map is renames only (models/keymaps/keymap.RenameKeymap). The release file holds the transformer under
"model.diffusion_model." beside the VAE ("vae."); conversions strip that prefix and leave the VAE out.
"""

from __future__ import annotations

from models.keymaps.keymap import RenameKeymap


class LTXVideoKeymap(RenameKeymap):
    name = "LTX-Video"
    # (original module path, diffusers module path); "{i}" is a block index, "{n}" the attention
    # (1: self, 2: cross).
    renames = (
        ("patchify_proj", "proj_in"),
        ("adaln_single", "time_embed"),
        ("transformer_blocks.{i}.attn{n}.q_norm", "transformer_blocks.{i}.attn{n}.norm_q"),
        ("transformer_blocks.{i}.attn{n}.k_norm", "transformer_blocks.{i}.attn{n}.norm_k"),
    )
