"""LoRA files in other layouts, read as diffusers-named LoRA weights (for `init_from_existing`).

Read: this trainer's pytorch_lora_weights.safetensors ("transformer." + diffusers names) and
lora_comfyui.safetensors (original names, fused modules with block-diagonal B); diffusion-pipe's
saves (a folder holding adapter_model.safetensors: "diffusion_model." + the names of the model it
trains, diffusers names for FLUX.1 and LTX-Video, original names for HunyuanVideo, whose fused
modules share one A); and kohya-style files ("lora_unet_" + the original name with "_" for ".",
lora_down / lora_up, with an .alpha each).

The result maps each diffusers module to (A, B) with the file's whole scale in B: B @ A is the
weight change the file applies. A fused original module (q, k and v in one) becomes one LoRA per
part: B's rows of that part, with the A rows its nonzero columns use, so each part's change is
exactly the file's and no part gets more than the rank the file gave it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from utils.errors import ConfigError

# Files a folder may hold, in the order they are looked for.
LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "lora_comfyui.safetensors")
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_down.weight": "A", ".lora_up.weight": "B",
             ".alpha": "alpha"}
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")

LoRAs = dict[str, tuple[torch.Tensor, torch.Tensor]]


def lora_file_in(path: Path) -> Path:
    """The LoRA file `init_from_existing` names: the file itself, or the first of LORA_FILE_NAMES
    in a folder (a run's adapters/<step>/, or a diffusion-pipe epoch folder)."""
    if not path.is_dir():
        return path
    for name in LORA_FILE_NAMES:
        if (path / name).is_file():
            return path / name
    raise ConfigError(f"adapter.init_from_existing: {path} holds none of {', '.join(LORA_FILE_NAMES)}")


def read_lora_modules(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """The LoRA of each module named in a file: {module name: {"A", "B"[, "alpha"]}}, prefixes
    stripped (kohya names keep their "lora_unet_" form), and the keys that are no LoRA weight."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, value in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            other.append(key)
            continue
        name = key[: -len(suffix)]
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        modules.setdefault(name, {})[_SUFFIXES[suffix]] = value
    return modules, other


DORA_MAGNITUDE = ".lora_magnitude_vector"


def read_dora_magnitudes(file: Path) -> dict[str, torch.Tensor]:
    """The DoRA magnitudes in a diffusers/peft LoRA file, {module name: magnitude}, prefixes
    stripped; empty for a plain LoRA."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(file), "pt") as st:
        for key in st.keys():
            name = key.removesuffix(".weight")
            if name.endswith(DORA_MAGNITUDE):
                name = name[: -len(DORA_MAGNITUDE)]
                for prefix in _PREFIXES:
                    name = name.removeprefix(prefix)
                out[name] = st.get_tensor(key).float()
    return out


def with_scale_in_b(parts: dict[str, torch.Tensor], file: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in float32 with a kohya .alpha (alpha / rank) multiplied into B."""
    if "A" not in parts or "B" not in parts:
        raise ConfigError(f"adapter.init_from_existing: {file} has lora_A without lora_B (or the other way) for {name}")
    a, b = parts["A"].float(), parts["B"].float()
    if "alpha" in parts:
        b = b * (float(parts["alpha"]) / a.shape[0])
    return a, b


def _part_lora(a: torch.Tensor, b_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One part of a fused LoRA: its B rows with the A rows of its nonzero columns (rank 0 when
    they are all zero: a part without a LoRA, or one whose B is still zero)."""
    used = b_rows.abs().sum(dim=0) != 0
    return a[used].contiguous(), b_rows[:, used].contiguous()


def original_to_diffusers_loras(modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]], layout,
                                dims: Mapping[str, int]) -> tuple[LoRAs, list[str]]:
    """LoRAs on original modules (a models/key_layout.Layout) as LoRAs on diffusers modules, and
    the names the layout does not know."""
    out: LoRAs = {}
    unknown = []
    for name, (a, b) in modules.items():
        entry = layout.by_original.get(name)
        if entry is None:
            unknown.append(name)
            continue
        if entry.swap_halves:
            first, second = b.chunk(2, dim=0)
            b = torch.cat([second, first], dim=0)
        if not entry.fused:
            out[entry.diffusers[0]] = (a, b)
            continue
        sizes = [dims[d] for d in entry.part_dims]
        if sum(sizes) != b.shape[0]:
            raise ConfigError(f"adapter.init_from_existing: the LoRA on {name} has {b.shape[0]} output rows; this "
                              f"model's {name} has {sum(sizes)} (a LoRA of another model size?)")
        for part, rows in zip(entry.diffusers, torch.split(b, sizes, dim=0)):
            out[part] = _part_lora(a, rows)
    return out, unknown


def kohya_to_original(modules: dict[str, dict], original_names) -> tuple[dict[str, dict], list[str]]:
    """kohya names ("lora_unet_double_blocks_0_img_attn_qkv") as original module names."""
    by_flat = {n.replace(".", "_"): n for n in original_names}
    out, unknown = {}, []
    for name, parts in modules.items():
        if not name.startswith(_KOHYA_PREFIXES):
            out[name] = parts
            continue
        flat = name.removeprefix("lora_unet_").removeprefix("lora_transformer_")
        if flat in by_flat:
            out[by_flat[flat]] = parts
        else:
            unknown.append(name)
    return out, unknown


def read_lora_as_diffusers(file: Path, diffusers_modules, layout,
                           dims: Mapping[str, int],
                           rename_original: Optional[Callable[[str], Optional[str]]] = None) -> LoRAs:
    """Every LoRA in `file` on a diffusers module of this transformer (`diffusers_modules`: the
    names of its linear modules), with the file's scale in B. `layout` (a key_layout.Layout) maps
    original names, or `rename_original` does (a model whose layouts differ only by names)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
    except Exception as e:  # SafetensorError, OSError
        raise ConfigError(f"adapter.init_from_existing: {file} is not a readable .safetensors file ({e})") from None
    modules, other = read_lora_modules(tensors)
    other = [k for k in other if not k.removesuffix(".weight").endswith(DORA_MAGNITUDE)]
    if other:
        raise ConfigError(f"adapter.init_from_existing: {file} holds {len(other)} tensors that are no LoRA weight "
                          f"(e.g. {other[0]!r}): is it a LoRA file?")
    diffusers_modules = set(diffusers_modules)
    originals = list(layout.by_original) if layout is not None else []
    modules, unknown = kohya_to_original(modules, originals)
    loras: LoRAs = {}
    original: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, parts in modules.items():
        lora = with_scale_in_b(parts, file, name)
        if name in diffusers_modules:
            loras[name] = lora
        elif rename_original is not None and rename_original(name) in diffusers_modules:
            loras[rename_original(name)] = lora
        else:
            original[name] = lora
    if layout is not None:
        converted, not_original = original_to_diffusers_loras(original, layout, dims)
        loras.update(converted)
        unknown += not_original
    else:
        unknown += list(original)
    if unknown:
        raise ConfigError(f"adapter.init_from_existing: {file} has LoRAs on {len(unknown)} modules this transformer "
                          f"does not have (e.g. {sorted(unknown)[0]!r}): a LoRA of another model?")
    return loras


def suggested_targets(modules) -> str:
    """A target_modules regex for exactly these diffusers modules' kinds, for an error message."""
    import re

    stems, tails = set(), set()
    for name in modules:
        match = re.match(r"^(.*?)\.\d+\.(.*)$", name)
        if match:
            stems.add(re.escape(match.group(1)))
            tails.add(re.escape(match.group(2)))
        else:
            stems.add(re.escape(name))
    if not tails:
        return "(" + "|".join(sorted(stems)) + ")"
    return f"({'|'.join(sorted(stems))})\\.\\d+\\.({'|'.join(sorted(tails))})"
