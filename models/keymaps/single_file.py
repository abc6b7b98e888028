"""Single-file VAEs and text encoders as users hold them (a model's release, ComfyUI's files), read
into the diffusers / transformers module their diffusers folder describes.

A ``SingleFileLayout`` says how such a file names the module's weights: under which key prefix
(the first one listed is the one written, by ``to_single_file``) and which names differ. Other
keys the file holds beside them (a language model's output head, CLIP's projections) are left
unread. The module itself is built from the diffusers folder's config, so the file gives the
weights only. Every mismatch is one ConfigError line naming the config key and the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import torch
from safetensors import safe_open
from torch import nn

from utils.errors import ConfigError

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class SingleFileLayout:
    """How one kind of single file names a module's weights."""

    name: str  # what the file holds, for messages: "HunyuanVideo VAE"
    example: str  # the file users have, for messages: "hunyuan_video_vae_bf16.safetensors"
    # Key prefixes before the module's own names, the one written first; "" for none.
    prefixes: tuple[str, ...] = ("",)
    # Where the layouts name modules differently: the file's name of every module key (unprefixed),
    # given all of them (a name may depend on how many blocks there are). None: the same names.
    file_names: Optional[Callable[[list[str]], dict[str, str]]] = None
    # A regex of the file's (unprefixed) keys stored as 1x1 convolution kernels where the module
    # has linear weights (two trailing dimensions of 1).
    conv_kernels: Optional[str] = None

    def file_keys(self, module_keys: Iterable[str]) -> dict[str, str]:
        """{module key: the file's key, without prefix}."""
        module_keys = list(module_keys)
        return self.file_names(module_keys) if self.file_names else {k: k for k in module_keys}

    def file_shape(self, file_key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the file stores the module's weight of `shape` under `file_key` in."""
        if self.conv_kernels and len(shape) == 2 and re.match(self.conv_kernels, file_key):
            return (*shape, 1, 1)
        return tuple(shape)

    def to_single_file(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A module's state dict in this layout (the first prefix): what the users' file holds."""
        names = self.file_keys(state_dict)
        return {self.prefixes[0] + names[k]: v.reshape(self.file_shape(names[k], tuple(v.shape))).contiguous()
                for k, v in state_dict.items()}


def _torch_state_dict(path: Path) -> dict:
    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    # Training checkpoints keep the weights under one of these entries.
    for entry in ("state_dict", "module", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(entry), dict):
            sd = sd[entry]
    if not isinstance(sd, dict):
        raise ValueError(f"holds a {type(sd).__name__}, not a state dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


class SingleFile:
    """A single weights file opened lazily (.safetensors) or memory-mapped (a torch .pt file)."""

    def __init__(self, path: str | Path, config_key: str, layout: SingleFileLayout):
        self.path, self.config_key, self.layout = Path(path), config_key, layout
        try:
            if self.path.suffix in _TORCH_SUFFIXES:
                self._tensors = _torch_state_dict(self.path)
                self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
            else:
                self._tensors = None
                with safe_open(str(self.path), "pt") as f:
                    self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # SafetensorError, pickle or OSError: not this kind of file
            kind = "torch" if self.path.suffix in _TORCH_SUFFIXES else ".safetensors"
            raise ConfigError(f"model.{config_key}: {self.path} is not a readable {kind} file ({e}); expected "
                              f"the {layout.name} ({layout.example})") from None

    def _error(self, problem: str) -> ConfigError:
        return ConfigError(f"model.{self.config_key}: {self.path} is not the {self.layout.name} the config in "
                           f"diffusers_path describes: {problem}; expected {self.layout.example} (or the "
                           f"diffusers folder's own weights: remove model.{self.config_key})")

    def match(self, expected: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
        """{module key: file key} for every expected weight (module key -> shape), checked against
        the file's header; the prefix is the listed one under which most expected weights are found."""
        names = self.layout.file_keys(expected)
        best: dict[str, str] = {}
        best_prefix = ""
        for prefix in self.layout.prefixes:
            found = {k: prefix + names[k] for k in expected}
            found = {k: f for k, f in found.items() if f in self.shapes}
            if len(found) > len(best):
                best, best_prefix = found, prefix
        # Keys beyond the module's are left unread: files carry heads and projections it does not use.
        if not best:
            some = ", ".join(sorted(self.shapes)[:3])
            raise self._error(f"it holds none of its {len(expected)} weights (its keys: {some}, ...)")
        missing = sorted(set(expected) - set(best))
        if missing:
            raise self._error(f"{len(missing)} of its {len(expected)} weights are missing (e.g. "
                              f"{', '.join(best_prefix + names[k] for k in missing[:3])})")
        stored = {k: self.layout.file_shape(names[k], expected[k]) for k in expected}
        wrong = [k for k in sorted(expected) if stored[k] != self.shapes[best[k]]]
        if wrong:
            k = wrong[0]
            raise self._error(f"{len(wrong)} weights have another shape (e.g. {best[k]!r}: expected "
                              f"{stored[k]}, found {self.shapes[best[k]]}): a model of another size")
        return best

    def read(self, keys: Mapping[str, str]) -> dict[str, torch.Tensor]:
        """{module key: tensor} for {module key: file key}."""
        if self._tensors is not None:
            return {k: self._tensors[f] for k, f in keys.items()}
        with safe_open(str(self.path), "pt") as f:
            return {k: f.get_tensor(fk) for k, fk in keys.items()}


def _tied_keys(module: nn.Module) -> set[str]:
    # transformers' tied weights (T5's encoder.embed_tokens is its shared embedding): set by tie_weights().
    tied = getattr(module, "_tied_weights_keys", None)
    return set(tied) if isinstance(tied, dict) else set()


def expected_weights(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """The module's state dict shapes, without tied copies (works on the meta device)."""
    tied = _tied_keys(module)
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if k not in tied}


def check_single_file(path: str | Path, config_key: str, layout: SingleFileLayout, module: nn.Module) -> None:
    """Check the file's header against `module` (built from its config, on the meta device or not)."""
    SingleFile(path, config_key, layout).match(expected_weights(module))


def load_single_file(path: str | Path, config_key: str, layout: SingleFileLayout, module: nn.Module,
                     dtype: torch.dtype) -> nn.Module:
    """`module` (built from its config, parameters on the meta device) with the file's weights in
    `dtype` (floating point ones; others as stored)."""
    file = SingleFile(path, config_key, layout)
    expected = expected_weights(module)
    tensors = file.read(file.match(expected))
    keep = set(getattr(module, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        # As transformers' from_pretrained: modules that overflow in float16 (T5's wo) stay float32.
        keep |= set(getattr(module, "_keep_in_fp32_modules", None) or [])

    def stored_dtype(key: str) -> torch.dtype:
        return torch.float32 if keep & set(key.split(".")) else dtype

    tensors = {k: (v.to(stored_dtype(k)) if v.is_floating_point() else v).reshape(expected[k])
               for k, v in tensors.items()}
    tied = _tied_keys(module)
    module.load_state_dict(tensors, strict=not tied, assign=True)
    if tied:
        module.tie_weights()
    return module


# ComfyUI's clip_l.safetensors (HunyuanVideo's and FLUX.1's CLIP text encoder): transformers'
# CLIPTextModel names under "text_model." (as CLIPModel keeps them; a text_projection beside them
# is not read); all-in-one checkpoints add a prefix before that.
CLIP_L = SingleFileLayout("CLIP-L text encoder", "clip_l.safetensors",
                          prefixes=("text_model.", "", "cond_stage_model.transformer.text_model.",
                                    "text_encoders.clip_l.transformer.text_model."))

# ComfyUI's t5xxl_fp16.safetensors (FLUX.1's T5 text encoder): transformers' T5EncoderModel names
# ("shared", "encoder.block..."); its encoder.embed_tokens is the shared embedding, tied on load.
T5_XXL = SingleFileLayout("T5-XXL text encoder", "t5xxl_fp16.safetensors",
                          prefixes=("", "text_encoders.t5xxl.transformer."))
