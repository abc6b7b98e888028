"""Write LTX-Video, HunyuanVideo and Wan 2.1 pipeline folders at their released sizes with random weights.

The transformers and VAEs use diffusers' default configs, which are the released architectures
(LTX-Video 0.9: 2B transformer, 128-channel 32x/8x VAE; HunyuanVideo: 13B transformer, 16-channel
8x/4x VAE; Wan 2.1 T2V 14B: 40 blocks of width 5120, 16-channel 8x/4x VAE). The text encoders have
the released output widths (T5: 4096; Llama: 4096, CLIP: 768 pooled; UMT5: 4096) but only
`--text_layers` layers and the tiny offline tokenizers: their outputs are cached before training,
so their depth does not change the step. Usage:
  python bench/make_full_size_video.py OUT_DIR [--only ltx-video hunyuan-video wan]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from make_tiny_models import (  # noqa: E402
    HUNYUAN_SCHEDULER, LTX_SCHEDULER, WAN_SCHEDULER, tiny_clip_tokenizer, tiny_llama_tokenizer, tiny_t5_tokenizer)


def _t5(tok, layers):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=4096, d_ff=10240, d_kv=64, num_layers=layers,
                                   num_heads=64, feed_forward_proj="gated-gelu", is_gated_act=True,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                   decoder_start_token_id=tok.pad_token_id))


def make_ltx_video(out_dir: Path, text_layers: int) -> Path:
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    tok = tiny_t5_tokenizer()
    with torch.device("cuda"):
        transformer = LTXVideoTransformer3DModel().to(torch.bfloat16)
        vae = AutoencoderKLLTXVideo().to(torch.bfloat16)
        t5 = _t5(tok, text_layers).to(torch.bfloat16)
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**LTX_SCHEDULER), vae=vae, text_encoder=t5,
                       tokenizer=tok, transformer=transformer)
    folder = out_dir / "ltx-video"
    pipe.save_pretrained(folder, max_shard_size="10GB")
    return folder, sum(p.numel() for p in transformer.parameters())


def make_hunyuan_video(out_dir: Path, text_layers: int) -> Path:
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    llama_tok, clip_tok = tiny_llama_tokenizer(), tiny_clip_tokenizer()
    with torch.device("cuda"):
        transformer = HunyuanVideoTransformer3DModel().to(torch.bfloat16)
        vae = AutoencoderKLHunyuanVideo().to(torch.bfloat16)
        # Hunyuan reads the third hidden state from the end: keep at least 3 layers.
        llama = LlamaModel(LlamaConfig(vocab_size=len(llama_tok), hidden_size=4096, intermediate_size=14336,
                                       num_hidden_layers=max(3, text_layers), num_attention_heads=32,
                                       num_key_value_heads=8, max_position_embeddings=1024,
                                       bos_token_id=llama_tok.bos_token_id, eos_token_id=llama_tok.eos_token_id,
                                       pad_token_id=llama_tok.pad_token_id)).to(torch.bfloat16)
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=text_layers, num_attention_heads=12,
                                            max_position_embeddings=77, projection_dim=768,
                                            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                                            pad_token_id=clip_tok.pad_token_id)).to(torch.bfloat16)
    pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=llama_tok, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(**HUNYUAN_SCHEDULER),
                                text_encoder_2=clip, tokenizer_2=clip_tok)
    folder = out_dir / "hunyuan-video"
    pipe.save_pretrained(folder, max_shard_size="10GB")
    return folder, sum(p.numel() for p in transformer.parameters())


def make_wan(out_dir: Path, text_layers: int) -> Path:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tok = tiny_t5_tokenizer()
    with torch.device("cuda"):
        transformer = WanTransformer3DModel().to(torch.bfloat16)  # the defaults: Wan 2.1 T2V 14B
        vae = AutoencoderKLWan().to(torch.bfloat16)
        umt5 = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=4096, d_ff=10240, d_kv=64, num_heads=64,
                                           num_layers=text_layers, feed_forward_proj="gated-gelu",
                                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                           decoder_start_token_id=tok.pad_token_id)).to(torch.bfloat16)
    pipe = WanPipeline(tokenizer=tok, text_encoder=umt5, vae=vae, transformer=transformer,
                       scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER))
    folder = out_dir / "wan"
    pipe.save_pretrained(folder, max_shard_size="10GB")
    return folder, sum(p.numel() for p in transformer.parameters())


MAKERS = {"ltx-video": make_ltx_video, "hunyuan-video": make_hunyuan_video, "wan": make_wan}

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--only", nargs="+", choices=sorted(MAKERS), default=sorted(MAKERS))
    ap.add_argument("--text_layers", type=int, default=2)
    args = ap.parse_args()
    for name in args.only:
        torch.manual_seed(0)
        start = time.time()
        folder, params = MAKERS[name](args.out_dir, args.text_layers)
        print(f"wrote {folder}: transformer {params / 1e9:.2f}B params, in {time.time() - start:.0f} s", flush=True)
        torch.cuda.empty_cache()
