"""Time one training step of a model three ways, on one GPU, with synthetic inputs.

  engine    our trainer's step: parallel/engine.build_engine, DeepSpeed's pipeline engine (1 stage),
            as train.py builds it
  layers    the same layer list in a plain PyTorch loop (the engine's overhead is the difference)
  diffusers the plain loop of the diffusers example scripts: the whole transformer from
            from_pretrained run by its own forward (the model's `reference_forward`), peft LoRA on
            the same target modules with fp32 LoRA weights, bf16 autocast, AdamW, and diffusers'
            own gradient checkpointing when checkpointing is on

Each row runs in its own process, so its peak memory is its own; a row that fails or runs out of
memory is an error row. The batch comes from the model's own `training_example`: random latents of
the VAE's latent shape, and the embeddings of one caption long enough to fill the configured text
length, encoded by the model's own text encoders. FLOPs are counted once per shape on the layers
row (torch.utils.flop_counter, forward and backward without checkpointing: the useful work), or on
bfloat16 layers in a child of their own when there is no layers row or it runs float8 products;
MFU against a bf16 matrix product timed in the same run. Prints a table; `--json` appends the rows.
Trainer options for the engine and layers rows: --compile, --float8 storage|matmul,
--attention BACKEND, --checkpointing selective, --batch; for every row: --dora (DoRA); for the
engine row: --ema gpu|cpu (the trainer's moving average, updated every step; the row also gives
the update's own time). --no_flops skips the FLOP count's own child when there is no layers row.
Usage, on a CUDA machine (model folders from bench/make_full_size_flux.py / make_full_size_video.py):
  python bench/step.py MODEL_DIR --model ltx-video --resolution 768x512 --frames 49 --checkpointing on
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training import objective  # noqa: E402

MODES = ("engine", "layers", "diffusers")
# --checkpointing as the trainer's activation_checkpointing setting.
CHECKPOINTING = {"off": False, "on": True, "selective": "selective"}
CKPT_NAMES = {False: "off", True: "on", "selective": "sel"}
# Long enough to fill any model's text length with tokens (masks all ones: the most text work).
CAPTION = ", ".join(["a photo of a cat sitting on a red chair in a quiet library at sunrise"] * 60)


def parse_resolution(text: str) -> tuple[int, int]:
    """'WxH' or one number for a square, as (width, height)."""
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


# ------------------------------------------------------------------------------ set-up shared by all rows
def make_model(args):
    from models import get_model_class

    cls = get_model_class(args.model)
    extra = {} if args.text_len is None else {"max_sequence_length": args.text_len}
    if args.float8:  # frozen block weights stored in float8 (engine and layers rows)
        extra.update(transformer_dtype="float8", float8_matmul=args.float8 == "matmul")
    return cls(cls.config_class(type=args.model, diffusers_path=str(args.model_dir), dtype=args.dtype, **extra))


def row_config(model, args):
    """The run configuration of the engine and layers rows, as train.py would read it from a TOML.

    Trainer options the rows share (`--compile`) are set here: build_engine then applies them to
    the engine row, and `layers_step` to the layers row.
    """
    from config.train_config import TrainConfig, TrainConfigFile
    from config.training import AdapterConfig, EmaConfig, OptimizerConfig
    from memory.plan import LEVERS

    adapter = None if args.full else AdapterConfig(rank=args.rank, alpha=float(args.rank), use_dora=args.dora)
    ema = None if args.ema is None else EmaConfig(device=args.ema)
    settings = TrainConfigFile(output_dir=Path("unused"), dataset_file=Path("unused"), model_table={"type": model.name},
                               adapter=adapter, ema=ema, optimizer=OptimizerConfig(lr=1e-5),
                               max_steps=args.warmup + args.steps, micro_batch_size_per_gpu=args.batch,
                               activation_checkpointing=args.checkpointing, compile=args.compile,
                               attention_backend=args.attention, seed=0)
    # Each row's settings are its own: the memory plan leaves them as they are.
    return TrainConfig(file=Path(__file__), settings=settings, model=model.config, dataset=None, eval_datasets=[],
                       given=frozenset(LEVERS))


def latent_shape(model, width: int, height: int, frames: int) -> tuple[int, ...]:
    """One sample's latent shape, (channels, [latent frames,] height, width), from the VAE's config."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        vae = model.vae_class.from_config(model.vae_class.load_config(model.root / "vae"))
    pipeline_shape = tuple(model.sample_latent_shape(width, height, frames))
    # Wan's VAE config says z_dim, not latent_channels; FLUX.2 caches 2x2 patches as channels:
    # there the cache holds what the pipeline draws.
    if vae.config.get("latent_channels") != pipeline_shape[0]:
        return pipeline_shape
    # Video VAEs say their compression; an image VAE halves the size at each block but the last.
    spatial = getattr(vae, "spatial_compression_ratio", None) or 2 ** (len(vae.config.block_out_channels) - 1)
    shape = [vae.config.latent_channels]
    if model.frame_multiple:
        shape.append((frames - 1) // getattr(vae, "temporal_compression_ratio", 1) + 1)
    return (*shape, height // spatial, width // spatial)


def synthetic_batch(model, width: int, height: int, frames: int, batch: int, device):
    """(inputs, labels) on `device` as the trainer's collate makes them from the cache."""
    from utils.seeding import generator_for

    model.load_text_encoders(device)
    with torch.no_grad():
        items = model.encode_captions([CAPTION] * batch)
    model.free_encoders()
    text = {k: torch.stack([item[k] for item in items]).cpu() for k in items[0]}
    latents = torch.randn(batch, *latent_shape(model, width, height, frames),
                          generator=torch.Generator().manual_seed(0)).to(model.dtype)
    inputs, labels = objective.training_example(model, latents, text, [generator_for(0, "bench", i) for i in range(batch)])
    move = lambda ts: tuple(t.to(device) for t in ts)  # noqa: E731
    return move(inputs), move(labels)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device) -> float:
    """The bf16 matrix-product rate of this device, the yardstick for MFU."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - start) / 1e12


def yardstick(device) -> dict:
    """The matrix-product rate and the device's name, as the table's header gives them."""
    return {"tflops": matmul_tflops(device),
            "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "CPU"}


# ------------------------------------------------------------------------------ the rows
def our_layers(model, config, device):
    """The transformer as our pipeline layers on `device` (one stage), loaded as parallel/stages.py
    loads a stage: what the layers row trains, built as build_engine builds the engine row's.
    `compile` is applied by the caller, after counting FLOPs on the eager layers."""
    from parallel.stages import load_stage, plan_stages

    transformer, layers, _ = plan_stages(model, config)
    load_stage(model, config, transformer, layers, [0, len(layers)], 0, device)
    return transformer, layers


def count_flops(model, layers, inputs) -> int:
    """FLOPs of one forward and backward through `layers` without checkpointing (the useful work;
    recomputation is overhead), counted one layer at a time so that only one layer's activations
    are held: each layer's outputs go on detached, requiring grad where they did."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    x = inputs
    with counter:
        for layer in layers:
            out = layer(x)
            out = out if isinstance(out, tuple) else (out,)
            floats = [t for t in out if t.requires_grad]
            torch.autograd.backward(floats, [torch.ones_like(t) for t in floats])
            x = tuple(t.detach().requires_grad_(t.requires_grad) for t in out)
    for layer in layers:
        for p in layer.parameters():
            p.grad = None
    return counter.get_total_flops()


def engine_step(model, config, device, inputs, labels, tokens):
    from parallel.engine import build_engine
    from parallel.launch import init_distributed
    from training.ema import ema_for
    from utils.dist import Distributed

    init_distributed()
    engine, transformer = build_engine(model, config, Distributed.alone(device), config.settings.max_steps,
                                       tokens=tokens)
    # --ema: the trainer's moving average, updated after every step as training/trainer.py does
    ema = None if config.settings.ema is None else ema_for(transformer, config.settings.ema)

    ema_times = []

    def step():
        loss = engine.train_batch(iter([(inputs, labels)])).item()
        if ema is not None:
            sync(device)
            start = time.perf_counter()
            ema.update(1)
            sync(device)
            ema_times.append(time.perf_counter() - start)  # also inside the step's time
        return loss

    step.ema_times = ema_times
    return step


def layers_step(model, config, device, inputs, labels, tokens):
    from torch.utils.checkpoint import checkpoint

    from memory.checkpointing import checkpointed, recomputes_inside_graph
    from training.optimizers import build_optimizer

    s = config.settings
    transformer, layers = our_layers(model, config, device)
    # Counted before any timing; printed at once, so that a step running out of memory keeps it.
    print("FLOPS " + json.dumps(count_flops(model, layers, inputs)), flush=True)
    if s.compile:
        from parallel.engine import compile_layers

        compile_layers(layers, lambda layer: recomputes_inside_graph(layer, s, model))  # as build_engine does
    recompute = [checkpointed(layer, s.activation_checkpointing, model) and not recomputes_inside_graph(layer, s, model)
                 for layer in layers]
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    opt = build_optimizer(trainable, s.optimizer, s.gradient_clipping, None, seed=s.seed,
                          low_memory=config.full_finetune)

    def step():
        x = inputs
        for layer, again in zip(layers, recompute):
            x = checkpoint(layer, x, use_reentrant=False) if again else layer(x)
        loss = objective.loss(model, x, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def diffusers_step(model, config, device, inputs, labels, tokens):
    from peft import LoraConfig

    s = config.settings
    if config.full_finetune:
        # The diffusers full fine-tuning scripts keep float32 weights and train under autocast.
        transformer = model.transformer_class.from_pretrained(model.transformer_folder(), torch_dtype=torch.float32)
        transformer.requires_grad_(True)
        trainable = list(transformer.parameters())
    else:
        transformer = model.transformer_class.from_pretrained(model.transformer_folder(), torch_dtype=model.dtype)
        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=s.adapter.rank, lora_alpha=s.adapter.alpha, init_lora_weights="gaussian",
                                           target_modules=s.adapter.target_modules or model.default_lora_targets,
                                           use_dora=s.adapter.use_dora))
        trainable = [p for p in transformer.parameters() if p.requires_grad]
        for p in trainable:
            p.data = p.data.float()  # fp32 LoRA weights, as the diffusers scripts keep them
    transformer.to(device)
    if s.activation_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    o = s.optimizer
    opt = torch.optim.AdamW(trainable, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
    named = model.input_fields.unpack(inputs)

    def step():
        with torch.autocast(device.type, dtype=model.dtype, enabled=model.dtype != torch.float32):
            prediction = model.reference_forward(transformer, named)
        loss = objective.loss(model, prediction, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, s.gradient_clipping)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


ROW_STEPS = {"engine": engine_step, "layers": layers_step, "diffusers": diffusers_step}


def run_row(args) -> dict:
    """One measurement, in this process: build the row, warm up, time the steps."""
    device = torch.device(args.device)
    if device.type == "cuda":
        from parallel.launch import configure_attention

        torch.cuda.set_device(0)
        configure_attention()  # every row gets the trainer's attention kernels
    model = make_model(args)
    width, height = args.resolution
    inputs, labels = synthetic_batch(model, width, height, args.frames, args.batch, device)
    # `tokens` sizes the activations in the engine row's printed memory estimate.
    step = ROW_STEPS[args.mode](model, row_config(model, args), device, inputs, labels,
                                tokens=model.tokens_per_sample(width, height, args.frames))
    if args.flops_only:  # the layers row printed its FLOPs while being built
        return {}
    if device.type == "cuda":
        # The peak of the training steps (warm-up included), not of the text encoders or FLOP count.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        losses.append(step())
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    ema = {"ema_s_per_update": statistics.median(step.ema_times[args.warmup:])} if getattr(step, "ema_times", None) else {}
    return {**ema, "s_per_step": seconds, "samples_per_s": args.batch / seconds, "peak_gib": peak,
            "first_loss": losses[0], "loss": losses[-1], "steps_timed": len(times),
            "text_len": getattr(model.config, "max_sequence_length", None)}


# ------------------------------------------------------------------------------ the parent: rows in subprocesses
def child(args, *extra: str, timeout: float) -> tuple[dict[str, str], str]:
    """Run this script in a fresh process; its tagged output lines ("ROW {...}") and the rest."""
    cmd = [sys.executable, __file__, str(args.model_dir), "--model", args.model, "--device", args.device,
           "--dtype", args.dtype, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        output = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout:.0f} s"
    tagged = {}
    for line in output.splitlines():
        tag, _, rest = line.partition(" ")
        if tag in ("ROW", "FLOPS", "MATMUL"):
            tagged[tag] = rest
    return tagged, output


def error_text(output: str) -> str:
    if "out of memory" in output.lower():
        return "out of memory"
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:160]


def row_options(args) -> list[str]:
    """The child's arguments that every row of this run shares."""
    extra = ["--rank", str(args.rank), "--batch", str(args.batch), "--steps", str(args.steps),
             "--warmup", str(args.warmup)]
    extra += ["--full"] if args.full else []
    extra += ["--compile"] if args.compile else []
    extra += ["--float8", args.float8] if args.float8 else []
    extra += ["--attention", args.attention] if args.attention else []
    extra += ["--ema", args.ema] if args.ema else []
    extra += ["--dora"] if args.dora else []
    extra += ["--text_len", str(args.text_len)] if args.text_len is not None else []
    return extra


def variant(args) -> str:
    """What the engine and layers rows add to the trainer's defaults, as the mode column says it."""
    return ((" compiled" if args.compile else "") + {None: "", "storage": " fp8", "matmul": " fp8mm"}[args.float8]
            + (f" {args.attention.strip('_').removeprefix('native_')}" if args.attention else ""))


def mode_label(mode: str, args) -> str:
    """The mode column: the row, the trainer options it runs with, EMA (engine row) and DoRA (every row)."""
    label = mode + ("" if mode == "diffusers" else variant(args))
    label += f" ema-{args.ema}" if args.ema and mode == "engine" else ""
    return label + (" dora" if args.dora else "")


def describe(row: dict) -> str:
    return "full" if row["full"] else f"lora r{row['rank']}"


def print_table(rows: list[dict], matmul: float, device_name: str) -> None:
    print(f"\nbf16 matmul: {matmul:.1f} TFLOP/s; {device_name}; torch {torch.__version__}")
    head = (f"{'model':14} {'resolution':>10} {'frames':>6} {'mode':27} {'training':9} {'ckpt':>5} {'s/step':>8} "
            f"{'samples/s':>9} {'peak GiB':>9} {'TFLOP':>7} {'MFU':>5}")
    print(head)
    for r in rows:
        lead = (f"{r['model']:14} {r['resolution']:>10} {r['frames']:>6} {r['mode']:27} {describe(r):9} "
                f"{CKPT_NAMES[r['checkpointing']]:>5}")
        if "error" in r:
            print(f"{lead} error: {r['error']}")
            continue
        tflop = r.get("tflop_per_step")
        tflop = "-" if not tflop else f"{tflop:.1f}" if tflop >= 0.1 else f"{tflop:.1e}"
        mfu = f"{r['mfu'] * 100:.0f}%" if r.get("mfu") else "-"
        ema = f"  (EMA update {r['ema_s_per_update'] * 1000:.1f} ms of it)" if "ema_s_per_update" in r else ""
        print(f"{lead} {r['s_per_step']:>8.3f} {r['samples_per_s']:>9.2f} {r['peak_gib']:>9.1f} {tflop:>7} {mfu:>5}{ema}")


def append_json_rows(path: Path, rows: list[dict]) -> None:
    """Add `rows` to the JSON-lines file `path` (one row a line), as docs/results keeps them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path, help="the model's diffusers folder")
    ap.add_argument("--model", default="flux", help="model type: flux, ltx-video, hunyuan-video, wan")
    ap.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--resolution", nargs="+", default=["1024"], help="WxH, or one number for a square")
    ap.add_argument("--frames", type=int, default=1, help="frames per clip (video models: 8k+1 LTX, 4k+1 Hunyuan and Wan)")
    ap.add_argument("--checkpointing", nargs="+", choices=["off", "on", "both", "selective"], default=["both"],
                    help="activation checkpointing settings to measure (both: off and on); selective: the "
                         "model's selective mode (engine and layers rows)")
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank")
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of a LoRA")
    ap.add_argument("--compile", action="store_true", help="compile = true for the engine and layers rows")
    ap.add_argument("--float8", choices=["storage", "matmul"],
                    help="transformer_dtype = 'float8' for the engine and layers rows; matmul: float8_matmul = true too")
    ap.add_argument("--attention", help="attention_backend for the engine and layers rows (a diffusers backend "
                                        "name, e.g. _native_cudnn); default: the trainer's")
    ap.add_argument("--ema", choices=["gpu", "cpu"],
                    help="an [ema] table for the engine row (updated every step), kept on the GPU or in CPU memory")
    ap.add_argument("--dora", action="store_true", help="DoRA: adapter.use_dora = true for the engine and layers "
                                                         "rows, peft's use_dora for the diffusers row")
    ap.add_argument("--no_flops", action="store_true",
                    help="without a layers row, skip counting FLOPs in a child of its own (no TFLOP or MFU column)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text_len", type=int, help="text tokens (model.max_sequence_length); default: the model's")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (their median is reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1200, help="seconds before a row is given up")
    ap.add_argument("--json", type=Path, help="append the rows to this file, one JSON object a line")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", help="base weight dtype (float32 for CPU smoke runs)")
    ap.add_argument("--row", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--flops_only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--matmul", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.matmul:  # child process: the yardstick (the parent never touches the GPU)
        print("MATMUL " + json.dumps(yardstick(torch.device(args.device))), flush=True)
        return
    if args.row:  # child process: one measurement
        args.mode, args.resolution = args.mode[0], parse_resolution(args.resolution[0])
        args.checkpointing = CHECKPOINTING[args.checkpointing[0]]
        print("ROW " + json.dumps(run_row(args)), flush=True)
        return

    if args.device == "cpu":
        matmul = yardstick(torch.device("cpu"))
    else:
        tagged, output = child(args, "--matmul", timeout=300)
        matmul = json.loads(tagged["MATMUL"]) if "MATMUL" in tagged else {"tflops": 0.0, "device_name": "?"}
        if "MATMUL" not in tagged:
            print(f"matmul yardstick failed: {error_text(output)}", flush=True)
    rows = []
    for resolution in map(parse_resolution, args.resolution):
        for ckpt in [c for setting in args.checkpointing for c in {"both": ["off", "on"]}.get(setting, [setting])]:
            # diffusers' own checkpointing has no selective mode: that row would measure something else.
            modes = [m for m in args.mode if not (m == "diffusers" and ckpt == "selective")]
            for mode in modes:
                extra = ["--row", "--mode", mode, "--resolution", f"{resolution[0]}x{resolution[1]}",
                         "--frames", str(args.frames), "--checkpointing", ckpt, *row_options(args)]
                tagged, output = child(args, *extra, timeout=args.timeout)
                row = {"model": args.model, "resolution": f"{resolution[0]}x{resolution[1]}", "frames": args.frames,
                       "mode": mode_label(mode, args),
                       "full": args.full, "rank": None if args.full else args.rank,
                       "batch": args.batch, "checkpointing": CHECKPOINTING[ckpt], "text_len": args.text_len}
                if "FLOPS" in tagged and not args.float8:
                    row["tflop_per_step"] = int(tagged["FLOPS"]) / 1e12
                if "ROW" in tagged:
                    row.update(json.loads(tagged["ROW"]))
                else:
                    row["error"] = error_text(output)
                rows.append(row)
                print(json.dumps(row), flush=True)
        if ("layers" not in args.mode or args.float8) and not args.no_flops:
            # The useful FLOPs come from the layers row. Without one, or when its products run in float8
            # (which the counter does not see), they are counted on bfloat16 layers in a child of their own.
            shared = row_options(argparse.Namespace(**{**vars(args), "float8": None}))
            tagged, output = child(args, "--row", "--flops_only", "--mode", "layers", "--resolution",
                                   f"{resolution[0]}x{resolution[1]}", "--frames", str(args.frames),
                                   "--checkpointing", "off", *shared, timeout=args.timeout)
            for row in rows:
                if "FLOPS" in tagged and row["resolution"] == f"{resolution[0]}x{resolution[1]}":
                    row["tflop_per_step"] = int(tagged["FLOPS"]) / 1e12
    # The useful FLOPs of a shape (from its layers row) stand for every row of that shape.
    shape = lambda r: (r["resolution"], r["frames"], r["batch"], r["full"])  # noqa: E731
    flops = {shape(r): r["tflop_per_step"] for r in rows if r.get("tflop_per_step")}
    for r in rows:
        r["matmul_tflops"], r["device_name"], r["torch"] = matmul["tflops"], matmul["device_name"], torch.__version__
        if shape(r) in flops and "error" not in r:
            r["tflop_per_step"] = flops[shape(r)]
            r["mfu"] = flops[shape(r)] / r["s_per_step"] / matmul["tflops"] if matmul["tflops"] else None
    print_table(rows, matmul["tflops"], matmul["device_name"])
    if args.json:
        append_json_rows(args.json, rows)


if __name__ == "__main__":
    main()
