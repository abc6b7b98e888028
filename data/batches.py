"""Which cached samples form each micro-batch, and the tensors the engine gets for them.

The order depends only on the seed, the epoch, the micro-batch size and the number of
micro-batches per optimizer step (data-parallel replicas x accumulation steps): never on the
rank or the pipeline split. Noise and timesteps come from per-sample generators (seed, epoch,
sample, repeat), so the training math is the same however the GPUs are arranged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.cache import CacheReader
from utils.seeding import generator_for

# Fixed timesteps for evaluation: the same weights always give the same eval loss.
EVAL_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class Slot:
    """One sample in a micro-batch: its index in the cache reader, which repeat it is, its
    timestep (eval only) and its weight in the loss (0 for eval padding)."""

    index: int
    repeat: int
    timestep: float | None = None
    weight: float = 1.0


def _bucket_groups(reader: CacheReader, slots: list[Slot]) -> dict:
    groups: dict = {}
    for s in slots:
        groups.setdefault(reader.samples[s.index].sample.bucket, []).append(s)
    return dict(sorted(groups.items()))


def _shuffled(items: list, generator: torch.Generator) -> list:
    return [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]


class TrainPlan:
    """Micro-batches of every epoch, padded so every optimizer step is full."""

    def __init__(self, reader: CacheReader, micro_batch_size: int, micro_batches_per_step: int, seed: int):
        if len(reader) == 0:
            raise ValueError("no training samples are left after caching; see the problems listed above")
        self.reader = reader
        self.micro_batch_size = micro_batch_size
        self.per_step = micro_batches_per_step
        self.seed = seed
        self.slots = [Slot(i, k) for i, c in enumerate(reader.samples) for k in range(c.sample.repeats)]
        self.steps_per_epoch = -(-len(self.epoch_batches(0)) // self.per_step)

    def epoch_batches(self, epoch: int) -> list[list[Slot]]:
        """Same-bucket micro-batches in a reproducible per-epoch order.

        A bucket whose sample count is not a multiple of the batch size fills its last batch by
        repeating samples of the same bucket: nothing is dropped.
        """
        batches = []
        for bucket, group in _bucket_groups(self.reader, self.slots).items():
            group = _shuffled(group, generator_for(self.seed, "order", epoch, bucket.label))
            for start in range(0, len(group), self.micro_batch_size):
                batch = group[start:start + self.micro_batch_size]
                batch += [group[i % len(group)] for i in range(self.micro_batch_size - len(batch))]
                batches.append(batch)
        batches = _shuffled(batches, generator_for(self.seed, "batches", epoch))
        return batches

    def step_batches(self, epoch: int, step_in_epoch: int, dp_rank: int, accumulation: int) -> list[list[Slot]]:
        """The micro-batches one data-parallel rank trains on at one step of an epoch.

        The last step of an epoch wraps around to the epoch's first batches to stay full.
        """
        batches = self.epoch_batches(epoch)
        first = step_in_epoch * self.per_step + dp_rank * accumulation
        return [batches[(first + j) % len(batches)] for j in range(accumulation)]


class EvalPlan:
    """Every eval sample at each fixed timestep, in micro-batches shared out over replicas."""

    def __init__(self, reader: CacheReader, micro_batch_size: int):
        self.reader = reader
        slots = [Slot(i, 0, t) for i in range(len(reader)) for t in EVAL_TIMESTEPS]
        self.batches = []
        for group in _bucket_groups(reader, slots).values():
            for start in range(0, len(group), micro_batch_size):
                batch = group[start:start + micro_batch_size]
                # Padding has weight 0: it keeps the batch shape without touching the mean.
                batch += [Slot(batch[0].index, 0, batch[0].timestep, 0.0)] * (micro_batch_size - len(batch))
                self.batches.append(batch)

    def rank_batches(self, dp_rank: int, dp_world: int) -> list[list[Slot]]:
        """This replica's share; all replicas get the same count (extra ones have weight 0)."""
        count = -(-len(self.batches) // dp_world)
        out = []
        for j in range(count):
            i = j * dp_world + dp_rank
            if i < len(self.batches):
                out.append(self.batches[i])
            else:
                out.append([Slot(s.index, 0, s.timestep, 0.0) for s in self.batches[0]])
        return out


def training_text(reader: CacheReader, slot: Slot, seed: int, epoch: int) -> str | None:
    """The text entry a training step uses for a sample: None (its caption), the empty caption's
    (with probability caption_dropout) or one of its shuffled variants, chosen uniformly. Drawn
    from a generator of its own seeded by the sample, its repeat and the epoch, never the rank:
    every layout makes the same choices, and the noise and timesteps stay as without these options."""
    c = reader.samples[slot.index]
    dropout, variants = c.sample.caption_dropout, c.variants
    if dropout <= 0 and not variants:
        return None
    g = generator_for(seed, "caption", epoch, slot.index, slot.repeat)
    if dropout > 0 and torch.rand(1, generator=g).item() < dropout:
        return c.empty_key
    if variants:
        return variants[int(torch.randint(len(variants), (1,), generator=g))][1]
    return None


def collate(example, reader: CacheReader, batch: list[Slot], seed: int, tag: str, epoch: int, train: bool = False):
    """(inputs, labels) for one micro-batch: cached tensors stacked, then noised by `example`
    (training/objective.training_example with the recipe bound, as the trainer passes it).
    `train`: caption dropout and shuffling apply (evaluation sees the captions as written)."""
    loaded = [reader.load(s.index, training_text(reader, s, seed, epoch) if train else None) for s in batch]
    latents = torch.stack([lat["latents"] for lat, _ in loaded])
    text = {k: torch.stack([txt[k] for _, txt in loaded]) for k in loaded[0][1]}
    generators = [generator_for(seed, tag, epoch, s.index, s.repeat, s.timestep) for s in batch]
    timesteps = None
    if batch[0].timestep is not None:
        timesteps = torch.tensor([s.timestep for s in batch], dtype=torch.float32)
    weights = torch.tensor([s.weight for s in batch], dtype=torch.float32)
    masks = [lat.get("mask") for lat, _ in loaded]
    mask = None
    if any(m is not None for m in masks):  # a sample without a mask (another folder's) weighs 1 everywhere
        # One mask image for all frames (a frame axis of 1) and masks per frame mix in a batch.
        shape = torch.broadcast_shapes(*(m.shape for m in masks if m is not None))
        mask = torch.stack([m.expand(shape) if m is not None else torch.ones(shape) for m in masks])
    # Whatever else the model cached with the clip (image-to-video conditions).
    conditions = {k: torch.stack([lat[k] for lat, _ in loaded]) for k in loaded[0][0] if k not in ("latents", "mask")}
    return example(latents, text, generators, timesteps=timesteps, weights=weights, mask=mask, conditions=conditions)

