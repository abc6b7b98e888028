"""FLUX.2 [dev]: Mistral Small 3.1 text encoder (three hidden states stacked), 32-channel VAE whose
latents are patchified 2x2 and batch-normalised, and a double/single-stream transformer whose
blocks share three modulations computed once from the timestep and guidance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from transformers import AutoTokenizer, Mistral3ForConditionalGeneration
from torch import nn

from config.schema import check, key
from config.train_config import ModelConfig
from models.base import ModelRecipe
from models.keymaps.flux2 import Flux2Keymap
from models.pipeline_layers import PipelineFields, PipelineLayer

# The text encoder's hidden states that Flux2Pipeline stacks into the text features (its
# `text_encoder_out_layers` default): outputs of layers 10, 20 and 30 of Mistral Small 3.1's 40.
TEXT_ENCODER_LAYERS = (10, 20, 30)


@dataclass
class Flux2Config(ModelConfig):
    guidance: float = 1.0
    max_sequence_length: int = 512

    def validate(self, file, prefix):
        super().validate(file, prefix)
        check(self.max_sequence_length >= 1, file, key(prefix, "max_sequence_length"), "must be at least 1")


# What the data loader hands the first layer, and what flows between the blocks: the image and
# text streams, the timestep embedding (for the final norm) and the three shared modulations.
FLUX2_INPUTS = PipelineFields("latents", "text", "timesteps", "guidance", "img_ids", "txt_ids")
FLUX2_STREAM = PipelineFields("hidden", "encoder_hidden", "temb", "mod_img", "mod_txt", "mod_single",
                              "img_ids", "txt_ids")
FLUX2_OUTPUT = PipelineFields("prediction")


class Flux2InputLayer(PipelineLayer):
    """Timestep/guidance embedding, the three modulations every block shares, and the image and
    text input projections: what Flux2Transformer2DModel.forward does before its first block."""

    kind = "input"
    MODULES = ["time_guidance_embed", "double_stream_modulation_img", "double_stream_modulation_txt",
               "single_stream_modulation", "x_embedder", "context_embedder"]

    def __init__(self, transformer: Flux2Transformer2DModel):
        super().__init__(FLUX2_INPUTS, FLUX2_STREAM, self.MODULES)
        for name in self.MODULES:
            setattr(self, name, transformer.get_submodule(name))
        self.uses_guidance = transformer.config.guidance_embeds

    def run(self, s):
        latents = s["latents"]
        timestep = s["timesteps"].to(latents.dtype) * 1000
        guidance = s["guidance"].to(latents.dtype) * 1000 if self.uses_guidance else None
        temb = self.time_guidance_embed(timestep, guidance)
        return {"hidden": self.x_embedder(latents), "encoder_hidden": self.context_embedder(s["text"].to(latents.dtype)),
                "temb": temb, "mod_img": self.double_stream_modulation_img(temb),
                "mod_txt": self.double_stream_modulation_txt(temb), "mod_single": self.single_stream_modulation(temb),
                "img_ids": s["img_ids"], "txt_ids": s["txt_ids"]}


class Flux2BlockLayer(PipelineLayer):
    """One transformer block. Rotary embeddings are recomputed from the integer ids in every
    layer (text, then image, as the forward concatenates them): cheap, and no gradient-less float
    tensor crosses a stage."""

    kind = "block"
    writes = ("hidden", "encoder_hidden")

    def __init__(self, transformer: Flux2Transformer2DModel, module_name: str):
        super().__init__(FLUX2_STREAM, FLUX2_STREAM, [module_name])
        self.block = transformer.get_submodule(module_name)
        self.pos_embed = transformer.pos_embed

    def rotary(self, s):
        def compute():
            image, text = self.pos_embed(s["img_ids"]), self.pos_embed(s["txt_ids"])
            return torch.cat([text[0], image[0]], dim=0), torch.cat([text[1], image[1]], dim=0)

        return self.memo("rotary", (s["txt_ids"], s["img_ids"]), compute)


# A class per block kind (models/pipeline_layers.PipelineLayer.kind says why).
class Flux2DoubleBlockLayer(Flux2BlockLayer):
    """A double-stream block: image and text tokens with their own weights, joint attention."""

    def run(self, s):
        encoder_hidden, hidden = self.block(hidden_states=s["hidden"], encoder_hidden_states=s["encoder_hidden"],
                                            temb_mod_img=s["mod_img"], temb_mod_txt=s["mod_txt"],
                                            image_rotary_emb=self.rotary(s))
        return {**s, "hidden": hidden, "encoder_hidden": encoder_hidden}


class Flux2SingleBlockLayer(Flux2BlockLayer):
    """A single-stream block on text and image tokens together (attention and MLP in parallel).
    The streams are joined and split again around each block (the forward joins them once):
    the same values, and every stage boundary carries the same two fields."""

    def run(self, s):
        encoder_hidden, hidden = self.block(hidden_states=s["hidden"], encoder_hidden_states=s["encoder_hidden"],
                                            temb_mod=s["mod_single"], image_rotary_emb=self.rotary(s),
                                            split_hidden_states=True)
        return {**s, "hidden": hidden.contiguous(), "encoder_hidden": encoder_hidden.contiguous()}


class Flux2FinalLayer(PipelineLayer):
    kind = "output"

    def __init__(self, transformer: Flux2Transformer2DModel):
        super().__init__(FLUX2_STREAM, FLUX2_OUTPUT, ["norm_out", "proj_out"])
        self.norm_out = transformer.norm_out
        self.proj_out = transformer.proj_out

    def run(self, s):
        return {"prediction": self.proj_out(self.norm_out(s["hidden"], s["temb"]))}


class Flux2Model(ModelRecipe):
    name = "flux2"
    config_class = Flux2Config
    size_multiple = 16  # 8x VAE, then 2x2 patches
    transformer_class = Flux2Transformer2DModel
    vae_class = AutoencoderKLFlux2
    pipeline_class = Flux2Pipeline
    input_fields = FLUX2_INPUTS
    keymap = Flux2Keymap  # the BFL release / ComfyUI layout (flux2-dev.safetensors)
    # Every attention projection and MLP linear of the double blocks, and the single blocks' fused
    # (q, k, v, MLP in) and (attention out, MLP out) projections.
    default_lora_targets = (r"single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
                            r"|transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj"
                            r"|add_v_proj|to_add_out)|ff(_context)?\.linear_(in|out))")

    # "selective" recomputes the 48 single-stream blocks and keeps the 8 double-stream blocks'.
    selective_checkpoint_layers = ("Flux2SingleBlockLayer",)
    # Per token (image + text), by bench/activation_factors.py at width 512 (4 heads of 128), 2
    # blocks of each kind, 256x256 with 32 text tokens, bf16 autocast; LoRA rank 4 (float32
    # adapter weights). tests/test_memory.py re-measures them.
    activation_factors = {"Flux2InputLayer": 0.0, "Flux2DoubleBlockLayer": 25.1, "Flux2SingleBlockLayer": 26.1,
                          "Flux2FinalLayer": 1.0}
    full_finetune_activation_factors = {"Flux2InputLayer": 3.6, "Flux2DoubleBlockLayer": 33.1,
                                        "Flux2SingleBlockLayer": 32.1, "Flux2FinalLayer": 2.8}
    # Flux2Pipeline's: 1024x1024 (its default sample size), 50 steps, embedded guidance 4.
    sample_defaults = {"width": 1024, "height": 1024, "frames": 1, "steps": 50, "guidance": 4.0}

    # ---------------------------------------------------------------- encoders
    def text_cache_signature(self) -> str:
        return self._config_signature("tokenizer", "text_encoder", extra=f"len={self.config.max_sequence_length} "
                                      f"layers={TEXT_ENCODER_LAYERS} system={SYSTEM_MESSAGE}")

    def text_encoder_parts(self, device):
        # The tokenizer alone (not the release's PixtralProcessor, which needs torchvision for
        # images): the pipeline's text-only chat template is the tokenizer's.
        tokenizer = AutoTokenizer.from_pretrained(self.root / "tokenizer")
        encoder = Mistral3ForConditionalGeneration.from_pretrained(self.root / "text_encoder", torch_dtype=self.dtype)
        return tokenizer, encoder.to(device).eval()

    def encode_captions(self, captions):
        tokenizer, encoder = self.text_encoders
        text = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            encoder, tokenizer, captions, dtype=self.dtype, device=self.device,
            max_sequence_length=self.config.max_sequence_length, system_message=SYSTEM_MESSAGE,
            hidden_states_layers=TEXT_ENCODER_LAYERS)
        return [{"text": text[i]} for i in range(len(captions))]

    def encode_pixels(self, pixels):
        pixels = pixels.squeeze(2).to(self.device, self.vae.dtype)  # an image model: one frame
        latents = Flux2Pipeline._patchify_latents(self.vae.encode(pixels).latent_dist.mode())
        mean, std = self._latent_statistics(latents)
        latents = (latents - mean) / std
        return [{"latents": latents[i].to(self.dtype)} for i in range(latents.shape[0])]

    def _latent_statistics(self, latents):
        # Flux2Pipeline's normalisation of the patchified latents: the VAE's batch-norm statistics.
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(latents.device,
                                                                                                latents.dtype)
        return mean, std

    # ---------------------------------------------------------------- inputs
    def pack_latents(self, latents):
        return Flux2Pipeline._pack_latents(latents)

    def image_seq_len(self, latents):
        return latents.shape[-2] * latents.shape[-1]

    def tokens_per_sample(self, width, height, frames):
        return (width // 16) * (height // 16) + self.config.max_sequence_length

    def model_inputs(self, noisy, timesteps, text):
        b = noisy.shape[0]
        # The pipeline's position ids (time, row, column, text index), one set for the batch.
        img_ids = Flux2Pipeline._prepare_latent_ids(noisy[:1])[0]
        txt_ids = Flux2Pipeline._prepare_text_ids(text["text"][:1])[0]
        return {"latents": self.pack_latents(noisy), "text": text["text"], "timesteps": timesteps.float(),
                "guidance": torch.full((b,), float(self.config.guidance)), "img_ids": img_ids, "txt_ids": txt_ids}

    # ---------------------------------------------------------------- sampling
    def sample_latent_shape(self, width, height, frames):
        # Flux2Pipeline.prepare_latents: the patchified channels at 1/16 size.
        return self.transformer_config()["in_channels"], height // 16, width // 16

    def sample_scheduler(self, steps, latents):
        # Flux2Pipeline's shift: an empirical mu from the token count and the number of steps.
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(self.root / "scheduler")
        mu = compute_empirical_mu(image_seq_len=self.image_seq_len(latents), num_steps=steps)
        timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=self.sample_sigmas(steps), mu=mu)
        scheduler.set_begin_index(0)
        return scheduler, timesteps

    def unpack_latents(self, packed, shape):
        return packed.permute(0, 2, 1).reshape(shape)

    def decode_latents(self, latents):
        latents = latents.to(self.device, self.vae.dtype)
        mean, std = self._latent_statistics(latents)
        latents = Flux2Pipeline._unpatchify_latents(latents * std + mean)
        return self.vae.decode(latents, return_dict=False)[0].unsqueeze(2)

    # ---------------------------------------------------------------- transformer
    def layers(self, transformer):
        layers: list[nn.Module] = [Flux2InputLayer(transformer)]
        layers += [Flux2DoubleBlockLayer(transformer, f"transformer_blocks.{i}")
                   for i in range(len(transformer.transformer_blocks))]
        layers += [Flux2SingleBlockLayer(transformer, f"single_transformer_blocks.{i}")
                   for i in range(len(transformer.single_transformer_blocks))]
        layers.append(Flux2FinalLayer(transformer))
        return layers

    def reference_forward(self, transformer, inputs):
        # Flux2Pipeline passes sigma as the timestep and the guidance scale; the forward scales both by 1000.
        guidance = inputs["guidance"] if transformer.config.guidance_embeds else None
        return transformer(hidden_states=inputs["latents"], encoder_hidden_states=inputs["text"],
                           timestep=inputs["timesteps"], guidance=guidance, img_ids=inputs["img_ids"],
                           txt_ids=inputs["txt_ids"], return_dict=False)[0]
