"""The memory estimate printed at start (utils/memory.py).

Weights, gradients and optimizer state are checked against the real thing: each pipeline stage
of the tiny Flux is loaded as the engine loads it, its real optimizer takes a step, and the bytes
of the actual tensors are summed. The activation factors are re-measured on one block of each
kind with saved-tensor hooks.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from conftest import write_configs
from models import get_model_class
from utils import memory
from utils.config import load_train_config
from utils.engine import load_stage, plan_stages
from utils.optimizers import build_optimizer

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
    optimizer = build_optimizer(trainable, config.optimizer, 0.0, None, low_memory=config.full_finetune)
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
                                             **CASES[case]))
    model = get_model_class("flux")(config.model)
    transformer, layers, parts = plan_stages(model, config)
    estimates = memory.estimate(model, layers, parts, config, tokens=None, hidden=None)
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
                                                 activation_checkpointing=mode))
        model = get_model_class("flux")(config.model)
        transformer, layers, parts = plan_stages(model, config)
        (estimate,) = memory.estimate(model, layers, parts, config, tokens=1000, hidden=model.hidden_size(transformer))
        totals[mode] = estimate.activations
    assert totals[False] > totals["selective"] > totals[True] > 0
    # Without checkpointing: the layer factors add up, x tokens x width x 4 bytes (float32) x 2 samples.
    width = 32
    factors = model.activation_factors
    expected = (factors["FluxInputLayer"] + 2 * factors["FluxDoubleBlockLayer"] + 2 * factors["FluxSingleBlockLayer"]
                + factors["FluxFinalLayer"]) * 1000 * width * 4 * 2
    assert totals[False] == pytest.approx(expected, rel=1e-6)


def test_warning_when_a_stage_exceeds_the_gpu(tmp_path, tiny_models, data):
    config = load_train_config(write_configs(tmp_path, tiny_models / "flux", data, adapter=None, pipeline_stages=2))
    model = get_model_class("flux")(config.model)
    transformer, layers, parts = plan_stages(model, config)
    estimates = memory.estimate(model, layers, parts, config, tokens=100, hidden=32)
    text = memory.describe(estimates, config, 100, device_total=estimates[1].total - 1)
    assert "stage 0: weights float32" in text and "stage 1: weights float32" in text
    warnings = [line for line in text.splitlines() if line.startswith("WARNING")]
    assert len(warnings) >= 1 and all("more than the GPU's" in w for w in warnings)
    assert any(w.startswith("WARNING: stage 1 needs about") for w in warnings)
    assert "WARNING" not in memory.describe(estimates, config, 100, device_total=10 * 2**30)


def test_flux_activation_factors_match_a_measurement():
    """Bytes each Flux layer saves for the backward pass, per token and unit of width, measured
    with saved-tensor hooks on a small transformer (width 512) under bfloat16 autocast, as the
    pipeline layers run it: within 10% of FluxModel.activation_factors for the blocks."""
    from diffusers import FluxTransformer2DModel

    from models.flux import FLUX_INPUTS, FluxModel

    torch.manual_seed(0)
    heads, head_dim, img, txt = 4, 128, 512, 64
    width = heads * head_dim
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=head_dim, num_attention_heads=heads,
                                         joint_attention_dim=256, pooled_projection_dim=64, guidance_embeds=True,
                                         axes_dims_rope=(16, 56, 56)).to(torch.bfloat16)
    transformer.requires_grad_(True)
    layers = FluxModel.layers(FluxModel.__new__(FluxModel), transformer)
    weights = {p.untyped_storage().data_ptr() for p in transformer.parameters()}
    state = FLUX_INPUTS.pack({
        "latents": torch.randn(1, img, 64, dtype=torch.bfloat16), "text": torch.randn(1, txt, 256, dtype=torch.bfloat16),
        "pooled": torch.randn(1, 64, dtype=torch.bfloat16), "timesteps": torch.rand(1), "guidance": torch.ones(1),
        "img_ids": torch.zeros(img, 3, dtype=torch.int64), "txt_ids": torch.zeros(txt, 3, dtype=torch.int64)})
    measured = {}
    for layer in layers:
        layer.autocast_dtype = torch.bfloat16
        saved = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        inputs = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in state)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            state = layer(inputs)
        state = state if isinstance(state, tuple) else (state,)
        measured[layer.__class__.__name__] = sum(saved.values()) / ((img + txt) * width * 2)
    for name in ("FluxDoubleBlockLayer", "FluxSingleBlockLayer"):
        assert measured[name] == pytest.approx(FluxModel.activation_factors[name], rel=0.1), measured
    # The input and final layers keep little; their factors only need the right size.
    for name in ("FluxInputLayer", "FluxFinalLayer"):
        assert measured[name] < 5 and FluxModel.activation_factors[name] < 5, measured


@pytest.mark.parametrize("accumulation", [1, 2])
def test_peak_counts_gradients_and_activations_as_they_overlap(tmp_path, tiny_models, data, accumulation):
    # One micro-batch: the backward pass frees activations as the gradients appear, so the peak is
    # below their sum. With accumulation every gradient exists while the next micro-batch's
    # activations are kept.
    config = load_train_config(write_configs(tmp_path, tiny_models / "flux", data, adapter=None,
                                             gradient_accumulation_steps=accumulation))
    model = get_model_class("flux")(config.model)
    transformer, layers, parts = plan_stages(model, config)
    (e,) = memory.estimate(model, layers, parts, config, tokens=1000, hidden=model.hidden_size(transformer))
    stays = sum(e.weights.values()) + e.optimizer
    if accumulation == 1:
        assert stays + max(e.gradients + e.step_scratch, e.activations) <= e.total < stays + e.gradients + e.activations
    else:
        assert e.total == stays + e.gradients + e.activations
