"""The base class every model subclasses, holding all that models share.

Shared here: timestep sampling and shifting, noising for the rectified-flow objective, the loss,
building the transformer without memory and loading only the weights of local pipeline layers,
LoRA set-up and LoRA saving. A model file adds only what is particular to it: its encoders,
its input packing, its layer list and its extra save formats.
"""

from __future__ import annotations

import gc
import json
import math
import re
from pathlib import Path
from typing import ClassVar

import torch
from accelerate import init_empty_weights
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from torch import nn

from utils.buckets import check_frame_buckets, check_resolutions
from utils import objective
from utils.config import AdapterConfig, Dataset, ModelConfig
from utils.pipeline_layers import PipelineFields, PipelineLayer, mark_frozen_fields, named_weights
from utils.schema import ConfigError
from models.lora_import import lora_file_in, read_dora_magnitudes, read_lora_as_diffusers, suggested_targets

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stable_seed(*parts) -> int:
    """A 63-bit seed from any parts, the same on every process and every run."""
    import hashlib

    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator_for(*parts) -> torch.Generator:
    """A CPU generator seeded from `parts` (seed, epoch, sample, ...), never from the rank."""
    return torch.Generator().manual_seed(stable_seed(*parts))


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


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"


def _examples(names: list[str], n: int = 2) -> str:
    return ", ".join(repr(x) for x in names[:n]) + (", ..." if len(names) > n else "")


class DiffusionModel:
    """A trainable diffusion transformer with its encoders, expressed as pipeline layers."""

    name: ClassVar[str]
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    size_multiple: ClassVar[int] = 16
    # Clips must be frame_multiple*k+1 frames long; 0 means images only (1 frame).
    frame_multiple: ClassVar[int] = 0
    transformer_class: ClassVar[type]
    vae_class: ClassVar[type]
    pipeline_class: ClassVar[type]
    default_lora_targets: ClassVar[str | list[str]]  # peft target_modules: names or one regex
    input_fields: ClassVar[PipelineFields]

    # The pipeline layer classes that activation_checkpointing = "selective" recomputes (DeepSpeed's
    # `checkpointable_layers`); empty: the model offers no selective mode.
    selective_checkpoint_layers: ClassVar[tuple[str, ...]] = ()
    # For the memory estimate (utils/memory.py): the activations a layer keeps for the backward
    # pass, per token (`tokens_per_sample`), in hidden-size vectors of the compute dtype, by layer
    # class name; in a LoRA run, and with full fine-tuning, where the timestep embedding and every
    # block input carry a gradient, so products keep both factors (bench/activation_factors.py).
    activation_factors: ClassVar[dict[str, float]] = {}
    full_finetune_activation_factors: ClassVar[dict[str, float]] = {}

    # resolution-dependent shift: mu grows linearly with the number of image tokens
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
        # Where the transformer's diffusers folder is, when not the model folder's transformer/
        # (a full fine-tune's save, for tools/sample.py).
        self.transformer_dir: Path | None = None

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
        raise NotImplementedError

    def load_vae(self, device: torch.device) -> None:
        """Load the model's VAE (`vae_class` from the `vae/` folder) for caching latents."""
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

    # ------------------------------------------------------------------ objective (shared)
    def sample_timesteps(self, generators: list[torch.Generator], seq_len: int) -> torch.Tensor:
        """One timestep in (0, 1) per sample: 0 is data, 1 is noise. Drawn from the configured
        density, shifted (fixed or by resolution), then scaled into [min_timestep, max_timestep]."""
        cfg = self.config
        t = objective.sample_density(cfg.timestep_sample_method, generators, logit_mean=cfg.logit_mean,
                                     logit_std=cfg.sigmoid_scale, mode_scale=cfg.mode_scale)
        if cfg.resolution_dependent_shift:
            slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
            t = objective.resolution_shift(t, self.base_shift + slope * (seq_len - self.base_seq_len))
        elif cfg.shift is not None:
            t = objective.shift_timesteps(t, cfg.shift)
        return objective.scale_to_range(t, cfg.min_timestep, cfg.max_timestep)

    def training_example(self, latents: torch.Tensor, text: dict[str, torch.Tensor],
                         generators: list[torch.Generator], timesteps: torch.Tensor | None = None,
                         weights: torch.Tensor | None = None):
        """(inputs, labels) for the pipeline engine: rectified-flow noising of a batch.

        The noisy latent is the straight line between data (t=0) and noise (t=1); the target is
        the velocity noise - data. Noise and timesteps come from per-sample generators, so the
        same sample gets the same noise whatever the process layout.
        """
        latents = latents.float()
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
        if timesteps is None:
            timesteps = self.sample_timesteps(generators, self.image_seq_len(latents))
        t = timesteps.view(-1, *([1] * (latents.dim() - 1)))
        noisy = (1 - t) * latents + t * noise
        target = self.pack_latents(noise - latents)
        inputs = self.model_inputs(noisy.to(self.dtype), timesteps, text)
        if weights is None:
            weights = torch.ones(latents.shape[0])
        return self.input_fields.pack(inputs), (target, weights)

    def loss(self, prediction: torch.Tensor, labels) -> torch.Tensor:
        """Weighted mean over samples of each sample's mean element loss (`loss_type`: MSE by
        default; see utils/objective.elementwise_loss), in float32."""
        target, weights = labels
        err = objective.elementwise_loss(prediction, target, self.config.loss_type, self.config.huber_delta)
        per_sample = err.mean(dim=tuple(range(1, err.dim())))
        weights = weights.to(per_sample)
        # Eval padding has weight 0; an all-padding batch gives 0, not NaN.
        return (per_sample * weights).sum() / weights.sum().clamp_min(1e-12)

    # ------------------------------------------------------------------ transformer (shared)
    def transformer_folder(self) -> Path:
        return self.transformer_dir or self.root / "transformer"

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

    # ------------------------------------------------------------------ input checks (shared)
    def check_inputs(self, config_file: Path, adapter: AdapterConfig | None) -> None:
        """Check the model files and the LoRA to start from against what this model type needs,
        from file headers only, before anything is cached or loaded. Each mismatch is a
        ConfigError of one line saying what was expected and what was found."""
        try:
            if self.root.is_file():
                raise ConfigError(f"model.diffusers_path: {self.root} is a file; expected a diffusers folder of a "
                                  f"{self.name} model (a single-file transformer goes in model.transformer_path)")
            transformer = self.build_empty_transformer()
            self.check_weight_files(transformer)
            if adapter is not None:
                self.add_lora(transformer, adapter)  # target patterns that find nothing fail here
            if adapter is not None and adapter.init_from_existing:
                self.check_lora_file(transformer, Path(adapter.init_from_existing), adapter)
        except ConfigError as e:
            raise ConfigError(f"{config_file}: {e}") from None

    def check_weight_files(self, transformer: nn.Module) -> None:
        """The weights in the files must be exactly the transformer's, in its shapes. Only the
        diffusers folder is checked here; a single-file `transformer_path` is checked as it loads."""
        if self.config.transformer_path is not None:
            path = Path(self.config.transformer_path)
            if path.suffix == ".safetensors" or not path.suffix:
                with open_safetensors(path, "model.transformer_path"):
                    pass
            return
        folder = self.transformer_folder()
        found = SafetensorsFolder(folder).shapes()
        expected = {_base_name(n): tuple(p.shape) for n, p in transformer.named_parameters() if "lora_" not in n}
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        if missing or extra or wrong:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing ({_examples(missing)})")
            if extra:
                parts.append(f"{len(extra)} unexpected ({_examples(extra)})")
            if wrong:
                k = wrong[0]
                parts.append(f"{len(wrong)} of another shape ({k!r}: expected {_shape_text(expected[k])}, "
                             f"found {_shape_text(found[k])})")
            raise ConfigError(f"model.diffusers_path: the weights in {folder} are not those of the "
                              f"{type(transformer).__name__} its config.json describes: expected {len(expected)} "
                              f"weights, found {len(found)}: {'; '.join(parts)}")

    def check_lora_file(self, transformer: nn.Module, path: Path, adapter: AdapterConfig) -> None:
        """The LoRA file for `init_from_existing` must be this model's, with this adapter's rank
        and target modules. `transformer` has the adapter's LoRA layers (on the meta device)."""
        self.read_lora_file(transformer, path, adapter)

    # ------------------------------------------------------------------ LoRA files of other layouts
    def original_key_layout(self):
        """(the models/key_layout.Layout of this transformer's original release, its part sizes),
        to read LoRAs saved with original module names; (None, {}) when the model has none."""
        return None, {}

    def original_module_name_to_diffusers(self, name: str) -> str | None:
        """A model whose layouts differ by names only maps an original module name here."""
        return None

    def read_lora_file(self, transformer: nn.Module, path: Path, adapter: AdapterConfig) -> dict[str, tuple]:
        """The LoRA that `init_from_existing` names, as {LoRA module of `transformer`: (A, B)} of
        adapter.rank with this adapter's alpha / rank scale divided out of B, so that the adapter
        applies exactly the file's weight change. Any layout models/lora_import.py reads."""
        file = lora_file_in(path)
        if not file.is_file():
            raise ConfigError(f"adapter.init_from_existing: {path} holds no pytorch_lora_weights.safetensors")
        with open_safetensors(file, "adapter.init_from_existing") as st:
            model_type = (st.metadata() or {}).get("trainer_model_type")
        if model_type is not None and model_type != self.name:
            raise ConfigError(f"adapter.init_from_existing: {file} is a LoRA for model type '{model_type}' "
                              f"(its metadata says so), but model.type = '{self.name}'")
        linears = {n.removesuffix(".base_layer") for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}
        layout, dims = self.original_key_layout()
        found = read_lora_as_diffusers(file, linears, layout, dims, self.original_module_name_to_diffusers)
        ours = {n.removesuffix(".lora_A.default.weight"): p for n, p in transformer.named_parameters()
                if n.endswith(".lora_A.default.weight")}
        # A part of a fused module without a LoRA comes out of the file with rank 0.
        extra = sorted(m for m in set(found) - set(ours) if found[m][0].shape[0])
        missing = sorted(set(ours) - set(found))
        if extra or missing:
            wanted = sorted(m for m in found if found[m][0].shape[0])
            raise ConfigError(f"adapter.init_from_existing: {file} is not a LoRA of this {self.name} adapter's "
                              f"target_modules: {len(missing)} of its {len(ours)} modules missing (e.g. "
                              f"{_examples(missing, 1) or 'none'}), {len(extra)} more in the file (e.g. "
                              f"{_examples(extra, 1) or 'none'}); for the file's modules write adapter.target_modules "
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

    def read_weights(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The transformer's base weights for `keys` (diffusers naming), read lazily from disk."""
        return SafetensorsFolder(self.transformer_folder()).read(keys)

    def load_weights(self, transformer: nn.Module, module_names: list[str], device: torch.device) -> None:
        """Load the base weights of the named submodules (or parameters of the transformer itself)
        only: the local pipeline stage's."""
        names = [name for name, _ in named_weights(transformer, module_names) if "lora_" not in name]
        wanted = {_base_name(name): name for name in names}
        tensors = self.read_weights(sorted(wanted))
        for key, name in wanted.items():
            _set_parameter(transformer, name, tensors[key].to(device=device, dtype=self.dtype), trainable=False)

    def make_trainable(self, transformer: nn.Module, dtype: torch.dtype) -> None:
        """Full fine-tuning: every loaded weight (the local stage's) becomes trainable in `dtype`."""
        for name, param in list(transformer.named_parameters()):
            if not param.is_meta:
                _set_parameter(transformer, name, param.detach().to(dtype), trainable=True)

    @staticmethod
    def hidden_size(transformer: nn.Module) -> int | None:
        """The width of the token stream between blocks, for the activation memory estimate: the
        attention width (heads x head size) of the diffusers transformers we train."""
        cfg = transformer.config
        if "num_attention_heads" in cfg and "attention_head_dim" in cfg:
            return cfg.num_attention_heads * cfg.attention_head_dim
        return getattr(transformer, "inner_dim", None)

    # ------------------------------------------------------------------ full model saving (per model)
    def original_layout(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The transformer weights in the original release's single-file key layout, or None when
        the model has no such layout. Called with the weights of whole pipeline layers (one
        pipeline stage's, or part of them), so a conversion must not need other layers' weights."""
        return None

    # ------------------------------------------------------------------ LoRA (shared)
    def add_lora(self, transformer: nn.Module, adapter: AdapterConfig) -> None:
        """Inject LoRA layers (on the meta device until their layer is materialised) into the
        modules `lora_targets` names."""
        from peft import LoraConfig

        targets = adapter.target_modules or self.default_lora_targets
        if adapter.target_include or adapter.target_exclude:
            # Whole names, as one regex: a list entry would also match every name ending in it.
            names = self.lora_targets(transformer, adapter)
            targets = "|".join(re.escape(n) for n in names)
        lora_config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                                 target_modules=targets, init_lora_weights=True, use_dora=adapter.use_dora)
        try:
            with init_empty_weights(include_buffers=False):
                transformer.add_adapter(lora_config)
        except ValueError as e:
            raise ConfigError(f"adapter.target_modules: {e}") from None

    def lora_targets(self, transformer: nn.Module, adapter: AdapterConfig) -> list[str]:
        """The names of the modules that get a LoRA, in the transformer's order: those
        target_modules (or the model's default) names as peft matches them, plus the linear
        modules a target_include regex finds anywhere in their name, less those a target_exclude
        regex finds. A pattern that finds nothing is a ConfigError naming it."""
        from peft import LoraConfig
        from peft.tuners.tuners_utils import check_target_module_exists

        base = LoraConfig(target_modules=adapter.target_modules or self.default_lora_targets)
        modules = [(n, m) for n, m in transformer.named_modules() if n]
        chosen = {n for n, _ in modules if check_target_module_exists(base, n)}
        linear = [n for n, m in modules if isinstance(m, nn.Linear)]
        for i, pattern in enumerate(adapter.target_include):
            found = [n for n in linear if re.search(pattern, n)]
            if not found:
                raise ConfigError(f"adapter.target_include[{i}]: {pattern!r} matches no linear module of the "
                                  f"{self.name} transformer (names look like {_examples(linear, 3)})")
            chosen.update(found)
        for i, pattern in enumerate(adapter.target_exclude):
            found = [n for n in chosen if re.search(pattern, n)]
            if not found:
                raise ConfigError(f"adapter.target_exclude[{i}]: {pattern!r} matches none of the {len(chosen)} "
                                  f"targeted modules (names look like {_examples(sorted(chosen), 3)})")
            chosen.difference_update(found)
        if not chosen:
            raise ConfigError("adapter.target_exclude: leaves no module to train")
        return [n for n, _ in modules if n in chosen]

    def init_lora(self, transformer: nn.Module, module_names: list[str], adapter: AdapterConfig,
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
            _set_parameter(transformer, name, weight.to(device=device, dtype=DTYPES[adapter.dtype]), trainable=True)

    def load_lora_into(self, transformer: nn.Module, path: Path, adapter: AdapterConfig) -> None:
        """Start from an existing LoRA for `init_from_existing` (any layout `read_lora_file` reads):
        the materialised (this stage's) LoRA weights take the file's."""
        loaded = self.read_lora_file(transformer, path, adapter)
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

    @staticmethod
    def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
        """This process's materialised LoRA weights, keyed like diffusers' LoRA files (no prefix)."""
        return {_lora_file_name(n): p.detach().cpu() for n, p in transformer.named_parameters()
                if "lora_" in n and not p.is_meta}

    def save_lora(self, lora: dict[str, torch.Tensor], adapter: AdapterConfig, out_dir: Path,
                  dtype: torch.dtype) -> list[Path]:
        """Write the adapter in diffusers format plus the model's extra formats.

        The alpha/rank scale is multiplied into lora_B, so every loader, with or without an
        alpha field, applies the adapter exactly as trained.
        """
        from safetensors.torch import save_file

        scale = adapter.alpha / adapter.rank
        scaled = {k: (v.float() * scale if ".lora_B." in k else v.float()).to(dtype).contiguous()
                  for k, v in sorted(lora.items())}
        out_dir.mkdir(parents=True, exist_ok=True)
        diffusers_file = out_dir / "pytorch_lora_weights.safetensors"
        save_file({f"transformer.{k}": v for k, v in scaled.items()}, diffusers_file,
                  metadata={"format": "pt", "trainer_model_type": self.name})
        written = [diffusers_file]
        if adapter.use_dora:
            return written  # the original layout has no DoRA magnitudes (examples/flux.toml)
        for filename, tensors in self.extra_lora_formats(scaled).items():
            # kohya's alpha scalars stay float32: exact at any rank.
            save_file({k: (v.float() if k.endswith(".alpha") else v.to(dtype)).contiguous() for k, v in tensors.items()},
                      out_dir / filename, metadata={"format": "pt"})
            written.append(out_dir / filename)
        return written

    def extra_lora_formats(self, lora: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Other LoRA files to write beside the diffusers one: {file name: tensors}."""
        return {}

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

    def sample_latent_shape(self, width: int, height: int, frames: int) -> tuple[int, ...]:
        """The unpacked latent shape of one sample (no batch dimension), as the pipeline makes it."""
        raise NotImplementedError

    def sample_noise(self, width: int, height: int, frames: int, seed: int) -> torch.Tensor:
        """The starting latents of one sample, (1, ...): drawn as the pipeline draws them with
        `generator=torch.Generator("cpu").manual_seed(seed)`, in the model's dtype."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (1, *self.sample_latent_shape(width, height, frames))
        return randn_tensor(shape, generator=torch.Generator().manual_seed(seed), dtype=self.dtype)

    def sample_sigmas(self, steps: int):
        """The sigmas the pipeline hands its scheduler (before the scheduler's shift)."""
        import numpy as np

        return np.linspace(1.0, 1 / steps, steps)

    def sample_scheduler(self, steps: int, latents: torch.Tensor):
        """The model's own scheduler (from the `scheduler/` folder) set up as its pipeline sets it:
        the pipeline's sigmas, and the shift mu from the token count (ignored by schedulers with a
        fixed shift). Returns (scheduler, timesteps)."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

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
        """The transformer as a list of pipeline layers, input embedding first."""
        raise NotImplementedError

    def reference_forward(self, transformer: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The whole transformer's own forward on the first layer's named inputs
        (`input_fields.unpack` of what `training_example` returns), called as the model's diffusers
        pipeline calls it; the prediction in the training target's layout. What `layers` must
        compute, and the step of the plain diffusers loop in bench/step.py."""
        raise NotImplementedError

    def pipeline_layers(self, transformer: nn.Module) -> list[PipelineLayer]:
        """`layers`, set to compute in the model's dtype (autocast when it is not float32), and
        to treat inputs no trainable weight touched as constants: call it once the transformer's
        trainable weights are marked (LoRA added, or all of them for full fine-tuning)."""
        layers = self.layers(transformer)
        for layer in layers:
            layer.autocast_dtype = None if self.dtype == torch.float32 else self.dtype
        if self.dtype != torch.float32:
            for module in transformer.modules():
                if isinstance(module, BaseTunerLayer):
                    # Under autocast the adapter's products run in the base dtype anyway; peft's cast
                    # of each input to the adapter's float32 would only add two copies of every
                    # activation (forward and backward), same values, about 8,000 kernels a step.
                    module.cast_input_dtype_enabled = False
        mark_frozen_fields(layers)
        return layers


def _base_name(param_name: str) -> str:
    # peft wraps a targeted Linear: "x.to_q.weight" becomes "x.to_q.base_layer.weight"
    return param_name.replace(".base_layer.", ".")


def _lora_file_name(param_name: str) -> str:
    # "x.to_q.lora_A.default.weight" -> "x.to_q.lora_A.weight" (diffusers' LoRA file naming); a DoRA
    # magnitude is "x.to_q.lora_magnitude_vector", as peft saves it and diffusers loads it.
    name = param_name.replace(".default.", ".")
    return name.removesuffix(".weight") if name.endswith(".lora_magnitude_vector.weight") else name


def _set_parameter(root: nn.Module, name: str, value: torch.Tensor, trainable: bool) -> None:
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    module._parameters[attr] = nn.Parameter(value, requires_grad=trainable)
