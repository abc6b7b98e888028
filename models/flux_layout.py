"""Flux transformer key layout: diffusers <-> original (BFL release / ComfyUI) layout.

The whole mapping is one declarative table (``flux_layout``): each entry names one module of the
original checkpoint and the diffusers module(s) it holds, concatenated along dim 0 in order.
Every conversion here (weights both ways, lazy per-key loading, LoRA export) reads that table.

Split sizes of fused modules are symbolic ("inner", "mlp") and resolved from the model config
or from tensor shapes, so this works at any model size (diffusers' own converter assumes 3072).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

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
LINEAR = (("weight", "weight"), ("bias", "bias"))
RMS_NORM = (("weight", "scale"),)

ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@dataclass(frozen=True)
class LayoutEntry:
    """One original module and the diffusers module(s) it holds, fused along dim 0 in this order."""

    original: str
    diffusers: tuple[str, ...]
    params: tuple[tuple[str, str], ...] = LINEAR
    # Symbolic output size of each diffusers part ("inner" / "mlp"); only fused entries need it.
    part_dims: tuple[str, ...] = ()
    # The original stores the output halves as (shift, scale); diffusers as (scale, shift).
    swap_halves: bool = False

    @property
    def fused(self) -> bool:
        return len(self.diffusers) > 1

    def original_param(self, diffusers_param: str) -> str | None:
        return dict(self.params).get(diffusers_param)

    def format(self, i: int) -> "LayoutEntry":
        return LayoutEntry(
            self.original.format(i=i),
            tuple(d.format(i=i) for d in self.diffusers),
            self.params,
            self.part_dims,
            self.swap_halves,
        )


def _e(original, *diffusers, params=LINEAR, dims=(), swap=False) -> LayoutEntry:
    return LayoutEntry(original, tuple(diffusers), params, tuple(dims), swap)


# --- The table. "{i}" is the block index. ---------------------------------------------------------
_EMBEDDERS = (
    _e("img_in", "x_embedder"),
    _e("txt_in", "context_embedder"),
    _e("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    _e("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    _e("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    _e("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
)
_GUIDANCE = (
    _e("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    _e("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
)
_DOUBLE_BLOCK = tuple(
    _e(f"double_blocks.{{i}}.{o}", *(f"transformer_blocks.{{i}}.{d}" for d in ds), **kw)
    for o, ds, kw in (
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
    )
)
_SINGLE_BLOCK = tuple(
    _e(f"single_blocks.{{i}}.{o}", *(f"single_transformer_blocks.{{i}}.{d}" for d in ds), **kw)
    for o, ds, kw in (
        ("modulation.lin", ["norm.linear"], {}),
        # q, k, v and the MLP input all read the same normed hidden state: one matmul in the original.
        ("linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], {"dims": ["inner"] * 3 + ["mlp"]}),
        ("norm.query_norm", ["attn.norm_q"], {"params": RMS_NORM}),
        ("norm.key_norm", ["attn.norm_k"], {"params": RMS_NORM}),
        ("linear2", ["proj_out"], {}),
    )
)
_FINAL = (
    _e("final_layer.linear", "proj_out"),
    _e("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True),
)


def flux_layout(num_layers: int, num_single_layers: int, guidance_embeds: bool = True) -> tuple[LayoutEntry, ...]:
    """The full mapping table for a Flux transformer of the given depth."""
    entries = list(_EMBEDDERS) + (list(_GUIDANCE) if guidance_embeds else [])
    entries += [e.format(i) for i in range(num_layers) for e in _DOUBLE_BLOCK]
    entries += [e.format(i) for i in range(num_single_layers) for e in _SINGLE_BLOCK]
    return tuple(entries + list(_FINAL))


_DOUBLE_RE = re.compile(r"^(?:transformer_blocks|double_blocks)\.(\d+)\.")
_SINGLE_RE = re.compile(r"^(?:single_transformer_blocks|single_blocks)\.(\d+)\.")


@dataclass
class FluxLayout:
    """A ``flux_layout`` table with lookups by original and by diffusers module name."""

    entries: tuple[LayoutEntry, ...]
    by_original: dict[str, LayoutEntry] = field(init=False)
    by_diffusers: dict[str, tuple[LayoutEntry, int]] = field(init=False)

    def __post_init__(self):
        self.by_original = {e.original: e for e in self.entries}
        self.by_diffusers = {d: (e, j) for e in self.entries for j, d in enumerate(e.diffusers)}

    @classmethod
    def for_config(cls, config: Mapping) -> "FluxLayout":
        """Layout for a diffusers FluxTransformer2DModel config (``model.config`` or config.json dict)."""
        return cls(flux_layout(config["num_layers"], config["num_single_layers"], config.get("guidance_embeds", True)))

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> "FluxLayout":
        """Layout big enough for the given (unprefixed) original or diffusers keys."""
        num_layers = num_single = 0
        guidance = False
        for k in keys:
            if m := _DOUBLE_RE.match(k):
                num_layers = max(num_layers, int(m.group(1)) + 1)
            elif m := _SINGLE_RE.match(k):
                num_single = max(num_single, int(m.group(1)) + 1)
            elif k.startswith(("guidance_in.", "time_text_embed.guidance_embedder.")):
                guidance = True
        return cls(flux_layout(num_layers, num_single, guidance))


def flux_dims(config: Mapping) -> dict[str, int]:
    """Sizes of the symbolic part dims: inner = heads * head_dim, mlp = mlp_ratio (4) * inner."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    # diffusers' FluxSingleTransformerBlock is built with its default mlp_ratio of 4.0.
    return {"inner": inner, "mlp": int(inner * config.get("mlp_ratio", 4.0))}


def detect_original_prefix(keys: Iterable[str]) -> str:
    """The ``model.diffusion_model.`` / ``diffusion_model.`` prefix used by the keys, or ''."""
    keys = list(keys)
    for prefix in ORIGINAL_PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    # An involution: the same swap converts in both directions.
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _raise_unknown(keys: list[str], what: str):
    if keys:
        shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
        raise ValueError(f"Keys not in the Flux {what} layout: {shown}")


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Convert a diffusers FluxTransformer2DModel state dict to the original layout.

    Keys get ``prefix`` prepended (e.g. "model.diffusion_model." for ComfyUI). Unfused tensors are
    passed through, not copied. Raises ValueError on keys outside the layout or incomplete fusions.
    """
    layout = FluxLayout.from_keys(state_dict)
    unknown = []
    for key in state_dict:
        module, param = _split_param(key)
        hit = layout.by_diffusers.get(module)
        if hit is None or hit[0].original_param(param) is None:
            unknown.append(key)
    _raise_unknown(unknown, "diffusers")

    out = {}
    for entry in layout.entries:
        for dparam, oparam in entry.params:
            parts = [state_dict.get(f"{d}.{dparam}") for d in entry.diffusers]
            if all(p is None for p in parts):
                continue
            if any(p is None for p in parts):
                missing = [f"{d}.{dparam}" for d, p in zip(entry.diffusers, parts) if p is None]
                raise ValueError(f"Cannot build {entry.original}.{oparam}: missing {missing}")
            t = torch.cat(parts, dim=0) if entry.fused else parts[0]
            out[f"{prefix}{entry.original}.{oparam}"] = _swap_halves(t) if entry.swap_halves else t
    return out


def _to_diffusers(wanted_keys, get_original_tensor, layout: FluxLayout, dims: Mapping[str, int]):
    # Group wanted keys by the original tensor they come from, so each fused tensor is read once.
    plan: dict[str, tuple[LayoutEntry, list[tuple[str, int]]]] = {}
    unknown = []
    for key in wanted_keys:
        module, param = _split_param(key)
        hit = layout.by_diffusers.get(module)
        oparam = hit[0].original_param(param) if hit else None
        if oparam is None:
            unknown.append(key)
            continue
        entry, j = hit
        plan.setdefault(f"{entry.original}.{oparam}", (entry, []))[1].append((key, j))
    _raise_unknown(unknown, "diffusers")

    out = {}
    for okey, (entry, wanted) in plan.items():
        t = get_original_tensor(okey)
        if entry.swap_halves:
            t = _swap_halves(t)
        if not entry.fused:
            for key, _ in wanted:
                out[key] = t
            continue
        sizes = [dims[d] for d in entry.part_dims]
        if sum(sizes) != t.shape[0]:
            raise ValueError(f"{okey} has {t.shape[0]} rows, expected {sizes} (sum {sum(sizes)}) from the config")
        pieces = torch.split(t, sizes, dim=0)
        for key, j in wanted:
            # Copy so the result owns its storage (no view pinning the fused tensor; safetensors-saveable).
            out[key] = pieces[j].clone()
    return {k: out[k] for k in wanted_keys}


def original_to_diffusers_keys(
    wanted_keys: Iterable[str],
    get_original_tensor: Callable[[str], torch.Tensor],
    config: Mapping,
) -> dict[str, torch.Tensor]:
    """Compute the wanted diffusers keys from a lazy getter of original tensors.

    ``get_original_tensor`` takes an unprefixed original key (e.g. "double_blocks.0.img_attn.qkv.weight").
    ``config`` is the diffusers transformer config; it gives the depth and the fused split sizes.
    """
    return _to_diffusers(list(wanted_keys), get_original_tensor, FluxLayout.for_config(config), flux_dims(config))


def _dims_from_original(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    inner = sd["img_in.weight"].shape[0]
    linear1 = next((v for k, v in sd.items() if _SINGLE_RE.match(k) and k.endswith(".linear1.weight")), None)
    return {"inner": inner, "mlp": linear1.shape[0] - 3 * inner if linear1 is not None else 4 * inner}


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Convert an original-layout Flux transformer state dict to diffusers keys.

    An optional "model.diffusion_model." / "diffusion_model." prefix is stripped; with a prefix, keys
    without it (other components of an all-in-one checkpoint) are ignored. Split sizes come from
    ``config`` if given, else from the tensor shapes. Raises ValueError on unknown keys.
    """
    prefix = detect_original_prefix(state_dict)
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    layout = FluxLayout.for_config(config) if config is not None else FluxLayout.from_keys(sd)
    dims = flux_dims(config) if config is not None else _dims_from_original(sd)

    wanted, unknown = [], []
    for key in sd:
        module, oparam = _split_param(key)
        entry = layout.by_original.get(module)
        dparam = {o: d for d, o in entry.params}.get(oparam) if entry else None
        if dparam is None:
            unknown.append(prefix + key)
        else:
            wanted += [f"{d}.{dparam}" for d in entry.diffusers]
    _raise_unknown(unknown, "original")
    return _to_diffusers(wanted, sd.__getitem__, layout, dims)


def load_diffusers_keys_from_original(
    path: str | Path, wanted_keys: Iterable[str], config: Mapping, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Read only the tensors needed for ``wanted_keys`` from an original-layout safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=device) as f:
        prefix = detect_original_prefix(f.keys())
        return original_to_diffusers_keys(wanted_keys, lambda k: f.get_tensor(prefix + k), config)


_LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}


def lora_to_original(
    lora_state_dict: Mapping[str, torch.Tensor],
    config: Mapping | None = None,
    prefix: str = "diffusion_model.",
) -> dict[str, torch.Tensor]:
    """Convert a diffusers-named LoRA (scale already folded into lora_B) to original module names.

    Keys "<diffusers module>.lora_A.weight" / ".lora_B.weight" (an optional "transformer." prefix is
    allowed) become "<prefix><original module>.lora_A.weight" / ".lora_B.weight" with scale 1.
    For fused original modules, A = cat(A_i) and B = blockdiag(B_i), which is exactly sum_i of the
    part updates; parts without a LoRA get zero rows, sized from ``config`` (or, without one, assuming
    the Flux sizes inner = A's in-features and mlp = 4 * inner). Raises ValueError on unknown keys.
    """
    loras: dict[str, dict[str, torch.Tensor]] = {}
    keys_of: dict[str, list[str]] = {}  # module -> its input keys, to name them in errors
    unknown = []
    for key, t in lora_state_dict.items():
        k = key.removeprefix("transformer.")
        suffix = next((s for s in _LORA_SUFFIXES if k.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        loras.setdefault(k[: -len(suffix)], {})[_LORA_SUFFIXES[suffix]] = t
        keys_of.setdefault(k[: -len(suffix)], []).append(key)
    layout = FluxLayout.from_keys(loras)
    unknown += [key for m in loras if m not in layout.by_diffusers for key in keys_of[m]]
    _raise_unknown(unknown, "diffusers LoRA")
    incomplete = [m for m, ab in loras.items() if len(ab) != 2]
    if incomplete:
        raise ValueError(f"LoRA modules missing lora_A or lora_B: {incomplete}")

    out = {}
    for entry in layout.entries:
        parts = [loras.get(d) for d in entry.diffusers]
        present = [p for p in parts if p is not None]
        if not present:
            continue
        if not entry.fused:
            a, b = present[0]["A"], present[0]["B"]
            if entry.swap_halves:
                b = _swap_halves(b)
        else:
            in_features = {p["A"].shape[1] for p in present}
            if len(in_features) != 1:
                raise ValueError(f"LoRA parts of {entry.original} disagree on in-features: {in_features}")
            # Without a config: every Flux fused module reads the block's hidden state, so in = inner.
            dims = flux_dims(config or {"num_attention_heads": 1, "attention_head_dim": in_features.pop()})
            a = torch.cat([p["A"] for p in present], dim=0)
            ref = present[0]["B"]
            b = ref.new_zeros(sum(p["B"].shape[0] if p else dims[d] for p, d in zip(parts, entry.part_dims)), a.shape[0])
            row = col = 0
            for p, d in zip(parts, entry.part_dims):
                if p is None:
                    row += dims[d]
                    continue
                rows, rank = p["B"].shape
                b[row : row + rows, col : col + rank] = p["B"]
                row, col = row + rows, col + rank
        out[f"{prefix}{entry.original}.lora_A.weight"] = a
        out[f"{prefix}{entry.original}.lora_B.weight"] = b
    return out
