"""Caching throughput: items per second through the text encoders and through the VAE encoder,
by the model class's own encode functions (what data/cache.py calls), in batches of the sizes
`caching_batch_size` gives them.

Without MODEL_DIR: FLUX.1's encoders at their released sizes with random weights, built in memory
(CLIP-L, 12 layers; T5-XXL, 24 layers, 512 tokens; the 16-channel VAE), nothing downloaded. With
MODEL_DIR: that model's own encoders, loaded as the cache loads them (any model type). Each timing
covers what the cache times per batch: the encode call, its copy to the device and the results'
copy back to the host; not reading files. Usage, on a CUDA machine:
  python bench/cache_speed.py --resolution 1024 --batch 1 4 [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

CAPTION = "a close-up portrait of an old man with a grey beard, reading a book in a quiet library at sunrise"


def make_model(args):
    from models import get_model_class

    cls = get_model_class(args.model)
    extra = {} if args.text_len is None else {"max_sequence_length": args.text_len}
    root = args.model_dir or Path("random-full-size")  # only named: the random encoders are built in memory
    return cls(cls.config_class(type=args.model, diffusers_path=str(root), dtype=args.dtype, **extra))


def load_text_encoders(model, args, device) -> str:
    """Put the text encoders on `device` as model.load_text_encoders does; what they are."""
    if args.model_dir is not None:
        model.load_text_encoders(device)
        return str(args.model_dir)
    from make_full_size_flux import CLIP_L_LAYERS, T5_XXL_LAYERS, flux_text_encoders

    torch.manual_seed(0)
    with torch.device(device):
        clip_tok, clip, t5_tok, t5 = flux_text_encoders(CLIP_L_LAYERS, T5_XXL_LAYERS)
    model.text_encoders = (clip_tok, clip.to(model.dtype).eval(), t5_tok, t5.to(model.dtype).eval())
    model.device = device
    return f"random CLIP-L ({CLIP_L_LAYERS} layers) + T5-XXL ({T5_XXL_LAYERS} layers)"


def load_vae(model, args, device) -> str:
    """Put the VAE on `device` as model.load_vae does; what it is."""
    if args.model_dir is not None:
        model.load_vae(device)
        return str(args.model_dir)
    from make_full_size_flux import flux_vae

    torch.manual_seed(0)
    with torch.device(device):
        model.vae = flux_vae().to(model.dtype).eval()
    model.device = device
    return "random FLUX.1 VAE"


def time_batches(encode, batch: int, args, device) -> dict:
    """Median seconds of one batch through `encode`, after warm-up, with peak memory."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        with torch.no_grad():
            outputs = encode(batch)
            [{k: v.cpu() for k, v in out.items()} for out in outputs]  # as the cache keeps them
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return {"s_per_batch": seconds, "items_per_s": batch / seconds, "peak_gib": peak}


def measure(stage: str, what: str, encode, args, device, common: dict) -> list[dict]:
    rows = []
    for batch in args.batch:
        row = {**common, "stage": stage, "encoders": what, "batch": batch}
        try:
            row.update(time_batches(encode, batch, args, device))
        except Exception as e:  # one failing batch size (out of memory, say) is a row, not a crash
            row["error"] = "out of memory" if "out of memory" in str(e).lower() else f"{type(e).__name__}: {e}"[:160]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path, nargs="?", help="a model's diffusers folder (default: random FLUX.1)")
    ap.add_argument("--model", default="flux", help="model type of MODEL_DIR")
    ap.add_argument("--resolution", default="1024", help="WxH, or one number for a square")
    ap.add_argument("--frames", type=int, default=1, help="frames per clip (video models)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="caching_batch_size values")
    ap.add_argument("--text_len", type=int, help="text tokens (model.max_sequence_length); default: the model's")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=Path, help="append the rows to this file, one JSON object a line")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", help="encoder dtype (float32 for CPU smoke runs)")
    args = ap.parse_args()
    if args.model_dir is None and args.model != "flux":
        ap.error("random full-size encoders are FLUX.1's; give MODEL_DIR for another model type")

    device = torch.device(args.device)
    width, _, height = args.resolution.lower().partition("x")
    width, height = int(width), int(height or width)
    model = make_model(args)
    common = {"model": args.model, "resolution": f"{width}x{height}", "frames": args.frames,
              "text_len": getattr(model.config, "max_sequence_length", None),
              "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
              "torch": torch.__version__}

    # Text first, then latents, each with only its own encoders loaded: the cache's order.
    what = load_text_encoders(model, args, device)
    rows = measure("text", what, lambda b: model.encode_captions([CAPTION] * b), args, device, common)
    model.free_encoders()
    what = load_vae(model, args, device)
    pixels = {b: torch.rand(b, 3, args.frames, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1
              for b in args.batch}  # on the host, as the cache loads them
    rows += measure("latents", what, lambda b: model.encode_pixels(pixels[b]), args, device, common)
    model.free_encoders()

    print(f"\n{common['device_name']}; torch {torch.__version__}; {args.model}, text {common['text_len']} tokens, "
          f"pixels {width}x{height}x{args.frames}")
    print(f"{'stage':8} {'batch':>5} {'s/batch':>8} {'items/s':>8} {'peak GiB':>9}  encoders")
    for r in rows:
        if "error" in r:
            print(f"{r['stage']:8} {r['batch']:>5} error: {r['error']}")
        else:
            print(f"{r['stage']:8} {r['batch']:>5} {r['s_per_batch']:>8.3f} {r['items_per_s']:>8.2f} "
                  f"{r['peak_gib']:>9.1f}  {r['encoders']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({"bench": "cache_speed", **r}) + "\n")


if __name__ == "__main__":
    main()
