"""Measure each model's `activation_factors` (models/*.py) on the CPU, for the memory estimate.

A transformer of the released architecture (FLUX.1-dev, LTX-Video 0.9, HunyuanVideo, Wan 2.1 T2V 14B) is built
with random bfloat16 weights, `--heads` attention heads of the released head size and `--blocks`
blocks of each kind, set up as the trainer sets it up (LoRA of the default targets, adapter
weights in float32, then `model.pipeline_layers`; or every weight trainable for full
fine-tuning), and run forward one pipeline layer after the other under bfloat16 autocast, as one
pipeline stage runs them. `torch.autograd.graph.saved_tensors_hooks` records what autograd keeps
for the backward pass; weights and autocast's copies of them are not counted (the estimate counts
the copies apart), and a tensor several layers keep counts once, for the first. Per layer class:
the bytes of its last layer (in a LoRA run the first block keeps less: its inputs need no
gradient) / (tokens x hidden size x 2), where tokens are what `model.tokens_per_sample` counts.
`--estimate` prints the memory estimate (memory/estimate.py) of the GPU runs measured so far beside
their measured peaks. Usage:
  python bench/activation_factors.py [--models flux flux2 ltx-video hunyuan-video wan] [--heads 8] [--full]
  python bench/activation_factors.py --estimate
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import get_model_class  # noqa: E402
from training.lora import add_lora, init_lora  # noqa: E402
from config.training import AdapterConfig  # noqa: E402

# The released transformers (diffusers' defaults are LTX-Video 0.9's and HunyuanVideo's).
RELEASED = {
    "flux": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56)),
    "ltx-video": dict(num_layers=28),
    "hunyuan-video": dict(num_layers=20, num_single_layers=40),
    "flux2": dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                  num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
                  axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=True),
    "wan": dict(num_layers=40),  # diffusers' defaults: Wan 2.1 T2V 14B
}
# (width, height, frames) the GPU runs of docs/benchmarks.md trained at, and their text lengths.
SHAPES = {"flux": (1024, 1024, 1), "ltx-video": (768, 512, 49), "hunyuan-video": (512, 512, 33),
          "flux2": (1024, 1024, 1),
          # Wan: 17 of the 81 frames (7800 tokens, about HunyuanVideo's): the factor is per token.
          "wan": (832, 480, 17)}
TEXT_TOKENS = {"flux": 512, "ltx-video": 128, "hunyuan-video": 256, "flux2": 512, "wan": 512}


def transformer_config(name: str, heads: int | None = None, blocks: int | tuple[int, int] | None = None) -> dict:
    """The released transformer's config with `heads` attention heads of the released head size
    and `blocks` blocks of each kind, or (double-stream, single-stream) blocks (None: as released)."""
    config = dict(RELEASED[name])
    if blocks is not None:
        double, single = (blocks, blocks) if isinstance(blocks, int) else blocks
        config["num_layers"] = double
        if "num_single_layers" in config:
            config["num_single_layers"] = single
    if heads is not None:
        config["num_attention_heads"] = heads
        if name == "ltx-video":  # the cross-attention width is the hidden size (heads x 64)
            config["cross_attention_dim"] = heads * 64
        if name == "wan":  # the feed-forward keeps the release's width ratio (13824 / 5120)
            config["ffn_dim"] = 13824 * heads // 40
    return config


def config_only_model(name: str, config: dict, folder: Path, text_tokens: int):
    """The model (dtype bfloat16) over a diffusers folder of configs only, written to `folder`:
    the model reads its patch sizes (and LTX-Video its VAE's compression) from them."""
    from accelerate import init_empty_weights

    cls = get_model_class(name)
    with init_empty_weights():
        cls.transformer_class(**config).save_config(folder / "transformer")
        if name in ("ltx-video", "wan"):
            cls.vae_class().save_config(folder / "vae")
    return cls(cls.config_class(type=name, diffusers_path=str(folder), dtype="bfloat16",
                                max_sequence_length=text_tokens))


def example_inputs(model, width: int, height: int, frames: int, text_tokens: int) -> tuple[torch.Tensor, ...]:
    """The first layer's packed inputs for one sample of this shape (batch 1), bfloat16 like the cache."""
    g = torch.Generator().manual_seed(0)
    bf16 = dict(dtype=torch.bfloat16)
    if model.name == "flux":
        latents = torch.randn(1, 16, height // 8, width // 8, generator=g, **bf16)
        text = {"text": torch.randn(1, text_tokens, 4096, generator=g, **bf16),
                "pooled": torch.randn(1, 768, generator=g, **bf16)}
    elif model.name == "flux2":  # patchified latents (128 channels at 1/16), 3 x 5120 text features
        latents = torch.randn(1, 128, height // 16, width // 16, generator=g, **bf16)
        text = {"text": torch.randn(1, text_tokens, 15360, generator=g, **bf16)}
    else:
        spatial, temporal, channels = (32, 8, 128) if model.name == "ltx-video" else (8, 4, 16)
        latents = torch.randn(1, channels, (frames - 1) // temporal + 1, height // spatial, width // spatial,
                              generator=g, **bf16)
        # A caption of a fifth of the text length: the rest is padding, masked out of attention.
        mask = torch.arange(text_tokens)[None] < max(1, text_tokens // 5)
        text = {"text": torch.randn(1, text_tokens, 4096, generator=g, **bf16), "text_mask": mask}
        if model.name == "hunyuan-video":
            text["pooled"] = torch.randn(1, 768, generator=g, **bf16)
        if model.name == "wan":  # no mask: the embeddings past the caption are zeros, as WanPipeline's
            text = {"text": text["text"] * mask[..., None]}
    named = model.model_inputs(latents, torch.tensor([0.6]), text)
    return model.input_fields.pack(named)


def set_up(model, transformer, full: bool, rank: int = 32):
    """The pipeline layers as the trainer sets them up: LoRA (float32 adapter weights) or all trainable."""
    if full:
        transformer.requires_grad_(True)
        return model.pipeline_layers(transformer)
    adapter = AdapterConfig(rank=rank, alpha=float(rank))
    add_lora(model, transformer, adapter)
    layers = model.pipeline_layers(transformer)
    init_lora(transformer, [n for layer in layers for n in layer.module_names], adapter,
              torch.device("cpu"), seed=0)
    return layers


def weight_copy(t: torch.Tensor, params: set[int]) -> bool:
    """Whether `t` comes from one of `params` through single-input operations only: autocast's
    low-precision copy of a float32 trainable weight, transposed. The estimate counts those
    copies apart (they grow with the weights, not with the tokens)."""
    fn = t.grad_fn
    for _ in range(4):
        if fn is None or len(fn.next_functions) != 1:
            return False
        fn = fn.next_functions[0][0]
        if id(getattr(fn, "variable", None)) in params:
            return True
    return False


def saved_bytes_per_layer(layers, inputs) -> list[int]:
    """Bytes of activations each layer keeps for the backward pass, layers run one after the other;
    weights and their autocast copies left out, a tensor several layers keep counted once."""
    params = {id(p) for layer in layers for p in layer.parameters()}
    weights = {p.untyped_storage().data_ptr() for layer in layers for p in layer.parameters()}
    seen: set[int] = set()
    out = []
    # As DeepSpeed loads a micro-batch: every float input requires grad.
    x = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in inputs)
    for layer in layers:
        kept: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in weights and ptr not in seen and not weight_copy(t, params):
                kept[ptr] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = layer(x)
        x = x if isinstance(x, tuple) else (x,)
        seen |= set(kept)
        out.append(sum(kept.values()))
    return out


def measure(name: str, heads: int | None = None, blocks: int = 2, shape: tuple[int, int, int] | None = None,
            text_tokens: int | None = None, full: bool = False, rank: int = 32) -> dict[str, float]:
    """Per layer class, the activations one layer keeps, in hidden-size vectors of bfloat16 per token."""
    text_tokens = TEXT_TOKENS[name] if text_tokens is None else text_tokens
    width, height, frames = shape or SHAPES[name]
    config = transformer_config(name, heads, blocks)
    with tempfile.TemporaryDirectory() as folder:
        model = config_only_model(name, config, Path(folder), text_tokens)
        torch.manual_seed(0)
        transformer = model.transformer_class(**config).to(torch.bfloat16)
        inputs = example_inputs(model, width, height, frames, text_tokens)
        layers = set_up(model, transformer, full, rank)
        unit = model.tokens_per_sample(width, height, frames) * model.hidden_size(transformer) * 2
        per_layer = saved_bytes_per_layer(layers, inputs)
    # The last layer of each class: the first block after the input layer keeps less in a LoRA
    # run (its inputs need no gradient), the others are alike.
    return {layer.__class__.__name__: saved / unit for layer, saved in zip(layers, per_layer)}


def estimate(name: str, shape: tuple[int, int, int] | None = None, checkpointing: bool | str = False,
             full: bool = False, rank: int = 32, blocks: int | tuple[int, int] | None = None,
             optimizer: dict | None = None, heads: int | None = None, float8: bool = False, **settings) -> list:
    """The memory estimate train.py prints at start (memory/estimate.py) for the released transformer
    (or `blocks` of each kind, `heads` attention heads) at this shape, batch 1, bfloat16, from configs alone: a
    StageEstimate per pipeline stage. `settings`: more top-level config keys (pipeline_stages)."""
    from config.train_config import TrainConfig, TrainConfigFile
    from config.training import OptimizerConfig
    from memory.estimate import estimate as estimate_memory
    from parallel.stages import plan_stages

    width, height, frames = shape or SHAPES[name]
    with tempfile.TemporaryDirectory() as folder:
        model = config_only_model(name, transformer_config(name, heads, blocks), Path(folder), TEXT_TOKENS[name])
        file = TrainConfigFile(output_dir=Path("unused"), dataset_file=Path("unused"), model_table={"type": name},
                               adapter=None if full else AdapterConfig(rank=rank, alpha=float(rank)),
                               optimizer=OptimizerConfig(lr=1e-5, **(optimizer or {})), max_steps=1,
                               micro_batch_size_per_gpu=1, activation_checkpointing=checkpointing, **settings)
        model_config = dataclasses.replace(model.config, transformer_dtype="float8") if float8 else model.config
        config = TrainConfig(file=Path(__file__), settings=file, model=model_config, dataset=None,
                             eval_datasets=[])
        transformer, layers, parts = plan_stages(model, config)
        return estimate_memory(model, layers, parts, config, model.tokens_per_sample(width, height, frames),
                               model.hidden_size(transformer))


# Peaks measured on an H200 (torch.cuda.max_memory_allocated, GiB; docs/benchmarks.md and
# docs/full_finetune.md), LoRA rank 32 or full fine-tuning, batch 1: (model, estimate() arguments, peak).
ADAFACTOR_SR = {"type": "adafactor", "stochastic_rounding": True}
MEASURED = [
    ("flux", dict(checkpointing=False), 57.8),
    ("flux", dict(checkpointing=True), 26.5),
    ("ltx-video", dict(checkpointing=False), 15.7),  # before the frozen inputs (docs/full_finetune.md)
    ("ltx-video", dict(checkpointing=True), 5.0),
    ("hunyuan-video", dict(checkpointing=True), 31.6),
    ("flux", dict(checkpointing=True, full=True, blocks=(6, 12), optimizer=ADAFACTOR_SR), 15.10),
    ("flux", dict(checkpointing="selective", full=True, blocks=(6, 12), optimizer=ADAFACTOR_SR), 15.52),
    ("flux", dict(checkpointing=False, full=True, blocks=(6, 12)), 33.92),
    # train.py, eager, 2026-11-25: float8 storage and block swapping (docs/benchmarks.md)
    ("flux", dict(checkpointing=True, float8=True), 23.0),
    ("flux", dict(checkpointing=True, float8=True, blocks_to_swap=20), 17.7),
    ("flux", dict(checkpointing=True, blocks_to_swap=30), 19.1),
    ("hunyuan-video", dict(checkpointing=True, float8=True), 24.8),
    ("hunyuan-video", dict(checkpointing=True, float8=True, blocks_to_swap=20), 20.3),
]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=sorted(RELEASED), default=sorted(RELEASED))
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default: the released count)")
    ap.add_argument("--blocks", type=int, default=2, help="blocks of each kind (at least 2)")
    ap.add_argument("--shape", type=int, nargs=3, metavar=("W", "H", "FRAMES"), help="default: the GPU runs'")
    ap.add_argument("--text_tokens", type=int)
    ap.add_argument("--full", action="store_true", help="full fine-tuning (default: LoRA)")
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank")
    ap.add_argument("--estimate", action="store_true",
                    help="print the memory estimate of the measured GPU runs beside their peaks instead")
    args = ap.parse_args()
    if args.estimate:
        from memory.estimate import GIB

        for name, kwargs, peak in MEASURED:
            (e,) = estimate(name, **kwargs)
            print(f"{name} {kwargs}: estimate {e.total / GIB:.2f} GiB (activations {e.activations / GIB:.2f}), "
                  f"measured {peak:.2f} GiB", flush=True)
        sys.exit(0)
    for name in args.models:
        factors = measure(name, args.heads, args.blocks, tuple(args.shape) if args.shape else None,
                          args.text_tokens, args.full, args.rank)
        print(name, {k: round(v, 2) for k, v in factors.items()}, flush=True)
