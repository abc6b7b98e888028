"""Time each pipeline layer of a released-width transformer on one GPU: what a pipeline stage's
share of a step costs, layer class by layer class, and whether the GPU or the CPU sets the pace.

The transformer is built as bench/activation_factors.py builds it (released width, `--blocks`
blocks of each kind, random bfloat16 weights, LoRA r32 with float32 adapter weights, then
`model.pipeline_layers`), moved to the GPU, and each layer runs forward and backward on its own,
under non-reentrant activation checkpointing as the engine runs it (forward without saving, then
forward again and backward), on inputs that require grad as DeepSpeed's are. Per layer class:
the wall time of one such pass (median of `--repeat`), the GPU time of its kernels (profiler sum)
and how many kernels it launched. Wall well above kernel time: the CPU sets the pace.

    python bench/layer_costs.py --model flux --resolution 1024 [--compile] [--peft_cast] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.activation_factors import (SHAPES, TEXT_TOKENS, config_only_model, example_inputs,  # noqa: E402
                                      set_up, transformer_config)


def floats(packed) -> list[torch.Tensor]:
    packed = packed if isinstance(packed, tuple) else (packed,)
    return [t for t in packed if t.is_floating_point() and t.requires_grad]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def one_pass(layer, inputs) -> None:
    """Forward (checkpointed) and backward of one layer on fresh leaf copies of its inputs."""
    x = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in inputs)
    out = floats(checkpoint(layer, x, use_reentrant=False))
    torch.autograd.backward(out, [torch.ones_like(t) for t in out])


def measure_layer(layer, inputs, repeat: int) -> dict[str, float]:
    for _ in range(2):
        one_pass(layer, inputs)
    sync()
    walls = []
    for _ in range(repeat):
        start = time.perf_counter()
        one_pass(layer, inputs)
        sync()
        walls.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        one_pass(layer, inputs)
        sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    casts = sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
    return {"wall_ms": statistics.median(walls) * 1e3,
            "kernel_ms": sum(e.device_time for e in kernels) / 1e3,
            "kernels": len(kernels), "casts": casts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="flux")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--resolution", type=int, help="square side; default: the model's benchmark shape")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script only")
    ap.add_argument("--heads", type=int, help="attention heads (default: as released); fewer for a CPU smoke run")
    ap.add_argument("--compile", action="store_true", help="each layer's run through torch.compile")
    ap.add_argument("--peft_cast", action="store_true",
                    help="let peft cast adapter inputs to float32 again (the trainer turns that off)")
    ap.add_argument("--json", type=Path, help="append one JSON row per layer class")
    args = ap.parse_args()

    width, height, frames = SHAPES[args.model]
    if args.resolution:
        width = height = args.resolution
    text_tokens = TEXT_TOKENS[args.model]
    config = transformer_config(args.model, args.heads, args.blocks)
    with tempfile.TemporaryDirectory() as folder:
        model = config_only_model(args.model, config, Path(folder), text_tokens)
        torch.manual_seed(0)
        transformer = model.transformer_class(**config).to(torch.bfloat16)
        layers = set_up(model, transformer, full=False)
    if args.peft_cast:
        for module in transformer.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = True
    device = torch.device(args.device)
    for layer in layers:
        layer.to(device)
        if args.compile:
            layer.compile_run()
    inputs = tuple(t.to(device) for t in example_inputs(model, width, height, frames, text_tokens))

    rows: dict[str, dict] = {}
    x = inputs
    for layer in layers:
        # The last layer of each class stands for the class (the first block after the input
        # layer gets inputs no trainable weight touched, as on a stage boundary it does not).
        rows[type(layer).__name__] = measure_layer(layer, x, args.repeat)
        with torch.no_grad():
            out = layer(x)
        x = out if isinstance(out, tuple) else (out,)
    label = ("compiled" if args.compile else "eager") + (" peft-cast" if args.peft_cast else "")
    print(f"{args.model} {width}x{height}x{frames}, {label}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}: one checkpointed "
          f"forward+backward per layer")
    print(f"{'layer':28} {'wall ms':>8} {'kernel ms':>9} {'kernels':>8} {'casts':>6}")
    for name, r in rows.items():
        print(f"{name:28} {r['wall_ms']:8.1f} {r['kernel_ms']:9.1f} {r['kernels']:8d} {r['casts']:6d}")
    if args.json:
        with args.json.open("a") as f:
            for name, r in rows.items():
                f.write(json.dumps({"model": args.model, "shape": [width, height, frames], "mode": label,
                                    "layer": name, **r, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                                    "torch": torch.__version__}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
