"""TensorBoard scalars, optionally Weights & Biases, and the console progress bar (rank 0 only)."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory since the last reset; host RSS peak on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def start_wandb(monitoring, run_dir: Path):
    """A Weights & Biases run for `monitoring` ([monitoring] of the config), its files in
    <run>/wandb/. The API key goes to wandb in memory only (wandb.Settings), never into a file
    this trainer writes; without one, wandb uses `wandb login` or WANDB_API_KEY."""
    import wandb  # optional: only runs that turn Weights & Biases on need it

    settings = wandb.Settings(api_key=monitoring.wandb_api_key) if monitoring.wandb_api_key else None
    return wandb.init(project=monitoring.wandb_tracker_name or None, name=monitoring.wandb_run_name or run_dir.name,
                      dir=str(run_dir), settings=settings)


class Metrics:
    """Writes scalars to TensorBoard (and W&B when configured) and shows a progress bar with loss and ETA."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, monitoring=None):
        self.enabled = enabled
        self.writer = SummaryWriter(str(run_dir / "tensorboard")) if enabled else None
        self.wandb = start_wandb(monitoring, run_dir) if enabled and monitoring and monitoring.enable_wandb else None
        self.jsonl_path = run_dir / "metrics.jsonl"
        if enabled and self.jsonl_path.exists():
            # A resumed run: drop the lines of steps after the checkpoint, they are trained again.
            lines = self.jsonl_path.read_text().splitlines()
            kept = [line for line in lines if json.loads(line).get("step", 0) <= start_step]
            self.jsonl_path.write_text("".join(line + "\n" for line in kept))
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                        disable=not enabled, dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def record(self, values: dict[str, float]) -> None:
        """Append one step's values to metrics.jsonl (machine-readable, e.g. for benchmarks)."""
        if self.enabled:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps(values) + "\n")

    def step(self, values: dict[str, float]) -> None:
        if self.enabled:
            self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in values.items()}, refresh=False)
            self.bar.update(1)

    def print(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            if self.wandb is not None:
                self.wandb.finish()
