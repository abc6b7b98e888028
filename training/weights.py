"""The transformer's base weights: read lazily from a diffusers folder (or through the recipe's
keymap from a single original-layout file), loaded into the local pipeline stage's modules only,
and made trainable for full fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from models.base import ModelRecipe
from models.pipeline_layers import named_weights
from utils.errors import ConfigError


class SafetensorsFolder:
    """Lazy reader of a diffusers weights folder (single or sharded safetensors)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, Path] = {}
        index = next(iter(sorted(folder.glob("*.safetensors.index.json"))), None)
        if index is not None:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"model weights: {index} is not a readable weight index ({e})") from None
            self.files = {k: folder / v for k, v in weight_map.items()}
        else:
            for f in sorted(folder.glob("*.safetensors")):
                with open_safetensors(f, "model weights") as st:
                    self.files.update({k: f for k in st.keys()})
        if not self.files:
            raise ConfigError(f"model weights: no .safetensors weights in {folder}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight's shape, from the file headers only."""
        by_file: dict[Path, list[str]] = {}
        for k, f in self.files.items():
            by_file.setdefault(f, []).append(k)
        out = {}
        for f, keys in by_file.items():
            if not f.is_file():
                raise ConfigError(f"model weights: {f} is missing (named in the weight index of {self.folder})")
            with open_safetensors(f, "model weights") as st:
                present = set(st.keys())
                for k in keys:
                    if k not in present:
                        raise ConfigError(f"model weights: {f} lacks {k}, which the weight index names")
                    out[k] = tuple(st.get_slice(k).get_shape())
        return out

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        missing = [k for k in keys if k not in self.files]
        if missing:
            raise ConfigError(f"model weights: {self.folder} lacks {len(missing)} weights the transformer needs, "
                              f"e.g. {missing[:3]} (a checkpoint of another model?)")
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        out = {}
        for f, ks in by_file.items():
            with safe_open(f, "pt") as st:
                out.update({k: st.get_tensor(k) for k in ks})
        return out


def open_safetensors(path: Path, what: str):
    """safe_open, with a file that is not safetensors (or is damaged) as a ConfigError naming it."""
    try:
        return safe_open(str(path), "pt")
    except Exception as e:  # SafetensorError, or OSError for an unreadable file
        raise ConfigError(f"{what}: {path} is not a readable .safetensors file ({e})") from None


def read_weights(recipe: ModelRecipe, keys: list[str]) -> dict[str, torch.Tensor]:
    """The transformer's base weights for `keys` (diffusers naming), read lazily from disk: from
    the diffusers folder, or from a single-file `transformer_path` in the original layout."""
    path = recipe.config.transformer_path
    if path is None:
        return SafetensorsFolder(recipe.transformer_folder()).read(keys)
    try:
        return recipe.keymap.load_diffusers_keys_from_original(path, keys, recipe.transformer_config())
    except KeyError as e:
        raise ConfigError(f"model.transformer_path: {path} lacks the weight {e} of the original "
                          f"{recipe.keymap.name} layout (a checkpoint of another model?)") from None


def load_weights(recipe: ModelRecipe, transformer: nn.Module, module_names: list[str], device: torch.device) -> None:
    """Load the base weights of the named submodules (or parameters of the transformer itself)
    only: the local pipeline stage's."""
    names = [name for name, _ in named_weights(transformer, module_names) if "lora_" not in name]
    wanted = {base_name(name): name for name in names}
    tensors = read_weights(recipe, sorted(wanted))
    for key, name in wanted.items():
        set_parameter(transformer, name, tensors[key].to(device=device, dtype=recipe.dtype), trainable=False)


def make_trainable(transformer: nn.Module, dtype: torch.dtype) -> None:
    """Full fine-tuning: every loaded weight (the local stage's) becomes trainable in `dtype`."""
    for name, param in list(transformer.named_parameters()):
        if not param.is_meta:
            set_parameter(transformer, name, param.detach().to(dtype), trainable=True)


def base_name(param_name: str) -> str:
    # peft wraps a targeted Linear: "x.to_q.weight" becomes "x.to_q.base_layer.weight"
    return param_name.replace(".base_layer.", ".")


def set_parameter(root: nn.Module, name: str, value: torch.Tensor, trainable: bool) -> None:
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    module._parameters[attr] = nn.Parameter(value, requires_grad=trainable)
