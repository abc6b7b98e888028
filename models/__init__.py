"""Model registry: each model type name maps to the class that implements it.

Adding a model is one file in `models/` plus one line here. Classes are imported on first use,
so loading a config does not import every model's dependencies.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from utils.schema import ConfigError

MODEL_CLASSES = {
    "flux": "models.flux:FluxModel",
    "ltx-video": "models.ltx_video:LTXVideoModel",
    "hunyuan-video": "models.hunyuan_video:HunyuanVideoModel",
    "wan": "models.wan:WanModel",
}


def get_model_class(type_name: str, config_file: Path | str = "config"):
    """The model class registered as `type_name`; a ConfigError naming the key otherwise."""
    target = MODEL_CLASSES.get(type_name)
    if target is None:
        raise ConfigError(f"{config_file}: 'model.type' is {type_name!r}, which is not a known model; "
                          f"known: {', '.join(sorted(MODEL_CLASSES))}")
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)
