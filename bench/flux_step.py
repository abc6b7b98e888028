"""Time one Flux LoRA training step three ways, on one GPU, with synthetic inputs.

  engine    our trainer's step: the layer list in DeepSpeed's pipeline engine (1 stage)
  layers    the same layer list in a plain PyTorch loop (the engine's overhead is the difference)
  diffusers the plain diffusers + peft loop of the diffusers example scripts: the whole
            FluxTransformer2DModel, peft LoRA in fp32, bf16 autocast

Each row runs in its own process so peak memory is its own. Prints a table; `--json` appends
rows to a file. Usage (on a CUDA machine, after bench/make_full_size_flux.py):
  python bench/flux_step.py MODEL_DIR --resolution 1024 --mode engine layers diffusers [--checkpointing]
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


def synthetic_batch(model, resolution: int, batch: int, text_len: int, device):
    from models.base import generator_for

    cfg = model.transformer_class.load_config(model.transformer_folder())
    channels = cfg["in_channels"] // 4
    latents = torch.randn(batch, channels, resolution // 8, resolution // 8, generator=torch.Generator().manual_seed(0))
    text = {"text": torch.randn(batch, text_len, cfg["joint_attention_dim"],
                                generator=torch.Generator().manual_seed(1)).to(model.dtype),
            "pooled": torch.randn(batch, cfg["pooled_projection_dim"],
                                  generator=torch.Generator().manual_seed(2)).to(model.dtype)}
    gens = [generator_for(0, "bench", i) for i in range(batch)]
    inputs, labels = model.training_example(latents, text, gens)
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


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0


def run_row(args) -> dict:
    """One measurement, in this process."""
    from models.flux import FluxConfig, FluxModel
    from utils.config import AdapterConfig

    device = torch.device(args.device)
    if device.type == "cuda":
        from utils.engine import configure_attention

        torch.cuda.set_device(0)
        configure_attention()  # the diffusers row gets the same attention kernels as ours
    model = FluxModel(FluxConfig(type="flux", diffusers_path=str(args.model_dir), dtype=args.dtype,
                                 max_sequence_length=args.text_len))
    adapter = AdapterConfig(rank=args.rank, alpha=float(args.rank))
    inputs, labels = synthetic_batch(model, args.resolution, args.batch, args.text_len, device)

    if args.mode == "engine":
        step = _engine_step(model, adapter, args, device, inputs, labels)
    elif args.mode == "layers":
        step, flops = _layers_step(model, adapter, args, device, inputs, labels)
    else:
        step = _diffusers_step(model, args, device, inputs, labels)

    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    row = {"mode": args.mode, "resolution": args.resolution, "batch": args.batch, "rank": args.rank,
           "checkpointing": args.checkpointing, "s_per_step": statistics.median(times),
           "samples_per_s": args.batch / statistics.median(times),
           "peak_gib": peak_gib(device), "loss": float(loss)}
    if args.mode == "layers":
        row["tflop_per_step"] = flops / 1e12
    return row


def lora_layers(model, adapter, device):
    """The whole transformer as our pipeline layers on `device`, with a fresh LoRA: what the
    engine and the plain-loop rows both train."""
    transformer = model.build_empty_transformer()
    model.add_lora(transformer, adapter)
    layers = model.pipeline_layers(transformer)
    names = [n for layer in layers for n in layer.module_names]
    model.load_weights(transformer, names, device)
    model.init_lora(transformer, names, adapter, device, seed=0)
    return transformer, layers


def _engine_step(model, adapter, args, device, inputs, labels):
    from utils.engine import init_distributed, start_engine
    from utils.config import OptimizerConfig
    from utils.optimizers import build_optimizer, build_scheduler
    from deepspeed.runtime.pipe.module import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
    import functools
    from torch.utils.checkpoint import checkpoint

    init_distributed()
    transformer, layers = lora_layers(model, adapter, device)
    pipe = PipelineModule(layers=layers, loss_fn=model.loss, topology=PipeDataParallelTopology(num_pp=1, num_dp=1),
                          activation_checkpoint_interval=1 if args.checkpointing else 0,
                          activation_checkpoint_func=functools.partial(checkpoint, use_reentrant=False),
                          dynamic_shape=True)
    opt = build_optimizer([p for p in pipe.parameters() if p.requires_grad], OptimizerConfig(lr=1e-5), 1.0, None)
    engine = start_engine(pipe, opt, build_scheduler(opt, "constant", 0, 100), args.batch, 1)
    return lambda: engine.train_batch(iter([(inputs, labels)])).item()


def _layers_step(model, adapter, args, device, inputs, labels):
    from torch.utils.checkpoint import checkpoint
    from torch.utils.flop_counter import FlopCounterMode

    from utils.config import OptimizerConfig
    from utils.optimizers import build_optimizer

    transformer, layers = lora_layers(model, adapter, device)
    opt = build_optimizer([p for p in transformer.parameters() if p.requires_grad], OptimizerConfig(lr=1e-5), 1.0, None)

    def forward_backward():
        x = inputs
        for i, layer in enumerate(layers):
            if args.checkpointing and 0 < i < len(layers) - 1:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        loss = model.loss(x, labels)
        loss.backward()
        return loss

    with FlopCounterMode(display=False) as counter:
        forward_backward()
    opt.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()

    def step():
        loss = forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, flops


def _diffusers_step(model, args, device, inputs, labels):
    from peft import LoraConfig

    transformer = model.transformer_class.from_pretrained(model.transformer_folder(), torch_dtype=torch.bfloat16).to(device)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                       "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
                                                       "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"]))
    lora = [p for p in transformer.parameters() if p.requires_grad]
    for p in lora:
        p.data = p.data.float()  # fp32 LoRA weights, as the diffusers scripts keep them
    if args.checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    opt = torch.optim.AdamW(lora, lr=1e-5)
    named = model.input_fields.unpack(inputs)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = transformer(hidden_states=named["latents"], encoder_hidden_states=named["text"],
                               pooled_projections=named["pooled"], timestep=named["timesteps"],
                               img_ids=named["img_ids"], txt_ids=named["txt_ids"], guidance=named["guidance"],
                               return_dict=False)[0]
        loss = model.loss(pred, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--mode", nargs="+", default=["engine", "layers", "diffusers"])
    ap.add_argument("--resolution", type=int, nargs="+", default=[1024])
    ap.add_argument("--checkpointing", choices=["off", "on", "both"], default="both")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text_len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", help="base weight dtype (float32 for CPU smoke runs)")
    ap.add_argument("--row", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.row:  # child process: one measurement
        args.mode, args.resolution = args.mode[0], args.resolution[0]
        args.checkpointing = args.checkpointing == "on"
        print("ROW " + json.dumps(run_row(args)), flush=True)
        return

    device = torch.device(args.device)
    peak = matmul_tflops(device)
    rows = []
    ckpt = {"off": ["off"], "on": ["on"], "both": ["off", "on"]}[args.checkpointing]
    for resolution in args.resolution:
        for c in ckpt:
            for mode in args.mode:
                cmd = [sys.executable, __file__, str(args.model_dir), "--row", "--mode", mode, "--resolution",
                       str(resolution), "--checkpointing", c, "--rank", str(args.rank), "--batch", str(args.batch),
                       "--text_len", str(args.text_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--device", args.device, "--dtype", args.dtype]
                env = {**os.environ, "MASTER_PORT": str(29600 + len(rows)), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                found = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
                if not found:
                    err = (proc.stdout + proc.stderr).strip().splitlines()
                    row = {"mode": mode, "resolution": resolution, "checkpointing": c == "on",
                           "error": (err[-1] if err else "no output")[:120]}
                else:
                    row = found[0]
                rows.append(row)
                print(json.dumps(row), flush=True)
    # Useful FLOPs of a step: counted without checkpointing (its recompute is overhead, not work).
    flops = {r["resolution"]: r["tflop_per_step"] for r in rows
             if r["mode"] == "layers" and "tflop_per_step" in r and not r["checkpointing"]}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\nbf16 matmul: {peak:.1f} TFLOP/s; {name}; torch {torch.__version__}")
    print(f"{'mode':10} {'res':>5} {'ckpt':>5} {'s/step':>8} {'samples/s':>9} {'peak GiB':>9} {'TFLOP':>7} {'MFU':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:10} {r['resolution']:>5} {str(r['checkpointing']):>5} error: {r['error']}")
            continue
        tf = flops.get(r["resolution"])
        mfu = f"{tf / r['s_per_step'] / peak * 100:.0f}%" if tf else "-"
        print(f"{r['mode']:10} {r['resolution']:>5} {str(r['checkpointing']):>5} {r['s_per_step']:>8.3f} "
              f"{r['samples_per_s']:>9.2f} {r['peak_gib']:>9.1f} {tf or 0:>7.1f} {mfu:>6}")
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "matmul_tflops": peak}) + "\n")


if __name__ == "__main__":
    main()
