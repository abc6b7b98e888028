"""Each model's sampling pieces (models/*.py `sample_*`, utils/sampling.Sampler) against its own
diffusers pipeline, in one process: the Sampler's loop driving the model's pipeline layers (with
a LoRA) in place of the DeepSpeed engine, beside the pipeline with that LoRA saved and loaded.
The DeepSpeed path itself is tests/test_sampling.py."""

from __future__ import annotations

import pytest
import torch

from make_tiny_models import make_tiny_flux, make_tiny_hunyuan_video, make_tiny_ltx_video
from test_video_models import engine_like_transformer, make_model
from utils.config import AdapterConfig, SampleRequest
from utils.sampling import Sampler, sample_prompts, to_uint8

MAKERS = {"flux": make_tiny_flux, "ltx-video": make_tiny_ltx_video, "hunyuan-video": make_tiny_hunyuan_video}
SHAPES = {"flux": (96, 48, 1), "ltx-video": (64, 96, 9), "hunyuan-video": (48, 32, 5)}


class LayersEngine:
    """What Sampler needs of DeepSpeed's PipelineEngine: one stage, one replica, eval_batch
    running the layers in order on each micro-batch."""

    num_stages, stage_id = 1, 0

    def __init__(self, layers):
        self.layers = layers

        class Grid:
            get_data_parallel_rank = staticmethod(lambda: 0)
            get_data_parallel_world_size = staticmethod(lambda: 1)

        self.grid = Grid()

    def eval_batch(self, batches, num_micro_batches, **_):
        outputs = []
        with torch.no_grad():
            for inputs, _labels in batches:
                x = inputs
                for layer in self.layers:
                    x = layer(x)
                outputs.append(x)
        assert len(outputs) == num_micro_batches
        return outputs


class Texts:
    """CacheReader.prompt_text, from the model's encoders directly."""

    def __init__(self, model, prompts):
        model.load_text_encoders(torch.device("cpu"))
        with torch.no_grad():
            self.embedded = dict(zip(prompts, model.encode_captions(prompts)))
        model.free_encoders()

    def prompt_text(self, prompt):
        return self.embedded[prompt]


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_samples_equal_the_pipeline_with_our_lora(tmp_path, name):
    root = tmp_path / "models"
    MAKERS[name](root)
    model = make_model(name, root, max_sequence_length=32)
    adapter = AdapterConfig(rank=4, alpha=8.0)
    transformer, layers = engine_like_transformer(model, adapter)
    model.save_lora(model.lora_state_dict(transformer), adapter, tmp_path / "lora", torch.float32)

    width, height, frames = SHAPES[name]
    guidance = 2.5 if model.sample_guidance == "classifier_free" else 4.0
    request = SampleRequest(index=0, prompt="a red circle", seed=3, width=width, height=height, frames=frames,
                            steps=3, guidance=guidance, negative_prompt="blurry")
    texts = Texts(model, sample_prompts([request], model))
    sampler = Sampler(model, LayersEngine(layers), [request], texts, tmp_path / "samples", 0, torch.device("cpu"))
    ours = sampler.denoise()[0]

    pipe = model.pipeline_class.from_pretrained(root / name, dtype=torch.float32)
    pipe.load_lora_weights(tmp_path / "lora")
    call = dict(prompt=request.prompt, width=width, height=height, num_inference_steps=request.steps,
                guidance_scale=guidance, max_sequence_length=32)
    if frames > 1:
        call["num_frames"] = frames
    if model.sample_guidance == "classifier_free":
        call["negative_prompt"] = request.negative_prompt
    if name == "hunyuan-video":
        # The pipeline crops the release tokenizer's template length (95); the model measures it
        # for the tokenizer it has (template_crop_start), here the tiny one's.
        call["prompt_template"] = {"template": model.prompt_template, "crop_start": model.crop_start}
    theirs = pipe(**call, generator=torch.Generator().manual_seed(request.seed), output_type="latent")
    theirs = theirs.images if name == "flux" else theirs.frames
    # FLUX.1 and LTX-Video return their packed latents, HunyuanVideo its unpacked ones.
    expected = theirs if theirs.dim() == 3 else model.pack_latents(theirs)
    torch.testing.assert_close(model.pack_latents(ours), expected, rtol=1e-4, atol=1e-5)

    # Decoded as the pipeline decodes, to the same 8-bit pixels.
    picture = pipe(**call, generator=torch.Generator().manual_seed(request.seed), output_type="pt")
    picture = picture.images.unsqueeze(1) if name == "flux" else picture.frames  # (1, frames, 3, h, w)
    expected = (picture[0].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    model.load_vae(torch.device("cpu"))
    with torch.no_grad():
        drawn = to_uint8(model.decode_latents(ours)[0])
    model.free_encoders()
    assert drawn.shape == expected.shape == (frames, height, width, 3)
    assert abs(drawn.astype(int) - expected.astype(int)).max() <= 1


def test_memory_estimate_counts_sampling(tmp_path, tiny_models, image_dataset):
    """The estimate printed at start has a line for drawing samples: the stage's weights,
    optimizer state and gradients, plus one layer's activations for the largest sample."""
    from conftest import write_configs
    from models import get_model_class
    from utils import memory
    from utils.config import load_train_config
    from utils.engine import plan_stages

    sample = {"prompts": ["a cat", {"prompt": "a dog", "width": 128, "height": 96}], "width": 64, "height": 64}
    config = load_train_config(write_configs(tmp_path, tiny_models / "flux", image_dataset, sample=sample))
    model = get_model_class("flux")(config.model)
    transformer, layers, parts = plan_stages(model, config)
    tokens = max(model.tokens_per_sample(r.width, r.height, r.frames) for r in config.samples)
    assert tokens == (128 // 16) * (96 // 16) + 32
    (est,) = memory.estimate(model, layers, parts, config, tokens=100, hidden=32, sample_tokens=tokens)
    transient = max(model.activation_factors.values()) * tokens * 32 * 4
    assert est.sampling == int(sum(est.weights.values()) + est.optimizer + est.gradients + transient)
    assert "while drawing samples: stage 0 " in memory.describe([est], config, 100)
    (est,) = memory.estimate(model, layers, parts, config, tokens=100, hidden=32)
    assert est.sampling is None and "drawing samples" not in memory.describe([est], config, 100)
