"""HunyuanVideo transformer key layout: diffusers <-> original (Tencent release / ComfyUI) layout.

The whole mapping is one declarative table (``hunyuan_layout``): each entry names one module of the
original checkpoint and the diffusers module(s) it holds, concatenated along dim 0 in order. The
original fuses q, k, v into one linear (``img_attn_qkv``, ``txt_attn_qkv``, the token refiner's
``self_attn_qkv``), and in the single-stream blocks q, k, v and the MLP input into ``linear1``.
Every conversion here (weights both ways, lazy per-key loading, LoRA export) reads that table.

Split sizes of fused modules are symbolic ("inner", "mlp") and resolved from the model config or
from tensor shapes, so this works at any model size (diffusers' own converter assumes 3072).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from models.flux_layout import LINEAR, LayoutEntry

__all__ = [
    "HunyuanLayout",
    "hunyuan_layout",
    "hunyuan_dims",
    "detect_original_prefix",
    "diffusers_to_original",
    "original_to_diffusers",
    "original_to_diffusers_keys",
    "load_diffusers_keys_from_original",
    "lora_to_original",
]

WEIGHT = (("weight", "weight"),)  # RMSNorm: a scale only
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _e(original, *diffusers, params=LINEAR, dims=(), swap=False) -> LayoutEntry:
    return LayoutEntry(original, tuple(diffusers), params, tuple(dims), swap)


def _block(original_prefix: str, diffusers_prefix: str, rows) -> tuple[LayoutEntry, ...]:
    return tuple(_e(original_prefix + o, *(diffusers_prefix + d for d in ds), **kw) for o, ds, kw in rows)


QKV = {"dims": ["inner"] * 3}

# --- The table. "{i}" is the block index. ---------------------------------------------------------
_EMBEDDERS = (
    _e("img_in.proj", "x_embedder.proj"),
    _e("time_in.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    _e("time_in.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    _e("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    _e("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    # The text token refiner: its own timestep / pooled-text embedding, input projection and blocks.
    _e("txt_in.input_embedder", "context_embedder.proj_in"),
    _e("txt_in.t_embedder.mlp.0", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
    _e("txt_in.t_embedder.mlp.2", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
    _e("txt_in.c_embedder.linear_1", "context_embedder.time_text_embed.text_embedder.linear_1"),
    _e("txt_in.c_embedder.linear_2", "context_embedder.time_text_embed.text_embedder.linear_2"),
)
_GUIDANCE = (
    _e("guidance_in.mlp.0", "time_text_embed.guidance_embedder.linear_1"),
    _e("guidance_in.mlp.2", "time_text_embed.guidance_embedder.linear_2"),
)
_REFINER_BLOCK = _block("txt_in.individual_token_refiner.blocks.{i}.", "context_embedder.token_refiner.refiner_blocks.{i}.", (
    ("norm1", ["norm1"], {}),
    ("self_attn_qkv", ["attn.to_q", "attn.to_k", "attn.to_v"], QKV),
    ("self_attn_proj", ["attn.to_out.0"], {}),
    ("norm2", ["norm2"], {}),
    ("mlp.fc1", ["ff.net.0.proj"], {}),
    ("mlp.fc2", ["ff.net.2"], {}),
    ("adaLN_modulation.1", ["norm_out.linear"], {}),
))
_DOUBLE_BLOCK = _block("double_blocks.{i}.", "transformer_blocks.{i}.", (
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
_SINGLE_BLOCK = _block("single_blocks.{i}.", "single_transformer_blocks.{i}.", (
    # q, k, v and the MLP input all read the same normed hidden state: one matmul in the original.
    ("linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], {"dims": ["inner"] * 3 + ["mlp"]}),
    ("linear2", ["proj_out"], {}),
    ("q_norm", ["attn.norm_q"], {"params": WEIGHT}),
    ("k_norm", ["attn.norm_k"], {"params": WEIGHT}),
    ("modulation.linear", ["norm.linear"], {}),
))
_FINAL = (
    _e("final_layer.linear", "proj_out"),
    # The original stores (shift, scale); diffusers' AdaLayerNormContinuous (scale, shift).
    _e("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True),
)


def hunyuan_layout(num_layers: int, num_single_layers: int, num_refiner_layers: int,
                   guidance_embeds: bool = True) -> tuple[LayoutEntry, ...]:
    """The full mapping table for a HunyuanVideo transformer of the given depth."""
    entries = list(_EMBEDDERS) + (list(_GUIDANCE) if guidance_embeds else [])
    entries += [e.format(i) for i in range(num_refiner_layers) for e in _REFINER_BLOCK]
    entries += [e.format(i) for i in range(num_layers) for e in _DOUBLE_BLOCK]
    entries += [e.format(i) for i in range(num_single_layers) for e in _SINGLE_BLOCK]
    return tuple(entries + list(_FINAL))


_DOUBLE_RE = re.compile(r"^(?:transformer_blocks|double_blocks)\.(\d+)\.")
_SINGLE_RE = re.compile(r"^(?:single_transformer_blocks|single_blocks)\.(\d+)\.")
_REFINER_RE = re.compile(r"^(?:context_embedder\.token_refiner\.refiner_blocks|txt_in\.individual_token_refiner\.blocks)"
                         r"\.(\d+)\.")


@dataclass
class HunyuanLayout:
    """A ``hunyuan_layout`` table with lookups by original and by diffusers module name."""

    entries: tuple[LayoutEntry, ...]
    by_original: dict[str, LayoutEntry] = field(init=False)
    by_diffusers: dict[str, tuple[LayoutEntry, int]] = field(init=False)

    def __post_init__(self):
        self.by_original = {e.original: e for e in self.entries}
        self.by_diffusers = {d: (e, j) for e in self.entries for j, d in enumerate(e.diffusers)}

    @classmethod
    def for_config(cls, config: Mapping) -> "HunyuanLayout":
        """Layout for a diffusers HunyuanVideoTransformer3DModel config (``model.config`` or config.json dict)."""
        return cls(hunyuan_layout(config["num_layers"], config["num_single_layers"],
                                  config.get("num_refiner_layers", 2), config.get("guidance_embeds", True)))

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> "HunyuanLayout":
        """Layout big enough for the given (unprefixed) original or diffusers keys."""
        counts = {_DOUBLE_RE: 0, _SINGLE_RE: 0, _REFINER_RE: 0}
        guidance = False
        for k in keys:
            for regex in counts:
                if m := regex.match(k):
                    counts[regex] = max(counts[regex], int(m.group(1)) + 1)
            guidance |= k.startswith(("guidance_in.", "time_text_embed.guidance_embedder."))
        return cls(hunyuan_layout(counts[_DOUBLE_RE], counts[_SINGLE_RE], counts[_REFINER_RE], guidance))


def hunyuan_dims(config: Mapping) -> dict[str, int]:
    """Sizes of the symbolic part dims: inner = heads * head_dim, mlp = mlp_ratio * inner."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
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
        raise ValueError(f"Keys not in the HunyuanVideo {what} layout: {shown}")


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Convert a diffusers HunyuanVideoTransformer3DModel state dict to the original layout.

    Keys get ``prefix`` prepended. Unfused tensors are passed through, not copied. Raises ValueError
    on keys outside the layout or incomplete fusions.
    """
    layout = HunyuanLayout.from_keys(state_dict)
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


def _to_diffusers(wanted_keys, get_original_tensor, layout: HunyuanLayout, dims: Mapping[str, int]):
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
    """Compute the wanted diffusers keys from a lazy getter of unprefixed original tensors.

    ``config`` is the diffusers transformer config; it gives the depth and the fused split sizes.
    """
    return _to_diffusers(list(wanted_keys), get_original_tensor, HunyuanLayout.for_config(config), hunyuan_dims(config))


def _dims_from_original(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    inner = sd["img_in.proj.weight"].shape[0]
    linear1 = next((v for k, v in sd.items() if _SINGLE_RE.match(k) and k.endswith(".linear1.weight")), None)
    return {"inner": inner, "mlp": linear1.shape[0] - 3 * inner if linear1 is not None else 4 * inner}


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Convert an original-layout HunyuanVideo transformer state dict to diffusers keys.

    An optional "model.diffusion_model." / "diffusion_model." prefix is stripped; with a prefix, keys
    without it are ignored. Split sizes come from ``config`` if given, else from the tensor shapes.
    Raises ValueError on unknown keys.
    """
    prefix = detect_original_prefix(state_dict)
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    layout = HunyuanLayout.for_config(config) if config is not None else HunyuanLayout.from_keys(sd)
    dims = hunyuan_dims(config) if config is not None else _dims_from_original(sd)

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
    """Read only the tensors needed for ``wanted_keys`` from an original-layout checkpoint.

    A .safetensors file is read lazily; the release's .pt file (a state dict, or one under "module")
    is memory-mapped. Raises KeyError naming an original key the file lacks.
    """
    path = Path(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        sd = torch.load(path, map_location=device, mmap=True, weights_only=True)
        sd = sd.get("module", sd)
        prefix = detect_original_prefix(sd)
        return original_to_diffusers_keys(wanted_keys, lambda k: sd[prefix + k], config)
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
    inner = A's in-features and mlp = 4 * inner). Raises ValueError on unknown keys.
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
    layout = HunyuanLayout.from_keys(loras)
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
            # Without a config: every fused module reads the block's hidden state, so in = inner.
            dims = hunyuan_dims(config or {"num_attention_heads": 1, "attention_head_dim": in_features.pop()})
            a = torch.cat([p["A"] for p in present], dim=0)
            b = present[0]["B"].new_zeros(sum(p["B"].shape[0] if p else dims[d] for p, d in zip(parts, entry.part_dims)),
                                          a.shape[0])
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
