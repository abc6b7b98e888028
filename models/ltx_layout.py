"""LTX-Video transformer key layout: diffusers <-> original (Lightricks release / ComfyUI) layout.

The original layout keeps q, k and v separate and names most modules as diffusers does, so the
mapping is renames only: one declarative table (``RENAMES``) of module paths, read by every
conversion here (weights both ways, lazy per-key loading, LoRA export). A module the table does
not name has the same name in both layouts.
"""

from __future__ import annotations

# The release file holds the transformer under "model.diffusion_model." (one of ORIGINAL_PREFIXES)
# beside the VAE ("vae.").
from models.key_layout import ORIGINAL_PREFIXES, RenameTable, detect_original_prefix  # noqa: F401

__all__ = [
    "RENAMES",
    "ORIGINAL_PREFIXES",
    "detect_original_prefix",
    "diffusers_to_original_key",
    "original_to_diffusers_key",
    "diffusers_to_original",
    "original_to_diffusers",
    "load_diffusers_keys_from_original",
    "lora_to_original",
]

# (original module path, diffusers module path); "{i}" is a block index, "{n}" the attention (1: self, 2: cross).
RENAMES = (
    ("patchify_proj", "proj_in"),
    ("adaln_single", "time_embed"),
    ("transformer_blocks.{i}.attn{n}.q_norm", "transformer_blocks.{i}.attn{n}.norm_q"),
    ("transformer_blocks.{i}.attn{n}.k_norm", "transformer_blocks.{i}.attn{n}.norm_k"),
)


_TABLE = RenameTable(RENAMES)


def diffusers_to_original_key(key: str) -> str:
    """One diffusers key (parameter or module path) in the original layout."""
    return _TABLE.to_original(key)


def original_to_diffusers_key(key: str) -> str:
    """One unprefixed original key (parameter or module path) in the diffusers layout."""
    return _TABLE.to_diffusers(key)


# The conversions, as this module has always exported them (see models/key_layout.RenameTable).
diffusers_to_original = _TABLE.diffusers_to_original
original_to_diffusers = _TABLE.original_to_diffusers
load_diffusers_keys_from_original = _TABLE.load_diffusers_keys_from_original
lora_to_original = _TABLE.lora_to_original
