"""HunyuanVideo: Llama text encoder with the release's prompt template + CLIP-L pooled text,
causal video VAE (8x spatial, 4x temporal), dual- then single-stream transformer.

Preprocessing follows diffusers' HunyuanVideoPipeline: the caption is wrapped in the prompt
template, the Llama hidden state third from the end is taken and the template's tokens are
cropped off (with the attention mask), CLIP-L gives the pooled embedding, latents are scaled by
the VAE's scaling_factor, and the transformer gets the timestep and the guidance as value * 1000.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np
import torch
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from torch import nn
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, LlamaConfig, LlamaModel

from models.base import EncoderFile, ModelRecipe
from models.keymaps.hunyuan_video import HUNYUAN_VIDEO_VAE, LLAVA_LLAMA3, HunyuanVideoKeymap
from models.keymaps.single_file import CLIP_L
from models.pipeline_layers import PipelineFields, PipelineLayer
from config.train_config import ModelConfig
from utils.errors import ConfigError
from config.schema import check, key

# HunyuanVideoPipeline takes the Llama hidden state before the last two layers.
NUM_HIDDEN_LAYERS_TO_SKIP = 2


@dataclass
class HunyuanVideoConfig(ModelConfig):
    """Training samples timesteps with the base defaults (logit-normal, no shift): the release's
    shift of 7 is an inference schedule. Set `shift` to train with a shifted distribution."""

    guidance: float = 1.0
    max_sequence_length: int = 256
    # The VAE and text encoders from the files users hold instead of the diffusers folder's weights
    # (diffusion-pipe's keys, same meaning): the architecture still comes from diffusers_path's configs.
    vae_path: Optional[str] = None
    llm_path: Optional[str] = None
    clip_path: Optional[str] = None

    path_keys: ClassVar[dict[str, Optional[str]]] = {
        "vae_path": "the VAE's single file (hunyuan_video_vae_bf16.safetensors, or the release's pytorch_model.pt)",
        "llm_path": None, "clip_path": None}

    def validate(self, file, prefix):
        super().validate(file, prefix)
        check(self.max_sequence_length >= 1, file, key(prefix, "max_sequence_length"), "must be at least 1")


# What the data loader hands the first layer, and what flows between the blocks. The text mask
# and the latent grid size are int64: they carry no gradient across a stage boundary.
HUNYUAN_INPUTS = PipelineFields("latents", "text", "text_mask", "pooled", "timesteps", "guidance")
HUNYUAN_STREAM = PipelineFields("hidden", "encoder_hidden", "text_mask", "temb", "grid")
HUNYUAN_OUTPUT = PipelineFields("prediction")


def template_crop_start(tokenizer, template: str) -> int:
    """How many tokens of the prompt template come before the prompt, for any tokenizer.

    The template is tokenized with an empty prompt; the prompt would start where the template's
    text after "{}" starts. For the release's Llama-3 tokenizer this gives its crop_start of 95.
    """
    ids = tokenizer(template.format("")).input_ids
    suffix = tokenizer(template.split("{}", 1)[1], add_special_tokens=False).input_ids
    for start in range(len(ids) - len(suffix), -1, -1):
        if ids[start:start + len(suffix)] == suffix:
            return start
    raise ValueError("cannot locate the prompt in the tokenized prompt template")


def joint_attention_mask(text_mask: torch.Tensor, latent_len: int) -> torch.Tensor:
    """(batch, 1, 1, latent + text) bool mask, as HunyuanVideoTransformer3DModel.forward builds it:
    all latent tokens, then the first sum(text_mask) text tokens."""
    valid = latent_len + text_mask.sum(dim=1, dtype=torch.int)
    positions = torch.arange(latent_len + text_mask.shape[1], device=text_mask.device)
    return (positions[None] < valid[:, None])[:, None, None, :]


class HunyuanInputLayer(PipelineLayer):
    """Patch embedding, timestep/guidance/pooled-text embedding and the text token refiner."""

    kind = "input"

    def __init__(self, transformer: HunyuanVideoTransformer3DModel):
        super().__init__(HUNYUAN_INPUTS, HUNYUAN_STREAM, ["x_embedder", "time_text_embed", "context_embedder"])
        self.x_embedder = transformer.x_embedder
        self.time_text_embed = transformer.time_text_embed
        self.context_embedder = transformer.context_embedder
        self.uses_guidance = transformer.config.guidance_embeds

    def run(self, s):
        latents = s["latents"]
        # HunyuanVideoPipeline passes the scheduler's timestep (sigma * 1000) in float32, and guidance * 1000.
        timestep = s["timesteps"].float() * 1000
        guidance = s["guidance"].float() * 1000 if self.uses_guidance else None
        temb, _ = self.time_text_embed(timestep, s["pooled"].to(latents.dtype), guidance)
        # The patch embedding returns a transposed view; DeepSpeed sends only contiguous tensors.
        hidden = self.x_embedder(latents).contiguous()
        encoder_hidden = self.context_embedder(s["text"].to(latents.dtype), timestep, s["text_mask"])
        grid = torch.tensor(list(latents.shape[2:]), device=latents.device)
        return {"hidden": hidden, "encoder_hidden": encoder_hidden, "text_mask": s["text_mask"], "temb": temb,
                "grid": grid}


class HunyuanBlockLayer(PipelineLayer):
    """One dual-stream or single-stream block. Rotary embeddings and the attention mask are rebuilt
    from integer tensors in every layer: cheap, and no gradient-less float tensor crosses a stage."""

    kind = "block"
    writes = ("hidden", "encoder_hidden")

    def __init__(self, transformer: HunyuanVideoTransformer3DModel, module_name: str):
        super().__init__(HUNYUAN_STREAM, HUNYUAN_STREAM, [module_name])
        self.block = transformer.get_submodule(module_name)
        self.rope = transformer.rope

    def run(self, s):
        hidden = s["hidden"]
        # The rotary embedding reads only the latent's shape and device: an empty stand-in suffices.
        rotary = self.memo("rotary", (s["grid"], hidden.device),
                           lambda: self.rope(hidden.new_empty(0, 0, *s["grid"].tolist())))
        mask = self.memo("mask", (s["text_mask"], hidden.shape[1]),
                         lambda: joint_attention_mask(s["text_mask"], hidden.shape[1]))
        hidden, encoder_hidden = self.block(hidden, s["encoder_hidden"], s["temb"], mask, rotary)
        # A single-stream block returns views into one joint sequence (see the input layer).
        return {**s, "hidden": hidden.contiguous(), "encoder_hidden": encoder_hidden.contiguous()}


# A class per block kind (models/pipeline_layers.PipelineLayer.kind says why).
class HunyuanDoubleBlockLayer(HunyuanBlockLayer):
    """A dual-stream block: video and text tokens with their own weights, joint attention."""


class HunyuanSingleBlockLayer(HunyuanBlockLayer):
    """A single-stream block: video and text tokens concatenated, attention and MLP in parallel."""


class HunyuanFinalLayer(PipelineLayer):
    """Output norm and projection, then the patches back to a (batch, channels, frames, h, w) latent."""

    kind = "output"

    def __init__(self, transformer: HunyuanVideoTransformer3DModel):
        super().__init__(HUNYUAN_STREAM, HUNYUAN_OUTPUT, ["norm_out", "proj_out"])
        self.norm_out = transformer.norm_out
        self.proj_out = transformer.proj_out
        self.patch = transformer.config.patch_size
        self.patch_t = transformer.config.patch_size_t

    def run(self, s):
        hidden = self.proj_out(self.norm_out(s["hidden"], s["temb"]))
        frames, height, width = s["grid"].tolist()
        p, pt = self.patch, self.patch_t
        hidden = hidden.reshape(hidden.shape[0], frames // pt, height // p, width // p, -1, pt, p, p)
        hidden = hidden.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return {"prediction": hidden}


class HunyuanVideoModel(ModelRecipe):
    name = "hunyuan-video"
    config_class = HunyuanVideoConfig
    size_multiple = 16  # 8x VAE, then 2x2 patches
    frame_multiple = 4  # 4x temporal VAE: clips of 4k+1 frames
    transformer_class = HunyuanVideoTransformer3DModel
    vae_class = AutoencoderKLHunyuanVideo
    pipeline_class = HunyuanVideoPipeline
    input_fields = HUNYUAN_INPUTS
    # The Tencent release / ComfyUI layout (the release's own code loads the same keys from a .pt file).
    keymap = HunyuanVideoKeymap
    # Every attention projection and MLP linear of the dual- and single-stream blocks (the token
    # refiner's blocks can be added with adapter.target_modules).
    default_lora_targets = (r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj"
                            r"|add_v_proj|to_add_out)|ff(_context)?\.net\.(0\.proj|2))"
                            r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out))")
    prompt_template = DEFAULT_PROMPT_TEMPLATE["template"]
    # "selective" recomputes the 40 single-stream blocks and keeps the 20 dual-stream blocks'
    # activations: about 2/3 of the block activation memory saved for 2/3 of the recompute of
    # `true` (per token both kinds keep about the same and cost about the same FLOPs).
    selective_checkpoint_layers = ("HunyuanSingleBlockLayer",)
    # Per token (video + text); measured by bench/activation_factors.py (docs/benchmarks.md,
    # "Activation factors").
    activation_factors = {"HunyuanInputLayer": 0.0, "HunyuanDoubleBlockLayer": 25.3,
                          "HunyuanSingleBlockLayer": 24.3, "HunyuanFinalLayer": 1.0}
    full_finetune_activation_factors = {"HunyuanInputLayer": 1.1, "HunyuanDoubleBlockLayer": 28.2,
                                        "HunyuanSingleBlockLayer": 26.2, "HunyuanFinalLayer": 3.0}
    # HunyuanVideoPipeline's: 1280x720, 129 frames, 50 steps, embedded guidance 6.
    sample_defaults = {"width": 1280, "height": 720, "frames": 129, "steps": 50, "guidance": 6.0}
    decode_tiled = True

    # ---------------------------------------------------------------- encoders
    encoder_files = {
        "vae_path": EncoderFile("vae", AutoencoderKLHunyuanVideo, HUNYUAN_VIDEO_VAE),
        "llm_path": EncoderFile("text_encoder", LlamaModel, LLAVA_LLAMA3, LlamaConfig, "tokenizer", AutoTokenizer),
        "clip_path": EncoderFile("text_encoder_2", CLIPTextModel, CLIP_L, CLIPTextConfig, "tokenizer_2", CLIPTokenizer,
                                 folder_model_types=("clip",)),
    }

    def latent_cache_signature(self) -> str:
        return self._config_signature("vae", extra="mode" + self.encoder_files_signature("vae_path"))

    def text_cache_signature(self) -> str:
        return self._config_signature(
            "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2",
            extra=f"llama_len={self.config.max_sequence_length},skip={NUM_HIDDEN_LAYERS_TO_SKIP},"
                  f"template={self.prompt_template!r}" + self.encoder_files_signature("llm_path", "clip_path"))

    def text_encoder_parts(self, device):
        llama_tokenizer, llama = self.encoder_part("llm_path", device)
        # The template crop and the transformer's text mask both expect the prompt's tokens first.
        llama_tokenizer.padding_side = "right"
        clip_tokenizer, clip = self.encoder_part("clip_path", device)
        return llama_tokenizer, llama, clip_tokenizer, clip

    def load_text_encoders(self, device):
        super().load_text_encoders(device)
        self.crop_start = template_crop_start(self.text_encoders[0], self.prompt_template)

    def encode_captions(self, captions):
        llama_tokenizer, llama, clip_tokenizer, clip = self.text_encoders
        crop = self.crop_start
        tokens = llama_tokenizer([self.prompt_template.format(c) for c in captions], padding="max_length",
                                 max_length=self.config.max_sequence_length + crop, truncation=True,
                                 return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        hidden = llama(input_ids=tokens.input_ids.to(self.device), attention_mask=mask,
                       output_hidden_states=True).hidden_states[-(NUM_HIDDEN_LAYERS_TO_SKIP + 1)]
        text, mask = hidden[:, crop:], mask[:, crop:].bool()
        ids = clip_tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        pooled = clip(ids, output_hidden_states=False).pooler_output
        return [{"text": text[i].to(self.dtype), "text_mask": mask[i], "pooled": pooled[i].to(self.dtype)}
                for i in range(len(captions))]

    def encode_pixels(self, pixels):
        latents = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mode()
        # HunyuanVideoPipeline divides by scaling_factor before decoding; no shift.
        latents = latents * self.vae.config.scaling_factor
        return [{"latents": latents[i].to(self.dtype)} for i in range(latents.shape[0])]

    # ---------------------------------------------------------------- inputs
    def image_seq_len(self, latents):
        patch, patch_t = self.patch_sizes
        return (latents.shape[2] // patch_t) * (latents.shape[3] // patch) * (latents.shape[4] // patch)

    def tokens_per_sample(self, width, height, frames):
        # Video and text tokens: the blocks run both (the padded text too), as Flux's.
        patch, patch_t = self.patch_sizes
        video = ((frames - 1) // self.frame_multiple + 1) // patch_t * (height // 8 // patch) * (width // 8 // patch)
        return video + self.config.max_sequence_length

    def model_inputs(self, noisy, timesteps, text):
        # The transformer takes and returns (batch, channels, frames, height, width) latents, so
        # pack_latents stays the identity.
        return {"latents": noisy, "text": text["text"], "text_mask": text["text_mask"].long(),
                "pooled": text["pooled"], "timesteps": timesteps.float(),
                "guidance": torch.full((noisy.shape[0],), float(self.config.guidance))}

    # ---------------------------------------------------------------- sampling
    def sample_latent_shape(self, width, height, frames):
        # HunyuanVideoPipeline.prepare_latents: 4x fewer frames (plus the first), 8x smaller.
        channels = self.transformer_config()["in_channels"]
        return channels, (frames - 1) // self.frame_multiple + 1, height // 8, width // 8

    def sample_noise(self, width, height, frames, seed):
        # HunyuanVideoPipeline draws and steps its latents in float32.
        return super().sample_noise(width, height, frames, seed).float()

    def sample_sigmas(self, steps):
        return np.linspace(1.0, 0.0, steps + 1)[:-1]

    def decode_latents(self, latents):
        latents = latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents, return_dict=False)[0]

    # ---------------------------------------------------------------- transformer
    def layers(self, transformer):
        if transformer.config.image_condition_type is not None:
            raise ConfigError(f"model.diffusers_path: {self.root} is an image-to-video HunyuanVideo "
                              f"(image_condition_type = {transformer.config.image_condition_type!r}); "
                              f"only the text-to-video model is supported")
        layers: list[nn.Module] = [HunyuanInputLayer(transformer)]
        layers += [HunyuanDoubleBlockLayer(transformer, f"transformer_blocks.{i}")
                   for i in range(len(transformer.transformer_blocks))]
        layers += [HunyuanSingleBlockLayer(transformer, f"single_transformer_blocks.{i}")
                   for i in range(len(transformer.single_transformer_blocks))]
        layers.append(HunyuanFinalLayer(transformer))
        return layers

    def reference_forward(self, transformer, inputs):
        # As HunyuanVideoPipeline: the timestep sigma * 1000 and the guidance * 1000, in float32.
        guidance = inputs["guidance"] * 1000 if transformer.config.guidance_embeds else None
        return transformer(hidden_states=inputs["latents"], timestep=inputs["timesteps"] * 1000,
                           encoder_hidden_states=inputs["text"], encoder_attention_mask=inputs["text_mask"],
                           pooled_projections=inputs["pooled"], guidance=guidance, return_dict=False)[0]
