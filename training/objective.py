"""The rectified-flow objective, for every model: how training timesteps are drawn and shifted,
how a batch is noised into the first layer's inputs and the velocity target, and the loss.

A recipe (models/base.ModelRecipe) gives what differs per model: its shift constants, its input
packing and its layout of the target; the rest is written once here.

Timesteps t are in (0, 1): 0 is the data, 1 is pure noise. Each sampler takes one CPU generator
per sample (seeded from the seed, epoch and sample, never the rank), so a sample gets the same
timestep however the processes are arranged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.base import ModelRecipe

TIMESTEP_METHODS = ("logit_normal", "uniform", "mode", "cosmap")
LOSS_TYPES = ("mse", "l1", "huber", "pseudo_huber")


def _normal(generators: list[torch.Generator]) -> torch.Tensor:
    return torch.cat([torch.randn(1, generator=g) for g in generators])


def _uniform(generators: list[torch.Generator]) -> torch.Tensor:
    return torch.cat([torch.rand(1, generator=g) for g in generators])


def sample_density(method: str, generators: list[torch.Generator], logit_mean: float = 0.0,
                   logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """One timestep in (0, 1) per generator, drawn from the density `method` names.

    The densities are those of Esser et al., "Scaling Rectified Flow Transformers for
    High-Resolution Image Synthesis" (SD3, arXiv:2403.03206), section 3.1; diffusers'
    `training_utils.compute_density_for_timestep_sampling` has the first three (tested against it):

      logit_normal  t = sigmoid(m + s * n), n ~ N(0, 1)            (eq. 19; kohya's "sigmoid"
                    method is this with m = 0 and s = its sigmoid_scale)
      uniform       t ~ U(0, 1)
      mode          u ~ U(0, 1), t = 1 - u - scale * (cos(pi u / 2)^2 - 1 + u)   (eq. 20)
      cosmap        u ~ U(0, 1), t = 1 - 1 / (tan(pi u / 2) + 1)                 (eq. 21)

    SD3 writes t for the noise level, as here (t = 1 is noise), so its formulas apply unchanged.
    """
    if method == "logit_normal":
        n = _normal(generators).mul(logit_std)
        return (n + logit_mean if logit_mean else n).sigmoid()
    if method == "uniform":
        return _uniform(generators)
    if method == "mode":
        u = _uniform(generators)
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if method == "cosmap":
        u = _uniform(generators)
        return 1 - 1 / (torch.tan(math.pi * u / 2) + 1)
    raise ValueError(f"unknown timestep sampling method {method!r}; one of {', '.join(TIMESTEP_METHODS)}")


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Shift timesteps towards noise: t -> shift * t / (1 + (shift - 1) * t), the time shift of
    SD3 (arXiv:2403.03206, eq. 23, with alpha = shift); FlowMatchEulerDiscreteScheduler's `shift`."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(t: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX.1's resolution-dependent shift: t -> e^mu / (e^mu + 1/t - 1) (the exponential time
    shift of FlowMatchEulerDiscreteScheduler.time_shift with sigma = 1)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def scale_to_range(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Map timesteps in (0, 1) linearly onto (low, high): t -> low + (high - low) * t. Unlike a
    clamp, it keeps the density's shape and puts no mass on the bounds. (0, 1) leaves t as is."""
    if low == 0.0 and high == 1.0:
        return t
    return low + (high - low) * t


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str = "mse",
                     delta: float = 1.0) -> torch.Tensor:
    """The loss of each element, in float32, for x = prediction - target:

      mse           x^2
      l1            |x|
      huber         x^2 / 2 where |x| <= delta, delta * (|x| - delta / 2) beyond: Huber,
                    "Robust Estimation of a Location Parameter" (Ann. Math. Statist. 1964);
                    torch.nn.functional.huber_loss
      pseudo_huber  delta^2 * (sqrt(1 + (x / delta)^2) - 1): the smooth form of Huber's loss
                    (Charbonnier et al., ICIP 1994), used for diffusion training by Song and
                    Dhariwal (arXiv:2310.14189, section 3.3) and Khrapov et al. (arXiv:2403.16728)

    Huber and pseudo-Huber act like MSE / 2 for errors well below delta and like L1 * delta
    above it: outliers (a bad image, a bad crop) pull the weights less than with MSE.
    """
    p, t = prediction.float(), target.float()
    if kind == "mse":
        return (p - t).pow(2)
    if kind == "l1":
        return (p - t).abs()
    if kind == "huber":
        return F.huber_loss(p, t, reduction="none", delta=delta)
    if kind == "pseudo_huber":
        x = p - t
        # delta^2 * (sqrt(1 + u^2) - 1) rewritten as x^2 / (sqrt(1 + u^2) + 1): no cancellation
        # for small errors, where the direct form is all float32 rounding.
        return x.pow(2) / (torch.sqrt(1 + (x / delta).pow(2)) + 1)
    raise ValueError(f"unknown loss type {kind!r}; one of {', '.join(LOSS_TYPES)}")


def sample_timesteps(recipe: ModelRecipe, generators: list[torch.Generator], seq_len: int) -> torch.Tensor:
    """One timestep in (0, 1) per sample: 0 is data, 1 is noise. Drawn from the configured
    density, shifted (fixed or by resolution), then scaled into [min_timestep, max_timestep]."""
    cfg = recipe.config
    t = sample_density(cfg.timestep_sample_method, generators, logit_mean=cfg.logit_mean,
                       logit_std=cfg.sigmoid_scale, mode_scale=cfg.mode_scale)
    if cfg.resolution_dependent_shift:
        slope = (recipe.max_shift - recipe.base_shift) / (recipe.max_seq_len - recipe.base_seq_len)
        t = resolution_shift(t, recipe.base_shift + slope * (seq_len - recipe.base_seq_len))
    elif cfg.shift is not None:
        t = shift_timesteps(t, cfg.shift)
    return scale_to_range(t, cfg.min_timestep, cfg.max_timestep)


def training_example(recipe: ModelRecipe, latents: torch.Tensor, text: dict[str, torch.Tensor],
                     generators: list[torch.Generator], timesteps: torch.Tensor | None = None,
                     weights: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                     conditions: dict[str, torch.Tensor] | None = None):
    """(inputs, labels) for the pipeline engine: rectified-flow noising of a batch.

    The noisy latent is the straight line between data (t=0) and noise (t=1); the target is
    the velocity noise - data. Noise and timesteps come from per-sample generators, so the
    same sample gets the same noise whatever the process layout. `mask`, weights in [0, 1]
    that broadcast over `latents` (data/cache.latent_mask), weights each element's loss.
    `conditions`: the clips' other cached tensors, which the recipe's `condition_inputs` applies
    (image-to-video); the loss weights it returns multiply `mask`.
    """
    latents = latents.float()
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
    if timesteps is None:
        timesteps = sample_timesteps(recipe, generators, recipe.image_seq_len(latents))
    t = timesteps.view(-1, *([1] * (latents.dim() - 1)))
    noisy = (1 - t) * latents + t * noise
    target = recipe.pack_latents(noise - latents)
    inputs = recipe.model_inputs(noisy.to(recipe.dtype), timesteps, text)
    inputs, condition_weights = recipe.condition_inputs(inputs, latents, conditions or {})
    if condition_weights is not None:
        mask = condition_weights if mask is None else mask * condition_weights
    if weights is None:
        weights = torch.ones(latents.shape[0])
    if mask is None:
        return recipe.input_fields.pack(inputs), (target, weights)
    # Packed like the target, so each weight meets its own element's error.
    mask = recipe.pack_latents(mask.float().expand(latents.shape).contiguous())
    return recipe.input_fields.pack(inputs), (target, weights, mask)


def loss(recipe: ModelRecipe, prediction: torch.Tensor, labels) -> torch.Tensor:
    """Weighted mean over samples of each sample's mean element loss (`loss_type`: MSE by
    default; see elementwise_loss), in float32. With a loss mask (a third label), each
    element's loss is multiplied by its weight before the mean: a weight-0 element adds nothing
    to the loss or its gradient, a mask of ones changes nothing."""
    target, weights, *mask = labels
    err = elementwise_loss(prediction, target, recipe.config.loss_type, recipe.config.huber_delta)
    if mask:
        err = err * mask[0].to(err)
    per_sample = err.mean(dim=tuple(range(1, err.dim())))
    weights = weights.to(per_sample)
    # Eval padding has weight 0; an all-padding batch gives 0, not NaN.
    return (per_sample * weights).sum() / weights.sum().clamp_min(1e-12)
