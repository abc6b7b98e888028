"""Checks of the model files and the LoRA to start from, by their headers, before anything is
cached or loaded: each mismatch is one ConfigError line saying what was expected and found."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from config.training import AdapterConfig
from models.base import ModelRecipe
from models.pipeline_layers import is_adapter_weight
from training.lora import add_lora, name_examples, read_lora_file, read_lycoris_file
from training.weights import SafetensorsFolder, base_name, open_safetensors
from utils.errors import ConfigError


def check_inputs(recipe: ModelRecipe, config_file: Path, adapter: AdapterConfig | None) -> None:
    """Check the model files and the LoRA to start from against what this model type needs,
    from file headers only, before anything is cached or loaded. Each mismatch is a
    ConfigError of one line saying what was expected and what was found."""
    try:
        if recipe.root.is_file():
            raise ConfigError(f"model.diffusers_path: {recipe.root} is a file; expected a diffusers folder of a "
                              f"{recipe.name} model (a single-file transformer goes in model.transformer_path)")
        transformer = recipe.build_empty_transformer()
        check_weight_files(recipe, transformer)
        recipe.check_encoder_files()
        if adapter is not None:
            add_lora(recipe, transformer, adapter)  # target patterns that find nothing fail here
        if adapter is not None and adapter.init_from_existing:
            check_lora_file(recipe, transformer, Path(adapter.init_from_existing), adapter)
    except ConfigError as e:
        raise ConfigError(f"{config_file}: {e}") from None


def check_weight_files(recipe: ModelRecipe, transformer: nn.Module) -> None:
    """The weights in the files must be exactly the transformer's, in its shapes. Only the
    diffusers folder is checked here; a single-file `transformer_path` is checked as it loads."""
    if recipe.config.transformer_path is not None:
        path = Path(recipe.config.transformer_path)
        if path.suffix == ".safetensors" or not path.suffix:
            with open_safetensors(path, "model.transformer_path"):
                pass
        return
    folder = recipe.transformer_folder()
    found = SafetensorsFolder(folder).shapes()
    expected = {base_name(n): tuple(p.shape) for n, p in transformer.named_parameters() if not is_adapter_weight(n)}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({name_examples(missing)})")
        if extra:
            parts.append(f"{len(extra)} unexpected ({name_examples(extra)})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape ({k!r}: expected {_shape_text(expected[k])}, "
                         f"found {_shape_text(found[k])})")
        raise ConfigError(f"model.diffusers_path: the weights in {folder} are not those of the "
                          f"{type(transformer).__name__} its config.json describes: expected {len(expected)} "
                          f"weights, found {len(found)}: {'; '.join(parts)}")


def check_lora_file(recipe: ModelRecipe, transformer: nn.Module, path: Path, adapter: AdapterConfig) -> None:
    """The LoRA file for `init_from_existing` must be this model's, with this adapter's rank
    and target modules. `transformer` has the adapter's LoRA layers (on the meta device)."""
    if adapter.type != "lora":
        read_lycoris_file(recipe, transformer, path, adapter)
    else:
        read_lora_file(recipe, transformer, path, adapter)


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"
