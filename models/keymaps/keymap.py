"""Key maps: diffusers <-> original (release / ComfyUI) transformer weight names, the shared machinery.

``Keymap`` is what every model's key map offers the rest of the program: weights both ways, lazy
per-key loading from a single file, LoRA export, and what reading an original-layout LoRA needs.
Two shapes implement it. ``TableKeymap``: one declarative table of ``KeymapEntry``, each naming one
module of the original checkpoint and the diffusers module(s) it holds, concatenated along dim 0
in order (models/keymaps/flux.py, models/keymaps/hunyuan_video.py). ``RenameKeymap``: layouts
that differ by module names only, a table of renames (models/keymaps/ltx_video.py).

Split sizes of fused modules are symbolic ("inner", "mlp") and resolved from the model config or
from tensor shapes, so conversions work at any model size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Mapping, Sequence

import torch
from safetensors import safe_open

# (diffusers parameter name, original parameter name)
LINEAR = (("weight", "weight"), ("bias", "bias"))

# Where single-file checkpoints keep the transformer: ComfyUI / all-in-one files, or bare.
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# The factors of a LoKr / LoHa module (peft's and LyCORIS's names), after "<module>.".
LYCORIS_FACTORS = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                             "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})


@dataclass(frozen=True)
class KeymapEntry:
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

    def format(self, i: int) -> "KeymapEntry":
        return KeymapEntry(
            self.original.format(i=i),
            tuple(d.format(i=i) for d in self.diffusers),
            self.params,
            self.part_dims,
            self.swap_halves,
        )


# --- Building tables ------------------------------------------------------------------------------
def entry(original, *diffusers, params=LINEAR, dims=(), swap=False) -> KeymapEntry:
    """A table entry: ``dims`` are the parts' symbolic sizes, ``swap`` the (shift, scale) half swap."""
    return KeymapEntry(original, tuple(diffusers), params, tuple(dims), swap)


def block(original_prefix: str, diffusers_prefix: str, rows) -> tuple[KeymapEntry, ...]:
    """Entries of one block from rows (original module, [diffusers modules], entry() keywords)."""
    return tuple(entry(original_prefix + o, *(diffusers_prefix + d for d in ds), **kw) for o, ds, kw in rows)


def repeat(block_entries: Iterable[KeymapEntry], n: int) -> list[KeymapEntry]:
    """A block's entries ("{i}" in their names) for blocks 0 .. n-1, in block order."""
    block_entries = tuple(block_entries)
    return [e.format(i) for i in range(n) for e in block_entries]


def stream_table(head: Iterable[KeymapEntry], double_block: Iterable[KeymapEntry], single_block: Iterable[KeymapEntry],
                 final: Iterable[KeymapEntry], num_layers: int, num_single_layers: int) -> tuple[KeymapEntry, ...]:
    """The table of a transformer of double- then single-stream blocks (the FLUX family): the
    entries before the blocks, each block kind's entries for every block of it, the final ones."""
    return tuple(list(head) + repeat(double_block, num_layers) + repeat(single_block, num_single_layers) + list(final))


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


# --- The interface --------------------------------------------------------------------------------
class Keymap:
    """What a model's key map offers; every method is a classmethod (the map is class data).

    ``config`` is the diffusers transformer config (``model.config`` or the config.json dict): it
    gives the depth and the split sizes of fused modules. A key map of renames only ignores it.
    """

    name: ClassVar[str] = "model"  # for error messages

    @classmethod
    def diffusers_to_original(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        """A diffusers transformer state dict with original keys (``prefix`` prepended)."""
        raise NotImplementedError

    @classmethod
    def original_to_diffusers(cls, state_dict: Mapping[str, torch.Tensor],
                              config: Mapping | None = None) -> dict[str, torch.Tensor]:
        """An original-layout state dict with diffusers keys; a "model.diffusion_model." /
        "diffusion_model." prefix is stripped, and with a prefix, keys without it are left out."""
        raise NotImplementedError

    @classmethod
    def load_diffusers_keys_from_original(cls, path: str | Path, wanted_keys: Iterable[str], config: Mapping,
                                          device: str = "cpu") -> dict[str, torch.Tensor]:
        """Read only the tensors for ``wanted_keys`` (diffusers names) from an original-layout file;
        a key the file lacks raises KeyError naming the original key."""
        raise NotImplementedError

    @classmethod
    def lora_to_original(cls, lora_state_dict: Mapping[str, torch.Tensor], config: Mapping | None = None,
                         prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
        """A diffusers-named LoRA (scale folded into lora_B) on original module names."""
        raise NotImplementedError

    @classmethod
    def comfyui_lora(cls, lora_state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
        """The LoRA file written beside the diffusers one (lora_comfyui.safetensors): the original
        module names, which ComfyUI and the release's own code load."""
        return cls.lora_to_original(lora_state_dict, config)

    @classmethod
    def original_modules(cls, config: Mapping) -> tuple["TableKeymap | None", dict[str, int]]:
        """(the table of fused original modules, its part sizes), to read LoRAs saved on original
        module names; (None, {}) where the layouts differ by names only."""
        return None, {}

    @classmethod
    def renamed_module(cls, original_name: str) -> str | None:
        """The diffusers name of an original module, where the layouts differ by names only."""
        return None


# --- Key maps from a table of entries ------------------------------------------------------------
@dataclass
class TableKeymap(Keymap):
    """A mapping table with lookups by original and by diffusers module name, and the conversions.

    Subclasses give ``name`` (for error messages), the table builder (``table``, called with the
    count of each repeated block kind and whether the guidance embedder is there), the block kinds
    (``block_patterns``, ``block_config``) and the image input weight (``image_in_weight``) whose
    rows are the attention width. The conversions are classmethods: each builds the table it needs
    (from the config, or big enough for the keys it is given).
    """

    entries: tuple[KeymapEntry, ...]
    by_original: dict[str, KeymapEntry] = field(init=False)
    by_diffusers: dict[str, tuple[KeymapEntry, int]] = field(init=False)

    # Whether load_diffusers_keys_from_original also reads torch .pt / .pth / .bin files.
    reads_torch_files: ClassVar[bool] = False

    def __post_init__(self):
        self.by_original = {e.original: e for e in self.entries}
        self.by_diffusers = {d: (e, j) for e in self.entries for j, d in enumerate(e.diffusers)}

    # ---------------------------------------------------------------- per model
    # The table for the count of each repeated block kind (in ``block_patterns`` order) and
    # whether the guidance embedder is there: a staticmethod of the subclass.
    table: ClassVar[Callable[..., tuple[KeymapEntry, ...]]]
    # Each repeated block kind: a regex matching its diffusers and original keys (group 1: the
    # block index), and the config key that counts it with its default (None: required).
    block_patterns: ClassVar[tuple[re.Pattern, ...]] = (DOUBLE_BLOCK_RE, SINGLE_BLOCK_RE)
    block_config: ClassVar[tuple[tuple[str, int | None], ...]] = (("num_layers", None), ("num_single_layers", None))
    # The original image input projection's weight: its rows are the attention width.
    image_in_weight: ClassVar[str]

    @classmethod
    def for_config(cls, config: Mapping) -> "TableKeymap":
        """The table for a diffusers transformer config (``model.config`` or config.json dict)."""
        counts = [config[k] if default is None else config.get(k, default) for k, default in cls.block_config]
        return cls(cls.table(*counts, config.get("guidance_embeds", True)))

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> "TableKeymap":
        """A table big enough for the given (unprefixed) original or diffusers keys."""
        keys = list(keys)
        counts = block_counts(keys, cls.block_patterns)
        return cls(cls.table(*counts, any(k.startswith(GUIDANCE_PREFIXES) for k in keys)))

    @staticmethod
    def dims(config: Mapping) -> dict[str, int]:
        """Sizes of the symbolic part dims from the diffusers transformer config."""
        return attention_dims(config)

    @classmethod
    def dims_from_original(cls, sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Sizes of the symbolic part dims from the shapes of an unprefixed original state dict."""
        return single_stream_dims(sd, cls.image_in_weight)

    @classmethod
    def original_modules(cls, config: Mapping) -> tuple["TableKeymap", dict[str, int]]:
        return cls.for_config(config), cls.dims(config)

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
        plan: dict[str, tuple[KeymapEntry, list[tuple[str, int]]]] = {}
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


# --- Layouts that differ by module names only ------------------------------------------------------
def _rename_pattern(path: str) -> re.Pattern:
    # A module path as a regex matching it, and anything below it, at the start of a key.
    escaped = re.escape(path).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{n\}", r"(?P<n>[12])")
    return re.compile(f"^{escaped}(?=\\.|$)")


def _rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        m = pattern.match(key)
        if m:
            return replacement.format(**m.groupdict()) + key[m.end():]
    return key


class RenameKeymap(Keymap):
    """A key map of renames only: q, k and v separate in both layouts, most modules named alike.

    Subclasses give ``renames``, (original module path, diffusers module path) pairs; "{i}" is a
    block index, "{n}" an attention index (1 or 2). A module the table does not name has the same
    name in both layouts. Every tensor passes through unchanged.
    """

    renames: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._rules_to_diffusers = [(_rename_pattern(o), d) for o, d in cls.renames]
        cls._rules_to_original = [(_rename_pattern(d), o) for o, d in cls.renames]

    @classmethod
    def diffusers_to_original_key(cls, key: str) -> str:
        """One diffusers key (parameter or module path) in the original layout."""
        return _rename(key, cls._rules_to_original)

    @classmethod
    def original_to_diffusers_key(cls, key: str) -> str:
        """One unprefixed original key (parameter or module path) in the diffusers layout."""
        return _rename(key, cls._rules_to_diffusers)

    @classmethod
    def diffusers_to_original(cls, state_dict, prefix=""):
        return {prefix + cls.diffusers_to_original_key(k): v for k, v in state_dict.items()}

    @classmethod
    def original_to_diffusers(cls, state_dict, config=None):
        prefix = detect_original_prefix(state_dict)
        return {cls.original_to_diffusers_key(k[len(prefix):]): v for k, v in state_dict.items()
                if k.startswith(prefix)}

    @classmethod
    def load_diffusers_keys_from_original(cls, path, wanted_keys, config, device="cpu"):
        with safe_open(str(path), framework="pt", device=device) as f:
            available = set(f.keys())
            prefix = detect_original_prefix(available)
            out = {}
            for key in wanted_keys:
                original = prefix + cls.diffusers_to_original_key(key)
                if original not in available:
                    raise KeyError(original)
                out[key] = f.get_tensor(original)
        return out

    @classmethod
    def lora_to_original(cls, lora_state_dict, config=None, prefix="diffusion_model."):
        """Keys "<diffusers module>.lora_A.weight" / ".lora_B.weight" (an optional "transformer." prefix
        is allowed) become "<prefix><original module>.lora_A.weight" / ".lora_B.weight"; LoKr / LoHa
        factors ("<module>.lokr_w1", ...: LYCORIS_FACTORS) are renamed alike, each module being
        one module in both layouts. Raises ValueError on keys that are neither."""
        parsed, unknown = parse_lora_keys(lora_state_dict)
        factors = [k for k in unknown if k.rpartition(".")[2] in LYCORIS_FACTORS]
        unknown = [k for k in unknown if k not in factors]
        if unknown:
            raise ValueError(f"Keys that are not LoRA weights: {unknown[:20]}")
        out = {prefix + cls.diffusers_to_original_key(module) + suffix: lora_state_dict[key]
               for key, module, suffix in parsed}
        for key in factors:
            module, _, factor = key.removeprefix("transformer.").rpartition(".")
            out[f"{prefix}{cls.diffusers_to_original_key(module)}.{factor}"] = lora_state_dict[key]
        return out

    @classmethod
    def renamed_module(cls, original_name):
        return cls.original_to_diffusers_key(original_name)
