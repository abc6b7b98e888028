"""Key layouts: diffusers <-> original (release / ComfyUI) transformer weights, the shared machinery.

A model's layout is one declarative table of ``LayoutEntry``: each names one module of the original
checkpoint and the diffusers module(s) it holds, concatenated along dim 0 in order. ``Layout`` holds
such a table with lookups by name, and every conversion (weights both ways, lazy per-key loading,
exact LoRA export) reads it. A model subclasses ``Layout`` with its table (``for_config`` /
``from_keys``) and its split sizes (``dims`` / ``dims_from_original``): see models/flux_layout.py
and models/hunyuan_layout.py.

Split sizes of fused modules are symbolic ("inner", "mlp") and resolved from the model config or
from tensor shapes, so conversions work at any model size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Mapping, Sequence

import torch

__all__ = [
    "LINEAR",
    "ORIGINAL_PREFIXES",
    "LORA_SUFFIXES",
    "LayoutEntry",
    "Layout",
    "entry",
    "block",
    "repeat",
    "block_counts",
    "attention_dims",
    "DOUBLE_BLOCK_RE",
    "SINGLE_BLOCK_RE",
    "GUIDANCE_PREFIXES",
    "single_stream_dims",
    "detect_original_prefix",
    "parse_lora_keys",
    "kohya_lora",
    "RenameTable",
]

# (diffusers parameter name, original parameter name)
LINEAR = (("weight", "weight"), ("bias", "bias"))

# Where single-file checkpoints keep the transformer: ComfyUI / all-in-one files, or bare.
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


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


# --- Building tables ------------------------------------------------------------------------------
def entry(original, *diffusers, params=LINEAR, dims=(), swap=False) -> LayoutEntry:
    """A table entry: ``dims`` are the parts' symbolic sizes, ``swap`` the (shift, scale) half swap."""
    return LayoutEntry(original, tuple(diffusers), params, tuple(dims), swap)


def block(original_prefix: str, diffusers_prefix: str, rows) -> tuple[LayoutEntry, ...]:
    """Entries of one block from rows (original module, [diffusers modules], entry() keywords)."""
    return tuple(entry(original_prefix + o, *(diffusers_prefix + d for d in ds), **kw) for o, ds, kw in rows)


def repeat(block_entries: Iterable[LayoutEntry], n: int) -> list[LayoutEntry]:
    """A block's entries ("{i}" in their names) for blocks 0 .. n-1, in block order."""
    block_entries = tuple(block_entries)
    return [e.format(i) for i in range(n) for e in block_entries]


def block_counts(keys: Iterable[str], patterns: Sequence[re.Pattern]) -> list[int]:
    """For each pattern (group 1: a block index), 1 + the largest index among the keys, or 0."""
    counts = [0] * len(patterns)
    for k in keys:
        for n, regex in enumerate(patterns):
            if m := regex.match(k):
                counts[n] = max(counts[n], int(m.group(1)) + 1)
    return counts


def attention_dims(config: Mapping) -> dict[str, int]:
    """Sizes of the symbolic part dims: inner = heads * head_dim, mlp = mlp_ratio (default 4) * inner."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    return {"inner": inner, "mlp": int(inner * config.get("mlp_ratio", 4.0))}


# --- Double-/single-stream transformers (Flux, HunyuanVideo): names both layouts share ------------
# Block indices in diffusers or original keys, and the guidance embedder's modules.
DOUBLE_BLOCK_RE = re.compile(r"^(?:transformer_blocks|double_blocks)\.(\d+)\.")
SINGLE_BLOCK_RE = re.compile(r"^(?:single_transformer_blocks|single_blocks)\.(\d+)\.")
GUIDANCE_PREFIXES = ("guidance_in.", "time_text_embed.guidance_embedder.")


def single_stream_dims(sd: Mapping[str, torch.Tensor], inner_weight: str) -> dict[str, int]:
    """Part dims from the shapes of an unprefixed original state dict: inner = rows of ``inner_weight``
    (the image input projection), mlp = rows of a single block's fused ``linear1`` (q, k, v and the
    MLP input) - 3 * inner, or 4 * inner without single blocks."""
    inner = sd[inner_weight].shape[0]
    linear1 = next((v for k, v in sd.items() if SINGLE_BLOCK_RE.match(k) and k.endswith(".linear1.weight")), None)
    return {"inner": inner, "mlp": linear1.shape[0] - 3 * inner if linear1 is not None else 4 * inner}


# --- Small shared helpers -------------------------------------------------------------------------
def detect_original_prefix(keys: Iterable[str]) -> str:
    """The ``model.diffusion_model.`` / ``diffusion_model.`` prefix used by the keys, or ''."""
    keys = list(keys)
    for prefix in ORIGINAL_PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def kohya_lora(original_lora: Mapping[str, torch.Tensor], prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    """An original-layout LoRA (unprefixed "<module>.lora_A.weight" / ".lora_B.weight", scale 1)
    in kohya's naming: "lora_unet_<module with _ for .>" with .lora_down.weight, .lora_up.weight and
    an .alpha equal to the rank (scale 1). ComfyUI and diffusers' kohya converters both read it."""
    out = {}
    for key, value in original_lora.items():
        module, _, kind = key.rpartition(".lora_")
        name = prefix + module.replace(".", "_")
        if kind == "A.weight":
            out[f"{name}.lora_down.weight"] = value
            out[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))
        else:
            out[f"{name}.lora_up.weight"] = value
    return out


def parse_lora_keys(keys: Iterable[str]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Split the keys of a diffusers-named LoRA state dict, in order.

    Returns (key, module, suffix) for each "[transformer.]<module>.lora_A.weight" / ".lora_B.weight"
    key (suffix one of LORA_SUFFIXES), and the keys that are not LoRA weights.
    """
    parsed, unknown = [], []
    for key in keys:
        k = key.removeprefix("transformer.")
        suffix = next((s for s in LORA_SUFFIXES if k.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
        else:
            parsed.append((key, k[: -len(suffix)], suffix))
    return parsed, unknown


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    # An involution: the same swap converts in both directions.
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


# --- The layout -----------------------------------------------------------------------------------
@dataclass
class Layout:
    """A mapping table with lookups by original and by diffusers module name, and the conversions.

    Subclasses give ``name`` (for error messages), the table (``for_config`` / ``from_keys``) and
    the split sizes (``dims`` / ``dims_from_original``). The conversions are classmethods: each
    builds the table it needs (from the config, or big enough for the keys it is given).
    """

    entries: tuple[LayoutEntry, ...]
    by_original: dict[str, LayoutEntry] = field(init=False)
    by_diffusers: dict[str, tuple[LayoutEntry, int]] = field(init=False)

    name: ClassVar[str] = "model"
    # Whether load_diffusers_keys_from_original also reads torch .pt / .pth / .bin files.
    reads_torch_files: ClassVar[bool] = False

    def __post_init__(self):
        self.by_original = {e.original: e for e in self.entries}
        self.by_diffusers = {d: (e, j) for e in self.entries for j, d in enumerate(e.diffusers)}

    # ---------------------------------------------------------------- per model
    @classmethod
    def for_config(cls, config: Mapping) -> "Layout":
        """Layout for a diffusers transformer config (``model.config`` or config.json dict)."""
        raise NotImplementedError

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> "Layout":
        """Layout big enough for the given (unprefixed) original or diffusers keys."""
        raise NotImplementedError

    @staticmethod
    def dims(config: Mapping) -> dict[str, int]:
        """Sizes of the symbolic part dims from the diffusers transformer config."""
        return attention_dims(config)

    @staticmethod
    def dims_from_original(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Sizes of the symbolic part dims from the shapes of an unprefixed original state dict."""
        raise NotImplementedError

    # ---------------------------------------------------------------- conversions
    @classmethod
    def _raise_unknown(cls, keys: list[str], what: str):
        if keys:
            shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
            raise ValueError(f"Keys not in the {cls.name} {what} layout: {shown}")

    @classmethod
    def diffusers_to_original(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        """Convert a diffusers transformer state dict to the original layout.

        Keys get ``prefix`` prepended (e.g. "model.diffusion_model." for ComfyUI). Unfused tensors are
        passed through, not copied. Raises ValueError on keys outside the layout or incomplete fusions.
        """
        layout = cls.from_keys(state_dict)
        unknown = []
        for key in state_dict:
            module, param = _split_param(key)
            hit = layout.by_diffusers.get(module)
            if hit is None or hit[0].original_param(param) is None:
                unknown.append(key)
        cls._raise_unknown(unknown, "diffusers")

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

    def _to_diffusers(self, wanted_keys: list[str], get_original_tensor, dims: Mapping[str, int]):
        # Group wanted keys by the original tensor they come from, so each fused tensor is read once.
        plan: dict[str, tuple[LayoutEntry, list[tuple[str, int]]]] = {}
        unknown = []
        for key in wanted_keys:
            module, param = _split_param(key)
            hit = self.by_diffusers.get(module)
            oparam = hit[0].original_param(param) if hit else None
            if oparam is None:
                unknown.append(key)
                continue
            entry, j = hit
            plan.setdefault(f"{entry.original}.{oparam}", (entry, []))[1].append((key, j))
        self._raise_unknown(unknown, "diffusers")

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

    @classmethod
    def original_to_diffusers_keys(
        cls,
        wanted_keys: Iterable[str],
        get_original_tensor: Callable[[str], torch.Tensor],
        config: Mapping,
    ) -> dict[str, torch.Tensor]:
        """Compute the wanted diffusers keys from a lazy getter of original tensors.

        ``get_original_tensor`` takes an unprefixed original key (e.g. Flux's "double_blocks.0.img_attn.qkv.weight").
        ``config`` is the diffusers transformer config; it gives the depth and the fused split sizes.
        """
        return cls.for_config(config)._to_diffusers(list(wanted_keys), get_original_tensor, cls.dims(config))

    @classmethod
    def original_to_diffusers(
        cls, state_dict: Mapping[str, torch.Tensor], config: Mapping | None = None
    ) -> dict[str, torch.Tensor]:
        """Convert an original-layout transformer state dict to diffusers keys.

        An optional "model.diffusion_model." / "diffusion_model." prefix is stripped; with a prefix, keys
        without it (other components of an all-in-one checkpoint) are ignored. Split sizes come from
        ``config`` if given, else from the tensor shapes. Raises ValueError on unknown keys.
        """
        prefix = detect_original_prefix(state_dict)
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        layout = cls.for_config(config) if config is not None else cls.from_keys(sd)
        dims = cls.dims(config) if config is not None else cls.dims_from_original(sd)

        wanted, unknown = [], []
        for key in sd:
            module, oparam = _split_param(key)
            entry = layout.by_original.get(module)
            dparam = {o: d for d, o in entry.params}.get(oparam) if entry else None
            if dparam is None:
                unknown.append(prefix + key)
            else:
                wanted += [f"{d}.{dparam}" for d in entry.diffusers]
        cls._raise_unknown(unknown, "original")
        return layout._to_diffusers(wanted, sd.__getitem__, dims)

    @classmethod
    def load_diffusers_keys_from_original(
        cls, path: str | Path, wanted_keys: Iterable[str], config: Mapping, device: str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Read only the tensors needed for ``wanted_keys`` from an original-layout checkpoint.

        A .safetensors file is read lazily. Where the layout ``reads_torch_files``, a .pt / .pth / .bin
        file (a state dict, or one under "module") is memory-mapped instead; a key it lacks raises
        KeyError naming the original key.
        """
        path = Path(path)
        if cls.reads_torch_files and path.suffix in _TORCH_SUFFIXES:
            sd = torch.load(path, map_location=device, mmap=True, weights_only=True)
            sd = sd.get("module", sd)
            prefix = detect_original_prefix(sd)
            return cls.original_to_diffusers_keys(wanted_keys, lambda k: sd[prefix + k], config)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=device) as f:
            prefix = detect_original_prefix(f.keys())
            return cls.original_to_diffusers_keys(wanted_keys, lambda k: f.get_tensor(prefix + k), config)

    @classmethod
    def lora_to_original(
        cls,
        lora_state_dict: Mapping[str, torch.Tensor],
        config: Mapping | None = None,
        prefix: str = "diffusion_model.",
    ) -> dict[str, torch.Tensor]:
        """Convert a diffusers-named LoRA (scale already folded into lora_B) to original module names.

        Keys "<diffusers module>.lora_A.weight" / ".lora_B.weight" (an optional "transformer." prefix is
        allowed) become "<prefix><original module>.lora_A.weight" / ".lora_B.weight" with scale 1.
        For fused original modules, A = cat(A_i) and B = blockdiag(B_i), which is exactly sum_i of the
        part updates; parts without a LoRA get zero rows, sized from ``config`` (or, without one, from
        ``dims`` assuming inner = A's in-features and mlp = 4 * inner). Raises ValueError on unknown keys.
        """
        loras: dict[str, dict[str, torch.Tensor]] = {}  # module -> {"A": lora_A, "B": lora_B}
        keys_of: dict[str, list[str]] = {}  # module -> its input keys, to name them in errors
        parsed, unknown = parse_lora_keys(lora_state_dict)
        for key, module, suffix in parsed:
            loras.setdefault(module, {})["A" if suffix == ".lora_A.weight" else "B"] = lora_state_dict[key]
            keys_of.setdefault(module, []).append(key)
        layout = cls.from_keys(loras)
        unknown += [key for m in loras if m not in layout.by_diffusers for key in keys_of[m]]
        cls._raise_unknown(unknown, "diffusers LoRA")
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
                dims = cls.dims(config or {"num_attention_heads": 1, "attention_head_dim": in_features.pop()})
                a = torch.cat([p["A"] for p in present], dim=0)
                b = present[0]["B"].new_zeros(
                    sum(p["B"].shape[0] if p else dims[d] for p, d in zip(parts, entry.part_dims)), a.shape[0]
                )
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


# --- Rename-only layouts (LTX-Video, Wan): the same tensors under other names ----------------------
class RenameTable:
    """Module renames between an original layout and diffusers', for models whose layouts differ
    by names only. Rows are (original path, diffusers path); "{i}" and any other "{name}" stand for
    a number (a block index). A path matches itself and anything below it; the first matching row
    wins, and a key no row matches has the same name in both layouts."""

    def __init__(self, rows: Sequence[tuple[str, str]]):
        self.rows = tuple(rows)
        self._to_diffusers = [(self._pattern(o), d) for o, d in self.rows]
        self._to_original = [(self._pattern(d), o) for o, d in self.rows]

    @staticmethod
    def _pattern(path: str) -> re.Pattern:
        escaped = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", re.escape(path))
        return re.compile(f"^{escaped}(?=\\.|$)")

    @staticmethod
    def _rename(key: str, rules) -> str:
        for pattern, replacement in rules:
            m = pattern.match(key)
            if m:
                return replacement.format(**m.groupdict()) + key[m.end():]
        return key

    def to_original(self, key: str) -> str:
        """One diffusers key (parameter or module path) in the original layout."""
        return self._rename(key, self._to_original)

    def to_diffusers(self, key: str) -> str:
        """One unprefixed original key (parameter or module path) in the diffusers layout."""
        return self._rename(key, self._to_diffusers)

    def diffusers_to_original(self, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        """A diffusers state dict with original keys (``prefix`` prepended); tensors are not copied."""
        return {prefix + self.to_original(k): v for k, v in state_dict.items()}

    def original_to_diffusers(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An original-layout state dict with diffusers keys. A "model.diffusion_model." /
        "diffusion_model." prefix is stripped; with a prefix, keys without it (the VAE or text
        encoder of an all-in-one file) are left out."""
        prefix = detect_original_prefix(state_dict)
        return {self.to_diffusers(k[len(prefix):]): v for k, v in state_dict.items() if k.startswith(prefix)}

    def load_diffusers_keys_from_original(self, path: str | Path, wanted_keys: Iterable[str],
                                          device: str = "cpu") -> dict[str, torch.Tensor]:
        """Read only the tensors for ``wanted_keys`` (diffusers names) from an original-layout
        safetensors file. Raises KeyError naming the first original key the file lacks."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=device) as f:
            available = set(f.keys())
            prefix = detect_original_prefix(available)
            out = {}
            for key in wanted_keys:
                original = prefix + self.to_original(key)
                if original not in available:
                    raise KeyError(original)
                out[key] = f.get_tensor(original)
        return out

    def lora_to_original(self, lora_state_dict: Mapping[str, torch.Tensor],
                         prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
        """A diffusers-named LoRA (scale folded into lora_B) with original module names, for ComfyUI:
        "[transformer.]<module>.lora_A.weight" / ".lora_B.weight" become "<prefix><original
        module>.lora_A.weight" / ".lora_B.weight". Raises ValueError on keys that are not LoRA weights."""
        parsed, unknown = parse_lora_keys(lora_state_dict)
        if unknown:
            raise ValueError(f"Keys that are not LoRA weights: {unknown[:20]}")
        return {prefix + self.to_original(module) + suffix: lora_state_dict[key] for key, module, suffix in parsed}

