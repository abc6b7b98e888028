"""Seeds that depend only on what they name: the same on every process, every run and every
pipeline split, so that noise, timesteps, data order and initial weights never depend on a rank."""

from __future__ import annotations

import hashlib

import torch


def stable_seed(*parts) -> int:
    """A 63-bit seed from any parts, the same on every process and every run."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator_for(*parts) -> torch.Generator:
    """A CPU generator seeded from `parts` (seed, epoch, sample, ...), never from the rank."""
    return torch.Generator().manual_seed(stable_seed(*parts))
