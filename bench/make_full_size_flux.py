"""Write a FLUX.1-dev-shaped pipeline folder with random weights, for GPU runs without downloads.

The transformer (12B) and the VAE have the released architecture exactly; the text encoders
have the released output widths (T5: 4096 per token, CLIP: 768 pooled) but only
`--text_layers` layers and the tiny offline tokenizers, since their depth does not change the
training step (their outputs are cached). Usage: python bench/make_full_size_flux.py OUT_DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from make_tiny_models import tiny_clip_tokenizer, tiny_t5_tokenizer  # noqa: E402

FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
# The released text encoders' depths: CLIP ViT-L/14's text tower and T5 v1.1 XXL's encoder.
CLIP_L_LAYERS = 12
T5_XXL_LAYERS = 24


def flux_text_encoders(clip_layers: int = CLIP_L_LAYERS, t5_layers: int = T5_XXL_LAYERS):
    """(CLIP tokenizer, CLIP-L, T5 tokenizer, T5-XXL encoder) with random bfloat16 weights at the
    released widths, `clip_layers` and `t5_layers` deep, on the current default device; the tiny
    offline tokenizers (their vocabularies change the embedding tables only)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=clip_layers, num_attention_heads=12,
                                        max_position_embeddings=77, projection_dim=768,
                                        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                                        pad_token_id=clip_tok.pad_token_id)).to(torch.bfloat16)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=4096, d_ff=10240, d_kv=64, num_layers=t5_layers,
                                 num_heads=64, feed_forward_proj="gated-gelu", is_gated_act=True,
                                 pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
                                 decoder_start_token_id=t5_tok.pad_token_id)).to(torch.bfloat16)
    return clip_tok, clip, t5_tok, t5


def flux_vae():
    """The FLUX.1 VAE with random bfloat16 weights, on the current default device."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**FLUX_VAE).to(torch.bfloat16)


def make_full_size_flux(out_dir: Path, text_layers: int = 2, device: str = "cuda") -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    start = time.time()
    with torch.device(device):
        transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER).to(torch.bfloat16)
        # Random init gives huge activations through 57 blocks; scale weights down like a trained model's.
        with torch.no_grad():
            for p in transformer.parameters():
                if p.dim() >= 2:
                    p.mul_(0.5)
        vae = flux_vae()
        clip_tok, clip, t5_tok, t5 = flux_text_encoders(text_layers, text_layers)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)
    folder = Path(out_dir) / "flux"
    pipe.save_pretrained(folder, max_shard_size="10GB")
    params = sum(p.numel() for p in transformer.parameters())
    print(f"wrote {folder}: transformer {params / 1e9:.2f}B params, in {time.time() - start:.0f} s")
    return folder


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--text_layers", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    make_full_size_flux(args.out_dir, args.text_layers, args.device)
