"""LTX-Video transformer key layout: diffusers <-> original (Lightricks release / ComfyUI) layout.

The original layout keeps q, k and v separate and names most modules as diffusers does, so the
mapping is renames only: one declarative table (``RENAMES``) of module paths, read by every
conversion here (weights both ways, lazy per-key loading, LoRA export). A module the table does
not name has the same name in both layouts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping

import torch

# The release file holds the transformer under "model.diffusion_model." (one of ORIGINAL_PREFIXES)
# beside the VAE ("vae.").
from models.key_layout import ORIGINAL_PREFIXES, detect_original_prefix, parse_lora_keys  # noqa: F401

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


def _pattern(path: str) -> re.Pattern:
    # A module path as a regex matching it, and anything below it, at the start of a key.
    escaped = re.escape(path).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{n\}", r"(?P<n>[12])")
    return re.compile(f"^{escaped}(?=\\.|$)")


_TO_DIFFUSERS = [(_pattern(o), d) for o, d in RENAMES]
_TO_ORIGINAL = [(_pattern(d), o) for o, d in RENAMES]


def _rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        m = pattern.match(key)
        if m:
            return replacement.format(**m.groupdict()) + key[m.end():]
    return key


def diffusers_to_original_key(key: str) -> str:
    """One diffusers key (parameter or module path) in the original layout."""
    return _rename(key, _TO_ORIGINAL)


def original_to_diffusers_key(key: str) -> str:
    """One unprefixed original key (parameter or module path) in the diffusers layout."""
    return _rename(key, _TO_DIFFUSERS)


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers LTXVideoTransformer3DModel state dict with original keys (``prefix`` prepended)."""
    return {prefix + diffusers_to_original_key(k): v for k, v in state_dict.items()}


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original-layout transformer state dict with diffusers keys.

    A "model.diffusion_model." / "diffusion_model." prefix is stripped; with a prefix, keys without it
    (the VAE of the all-in-one release file) are left out.
    """
    prefix = detect_original_prefix(state_dict)
    return {original_to_diffusers_key(k[len(prefix):]): v for k, v in state_dict.items() if k.startswith(prefix)}


def load_diffusers_keys_from_original(path: str | Path, wanted_keys: Iterable[str],
                                      device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read only the tensors for ``wanted_keys`` (diffusers names) from an original-layout safetensors file.

    Raises KeyError naming the first original key the file lacks.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=device) as f:
        available = set(f.keys())
        prefix = detect_original_prefix(available)
        out = {}
        for key in wanted_keys:
            original = prefix + diffusers_to_original_key(key)
            if original not in available:
                raise KeyError(original)
            out[key] = f.get_tensor(original)
    return out


def lora_to_original(lora_state_dict: Mapping[str, torch.Tensor], prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    """A diffusers-named LoRA (scale folded into lora_B) with original module names, for ComfyUI.

    Keys "<diffusers module>.lora_A.weight" / ".lora_B.weight" (an optional "transformer." prefix is
    allowed) become "<prefix><original module>.lora_A.weight" / ".lora_B.weight". Raises ValueError on
    keys that are not LoRA weights.
    """
    parsed, unknown = parse_lora_keys(lora_state_dict)
    if unknown:
        raise ValueError(f"Keys that are not LoRA weights: {unknown[:20]}")
    return {prefix + diffusers_to_original_key(module) + suffix: lora_state_dict[key] for key, module, suffix in parsed}
