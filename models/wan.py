"""Wan 2.1 / 2.2 text-to-video: UMT5 text encoder, Wan video VAE, one stream of blocks with
self-attention, cross-attention to the text and a feed-forward, all modulated by the timestep.

Preprocessing follows diffusers' WanPipeline: the caption is cleaned (`prompt_clean`), UMT5
encodes up to max_sequence_length tokens with their mask, the embeddings past each caption's
length are zeroed (the transformer takes no text mask: it attends to the zero padding too);
latents are normalised per channel with the VAE config's latents_mean / latents_std; the
transformer gets the timestep as sigma * 1000 and predicts the flow-matching velocity
noise - data (the scheduler's "flow_prediction").

Variants, from the model folder's configs: Wan 2.1 T2V (14B, 1.3B); Wan 2.2 TI2V-5B (a 48-channel
VAE that patchifies 2x2 first: sizes are multiples of 32; the pipeline's per-token timesteps,
`expand_timesteps`, are all the same number in text-to-video, so the layers take one per sample);
Wan 2.2 A14B (two experts: `transformer/` denoises timesteps >= boundary_ratio * 1000, and
`transformer_2/` those below): `model.expert` picks the one to train, on its timesteps only; both
experts are two runs (examples/wan.toml says why not one).

Image-to-video, as WanImageToVideoPipeline conditions on a clip's first frame, in two forms:
- "first_frame" (Wan 2.2 TI2V-5B with `model.image_to_video = true`): the first latent frame is
  the clean latent of the first frame, its tokens get timestep 0 (per-token timesteps), and the
  loss leaves it out. The VAE is causal in time, so the cached clip's first latent frame is
  exactly the VAE encoding of the first frame alone: nothing more is cached.
- "channels" (Wan 2.1 I2V, Wan 2.2 I2V A14B: in_channels = out_channels + 4 + latent channels):
  the VAE encoding of the first frame followed by zero frames is cached with the clip; the
  transformer takes the noisy latents, a 4-channel mask of the conditioning frames and that
  latent, stacked over channels. With an image encoder (Wan 2.1 I2V: `image_dim` set) the CLIP
  vision embedding of the first frame (its second-last hidden state) is cached too and goes in as
  `encoder_hidden_states_image`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, Optional

import diffusers
import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from torch import nn
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

from config.schema import check, key
from config.train_config import ModelConfig
from models.base import ModelRecipe
from models.keymaps.wan import WanKeymap
from models.pipeline_layers import PipelineFields, PipelineLayer
from utils.errors import ConfigError

EXPERT_FOLDERS = {"high_noise": "transformer", "low_noise": "transformer_2"}


@dataclass
class WanConfig(ModelConfig):
    """Training samples timesteps with the base defaults (logit-normal, no shift): the release's
    flow_shift (3 at 480p, 5 at 720p) is an inference schedule. Set `shift` to train with it."""

    max_sequence_length: int = 512
    # Wan 2.2 A14B: the expert to train, "high_noise" (transformer/) or "low_noise" (transformer_2/).
    expert: Optional[Literal["high_noise", "low_noise"]] = None
    # Condition on each clip's first frame. Not set: on for image-to-video transformers (conditioning
    # channels), off otherwise; Wan 2.2 TI2V-5B takes either.
    image_to_video: Optional[bool] = None

    def validate(self, file, prefix):
        super().validate(file, prefix)
        check(self.max_sequence_length >= 1, file, key(prefix, "max_sequence_length"), "must be at least 1")
        if self.expert is not None:
            for name in ("min_timestep", "max_timestep"):
                check(getattr(self, name) == (0.0 if name == "min_timestep" else 1.0), file, key(prefix, name),
                      f"is set by model.expert = '{self.expert}' (the expert's timesteps): leave it out")


# What the data loader hands the first layer, and what flows between the blocks. The latent grid
# size is int64: it carries no gradient across a stage boundary.
WAN_INPUTS = PipelineFields("latents", "text", "timesteps")
# Wan 2.1 I2V: the CLIP vision embedding of the first frame as well.
WAN_IMAGE_INPUTS = PipelineFields("latents", "text", "timesteps", "image")
WAN_STREAM = PipelineFields("hidden", "encoder_hidden", "temb", "timestep_proj", "grid")
WAN_OUTPUT = PipelineFields("prediction")


class WanInputLayer(PipelineLayer):
    """Patch embedding; timestep embedding (and its projection to the blocks' six modulations);
    text projection."""

    kind = "input"

    def __init__(self, transformer: WanTransformer3DModel, fields: PipelineFields = WAN_INPUTS):
        super().__init__(fields, WAN_STREAM, ["patch_embedding", "condition_embedder"])
        self.patch_embedding = transformer.patch_embedding
        self.condition_embedder = transformer.condition_embedder

    def run(self, s):
        latents = s["latents"]
        grid = torch.tensor(list(latents.shape[2:]), device=latents.device)
        hidden = self.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()
        # WanPipeline passes the scheduler's timestep (sigma * 1000); the text in the transformer's
        # dtype. Timesteps per token (image-to-video on TI2V-5B) give per-token modulations.
        timesteps = s["timesteps"].float() * 1000
        per_token = timesteps.shape[1] if timesteps.dim() == 2 else None
        image = s["image"].to(hidden.dtype) if "image" in s else None
        temb, timestep_proj, encoder_hidden, image_hidden = self.condition_embedder(
            timesteps.flatten(), s["text"].to(hidden.dtype), image, timestep_seq_len=per_token)
        if image_hidden is not None:
            encoder_hidden = torch.cat([image_hidden, encoder_hidden], dim=1)
        timestep_proj = timestep_proj.unflatten(-1, (6, -1))
        return {"hidden": hidden, "encoder_hidden": encoder_hidden, "temb": temb,
                "timestep_proj": timestep_proj, "grid": grid}


class WanBlockLayer(PipelineLayer):
    """One transformer block. The rotary embedding is rebuilt from the integer latent grid in every
    layer: cheap, and no gradient-less float tensor crosses a stage."""

    kind = "block"

    writes = ("hidden",)

    def __init__(self, transformer: WanTransformer3DModel, index: int):
        super().__init__(WAN_STREAM, WAN_STREAM, [f"blocks.{index}"])
        self.block = transformer.blocks[index]
        self.rope = transformer.rope

    def run(self, s):
        hidden = s["hidden"]

        def rotary():
            # The rotary embedding reads only the latent's shape; its tables are buffers, which no
            # layer loads: they are moved to the hidden state's device here.
            cos, sin = self.rope(hidden.new_empty(0, 0, *s["grid"].tolist()))
            return cos.to(hidden.device), sin.to(hidden.device)

        hidden = self.block(hidden, s["encoder_hidden"], s["timestep_proj"],
                            self.memo("rotary", (s["grid"], hidden.device), rotary))
        return {**s, "hidden": hidden}


class WanFinalLayer(PipelineLayer):
    """Output norm modulated by the timestep, projection, then the patches back to a (batch,
    channels, frames, height, width) latent."""

    kind = "output"

    def __init__(self, transformer: WanTransformer3DModel):
        super().__init__(WAN_STREAM, WAN_OUTPUT, ["scale_shift_table", "norm_out", "proj_out"])
        self.norm_out = transformer.norm_out
        self.proj_out = transformer.proj_out
        self.patch = tuple(transformer.config.patch_size)
        # scale_shift_table is a parameter of the transformer itself: registered as this layer's.
        self.bind_root_parameters(transformer)

    def run(self, s):
        hidden = s["hidden"]
        temb = s["temb"]
        if temb.dim() == 3:  # per token: (batch, tokens, width)
            shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (self.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = self.proj_out(hidden)
        frames, height, width = s["grid"].tolist()
        pt, ph, pw = self.patch
        hidden = hidden.reshape(hidden.shape[0], frames // pt, height // ph, width // pw, pt, ph, pw, -1)
        hidden = hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return {"prediction": hidden}


class WanModel(ModelRecipe):
    name = "wan"
    config_class = WanConfig
    # 8x VAE, then 2x2 patches (Wan 2.2 TI2V-5B: 16x VAE, so 32; set per model folder in __init__).
    size_multiple = 16
    frame_multiple = 4  # 4x temporal VAE: clips of 4k+1 frames
    transformer_class = WanTransformer3DModel
    vae_class = AutoencoderKLWan
    pipeline_class = WanPipeline
    input_fields = WAN_INPUTS
    # The Wan-AI release / ComfyUI names, renames only (ComfyUI's diffusion model loader, diffusers'
    # from_single_file and model.transformer_path read the saved original-layout file; ComfyUI and
    # WanPipeline.load_lora_weights read lora_comfyui.safetensors).
    keymap = WanKeymap
    # Self- and cross-attention projections and the feed-forward linears of every block.
    default_lora_targets = r"blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.(0\.proj|2))"
    # No "selective" checkpointing: the blocks are all of one kind.
    # Per video token (the text's cross-attention keys and values are in the factor), by
    # bench/activation_factors.py: saved_tensors_hooks on the layers as the trainer sets them up,
    # bf16 autocast, the release's width (5120) with 2 blocks at 832x480x9 (4680 video tokens) and
    # 512 text tokens; the same within 1% at width 512 and 768 tokens. LoRA (rank 32, float32
    # adapter weights, the second block); full fine-tuning keeps 49% more. Not yet checked against
    # a GPU run's peak.
    activation_factors = {"WanInputLayer": 0.0, "WanBlockLayer": 27.0, "WanFinalLayer": 2.0}
    full_finetune_activation_factors = {"WanInputLayer": 0.3, "WanBlockLayer": 40.1, "WanFinalLayer": 5.0}
    # WanPipeline's: 832x480, 81 frames, 50 steps, classifier-free guidance 5 on a negative prompt.
    sample_defaults = {"width": 832, "height": 480, "frames": 81, "steps": 50, "guidance": 5.0}
    sample_guidance = "classifier_free"
    decode_tiled = True

    def __init__(self, config: WanConfig):
        super().__init__(config)
        index = self.root / "model_index.json"
        pipeline = json.loads(index.read_text()) if index.is_file() else {}
        self.boundary_ratio = pipeline.get("boundary_ratio")
        self.expand_timesteps = bool(pipeline.get("expand_timesteps", False))
        two_experts = self.boundary_ratio is not None and (self.root / "transformer_2").is_dir()
        if config.expert is not None and not two_experts:
            raise ConfigError(f"model.expert: {self.root} holds one transformer (no transformer_2/ with a "
                              f"boundary_ratio in model_index.json): leave model.expert out")
        if config.expert is None and two_experts:
            raise ConfigError(f"model.expert: {self.root} holds two experts (transformer/ for high noise, "
                              f"transformer_2/ for low noise, boundary_ratio {self.boundary_ratio}): set "
                              f"model.expert = 'high_noise' or 'low_noise'")
        if config.expert is not None:
            # The pipeline hands timesteps t >= boundary_ratio * 1000 to the high-noise expert.
            low, high = ((self.boundary_ratio, 1.0) if config.expert == "high_noise" else (0.0, self.boundary_ratio))
            self.config = dataclasses.replace(config, min_timestep=low, max_timestep=high)
        vae_config = self.root / "vae" / "config.json"
        if vae_config.is_file():
            # Tokens are 2x2 patches of latents scale_factor_spatial times smaller than the pixels.
            self.size_multiple = 2 * json.loads(vae_config.read_text()).get("scale_factor_spatial", 8)
        self.image_to_video = self._image_to_video_mode(config.image_to_video)
        if self.image_to_video == "first_frame":
            # Per-token timesteps make the blocks keep per-token float32 modulations (6 x width, and
            # two scales) instead of one per sample: by bench/activation_factors.py's hooks on a
            # TI2V-5B-shaped transformer (8 heads of 128, 832x480x17), 16 more per token in each
            # block in both modes, 1 more in the final layer, 4.2 more in the input layer (full).
            self.activation_factors = {**self.activation_factors, "WanBlockLayer": 27.0 + 16.0, "WanFinalLayer": 3.0}
            self.full_finetune_activation_factors = {"WanInputLayer": 0.3 + 4.2, "WanBlockLayer": 40.1 + 16.0,
                                                     "WanFinalLayer": 6.0}
        self.image_encoder = None  # CLIP vision model and its image processor, while caching
        if self.image_to_video == "channels" and self.transformer_config().get("image_dim") is not None:
            self.input_fields = WAN_IMAGE_INPUTS
            for sub in ("image_encoder", "image_processor"):
                if not (self.root / sub).is_dir():
                    raise ConfigError(f"model.diffusers_path: {self.root} has no {sub}/, which its image-to-video "
                                      f"transformer (image_dim set) needs for the first frame's CLIP embedding")

    def _image_to_video_mode(self, wanted: Optional[bool]) -> Optional[str]:
        """None (text-to-video), "first_frame" or "channels" (see the module docstring), from the
        transformer's config and `model.image_to_video`."""
        if not (self.transformer_folder() / "config.json").is_file():
            return None  # no model there: build_empty_transformer says so
        cfg = self.transformer_config()
        folder = self.transformer_folder()
        if cfg.get("pos_embed_seq_len") is not None:
            raise ConfigError(f"model.diffusers_path: {folder} is a first-last-frame Wan transformer "
                              f"(pos_embed_seq_len set): not supported; first-frame image-to-video is")
        if cfg["in_channels"] != cfg["out_channels"]:
            if wanted is False:
                raise ConfigError(f"model.image_to_video: {folder} is an image-to-video transformer (in_channels "
                                  f"{cfg['in_channels']}: latents, mask and condition); leave it out or set it true")
            return "channels"
        if wanted and not self.expand_timesteps:
            raise ConfigError(f"model.image_to_video: {folder} is a text-to-video transformer, which takes no "
                              f"image condition (Wan 2.2 TI2V-5B and the I2V models do); leave it out")
        return "first_frame" if wanted else None

    # ---------------------------------------------------------------- encoders
    def text_cache_signature(self) -> str:
        return self._config_signature("tokenizer", "text_encoder",
                                      extra=f"umt5_len={self.config.max_sequence_length},zero_padded")

    def text_encoder_parts(self, device):
        return (
            AutoTokenizer.from_pretrained(self.root / "tokenizer"),
            UMT5EncoderModel.from_pretrained(self.root / "text_encoder", torch_dtype=self.dtype).to(device).eval(),
        )

    def encode_captions(self, captions):
        tokenizer, umt5 = self.text_encoders
        tokens = tokenizer([prompt_clean(c) for c in captions], padding="max_length",
                           max_length=self.config.max_sequence_length, truncation=True, add_special_tokens=True,
                           return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        hidden = umt5(tokens.input_ids.to(self.device), mask).last_hidden_state.to(self.dtype)
        # As WanPipeline: each caption's embeddings, then zeros up to max_sequence_length.
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [{"text": torch.cat([hidden[i, :n], hidden.new_zeros(hidden.shape[1] - n, hidden.shape[2])])}
                for i, n in enumerate(lengths)]

    def _latent_stats(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents_mean, 1 / latents_std) of the VAE config, shaped and typed as WanPipeline makes them."""
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        return mean, inv_std

    def latent_cache_signature(self) -> str:
        # Image-to-video entries hold the condition latent (and the CLIP embedding) as well.
        if self.image_to_video != "channels":
            return super().latent_cache_signature()
        return self._config_signature("vae", "image_encoder", "image_processor", extra="mode,first_frame_condition")

    def load_vae(self, device):
        super().load_vae(device)
        if self.input_fields is WAN_IMAGE_INPUTS:
            self.image_encoder = (
                CLIPImageProcessor.from_pretrained(self.root / "image_processor"),
                CLIPVisionModel.from_pretrained(self.root / "image_encoder", torch_dtype=self.dtype).to(device).eval())

    def free_encoders(self):
        self.image_encoder = None
        super().free_encoders()

    def _encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mode()
        # As WanImageToVideoPipeline encodes its condition frames (the inverse of the decode).
        mean, inv_std = self._latent_stats(latents)
        return ((latents - mean) * inv_std).to(self.dtype)

    def encode_pixels(self, pixels):
        frames = pixels.shape[2]
        if (frames - 1) % self.frame_multiple:
            raise ValueError(f"Wan encodes clips of 4k+1 frames, got {frames}")
        latents = self._encode_latents(pixels)
        items = [{"latents": latents[i]} for i in range(latents.shape[0])]
        first = pixels[:, :, :1]
        if self.image_to_video == "channels":
            # WanImageToVideoPipeline.prepare_latents: the first frame, then zero frames, encoded.
            condition = self._encode_latents(torch.cat([first, first.new_zeros(
                first.shape[0], first.shape[1], frames - 1, *first.shape[3:])], dim=2))
            for item, c in zip(items, condition):
                item["condition"] = c
        if self.image_encoder is not None:
            # WanImageToVideoPipeline.encode_image on the first frame as the 8-bit image it was.
            processor, encoder = self.image_encoder
            images = list(((first[:, :, 0].float() + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1)
                          .to(torch.uint8).cpu().numpy())
            values = processor(images=images, return_tensors="pt").pixel_values.to(self.device, encoder.dtype)
            embeds = encoder(pixel_values=values, output_hidden_states=True).hidden_states[-2].to(self.dtype)
            for item, e in zip(items, embeds):
                item["image"] = e
        return items

    # ---------------------------------------------------------------- inputs
    @cached_property
    def _patch(self) -> tuple[int, int, int]:
        return tuple(self.transformer_config()["patch_size"])

    @cached_property
    def _vae_scale(self) -> int:
        return json.loads((self.root / "vae" / "config.json").read_text()).get("scale_factor_spatial", 8)

    def image_seq_len(self, latents):
        pt, ph, pw = self._patch
        return (latents.shape[2] // pt) * (latents.shape[3] // ph) * (latents.shape[4] // pw)

    def tokens_per_sample(self, width, height, frames):
        # Video tokens only: the text's (max_sequence_length) enter the blocks only as the
        # cross-attention's keys and values, which activation factors would count per video token.
        pt, ph, pw = self._patch
        scale = self._vae_scale
        return ((frames - 1) // self.frame_multiple + 1) // pt * (height // scale // ph) * (width // scale // pw)

    def model_inputs(self, noisy, timesteps, text):
        # The transformer takes and returns (batch, channels, frames, height, width) latents, so
        # pack_latents stays the identity.
        return {"latents": noisy, "text": text["text"], "timesteps": timesteps.float()}

    def condition_inputs(self, inputs, latents, conditions):
        if self.image_to_video == "channels":
            # WanImageToVideoPipeline: the noisy latents, then the mask (1 over the first frame's 4
            # temporal VAE slots, which the first latent frame holds), then the condition latent.
            mask = torch.zeros_like(latents[:, :4])
            mask[:, :, 0] = 1
            condition = conditions["condition"]
            inputs = {**inputs, "latents": torch.cat([inputs["latents"], mask.to(condition.dtype), condition], dim=1)}
            if "image" in conditions:
                inputs["image"] = conditions["image"]
            return inputs, None
        if self.image_to_video != "first_frame" or latents.shape[2] == 1:
            return inputs, None  # text-to-video; in an image-to-video run, images train as text-to-image
        # WanImageToVideoPipeline with expand_timesteps: the clean first latent frame in place of
        # the noisy one, and timestep 0 for its tokens (one per 2x2 patch).
        noisy = inputs["latents"].clone()
        noisy[:, :, :1] = latents[:, :, :1].to(noisy.dtype)
        frames, height, width = latents.shape[2:]
        per_frame = (height // self._patch[1]) * (width // self._patch[2])
        timesteps = inputs["timesteps"][:, None].repeat(1, frames * per_frame)
        timesteps[:, :per_frame] = 0
        # The loss is the mean over the generated frames: weight 0 on the conditioning frame, and
        # frames / (frames - 1) on the others, as the loss averages over all the elements.
        weights = torch.full((1, 1, frames, 1, 1), frames / (frames - 1))
        weights[:, :, 0] = 0
        return {**inputs, "latents": noisy, "timesteps": timesteps}, weights

    # ---------------------------------------------------------------- sampling
    def sampling_unsupported(self):
        if self.image_to_video:
            return ("image-to-video sampling (WanImageToVideoPipeline: an image per prompt) is not supported yet; "
                    "sample the saved LoRA or model with diffusers' WanImageToVideoPipeline")
        return None

    def sample_latent_shape(self, width, height, frames):
        # WanPipeline.prepare_latents: 4x fewer frames (plus the first), scale_factor_spatial smaller.
        channels = self.transformer_config()["out_channels"]
        return channels, (frames - 1) // self.frame_multiple + 1, height // self._vae_scale, width // self._vae_scale

    def sample_noise(self, width, height, frames, seed):
        # WanPipeline draws and steps its latents in float32.
        return super().sample_noise(width, height, frames, seed).float()

    def sample_scheduler(self, steps, latents):
        # The folder's scheduler (UniPC on shifted flow-matching sigmas in the release), set up as
        # WanPipeline sets it: its own timesteps for `steps`, no shift from the token count.
        folder = self.root / "scheduler"
        name = json.loads((folder / "scheduler_config.json").read_text())["_class_name"]
        scheduler = getattr(diffusers, name).from_pretrained(folder)
        scheduler.set_timesteps(steps, device="cpu")
        scheduler.set_begin_index(0)
        return scheduler, scheduler.timesteps

    def decode_latents(self, latents):
        latents = latents.to(self.device, self.vae.dtype)
        mean, inv_std = self._latent_stats(latents)
        return self.vae.decode(latents / inv_std + mean, return_dict=False)[0]

    # ---------------------------------------------------------------- transformer
    def transformer_folder(self):
        if self.transformer_dir is not None:
            return self.transformer_dir
        return self.root / EXPERT_FOLDERS[self.config.expert or "high_noise"]

    def layers(self, transformer):
        layers: list[nn.Module] = [WanInputLayer(transformer, self.input_fields)]
        layers += [WanBlockLayer(transformer, i) for i in range(len(transformer.blocks))]
        layers.append(WanFinalLayer(transformer))
        return layers

    def reference_forward(self, transformer, inputs):
        # As WanPipeline: the timestep sigma * 1000; with expand_timesteps (Wan 2.2 TI2V-5B) one per
        # video token (the latent grid after 2x2 patches), all equal in text-to-video.
        # Image-to-video: per-token timesteps as they are (0 on the first frame), the image embedding.
        latents = inputs["latents"]
        timestep = inputs["timesteps"] * 1000
        if self.expand_timesteps and timestep.dim() == 1:
            tokens = latents.shape[2] * (latents.shape[3] // 2) * (latents.shape[4] // 2)
            timestep = timestep[:, None].expand(-1, tokens)
        return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=inputs["text"],
                           encoder_hidden_states_image=inputs.get("image"), return_dict=False)[0]
