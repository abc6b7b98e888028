"""DeepSpeed glue: process topology, the pipeline module, the engine.

The transformer is built on the meta device; the layer list is partitioned exactly as
DeepSpeed's `PipelineModule` will partition it, and only the local stage's layers get real
weights, so host memory does not grow with the number of GPUs.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.pipe.module import PipelineModule
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
from torch.utils.checkpoint import checkpoint

from utils import memory, memory_plan
from utils.config import TrainConfig, pipeline_summary
from utils.optimizers import build_optimizer, build_scheduler, lora_plus_groups
from utils.schema import ConfigError


def init_distributed() -> tuple[int, int, torch.device]:
    """Start torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU).

    Works under the `deepspeed` launcher and as a plain single process. When every process runs
    on this machine, they meet through a file unique to their launch (see `local_rendezvous`),
    not the launcher's port: two runs started with the default port (29500) do not clash. Across
    machines the port comes from MASTER_PORT (the launcher's `--master_port`), and a port in use
    is an error saying so.
    """
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    rendezvous = local_rendezvous()
    local_rank = int(os.environ["LOCAL_RANK"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cpu_threads_per_process(os.environ, cores))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        configure_attention()
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        prepare_cpu_comm_op(log=print if os.environ["RANK"] == "0" else lambda *_: None)
    try:
        if rendezvous is None:
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        else:
            deepspeed.init_distributed(dist_backend=backend, verbose=False, init_method=f"file://{rendezvous}",
                                       rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    except RuntimeError as e:
        if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower():
            port = os.environ["MASTER_PORT"]
            raise ConfigError(f"--master_port: port {port} is in use on {os.environ['MASTER_ADDR']} (by another run?); "
                              f"launch with a free one: deepspeed --master_port=<port> ...") from None
        raise
    _unlink_shared_memory_name(dist.get_rank(), dist.get_world_size())
    return dist.get_rank(), dist.get_world_size(), device


def cpu_threads_per_process(env, cores: int) -> int:
    """torch's CPU threads for one process: OMP_NUM_THREADS when set, else this machine's cores
    shared among its processes of the launch.

    Each process would otherwise start a thread per core: 4 processes on a 64-core machine
    make 256 threads, which spin after every CPU operation (noise, packing) and slow the other
    processes' Python thread, the one that launches the GPU work.
    """
    if env.get("OMP_NUM_THREADS"):
        return max(1, int(env["OMP_NUM_THREADS"]))
    local = int(env.get("LOCAL_SIZE") or env.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, cores // max(1, local))


def torch_extensions_dir() -> Path:
    """Where torch builds C++ extensions (DeepSpeed's JIT-compiled ops) for this run: the user's
    TORCH_EXTENSIONS_DIR, else a folder in this Python environment (set in the environment for
    the build). torch's own default, ~/.cache/torch_extensions, is shared by every environment
    of the user, so two environments would rebuild an op for each other at every start."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    from torch.utils.cpp_extension import get_default_build_root

    # Unset (a read-only environment): torch's default, in a folder per Python version and device.
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def prepare_cpu_comm_op(log=print) -> None:
    """DeepSpeed on the CPU compiles its shared-memory communication op, deepspeed_shm_comm, when
    it starts (deepspeed.comm.torch.build_shm_op: on Linux, whenever the op was not built at
    install time; no setting skips it). Before that: a missing C++ compiler is one line saying
    what to install, and a build that is about to run is announced, as it takes a minute."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import get_cxx_compiler, is_ninja_available

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or installed_ops.get(builder.NAME) or not builder.is_compatible():
        return
    folder = torch_extensions_dir() / builder.NAME
    if (folder / f"{builder.NAME}.so").is_file():
        return  # built before in this environment
    compiler = get_cxx_compiler()
    if shutil.which(compiler) is None:
        raise ConfigError(f"a C++ compiler is needed: on a CPU, DeepSpeed compiles its communication op "
                          f"({builder.NAME}) once per Python environment, and the compiler {compiler!r} was not "
                          f"found; install one (Debian/Ubuntu: apt-get install g++; Fedora/RHEL: dnf install "
                          f"gcc-c++; or set CXX to a compiler) and run again")
    if not is_ninja_available():
        raise ConfigError(f"the ninja build tool is needed: on a CPU, DeepSpeed compiles its communication op "
                          f"({builder.NAME}) once per Python environment; install it (pip install ninja) and run again")
    log(f"compiling DeepSpeed's CPU communication op ({builder.NAME}) into {folder}: once for this Python "
        f"environment, about a minute")


def _unlink_shared_memory_name(rank: int, world: int) -> None:
    """Remove the name of this process's DeepSpeed shared-memory segment once every process has
    mapped it.

    On CPU, DeepSpeed's all-reduce maps a 64 MiB segment per process, /dev/shm/
    deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, and never deletes it: each
    launch would leave its segments behind until the machine runs out of memory. Every process
    maps all of them while DeepSpeed starts; after a barrier the names can go, and the memory is
    freed when the last process exits, however it exits.
    """
    if world > 1:
        dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        (Path("/dev/shm") / name).unlink(missing_ok=True)
    except OSError:
        pass  # not Linux, or not ours: nothing to tidy


def local_rendezvous() -> str | None:
    """The file the processes of this launch meet through, or None to use MASTER_ADDR:MASTER_PORT.

    Only when every rank runs on this machine (a single process, or the deepspeed or torchrun
    launcher on one node): they are all children of the same launcher process, so its pid and
    start time name the launch uniquely. MASTER_PORT is then set to the launcher's pid, because
    DeepSpeed names its shared-memory segments after it (the port is not used for a socket).
    """
    world = int(os.environ["WORLD_SIZE"])
    local = os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE")
    if world == 1:
        owner = os.getpid()  # alone: nobody to meet, but a store is still needed
    elif local == str(world) and os.environ.get("CROSS_SIZE", "1") == "1":
        owner = os.getppid()
    else:
        return None
    try:
        started = Path(f"/proc/{owner}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "0"
    os.environ["MASTER_PORT"] = str(owner)
    name = f"trainer-rendezvous-{socket.gethostname()}-{os.getuid()}-{owner}-{started}"
    return str(Path(tempfile.gettempdir()) / name)


def configure_attention() -> None:
    """Keep scaled-dot-product attention off the cuDNN backend.

    On an H200 with torch 2.11 + CUDA 13, cuDNN attention failed at Flux's shapes and left the
    CUDA context broken (bench/attention_backends.py shows it). `attention_backend =
    "_native_cudnn"` opts in through diffusers' backend, which ran and is the fastest there
    (docs/benchmarks.md, "Fast settings").
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_topology(world_size: int, stages: int, config_file) -> PipeDataParallelTopology:
    if world_size % stages != 0:
        raise ConfigError(f"{config_file}: 'pipeline_stages' = {stages} does not divide the number of GPUs "
                          f"({world_size}); use a GPU count that is a multiple of it")
    return PipeDataParallelTopology(num_pp=stages, num_dp=world_size // stages)


def resolve_partition_method(method: str, layers, full_finetune: bool) -> str:
    """`partition_method` as DeepSpeed's PipelineModule takes it.

    "blocks" puts the same number of transformer blocks on every stage (the input and output
    layers count as nothing). Not the default: on 2 H100s a FLUX.1 LoRA ran slower split by blocks
    (29 + 28) than by parameters (18 + 39), see docs/benchmarks.md.
    """
    if method == "blocks":
        names = dict.fromkeys(layers[i].__class__.__name__ for i in block_layer_indices(layers))
        return "type:^(" + "|".join(re.escape(n) for n in names) + ")$"
    return method


def partition(layers, stages: int, method: str) -> list[int]:
    """Stage boundaries as DeepSpeed computes them for `method` (parameters, uniform, type:regex)."""
    if method == "uniform":
        return ds_utils.partition_uniform(num_items=len(layers), num_parts=stages)
    if method == "parameters":
        weights = [sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in layers]
    else:
        pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        weights = [1 if pattern.search(layer.__class__.__name__) else 0 for layer in layers]
    return ds_utils.partition_balanced(weights=weights, num_parts=stages)


def describe_partition(layers, parts: list[int]) -> str:
    """Which layers each stage holds, with parameter counts (the memory estimate follows it; the
    parameters are still on the meta device here, in no meaningful dtype)."""
    lines = []
    for stage in range(len(parts) - 1):
        chunk = layers[parts[stage]:parts[stage + 1]]
        params = [p for layer in chunk for p in layer.parameters()]
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        names = [f"{parts[stage] + i}:{layer.__class__.__name__}({', '.join(layer.module_names)})"
                 for i, layer in enumerate(chunk)]
        if len(names) > 6:
            names = names[:3] + ["..."] + names[-2:]
        lines.append(f"stage {stage}: layers {parts[stage]}-{parts[stage + 1] - 1}, {total / 1e6:.2f}M params "
                     f"({trainable / 1e6:.3f}M trainable): {' '.join(names)}")
    return "\n".join(lines)


def describe_targets(transformer) -> str:
    """The modules that carry an adapter, compactly: names that differ only in their first block
    index share a line, "transformer_blocks.{0-18}: attn.to_q, attn.to_k, ...", per set of names."""
    names = [n for n, m in transformer.named_modules() if hasattr(m, "lora_A")]
    groups: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    per_block: dict[tuple[str, int], list[str]] = {}
    alone = []
    for name in names:
        match = re.match(r"^(.*?)\.(\d+)\.(.+)$", name)
        if match:
            per_block.setdefault((match.group(1), int(match.group(2))), []).append(match.group(3))
        else:
            alone.append(name)
    for (stem, index), rests in per_block.items():
        groups.setdefault((stem, tuple(rests)), []).append(index)
    lines = [f"adapter on {len(names)} modules:"]
    for (stem, rests), indices in groups.items():
        lines.append(f"  {stem}.{{{_ranges(indices)}}}: {', '.join(rests)}")
    if alone:
        lines.append(f"  {', '.join(alone)}")
    return "\n".join(lines)


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    parts, start = [], None
    numbers = sorted(numbers)
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(str(n) if n == start else f"{start}-{n}")
            start = None
    return ",".join(parts)


def plan_stages(model, config: TrainConfig):
    """The transformer on the meta device, set up for LoRA or full fine-tuning, as pipeline layers
    and their stage boundaries: (transformer, layers, parts)."""
    transformer = model.build_empty_transformer()
    if config.full_finetune:
        # Before partitioning: "parameters" balances the trainable parameters, here all of them.
        transformer.requires_grad_(True)
    else:
        model.add_lora(transformer, config.settings.adapter)
    layers = model.pipeline_layers(transformer)
    method = resolve_partition_method(config.settings.partition_method, layers, config.full_finetune)
    names = list(dict.fromkeys(layer.__class__.__name__ for layer in layers))
    if method.startswith("type:") and not any(re.search(method[5:], n, re.IGNORECASE) for n in names):
        # DeepSpeed would refuse it too, but only once the weights are loaded.
        raise ConfigError(f"{config.file}: 'partition_method' = '{method}' matches none of the {model.name} "
                          f"layer classes ({', '.join(names)})")
    return transformer, layers, partition(layers, config.settings.pipeline_stages, method)


def load_stage(model, config: TrainConfig, transformer, layers, parts: list[int], stage: int,
               device: torch.device) -> None:
    """Materialise pipeline stage `stage`: its base weights, then its LoRA or, with full
    fine-tuning, the base weights made trainable in the trained dtype. Layers then register the
    loaded objects of the transformer's own parameters they hold (`bind_root_parameters`)."""
    s = config.settings
    local_names = [n for layer in layers[parts[stage]:parts[stage + 1]] for n in layer.module_names]
    # blocks_to_swap: the swapped blocks' base weights go to CPU memory straight from disk, so the
    # device never holds all of them (BlockSwap takes them from there).
    swapped = {n for i in swapped_layer_indices(layers, s.blocks_to_swap, config.file) for n in layers[i].module_names}
    model.load_weights(transformer, [n for n in local_names if n not in swapped], device)
    if swapped:
        model.load_weights(transformer, [n for n in local_names if n in swapped], torch.device("cpu"))
    if config.full_finetune:
        model.make_trainable(transformer, memory.DTYPES[config.trained_dtype])
    else:
        model.init_lora(transformer, local_names, s.adapter, device, s.seed)
        if s.adapter.init_from_existing:
            from pathlib import Path

            model.load_lora_into(transformer, Path(s.adapter.init_from_existing), s.adapter)
        if config.model.transformer_dtype == "float8":
            from utils.float8 import quantize_lora_base_layers

            blocks = set(block_layer_indices(layers))
            block_modules = [transformer.get_submodule(n) for i in range(parts[stage], parts[stage + 1])
                             if i in blocks for n in layers[i].module_names]
            quantize_lora_base_layers(block_modules, model.dtype, config.model.float8_matmul)
    if s.attention_backend is not None:
        apply_attention_backend(transformer, s.attention_backend, device, model.dtype, config.file)
    for layer in layers:
        layer.bind_root_parameters(transformer)


def apply_attention_backend(transformer, name: str, device: torch.device, dtype: torch.dtype, config_file) -> None:
    """Run the transformer's attention through the diffusers backend `name`, after one tiny
    attention call through it on `device`: a backend that cannot run here (its package missing,
    a GPU kernel on the CPU, a dtype it does not take) is a config error naming the key, not a
    traceback at the first step."""
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    try:
        transformer.set_attention_backend(name)
        # (batch, tokens, heads, head dim), as the models' attention processors call it
        probe = torch.randn(1, 128, 2, 64, device=device, dtype=dtype)
        dispatch_attention_fn(probe, probe, probe, backend=AttentionBackendName(name))
    except (RuntimeError, ImportError, ValueError, TypeError) as e:
        transformer.set_attention_backend("native")  # diffusers also keeps the choice process-wide
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{config_file}: 'attention_backend' = '{name}' cannot run on this {device.type} device "
                          f"with {str(dtype).removeprefix('torch.')}: {reason}") from None


def block_layer_indices(layers) -> list[int]:
    """The transformer-block layers: every layer but the input (first) and output (last) ones."""
    return list(range(1, len(layers) - 1))


def swapped_layer_indices(layers, blocks_to_swap: int, config_file=None) -> list[int]:
    """The last `blocks_to_swap` block layers, whose frozen weights live in CPU memory."""
    blocks = block_layer_indices(layers)
    if blocks_to_swap > len(blocks):
        raise ConfigError(f"{config_file}: 'blocks_to_swap' = {blocks_to_swap} exceeds the model's "
                          f"{len(blocks)} transformer blocks")
    return blocks[len(blocks) - blocks_to_swap:] if blocks_to_swap else []


def attach_block_swap(model, config: TrainConfig, transformer, layers, device: torch.device):
    """With `blocks_to_swap`, move the swapped blocks' frozen weights to CPU memory and hook their
    layers (before the engine is built, so that it never moves them to the device); else None."""
    s = config.settings
    swapped = swapped_layer_indices(layers, s.blocks_to_swap, config.file)
    if not swapped:
        return None
    from utils.block_swap import BlockSwap

    chosen = [layers[i] for i in swapped]
    owned = [[transformer.get_submodule(n) for n in layer.module_names] for layer in chosen]
    checkpointed = [memory.checkpointed(layer, s.activation_checkpointing, model) for layer in chosen]
    return BlockSwap(chosen, owned, checkpointed, device, resident=memory.BLOCK_SWAP_RESIDENT)


def build_engine(model, config: TrainConfig, rank: int, world: int, device: torch.device, total_steps: int,
                 log=print, tokens: int | None = None):
    """Build the local stage, the optimizer and the DeepSpeed pipeline engine.

    Without an [adapter] table the whole transformer trains (full fine-tuning): the local
    stage's weights in `config.trained_dtype`, all of them in the optimizer. `tokens`, the most
    tokens one training sample gives, sizes the activations in the printed memory estimate.
    """
    s = config.settings
    full = config.full_finetune
    topology = make_topology(world, s.pipeline_stages, config.file)
    transformer, layers, parts = plan_stages(model, config)
    if full:
        # DeepSpeed averages gradients over replicas and checkpoints only the parameters of the
        # layer modules: a weight a layer reaches some other way would silently not train.
        owned = {id(p) for layer in layers for p in layer.parameters()}
        outside = [n for n, p in transformer.named_parameters() if id(p) not in owned]
        if outside:
            raise ConfigError(f"{config.file}: full fine-tuning (no [adapter] table) is not available for model "
                              f"type '{model.name}': its weights {outside[:3]} are not parameters of its pipeline "
                              f"layers; train a LoRA instead")
    stage = topology.get_coord(rank).pipe
    replicas = world // s.pipeline_stages
    method = resolve_partition_method(s.partition_method, layers, full)
    # Every rank chooses (alike: the smallest GPU's budget), before any weight loads.
    plan = memory_plan.plan_memory(model, layers, parts, config, tokens, model.hidden_size(transformer),
                                   memory_plan.device_budget(config, device, world),
                                   lambda stages: partition(layers, stages, method), replicas)
    if rank == 0:
        if s.pipeline_stages > 1:
            log(pipeline_summary(s.pipeline_stages, s.gradient_accumulation_steps))
        log(describe_partition(layers, parts))
        log(plan)
        if not full:
            log(describe_targets(transformer))
        sample_tokens = max((model.tokens_per_sample(r.width, r.height, r.frames) or 0 for r in config.samples),
                            default=0) or None
        estimates = memory.estimate(model, layers, parts, config, tokens, model.hidden_size(transformer),
                                    sample_tokens=sample_tokens, replicas=replicas)
        device_total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        log(memory.describe(estimates, config, tokens, device_total, replicas))
        if full and config.trained_dtype == "bfloat16" and not s.optimizer.stochastic_rounding and not s.zero_stage:
            log("WARNING: full fine-tuning bfloat16 weights with plain rounding loses every update smaller "
                "than half a bfloat16 step (about 0.4% of the weight); set [optimizer] stochastic_rounding = true, "
                "full_finetune_dtype = 'float32', or with several replicas zero_stage = 1")
    load_stage(model, config, transformer, layers, parts, stage, device)
    block_swap = attach_block_swap(model, config, transformer, layers, device)
    if s.compile:
        compile_layers(layers[parts[stage]:parts[stage + 1]])

    pipe = PipelineModule(
        layers=layers, loss_fn=model.loss, topology=topology,
        partition_method=method,
        **checkpointing_args(s.activation_checkpointing, model),
        # non-reentrant checkpointing: several tensors flow between layers, some without grad
        activation_checkpoint_func=functools.partial(checkpoint, use_reentrant=False),
        dynamic_shape=True)  # buckets give micro-batches of different shapes
    if list(pipe.parts) != list(parts):
        raise RuntimeError(f"pipeline partition mismatch: DeepSpeed {pipe.parts}, ours {parts}")

    trainable = [p for p in pipe.parameters() if p.requires_grad]
    names = {id(p): n for n, p in transformer.named_parameters()}
    if not full:
        trainable = lora_plus_groups(trainable, names, s.optimizer.lr, s.adapter.lora_plus_ratio)
    # The gradient norm sums over what each rank steps: its stage's weights, or under ZeRO its
    # replica's slice of them, so then over every rank of the job.
    norm_group = dist.group.WORLD if s.zero_stage else pipe.mpu().get_pipe_parallel_group()
    optimizer = build_optimizer(trainable, s.optimizer, s.gradient_clipping, norm_group,
                                param_names=names, seed=s.seed, low_memory=full)
    scheduler = build_scheduler(optimizer, s.lr_scheduler, s.warmup_steps, total_steps)
    engine = start_engine(pipe, optimizer, scheduler, s.micro_batch_size_per_gpu, s.gradient_accumulation_steps,
                          s.zero_stage)
    engine.block_swap = block_swap  # for tests and logging; the hooks do the work
    return engine, transformer


def compile_layers(layers) -> None:
    """`compile = true`: every given layer runs its `run` through torch.compile."""
    # DeepSpeed's pipeline engine runs one backward per stage output, with retain_graph for all
    # but the last; compiled graphs that donate their saved buffers to the backward refuse that.
    # A process-wide torch setting, read when each backward runs.
    torch._functorch.config.donated_buffer = False
    for layer in layers:
        layer.compile_run()


def checkpointing_args(mode, model) -> dict:
    """PipelineModule's activation-checkpointing arguments for `activation_checkpointing`.

    true: every layer with weights (DeepSpeed's default); "selective": only the layer classes
    the model names in `selective_checkpoint_layers`; false: none.
    """
    if mode == "selective":
        return {"activation_checkpoint_interval": 1, "checkpointable_layers": list(model.selective_checkpoint_layers)}
    return {"activation_checkpoint_interval": 1 if mode else 0}


def start_engine(pipe: PipelineModule, optimizer, scheduler, micro_batch_size: int, accumulation: int,
                 zero_stage: int = 0):
    """DeepSpeed's pipeline engine around `pipe`, configured the one way we use it."""
    ds_config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        # DeepSpeed clips by default (1.0) and throws the norm away; our optimizer wrapper
        # clips once and records the norm.
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,  # we print our own progress
        "wall_clock_breakdown": False,
    }
    if zero_stage:
        ds_config["zero_optimization"] = {
            "stage": zero_stage,
            # Under a pipeline, DeepSpeed's ZeRO norm counts only the first stage's gradients (it
            # counts a parameter once per model-parallel group, and takes the stages for one);
            # our optimizer measures the norm over every rank's slice instead.
            "compute_grad_norm": False,
            "reduce_bucket_size": memory.ZERO_BUCKET_ELEMENTS,
            "allgather_bucket_size": memory.ZERO_BUCKET_ELEMENTS,
        }
        # Our AdamW subclass: an elementwise update, so stepping flat slices of the weights is exact.
        ds_config["zero_allow_untested_optimizer"] = True
    engine, _, _, _ = deepspeed.initialize(model=pipe, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if engine.grid.get_data_parallel_world_size() == 1 and not zero_stage:
        # One replica: nothing to average, so skip the engine's flatten/all-reduce/unflatten
        # of every gradient each step (the attribute DeepSpeed exposes for this). ZeRO needs the
        # pass: it is where its optimizer collects the gradients of its slice.
        engine.pipeline_enable_backward_allreduce = False
    return engine
