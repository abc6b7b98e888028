"""LTX-Video: T5 text encoder, causal video VAE (32x spatial, 8x temporal), single-stream transformer.

Preprocessing follows diffusers' LTXPipeline: T5 embeddings of up to 128 tokens with their
attention mask, latents normalised per channel with the VAE's latents_mean / latents_std, tokens
packed with LTXPipeline._pack_latents, the timestep given to the transformer as sigma * 1000, and
rotary positions scaled by (temporal compression / frame rate, spatial compression, spatial
compression).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLLTXVideo, LTXPipeline, LTXVideoTransformer3DModel
from torch import nn
from transformers import T5EncoderModel, T5TokenizerFast

from models.base import ModelRecipe
from models.keymaps.ltx_video import LTXVideoKeymap
from models.pipeline_layers import PipelineFields, PipelineLayer
from config.train_config import ModelConfig
from config.schema import check, key


@dataclass
class LTXVideoConfig(ModelConfig):
    # Frames per second of the training clips: scales the temporal rotary positions, as the
    # pipeline's `frame_rate` argument does at inference.
    frame_rate: float = 25.0
    max_sequence_length: int = 128
    # The release samples with a shift that grows with the video's token count (see LTXVideoModel).
    resolution_dependent_shift: bool = True

    def validate(self, file, prefix):
        super().validate(file, prefix)
        check(self.frame_rate > 0, file, key(prefix, "frame_rate"), "must be > 0")
        check(self.max_sequence_length >= 1, file, key(prefix, "max_sequence_length"), "must be at least 1")


# What the data loader hands the first layer, and what flows between the blocks. Masks and the
# latent grid size are int64: they carry no gradient across a stage boundary.
LTX_INPUTS = PipelineFields("latents", "text", "text_mask", "timesteps", "grid")
LTX_STREAM = PipelineFields("hidden", "encoder_hidden", "text_mask", "temb", "embedded_timestep", "grid")
LTX_OUTPUT = PipelineFields("prediction")


class LTXInputLayer(PipelineLayer):
    """Token projection, timestep embedding (AdaLN-single) and caption projection."""

    kind = "input"

    def __init__(self, transformer: LTXVideoTransformer3DModel):
        super().__init__(LTX_INPUTS, LTX_STREAM, ["proj_in", "time_embed", "caption_projection"])
        self.proj_in = transformer.proj_in
        self.time_embed = transformer.time_embed
        self.caption_projection = transformer.caption_projection

    def run(self, s):
        hidden = self.proj_in(s["latents"])
        batch = hidden.shape[0]
        # LTXPipeline passes the scheduler's timestep, sigma * 1000, in float32.
        temb, embedded = self.time_embed(s["timesteps"].float() * 1000, batch_size=batch, hidden_dtype=hidden.dtype)
        encoder_hidden = self.caption_projection(s["text"].to(hidden.dtype)).view(batch, -1, hidden.shape[-1])
        return {"hidden": hidden, "encoder_hidden": encoder_hidden, "text_mask": s["text_mask"],
                "temb": temb.view(batch, -1, temb.shape[-1]),
                "embedded_timestep": embedded.view(batch, -1, embedded.shape[-1]), "grid": s["grid"]}


class LTXBlockLayer(PipelineLayer):
    """One transformer block. Rotary embeddings are recomputed from the integer grid size in every
    layer: cheap, and no gradient-less float tensor crosses a stage."""

    kind = "block"
    writes = ("hidden",)

    def __init__(self, transformer: LTXVideoTransformer3DModel, index: int, rope_scale: tuple[float, float, float]):
        super().__init__(LTX_STREAM, LTX_STREAM, [f"transformer_blocks.{index}"])
        self.block = transformer.transformer_blocks[index]
        self.rope = transformer.rope
        self.rope_scale = rope_scale

    def run(self, s):
        hidden = s["hidden"]
        rotary = self.memo("rotary", (s["grid"], hidden.shape[0], hidden.device, self.rope_scale),
                           lambda: self.rope(hidden, *s["grid"].tolist(), self.rope_scale))
        # As the transformer's forward does: the 0/1 text mask becomes an additive attention bias.
        bias = ((1 - s["text_mask"].to(hidden.dtype)) * -10000.0).unsqueeze(1)
        hidden = self.block(hidden_states=hidden, encoder_hidden_states=s["encoder_hidden"], temb=s["temb"],
                            image_rotary_emb=rotary, encoder_attention_mask=bias)
        return {**s, "hidden": hidden}


class LTXFinalLayer(PipelineLayer):
    """Output norm modulated by the timestep, and the projection back to latent tokens."""

    kind = "output"

    def __init__(self, transformer: LTXVideoTransformer3DModel):
        super().__init__(LTX_STREAM, LTX_OUTPUT, ["scale_shift_table", "norm_out", "proj_out"])
        self.norm_out = transformer.norm_out
        self.proj_out = transformer.proj_out
        # scale_shift_table is a parameter of the transformer itself: registered as this layer's.
        self.bind_root_parameters(transformer)

    def run(self, s):
        shift, scale = (self.scale_shift_table[None, None] + s["embedded_timestep"][:, :, None]).unbind(dim=2)
        hidden = self.norm_out(s["hidden"]) * (1 + scale) + shift
        return {"prediction": self.proj_out(hidden)}


class LTXVideoModel(ModelRecipe):
    name = "ltx-video"
    config_class = LTXVideoConfig
    size_multiple = 32  # 32x VAE, 1x1 patches
    frame_multiple = 8  # 8x temporal VAE: clips of 8k+1 frames
    transformer_class = LTXVideoTransformer3DModel
    vae_class = AutoencoderKLLTXVideo
    pipeline_class = LTXPipeline
    input_fields = LTX_INPUTS
    # The Lightricks release / ComfyUI names. The release's all-in-one file puts
    # "model.diffusion_model." before them (beside the VAE's "vae."); Lightricks' own inference
    # scripts also want a config in the file's metadata, which the saved full model does not carry.
    keymap = LTXVideoKeymap
    # Self- and cross-attention projections and the feed-forward linears of every block.
    default_lora_targets = r".*transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
    # The release scheduler's dynamic shift: mu from 0.95 at 1024 video tokens to 2.05 at 4096.
    base_seq_len = 1024
    max_seq_len = 4096
    base_shift = 0.95
    max_shift = 2.05
    # No "selective" checkpointing: DeepSpeed picks the layers to recompute by class name, and the
    # blocks are all of one kind (a selective mode would need classes for, say, odd and even blocks).
    # Per video token (the text tokens' cross-attention keys and values are in the factor);
    # measured by bench/activation_factors.py (docs/benchmarks.md, "Activation factors").
    activation_factors = {"LTXInputLayer": 0.0, "LTXBlockLayer": 33.4, "LTXFinalLayer": 1.0}
    full_finetune_activation_factors = {"LTXInputLayer": 0.3, "LTXBlockLayer": 43.4, "LTXFinalLayer": 3.0}
    # LTXPipeline's: 704x512, 161 frames, 50 steps, classifier-free guidance 3 on a negative prompt.
    sample_defaults = {"width": 704, "height": 512, "frames": 161, "steps": 50, "guidance": 3.0}
    sample_guidance = "classifier_free"
    decode_tiled = True

    # ---------------------------------------------------------------- encoders
    def text_cache_signature(self) -> str:
        return self._config_signature("tokenizer", "text_encoder",
                                      extra=f"t5_len={self.config.max_sequence_length},mask")

    def text_encoder_parts(self, device):
        return (
            T5TokenizerFast.from_pretrained(self.root / "tokenizer"),
            T5EncoderModel.from_pretrained(self.root / "text_encoder", torch_dtype=self.dtype).to(device).eval(),
        )

    def encode_captions(self, captions):
        tokenizer, t5 = self.text_encoders
        tokens = tokenizer(captions, padding="max_length", max_length=self.config.max_sequence_length,
                           truncation=True, add_special_tokens=True, return_tensors="pt")
        # As LTXPipeline: T5 encodes the padded ids without a mask; the mask only goes to the
        # transformer's cross-attention.
        text = t5(tokens.input_ids.to(self.device))[0]
        mask = tokens.attention_mask.bool()
        return [{"text": text[i].to(self.dtype), "text_mask": mask[i]} for i in range(len(captions))]

    def encode_pixels(self, pixels):
        latents = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mode()
        # The inverse of what LTXPipeline does before decoding (_denormalize_latents).
        latents = LTXPipeline._normalize_latents(latents, self.vae.latents_mean, self.vae.latents_std,
                                                 self.vae.config.scaling_factor)
        return [{"latents": latents[i].to(self.dtype)} for i in range(latents.shape[0])]

    # ---------------------------------------------------------------- inputs
    @cached_property
    def rope_interpolation_scale(self) -> tuple[float, float, float]:
        """(temporal compression / frame rate, spatial compression, spatial compression), as LTXPipeline."""
        with init_empty_weights():  # only the VAE's compression ratios are needed
            vae = AutoencoderKLLTXVideo.from_config(AutoencoderKLLTXVideo.load_config(self.root / "vae"))
        return (vae.temporal_compression_ratio / self.config.frame_rate, vae.spatial_compression_ratio,
                vae.spatial_compression_ratio)

    def pack_latents(self, latents):
        patch, patch_t = self.patch_sizes
        return LTXPipeline._pack_latents(latents, patch, patch_t)

    def image_seq_len(self, latents):
        # LTXPipeline computes the shift from latent frames x height x width.
        return latents.shape[2] * latents.shape[3] * latents.shape[4]

    def tokens_per_sample(self, width, height, frames):
        # Video tokens only: the text's (max_sequence_length) enter the blocks only as the
        # cross-attention's keys and values, which activation_factors counts per video token.
        patch, patch_t = self.patch_sizes
        return ((frames - 1) // self.frame_multiple + 1) // patch_t * (height // 32 // patch) * (width // 32 // patch)

    def model_inputs(self, noisy, timesteps, text):
        patch, patch_t = self.patch_sizes
        _, _, frames, height, width = noisy.shape
        return {"latents": self.pack_latents(noisy), "text": text["text"], "text_mask": text["text_mask"].long(),
                "timesteps": timesteps.float(),
                # the token grid after patching: the rotary positions enumerate tokens
                "grid": torch.tensor([frames // patch_t, height // patch, width // patch])}

    # ---------------------------------------------------------------- sampling
    def sample_latent_shape(self, width, height, frames):
        # LTXPipeline.prepare_latents: 8x fewer frames (plus the first), 32x smaller.
        channels = self.transformer_config()["in_channels"]
        return channels, (frames - 1) // self.frame_multiple + 1, height // 32, width // 32

    def sample_noise(self, width, height, frames, seed):
        # LTXPipeline draws and steps its latents in float32, whatever the transformer's dtype.
        return super().sample_noise(width, height, frames, seed).float()

    def unpack_latents(self, packed, shape):
        patch, patch_t = self.patch_sizes
        b, c, f, h, w = shape
        return LTXPipeline._unpack_latents(packed, f // patch_t, h // patch, w // patch, patch, patch_t)

    def decode_latents(self, latents):
        vae = self.vae
        latents = LTXPipeline._denormalize_latents(latents.to(self.device, torch.float32), vae.latents_mean,
                                                   vae.latents_std, vae.config.scaling_factor).to(self.dtype)
        # The pipeline's default decode_timestep 0 with noise scale 0: the latents as they are.
        timestep = torch.zeros(latents.shape[0], device=self.device, dtype=latents.dtype) \
            if vae.config.timestep_conditioning else None
        return vae.decode(latents.to(vae.dtype), timestep, return_dict=False)[0]

    # ---------------------------------------------------------------- transformer
    def layers(self, transformer):
        scale = self.rope_interpolation_scale
        layers: list[nn.Module] = [LTXInputLayer(transformer)]
        layers += [LTXBlockLayer(transformer, i, scale) for i in range(len(transformer.transformer_blocks))]
        layers.append(LTXFinalLayer(transformer))
        return layers

    def reference_forward(self, transformer, inputs):
        # As LTXPipeline: packed latents, the timestep sigma * 1000, the 0/1 text mask, the token grid.
        frames, height, width = inputs["grid"].tolist()
        return transformer(hidden_states=inputs["latents"], encoder_hidden_states=inputs["text"],
                           timestep=inputs["timesteps"] * 1000, encoder_attention_mask=inputs["text_mask"],
                           num_frames=frames, height=height, width=width,
                           rope_interpolation_scale=self.rope_interpolation_scale, return_dict=False)[0]
