"""Run folders, adapter files and training checkpoints."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from utils.config import TrainConfig

CHECKPOINTS = "checkpoints"


def create_run_dir(config: TrainConfig, rank: int, world: int, resume: str | None) -> Path:
    """A new timestamped run folder under output_dir (never reusing another run's), or, when
    resuming, the run folder that holds the checkpoint. Rank 0 decides; all ranks agree."""
    name = None
    if rank == 0:
        output = config.output_dir
        output.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            name = find_run_with_checkpoint(output, resume).name
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name, n = stamp, 1
            while (output / name).exists():
                n += 1
                name = f"{stamp}-{n}"
            run_dir = output / name
            (run_dir / "config").mkdir(parents=True)
            # The config files this run used, as they were at its start.
            files = [config.file, config.dataset.file] + [e.dataset.file for e in config.eval_datasets]
            for f in dict.fromkeys(files):
                shutil.copy2(f, run_dir / "config" / f.name)
    if world > 1:
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    return config.output_dir / name


def find_run_with_checkpoint(output_dir: Path, resume: str) -> Path:
    """The run folder to resume: the newest one with a checkpoint, or the one holding `resume`."""
    runs = sorted((p for p in output_dir.iterdir() if (p / CHECKPOINTS / "latest").is_file()),
                  key=lambda p: p.stat().st_mtime)
    if resume == "latest":
        if not runs:
            raise FileNotFoundError(f"--resume_from_checkpoint: no run in {output_dir} has a checkpoint")
        return runs[-1]
    for run in reversed(runs):
        if (run / CHECKPOINTS / resume).is_dir() or run.name == resume:
            return run
    raise FileNotFoundError(f"--resume_from_checkpoint: no checkpoint or run named {resume!r} in {output_dir}")


def gather_adapter(model, transformer, engine, rank: int, world: int) -> dict[str, torch.Tensor] | None:
    """All LoRA weights on rank 0 (each pipeline stage holds a slice); None elsewhere."""
    local = model.lora_state_dict(transformer) if engine.grid.get_data_parallel_rank() == 0 else {}
    if world == 1:
        return local
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(local, gathered, dst=0)
    if rank != 0:
        return None
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


def save_adapter(model, transformer, engine, adapter, out_dir: Path, dtype: torch.dtype, rank: int,
                 world: int) -> list[Path]:
    """Write the adapter files to `out_dir` atomically (a temporary folder renamed at the end)."""
    lora = gather_adapter(model, transformer, engine, rank, world)
    if rank != 0:
        return []
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    files = model.save_lora(lora, adapter, tmp, dtype)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return [out_dir / f.name for f in files]


def save_checkpoint(engine, run_dir: Path, step: int) -> None:
    """Full training state (trainable weights, optimizer, scheduler, step) via DeepSpeed."""
    engine.save_checkpoint(str(run_dir / CHECKPOINTS), tag=f"step{step:08d}", client_state={"step": step},
                           exclude_frozen_parameters=True)


def load_checkpoint(engine, run_dir: Path, resume: str) -> int:
    """Restore the training state; returns the step to continue from."""
    tag = None if resume == "latest" or resume == run_dir.name else resume
    path, client = engine.load_checkpoint(str(run_dir / CHECKPOINTS), tag=tag, load_module_strict=False)
    if path is None:
        raise FileNotFoundError(f"--resume_from_checkpoint: could not load a checkpoint from {run_dir}")
    return int(client["step"])
