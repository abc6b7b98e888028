"""The recipe of a model: what differs from one model to the next, and nothing else.

A model file subclasses `ModelRecipe` with its constants, its encoders, its input packing, its
pipeline layers and its keymap (models/README.md lists them). What every model shares lives once
outside the recipe and takes it as an argument: the objective (training/objective.py), the base
weights (training/weights.py), LoRA (training/lora.py) and the file checks (training/preflight.py).
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from accelerate import init_empty_weights
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from models.keymaps.keymap import Keymap
from models.keymaps.single_file import SingleFileLayout, check_single_file, load_single_file
from models.pipeline_layers import InferenceMemo, PipelineFields, PipelineLayer, mark_frozen_fields
from data.buckets import check_frame_buckets, check_resolutions
from config.dataset_config import Dataset
from config.train_config import ModelConfig
from utils.dtypes import DTYPES
from utils.errors import ConfigError


@dataclass(frozen=True)
class EncoderFile:
    """A VAE or text encoder whose weights a config key may name instead of the diffusers
    folder's: a single file (`layout`), or, for a text encoder, a transformers folder with its
    tokenizer. The architecture comes from the diffusers folder's `subfolder`/config.json."""

    subfolder: str
    model_class: type
    layout: SingleFileLayout
    # transformers' config class of a text encoder; None: a diffusers model (load_config / from_config).
    config_class: type | None = None
    tokenizer_subfolder: str | None = None
    tokenizer_class: type | None = None
    # model_type values of a transformers folder's config.json it takes beside config_class's
    # (CLIP's text encoder from a whole CLIPModel folder: "clip").
    folder_model_types: tuple[str, ...] = ()


def _model_type(config_file: Path) -> str | None:
    try:
        return json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


class ModelRecipe:
    """A trainable diffusion transformer with its encoders, expressed as pipeline layers."""

    name: ClassVar[str]
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    size_multiple: ClassVar[int] = 16
    # Clips must be frame_multiple*k+1 frames long; 0 means images only (1 frame).
    frame_multiple: ClassVar[int] = 0
    transformer_class: ClassVar[type]
    vae_class: ClassVar[type]
    # The diffusers pipeline the recipe reproduces (encoders, inputs, sampling): the reference of
    # tests/test_sampling_models.py and bench/sample_speed.py.
    pipeline_class: ClassVar[type]
    default_lora_targets: ClassVar[str | list[str]]  # peft target_modules: names or one regex
    input_fields: ClassVar[PipelineFields]
    # The map between diffusers' weight names and the original release's (models/keymaps/keymap.py):
    # it reads a single-file `transformer_path`, writes the original-layout full model and the
    # ComfyUI LoRA, and reads LoRAs saved on original names. None: the release uses diffusers' names.
    keymap: ClassVar[type[Keymap] | None] = None

    # The pipeline layer classes that activation_checkpointing = "selective" recomputes (DeepSpeed's
    # `checkpointable_layers`); empty: the model offers no selective mode.
    selective_checkpoint_layers: ClassVar[tuple[str, ...]] = ()
    # For the memory estimate (utils/memory.py): the activations a layer keeps for the backward
    # pass, per token (`tokens_per_sample`), in hidden-size vectors of the compute dtype, by layer
    # class name; in a LoRA run, and with full fine-tuning, where the timestep embedding and every
    # block input carry a gradient, so products keep both factors (bench/activation_factors.py).
    activation_factors: ClassVar[dict[str, float]] = {}
    full_finetune_activation_factors: ClassVar[dict[str, float]] = {}

    # The resolution-dependent shift (training/objective.sample_timesteps): mu grows linearly
    # with the number of image tokens.
    base_seq_len: ClassVar[int] = 256
    max_seq_len: ClassVar[int] = 4096
    base_shift: ClassVar[float] = 0.5
    max_shift: ClassVar[float] = 1.15

    def __init__(self, config: ModelConfig):
        self.config = config
        self.dtype = DTYPES[config.dtype]
        self.root = Path(config.diffusers_path)
        self.vae = None  # loaded only while caching
        self.text_encoders = None
        # Where the encoders run: set by load_text_encoders and load_vae.
        self.device = torch.device("cpu")
        # Where the transformer's diffusers folder is, when not the model folder's transformer/
        # (a full fine-tune's save, for tools/sample.py).
        self.transformer_dir: Path | None = None
        self._transformer_configs: dict[Path, dict] = {}

    @classmethod
    def check_dataset(cls, dataset: Dataset) -> None:
        """Reject resolutions and frame buckets this model cannot take, naming the dataset key."""
        check_resolutions(dataset, cls.size_multiple, cls.name)
        check_frame_buckets(dataset, cls.frame_multiple, cls.name)

    # ------------------------------------------------------------------ encoders (per model)
    def latent_cache_signature(self) -> str:
        """A string that changes whenever cached latents would change: by default the VAE's
        config and weights (latents are the VAE's mode, normalised as the model's pipeline does)."""
        return self._config_signature("vae", extra="mode")

    def text_cache_signature(self) -> str:
        """A string that changes whenever cached text embeddings would change."""
        raise NotImplementedError

    def load_text_encoders(self, device: torch.device) -> None:
        """Load the tokenizers and text encoders onto `device`, for caching captions."""
        self.device = device
        self.text_encoders = self.text_encoder_parts(device)

    def text_encoder_parts(self, device: torch.device) -> tuple:
        """The model's tokenizers and text encoders, from its folder, onto `device`, in the order
        `encode_captions` unpacks them."""
        raise NotImplementedError

    # The VAE and text encoders a config key may give as the files users hold: config key (a field
    # of config_class, also in its path_keys) -> EncoderFile. The VAE's key is "vae_path".
    encoder_files: ClassVar[dict[str, EncoderFile]] = {}

    def check_encoder_files(self) -> None:
        """Check the VAE and text encoder files given instead of the diffusers folder's weights by
        their headers, before anything is cached: a ConfigError line each."""
        for key in self.encoder_files:
            if getattr(self.config, key) is not None:
                self.encoder_part(key, None)

    def encoder_part(self, key: str, device: torch.device | None) -> tuple:
        """(tokenizer or None, model) of the encoder of config key `key`: from the file or folder
        it names, else from the diffusers folder; onto `device`. With device None, only check the
        file or folder (a ConfigError line for each problem) and return (None, None)."""
        part = self.encoder_files[key]
        value = getattr(self.config, key)
        check_only = device is None
        if value is not None and Path(value).is_dir():
            folder = Path(value)
            for needed in ("config.json", "tokenizer_config.json"):
                if not (folder / needed).is_file():
                    raise ConfigError(f"model.{key}: {folder} has no {needed}; expected a transformers folder of "
                                      f"the {part.layout.name} with its tokenizer, or the single file "
                                      f"{part.layout.example}")
            found = _model_type(folder / "config.json")
            expected = (part.config_class.model_type, *part.folder_model_types)
            if found not in expected:
                raise ConfigError(f"model.{key}: {folder} holds a model of type {found!r}, not the {part.layout.name} "
                                  f"(model_type {' or '.join(map(repr, expected))} in its config.json)")
            if check_only:
                return None, None
            return (part.tokenizer_class.from_pretrained(folder),
                    part.model_class.from_pretrained(folder, torch_dtype=self.dtype).to(device).eval())
        tokenizer = None
        if part.tokenizer_subfolder is not None and not check_only:
            tokenizer = part.tokenizer_class.from_pretrained(self.root / part.tokenizer_subfolder)
        if value is None:
            if check_only:
                return None, None
            model = part.model_class.from_pretrained(self.root / part.subfolder, torch_dtype=self.dtype)
            return tokenizer, model.to(device).eval()
        if not (self.root / part.subfolder / "config.json").is_file():
            raise ConfigError(f"model.diffusers_path: {self.root} has no {part.subfolder}/config.json, which gives "
                              f"the architecture of model.{key}'s single file")
        if part.config_class is not None:
            config = part.config_class.from_pretrained(self.root / part.subfolder)
        else:
            config = part.model_class.load_config(self.root / part.subfolder)
        with init_empty_weights(include_buffers=False):
            model = part.model_class(config) if part.config_class is not None else part.model_class.from_config(config)
        if check_only:
            check_single_file(value, key, part.layout, model)
            return None, None
        return tokenizer, load_single_file(value, key, part.layout, model, self.dtype).to(device).eval()

    def encoder_files_signature(self, *keys: str) -> str:
        """For the cache signatures: the names and sizes of the files the keys name (every file of
        a folder); empty for keys not set."""
        parts = []
        for k in keys:
            value = getattr(self.config, k)
            if value is not None:
                path = Path(value)
                files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
                parts.append(f",{k}=" + ",".join(f"{f}:{f.stat().st_size}" for f in files))
        return "".join(parts)

    def load_vae(self, device: torch.device) -> None:
        """Load the model's VAE (`vae_class` from the `vae/` folder, or the file of its
        `vae_path` key) for caching latents."""
        if getattr(self.config, "vae_path", None) is not None:
            self.vae = self.encoder_part("vae_path", device)[1]
        else:
            self.vae = self.vae_class.from_pretrained(self.root / "vae", torch_dtype=self.dtype).to(device).eval()
        self.device = device

    def free_encoders(self) -> None:
        """Drop the VAE and text encoders: only the transformer trains."""
        self.vae = None
        self.text_encoders = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def encode_captions(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def encode_pixels(self, pixels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Pixels (batch, 3, frames, height, width) in [-1, 1], all of one bucket shape -> one
        dict with a 'latents' tensor per item."""
        raise NotImplementedError

    def _config_signature(self, *subfolders: str, extra: str = "") -> str:
        # The config files identify the architecture and normalisation; with the weights'
        # sizes they change whenever a different model is pointed to.
        parts = [self.name, extra, f"dtype={self.config.dtype}"]
        for sub in subfolders:
            folder = self.root / sub
            for f in sorted(folder.glob("*.json")):
                parts.append(f"{sub}/{f.name}:{f.read_text()}")
            for f in sorted(folder.glob("*.safetensors")):
                parts.append(f"{sub}/{f.name}:{f.stat().st_size}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ inputs (per model)
    def model_inputs(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                     text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The first layer's named inputs from noisy latents, timesteps and text embeddings."""
        raise NotImplementedError

    def condition_inputs(self, inputs: dict[str, torch.Tensor], latents: torch.Tensor,
                         conditions: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The first layer's inputs with the clip's conditioning applied (image-to-video), and the
        loss weights it asks for (broadcasting over `latents`; None: every element counts).
        `latents` are the clean latents; `conditions` the batch's other cached tensors
        (`encode_pixels` items' keys beside "latents"), stacked. By default: no conditioning."""
        return inputs, None

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in the layout the transformer predicts (the target's layout)."""
        return latents

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Number of image tokens, for the resolution-dependent shift."""
        raise NotImplementedError

    def tokens_per_sample(self, width: int, height: int, frames: int) -> int | None:
        """Tokens the transformer blocks see for one sample of this pixel shape (image/video and
        text), for the activation memory estimate; None when the model does not say."""
        return None

    # ------------------------------------------------------------------ transformer (shared)
    def transformer_folder(self) -> Path:
        return self.transformer_dir or self.root / "transformer"

    def transformer_config(self) -> dict:
        """The transformer's config.json (of `transformer_folder`), read once."""
        folder = self.transformer_folder()
        if folder not in self._transformer_configs:
            self._transformer_configs[folder] = self.transformer_class.load_config(folder)
        return self._transformer_configs[folder]

    @property
    def patch_sizes(self) -> tuple[int, int]:
        """(spatial, temporal) patch size of the transformer's token embedding."""
        cfg = self.transformer_config()
        return cfg["patch_size"], cfg.get("patch_size_t", 1)

    def build_empty_transformer(self) -> nn.Module:
        """The transformer with its parameters on the meta device: no memory, shapes only."""
        folder = self.transformer_folder()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.diffusers_path: {self.root} has no transformer/config.json; "
                              f"expected a diffusers folder of a {self.name} model")
        config = self.transformer_class.load_config(folder)
        expected = self.transformer_class.__name__
        found = config.get("_class_name", expected)
        if found != expected:
            raise ConfigError(f"model.diffusers_path: {folder} holds a {found}, but model.type = "
                              f"'{self.name}' expects a {expected}")
        with init_empty_weights(include_buffers=False):
            transformer = self.transformer_class.from_config(config)
        transformer.requires_grad_(False)
        return transformer

    @staticmethod
    def hidden_size(transformer: nn.Module) -> int | None:
        """The width of the token stream between blocks, for the activation memory estimate: the
        attention width (heads x head size) of the diffusers transformers we train."""
        cfg = transformer.config
        if "num_attention_heads" in cfg and "attention_head_dim" in cfg:
            return cfg.num_attention_heads * cfg.attention_head_dim
        return getattr(transformer, "inner_dim", None)

    # ------------------------------------------------------------------ original-layout files (the keymap)
    def original_layout(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The transformer weights in the original release's single-file key layout, without a key
        prefix (ComfyUI's diffusion model loader, diffusers' from_single_file and
        model.transformer_path all take it so), or None when the model has no keymap. Called with
        the weights of whole pipeline layers (one stage's, or part of them): the keymap's fused
        tensors join modules of one layer only, so a stage's part converts on its own."""
        return None if self.keymap is None else self.keymap.diffusers_to_original(state_dict)

    def extra_lora_formats(self, lora: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Other LoRA files to write beside the diffusers one: {file name: tensors}; the original
        layout's, for ComfyUI, where the model has a keymap."""
        if self.keymap is None:
            return {}
        return {"lora_comfyui.safetensors": self.keymap.comfyui_lora(lora, self.transformer_config())}

    # ------------------------------------------------------------------ sampling (utils/sampling.py)
    # The model's diffusers pipeline defaults for [sample]: width, height, frames, steps, guidance.
    sample_defaults: ClassVar[dict] = {}
    # How the pipeline applies the guidance scale: "embedded" (a transformer input: FLUX.1,
    # HunyuanVideo) or "classifier_free" (an unconditional pass on the negative prompt beside the
    # conditional one, in one batch of two: LTX-Video).
    sample_guidance: ClassVar[str] = "embedded"
    # Decode in tiles (video VAEs at full size do not fit otherwise); the tiny test sizes are below
    # one tile, so tiling changes nothing there.
    decode_tiled: ClassVar[bool] = False

    def sampling_unsupported(self) -> str | None:
        """Why this model (as configured) cannot draw [sample]s, or None when it can."""
        return None

    def sample_latent_shape(self, width: int, height: int, frames: int) -> tuple[int, ...]:
        """The unpacked latent shape of one sample (no batch dimension), as the pipeline makes it."""
        raise NotImplementedError

    def sample_noise(self, width: int, height: int, frames: int, seed: int) -> torch.Tensor:
        """The starting latents of one sample, (1, ...): drawn as the pipeline draws them with
        `generator=torch.Generator("cpu").manual_seed(seed)`, in the model's dtype."""
        shape = (1, *self.sample_latent_shape(width, height, frames))
        return randn_tensor(shape, generator=torch.Generator().manual_seed(seed), dtype=self.dtype)

    def sample_sigmas(self, steps: int):
        """The sigmas the pipeline hands its scheduler (before the scheduler's shift)."""
        return np.linspace(1.0, 1 / steps, steps)

    def sample_scheduler(self, steps: int, latents: torch.Tensor):
        """The model's own scheduler (from the `scheduler/` folder) set up as its pipeline sets it:
        the pipeline's sigmas, and the shift mu from the token count (ignored by schedulers with a
        fixed shift). Returns (scheduler, timesteps)."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(self.root / "scheduler")
        c = scheduler.config
        mu = calculate_shift(self.image_seq_len(latents), c.get("base_image_seq_len", 256),
                             c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=self.sample_sigmas(steps), mu=mu)
        scheduler.set_begin_index(0)
        return scheduler, timesteps

    def sample_timestep(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The `timesteps` input (sigma) for scheduler timestep `t`: the pipelines pass it in the
        dtype of the latents they step (FLUX.1 divides by 1000 there; the input layers multiply
        by 1000 again)."""
        return t.expand(latents.shape[0]).to(latents.dtype) / 1000

    def sample_inputs(self, latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                      negative: dict[str, torch.Tensor] | None, guidance: float) -> dict[str, torch.Tensor]:
        """The first layer's named inputs for one denoising step, guidance applied as the pipeline does."""
        if self.sample_guidance == "classifier_free":
            latents = torch.cat([latents, latents])
            text = {k: torch.cat([negative[k], text[k]]) for k in text}
        inputs = self.model_inputs(latents.to(self.dtype), self.sample_timestep(t, latents), text)
        if self.sample_guidance == "embedded":
            inputs["guidance"] = torch.full((latents.shape[0],), float(guidance))
        return inputs

    def guided_prediction(self, prediction: torch.Tensor, guidance: float) -> torch.Tensor:
        """The velocity the scheduler steps with, from the transformer's prediction (unpacked)."""
        if self.sample_guidance == "classifier_free":
            uncond, cond = prediction.float().chunk(2)
            return uncond + guidance * (cond - uncond)
        return prediction

    def unpack_latents(self, packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """`pack_latents` undone: the prediction in the layout of latents of `shape` (batch first)."""
        return packed.reshape(shape)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents (batch, ...) through the loaded VAE (`load_vae`): pixels (batch, 3,
        frames, height, width) in [-1, 1], as the pipeline decodes them."""
        raise NotImplementedError

    # ------------------------------------------------------------------ layers (per model)
    def layers(self, transformer: nn.Module) -> list[PipelineLayer]:
        """The transformer as a list of pipeline layers: the input embedding (kind "input"), one
        layer per transformer block (kind "block"), the output projection (kind "output")."""
        raise NotImplementedError

    def reference_forward(self, transformer: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The whole transformer's own forward on the first layer's named inputs (`input_fields.unpack`
        of what training/objective.training_example returns), called as the model's diffusers
        pipeline calls it; the prediction in the training target's layout. What `layers` must
        compute, and the step of the plain diffusers loop in bench/step.py."""
        raise NotImplementedError

    def pipeline_layers(self, transformer: nn.Module) -> list[PipelineLayer]:
        """`layers`, set to compute in the model's dtype (autocast when it is not float32), and
        to treat inputs no trainable weight touched as constants: call it once the transformer's
        trainable weights are marked (LoRA added, or all of them for full fine-tuning)."""
        layers = self.layers(transformer)
        memo = InferenceMemo()
        for layer in layers:
            layer.autocast_dtype = None if self.dtype == torch.float32 else self.dtype
            layer.memo = memo
        if self.dtype != torch.float32:
            for module in transformer.modules():
                if isinstance(module, BaseTunerLayer):
                    # Under autocast the adapter's products run in the base dtype anyway; peft's cast
                    # of a low-precision input to the adapter's float32 would only add copies of it
                    # (forward and backward) that autocast casts straight back: same values.
                    module.cast_input_dtype_enabled = False
        mark_frozen_fields(layers)
        return layers
