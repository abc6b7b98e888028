"""Seconds per sample: our trainer's sampling (training/sampling.py, through the DeepSpeed pipeline engine
as training builds it, LoRA rank 32 attached) beside the model's diffusers pipeline on the same GPU
(`output_type="latent"`, the same LoRA added with peft, prompt embeddings given), same size, steps
and guidance. Both time the denoising loop only (text embeddings precomputed: ours come from the
cache); the VAE decode of one sample is timed on our side separately. Each row runs in its own
process (its own peak memory); the median of `--samples` timed samples after `--warmup`.

  python bench/sample_speed.py WORK --model flux --resolution 1024 --steps 28
  python bench/sample_speed.py WORK --model ltx-video --resolution 768x512 --frames 49 --steps 50

WORK/<model type>/ is the model folder; when it is missing it is written first with random
weights at the released size (bench/make_full_size_flux.py, bench/make_full_size_video.py; needs a
CUDA GPU). `--json` appends the rows to a file.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = "a photo of a cat sitting on a red chair in a quiet library at sunrise"
NEGATIVE = "worst quality, blurry"


def make_model_dir(work: Path, model_type: str) -> Path:
    folder = work / model_type
    if not (folder / "model_index.json").is_file():
        start = time.time()
        if model_type == "flux":
            from make_full_size_flux import make_full_size_flux

            make_full_size_flux(work)
        else:
            from make_full_size_video import MAKERS

            MAKERS[model_type](work, 2)
        print(f"wrote {folder} in {time.time() - start:.0f} s", flush=True)
    return folder


def make_request(args, model):
    from config.sampling import SampleRequest

    width, _, height = args.resolution.lower().partition("x")
    guidance = args.guidance if args.guidance is not None else model.sample_defaults["guidance"]
    return SampleRequest(index=0, prompt=PROMPT, seed=0, width=int(width), height=int(height or width),
                         frames=args.frames, steps=args.steps, guidance=float(guidance), negative_prompt=NEGATIVE)


class Texts:
    """The prompt's embeddings, by the model's own encoders (what the cache would hold)."""

    def __init__(self, model, prompts, device):
        model.load_text_encoders(device)
        with torch.no_grad():
            self.embedded = {p: {k: v.cpu() for k, v in e.items()}
                             for p, e in zip(prompts, model.encode_captions(prompts))}
        model.free_encoders()

    def prompt_text(self, prompt):
        return self.embedded[prompt]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, count: int) -> float:
    times = []
    for i in range(warmup + count):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def engine_row(args, model, request, device) -> dict:
    from step import row_config

    from parallel.engine import build_engine
    from parallel.launch import configure_attention, init_distributed
    from training.sampling import Sampler, sample_prompts
    from utils.dist import Distributed

    if device.type == "cuda":
        torch.cuda.set_device(0)
        configure_attention()
    texts = Texts(model, sample_prompts([request], model), device)
    init_distributed()
    config = row_config(model, argparse.Namespace(full=False, rank=32, warmup=0, steps=1, batch=1,
                                                  checkpointing=False, compile=False, attention=None, dora=False,
                                                  ema=None))
    engine, _ = build_engine(model, config, Distributed.alone(device), 1, log=lambda *_: None)
    sampler = Sampler(model, engine, [request], texts, Path(args.work) / "samples", Distributed.alone(device))
    result = {}
    seconds = timed(lambda: result.update(sampler.denoise()), device, args.warmup, args.samples)
    model.load_vae(device)
    if model.decode_tiled:
        model.vae.enable_tiling()
    with torch.no_grad():
        decode = timed(lambda: model.decode_latents(result[0]), device, 1 if args.warmup else 0, 1)
    return {"s_per_sample": seconds, "decode_s": decode}


def diffusers_row(args, model, request, device) -> dict:
    from peft import LoraConfig

    pipe = model.pipeline_class.from_pretrained(model.root, dtype=model.dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=model.default_lora_targets))
    pipe.transformer.to(device)
    call = dict(width=request.width, height=request.height, num_inference_steps=request.steps,
                guidance_scale=request.guidance, output_type="latent")
    if request.frames > 1:
        call["num_frames"] = request.frames
    with torch.no_grad():
        # The embeddings once, as the pipeline makes them; the timed calls only denoise.
        if model.name == "flux":
            embeds, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, max_sequence_length=model.config.max_sequence_length)
            call.update(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        elif model.name == "ltx-video":
            embeds, mask, negative, negative_mask = pipe.encode_prompt(
                PROMPT, NEGATIVE, max_sequence_length=model.config.max_sequence_length)
            call.update(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=negative,
                        negative_prompt_attention_mask=negative_mask)
        else:
            embeds, pooled, mask = pipe.encode_prompt(PROMPT, max_sequence_length=model.config.max_sequence_length)[:3]
            call.update(prompt_embeds=embeds, pooled_prompt_embeds=pooled, prompt_attention_mask=mask)
    generator = lambda: torch.Generator().manual_seed(request.seed)  # noqa: E731
    with torch.no_grad():
        seconds = timed(lambda: pipe(**call, generator=generator()), device, args.warmup, args.samples)
    return {"s_per_sample": seconds}


def run_row(args) -> dict:
    from models import get_model_class

    device = torch.device(args.device)
    cls = get_model_class(args.model)
    extra = {} if args.text_len is None else {"max_sequence_length": args.text_len}
    model = cls(cls.config_class(type=args.model, diffusers_path=str(Path(args.work) / args.model), dtype=args.dtype,
                                 **extra))
    request = make_request(args, model)
    row = (engine_row if args.row == "engine" else diffusers_row)(args, model, request, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return {**row, "peak_gib": peak}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="holds <model type>/, the model folder (written when missing)")
    ap.add_argument("--model", default="flux", help="model type: flux, ltx-video, hunyuan-video")
    ap.add_argument("--resolution", default="1024", help="WxH, or one number for a square")
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--steps", type=int, default=28, help="denoising steps")
    ap.add_argument("--guidance", type=float, help="default: the pipeline's")
    ap.add_argument("--text_len", type=int, help="text tokens (model.max_sequence_length); default: the model's")
    ap.add_argument("--samples", type=int, default=2, help="timed samples (their median is reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", help="float32 for CPU smoke runs")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", type=Path, help="append the rows to this file, one JSON object a line")
    ap.add_argument("--row", choices=["engine", "diffusers"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.row:  # child process: one measurement
        print("ROW " + json.dumps(run_row(args)), flush=True)
        return
    make_model_dir(args.work, args.model)
    shared = ["--model", args.model, "--resolution", args.resolution, "--frames", str(args.frames), "--steps",
              str(args.steps), "--samples", str(args.samples), "--warmup", str(args.warmup), "--device", args.device,
              "--dtype", args.dtype]
    shared += ["--guidance", str(args.guidance)] if args.guidance is not None else []
    shared += ["--text_len", str(args.text_len)] if args.text_len is not None else []
    rows = []
    for mode in ("engine", "diffusers"):
        cmd = [sys.executable, __file__, str(args.work), "--row", mode, *shared]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            output = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {args.timeout:.0f} s"
        row = {"model": args.model, "resolution": args.resolution, "frames": args.frames, "steps": args.steps,
               "mode": mode, "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
               "torch": torch.__version__}
        found = [line[4:] for line in output.splitlines() if line.startswith("ROW ")]
        if found:
            row.update(json.loads(found[-1]))
        else:
            lines = [line for line in output.strip().splitlines() if line.strip()]
            row["error"] = "out of memory" if "out of memory" in output.lower() else (lines[-1] if lines else "?")[:200]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'model':14} {'size':>10} {'frames':>6} {'steps':>5} {'mode':10} {'s/sample':>9} {'decode s':>9} "
          f"{'peak GiB':>9}")
    for r in rows:
        lead = f"{r['model']:14} {r['resolution']:>10} {r['frames']:>6} {r['steps']:>5} {r['mode']:10}"
        if "error" in r:
            print(f"{lead} error: {r['error']}")
        else:
            decode = f"{r['decode_s']:.2f}" if "decode_s" in r else "-"
            print(f"{lead} {r['s_per_sample']:>9.2f} {decode:>9} {r['peak_gib']:>9.1f}")
    if args.json:
        from step import append_json_rows

        append_json_rows(args.json, rows)


if __name__ == "__main__":
    main()
