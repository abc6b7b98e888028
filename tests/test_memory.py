"""The memory estimate printed at start (memory/estimate.py).

Weights, gradients and optimizer state are checked against the real thing: each pipeline stage
of the tiny Flux is loaded as the engine loads it, its real optimizer takes a step, and the bytes
of the actual tensors are summed. The activation factors of every model are re-measured at a
small size with saved-tensor hooks, and the video models' estimates count activations.
"""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors import safe_open

from conftest import REPO, write_configs
from config.train_config import load_train_config
from models import get_model_class
from parallel.stages import load_stage, plan_stages
from training.optimizers import build_optimizer
from memory.estimate import describe as describe_memory, estimate as estimate_memory
from utils.errors import ConfigError

sys.path.insert(0, str(REPO / "bench"))

import activation_factors  # noqa: E402
import step  # noqa: E402

CASES = {
    "LoRA, AdamW": dict(model={"dtype": "bfloat16"}),
    "LoRA, Adafactor": dict(model={"dtype": "bfloat16"}, optimizer={"type": "adafactor"}),
    "full float32, AdamW": dict(adapter=None),
    "full bfloat16, AdamW": dict(adapter=None, model={"dtype": "bfloat16"}),
    "full bfloat16, AdamW, stochastic rounding": dict(adapter=None, model={"dtype": "bfloat16"},
                                                      optimizer={"stochastic_rounding": True}),
    "full bfloat16, Adafactor": dict(adapter=None, model={"dtype": "bfloat16"}, optimizer={"type": "adafactor"}),
    "full float32 master, bfloat16 compute, Adafactor": dict(adapter=None, model={"dtype": "bfloat16"},
                                                             full_finetune_dtype="float32",
                                                             optimizer={"type": "adafactor"}),
}


def measured_stage(config, stage: int) -> dict:
    """Load `stage` as the engine does, step its real optimizer once and sum real tensor bytes."""
    model = get_model_class(config.model.type)(config.model)
    transformer, layers, parts = plan_stages(model, config)
    load_stage(model, config, transformer, layers, parts, stage, torch.device("cpu"))
    params = [p for layer in layers[parts[stage]:parts[stage + 1]] for p in layer.parameters()]
    weights = {}
    for p in params:
        key = str(p.dtype).removeprefix("torch.")
        weights[key] = weights.get(key, 0) + p.numel() * p.element_size()
    trainable = [p for p in params if p.requires_grad]
    optimizer = build_optimizer(trainable, config.settings.optimizer, 0.0, None, low_memory=config.full_finetune)
    generator = torch.Generator().manual_seed(0)
    for p in trainable:
        p.grad = (torch.randn(p.shape, generator=generator) * 1e-3).to(p.dtype)
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    optimizer.step()
    # Every state tensor but the 0-dimensional step counters (4 bytes a tensor: left out of the estimate).
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"weights": weights, "trainable": sum(p.numel() for p in trainable), "gradients": gradients,
            "optimizer": state}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tools.make_demo_dataset import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("memory") / "data", count=2, seed=0)


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_weights_gradients_and_optimizer_state_match_the_real_tensors(tmp_path, tiny_models, data, case, stages):
    config = load_train_config(write_configs(tmp_path, tiny_models / "flux", data, pipeline_stages=stages,
                                             **CASES[case]), get_model_class)
    model = get_model_class("flux")(config.model)
    transformer, layers, parts = plan_stages(model, config)
    estimates = estimate_memory(model, layers, parts, config, tokens=None, hidden=None)
    assert len(estimates) == stages
    for stage, estimate in enumerate(estimates):
        real = measured_stage(config, stage)
        assert estimate.weights == real["weights"], stage
        assert estimate.trainable_params == real["trainable"], stage
        assert estimate.gradients == real["gradients"], stage
        assert estimate.optimizer == real["optimizer"], stage
        assert estimate.activations is None  # no token count given
    if config.full_finetune:
        # Every weight of the model file is trained, once.
        with safe_open(tiny_models / "flux" / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
            on_disk = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
        assert sum(e.trainable_params for e in estimates) == on_disk


def test_activation_estimate_follows_the_checkpointing_mode(tmp_path, tiny_models, data):
    totals = {}
    for mode in (False, "selective", True):
        config = load_train_config(write_configs(tmp_path / str(mode), tiny_models / "flux", data, adapter=None,
                                                 activation_checkpointing=mode), get_model_class)
        model = get_model_class("flux")(config.model)
        transformer, layers, parts = plan_stages(model, config)
        (estimate,) = estimate_memory(model, layers, parts, config, tokens=1000, hidden=model.hidden_size(transformer))
        totals[mode] = estimate.activations
    assert totals[False] > totals["selective"] > totals[True] > 0
    # Without checkpointing: the layer factors add up, x tokens x width x 4 bytes (float32) x 2 samples.
    width = 32
    factors = model.full_finetune_activation_factors
    expected = (factors["FluxInputLayer"] + 2 * factors["FluxDoubleBlockLayer"] + 2 * factors["FluxSingleBlockLayer"]
                + factors["FluxFinalLayer"]) * 1000 * width * 4 * 2
    assert totals[False] == pytest.approx(expected, rel=1e-6)


def test_warning_when_a_stage_exceeds_the_gpu(tmp_path, tiny_models, data):
    config = load_train_config(write_configs(tmp_path, tiny_models / "flux", data, adapter=None, pipeline_stages=2),
                               get_model_class)
    model = get_model_class("flux")(config.model)
    transformer, layers, parts = plan_stages(model, config)
    estimates = estimate_memory(model, layers, parts, config, tokens=100, hidden=32)
    text = describe_memory(estimates, config, 100, device_total=estimates[1].total - 1)
    assert "stage 0: weights float32" in text and "stage 1: weights float32" in text
    warnings = [line for line in text.splitlines() if line.startswith("WARNING")]
    assert len(warnings) >= 1 and all("more than the GPU's" in w for w in warnings)
    assert any(w.startswith("WARNING: stage 1 needs about") for w in warnings)
    assert "WARNING" not in describe_memory(estimates, config, 100, device_total=10 * 2**30)


# Per model: attention heads (width 512 at the released head size), (width, height, frames) and
# text tokens, with about the released share of text tokens.
SMALL = {"flux": (4, (256, 256, 1), 32), "ltx-video": (8, (256, 256, 25), 12), "hunyuan-video": (4, (128, 128, 9), 12),
         "flux2": (4, (256, 256, 1), 32),
         "wan": (4, (256, 256, 9), 12)}


@pytest.mark.parametrize("full", [False, True], ids=["LoRA", "full"])
@pytest.mark.parametrize("name", list(SMALL))
def test_activation_factors_match_a_measurement(name, full):
    """What each layer keeps for the backward pass, measured as bench/activation_factors.py
    measures the declared factors (saved-tensor hooks, bfloat16 autocast, layers set up as the
    trainer sets them up), on the released architecture at width 512 with 2 blocks of each kind:
    the blocks within 10% of the model's factors, for LoRA (rank 4) and full fine-tuning."""
    heads, shape, text_tokens = SMALL[name]
    measured = activation_factors.measure(name, heads=heads, blocks=2, shape=shape, text_tokens=text_tokens,
                                          full=full, rank=4)
    cls = get_model_class(name)
    declared = cls.full_finetune_activation_factors if full else cls.activation_factors
    assert set(measured) == set(declared)
    for layer, factor in declared.items():
        if "Block" in layer:
            assert measured[layer] == pytest.approx(factor, rel=0.1), (layer, measured)
        else:  # the input and final layers keep little; their factors only need the right size
            # (Wan's final layer keeps 5: its norm input and modulation in float32, full fine-tuning)
            assert measured[layer] < 6 and factor < 6, (layer, measured)


@pytest.mark.parametrize("name", ["ltx-video", "hunyuan-video"])
def test_video_estimate_counts_activations(tmp_path, video_models, data, name):
    def config(mode, full=False):
        table = {"type": name, "dtype": "bfloat16", "max_sequence_length": 12}
        return load_train_config(write_configs(tmp_path / f"{mode}-{full}", video_models / name, data, model=table,
                                               activation_checkpointing=mode, **({"adapter": None} if full else {})),
                                 get_model_class)

    model = get_model_class(name)(config(False).model)
    # tokens_per_sample counts what the blocks run: LTX-Video's video tokens, HunyuanVideo's video
    # and text tokens (the text padded to max_sequence_length).
    width, height, frames = 96, 64, 17
    tokens = model.tokens_per_sample(width, height, frames)
    transformer = model.transformer_class.from_pretrained(video_models / name / "transformer")
    latents = torch.zeros(1, *step.latent_shape(model, width, height, frames))
    text = {"text": torch.zeros(1, 12, 32), "text_mask": torch.ones(1, 12, dtype=torch.bool),
            "pooled": torch.zeros(1, 32)}
    inputs = model.input_fields.pack(model.model_inputs(latents, torch.tensor([0.5]), text))
    stream = model.layers(transformer)[0](inputs)
    hidden, encoder_hidden = stream[0], stream[1]
    assert tokens == hidden.shape[1] + (encoder_hidden.shape[1] if name == "hunyuan-video" else 0)

    activations = {}
    modes = (False, "selective", True) if name == "hunyuan-video" else (False, True)
    for mode in modes:
        for full in (False, True):
            cfg = config(mode, full)
            transformer, layers, parts = plan_stages(model, cfg)
            estimates = estimate_memory(model, layers, parts, cfg, tokens, model.hidden_size(transformer))
            printed = describe_memory(estimates, cfg, tokens)
            assert f"x {tokens} tokens" in printed and "not estimated" not in printed, printed
            activations[mode, full] = estimates[0].activations
    for full in (False, True):  # less memory the more is recomputed
        assert [activations[m, full] for m in modes] == sorted((activations[m, full] for m in modes), reverse=True)
        assert len({activations[m, full] for m in modes}) == len(modes)
    # Full fine-tuning keeps more per layer than a LoRA run (the timestep embedding has a gradient).
    assert activations[False, True] > activations[False, False]


def test_selective_checkpointing_is_refused_for_ltx_video(tmp_path, video_models, data):
    path = write_configs(tmp_path, video_models / "ltx-video", data, activation_checkpointing="selective",
                         model={"type": "ltx-video"})
    with pytest.raises(ConfigError, match="'selective' is not available for model type 'ltx-video'"):
        load_train_config(path, get_model_class)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_peak_counts_gradients_and_activations_as_they_overlap(tmp_path, tiny_models, data, accumulation):
    # One micro-batch: the backward pass frees activations as the gradients appear, so the peak is
    # below their sum. With accumulation every gradient exists while the next micro-batch's
    # activations are kept.
    config = load_train_config(write_configs(tmp_path, tiny_models / "flux", data, adapter=None,
                                             gradient_accumulation_steps=accumulation), get_model_class)
    model = get_model_class("flux")(config.model)
    transformer, layers, parts = plan_stages(model, config)
    (e,) = estimate_memory(model, layers, parts, config, tokens=1000, hidden=model.hidden_size(transformer))
    stays = sum(e.weights.values()) + e.optimizer
    if accumulation == 1:
        assert stays + max(e.gradients + e.step_scratch, e.activations) <= e.total < stays + e.gradients + e.activations
    else:
        assert e.total == stays + e.gradients + e.activations
