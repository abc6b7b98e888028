"""The Wan key map: diffusers <-> original (Wan-AI release / ComfyUI) layout.

The original layout keeps q, k and v separate, so the map is renames only
(models/keymaps/keymap.RenameKeymap). The same table holds for Wan 2.1 and 2.2, text- and
image-to-video (the image encoder's projection and the cross-attention's image keys and values).
"""

from __future__ import annotations

from models.keymaps.keymap import RenameKeymap

_ATTENTION = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))


class WanKeymap(RenameKeymap):
    name = "Wan"
    # (original module path, diffusers module path); "{i}" is a block index. The first row that
    # matches a key wins: the attention projections come before their attention's catch-all row.
    renames = (
        ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
        ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
        ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
        ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
        ("time_projection.1", "condition_embedder.time_proj"),
        # Image-to-video: the CLIP image embedding's projection.
        ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
        ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
        ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
        ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
        *((f"blocks.{{i}}.self_attn.{o}", f"blocks.{{i}}.attn1.{d}") for o, d in _ATTENTION),
        *((f"blocks.{{i}}.cross_attn.{o}", f"blocks.{{i}}.attn2.{d}") for o, d in _ATTENTION),
        ("blocks.{i}.cross_attn.k_img", "blocks.{i}.attn2.add_k_proj"),
        ("blocks.{i}.cross_attn.v_img", "blocks.{i}.attn2.add_v_proj"),
        ("blocks.{i}.cross_attn.norm_k_img", "blocks.{i}.attn2.norm_added_k"),
        ("blocks.{i}.self_attn", "blocks.{i}.attn1"),  # norm_q, norm_k
        ("blocks.{i}.cross_attn", "blocks.{i}.attn2"),
        # The original's norm3 is the cross-attention's input norm (with weights), norm2 the
        # feed-forward's (without); diffusers numbers them in the order they run.
        ("blocks.{i}.norm3", "blocks.{i}.norm2"),
        ("blocks.{i}.norm2", "blocks.{i}.norm3"),
        ("blocks.{i}.ffn.0", "blocks.{i}.ffn.net.0.proj"),
        ("blocks.{i}.ffn.2", "blocks.{i}.ffn.net.2"),
        ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
        ("head.head", "proj_out"),
        ("head.modulation", "scale_shift_table"),
    )
