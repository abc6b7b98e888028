"""The training config (main TOML) as typed objects, with the dataset TOMLs it names read
(config/dataset_config.py): the [model] table, the sections of the other parts composed into one
top level (TrainConfigFile), and the checks between them.

Every key is documented in `examples/flux.toml`. Loading checks keys, types, ranges and paths
and raises `ConfigError` naming the file and key, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Literal, Optional

from config.data import DataSettings
from config.dataset_config import Dataset, check_keys, load_dataset_config, read_toml
from config.diffusion_pipe import translate_train
from config.evaluation import EvalDataset, EvalSettings, eval_overlap_warnings
from config.memory import MemorySettings
from config.parallel import ParallelSettings, pipeline_warnings
from config.sampling import SampleConfig, SampleRequest, resolve_samples
from config.saving import SavingSettings
from config.schema import build, check, key, path_is, required, resolve_path, unknown_keys
from config.training import AdapterConfig, DType, EmaConfig, MonitoringConfig, OptimizerConfig, TrainingSettings
from utils.errors import ConfigError


@dataclass
class ModelConfig:
    """Keys every model takes; a model may extend this with keys of its own."""

    type: str = required()
    diffusers_path: str = required()
    transformer_path: Optional[str] = None
    dtype: DType = "bfloat16"
    timestep_sample_method: Literal["logit_normal", "uniform", "mode", "cosmap"] = "logit_normal"
    sigmoid_scale: float = 1.0
    logit_mean: float = 0.0
    mode_scale: float = 1.29
    shift: Optional[float] = None
    resolution_dependent_shift: bool = False
    # Sampled timesteps are scaled into [min_timestep, max_timestep] (training/objective.py).
    min_timestep: float = 0.0
    max_timestep: float = 1.0
    loss_type: Literal["mse", "l1", "huber", "pseudo_huber"] = "mse"
    huber_delta: float = 0.1
    # Storage of the frozen transformer-block linear weights in LoRA runs: "float8", or `dtype`
    # (also what None means, but then the memory plan may choose float8: memory/plan.py).
    transformer_dtype: Optional[Literal["float8", "float32", "bfloat16", "float16"]] = None
    # With transformer_dtype = "float8": the frozen linears' products run in float8 (memory/float8.py).
    float8_matmul: bool = False

    # The model's path keys beyond diffusers_path and transformer_path (resolved against the config
    # file's folder and checked to exist): key -> what its single file is, when it must be a file,
    # or None where a folder is taken too.
    path_keys: ClassVar[dict[str, Optional[str]]] = {}

    def validate(self, file, prefix):
        check(self.sigmoid_scale > 0, file, key(prefix, "sigmoid_scale"), "must be > 0")
        check(0.0 <= self.min_timestep < 1.0, file, key(prefix, "min_timestep"), "must be in [0, 1)")
        check(0.0 < self.max_timestep <= 1.0, file, key(prefix, "max_timestep"), "must be in (0, 1]")
        check(self.min_timestep < self.max_timestep, file, key(prefix, "min_timestep"),
              f"({self.min_timestep}) must be less than max_timestep ({self.max_timestep})")
        check(self.huber_delta > 0, file, key(prefix, "huber_delta"), "must be > 0")
        # Outside this range the "mode" density's map from u to t is not monotonic (no density).
        check(-1.0 <= self.mode_scale <= 2.0 / (math.pi - 2), file, key(prefix, "mode_scale"),
              f"must be in [-1, {2.0 / (math.pi - 2):.3f}] (beyond, t(u) = 1 - u - scale * (cos(pi u / 2)^2 - 1 + u) "
              f"is not monotonic)")
        if self.shift is not None:
            check(self.shift > 0, file, key(prefix, "shift"), "must be > 0")
            check(not self.resolution_dependent_shift, file, key(prefix, "shift"),
                  "cannot be combined with resolution_dependent_shift = true")


@dataclass(kw_only=True)
class TrainConfigFile(EvalSettings, SavingSettings, MemorySettings, ParallelSettings, TrainingSettings, DataSettings):
    """The training TOML. Its top level is one namespace (read as `config.settings.<key>`) composed of
    sections, each declared beside the part that reads it (config/data.py, training.py, parallel.py,
    memory.py, saving.py, evaluation.py); the keys here are the model's and the trained weights'."""

    # The [model] table as written (key `model`); the model type's config class reads it into TrainConfig.model.
    model_table: dict = required("model")
    # No [adapter] table: full fine-tuning of the transformer.
    adapter: Optional[AdapterConfig] = None
    full_finetune_dtype: Optional[DType] = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # No [ema] table: no moving average.
    ema: Optional[EmaConfig] = None
    sample: Optional[SampleConfig] = None
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)

    def validate(self, file, prefix):
        for section in SECTIONS:
            section.validate(self, file, prefix)
        # Rules across sections.
        check(self.ema is None or self.adapter is not None, file, "ema",
              "is for LoRA runs ([adapter] table); full fine-tuning has no EMA yet")
        check(self.full_finetune_dtype is None or self.adapter is None, file, "full_finetune_dtype",
              "is for full fine-tuning (no [adapter] table); the LoRA weights' dtype is adapter.dtype")
        if self.blocks_to_swap:
            check(self.pipeline_stages == 1, file, "blocks_to_swap",
                  f"needs pipeline_stages = 1 (got {self.pipeline_stages}): swapping and a pipeline are two ways "
                  f"to fit the model; use one")
            check(self.adapter is not None, file, "blocks_to_swap",
                  "swaps frozen base weights, so it needs a LoRA run ([adapter] table); full fine-tuning trains them all")
        if self.zero_stage:
            check(self.adapter is None, file, "zero_stage",
                  "= 1 is for full fine-tuning (no [adapter] table): a LoRA's optimizer state is small")
            check(self.optimizer.type == "adamw", file, "zero_stage",
                  f"= 1 needs optimizer.type = 'adamw' (got '{self.optimizer.type}'): the shards are flat slices "
                  f"of the weights, which Adafactor's per-matrix factors and 8-bit AdamW's blocks would not match")


# The sections of the training TOML's top level, in the order their checks run.
SECTIONS = (DataSettings, TrainingSettings, ParallelSettings, MemorySettings, SavingSettings, EvalSettings)


@dataclass
class TrainConfig:
    """The validated run configuration with paths resolved and the dataset TOMLs read."""

    file: Path
    settings: TrainConfigFile
    model: ModelConfig
    dataset: Dataset
    eval_datasets: list[EvalDataset]
    # Things that are allowed but probably not meant (printed at start): "file: message".
    warnings: list[str] = field(default_factory=list)
    # Things said at start: translated diffusion-pipe names, behaviour that differs from it on purpose.
    notes: list[str] = field(default_factory=list)
    # The keys the file sets, dotted ("model.transformer_dtype"): a key left out may be chosen by
    # the memory plan; one set to its default value is kept.
    given: frozenset[str] = frozenset()
    # The [sample] table's prompts with every setting resolved (empty: no samples).
    samples: list[SampleRequest] = field(default_factory=list)

    @property
    def full_finetune(self) -> bool:
        return self.settings.adapter is None

    @property
    def trained_dtype(self) -> str:
        return trained_dtype(self.settings, self.model)


def trained_dtype(settings: TrainConfigFile, model: ModelConfig) -> str:
    """The dtype of the weights the optimizer updates: the LoRA's, or the whole transformer's."""
    if settings.adapter is not None:
        return settings.adapter.dtype
    return settings.full_finetune_dtype or model.dtype


def load_train_config(path: Path | str, find_model_class: Callable[[str, Path], type]) -> TrainConfig:
    """Read and validate the main TOML and the dataset TOMLs it names. The model type decides
    which [model] keys exist: `find_model_class(type, file)` is the model registry's lookup
    (models.get_model_class), passed in so that the config does not depend on the models."""
    path = resolve_path(Path.cwd(), str(path), Path(path), "--config")
    raw = read_toml(path)
    optimizer_table = raw.get("optimizer") if isinstance(raw.get("optimizer"), dict) else {}
    kahan_optimizer = optimizer_table.get("type") == "adamw_optimi" and "stochastic_rounding" not in optimizer_table
    notes, problems = translate_train(raw)
    model_table = raw.get("model")
    model_type = model_table.get("type") if isinstance(model_table, dict) else None
    if not isinstance(model_type, str):
        raise ConfigError(f"{path}: missing required key 'model.type' (a string naming the model)")
    model_cls = find_model_class(model_type, path)
    top_level = frozenset(f.name for f in dataclasses.fields(TrainConfigFile))
    check_keys(path, problems, unknown_keys(TrainConfigFile, raw) + unknown_keys(model_cls.config_class, model_table,
                                                                                     "model"), top_level=top_level)
    if "diffusers_path" not in model_table and "transformer_path" in model_table:
        # diffusion-pipe's configs name only single files for some models; the configs come from a folder here.
        raise ConfigError(f"{path}: missing required key 'model.diffusers_path': a diffusers folder of the model, "
                          f"for its configs, tokenizers and scheduler (the single files give the weights they "
                          f"hold; with every part's file given, only the folder's small files are read: download "
                          f"it with --exclude \"*.safetensors\")")
    settings = build(TrainConfigFile, raw, path)
    model_config = build(model_cls.config_class, model_table, path, "model", top_level)
    single_files = {"transformer_path": "the transformer's single .safetensors file", **model_cls.config_class.path_keys}
    for name in ("diffusers_path", *single_files):
        value = getattr(model_config, name)
        if value is not None:
            resolved = resolve_path(path.parent, value, path, f"model.{name}")
            check(path_is(resolved, "exists"), path, f"model.{name}", f"does not exist: {resolved}")
            check(single_files.get(name) is None or not path_is(resolved, "dir"), path, f"model.{name}",
                  f"is a folder: {resolved}; expected {single_files.get(name)} (a diffusers folder goes in "
                  f"model.diffusers_path)")
            setattr(model_config, name, str(resolved))
    if settings.adapter is not None and settings.adapter.init_from_existing is not None:
        resolved = resolve_path(path.parent, settings.adapter.init_from_existing, path, "adapter.init_from_existing")
        check(path_is(resolved, "exists"), path, "adapter.init_from_existing", f"does not exist: {resolved}")
        settings.adapter.init_from_existing = str(resolved)

    if settings.activation_checkpointing == "selective":
        check(bool(model_cls.selective_checkpoint_layers), path, "activation_checkpointing",
              f"= 'selective' is not available for model type '{model_type}' (use true or false)")
    if model_config.transformer_dtype not in (None, "float8"):
        check(model_config.transformer_dtype == model_config.dtype, path, "model.transformer_dtype",
              f"= '{model_config.transformer_dtype}' must be 'float8' or model.dtype ('{model_config.dtype}'): "
              f"other storage dtypes are not available")
    if model_config.transformer_dtype == "float8":
        check(settings.adapter is not None, path, "model.transformer_dtype",
              f"= '{model_config.transformer_dtype}' stores frozen base weights, so it needs a LoRA run "
              f"([adapter] table); full fine-tuning trains every weight in full_finetune_dtype")
    if settings.adapter is not None and settings.adapter.type != "lora":
        check(model_config.transformer_dtype != "float8", path, "adapter.type",
              f"= '{settings.adapter.type}' needs the base weights in model.dtype: float8 storage "
              f"(model.transformer_dtype) is for LoRA linears")
    if settings.adapter is not None and settings.adapter.use_dora:
        check(model_config.transformer_dtype != "float8", path, "adapter.use_dora",
              "= true needs the base weights in model.dtype: DoRA normalises them, which float8 storage "
              "(model.transformer_dtype) does not offer")
    if model_config.float8_matmul:
        check(model_config.transformer_dtype == "float8", path, "model.float8_matmul",
              "= true multiplies by float8 base weights, so it needs model.transformer_dtype = 'float8'")
        check(model_config.dtype == "bfloat16", path, "model.float8_matmul",
              f"= true computes in bfloat16, but model.dtype is '{model_config.dtype}'")
    trained = trained_dtype(settings, model_config)
    if kahan_optimizer and trained == "bfloat16":
        settings.optimizer.stochastic_rounding = True
        notes.append("optimizer.type 'adamw_optimi' keeps small updates of bfloat16 weights with Kahan summation; "
                     "here stochastic rounding does that: read as stochastic_rounding = true")
    if settings.optimizer.stochastic_rounding:
        check(trained == "bfloat16", path, "optimizer.stochastic_rounding",
              f"rounds into bfloat16 weights, but the trained weights are {trained} ("
              + ("adapter.dtype" if settings.adapter else "full_finetune_dtype, or model.dtype when not set") + ")")
        check(not settings.zero_stage, path, "optimizer.stochastic_rounding",
              "= true has nothing to round with zero_stage = 1: ZeRO keeps float32 master weights of the "
              "bfloat16 weights and steps those; set it false")

    dataset = load_dataset_config(settings.dataset_file)
    eval_datasets = [EvalDataset(e.name, load_dataset_config(e.config)) for e in settings.eval_dataset_configs]
    for ds in [dataset] + [e.dataset for e in eval_datasets]:
        model_cls.check_dataset(ds)
    given = frozenset(raw) | {f"model.{k}" for k in model_table}
    samples = resolve_samples(settings.sample, model_cls, path, settings.seed) if settings.sample else []
    notes = [f"{path}: {n}" for n in notes] + _difference_notes(path, raw, settings)
    for ds in [dataset] + [e.dataset for e in eval_datasets]:
        notes += [n for n in ds.notes if n not in notes]
    return TrainConfig(path, settings, model_config, dataset, eval_datasets,
                       warnings=(pipeline_warnings(path, settings.pipeline_stages, settings.gradient_accumulation_steps)
                                 + eval_overlap_warnings(path, dataset, eval_datasets)),
                       notes=notes, given=given, samples=samples)


def _difference_notes(path: Path, raw: dict, settings: TrainConfigFile) -> list[str]:
    """Notes on defaults that differ from diffusion-pipe's on purpose, where the config relies on them."""
    notes = []
    checkpointing = any(getattr(settings, k) is not None for k in
                        ("checkpoint_every_n_minutes", "checkpoint_every_n_epochs", "checkpoint_every_n_steps"))
    if checkpointing and "checkpoints_to_keep" not in raw:
        notes.append(f"{path}: checkpoints_to_keep is not set: the newest {settings.checkpoints_to_keep} checkpoints are "
                     f"kept and older ones deleted (diffusion-pipe keeps them all); set it to keep more")
    return notes
