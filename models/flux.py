"""FLUX.1 (dev and schnell): CLIP-L + T5 text encoders, 16-channel VAE, MMDiT transformer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from models.base import EncoderFile, ModelRecipe
from models.keymaps.flux import FLUX_VAE, FluxKeymap
from models.keymaps.single_file import CLIP_L, T5_XXL
from models.pipeline_layers import PipelineFields, PipelineLayer
from config.train_config import ModelConfig
from config.schema import check, key


@dataclass
class FluxConfig(ModelConfig):
    guidance: float = 1.0
    max_sequence_length: int = 512
    # The VAE and text encoders from the files users hold (BFL's / ComfyUI's single files, or
    # transformers folders) instead of the diffusers folder's weights; the configs stay its.
    vae_path: Optional[str] = None
    clip_path: Optional[str] = None
    t5_path: Optional[str] = None

    path_keys: ClassVar[dict[str, Optional[str]]] = {"vae_path": "the VAE's single file (ae.safetensors)",
                                                     "clip_path": None, "t5_path": None}

    def validate(self, file, prefix):
        super().validate(file, prefix)
        check(1 <= self.max_sequence_length <= 512, file, key(prefix, "max_sequence_length"), "must be in 1..512")


# What the data loader hands the first layer, and what flows between the blocks.
FLUX_INPUTS = PipelineFields("latents", "text", "pooled", "timesteps", "guidance", "img_ids", "txt_ids")
FLUX_STREAM = PipelineFields("hidden", "encoder_hidden", "temb", "img_ids", "txt_ids")
FLUX_OUTPUT = PipelineFields("prediction")


class FluxInputLayer(PipelineLayer):
    """Patch embedding, timestep/guidance/pooled-text embedding and text projection."""

    kind = "input"

    def __init__(self, transformer: FluxTransformer2DModel):
        super().__init__(FLUX_INPUTS, FLUX_STREAM, ["x_embedder", "time_text_embed", "context_embedder"])
        self.x_embedder = transformer.x_embedder
        self.time_text_embed = transformer.time_text_embed
        self.context_embedder = transformer.context_embedder
        self.uses_guidance = transformer.config.guidance_embeds

    def run(self, s):
        hidden = self.x_embedder(s["latents"])
        timestep = s["timesteps"].to(hidden.dtype) * 1000
        pooled = s["pooled"].to(hidden.dtype)
        if self.uses_guidance:
            temb = self.time_text_embed(timestep, s["guidance"].to(hidden.dtype) * 1000, pooled)
        else:
            temb = self.time_text_embed(timestep, pooled)
        encoder_hidden = self.context_embedder(s["text"].to(hidden.dtype))
        return {"hidden": hidden, "encoder_hidden": encoder_hidden, "temb": temb,
                "img_ids": s["img_ids"], "txt_ids": s["txt_ids"]}


class FluxBlockLayer(PipelineLayer):
    """One transformer block. Rotary embeddings are recomputed from the integer ids in every
    layer: cheap, and no gradient-less float tensor crosses a stage."""

    kind = "block"
    writes = ("hidden", "encoder_hidden")

    def __init__(self, transformer: FluxTransformer2DModel, module_name: str):
        super().__init__(FLUX_STREAM, FLUX_STREAM, [module_name])
        self.block = transformer.get_submodule(module_name)
        self.pos_embed = transformer.pos_embed

    def run(self, s):
        rotary = self.memo("rotary", (s["txt_ids"], s["img_ids"]),
                           lambda: self.pos_embed(torch.cat((s["txt_ids"], s["img_ids"]), dim=0)))
        encoder_hidden, hidden = self.block(hidden_states=s["hidden"], encoder_hidden_states=s["encoder_hidden"],
                                            temb=s["temb"], image_rotary_emb=rotary)
        return {**s, "hidden": hidden, "encoder_hidden": encoder_hidden}


# A class per block kind (models/pipeline_layers.PipelineLayer.kind says why).
class FluxDoubleBlockLayer(FluxBlockLayer):
    """A double-stream block: image and text tokens with their own weights, joint attention."""

    # Compiled, checkpointed inside its graph, on an H100: forward 3.5 + backward 6.7 ms a micro-batch
    # against a single-stream block's 2.6 + 5.9 (docs/benchmarks.md, "Several GPUs, fifth run").
    cost = 1.2


class FluxSingleBlockLayer(FluxBlockLayer):
    """A single-stream block: text and image tokens concatenated, attention and MLP in parallel."""


class FluxFinalLayer(PipelineLayer):
    kind = "output"

    def __init__(self, transformer: FluxTransformer2DModel):
        super().__init__(FLUX_STREAM, FLUX_OUTPUT, ["norm_out", "proj_out"])
        self.norm_out = transformer.norm_out
        self.proj_out = transformer.proj_out

    def run(self, s):
        return {"prediction": self.proj_out(self.norm_out(s["hidden"], s["temb"]))}


class FluxModel(ModelRecipe):
    name = "flux"
    config_class = FluxConfig
    size_multiple = 16  # 8x VAE, then 2x2 patches
    transformer_class = FluxTransformer2DModel
    vae_class = AutoencoderKL
    pipeline_class = FluxPipeline
    input_fields = FLUX_INPUTS
    keymap = FluxKeymap  # the BFL release / ComfyUI layout (flux1-dev.safetensors)
    # Every attention projection and MLP linear of the double and single blocks.
    default_lora_targets = (r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj"
                            r"|add_v_proj|to_add_out)|ff(_context)?\.net\.(0\.proj|2)|proj_mlp|proj_out)")

    # "selective" recomputes the 38 single-stream blocks and keeps the 19 double-stream blocks'
    # activations: about 2/3 of the block activation memory saved for 2/3 of the recompute of
    # `true` (per token both kinds keep about the same and cost about the same FLOPs).
    selective_checkpoint_layers = ("FluxSingleBlockLayer",)
    # Per token (image + text); measured by bench/activation_factors.py (docs/benchmarks.md,
    # "Activation factors"); tests/test_memory.py re-measures them at a small size.
    activation_factors = {"FluxInputLayer": 0.0, "FluxDoubleBlockLayer": 23.3, "FluxSingleBlockLayer": 22.3,
                          "FluxFinalLayer": 1.0}
    full_finetune_activation_factors = {"FluxInputLayer": 0.2, "FluxDoubleBlockLayer": 28.2,
                                        "FluxSingleBlockLayer": 25.2, "FluxFinalLayer": 2.8}
    # FluxPipeline's: 1024x1024 (its default sample size), 28 steps, embedded guidance 3.5.
    sample_defaults = {"width": 1024, "height": 1024, "frames": 1, "steps": 28, "guidance": 3.5}

    # ---------------------------------------------------------------- encoders
    encoder_files = {
        "vae_path": EncoderFile("vae", AutoencoderKL, FLUX_VAE),
        "clip_path": EncoderFile("text_encoder", CLIPTextModel, CLIP_L, CLIPTextConfig, "tokenizer", CLIPTokenizer,
                                 folder_model_types=("clip",)),
        "t5_path": EncoderFile("text_encoder_2", T5EncoderModel, T5_XXL, T5Config, "tokenizer_2", T5TokenizerFast),
    }

    def latent_cache_signature(self) -> str:
        return self._config_signature("vae", extra="mode" + self.encoder_files_signature("vae_path"))

    def text_cache_signature(self) -> str:
        return self._config_signature("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2",
                                      extra=f"t5_len={self.config.max_sequence_length}"
                                            + self.encoder_files_signature("clip_path", "t5_path"))

    def text_encoder_parts(self, device):
        return (*self.encoder_part("clip_path", device), *self.encoder_part("t5_path", device))

    def encode_captions(self, captions):
        clip_tok, clip, t5_tok, t5 = self.text_encoders
        ids = clip_tok(captions, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(self.device)
        pooled = clip(ids, output_hidden_states=False).pooler_output
        ids = t5_tok(captions, padding="max_length", max_length=self.config.max_sequence_length, truncation=True,
                     return_tensors="pt").input_ids.to(self.device)
        text = t5(ids, output_hidden_states=False)[0]
        return [{"text": text[i].to(self.dtype), "pooled": pooled[i].to(self.dtype)} for i in range(len(captions))]

    def encode_pixels(self, pixels):
        pixels = pixels.squeeze(2).to(self.device, self.vae.dtype)  # an image model: one frame
        latents = self.vae.encode(pixels).latent_dist.mode()
        cfg = self.vae.config
        latents = (latents - cfg.shift_factor) * cfg.scaling_factor
        return [{"latents": latents[i].to(self.dtype)} for i in range(latents.shape[0])]

    # ---------------------------------------------------------------- inputs
    def pack_latents(self, latents):
        b, c, h, w = latents.shape
        x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    def image_seq_len(self, latents):
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def tokens_per_sample(self, width, height, frames):
        return (width // 16) * (height // 16) + self.config.max_sequence_length

    def model_inputs(self, noisy, timesteps, text):
        b, _, h, w = noisy.shape
        rows = torch.arange(h // 2).view(-1, 1).expand(h // 2, w // 2)
        cols = torch.arange(w // 2).view(1, -1).expand(h // 2, w // 2)
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
        txt_ids = torch.zeros(text["text"].shape[1], 3, dtype=torch.int64)
        return {"latents": self.pack_latents(noisy), "text": text["text"], "pooled": text["pooled"],
                "timesteps": timesteps.float(), "guidance": torch.full((b,), float(self.config.guidance)),
                "img_ids": img_ids, "txt_ids": txt_ids}

    # ---------------------------------------------------------------- sampling
    def sample_latent_shape(self, width, height, frames):
        # FluxPipeline.prepare_latents: 16 channels at 1/8 size, rounded down to whole 2x2 patches.
        channels = self.transformer_config()["in_channels"] // 4
        return channels, 2 * (height // 16), 2 * (width // 16)

    def unpack_latents(self, packed, shape):
        b, c, h, w = shape
        x = packed.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, h, w)

    def decode_latents(self, latents):
        cfg = self.vae.config
        latents = latents.to(self.device, self.vae.dtype) / cfg.scaling_factor + cfg.shift_factor
        return self.vae.decode(latents, return_dict=False)[0].unsqueeze(2)

    # ---------------------------------------------------------------- transformer
    def layers(self, transformer):
        layers: list[nn.Module] = [FluxInputLayer(transformer)]
        layers += [FluxDoubleBlockLayer(transformer, f"transformer_blocks.{i}")
                   for i in range(len(transformer.transformer_blocks))]
        layers += [FluxSingleBlockLayer(transformer, f"single_transformer_blocks.{i}")
                   for i in range(len(transformer.single_transformer_blocks))]
        layers.append(FluxFinalLayer(transformer))
        return layers

    def reference_forward(self, transformer, inputs):
        # FluxPipeline passes sigma as the timestep and the guidance scale; the forward scales both by 1000.
        guidance = inputs["guidance"] if transformer.config.guidance_embeds else None
        return transformer(hidden_states=inputs["latents"], encoder_hidden_states=inputs["text"],
                           pooled_projections=inputs["pooled"], timestep=inputs["timesteps"], guidance=guidance,
                           img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"], return_dict=False)[0]
