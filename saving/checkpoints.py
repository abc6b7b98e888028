"""Training checkpoints: atomic, pruned, refused when the config changes what they mean."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import torch
from deepspeed.runtime.zero.utils import ZeRORuntimeException

from config.train_config import TrainConfig
from utils.atomic import write_json_atomic, write_text_atomic
from utils.dist import Distributed
from utils.errors import ConfigError, ResumeError
from utils.faults import disk_full, disk_full_error, pause_for_fault_tests, remove_quietly
from utils.secrets import redacted


CHECKPOINTS = "checkpoints"


def run_fingerprint(config: TrainConfig, samples) -> dict:
    """What a checkpoint's weights mean: resuming with any of these changed is refused.

    The learning rate, schedule, epochs and save settings are not part of it: changing them
    on resume is allowed.
    """
    m, a = config.model, config.settings.adapter
    digest = hashlib.sha256()
    for c in sorted(samples, key=lambda c: (c.latent_key, c.text_key)):
        digest.update(f"{c.latent_key} {c.text_key} {c.sample.repeats}\n".encode())
    # Redacted: trainer_state.json lands in the run folder.
    return {"model": redacted(f"{m.type} {m.diffusers_path} transformer_path={m.transformer_path} dtype={m.dtype}"),
            "adapter": None if a is None else f"{a.type} rank={a.rank} alpha={a.alpha} "
                                              f"targets={a.target_modules} dtype={a.dtype}"
                                              + (f" include={a.target_include} exclude={a.target_exclude}"
                                                 if a.target_include or a.target_exclude else "")
                                              # the optimizer state has a param group per learning rate
                                              + (f" lora_plus={a.lora_plus_ratio}"
                                                 if a.lora_plus_ratio not in (None, 1) else "")
                                              + (" dora" if a.use_dora else ""),
            # None for LoRA runs: the "adapter" entry says what trains.
            "full_finetune": None if a is not None else f"dtype={config.trained_dtype}",
            "dataset": f"{len(samples)} samples, content {digest.hexdigest()[:12]}",
            "pipeline_stages": config.settings.pipeline_stages,
            # ZeRO-1 checkpoints hold the optimizer state in per-replica slices; None when off, so
            # checkpoints from before it existed still match.
            "zero_stage": config.settings.zero_stage or None}


class Checkpoints:
    """Whole-training-state checkpoints in `<run>/checkpoints/`, atomic and pruned.

    A checkpoint is a folder `step<N>` written by DeepSpeed (trainable weights, optimizer and
    scheduler per pipeline stage), plus every rank's random state and `trainer_state.json`
    (step, and the fingerprint of what the weights mean). It counts only once the file `latest`
    names it; `latest` is replaced atomically after every rank has finished writing, so a
    process killed at any moment (even `kill -9`) leaves the previous checkpoint loadable.
    """

    def __init__(self, run_dir: Path, keep: int, place: Distributed):
        self.root = run_dir / CHECKPOINTS
        self.keep, self.place = keep, place

    def latest(self) -> str | None:
        try:
            return (self.root / "latest").read_text().strip() or None
        except OSError:
            return None

    def save(self, engine, step: int, fingerprint: dict, ema=None) -> str:
        """Write checkpoint `step<step>` on every rank; raises DiskFullError when the disk is
        full, with the half-written checkpoint removed and `latest` unchanged."""
        tag = f"step{step:08d}"
        if self.place.is_main and (self.root / tag).exists():
            shutil.rmtree(self.root / tag)  # an earlier, unfinished save of this step
        self.place.barrier()
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step}, save_latest=False,
                                   exclude_frozen_parameters=True)
            torch.save(_random_states(), self.root / tag / f"random_state_rank{self.place.rank:04d}.pt")
            if ema is not None:
                torch.save(ema.state_dict(), self.root / tag / f"ema_rank{self.place.rank:04d}.pt")
            self.place.barrier()
            # trainer_state.json only once every rank's files are complete: a checkpoint named
            # on the command line is trusted by it.
            if self.place.is_main:
                write_json_atomic(self.root / tag / "trainer_state.json", {"step": step, "fingerprint": fingerprint})
            pause_for_fault_tests(f"checkpoint{step}")
            if self.place.is_main:
                write_text_atomic(self.root / "latest", tag)
                self._prune(tag)
        except Exception as e:
            if not disk_full(e, self.root):
                raise
            remove_quietly(self.root / tag)
            latest = self.latest()
            kept = (f"The last complete checkpoint, {self.root / latest}, is kept: resume from it with "
                    f"--resume_from_checkpoint." if latest else "There is no earlier checkpoint of this run.")
            raise disk_full_error(self.root / tag, f"the checkpoint of step {step}", kept) from e
        self.place.barrier()
        return tag

    def _prune(self, newest: str) -> None:
        done = sorted(p for p in self.root.glob("step*") if p.is_dir() and p.name <= newest)
        for old in done[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        # Unfinished saves newer than `latest` (a killed run) are never trusted: remove them.
        for unfinished in (p for p in self.root.glob("step*") if p.is_dir() and p.name > newest):
            shutil.rmtree(unfinished, ignore_errors=True)

    def load(self, engine, tag: str | None, fingerprint: dict, ema=None) -> int:
        """Restore the training state (and the EMA's, when the checkpoint has one: a run that
        turns EMA on at resume starts its average from the checkpoint's weights); returns the
        step to continue from.

        Refuses a checkpoint whose fingerprint (model, adapter, dataset, pipeline split)
        differs from this run's, naming each difference.
        """
        tag = tag or self.latest()
        if tag is None or not (self.root / tag / "trainer_state.json").is_file():
            raise ResumeError(f"--resume_from_checkpoint: no complete checkpoint {tag or ''} in {self.root}")
        state = json.loads((self.root / tag / "trainer_state.json").read_text())
        differences = [f"{key}: checkpoint has {state['fingerprint'].get(key)!r}, this run has {value!r}"
                       for key, value in fingerprint.items() if state["fingerprint"].get(key) != value]
        if differences:
            raise ConfigError("cannot resume: the config changes what the checkpoint means\n  "
                              + "\n  ".join(differences))
        try:
            path, _ = engine.load_checkpoint(str(self.root), tag=tag, load_module_strict=False)
        except ZeRORuntimeException as e:  # zero_stage = 1 slices made for another number of replicas
            raise ResumeError(f"cannot resume from {self.root / tag}: {e} (zero_stage = 1: resume with as many "
                              f"replicas, number of GPUs / pipeline_stages, as the checkpoint was written with)") from None
        if path is None:
            raise ResumeError(f"--resume_from_checkpoint: DeepSpeed could not load {self.root / tag}")
        random_file = self.root / tag / f"random_state_rank{self.place.rank:04d}.pt"
        if random_file.is_file():
            _set_random_states(torch.load(random_file, weights_only=False))
        if ema is not None:
            ema_file = self.root / tag / f"ema_rank{self.place.rank:04d}.pt"
            if ema_file.is_file():
                ema.load_state_dict(torch.load(ema_file, weights_only=True))
            else:
                ema.restart()  # the average was made from the weights before they loaded
        return int(state["step"])


def _random_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_random_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
