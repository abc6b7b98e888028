"""Write a FLUX.2 [dev]-shaped pipeline folder with random weights, for GPU runs without downloads.

The transformer (32B) and the VAE have the released architecture exactly. The transformer is
never built whole: its weights are drawn block by block on `--device` and written in bfloat16
shards of `--shard_gb` GB with a diffusers weight index, so it needs neither 64 GB of GPU memory
nor of CPU memory. The text encoder (Mistral3ForConditionalGeneration) has the released output
width (5120 per hidden state, so 3 x 5120 = 15360 text features) and is 32 layers deep, so that
the recipe's hidden-state indices (10, 20, 30) exist, but narrow attention and MLP and the tiny
offline tokenizer: it only fills the text cache, whose values do not change the training step.
Usage: python bench/make_full_size_flux2.py OUT_DIR  (writes OUT_DIR/flux2, about 66 GB)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from make_tiny_models import FLUX2_SCHEDULER, tiny_mistral_tokenizer  # noqa: E402

# black-forest-labs/FLUX.2-dev transformer/config.json
FLUX2_DEV_TRANSFORMER = dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                             num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256,
                             mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6,
                             guidance_embeds=True)
# black-forest-labs/FLUX.2-dev vae/config.json (AutoencoderKLFlux2's defaults)
FLUX2_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 latent_channels=32, norm_num_groups=32, sample_size=1024, use_quant_conv=True,
                 use_post_quant_conv=True, batch_norm_eps=1e-4, patch_size=(2, 2))
MISTRAL_SMALL_HIDDEN = 5120


def write_transformer(folder: Path, config: dict, device: str, shard_gb: float) -> int:
    """Random bfloat16 weights for every tensor of the transformer, written in shards; returns the
    parameter count. Linear weights ~ N(0, 0.5^2 / fan_in) (random init at full scale makes the
    activations through 56 blocks explode), norm scales 1."""
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import save_file

    with init_empty_weights():
        shapes = Flux2Transformer2DModel(**config)
    folder.mkdir(parents=True, exist_ok=True)
    shapes.save_config(folder)
    named = [(k, tuple(v.shape)) for k, v in shapes.state_dict().items()]
    g = torch.Generator(device).manual_seed(0)
    weight_map, shard, shard_bytes, total, count = {}, {}, 0, 0, 0
    names = []

    def flush():
        nonlocal shard, shard_bytes
        name = f"diffusion_pytorch_model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    for key, shape in named:
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g, device=device) * (0.5 / shape[1] ** 0.5)).to(torch.bfloat16).cpu()
        shard[key] = t
        shard_bytes += t.numel() * 2
        total += t.numel() * 2
        count += t.numel()
        if shard_bytes >= shard_gb * 1e9:
            flush()
    if shard:
        flush()
    # Shard names as diffusers writes them: "-0000i-of-0000n".
    renamed = {n: n.replace(".safetensors", f"-of-{len(names):05d}.safetensors") for n in names}
    for old, new in renamed.items():
        (folder / old).rename(folder / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return count


def flux2_text_encoder(tokenizer, layers: int = 32, hidden: int = MISTRAL_SMALL_HIDDEN):
    """Mistral3ForConditionalGeneration at Mistral Small 3.1's width, `layers` deep, with 4 query
    heads, 1 key/value head and an MLP of 1024 (random bfloat16 weights), and a one-layer vision tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text = MistralConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=1024,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1, head_dim=128,
                         max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=64, patch_size=16)
    config = Mistral3Config(text_config=text, vision_config=vision,
                            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"))
    return Mistral3ForConditionalGeneration(config).to(torch.bfloat16).eval()


def make_full_size_flux2(out_dir: Path, device: str = "cuda", shard_gb: float = 10.0, text_layers: int = 32,
                         transformer: dict = FLUX2_DEV_TRANSFORMER, vae: dict = FLUX2_VAE) -> Path:
    """Write OUT_DIR/flux2; `transformer` and `vae` are the configs (the release's by default; the
    text encoder's width follows the transformer's text features, a third of them)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

    start = time.time()
    folder = Path(out_dir) / "flux2"
    params = write_transformer(folder / "transformer", transformer, device, shard_gb)
    torch.manual_seed(0)
    with torch.device(device):
        AutoencoderKLFlux2(**vae).to(torch.bfloat16).save_pretrained(folder / "vae")
        tokenizer = tiny_mistral_tokenizer()
        encoder = flux2_text_encoder(tokenizer, text_layers, transformer["joint_attention_dim"] // 3)
        encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER).save_pretrained(folder / "scheduler")
    index = {"_class_name": "Flux2Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Mistral3ForConditionalGeneration"],
             "tokenizer": ["transformers", type(tokenizer).__name__],
             "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    print(f"wrote {folder}: transformer {params / 1e9:.2f}B params, in {time.time() - start:.0f} s")
    return folder


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--device", default="cuda", help="where the random weights are drawn")
    ap.add_argument("--shard_gb", type=float, default=10.0)
    ap.add_argument("--text_layers", type=int, default=32, help="text encoder depth (at least 31: layer 30 is read)")
    args = ap.parse_args()
    make_full_size_flux2(args.out_dir, args.device, args.shard_gb, args.text_layers)
