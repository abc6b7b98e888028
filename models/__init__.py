"""Model registry: each model type name maps to its recipe class.

Adding a model is a recipe file in `models/` (with its key map in `models/keymaps/`) plus one line
here; models/README.md is the checklist. Classes are imported on first use, so loading a config
does not import every model's dependencies.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from utils.errors import ConfigError

MODEL_CLASSES = {
    "flux": "models.flux:FluxModel",
    "ltx-video": "models.ltx_video:LTXVideoModel",
    "hunyuan-video": "models.hunyuan_video:HunyuanVideoModel",
    "wan": "models.wan:WanModel",
    "flux2": "models.flux2:Flux2Model",
}


def get_model_class(type_name: str, config_file: Path | str = "config"):
    """The model class registered as `type_name`; a ConfigError naming the key otherwise."""
    target = MODEL_CLASSES.get(type_name)
    if target is None:
        raise ConfigError(f"{config_file}: 'model.type' is {type_name!r}, which is not a known model; "
                          f"known: {', '.join(sorted(MODEL_CLASSES))}")
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)
