"""Where the CPU time of a training step goes when the kernels cost nothing (bench only).

On an H100 a compiled FLUX.1 step is CPU-bound: the pipeline timeline (bench/pipeline_timeline.py)
shows each instruction's GPU end equal to its CPU end, so the GPU waits for the process to issue
work. This runs our engine step (bench/step.py's engine row: build_engine, DeepSpeed's pipeline
engine, compiled layers, activation checkpointing) on the CPU with a model of the real depth's
structure at a tiny width, where the arithmetic is negligible and what remains is the per-call
overhead the GPU also waits for: Dynamo's guards, AOTAutograd's wrappers, the checkpoint's hooks,
DeepSpeed's instructions, our layers' Python. It prints ms per step and the
functions that take the time (cProfile, own time and grouped by library). For FLUX.1's depth at a
tiny width, re-save demo_work/models/flux's transformer with num_layers = 19 and
num_single_layers = 38 (docs/benchmarks.md, "Several GPUs, fourth run").

    python3 bench/cpu_overhead.py demo_work/models/flux --model flux --resolution 64 [--no_compile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import step as step_bench  # noqa: E402  (bench/step.py: the same rows)

GROUPS = (("torch/_dynamo", "Dynamo (guards, frame evaluation)"), ("torch/_functorch", "AOTAutograd runtime"),
          ("torch/_inductor", "Inductor's generated wrappers"), ("torch/utils/checkpoint", "activation checkpointing"),
          ("torch/autograd", "autograd (Python side)"), ("deepspeed", "DeepSpeed"), ("peft", "peft"),
          ("diffusers", "diffusers"), ("/models/", "our layers"), ("torch/nn", "torch.nn modules"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--model", default="flux")
    ap.add_argument("--resolution", default="64", help="WxH, or one number for a square")
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--no_compile", action="store_true")
    ap.add_argument("--checkpointing", choices=["off", "on"], default="on")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    cli = ap.parse_args()
    args = argparse.Namespace(
        model_dir=cli.model_dir, model=cli.model, mode="engine", resolution=step_bench.parse_resolution(cli.resolution),
        frames=cli.frames, checkpointing=step_bench.CHECKPOINTING[cli.checkpointing], rank=32, full=False,
        compile=not cli.no_compile, float8=None, attention=None, ema=None, dora=False, batch=1, text_len=None,
        steps=cli.steps, warmup=cli.warmup, device="cpu", dtype="float32")
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = step_bench.make_model(args)
    width, height = args.resolution
    inputs, labels = step_bench.synthetic_batch(model, width, height, args.frames, 1, device)
    config = step_bench.row_config(model, args)
    run = step_bench.engine_step(model, config, device, inputs, labels,
                                 tokens=model.tokens_per_sample(width, height, args.frames))
    for _ in range(args.warmup):
        run()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        run()
    profiler.disable()
    stats = pstats.Stats(profiler)
    per_step = statistics.median(times) * 1e3
    print(f"{args.model} {width}x{height}, compile {'on' if args.compile else 'off'}, checkpointing "
          f"{cli.checkpointing}: {per_step:.1f} ms a step (median of {args.steps}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    grouped = defaultdict(float)
    total = 0.0
    for (file, _, name), (_, _, own, _, _) in stats.stats.items():
        total += own
        group = next((label for key, label in GROUPS if key in file), "other Python" if file != "~" else "C calls")
        grouped[group] += own
    print(f"own time by library over {args.steps} profiled steps ({total * 1e3 / args.steps:.1f} ms a step under "
          f"cProfile, which slows Python calls):")
    for group, own in sorted(grouped.items(), key=lambda kv: -kv[1]):
        print(f"  {own * 1e3 / args.steps:8.2f} ms  {group}")
    print(f"top {cli.top} functions by own time (ms a step, calls a step):")
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:cli.top]
    for (file, line, name), (_, calls, own, cumulative, _) in rows:
        short = "/".join(Path(file).parts[-3:]) if file != "~" else "~"
        print(f"  {own * 1e3 / args.steps:8.2f} {calls / args.steps:8.0f}  {name} ({short}:{line})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
