"""LoRA for every model: injected into the modules the adapter targets, initialised the same for
any pipeline split, started from an existing file of any layout models/lora_import.py reads, and
saved as diffusers' file plus the recipe's extra formats."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import save_file
from torch import nn

from models.base import ModelRecipe
from models.lora_import import lora_file_in, read_dora_magnitudes, read_lora_as_diffusers, suggested_targets
from models.pipeline_layers import named_weights
from training.weights import open_safetensors, set_parameter
from utils.config import AdapterConfig
from utils.dtypes import DTYPES
from utils.schema import ConfigError
from utils.seeding import generator_for


def add_lora(recipe: ModelRecipe, transformer: nn.Module, adapter: AdapterConfig) -> None:
    """Inject LoRA layers (on the meta device until their layer is materialised) into the
    modules `lora_targets` names."""
    targets = adapter.target_modules or recipe.default_lora_targets
    if adapter.target_include or adapter.target_exclude:
        # Whole names, as one regex: a list entry would also match every name ending in it.
        names = lora_targets(recipe, transformer, adapter)
        targets = "|".join(re.escape(n) for n in names)
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

    Seeding by module name makes the initial adapter identical for any pipeline split.
    """
    for name, param in named_weights(transformer, module_names):
        if "lora_A" in name:
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


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """This process's materialised LoRA weights, keyed like diffusers' LoRA files (no prefix)."""
    return {_lora_file_name(n): p.detach().cpu() for n, p in transformer.named_parameters()
            if "lora_" in n and not p.is_meta}


def save_lora(recipe: ModelRecipe, lora: dict[str, torch.Tensor], adapter: AdapterConfig, out_dir: Path,
              dtype: torch.dtype) -> list[Path]:
    """Write the adapter in diffusers format plus the model's extra formats.

    The alpha/rank scale is multiplied into lora_B, so every loader, with or without an
    alpha field, applies the adapter exactly as trained.
    """
    scale = adapter.alpha / adapter.rank
    scaled = {k: (v.float() * scale if ".lora_B." in k else v.float()).to(dtype).contiguous()
              for k, v in sorted(lora.items())}
    out_dir.mkdir(parents=True, exist_ok=True)
    diffusers_file = out_dir / "pytorch_lora_weights.safetensors"
    save_file({f"transformer.{k}": v for k, v in scaled.items()}, diffusers_file,
              metadata={"format": "pt", "trainer_model_type": recipe.name})
    written = [diffusers_file]
    if adapter.use_dora:
        return written  # the original layout has no DoRA magnitudes (examples/flux.toml)
    for filename, tensors in recipe.extra_lora_formats(scaled).items():
        # kohya's alpha scalars stay float32: exact at any rank.
        save_file({k: (v.float() if k.endswith(".alpha") else v.to(dtype)).contiguous() for k, v in tensors.items()},
                  out_dir / filename, metadata={"format": "pt"})
        written.append(out_dir / filename)
    return written


def read_lora_file(recipe: ModelRecipe, transformer: nn.Module, path: Path, adapter: AdapterConfig) -> dict[str, tuple]:
    """The LoRA that `init_from_existing` names, as {LoRA module of `transformer`: (A, B)} of
    adapter.rank with this adapter's alpha / rank scale divided out of B, so that the adapter
    applies exactly the file's weight change. Any layout models/lora_import.py reads."""
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
        found = read_lora_as_diffusers(file, linears, table, dims, recipe.keymap.renamed_module)
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


def _lora_file_name(param_name: str) -> str:
    # "x.to_q.lora_A.default.weight" -> "x.to_q.lora_A.weight" (diffusers' LoRA file naming); a DoRA
    # magnitude is "x.to_q.lora_magnitude_vector", as peft saves it and diffusers loads it.
    name = param_name.replace(".default.", ".")
    return name.removesuffix(".weight") if name.endswith(".lora_magnitude_vector.weight") else name


def name_examples(names: list[str], n: int = 2) -> str:
    """The first `n` names, quoted, for an error message ("..." when there are more)."""
    return ", ".join(repr(x) for x in names[:n]) + (", ..." if len(names) > n else "")
