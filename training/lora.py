"""LoRA for every model: injected into the modules the adapter targets, initialised the same for
any pipeline split, and started from an existing file (`init_from_existing`) of any layout users
hold. Writing the files is saving/export.py's (training imports saving, never the reverse).

Files read: this trainer's pytorch_lora_weights.safetensors ("transformer." + diffusers names) and
lora_comfyui.safetensors (original names, fused modules with block-diagonal B); diffusion-pipe's
saves (a folder holding adapter_model.safetensors: "diffusion_model." + the names of the model it
trains, diffusers names for FLUX.1 and LTX-Video, original names for HunyuanVideo, whose fused
modules share one A); and kohya-style files ("lora_unet_" + the original name with "_" for ".",
lora_down / lora_up, with an .alpha each). Each comes out as (A, B) per diffusers module with the
file's whole scale in B: B @ A is the weight change the file applies. A fused original module (q,
k and v in one) becomes one LoRA per part: B's rows of that part, with the A rows its nonzero
columns use, so each part's change is exactly the file's and no part gets more than the rank the
file gave it. LoKr and LoHa files (this trainer's and LyCORIS / kohya ones) are read by
`read_lycoris_file`, onto peft's factors of the same shapes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from accelerate import init_empty_weights
from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from config.training import AdapterConfig
from models.base import ModelRecipe
from models.keymaps.keymap import LYCORIS_FACTORS, RenameKeymap
from models.pipeline_layers import is_adapter_weight, named_weights
from saving.export import LYCORIS_SCALED, adapter_file_key
from training.weights import open_safetensors, set_parameter
from utils.dtypes import DTYPES
from utils.errors import ConfigError
from utils.seeding import generator_for


def add_lora(recipe: ModelRecipe, transformer: nn.Module, adapter: AdapterConfig) -> None:
    """Inject LoRA layers (on the meta device until their layer is materialised) into the
    modules `lora_targets` names."""
    targets = adapter.target_modules or recipe.default_lora_targets
    if adapter.target_include or adapter.target_exclude:
        # Whole names, as one regex: a list entry would also match every name ending in it.
        names = lora_targets(recipe, transformer, adapter)
        targets = "|".join(re.escape(n) for n in names)
    if adapter.type == "lokr":
        lora_config = LoKrConfig(r=adapter.rank, alpha=adapter.alpha, target_modules=targets)
    elif adapter.type == "loha":
        lora_config = LoHaConfig(r=adapter.rank, alpha=adapter.alpha, target_modules=targets)
    else:
        lora_config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                                 target_modules=targets, init_lora_weights=True, use_dora=adapter.use_dora)
    try:
        with init_empty_weights(include_buffers=False):
            transformer.add_adapter(lora_config)
    except ValueError as e:
        raise ConfigError(f"adapter.target_modules: {e}") from None


def lora_targets(recipe: ModelRecipe, transformer: nn.Module, adapter: AdapterConfig) -> list[str]:
    """The names of the modules that get a LoRA, in the transformer's order: those
    target_modules (or the model's default) names as peft matches them, plus the linear
    modules a target_include regex finds anywhere in their name, less those a target_exclude
    regex finds. A pattern that finds nothing is a ConfigError naming it."""
    base = LoraConfig(target_modules=adapter.target_modules or recipe.default_lora_targets)
    modules = [(n, m) for n, m in transformer.named_modules() if n]
    chosen = {n for n, _ in modules if check_target_module_exists(base, n)}
    linear = [n for n, m in modules if isinstance(m, nn.Linear)]
    for i, pattern in enumerate(adapter.target_include):
        found = [n for n in linear if re.search(pattern, n)]
        if not found:
            raise ConfigError(f"adapter.target_include[{i}]: {pattern!r} matches no linear module of the "
                              f"{recipe.name} transformer (names look like {name_examples(linear, 3)})")
        chosen.update(found)
    for i, pattern in enumerate(adapter.target_exclude):
        found = [n for n in chosen if re.search(pattern, n)]
        if not found:
            raise ConfigError(f"adapter.target_exclude[{i}]: {pattern!r} matches none of the {len(chosen)} "
                              f"targeted modules (names look like {name_examples(sorted(chosen), 3)})")
        chosen.difference_update(found)
    if not chosen:
        raise ConfigError("adapter.target_exclude: leaves no module to train")
    return [n for n, _ in modules if n in chosen]


def init_lora(transformer: nn.Module, module_names: list[str], adapter: AdapterConfig,
              device: torch.device, seed: int) -> None:
    """Materialise the LoRA weights of the named submodules: A seeded per module, B zero;
    with DoRA, each magnitude the norm of its base weight's rows (the base weights of these
    modules are loaded already), so that the adapted layer starts as the base layer.

    LoKr and LoHa weights start as peft starts them (one factor zero, the others He-uniform), each
    seeded by its name too.

    Seeding by module name makes the initial adapter identical for any pipeline split.
    """
    for name, param in named_weights(transformer, module_names):
        kind = name.removesuffix(".default").rpartition(".")[2]
        if kind in LYCORIS_ZERO:
            weight = torch.zeros(param.shape, dtype=torch.float32)
        elif kind.startswith(("lokr_", "hada_")):
            weight = torch.empty(param.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator_for(seed, "lora", name))
        elif "lora_A" in name:
            weight = torch.empty(param.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator_for(seed, "lora", name))
        elif "lora_B" in name:
            weight = torch.zeros(param.shape, dtype=torch.float32)
        elif "lora_magnitude_vector" in name:
            # DoRA (Liu et al., arXiv:2402.09353, eq. 5): m = ||W0||_c, one norm per output row
            # of the base weight, as peft's DoraLinearLayer.update_layer sets it.
            base = transformer.get_submodule(name.split(".lora_magnitude_vector.")[0]).base_layer.weight
            weight = torch.linalg.vector_norm(base.detach().float(), dim=1).cpu()
        else:
            continue
        set_parameter(transformer, name, weight.to(device=device, dtype=DTYPES[adapter.dtype]), trainable=True)


def load_lora_into(recipe: ModelRecipe, transformer: nn.Module, path: Path, adapter: AdapterConfig) -> None:
    """Start from an existing LoRA for `init_from_existing` (any layout `read_lora_file` reads):
    the materialised (this stage's) LoRA weights take the file's."""
    if adapter.type != "lora":
        for name, value in read_lycoris_file(recipe, transformer, path, adapter).items():
            param = transformer.get_parameter(name)
            if not param.is_meta:
                with torch.no_grad():
                    param.copy_(value)
        return
    loaded = read_lora_file(recipe, transformer, path, adapter)
    magnitudes = read_dora_magnitudes(lora_file_in(path))
    if magnitudes and not adapter.use_dora:
        raise ConfigError(f"adapter.init_from_existing: {path} is a DoRA adapter (it has magnitudes): "
                          f"set adapter.use_dora = true")
    for module, (a, b) in loaded.items():
        values = [(f"{module}.lora_A.default.weight", a), (f"{module}.lora_B.default.weight", b)]
        if module in magnitudes:
            values.append((f"{module}.lora_magnitude_vector.default.weight", magnitudes[module]))
        for name, value in values:
            param = transformer.get_parameter(name)
            if param.is_meta:
                continue
            with torch.no_grad():
                param.copy_(value)


def read_lora_file(recipe: ModelRecipe, transformer: nn.Module, path: Path, adapter: AdapterConfig) -> dict[str, tuple]:
    """The LoRA that `init_from_existing` names, as {LoRA module of `transformer`: (A, B)} of
    adapter.rank with this adapter's alpha / rank scale divided out of B, so that the adapter
    applies exactly the file's weight change. Any layout this module reads (see the top)."""
    file = lora_file_in(path)
    if not file.is_file():
        raise ConfigError(f"adapter.init_from_existing: {path} holds no pytorch_lora_weights.safetensors")
    with open_safetensors(file, "adapter.init_from_existing") as st:
        model_type = (st.metadata() or {}).get("trainer_model_type")
    if model_type is not None and model_type != recipe.name:
        raise ConfigError(f"adapter.init_from_existing: {file} is a LoRA for model type '{model_type}' "
                          f"(its metadata says so), but model.type = '{recipe.name}'")
    linears = {n.removesuffix(".base_layer") for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    if recipe.keymap is None:
        found = read_lora_as_diffusers(file, linears, None, {})
    else:
        table, dims = recipe.keymap.original_modules(recipe.transformer_config())
        found = read_lora_as_diffusers(file, linears, table, dims, recipe.keymap.renamed_module,
                                       original_names(recipe, sorted(linears), table))
    ours = {n.removesuffix(".lora_A.default.weight"): p for n, p in transformer.named_parameters()
            if n.endswith(".lora_A.default.weight")}
    # A part of a fused module without a LoRA comes out of the file with rank 0.
    extra = sorted(m for m in set(found) - set(ours) if found[m][0].shape[0])
    missing = sorted(set(ours) - set(found))
    if extra or missing:
        wanted = sorted(m for m in found if found[m][0].shape[0])
        raise ConfigError(f"adapter.init_from_existing: {file} is not a LoRA of this {recipe.name} adapter's "
                          f"target_modules: {len(missing)} of its {len(ours)} modules missing (e.g. "
                          f"{name_examples(missing, 1) or 'none'}), {len(extra)} more in the file (e.g. "
                          f"{name_examples(extra, 1) or 'none'}); for the file's modules write adapter.target_modules "
                          f"= '{suggested_targets(wanted)}'")
    ranks = {m: found[m][0].shape[0] for m in ours}
    too_high = {m: r for m, r in ranks.items() if r > adapter.rank}
    if too_high:
        m = sorted(too_high)[0]
        raise ConfigError(f"adapter.init_from_existing: {file} has rank {max(too_high.values())} LoRAs (e.g. {m}), "
                          f"adapter.rank = {adapter.rank}: set adapter.rank = {max(too_high.values())}")
    scale = adapter.alpha / adapter.rank
    out = {}
    for m, (a, b) in found.items():
        if m not in ours:
            continue
        pad = adapter.rank - a.shape[0]
        if pad:
            # Fewer directions in the file than the rank: fresh A rows with zero B columns add
            # nothing to the weight change and train like a new LoRA's.
            fresh = torch.empty(pad, a.shape[1])
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator_for("lora pad", m))
            a, b = torch.cat([a, fresh]), torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        out[m] = (a, b / scale)
    return out


def read_lycoris_file(recipe: ModelRecipe, transformer: nn.Module, path: Path,
                      adapter: AdapterConfig) -> dict[str, torch.Tensor]:
    """A LoKr or LoHa file for `init_from_existing`, as {parameter name of `transformer`: value}
    with this adapter's alpha / rank scale divided out, so the adapter applies exactly the file's
    weight change. Files read: this trainer's saves (saving/export.save_lora) and LyCORIS / kohya files
    (ComfyUI's and sd-scripts' layout: "lora_unet_" + the original module name with "_" for ".",
    or "lycoris_" / "lora_transformer_" + the diffusers name, each module with its factors and an
    .alpha). The file's scale is the one LyCORIS and ComfyUI apply: alpha over the rank of the
    decomposed factor (LoKr: of w2 when both are, of w1 when only it is; 1 when neither is or
    there is no alpha). Each module must be one this adapter targets, factored as peft factors it
    for this rank (the same factor shapes, each full or of this rank where peft's is)."""
    file = lora_file_in(path)
    if not file.is_file():
        raise ConfigError(f"adapter.init_from_existing: {path} holds no pytorch_lora_weights.safetensors")
    with open_safetensors(file, "adapter.init_from_existing") as st:
        tensors = {k: st.get_tensor(k) for k in st.keys()}
    found, other = read_lycoris_modules(tensors)
    kinds = {"lokr" if any(k.startswith("lokr_") for k in parts) else "loha" for parts in found.values()}
    if other or kinds != {adapter.type}:
        what = (f"a {' and '.join(sorted(kinds))} file" if kinds and not other
                else f"not a LoKr or LoHa file ({len(other)} other tensors, e.g. {sorted(other)[0]!r})")
        raise ConfigError(f"adapter.init_from_existing: {file} is {what}; adapter.type = '{adapter.type}'")
    modules = _lycoris_module_names(recipe, transformer, found, file)
    ours: dict[str, dict[str, str]] = {}
    for n, _ in transformer.named_parameters():
        if is_adapter_weight(n):
            module, _, kind = adapter_file_key(n).rpartition(".")
            ours.setdefault(module, {})[kind] = n
    extra, missing = sorted(set(modules) - set(ours)), sorted(set(ours) - set(modules))
    if extra or missing:
        raise ConfigError(f"adapter.init_from_existing: {file} is not a {adapter.type} adapter of these target "
                          f"modules: {len(missing)} of its {len(ours)} modules missing (e.g. "
                          f"{name_examples(missing, 1) or 'none'}), {len(extra)} more in the file (e.g. "
                          f"{name_examples(extra, 1) or 'none'}); for the file's modules write adapter.target_modules "
                          f"= '{suggested_targets(sorted(modules))}'")
    scale = adapter.alpha / adapter.rank
    out = {}
    for module, parts in modules.items():
        shapes = {kind: tuple(transformer.get_parameter(n).shape) for kind, n in ours[module].items()}
        values = (_lokr_values if adapter.type == "lokr" else _loha_values)(parts, shapes)
        if values is None:
            have = {k: tuple(v.shape) for k, v in sorted(parts.items()) if k != "alpha"}
            raise ConfigError(f"adapter.init_from_existing: the {adapter.type} of {module} in {file} is factored as "
                              f"{have}; this adapter (rank {adapter.rank}) as {dict(sorted(shapes.items()))}: set "
                              f"adapter.rank to the file's rank")
        values, file_scale = values
        for kind, value in values.items():
            out[ours[module][kind]] = value * (file_scale / scale) if kind in LYCORIS_SCALED else value
    return out


# A LyCORIS module's tensors: the LoKr and LoHa factors, the Tucker cores of convolutions, and alpha.
_LYCORIS_KINDS = LYCORIS_FACTORS | {"lokr_t2", "hada_t1", "hada_t2", "alpha"}


def read_lycoris_modules(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """{module name: {factor kind: tensor (float32)}} of a LoKr / LoHa file, prefixes stripped (kohya
    names keep their prefix), and the keys that are no LoKr or LoHa tensor."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, value in tensors.items():
        name, _, kind = key.rpartition(".")
        if kind not in _LYCORIS_KINDS or not name:
            other.append(key)
            continue
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        modules.setdefault(name, {})[kind] = value.float()
    # A module with an alpha only is no adapter module.
    other += [f"{m}.alpha" for m, parts in modules.items() if set(parts) == {"alpha"}]
    return {m: parts for m, parts in modules.items() if set(parts) != {"alpha"}}, other


def _lycoris_module_names(recipe: ModelRecipe, transformer: nn.Module, found: dict[str, dict], file: Path) -> dict:
    """The file's modules by this transformer's (diffusers) module names: diffusers names as they
    are, original names through the recipe's key map, kohya names ("lora_unet_" + an original name,
    "lycoris_" / "lora_transformer_" + a diffusers name, "_" for ".") by their flat form. A fused
    original module (q, k and v in one) is an error: a Kronecker or Hadamard product over the
    fused parts has no exact split into one per part."""
    linears = [n.removesuffix(".base_layer") for n, m in transformer.named_modules() if isinstance(m, nn.Linear)]
    table = recipe.keymap.original_modules(recipe.transformer_config())[0] if recipe.keymap is not None else None
    flat = {n.replace(".", "_"): n for n in original_names(recipe, linears, table) + linears}
    linears = set(linears)
    out, unknown, fused = {}, [], []
    for name, parts in found.items():
        if name.startswith(_KOHYA_PREFIXES + ("lycoris_",)):
            name = flat.get(name.split("_", 2)[2] if name.startswith("lora_") else name.removeprefix("lycoris_"), name)
        if name not in linears and table is not None and name in table.by_original:
            entry = table.by_original[name]
            if entry.fused or entry.swap_halves:
                fused.append(name)
                continue
            name = entry.diffusers[0]
        elif name not in linears and recipe.keymap is not None:
            name = recipe.keymap.renamed_module(name) or name
        if name not in linears:
            unknown.append(name)
        out[name] = parts
    if fused:
        raise ConfigError(f"adapter.init_from_existing: {file} has LoKr/LoHa modules on {len(fused)} fused original "
                          f"modules (e.g. {sorted(fused)[0]!r}: q, k and v in one), which have no exact split onto "
                          f"this trainer's separate modules")
    if unknown:
        raise ConfigError(f"adapter.init_from_existing: {file} has adapters on {len(unknown)} modules this "
                          f"transformer does not have (e.g. {sorted(unknown)[0]!r}): an adapter of another model?")
    return out


def _lokr_values(parts: dict[str, torch.Tensor], shapes: dict[str, tuple]):
    """(peft's LoKr factors of these `shapes` from a LyCORIS module's, the file's scale), or None
    when the file's factoring does not fit."""
    if "lokr_t2" in parts:
        return None
    values, rank = {}, None
    for i in ("1", "2"):
        full, a, b = parts.get(f"lokr_w{i}"), parts.get(f"lokr_w{i}_a"), parts.get(f"lokr_w{i}_b")
        if full is None and (a is None or b is None):
            return None
        if full is None:
            rank = b.shape[0]  # LyCORIS's dim: w2's rank when both factors are decomposed
        if f"lokr_w{i}" in shapes:
            values[f"lokr_w{i}"] = a @ b if full is None else full
        elif full is None:
            values[f"lokr_w{i}_a"], values[f"lokr_w{i}_b"] = a, b
        else:
            return None
    if any(tuple(v.shape) != shapes[k] for k, v in values.items()) or set(values) != set(shapes):
        return None
    return values, (float(parts["alpha"]) / rank if "alpha" in parts and rank else 1.0)


def _loha_values(parts: dict[str, torch.Tensor], shapes: dict[str, tuple]):
    """(peft's LoHa factors from a LyCORIS module's, the file's scale), or None when they differ."""
    values = {k: v for k, v in parts.items() if k != "alpha"}
    if {k: tuple(v.shape) for k, v in values.items()} != shapes:
        return None
    return values, (float(parts["alpha"]) / values["hada_w1_b"].shape[0] if "alpha" in parts else 1.0)


# peft's LoKr and LoHa weights that start at zero (so the adapter starts as the base model).
LYCORIS_ZERO = frozenset({"lokr_w1", "lokr_w1_a", "hada_w2_b"})


def name_examples(names: list[str], n: int = 2) -> str:
    """The first `n` names, quoted, for an error message ("..." when there are more)."""
    return ", ".join(repr(x) for x in names[:n]) + (", ..." if len(names) > n else "")


# --- LoRA files of other layouts ---------------------------------------------------------------
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


def original_to_diffusers_loras(modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]], table,
                                dims: Mapping[str, int]) -> tuple[LoRAs, list[str]]:
    """LoRAs on original modules (`table`: a models/keymaps/keymap.TableKeymap) as LoRAs on
    diffusers modules, and the names the table does not know."""
    out: LoRAs = {}
    unknown = []
    for name, (a, b) in modules.items():
        entry = table.by_original.get(name)
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


def kohya_to_original(modules: dict[str, dict], originals) -> tuple[dict[str, dict], list[str]]:
    """kohya names ("lora_unet_double_blocks_0_img_attn_qkv") as original module names."""
    by_flat = {n.replace(".", "_"): n for n in originals}
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


def read_lora_as_diffusers(file: Path, diffusers_modules, table,
                           dims: Mapping[str, int],
                           rename_original: Optional[Callable[[str], Optional[str]]] = None,
                           originals: list[str] = ()) -> LoRAs:
    """Every LoRA in `file` on a diffusers module of this transformer (`diffusers_modules`: the
    names of its linear modules), with the file's scale in B. `table` (a keymap's TableKeymap)
    maps original names, or `rename_original` does (a model whose layouts differ only by names);
    `originals` are the original module names kohya's flat names are matched against."""
    try:
        tensors = load_file(str(file))
    except Exception as e:  # SafetensorError, OSError
        raise ConfigError(f"adapter.init_from_existing: {file} is not a readable .safetensors file ({e})") from None
    modules, other = read_lora_modules(tensors)
    other = [k for k in other if not k.removesuffix(".weight").endswith(DORA_MAGNITUDE)]
    lycoris = [k for k in other if k.rpartition(".")[2] in _LYCORIS_KINDS - {"alpha"}]
    if lycoris:
        kind = "lokr" if any(".lokr_" in k for k in lycoris) else "loha"
        raise ConfigError(f"adapter.init_from_existing: {file} is a {kind} file; adapter.type = 'lora'")
    if other:
        raise ConfigError(f"adapter.init_from_existing: {file} holds {len(other)} tensors that are no LoRA weight "
                          f"(e.g. {other[0]!r}): is it a LoRA file?")
    diffusers_modules = set(diffusers_modules)
    modules, unknown = kohya_to_original(modules, list(originals))
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
    if table is not None:
        converted, not_original = original_to_diffusers_loras(original, table, dims)
        loras.update(converted)
        unknown += not_original
    else:
        unknown += list(original)
    if unknown:
        raise ConfigError(f"adapter.init_from_existing: {file} has LoRAs on {len(unknown)} modules this transformer "
                          f"does not have (e.g. {sorted(unknown)[0]!r}): a LoRA of another model?")
    return loras


def original_names(recipe: ModelRecipe, linears: list[str], table) -> list[str]:
    """The original module names of this transformer that kohya-style files flatten ("lora_unet_"
    + the name with "_" for "."): the key map's table, or each linear's renamed name."""
    if table is not None:
        return list(table.by_original)
    if recipe.keymap is not None and issubclass(recipe.keymap, RenameKeymap):
        return [recipe.keymap.diffusers_to_original_key(n) for n in linears]
    return []


def suggested_targets(modules) -> str:
    """A target_modules regex for exactly these diffusers modules' kinds, for an error message."""
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
