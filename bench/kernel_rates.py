"""The rates of the kernels a LoRA step spends its time in, at the released models' shapes, on one GPU.

Explains the step-time table: how fast the frozen linears run (forward and the input-gradient
backward, the only backward a frozen weight needs) with bfloat16 weights, with float8 storage
(`transformer_dtype = "float8"`, dequantized per use) and with float8 products (`float8_matmul`),
eager and compiled; and how fast attention runs forward and backward with each SDPA backend.
Prints a table of milliseconds and TFLOP/s.
  python bench/kernel_rates.py [--skip_cudnn]
  python bench/kernel_rates.py --small --device cpu    # tiny shapes, eager only: a smoke run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, tokens, in, out): Flux 1024x1024 (4096 image + 512 text tokens) MLP and fused single-block
# input projection; HunyuanVideo 512x512x33 (9216 video + 256 text tokens) MLP.
LINEARS = [("flux mlp in", 4608, 3072, 12288), ("flux single in", 4608, 3072, 21504),
           ("flux mlp out", 4608, 12288, 3072), ("hunyuan mlp in", 9472, 3072, 12288)]
# (name, tokens, heads, head dim)
ATTENTION = [("flux 1024", 4608, 24, 128), ("hunyuan 512x512x33", 9472, 24, 128)]
SMALL_LINEARS = [("small", 64, 32, 48)]
SMALL_ATTENTION = [("small", 64, 2, 16)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int = 10) -> float:
    """Median milliseconds of fn() after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def linear_rows(device: torch.device, small: bool) -> list[tuple]:
    from memory.float8 import Float8Linear

    rows = []
    for name, tokens, k, n in SMALL_LINEARS if small else LINEARS:
        linear = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16).requires_grad_(False)
        x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(tokens, n, device=device, dtype=torch.bfloat16)
        variants = {"bf16": linear, "fp8 storage": Float8Linear(linear, torch.bfloat16),
                    "fp8 matmul": Float8Linear(linear, torch.bfloat16, matmul=True)}
        for label, module in variants.items():
            for compiled in (False,) if small else (False, True):
                run = torch.compile(module) if compiled else module

                def step():
                    x.grad = None
                    run(x).backward(grad)

                ms = timed(step, device)
                flop = 2 * 2 * tokens * k * n  # forward and input gradient
                rows.append((f"linear {name}", f"{tokens}x{k}->{n}", label + (" compiled" if compiled else ""),
                             ms, flop / ms / 1e9))
    return rows


def attention_rows(backend_name: str, device: torch.device, small: bool) -> list[tuple]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    rows = []
    for name, tokens, heads, dim in SMALL_ATTENTION if small else ATTENTION:
        q, k, v = (torch.randn(1, heads, tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn_like(q)

        def forward():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        def step():
            q.grad = k.grad = v.grad = None
            forward().backward(grad)

        flop = 4 * tokens * tokens * dim * heads  # forward: two products
        try:
            fwd, both = timed(forward, device), timed(step, device)
            rows.append((f"attention {name}", f"{heads}x{tokens}x{dim}", backend_name.lower() + " fwd",
                         fwd, flop / fwd / 1e9))
            rows.append((f"attention {name}", f"{heads}x{tokens}x{dim}", backend_name.lower() + " fwd+bwd",
                         both, 3.5 * flop / both / 1e9))  # backward: five products of that size
        except RuntimeError as e:
            rows.append((f"attention {name}", f"{heads}x{tokens}x{dim}", backend_name.lower(), None,
                         str(e).splitlines()[0][:60]))
    return rows


def print_rows(rows) -> None:
    for op, shape, variant, ms, rate in rows:
        if ms is None:
            print(f"{op:28} {shape:22} {variant:22} failed: {rate}", flush=True)
        else:
            print(f"{op:28} {shape:22} {variant:22} {ms:9.3f} {rate:9.1f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip_cudnn", action="store_true", help="leave out cuDNN attention")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes and no compiled rows (a smoke run)")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # child process: one attention backend
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.only:
        print_rows(attention_rows(args.only, device, args.small))
        return
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}; torch {torch.__version__}")
    print(f"{'op':28} {'shape':22} {'variant':22} {'ms':>9} {'TFLOP/s':>9}")
    print_rows(linear_rows(device, args.small))
    backends = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"] + ([] if args.skip_cudnn else ["CUDNN_ATTENTION"])
    for backend in backends:
        # Own process each: a failing backend (cuDNN has) can leave the CUDA context unusable.
        proc = subprocess.run([sys.executable, __file__, "--only", backend, "--device", args.device]
                              + (["--small"] if args.small else []), capture_output=True, text=True)
        print(proc.stdout, end="")
        if proc.returncode:
            print(f"attention {backend.lower()}: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:100]}")


if __name__ == "__main__":
    main()
