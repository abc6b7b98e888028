"""Write tiny random-weight model folders in the real diffusers on-disk layout, for tests.

Usage: python tools/make_tiny_models.py OUT_DIR [--only flux ...]

Each model family is one ``make_tiny_<name>(out_dir) -> Path`` function registered in ``MAKERS``;
it writes ``OUT_DIR/<name>/`` and returns that path. Everything is seeded, so output is deterministic.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# tools/ is not a package: make the repo root importable so `models.*` resolves when run as a script.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from models.keymaps.flux import FLUX_VAE as FLUX_VAE_FILE, FluxKeymap  # noqa: E402
from models.keymaps.hunyuan_video import HUNYUAN_VIDEO_VAE, LLAVA_LLAMA3, HunyuanVideoKeymap  # noqa: E402
from models.keymaps.single_file import CLIP_L, T5_XXL  # noqa: E402
from models.keymaps.ltx_video import LTXVideoKeymap  # noqa: E402

SEED = 0

# Small built-in corpus: enough distinct words for BPE / Unigram to learn a usable vocabulary.
CORPUS = [
    "a photo of a cat sitting on a red chair",
    "a painting of a mountain lake at sunrise, oil on canvas",
    "a close-up portrait of an old man with a grey beard",
    "two dogs running on the beach in the evening light",
    "a futuristic city skyline at night with neon signs!",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of fresh fruit: apples, oranges and grapes.",
    "a small wooden house in a snowy forest",
    "the quick brown fox jumps over the lazy dog",
    "a bird flying above green fields and blue rivers",
    "a woman reading a book in a quiet library",
    "a car driving through the rain on a dark street?",
    "video of waves crashing on rocks, slow motion",
    "a child's drawing of a sun, a tree and 3 flowers",
    "macro shot of a bee on a yellow flower, 4k",
    "it's a sunny day; people walk in the park",
]

FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
FLUX_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
    latent_channels=16, norm_num_groups=4, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False,
)
# The FLUX.1-dev scheduler settings (resolution-dependent shift).
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)


LTX_TRANSFORMER = dict(
    in_channels=16, out_channels=16, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
    cross_attention_dim=32, num_layers=2, caption_channels=32,
)
LTX_VAE = dict(  # 32x spatial, 8x temporal, like the release
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
    decoder_block_out_channels=(8, 8, 16, 16), layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
    spatio_temporal_scaling=(True, True, True, False), decoder_spatio_temporal_scaling=(True, True, True, False),
    decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
    timestep_conditioning=False, patch_size=4, patch_size_t=1, encoder_causal=True, decoder_causal=False,
)
# The LTX-Video release's scheduler: shift from the video's token count, mu in 0.95..2.05 over 1024..4096 tokens.
LTX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
    base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1,
)
HUNYUAN_TRANSFORMER = dict(
    in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2, num_single_layers=2,
    num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=32,
    pooled_projection_dim=32, rope_axes_dim=(4, 6, 6),
)
HUNYUAN_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
    up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
    norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4,
)
# The HunyuanVideo release's scheduler: a fixed shift of 7.
HUNYUAN_SCHEDULER = dict(num_train_timesteps=1000, shift=7.0)


# FLUX.2 [dev]: the released configs (48 heads x 128, 8 double + 48 single blocks, 32 latent channels
# patchified 2x2 to 128, Mistral Small 3.1's hidden states from layers 10, 20 and 30 stacked into
# 3 x 5120 = 15360 text features) at tiny widths. The text encoder stays 32 layers deep so that the
# real layer indices (models/flux2.TEXT_ENCODER_LAYERS) read hidden states before its final norm,
# as they do in the 40-layer release.
FLUX2_TEXT_HIDDEN = 16
FLUX2_TRANSFORMER = dict(
    patch_size=1, in_channels=32, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=3 * FLUX2_TEXT_HIDDEN, timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
    rope_theta=2000, guidance_embeds=True,
)
FLUX2_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
    latent_channels=8, norm_num_groups=4, sample_size=64, patch_size=(2, 2),
)
# The FLUX.2-dev scheduler settings (its pipeline computes the shift mu itself).
FLUX2_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
)
FLUX2_TEXT_LAYERS = 32


# Tokenizers. The `tokenizers` trainers break frequency ties in hash-map order, so two runs give different
# vocabularies (seen with tokenizers 0.23, even single-threaded). So the vocabularies are built here with
# deterministic tie-breaking; every single character stays in the vocab, so any lowercase ASCII text tokenizes.
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'\"-:;()"


def _word_counts(corpus) -> Counter:
    # Roughly CLIP's pre-tokenization: letter runs, single digits, single punctuation marks.
    return Counter(w for line in corpus for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]", line.lower()))


def _chars(corpus) -> list[str]:
    return sorted(set(ALPHABET) | set("".join(corpus).lower()) - set(" \n"))


def _merge_pair(word: tuple, pair: tuple) -> tuple:
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _learn_bpe(words: dict) -> list[tuple[str, str]]:
    """Plain BPE merges: merge the most frequent pair until none is left, ties broken by the pair itself."""
    merges = []
    while True:
        pairs = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = {_merge_pair(w, best): n for w, n in words.items()}
    return merges


def tiny_clip_tokenizer(corpus=CORPUS):
    """A CLIPTokenizer (BPE with the "</w>" end-of-word suffix) trained on ``corpus`` until every word is one token."""
    from transformers import CLIPTokenizer

    chars = _chars(corpus)
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in _word_counts(corpus).items()}
    merges = _learn_bpe(words)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77
    return tok


def tiny_t5_tokenizer(corpus=CORPUS):
    """A T5TokenizerFast (Unigram + Metaspace) with corpus words as pieces, scored by frequency."""
    from transformers import T5TokenizerFast

    counts = _word_counts(corpus)
    words = sorted(counts, key=lambda w: (-counts[w], w))
    # Whole words score far above their spelled-out characters, so Viterbi keeps known words whole.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(words) if w.isalnum()]
    # T5 does not lowercase, so capitals get pieces too.
    vocab += [(c, -10.0) for c in ["\u2581"] + _chars(corpus) + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")]
    vocab = list({p: (p, sc) for p, sc in vocab}.values())  # drop duplicate pieces, keep first
    tok = T5TokenizerFast(vocab=vocab, extra_ids=0)
    tok.model_max_length = 512
    return tok


# The Llama-3 chat header tokens that HunyuanVideo's prompt template is written with.
LLAMA_SPECIAL_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def tiny_llama_tokenizer(corpus=CORPUS):
    """A LlamaTokenizerFast (BPE + Metaspace, "\u2581" marks a word start) trained on ``corpus``.

    Every printable ASCII character and newline is in the vocabulary, so HunyuanVideo's prompt template tokenizes
    without unknown tokens; its chat header tokens are special tokens, as in the real (Llama-3) tokenizer.
    Padding is on the right: the template crop and the transformer's text mask both expect the prompt first.
    """
    from transformers import LlamaTokenizerFast

    words = {("\u2581",) + tuple(w): n for w, n in _word_counts(corpus).items()}
    merges = _learn_bpe(words)
    chars = ["\u2581", "\n"] + [chr(c) for c in range(33, 127)]
    tokens = ["<unk>", "<s>", "</s>"] + chars + [a + b for a, b in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = LlamaTokenizerFast(vocab=vocab, merges=merges, padding_side="right", add_bos_token=True)
    tok.add_tokens(LLAMA_SPECIAL_TOKENS, special_tokens=True)
    tok.pad_token = "</s>"
    tok.model_max_length = 1024
    return tok


def tiny_llama_encoder(tok):
    """A 3-layer Llama with hidden size 32 (HunyuanVideo reads the third-from-last hidden state)."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(SEED)
    return LlamaModel(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))


def tiny_clip_text_encoder(tok):
    """A 2-layer CLIP-L-shaped text encoder with hidden/projection size 32."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))


def tiny_t5_encoder(tok):
    """A 2-layer T5 encoder with d_model 32."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(SEED)
    return T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id))


def make_tiny_flux(out_dir: Path) -> Path:
    """Write a tiny FLUX pipeline to ``out_dir/flux`` (plus an original-layout transformer file); return that dir."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import save_file

    target = Path(out_dir) / "flux"
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER)
    torch.manual_seed(SEED)
    vae = AutoencoderKL(**FLUX_VAE)
    clip, t5 = tiny_clip_text_encoder(tokenizer), tiny_t5_encoder(tokenizer_2)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(target)
    # Stand-in for the single-file release checkpoint (flux1-dev.safetensors layout).
    original = {k: v.contiguous() for k, v in FluxKeymap.diffusers_to_original(transformer.state_dict()).items()}
    save_file(original, str(target / "flux1-tiny-original.safetensors"))
    # Stand-ins for the VAE and text encoder files FLUX.1 users hold: BFL's ae.safetensors, ComfyUI's
    # clip_l.safetensors (with CLIP's text projection, which is not read) and t5xxl_fp16.safetensors.
    save_file(FLUX_VAE_FILE.to_single_file(vae.state_dict()), str(target / "ae_tiny.safetensors"))
    g = torch.Generator().manual_seed(SEED)
    save_file({**CLIP_L.to_single_file(clip.state_dict()),
               "text_projection.weight": torch.randn(clip.config.hidden_size, clip.config.hidden_size, generator=g)},
              str(target / "clip_l_tiny.safetensors"))
    t5_weights = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    save_file(T5_XXL.to_single_file(t5_weights), str(target / "t5xxl_tiny.safetensors"))
    return target


def make_tiny_ltx_video(out_dir: Path) -> Path:
    """Write a tiny LTX-Video pipeline to ``out_dir/ltx-video`` (plus an original-layout transformer file)."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
    from safetensors.torch import save_file

    target = Path(out_dir) / "ltx-video"
    tokenizer = tiny_t5_tokenizer()
    tokenizer.model_max_length = 128
    torch.manual_seed(SEED)
    transformer = LTXVideoTransformer3DModel(**LTX_TRANSFORMER)
    torch.manual_seed(SEED)
    vae = AutoencoderKLLTXVideo(**LTX_VAE)
    # Per-channel latent statistics that are not 0 and 1, so the latent normalisation is exercised.
    g = torch.Generator().manual_seed(SEED)
    vae.latents_mean.copy_(0.1 * torch.randn(vae.latents_mean.shape, generator=g))
    vae.latents_std.copy_(0.5 + torch.rand(vae.latents_std.shape, generator=g))
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**LTX_SCHEDULER), vae=vae,
                       text_encoder=tiny_t5_encoder(tokenizer), tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(target)
    # Stand-in for the single-file release checkpoint (ltx-video-2b-v0.9.safetensors layout).
    original = LTXVideoKeymap.diffusers_to_original(transformer.state_dict(), prefix="model.diffusion_model.")
    save_file({k: v.contiguous() for k, v in original.items()}, str(target / "ltx-video-tiny-original.safetensors"))
    return target


def make_tiny_hunyuan_video(out_dir: Path) -> Path:
    """Write a tiny HunyuanVideo pipeline to ``out_dir/hunyuan-video`` (plus an original-layout transformer file)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from safetensors.torch import save_file

    target = Path(out_dir) / "hunyuan-video"
    tokenizer, tokenizer_2 = tiny_llama_tokenizer(), tiny_clip_tokenizer()
    torch.manual_seed(SEED)
    transformer = HunyuanVideoTransformer3DModel(**HUNYUAN_TRANSFORMER)
    torch.manual_seed(SEED)
    vae = AutoencoderKLHunyuanVideo(**HUNYUAN_VAE)
    llama, clip = tiny_llama_encoder(tokenizer), tiny_clip_text_encoder(tokenizer_2)
    pipe = HunyuanVideoPipeline(
        text_encoder=llama, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(**HUNYUAN_SCHEDULER), text_encoder_2=clip, tokenizer_2=tokenizer_2,
    )
    pipe.save_pretrained(target)
    # Stand-in for the single-file release checkpoint (original HunyuanVideo / ComfyUI layout).
    original = HunyuanVideoKeymap.diffusers_to_original(transformer.state_dict())
    save_file({k: v.contiguous() for k, v in original.items()}, str(target / "hunyuan-video-tiny-original.safetensors"))
    write_hunyuan_video_encoder_files(target, vae, llama, tokenizer, clip, tokenizer_2)
    return target


def write_hunyuan_video_encoder_files(target: Path, vae, llama, tokenizer, clip, tokenizer_2) -> None:
    """Stand-ins for the VAE and text encoder files HunyuanVideo users hold (diffusion-pipe's vae_path,
    llm_path, clip_path), written from the diffusers folder's modules through the single-file layouts."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel, LlamaForCausalLM

    g = torch.Generator().manual_seed(SEED)
    # ComfyUI's hunyuan_video_vae_bf16.safetensors, and the release's vae/pytorch_model.pt ("vae.", in "state_dict").
    save_file(HUNYUAN_VIDEO_VAE.to_single_file(vae.state_dict()), str(target / "hunyuan_video_vae_tiny.safetensors"))
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, target / "hunyuan_video_vae_tiny.pt")
    # ComfyUI's llava_llama3_fp16.safetensors (with the language model's output head, which is not read)
    # and clip_l.safetensors (with CLIP's text projection, which is not read).
    hidden = llama.config.hidden_size
    save_file({**LLAVA_LLAMA3.to_single_file(llama.state_dict()),
               "lm_head.weight": torch.randn(llama.config.vocab_size, hidden, generator=g)},
              str(target / "llava_llama3_tiny.safetensors"))
    save_file({**CLIP_L.to_single_file(clip.state_dict()),
               "text_projection.weight": torch.randn(clip.config.hidden_size, clip.config.hidden_size, generator=g)},
              str(target / "clip_l_tiny.safetensors"))
    # diffusion-pipe's llm_path and clip_path folders: a LlamaForCausalLM (Kijai's
    # llava-llama-3-8b-text-encoder-tokenizer) and a whole CLIPModel (openai/clip-vit-large-patch14),
    # each with its tokenizer.
    causal = LlamaForCausalLM(llama.config)
    causal.model.load_state_dict(llama.state_dict())
    causal.save_pretrained(target / "llava-llama-3-tiny-text-encoder-tokenizer")
    tokenizer.save_pretrained(target / "llava-llama-3-tiny-text-encoder-tokenizer")
    clip_model = CLIPModel(CLIPConfig(
        text_config=clip.config.to_dict(), projection_dim=clip.config.projection_dim,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=16, projection_dim=clip.config.projection_dim)))
    clip_model.text_model.load_state_dict(clip.state_dict())
    clip_model.save_pretrained(target / "clip-vit-large-patch14-tiny")
    tokenizer_2.save_pretrained(target / "clip-vit-large-patch14-tiny")


# Wan 2.1 (T2V 14B / 1.3B shapes shrunk): 2x2 patches on an 8x / 4x VAE of 16 channels.
WAN_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, text_dim=32,
    freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    rope_max_seq_len=1024,
)
WAN_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
# Wan 2.2 TI2V-5B: 48 latent channels, the VAE patchifies 2x2 first (16x / 4x in all).
WAN22_TI2V_TRANSFORMER = dict(WAN_TRANSFORMER, in_channels=48, out_channels=48)
WAN22_TI2V_VAE = dict(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                      temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                      patch_size=2, scale_factor_spatial=16)
# Wan 2.1 I2V-14B: the noisy latents, a 4-channel mask and the 16-channel condition latent in; the
# CLIP vision embedding (image_dim) through added key/value projections of the width's size.
WAN_I2V_TRANSFORMER = dict(WAN_TRANSFORMER, in_channels=36, image_dim=16, added_kv_proj_dim=32)
# The release's image encoder is CLIP ViT-H/14 at 224 pixels (257 tokens); here 32 pixels, 8x8 patches (17).
WAN_CLIP_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8, projection_dim=16)
# The Wan release's scheduler (UniPC on flow-matching sigmas, the 480p shift of 3).
WAN_SCHEDULER = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
# Wan 2.2 A14B T2V: the high-noise expert takes timesteps >= 0.875 * 1000.
WAN22_A14B_BOUNDARY = 0.875
# Wan 2.2 A14B I2V: 0.9.
WAN22_I2V_A14B_BOUNDARY = 0.9


def tiny_umt5_encoder(tok):
    """A 2-layer UMT5 encoder with d_model 32 (gated GELU, as umt5-xxl)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(SEED)
    return UMT5EncoderModel(UMT5Config(
        vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu", pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id))


def _tiny_wan_vae(config: dict):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(SEED)
    z = config["z_dim"]
    # Per-channel latent statistics that are not 0 and 1, so the latent normalisation is exercised.
    g = torch.Generator().manual_seed(SEED)
    mean = (0.1 * torch.randn(z, generator=g)).tolist()
    std = (0.5 + torch.rand(z, generator=g)).tolist()
    return AutoencoderKLWan(**config, latents_mean=mean, latents_std=std)


def _write_wan(target: Path, transformers: list[dict], vae_config: dict, image_to_video: bool = False,
               **pipeline_config) -> Path:
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from models.keymaps.wan import WanKeymap

    tokenizer = tiny_t5_tokenizer()
    built = []
    for n, config in enumerate(transformers):
        torch.manual_seed(SEED + n)
        built.append(WanTransformer3DModel(**config))
    parts = dict(tokenizer=tokenizer, text_encoder=tiny_umt5_encoder(tokenizer), vae=_tiny_wan_vae(vae_config),
                 scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER), transformer=built[0],
                 transformer_2=built[1] if len(built) > 1 else None, **pipeline_config)
    if image_to_video and transformers[0].get("image_dim") is not None:
        torch.manual_seed(SEED)
        size = WAN_CLIP_VISION["image_size"]
        pipe = WanImageToVideoPipeline(
            **parts, image_encoder=CLIPVisionModel(CLIPVisionConfig(**WAN_CLIP_VISION)).eval(),
            image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}))
    elif image_to_video:
        pipe = WanImageToVideoPipeline(**parts)
    else:
        pipe = WanPipeline(**parts)
    pipe.save_pretrained(target)
    # Stand-ins for the single-file release checkpoints (the Wan-AI / ComfyUI layout).
    for n, transformer in enumerate(built):
        original = WanKeymap.diffusers_to_original(transformer.state_dict())
        name = "wan-tiny-original.safetensors" if n == 0 else f"wan-tiny-original_{n + 1}.safetensors"
        save_file({k: v.contiguous() for k, v in original.items()}, str(target / name))
    return target


def make_tiny_wan(out_dir: Path) -> Path:
    """Write a tiny Wan 2.1 text-to-video pipeline to ``out_dir/wan`` (plus an original-layout transformer file)."""
    return _write_wan(Path(out_dir) / "wan", [WAN_TRANSFORMER], WAN_VAE)


def make_tiny_wan22_ti2v(out_dir: Path) -> Path:
    """Write a tiny Wan 2.2 TI2V-5B-shaped pipeline (48-channel VAE, per-token timesteps) to ``out_dir/wan2.2-ti2v``."""
    return _write_wan(Path(out_dir) / "wan2.2-ti2v", [WAN22_TI2V_TRANSFORMER], WAN22_TI2V_VAE, expand_timesteps=True)


def make_tiny_wan_i2v(out_dir: Path) -> Path:
    """Write a tiny Wan 2.1 I2V-14B-shaped pipeline (conditioning channels, a CLIP vision encoder) to
    ``out_dir/wan-i2v``, in WanImageToVideoPipeline's layout."""
    return _write_wan(Path(out_dir) / "wan-i2v", [WAN_I2V_TRANSFORMER], WAN_VAE, image_to_video=True)


def make_tiny_wan22_i2v_a14b(out_dir: Path) -> Path:
    """Write a tiny Wan 2.2 I2V A14B-shaped pipeline (two experts with conditioning channels, no image
    encoder, boundary 0.9) to ``out_dir/wan2.2-i2v-a14b``."""
    experts = [{k: v for k, v in WAN_I2V_TRANSFORMER.items() if k not in ("image_dim", "added_kv_proj_dim")}] * 2
    return _write_wan(Path(out_dir) / "wan2.2-i2v-a14b", experts, WAN_VAE, image_to_video=True,
                      boundary_ratio=WAN22_I2V_A14B_BOUNDARY)


def make_tiny_wan22_a14b(out_dir: Path) -> Path:
    """Write a tiny Wan 2.2 A14B-shaped pipeline (a high- and a low-noise expert) to ``out_dir/wan2.2-a14b``."""
    return _write_wan(Path(out_dir) / "wan2.2-a14b", [WAN_TRANSFORMER, WAN_TRANSFORMER], WAN_VAE,
                      boundary_ratio=WAN22_A14B_BOUNDARY)


# Mistral's chat control tokens that the FLUX.2 prompt template is written with.
MISTRAL_SPECIAL_TOKENS = ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]
# The release's chat template, cut to what Flux2Pipeline sends (a system message and a user text),
# with the message content as a list of {"type": "text"} parts, as the pipeline writes it.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set text = message['content'] if message['content'] is string else "
    "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)


def tiny_mistral_tokenizer():
    """A Mistral-like BPE tokenizer with its chat template, trained on the corpus and FLUX.2's system
    message (so the template's fixed part stays short). Padding on the left, as the release's."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    tok = tiny_llama_tokenizer(CORPUS + [SYSTEM_MESSAGE.lower()])
    tok.add_tokens(MISTRAL_SPECIAL_TOKENS, special_tokens=True)
    tok.padding_side = "left"
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return tok


def tiny_mistral3_encoder(tok):
    """A Mistral3ForConditionalGeneration (the FLUX.2 text encoder's class) with a 32-layer text
    model of width FLUX2_TEXT_HIDDEN and a one-layer vision tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    torch.manual_seed(SEED)
    text = MistralConfig(
        vocab_size=len(tok), hidden_size=FLUX2_TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=FLUX2_TEXT_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=64, patch_size=16)
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=tok.convert_tokens_to_ids("[IMG]"))
    return Mistral3ForConditionalGeneration(config).eval()


def make_tiny_flux2(out_dir: Path) -> Path:
    """Write a tiny FLUX.2 [dev] pipeline to ``out_dir/flux2`` (plus an original-layout transformer file)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from safetensors.torch import save_file

    from models.keymaps.flux2 import Flux2Keymap

    target = Path(out_dir) / "flux2"
    tokenizer = tiny_mistral_tokenizer()
    torch.manual_seed(SEED)
    transformer = Flux2Transformer2DModel(**FLUX2_TRANSFORMER)
    torch.manual_seed(SEED)
    vae = AutoencoderKLFlux2(**FLUX2_VAE)
    # Batch-norm statistics that are not 0 and 1, so the latent normalisation is exercised.
    g = torch.Generator().manual_seed(SEED)
    vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.running_mean.shape, generator=g))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=g))
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), vae=vae,
                         text_encoder=tiny_mistral3_encoder(tokenizer), tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(target)
    # Stand-in for the single-file release checkpoint (flux2-dev.safetensors layout).
    original = Flux2Keymap.diffusers_to_original(transformer.state_dict())
    save_file({k: v.contiguous() for k, v in original.items()}, str(target / "flux2-tiny-original.safetensors"))
    return target


# name -> maker
MAKERS = {"flux": make_tiny_flux, "ltx-video": make_tiny_ltx_video, "hunyuan-video": make_tiny_hunyuan_video,
          "flux2": make_tiny_flux2, "wan": make_tiny_wan, "wan2.2-ti2v": make_tiny_wan22_ti2v,
          "wan2.2-a14b": make_tiny_wan22_a14b, "wan-i2v": make_tiny_wan_i2v,
          "wan2.2-i2v-a14b": make_tiny_wan22_i2v_a14b}


def main(argv=None) -> None:
    """CLI entry point: write the selected tiny models under OUT_DIR and list the files written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--only", nargs="+", choices=sorted(MAKERS), default=sorted(MAKERS))
    args = parser.parse_args(argv)
    for name in args.only:
        path = MAKERS[name](args.out_dir)
        files = sorted(p for p in path.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in files)
        print(f"{name}: {path} ({len(files)} files, {size / 1e6:.2f} MB)")
        for p in files:
            print(f"  {p.relative_to(path)}  {p.stat().st_size} B")


if __name__ == "__main__":
    main()
