"""The pieces of the rectified-flow objective that users choose: how training timesteps are drawn,
the range they are kept in, and the per-element loss. Pure functions of tensors and numbers.

Timesteps t are in (0, 1): 0 is the data, 1 is pure noise. Each sampler takes one CPU generator
per sample (seeded from the seed, epoch and sample, never the rank), so a sample gets the same
timestep however the processes are arranged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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
