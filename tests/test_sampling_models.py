"""Each model's sampling pieces (models/*.py `sample_*`, training/sampling.Sampler) against its own
diffusers pipeline, in one process: the Sampler's loop driving the model's pipeline layers (with
a LoRA) in place of the DeepSpeed engine, beside the pipeline with that LoRA saved and loaded.
The DeepSpeed path itself is tests/test_sampling.py."""

from __future__ import annotations

import pytest
import torch

from make_tiny_models import make_tiny_flux, make_tiny_flux2, make_tiny_hunyuan_video, make_tiny_ltx_video, make_tiny_wan
from test_video_models import engine_like_transformer, make_model
from config.sampling import SampleRequest
from config.training import AdapterConfig
from saving.export import lora_state_dict, save_lora
from models import get_model_class
from training.sampling import Sampler, sample_prompts, to_uint8
from utils.dist import Distributed

MAKERS = {"flux": make_tiny_flux, "ltx-video": make_tiny_ltx_video, "hunyuan-video": make_tiny_hunyuan_video,
          "flux2": make_tiny_flux2, "wan": make_tiny_wan}
SHAPES = {"flux": (96, 48, 1), "ltx-video": (64, 96, 9), "hunyuan-video": (48, 32, 5), "flux2": (96, 48, 1),
          "wan": (64, 32, 5)}
# Text tokens: FLUX.2's chat template takes about 40 of the tiny tokenizer's before the caption.
TEXT_LEN = {"flux2": 64}
IMAGE_MODELS = ("flux", "flux2")


class LayersEngine:
    """What Sampler needs of DeepSpeed's PipelineEngine: one stage, one replica, eval_batch
    running the layers in order on each micro-batch."""

    num_stages, stage_id = 1, 0

    def __init__(self, layers):
        self.layers = layers
        self.module = torch.nn.ModuleList(layers)

        class Grid:
            get_data_parallel_rank = staticmethod(lambda: 0)
            get_data_parallel_world_size = staticmethod(lambda: 1)

        self.grid = Grid()

    def eval_batch(self, batches, num_micro_batches, **_):
        outputs = []
        # What the adapter computed in (plain_precision swaps its weights while sampling).
        self.adapter_dtypes = {p.dtype for n, p in self.module.named_parameters() if "lora_" in n}
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


def draw_both(tmp_path, name, dtype="float32"):
    """A tiny `name` in `dtype` with a random LoRA (float32, as training keeps it): our Sampler's
    latents through the layers as the engine builds them, beside the pipeline's (in `dtype`,
    our saved LoRA loaded). Returns (model, request, our latents, the pipeline, its call, our
    transformer, the engine stand-in)."""
    root = tmp_path / "models"
    MAKERS[name](root)
    text_len = TEXT_LEN.get(name, 32)
    cls = get_model_class(name)
    model = cls(cls.config_class(type=name, diffusers_path=str(root / name), dtype=dtype, max_sequence_length=text_len))
    adapter = AdapterConfig(rank=4, alpha=8.0)
    transformer, _ = engine_like_transformer(model, adapter)
    # As parallel/stages builds them: computing in the model's dtype (autocast below float32).
    layers = model.pipeline_layers(transformer)
    for layer in layers:
        layer.bind_root_parameters(transformer)
    save_lora(model, lora_state_dict(transformer), adapter, tmp_path / "lora", torch.float32)

    width, height, frames = SHAPES[name]
    guidance = 2.5 if model.sample_guidance == "classifier_free" else 4.0
    request = SampleRequest(index=0, prompt="a red circle", seed=3, width=width, height=height, frames=frames,
                            steps=3, guidance=guidance, negative_prompt="blurry")
    texts = Texts(model, sample_prompts([request], model))
    engine = LayersEngine(layers)
    ours = Sampler(model, engine, [request], texts, tmp_path / "samples", Distributed.alone()).denoise()[0]

    pipe = model.pipeline_class.from_pretrained(root / name, dtype=model.dtype)
    pipe.load_lora_weights(tmp_path / "lora")
    call = dict(prompt=request.prompt, width=width, height=height, num_inference_steps=request.steps,
                guidance_scale=guidance, max_sequence_length=text_len)
    if frames > 1:
        call["num_frames"] = frames
    if model.sample_guidance == "classifier_free":
        call["negative_prompt"] = request.negative_prompt
    if name == "hunyuan-video":
        # The pipeline crops the release tokenizer's template length (95); the model measures it
        # for the tokenizer it has (template_crop_start), here the tiny one's.
        call["prompt_template"] = {"template": model.prompt_template, "crop_start": model.crop_start}
    return model, request, ours, pipe, call, transformer, engine


def pipeline_latents(model, name, pipe, call, seed):
    """The pipeline's final latents in the layout of `model.pack_latents`."""
    theirs = pipe(**call, generator=torch.Generator().manual_seed(seed), output_type="latent")
    theirs = theirs.images if name in IMAGE_MODELS else theirs.frames
    # FLUX.1, FLUX.2 and LTX-Video return their packed latents, HunyuanVideo its unpacked ones.
    return theirs if theirs.dim() == 3 else model.pack_latents(theirs)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_samples_equal_the_pipeline_with_our_lora(tmp_path, name):
    model, request, ours, pipe, call, *_ = draw_both(tmp_path, name)
    expected = pipeline_latents(model, name, pipe, call, request.seed)
    torch.testing.assert_close(model.pack_latents(ours), expected, rtol=1e-4, atol=1e-5)

    # Decoded as the pipeline decodes, to the same 8-bit pixels.
    picture = pipe(**call, generator=torch.Generator().manual_seed(request.seed), output_type="pt")
    picture = picture.images.unsqueeze(1) if name in IMAGE_MODELS else picture.frames  # (1, frames, 3, h, w)
    expected = (picture[0].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    model.load_vae(torch.device("cpu"))
    with torch.no_grad():
        drawn = to_uint8(model.decode_latents(ours)[0])
    model.free_encoders()
    assert drawn.shape == expected.shape == (request.frames, request.height, request.width, 3)
    assert abs(drawn.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_bfloat16_samples_equal_the_bfloat16_pipeline(tmp_path, name):
    """Base weights in bfloat16, the LoRA trained in float32: sampling runs the layers as the
    pipeline runs its transformer (bfloat16 weights and adapter, no autocast), and the
    adapter's float32 weights are back afterwards."""
    model, request, ours, pipe, call, transformer, engine = draw_both(tmp_path, name, dtype="bfloat16")
    expected = pipeline_latents(model, name, pipe, call, request.seed)
    # FLUX.1 and FLUX.2 agree bit for bit. The video models move some latents by up to 3
    # bfloat16 steps of their size (0.04 at most here; the same under autocast): the pipelines
    # round their inputs and timesteps at other points of the loop.
    tolerance = 0 if name in IMAGE_MODELS else 5e-2
    torch.testing.assert_close(model.pack_latents(ours).float(), expected.float(), rtol=0, atol=tolerance)
    assert ours.abs().max() > 0.5
    assert engine.adapter_dtypes == {torch.bfloat16}
    assert {p.dtype for n, p in transformer.named_parameters() if "lora_" in n} == {torch.float32}


def test_memory_estimate_counts_sampling(tmp_path, tiny_models, image_dataset):
    """The estimate printed at start has a line for drawing samples: the stage's weights,
    optimizer state and gradients, plus one layer's activations for the largest sample."""
    from config.train_config import load_train_config
    from conftest import write_configs
    from memory.estimate import describe as describe_memory, estimate as estimate_memory
    from models import get_model_class
    from parallel.stages import plan_stages

    sample = {"prompts": ["a cat", {"prompt": "a dog", "width": 128, "height": 96}], "width": 64, "height": 64}
    config = load_train_config(write_configs(tmp_path, tiny_models / "flux", image_dataset, sample=sample),
                               get_model_class)
    model = get_model_class("flux")(config.model)
    transformer, layers, parts = plan_stages(model, config)
    tokens = max(model.tokens_per_sample(r.width, r.height, r.frames) for r in config.samples)
    assert tokens == (128 // 16) * (96 // 16) + 32
    (est,) = estimate_memory(model, layers, parts, config, tokens=100, hidden=32, sample_tokens=tokens)
    transient = max(model.activation_factors.values()) * tokens * 32 * 4
    assert est.sampling == int(sum(est.weights.values()) + est.optimizer + est.gradients + transient)
    assert "while drawing samples: stage 0 " in describe_memory([est], config, 100)
    (est,) = estimate_memory(model, layers, parts, config, tokens=100, hidden=32)
    assert est.sampling is None and "drawing samples" not in describe_memory([est], config, 100)

    # bfloat16 base weights: sampling copies the float32 adapter weights to bfloat16 for the round.
    config = load_train_config(write_configs(tmp_path / "bf16", tiny_models / "flux", image_dataset, sample=sample,
                                             model={"dtype": "bfloat16"}), get_model_class)
    model = get_model_class("flux")(config.model)
    transformer, layers, parts = plan_stages(model, config)
    (est,) = estimate_memory(model, layers, parts, config, tokens=100, hidden=32, sample_tokens=tokens)
    adapter = sum(p.numel() for n, p in transformer.named_parameters() if "lora_" in n)
    transient = max(model.activation_factors.values()) * tokens * 32 * 2
    assert est.sampling == int(sum(est.weights.values()) + est.optimizer + est.gradients + transient + adapter * 2)


def test_share_out_gives_every_replica_the_same_number_of_forwards():
    from training.sampling import share_out

    def request(i, width):
        return SampleRequest(index=i, prompt=f"p{i}", seed=0, width=width, height=64, frames=1, steps=4,
                             guidance=1.0, negative_prompt="")

    requests = [request(0, 64), request(1, 96), request(2, 64), request(3, 64)]
    rounds = share_out(requests, 2)
    # One round per shape; in each, the replicas hold the same count (None pads).
    assert [[[r and r.index for r in slots] for slots in rnd] for rnd in rounds] == [[[0, 3], [2, None]],
                                                                                   [[1], [None]]]


def test_a_failing_sample_is_one_line_and_the_others_are_written(tmp_path, tiny_models):
    from models.flux import FluxModel

    class DecodeFailsForWidePictures(FluxModel):
        def decode_latents(self, latents):
            if latents.shape[-1] == 96 // 8:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\n(details)")
            return super().decode_latents(latents)

    model = make_model("flux", tiny_models, max_sequence_length=32)
    model = DecodeFailsForWidePictures(model.config)
    transformer, layers = engine_like_transformer(model, AdapterConfig(rank=4, alpha=4.0))
    requests = [SampleRequest(index=i, prompt=p, seed=0, width=w, height=48, frames=1, steps=2, guidance=3.5,
                              negative_prompt="") for i, (p, w) in enumerate([("a cat", 64), ("a dog", 96)])]
    texts = Texts(model, [r.prompt for r in requests])
    lines = []
    sampler = Sampler(model, LayersEngine(layers), requests, texts, tmp_path, Distributed.alone(), log=lines.append)
    assert sampler.run(3) is False
    assert lines[0] == ("step 3: sample 1 ('a dog'): OutOfMemoryError: CUDA out of memory. Tried to allocate "
                        "9.00 GiB; training goes on")
    assert lines[1].startswith(f"step 3: 1 sample(s) in {tmp_path / 'step00000003'}")
    assert sorted(p.name for p in (tmp_path / "step00000003").iterdir()) == ["0.png", "index.json",
                                                                             "latents.safetensors"]
    assert model.vae is None  # freed after decoding, failure or not

    class FailingEngine(LayersEngine):
        def eval_batch(self, *_, **__):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore")

    lines.clear()
    sampler = Sampler(model, FailingEngine(layers), requests, texts, tmp_path, Distributed.alone(), log=lines.append)
    assert sampler.run(4) is False
    assert lines == ["step 4: samples failed: RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB; "
                     "training goes on"]


def test_a_sampling_step_dispatches_no_more_ops_than_the_diffusers_transformer(tiny_models):
    """Eager sampling is launch-bound on a fast GPU: a denoising step through our layers (bfloat16
    base, float32 LoRA, `plain_precision` as the Sampler runs them) must dispatch no more aten
    ops than the transformer's own forward with the LoRA in bfloat16, as the pipeline runs it.
    Under autocast each adapter weight is cast at every call, and every block recomputing the
    rotary embedding costs more again (about 40% more ops at FLUX.1's depth)."""
    from collections import Counter

    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig
    from torch.profiler import ProfilerActivity, profile

    from models.pipeline_layers import plain_precision

    cls = get_model_class("flux")
    model = cls(cls.config_class(type="flux", diffusers_path=str(tiny_models / "flux"), dtype="bfloat16",
                                 max_sequence_length=32))
    transformer, _ = engine_like_transformer(model, AdapterConfig(rank=4, alpha=8.0))
    layers = model.pipeline_layers(transformer)
    reference = FluxTransformer2DModel.from_pretrained(tiny_models / "flux" / "transformer", dtype=torch.bfloat16)
    reference.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=model.default_lora_targets))
    g = torch.Generator().manual_seed(0)
    text = {"text": torch.randn(1, 32, 32, generator=g).bfloat16(), "pooled": torch.randn(1, 32, generator=g).bfloat16()}
    latents = model.sample_noise(64, 64, 1, 0)

    def inputs():  # new every step, as the Sampler makes them
        return model.input_fields.pack(model.sample_inputs(latents, torch.tensor(500.0), text, None, 3.5))

    def ours():
        x = inputs()
        for layer in layers:
            x = layer(x)

    def theirs():
        named = model.input_fields.unpack(inputs())
        model.reference_forward(reference, {**named, "timesteps": named["timesteps"].bfloat16(),
                                            "guidance": named["guidance"].bfloat16()})

    def ops(step) -> Counter:
        with torch.no_grad():
            step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
        return Counter(e.name for e in prof.events() if e.name.startswith("aten::"))

    with plain_precision(layers) as plain:
        assert plain
        counted = ops(ours)
    reference_ops = ops(theirs)
    assert sum(counted.values()) <= sum(reference_ops.values())
    assert counted["aten::_to_copy"] <= reference_ops["aten::_to_copy"]
    assert sum(ops(ours).values()) > sum(counted.values())  # autocast, as training runs: more


def test_plain_precision_keeps_autocast_where_a_copy_would_be_a_second_model(tiny_models):
    from models.pipeline_layers import plain_precision

    cls = get_model_class("flux")
    model = cls(cls.config_class(type="flux", diffusers_path=str(tiny_models / "flux"), dtype="bfloat16",
                                 max_sequence_length=32))
    transformer, _ = engine_like_transformer(model)  # no adapter: full fine-tuning's layers
    layers = model.pipeline_layers(transformer)
    with plain_precision(layers) as plain:  # bfloat16 weights: nothing to copy
        assert plain and all(layer.autocast_off for layer in layers)
    assert not any(layer.autocast_off for layer in layers)
    for p in transformer.parameters():  # full fine-tuning in float32 under bfloat16 autocast
        p.data = p.data.float()
    with plain_precision(layers) as plain:
        assert not plain and not any(layer.autocast_off for layer in layers)
    assert all(p.dtype == torch.float32 for p in transformer.parameters())
