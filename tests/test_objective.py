"""The user-chosen parts of the objective (training/objective.py): timestep densities, shifts and
range, and the element losses, checked against diffusers' and torch's own code; and through the
model: the defaults give exactly the old draws and loss, an option changes only what it names."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from config.schema import build
from models.flux import FluxConfig, FluxModel
from training import objective
from training.objective import loss, sample_timesteps, training_example
from utils.errors import ConfigError
from utils.seeding import generator_for


def generators(n: int, tag: str = "t") -> list[torch.Generator]:
    return [generator_for(0, tag, i) for i in range(n)]


@pytest.mark.parametrize("method", ["logit_normal", "mode", "uniform"])
def test_densities_match_diffusers(method):
    ours = objective.sample_density(method, generators(64), logit_mean=0.3, logit_std=1.4, mode_scale=1.29)
    theirs = torch.cat([compute_density_for_timestep_sampling(method, 1, logit_mean=0.3, logit_std=1.4,
                                                              mode_scale=1.29, generator=g) for g in generators(64)])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_cosmap_follows_its_density():
    # SD3 (arXiv:2403.03206), eq. 21: density 2 / (pi - 2 pi t + 2 pi t^2) on (0, 1).
    t = objective.sample_density("cosmap", generators(20000))
    assert 0 < t.min() and t.max() < 1
    counts = torch.histc(t, bins=10, min=0, max=1) / len(t)
    edges = torch.linspace(0, 1, 11, dtype=torch.float64)
    # the density's integral over each bin: its CDF is 1/2 + (2 / pi) atan(2t - 1)
    cdf = lambda x: (torch.atan(2 * x - 1) / math.atan(1) + 1) / 2  # noqa: E731
    expected = (cdf(edges[1:]) - cdf(edges[:-1])).float()
    torch.testing.assert_close(counts, expected, atol=0.01, rtol=0)


def test_shifts_match_the_flow_match_scheduler():
    t = torch.linspace(0.01, 0.99, 50)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    base = FlowMatchEulerDiscreteScheduler(shift=1.0).sigmas[:-1]
    torch.testing.assert_close(objective.shift_timesteps(base, 3.0), scheduler.sigmas[:-1])
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    torch.testing.assert_close(objective.resolution_shift(t, 0.8), dynamic.time_shift(0.8, 1.0, t))


def test_range_scales_the_draws_into_it():
    t = objective.sample_density("logit_normal", generators(1000))
    assert objective.scale_to_range(t, 0.0, 1.0) is t  # the default: untouched
    ranged = objective.scale_to_range(t, 0.2, 0.6)
    assert 0.2 < ranged.min() and ranged.max() < 0.6
    # the same draws, in the same order: only the range changed
    torch.testing.assert_close((ranged - 0.2) / 0.4, t)


def test_element_losses():
    p, t = torch.randn(4, 8, generator=generator_for(1)), torch.randn(4, 8, generator=generator_for(2))
    torch.testing.assert_close(objective.elementwise_loss(p, t, "mse"), F.mse_loss(p, t, reduction="none"))
    torch.testing.assert_close(objective.elementwise_loss(p, t, "l1"), F.l1_loss(p, t, reduction="none"))
    torch.testing.assert_close(objective.elementwise_loss(p, t, "huber", 0.3),
                               F.huber_loss(p, t, reduction="none", delta=0.3))
    # pseudo-Huber: x^2 / 2 for small errors, delta * |x| (less a constant) for large ones
    x = torch.tensor([1e-3, 100.0])
    ph = objective.elementwise_loss(x, torch.zeros(2), "pseudo_huber", 0.5)
    assert ph[0] == pytest.approx(0.5e-6, rel=1e-3)
    assert ph[1] == pytest.approx(0.5 * 100 - 0.25, rel=1e-3)
    with pytest.raises(ValueError, match="unknown loss type"):
        objective.elementwise_loss(p, t, "l3")


def flux(tiny_models, **keys) -> FluxModel:
    config = build(FluxConfig, {"type": "flux", "diffusers_path": str(tiny_models / "flux"), "dtype": "float32",
                                **keys}, Path("train.toml"), "model")
    return FluxModel(config)


def test_the_defaults_draw_and_score_as_before(tiny_models):
    model = flux(tiny_models)
    # The draws of the trainer before these options: sigmoid(sigmoid_scale * n), then no range.
    old = torch.cat([torch.randn(1, generator=g) for g in generators(16)]).mul(1.0).sigmoid()
    assert torch.equal(sample_timesteps(model, generators(16), 256), old)
    prediction, target = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    weights = torch.tensor([1.0, 0.0, 1.0])
    old_loss = ((prediction - target).pow(2).mean(dim=(1, 2)) * weights).sum() / weights.sum()
    assert torch.equal(loss(model, prediction, (target, weights)), old_loss)
    assert loss(model, prediction, (target, weights)) != loss(flux(tiny_models, loss_type="huber"),
                                                               prediction, (target, weights))


def test_a_timestep_option_changes_only_the_timesteps(tiny_models):
    """min/max_timestep and the density change t, hence the noisy input; the noise, the target and
    everything else the model gets stay the same."""
    latents = torch.randn(2, 16, 8, 8, generator=generator_for(3))
    text = {"text": torch.zeros(2, 4, 32), "pooled": torch.zeros(2, 32)}
    default = flux(tiny_models)
    changed = flux(tiny_models, min_timestep=0.5, max_timestep=0.9, timestep_sample_method="mode")
    (inputs_a, (target_a, _)), (inputs_b, (target_b, _)) = (
        training_example(m, latents, text, generators(2)) for m in (default, changed))
    assert torch.equal(target_a, target_b)
    a, b = default.input_fields.unpack(inputs_a), changed.input_fields.unpack(inputs_b)
    differ = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert differ == ["latents", "timesteps"], differ
    assert ((b["timesteps"] >= 0.5) & (b["timesteps"] <= 0.9)).all()


@pytest.mark.parametrize("keys, where", [
    ({"min_timestep": 0.6, "max_timestep": 0.4}, "model.min_timestep"),
    ({"max_timestep": 1.5}, "model.max_timestep"),
    ({"loss_type": "l3"}, "model.loss_type"),
    ({"huber_delta": 0.0}, "model.huber_delta"),
    ({"mode_scale": 2.0}, "model.mode_scale"),
    ({"sigmoid_scale": -1.0}, "model.sigmoid_scale"),
])
def test_bad_values_name_the_key(tiny_models, keys, where):
    with pytest.raises(ConfigError, match=f"'{where}'"):
        flux(tiny_models, **keys)
