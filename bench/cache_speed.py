"""Caching throughput: items per second through the text encoders and through the VAE encoder,
by the model class's own encode functions (what data/cache.py calls), in batches of the sizes
`caching_batch_size` gives them.

Without MODEL_DIR: FLUX.1's encoders at their released sizes with random weights, built in memory
(CLIP-L, 12 layers; T5-XXL, 24 layers, 512 tokens; the 16-channel VAE), nothing downloaded. With
MODEL_DIR: that model's own encoders, loaded as the cache loads them (any model type). Each timing
covers what the cache times per batch: the encode call, its copy to the device and the results'
copy back to the host; not reading files.

With --images N (and/or --videos N), end to end as well: N generated photo-like JPEGs (MP4 clips)
of that size are written to a folder and cached by data/cache.py's DatasetCache as training
caches them, once per `caching_workers` value (--workers); the rate is the latent stage's, from
the VAE ready to the last latent written (reading, decoding, resizing and writing included),
against the encoder-only rate, with the hours that rate takes for 330,000 items on 1 and 8 GPUs.
Usage, on a CUDA machine:
  python bench/cache_speed.py --resolution 1024 --batch 1 4 [--images 3000] [--json FILE]
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


def make_model(args, marks: dict | None = None):
    """The model class of `args.model`, its encoders loaded as this bench loads them (random
    FLUX.1 encoders without MODEL_DIR); `marks` gets the times the VAE is ready and the encoders
    are freed (the cache's latent stage runs between)."""
    from models import get_model_class

    cls = get_model_class(args.model)
    marks = {} if marks is None else marks

    class BenchModel(cls):
        def load_text_encoders(self, device):
            if args.model_dir is not None:
                return super().load_text_encoders(device)
            from make_full_size_flux import CLIP_L_LAYERS, T5_XXL_LAYERS, flux_text_encoders

            torch.manual_seed(0)
            with torch.device(device):
                clip_tok, clip, t5_tok, t5 = flux_text_encoders(CLIP_L_LAYERS, T5_XXL_LAYERS)
            self.text_encoders = (clip_tok, clip.to(self.dtype).eval(), t5_tok, t5.to(self.dtype).eval())
            self.device = device

        def load_vae(self, device):
            if args.model_dir is not None:
                super().load_vae(device)
            else:
                from make_full_size_flux import flux_vae

                torch.manual_seed(0)
                with torch.device(device):
                    self.vae = flux_vae().to(self.dtype).eval()
                self.device = device
            synchronize(device)
            marks["vae_ready"] = time.perf_counter()

        def encode_pixels(self, pixels):
            marks["items"] = marks.get("items", 0) + pixels.shape[0]
            return super().encode_pixels(pixels)

        def free_encoders(self):
            synchronize(getattr(self, "device", torch.device("cpu")))
            marks["freed"] = time.perf_counter()
            super().free_encoders()

    extra = {} if args.text_len is None else {"max_sequence_length": args.text_len}
    root = args.model_dir or Path("random-full-size")  # only named: the random encoders are built in memory
    return BenchModel(cls.config_class(type=args.model, diffusers_path=str(root), dtype=args.dtype, **extra))


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def encoders_named(args, stage: str) -> str:
    if args.model_dir is not None:
        return str(args.model_dir)
    from make_full_size_flux import CLIP_L_LAYERS, T5_XXL_LAYERS

    return (f"random CLIP-L ({CLIP_L_LAYERS} layers) + T5-XXL ({T5_XXL_LAYERS} layers)" if stage == "text"
            else "random FLUX.1 VAE")


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


PROJECTED_IMAGES = 330_000


def write_image(path: Path, width: int, height: int, seed: int) -> None:
    """A photo-like JPEG: smooth colour fields with fine noise, so it compresses and decodes like
    a photograph, not like a flat test card."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    fields = [np.sin(x / rng.uniform(20, 200) + rng.uniform(0, 6)) + np.cos(y / rng.uniform(20, 200)) for _ in range(3)]
    pixels = np.stack(fields, axis=-1) * 60 + 128 + rng.normal(0, 12, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_clip(path: Path, width: int, height: int, frames: int, seed: int) -> None:
    """A moving photo-like clip, written as training videos are (data/media.write_video)."""
    import numpy as np

    from data.media import write_video

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    scale = rng.uniform(20, 200, 3)
    clip = np.stack([np.stack([np.sin((x + 4 * t) / scale[c]) + np.cos((y - 2 * t) / scale[c]) for c in range(3)], -1)
                     for t in range(frames)]) * 60 + 128 + rng.normal(0, 8, (frames, height, width, 3))
    write_video(path, np.clip(clip, 0, 255).astype(np.uint8), fps=24)


def _write_item(job) -> None:
    kind, path, width, height, frames, seed = job
    if kind == "image":
        write_image(path, width, height, seed)
    else:
        write_clip(path, width, height, frames, seed)
    path.with_suffix(".txt").write_text(CAPTION + "\n")  # one caption: the text stage encodes it once


def write_folder(folder: Path, images: int, videos: int, width: int, height: int, frames: int) -> None:
    """`images` JPEGs and `videos` MP4 clips of width x height, with captions, written in parallel."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    jobs = [("image", folder / f"image_{i:06d}.jpg", width, height, 1, i) for i in range(images)]
    jobs += [("video", folder / f"clip_{i:05d}.mp4", width, height, frames, i) for i in range(videos)]
    jobs = [j for j in jobs if not j[1].with_suffix(".txt").exists()]  # a kept --folder is reused
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_item, jobs, chunksize=16))


def end_to_end(args, device, common: dict, width: int, height: int, encoder_only: dict[int, float]) -> list[dict]:
    """Cache a folder of generated files through DatasetCache, as training does, once per worker
    count and batch size; the rate is the latent stage's: from the VAE ready to the last latent
    written, decoding, resizing and writing included."""
    import shutil
    import tempfile

    from config.dataset_config import load_dataset_config
    from data.buckets import assign_buckets
    from data.cache import DatasetCache, cache_dir, default_caching_workers
    from data.scan import scan_dataset
    from utils.dist import Distributed

    workers = args.workers or sorted({0, default_caching_workers()})
    temporary = args.folder is None
    folder = Path(tempfile.mkdtemp(prefix="cache_speed_")) if temporary else args.folder
    data = folder / "files"
    start = time.perf_counter()
    write_folder(data, args.images, args.videos, width, height, args.frames)
    print(f"wrote {args.images} images and {args.videos} videos to {data} in {time.perf_counter() - start:.0f} s",
          flush=True)
    toml = folder / "dataset.toml"
    frames = sorted({1, args.frames}) if args.videos else [1]
    toml.write_text(f"resolutions = [[{width}, {height}]]\nenable_ar_bucket = false\nframe_buckets = {frames}\n\n"
                    f"[[directory]]\npath = \"files\"\n")
    dataset = load_dataset_config(toml)
    rows = []
    try:
        for batch in args.batch:
            for count in workers:
                marks: dict = {}
                model = make_model(args, marks)
                scan = scan_dataset(dataset)
                samples = assign_buckets(scan.items, dataset, model.size_multiple, [])
                shutil.rmtree(cache_dir(data, model.name) / "latents", ignore_errors=True)
                reader = DatasetCache(model, samples).build(Distributed.alone(device), batch, workers=count)
                seconds = marks["freed"] - marks["vae_ready"]
                rate = marks.get("items", 0) / seconds if seconds > 0 else 0.0
                # The encoder-only rows are of --frames frames: comparable when every file is of that shape.
                same_shape = (args.videos == 0 and args.frames == 1) or args.images == 0
                only = encoder_only.get(batch) if same_shape else None
                row = {**common, "stage": "files", "batch": batch, "workers": count, "items": len(samples),
                       "contents": f"{args.images} JPEGs, {args.videos} clips",
                       "encoded": marks.get("items", 0), "seconds": seconds, "items_per_s": rate,
                       "of_encoder_only": rate / only if only else None,
                       "hours_1_gpu": PROJECTED_IMAGES / rate / 3600 if rate else float("inf"),
                       "hours_8_gpus": PROJECTED_IMAGES / rate / 3600 / 8 if rate else float("inf")}
                rows.append(row)
                print(json.dumps(row), flush=True)
                del model, reader
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
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
    ap.add_argument("--images", type=int, default=0, help="end to end: also cache this many generated JPEGs")
    ap.add_argument("--videos", type=int, default=0, help="end to end: also cache this many generated clips "
                    "(--frames frames each; a video model's MODEL_DIR)")
    ap.add_argument("--workers", type=int, nargs="+", help="end to end: caching_workers values "
                    "(default: 0 and the trainer's default)")
    ap.add_argument("--folder", type=Path, help="end to end: where the generated files go (default: a temporary "
                    "folder, deleted after)")
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
    model.load_text_encoders(device)
    rows = measure("text", encoders_named(args, "text"), lambda b: model.encode_captions([CAPTION] * b), args,
                   device, common)
    model.free_encoders()
    model.load_vae(device)
    pixels = {b: torch.rand(b, 3, args.frames, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1
              for b in args.batch}  # on the host, as the cache loads them
    rows += measure("latents", encoders_named(args, "latents"), lambda b: model.encode_pixels(pixels[b]), args,
                    device, common)
    model.free_encoders()
    if args.images or args.videos:
        rows += end_to_end(args, device, common, width, height,
                           {r["batch"]: r["items_per_s"] for r in rows if r["stage"] == "latents" and "error" not in r})

    print(f"\n{common['device_name']}; torch {torch.__version__}; {args.model}, text {common['text_len']} tokens, "
          f"pixels {width}x{height}x{args.frames}")
    print(f"{'stage':8} {'batch':>5} {'s/batch':>8} {'items/s':>8} {'peak GiB':>9}  encoders")
    for r in rows:
        if r["stage"] == "files":
            continue
        if "error" in r:
            print(f"{r['stage']:8} {r['batch']:>5} error: {r['error']}")
        else:
            print(f"{r['stage']:8} {r['batch']:>5} {r['s_per_batch']:>8.3f} {r['items_per_s']:>8.2f} "
                  f"{r['peak_gib']:>9.1f}  {r['encoders']}")
    files = [r for r in rows if r["stage"] == "files"]
    if files:
        print(f"\nend to end from {files[0]['items']} files ({files[0]['contents']}) on disk, through the cache "
              f"(data/cache.py), latent stage only; hours for {PROJECTED_IMAGES:,} items projected linearly")
        print(f"{'workers':>7} {'batch':>5} {'items/s':>8} {'of encoder-only':>15} {'h, 1 GPU':>9} {'h, 8 GPUs':>9}")
        for r in files:
            share = f"{100 * r['of_encoder_only']:.0f}%" if r.get("of_encoder_only") else "-"
            print(f"{r['workers']:>7} {r['batch']:>5} {r['items_per_s']:>8.2f} {share:>15} "
                  f"{r['hours_1_gpu']:>9.2f} {r['hours_8_gpus']:>9.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({"bench": "cache_speed", **r}) + "\n")


if __name__ == "__main__":
    main()
