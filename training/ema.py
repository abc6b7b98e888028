"""An exponential moving average (EMA) of the trained weights, kept beside them.

Each process averages the trained weights it holds (its pipeline stage's LoRA, or its stage's
weights with full fine-tuning), in float32, on the GPU or in CPU memory. After every
`update_every`-th optimizer step: ema <- decay * ema + (1 - decay) * weight (Polyak and Juditsky,
"Acceleration of Stochastic Approximation by Averaging", SIAM J. Control Optim. 1992, in its
exponential form; diffusers' `training_utils.EMAModel.step` without its decay warm-up). Replicas
hold the same weights, so their averages agree without communication.
"""

from __future__ import annotations

import contextlib

import torch


class EMA:
    """The average of `params` ({name: trained parameter}); `device` None keeps it beside them."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float, update_every: int,
                 device: torch.device | None = None):
        self.params = params
        self.decay, self.update_every = decay, update_every
        self._flat = self._staging = None
        if device is None or device.type != "cpu":
            self.average = {n: p.detach().to(device or p.device, torch.float32, copy=True) for n, p in params.items()}
            return
        # In CPU memory: one flat average and one flat buffer that an update copies every weight into,
        # pinned when they come from a GPU so that the copies are queued without each waiting for the
        # last (one by one from pageable memory they took 0.5 s for FLUX.1's 131M LoRA weights on an
        # H200); then one multi-threaded lerp over the whole buffer.
        sizes = [t.numel() for t in params.values()]
        pinned = any(t.is_cuda for t in params.values())
        self._flat = torch.empty(sum(sizes), dtype=torch.float32)
        self._staging = torch.empty(sum(sizes), dtype=torch.float32, pin_memory=pinned)
        self.average = {n: v.view(t.shape) for (n, t), v in zip(params.items(), self._flat.split(sizes))}
        self._staged = [v.view(t.shape) for t, v in zip(params.values(), self._staging.split(sizes))]
        self.restart()

    @torch.no_grad()
    def restart(self) -> None:
        """Start the average again from the weights as they are now."""
        for n, t in self.average.items():
            t.copy_(self.params[n].detach())

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the weights in after optimizer step `step` (counted from 1) when it is due."""
        if step % self.update_every:
            return
        if self._flat is not None:
            for staged, weight in zip(self._staged, self.params.values()):
                staged.copy_(weight.detach(), non_blocking=True)
            if self._staging.is_pinned():
                torch.cuda.synchronize()  # the copies are asynchronous: all of them must have landed
            self._flat.lerp_(self._staging, 1.0 - self.decay)
            return
        names = list(self.params)
        averages = [self.average[n] for n in names]
        weights = [self.params[n].detach().to(averages[i].device, torch.float32) for i, n in enumerate(names)]
        # average + (weight - average) * (1 - decay), one multi-tensor kernel per device
        torch._foreach_lerp_(averages, weights, 1.0 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self):
        """Inside the block the parameters hold the averaged weights (in their own dtype); after
        it, their trained values again, bit for bit."""
        kept = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            for n, p in self.params.items():
                p.copy_(self.average[n])
            yield
        finally:
            for n, p in self.params.items():
                p.copy_(kept[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.cpu() for n, t in self.average.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.average) - set(state))
        if missing:
            raise ValueError(f"the EMA state lacks {len(missing)} weights, e.g. {missing[:2]}")
        for n, t in self.average.items():
            t.copy_(state[n])


def ema_for(transformer: torch.nn.Module, config) -> EMA:
    """The EMA an [ema] table (config/training.EmaConfig) asks for, of this process's trained weights."""
    trained = {n: p for n, p in transformer.named_parameters() if p.requires_grad and not p.is_meta}
    return EMA(trained, config.decay, config.update_every, torch.device("cpu") if config.device == "cpu" else None)
