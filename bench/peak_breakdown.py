"""What is alive at the peak of one LoRA training step, beside the memory estimate (memory/estimate.py).

The released transformer's width with a few blocks of each kind (random bfloat16 weights, built on
the device: nothing is read from disk), LoRA rank 32 on the default targets (float32), set up as
the trainer sets it up, runs forward and backward one pipeline layer after the other as one
pipeline stage does, each layer with parameters under non-reentrant activation checkpointing when
`--checkpointing true` (DeepSpeed's choice). Printed per mode: the measured peak, the estimate's
peak without the optimizer state (no optimizer steps here), their difference in hidden-size
vectors per token, and on CUDA the allocations alive at the peak grouped by the Python line that
made them (torch.cuda.memory._record_memory_history), so that what the estimate misses can be
named. On CPU the peak is glibc's in-use heap, sampled after every operator.

  python3 bench/peak_breakdown.py --model flux --blocks 2 4 --checkpointing false true
  python3 bench/peak_breakdown.py --model hunyuan-video --device cpu --heads 2 --shape 128 128 9   # smoke test
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import activation_factors as af  # noqa: E402

MIB = 2**20


class _MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use() -> int:
    """glibc's allocated bytes: small chunks plus mmapped large ones (where tensors live on CPU)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def cpu_peak(fn) -> int:
    """Peak heap bytes above the start while `fn` runs, sampled after every operator."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sampler(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, heap_in_use())
            return out

    base = heap_in_use()
    with Sampler() as sampler:
        fn()
    return sampler.peak - base


def alive_at_peak(snapshot: dict, top: int) -> list[tuple[str, int]]:
    """From a memory-history snapshot: the allocations alive at the highest point of the trace,
    summed by the innermost Python frame outside torch (or 'no Python frame': the autograd engine)."""
    trace = snapshot["device_traces"][0]
    live, current, peak, peak_at = {}, 0, 0, -1
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
        if current > peak:
            peak, peak_at = current, i
    live = {}
    for event in trace[:peak_at + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    groups = Counter()
    for event in live.values():
        frames = [f for f in event.get("frames", []) if f.get("filename", "").endswith(".py")]
        outside = [f for f in frames if "/torch/" not in f["filename"]]
        frame = (outside or frames or [None])[0]
        where = "no Python frame (autograd engine)" if frame is None else \
            f"{Path(frame['filename']).name}:{frame['line']} {frame['name']}"
        groups[where] += event["size"]
    return groups.most_common(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(af.RELEASED), default="flux")
    ap.add_argument("--blocks", type=int, nargs=2, default=(2, 4), metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default: the released count)")
    ap.add_argument("--shape", type=int, nargs=3, metavar=("W", "H", "FRAMES"), help="default: the GPU runs'")
    ap.add_argument("--checkpointing", nargs="+", default=["false", "true"], choices=["false", "true"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    device = torch.device(args.device)
    shape = tuple(args.shape) if args.shape else af.SHAPES[args.model]
    text_tokens = af.TEXT_TOKENS[args.model]
    config = af.transformer_config(args.model, args.heads, tuple(args.blocks))
    with tempfile.TemporaryDirectory() as folder:
        model = af.config_only_model(args.model, config, Path(folder), text_tokens)
        torch.manual_seed(0)
        with torch.device(device):
            transformer = model.transformer_class(**config).to(torch.bfloat16)
        layers = af.set_up(model, transformer, full=False, rank=32)
        transformer.to(device)
        inputs = tuple(t.to(device) for t in af.example_inputs(model, *shape, text_tokens))
    tokens, hidden = model.tokens_per_sample(*shape), model.hidden_size(transformer)
    unit = tokens * hidden * 2
    print(f"{args.model}, width {hidden}, {args.blocks[0]} + {args.blocks[1]} blocks, {shape}, {tokens} tokens, "
          f"LoRA rank 32, batch 1, {device}; 1 unit = tokens x width x 2 bytes = {unit / MIB:.1f} MiB", flush=True)
    for mode in args.checkpointing:
        ckpt = mode == "true"

        def step():
            x = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in inputs)
            for layer in layers:
                recompute = ckpt and any(True for _ in layer.parameters())
                x = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
                x = x if isinstance(x, tuple) else (x,)
            x[0].float().square().mean().backward()

        step()  # warm-up: kernels chosen, gradients allocated
        for p in transformer.parameters():
            p.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
            step()
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated()
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
        else:
            before = sum(p.numel() * p.element_size() for p in transformer.parameters())
            measured = before + cpu_peak(step)
        for p in transformer.parameters():
            p.grad = None
        (estimate,) = af.estimate(args.model, shape, checkpointing=ckpt, blocks=tuple(args.blocks), heads=args.heads)
        expected = estimate.total - estimate.optimizer
        print(f"checkpointing {mode}: measured peak {measured / MIB:.0f} MiB (weights and LoRA {before / MIB:.0f}), "
              f"estimate without optimizer state {expected / MIB:.0f} MiB (activations {estimate.activations / MIB:.0f});"
              f" measured - estimate = {(measured - expected) / MIB:+.0f} MiB = {(measured - expected) / unit:+.1f} "
              f"units", flush=True)
        if device.type == "cuda":
            for where, size in alive_at_peak(snapshot, args.top):
                print(f"  {size / MIB:9.1f} MiB {size / unit:6.1f} units  {where}")


if __name__ == "__main__":
    main()
