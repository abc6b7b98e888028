"""The training config (main TOML) as typed objects, with the dataset TOMLs it names read
(config/dataset_config.py).

Every key is documented in `examples/flux.toml`. Loading checks keys, types, ranges and paths
and raises `ConfigError` naming the file and key, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional, Union

from config.dataset_config import Dataset, check_keys, load_dataset_config, path_is, read_toml, resolve_path
from config.diffusion_pipe import translate_train
from config.schema import build, check, key, required, unknown_keys
from utils.errors import ConfigError

DType = Literal["float32", "bfloat16", "float16"]


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


@dataclass
class AdapterConfig:
    # "lora", or LyCORIS' LoKr (Kronecker product) / LoHa (Hadamard product) through peft.
    type: Literal["lora", "lokr", "loha"] = "lora"
    rank: int = 16
    alpha: Optional[float] = None
    dropout: float = 0.0
    dtype: DType = "float32"
    target_modules: Optional[Union[str, list[str]]] = None
    # Regexes searched in module names: linear modules to add, targeted modules to leave out.
    target_include: list[str] = field(default_factory=list)
    target_exclude: list[str] = field(default_factory=list)
    init_from_existing: Optional[str] = None
    # LoRA+: lora_B's learning rate is this times optimizer.lr (training/optimizers.lora_plus_groups).
    lora_plus_ratio: Optional[float] = None
    # DoRA (peft's use_dora): a trained magnitude per output row besides the LoRA.
    use_dora: bool = False

    def validate(self, file, prefix):
        if self.lora_plus_ratio is not None:
            check(self.lora_plus_ratio > 0, file, key(prefix, "lora_plus_ratio"), "must be > 0")
        if self.type != "lora":
            # LoRA's own options: peft's LoKr and LoHa have no B matrix, magnitude or input dropout.
            for name, unset in (("lora_plus_ratio", self.lora_plus_ratio is None), ("use_dora", not self.use_dora),
                                ("dropout", self.dropout == 0.0)):
                check(unset, file, key(prefix, name), f"is a LoRA option; remove it with type = '{self.type}'")
        check(self.rank >= 1, file, key(prefix, "rank"), "must be at least 1")
        check(0.0 <= self.dropout < 1.0, file, key(prefix, "dropout"), "must be in [0, 1)")
        if self.alpha is None:
            self.alpha = float(self.rank)
        check(self.alpha > 0, file, key(prefix, "alpha"), "must be > 0")
        if self.target_modules is not None:
            check(len(self.target_modules) > 0, file, key(prefix, "target_modules"), "must not be empty")
            if isinstance(self.target_modules, str):
                _check_regex(self.target_modules, file, key(prefix, "target_modules"))
        for name in ("target_include", "target_exclude"):
            for i, pattern in enumerate(getattr(self, name)):
                _check_regex(pattern, file, f"{key(prefix, name)}[{i}]")


@dataclass
class OptimizerConfig:
    type: Literal["adamw", "adamw8bit", "adafactor"] = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    eps: float = 1e-8
    # Update bfloat16 weights in float32 and round the result stochastically (see training/optimizers.py).
    stochastic_rounding: bool = False

    def validate(self, file, prefix):
        check(self.lr > 0, file, key(prefix, "lr"), "must be > 0")
        check(self.eps > 0, file, key(prefix, "eps"), "must be > 0")
        check(all(0 <= b < 1 for b in self.betas), file, key(prefix, "betas"), "must be in [0, 1)")
        check(self.weight_decay >= 0, file, key(prefix, "weight_decay"), "must be >= 0")
        if self.type == "adamw8bit":
            missing = adamw8bit_missing()
            check(not missing, file, key(prefix, "type"), f"= 'adamw8bit' needs {missing} "
                  f"(bitsandbytes is optional: pip install bitsandbytes, on a CUDA machine)")


def adamw8bit_missing() -> str:
    """What 'adamw8bit' lacks here ('' when usable): bitsandbytes' 8-bit AdamW runs on CUDA GPUs only."""
    import torch  # only for this key: reading a config does not load torch

    lacking = []
    if importlib.util.find_spec("bitsandbytes") is None:
        lacking.append("the bitsandbytes package, which is not installed")
    if not torch.cuda.is_available():
        lacking.append("a CUDA GPU, and none is available")
    return " and ".join(lacking)


@dataclass
class MonitoringConfig:
    """Weights & Biases logging beside TensorBoard, with diffusion-pipe's key names."""

    enable_wandb: bool = False
    # Better left empty: `wandb login` or the WANDB_API_KEY environment variable keep it out of files.
    wandb_api_key: str = ""
    wandb_tracker_name: str = ""
    wandb_run_name: str = ""

    def validate(self, file, prefix):
        if self.enable_wandb:
            check(wandb_missing() == "", file, key(prefix, "enable_wandb"), wandb_missing())


def wandb_missing() -> str:
    """Why Weights & Biases logging cannot run here ('' when it can)."""
    if importlib.util.find_spec("wandb") is None:
        return ("= true needs the wandb package, which is not installed: pip install wandb "
                "(or set enable_wandb = false)")
    return ""


@dataclass
class EmaConfig:
    """An exponential moving average of the trained weights (training/ema.py)."""

    decay: float = 0.999
    update_every: int = 1
    device: Literal["gpu", "cpu"] = "gpu"
    # Also evaluate the averaged weights (eval/<name>/ema).
    eval: bool = False

    def validate(self, file, prefix):
        check(0.0 < self.decay < 1.0, file, key(prefix, "decay"), "must be in (0, 1)")
        check(self.update_every >= 1, file, key(prefix, "update_every"), "must be at least 1")


@dataclass
class EvalDatasetConfig:
    name: str = required()
    config: str = required()


@dataclass
class SamplePrompt:
    """One sample prompt with settings of its own; a key left out takes the [sample] value."""

    prompt: str = required()
    seed: Optional[int] = None
    width: Optional[int] = None
    height: Optional[int] = None
    frames: Optional[int] = None
    guidance: Optional[float] = None


@dataclass
class SampleConfig:
    """[sample]: pictures (or videos) from fixed prompts during training (training/sampling.py).
    Unset sizes, steps and guidance take the model's diffusers pipeline defaults."""

    prompts: list[Union[str, SamplePrompt]] = field(default_factory=list)
    # A text file with one prompt a line (empty lines skipped), after `prompts`.
    prompts_file: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    frames: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    # The unconditional prompt of classifier-free guidance (models that sample with it: LTX-Video).
    negative_prompt: str = ""
    # None: the top-level `seed`.
    seed: Optional[int] = None
    every_n_steps: Optional[int] = None
    every_n_epochs: Optional[int] = None
    at_start: bool = False

    def validate(self, file, prefix):
        for name in ("width", "height", "frames", "steps", "every_n_steps", "every_n_epochs"):
            value = getattr(self, name)
            check(value is None or value >= 1, file, key(prefix, name), f"must be at least 1, got {value}")
        check(self.guidance is None or self.guidance >= 0, file, key(prefix, "guidance"), "must be >= 0")
        for i, p in enumerate(self.prompts):
            where = f"{key(prefix, 'prompts')}[{i}]"
            text = p if isinstance(p, str) else p.prompt
            check(text.strip() != "", file, where, "is an empty prompt")
            if isinstance(p, SamplePrompt):
                for name in ("width", "height", "frames"):
                    value = getattr(p, name)
                    check(value is None or value >= 1, file, f"{where}.{name}", f"must be at least 1, got {value}")
                check(p.guidance is None or p.guidance >= 0, file, f"{where}.guidance", "must be >= 0")


@dataclass(frozen=True)
class SampleRequest:
    """One sample to draw, every setting resolved; `index` numbers it within the run's samples."""

    index: int
    prompt: str
    seed: int
    width: int
    height: int
    frames: int
    steps: int
    guidance: float
    negative_prompt: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.width, self.height, self.frames


@dataclass
class TrainConfigFile:
    output_dir: str = required()
    dataset: str = required()
    model: dict = required()
    # No [adapter] table: full fine-tuning of the transformer.
    adapter: Optional[AdapterConfig] = None
    full_finetune_dtype: Optional[DType] = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # No [ema] table: no moving average.
    ema: Optional[EmaConfig] = None
    eval_datasets: list[EvalDatasetConfig] = field(default_factory=list)
    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    micro_batch_size_per_gpu: int = 1
    pipeline_stages: int = 1
    # The last N transformer blocks keep their frozen weights in CPU memory (memory/block_swap.py).
    blocks_to_swap: int = 0
    partition_method: str = "parameters"
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0
    # 1: DeepSpeed's ZeRO stage 1, the optimizer state sharded over the data-parallel replicas.
    zero_stage: int = 0
    warmup_steps: int = 0
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    save_every_n_epochs: Optional[int] = None
    save_every_n_steps: Optional[int] = None
    checkpoint_every_n_minutes: Optional[float] = None
    checkpoint_every_n_epochs: Optional[int] = None
    checkpoint_every_n_steps: Optional[int] = None
    checkpoints_to_keep: int = 3
    eval_every_n_epochs: Optional[int] = None
    eval_every_n_steps: Optional[int] = None
    eval_at_start: bool = True
    activation_checkpointing: Union[bool, Literal["selective"]] = False
    # Pretend each GPU has this many GiB (and on CUDA, limit the process to it): the memory plan
    # (memory/plan.py) chooses for this size; also makes the plan work on CPU.
    memory_budget_gib: Optional[float] = None
    # torch.compile every pipeline layer (models/pipeline_layers.PipelineLayer.compile_run).
    # None: on where the stage runs on a CUDA GPU and a tiny compiled call checks out there
    # (parallel/engine.resolve_compile), off on CPU.
    compile: Optional[bool] = None
    # A diffusers attention backend for the transformer (ModelMixin.set_attention_backend), e.g.
    # "_native_cudnn"; None: "_native_cudnn" on a CUDA GPU where its probe passes
    # (parallel/stages.resolve_attention_backend), else torch's scaled-dot-product attention
    # without cuDNN (parallel/launch.py), as "native" gives it.
    attention_backend: Optional[str] = None
    caching_batch_size: int = 1
    # Processes per GPU that read and resize media files while the VAE encodes; None:
    # data.cache.default_caching_workers (the cores shared by this machine's ranks, at most 8).
    caching_workers: Optional[int] = None
    steps_per_print: int = 1
    save_dtype: DType = "bfloat16"
    seed: int = 42
    sample: Optional[SampleConfig] = None
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)

    def validate(self, file, prefix):
        check(self.ema is None or self.adapter is not None, file, "ema",
              "is for LoRA runs ([adapter] table); full fine-tuning has no EMA yet")
        check(self.full_finetune_dtype is None or self.adapter is None, file, "full_finetune_dtype",
              "is for full fine-tuning (no [adapter] table); the LoRA weights' dtype is adapter.dtype")
        check(self.epochs is not None or self.max_steps is not None, file, "epochs",
              "or 'max_steps' must be set (how long to train)")
        positive = ["epochs", "max_steps", "micro_batch_size_per_gpu", "pipeline_stages",
                    "gradient_accumulation_steps", "save_every_n_epochs", "save_every_n_steps",
                    "checkpoint_every_n_epochs", "checkpoint_every_n_steps", "checkpoints_to_keep", "eval_every_n_epochs",
                    "eval_every_n_steps", "caching_batch_size", "steps_per_print"]
        for name in positive:
            value = getattr(self, name)
            check(value is None or value >= 1, file, name, f"must be at least 1, got {value}")
        check(self.checkpoint_every_n_minutes is None or self.checkpoint_every_n_minutes > 0, file,
              "checkpoint_every_n_minutes", "must be > 0")
        check(self.memory_budget_gib is None or self.memory_budget_gib > 0, file, "memory_budget_gib", "must be > 0")
        check(self.caching_workers is None or self.caching_workers >= 0, file, "caching_workers",
              f"must be >= 0 (0: read media files in the training process), got {self.caching_workers}")
        check(self.blocks_to_swap >= 0, file, "blocks_to_swap", f"must be >= 0, got {self.blocks_to_swap}")
        if self.blocks_to_swap:
            check(self.pipeline_stages == 1, file, "blocks_to_swap",
                  f"needs pipeline_stages = 1 (got {self.pipeline_stages}): swapping and a pipeline are two ways "
                  f"to fit the model; use one")
            check(self.adapter is not None, file, "blocks_to_swap",
                  "swaps frozen base weights, so it needs a LoRA run ([adapter] table); full fine-tuning trains them all")
        check(self.gradient_clipping >= 0, file, "gradient_clipping", "must be >= 0 (0 turns it off)")
        check(self.zero_stage in (0, 1), file, "zero_stage",
              f"must be 0 or 1, got {self.zero_stage}: stages 2 and 3 shard gradients and weights, which "
              f"DeepSpeed's pipeline engine does not support")
        if self.zero_stage:
            check(self.adapter is None, file, "zero_stage",
                  "= 1 is for full fine-tuning (no [adapter] table): a LoRA's optimizer state is small")
            check(self.optimizer.type == "adamw", file, "zero_stage",
                  f"= 1 needs optimizer.type = 'adamw' (got '{self.optimizer.type}'): the shards are flat slices "
                  f"of the weights, which Adafactor's per-matrix factors and 8-bit AdamW's blocks would not match")
        check(self.warmup_steps >= 0, file, "warmup_steps", "must be >= 0")
        check(self.partition_method in ("blocks", "parameters", "uniform")
              or self.partition_method.startswith("type:"),
              file, "partition_method", "must be 'blocks', 'parameters', 'uniform' or 'type:<regex>'")
        if self.partition_method.startswith("type:"):
            _check_regex(self.partition_method.removeprefix("type:"), file, "partition_method")
        names = [e.name for e in self.eval_datasets]
        check(len(names) == len(set(names)), file, "eval_datasets", "names must be unique")
        if self.attention_backend is not None:
            # only for this key: reading a config does not load diffusers
            from diffusers.models.attention_dispatch import AttentionBackendName

            known = [b.value for b in AttentionBackendName]
            check(self.attention_backend in known, file, "attention_backend",
                  f"= '{self.attention_backend}' is not a diffusers attention backend; one of: {', '.join(known)}")


def _check_regex(pattern: str, file, where: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise ConfigError(f"{file}: '{where}' is not a valid regular expression ({e}): {pattern!r}") from None


@dataclass
class EvalDataset:
    name: str
    dataset: Dataset


@dataclass
class TrainConfig:
    """The validated run configuration with paths resolved and the dataset TOMLs read."""

    file: Path
    settings: TrainConfigFile
    model: ModelConfig
    dataset: Dataset
    eval_datasets: list[EvalDataset]
    output_dir: Path
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
    settings = build(TrainConfigFile, raw, path)
    model_config = build(model_cls.config_class, model_table, path, "model", top_level)
    for name in ("diffusers_path", "transformer_path"):
        value = getattr(model_config, name)
        if value is not None:
            resolved = resolve_path(path.parent, value, path, f"model.{name}")
            check(path_is(resolved, "exists"), path, f"model.{name}", f"does not exist: {resolved}")
            check(name != "transformer_path" or not path_is(resolved, "dir"), path, f"model.{name}",
                  f"is a folder: {resolved}; expected the transformer's single .safetensors file (a diffusers "
                  f"folder goes in model.diffusers_path)")
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

    dataset = load_dataset_config(resolve_path(path.parent, settings.dataset, path, "dataset"))
    eval_datasets = [EvalDataset(e.name, load_dataset_config(resolve_path(path.parent, e.config, path,
                                                                           f"eval_datasets[{i}].config")))
                     for i, e in enumerate(settings.eval_datasets)]
    output_dir = resolve_path(path.parent, settings.output_dir, path, "output_dir")
    check(not path_is(output_dir, "exists") or path_is(output_dir, "dir"), path, "output_dir",
          f"is a file, not a folder: {output_dir}")
    for ds in [dataset] + [e.dataset for e in eval_datasets]:
        model_cls.check_dataset(ds)
    given = frozenset(raw) | {f"model.{k}" for k in model_table}
    samples = resolve_samples(settings.sample, model_cls, path, settings.seed) if settings.sample else []
    notes = [f"{path}: {n}" for n in notes] + _difference_notes(path, raw, settings)
    for ds in [dataset] + [e.dataset for e in eval_datasets]:
        notes += [n for n in ds.notes if n not in notes]
    return TrainConfig(path, settings, model_config, dataset, eval_datasets, output_dir,
                       warnings=_pipeline_warnings(path, settings) + _eval_overlap_warnings(path, dataset, eval_datasets),
                       notes=notes, given=given, samples=samples)


def resolve_samples(sample: SampleConfig, model_cls, path: Path, seed: int) -> list[SampleRequest]:
    """The [sample] prompts (inline, then the prompts file) with every setting filled in: the
    prompt's own, else [sample]'s, else the model's pipeline default (`model_cls.sample_defaults`).
    Sizes and frame counts the model cannot take, and an empty prompt list, are ConfigErrors."""
    entries: list[tuple[str, SamplePrompt]] = [
        (f"sample.prompts[{i}]", p if isinstance(p, SamplePrompt) else SamplePrompt(prompt=p))
        for i, p in enumerate(sample.prompts)]
    if sample.prompts_file is not None:
        file = resolve_path(path.parent, sample.prompts_file, path, "sample.prompts_file")
        check(path_is(file, "file"), path, "sample.prompts_file", f"is not a file: {file}")
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: 'sample.prompts_file' cannot be read as UTF-8 text ({e}): {file}") from None
        entries += [(f"sample.prompts_file line {n}", SamplePrompt(prompt=line.strip()))
                    for n, line in enumerate(lines, 1) if line.strip()]
    check(bool(entries), path, "sample.prompts", "lists no prompt (and prompts_file has none): give at least one")
    defaults = model_cls.sample_defaults
    base_seed = seed if sample.seed is None else sample.seed
    requests = []
    for i, (where, p) in enumerate(entries):
        def pick(name):
            own = getattr(p, name)
            shared = getattr(sample, name)
            return own if own is not None else shared if shared is not None else defaults[name]

        request = SampleRequest(index=i, prompt=p.prompt, seed=base_seed if p.seed is None else p.seed,
                                width=pick("width"), height=pick("height"), frames=pick("frames"),
                                steps=sample.steps or defaults["steps"], guidance=float(pick("guidance")),
                                negative_prompt=sample.negative_prompt)
        # The key that set the value, for the message.
        def source(name):
            return f"{where}.{name}" if getattr(p, name) is not None and where.startswith("sample.prompts[") \
                else f"sample.{name}"

        m = model_cls.size_multiple
        for name in ("width", "height"):
            value = getattr(request, name)
            check(value % m == 0, path, source(name),
                  f"= {value} is not a multiple of {m}, which model type '{model_cls.name}' needs")
        k = model_cls.frame_multiple
        if k == 0:
            check(request.frames == 1, path, source("frames"),
                  f"= {request.frames}: model type '{model_cls.name}' makes images (1 frame)")
        else:
            check((request.frames - 1) % k == 0, path, source("frames"),
                  f"= {request.frames}: model type '{model_cls.name}' takes {k}k+1 frames (1, {k + 1}, {2 * k + 1}, ...)")
        requests.append(request)
    return requests


def _difference_notes(path: Path, raw: dict, settings: TrainConfigFile) -> list[str]:
    """Notes on defaults that differ from diffusion-pipe's on purpose, where the config relies on them."""
    notes = []
    checkpointing = any(getattr(settings, k) is not None for k in
                        ("checkpoint_every_n_minutes", "checkpoint_every_n_epochs", "checkpoint_every_n_steps"))
    if checkpointing and "checkpoints_to_keep" not in raw:
        notes.append(f"{path}: checkpoints_to_keep is not set: the newest {settings.checkpoints_to_keep} checkpoints are "
                     f"kept and older ones deleted (diffusion-pipe keeps them all); set it to keep more")
    return notes


# Below this share of busy time, a pipelined run warns (with the accumulation that reaches it).
PIPELINE_EFFICIENCY_WARNING = 0.75


def pipeline_efficiency(stages: int, accumulation: int) -> float:
    """The most of a step each GPU can compute under DeepSpeed's 1F1B schedule: the first
    micro-batch takes stages - 1 slots to reach the last stage and the last one as long to
    drain, so accumulation / (accumulation + stages - 1) (1.0 without a pipeline)."""
    return accumulation / (accumulation + stages - 1)


def accumulation_for_efficiency(stages: int, target: float) -> int:
    """The fewest accumulation steps whose pipeline efficiency reaches `target`."""
    m = math.ceil(target * (stages - 1) / (1 - target) - 1e-9)
    return max(1, m)


def pipeline_summary(stages: int, accumulation: int) -> str:
    """The line printed at the start of a pipelined run."""
    return (f"pipeline: {stages} stages, {accumulation} micro-batches a step: each GPU computes at most "
            f"{pipeline_efficiency(stages, accumulation):.0%} of the time (1F1B: accumulation / (accumulation + "
            f"stages - 1))")


def _pipeline_warnings(path: Path, settings: TrainConfigFile) -> list[str]:
    """A pipeline of K stages needs many more than K micro-batches in flight to keep every stage
    busy: below PIPELINE_EFFICIENCY_WARNING, say so and which accumulation reaches it (allowed:
    memory or the samples per step may decide)."""
    k, m = settings.pipeline_stages, settings.gradient_accumulation_steps
    efficiency = pipeline_efficiency(k, m)
    if k > 1 and efficiency < PIPELINE_EFFICIENCY_WARNING:
        target = PIPELINE_EFFICIENCY_WARNING
        return [f"{path}: 'gradient_accumulation_steps' = {m} with 'pipeline_stages' = {k}: each GPU idles "
                f"{1 - efficiency:.0%} of each step (a pipeline fills and drains once a step: the idle share is "
                f"(stages - 1) / (accumulation + stages - 1)); set gradient_accumulation_steps to at least "
                f"{accumulation_for_efficiency(k, target)} for {target:.0%} busy (more is better)"]
    return []


def _eval_overlap_warnings(path: Path, dataset: Dataset, eval_datasets: list[EvalDataset]) -> list[str]:
    """A warning for each eval dataset that reads a training folder: allowed (a loss curve on
    the training data is a fine smoke test) but its loss then says nothing about unseen data."""
    training = {d.path for d in dataset.directories}
    warnings = []
    for e in eval_datasets:
        shared = [d.path for d in e.dataset.directories if d.path in training]
        if shared:
            folders = ", ".join(str(f) for f in dict.fromkeys(shared))
            warnings.append(f"{path}: eval dataset '{e.name}' ({e.dataset.file}) reads training folder(s) {folders}: "
                            f"its eval loss measures fitting the training data, not how the model does on unseen "
                            f"data; give it a folder of held-out items")
    return warnings
