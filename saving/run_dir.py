"""Run folders: a new one per run with redacted copies of its config files, or the one that
holds the checkpoint to resume."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from config.train_config import TrainConfig
from saving.checkpoints import CHECKPOINTS
from utils.dist import Distributed
from utils.errors import ResumeError
from utils.secrets import redact


def create_run_dir(config: TrainConfig, place: Distributed, resume: str | None, log=print) -> Path:
    """A new timestamped run folder under output_dir (never reusing another run's), or, when
    resuming, the run folder that holds the checkpoint. Rank 0 decides; all ranks agree.

    The run folder gets copies of the config files with every token or key in them replaced
    by `<redacted>` (see utils/secrets.py); a warning names the files that had one.
    """
    name, error = None, None
    if place.is_main:
        output = config.settings.output_dir
        output.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            try:
                name = find_run_with_checkpoint(output, resume).name
            except ResumeError as e:
                error = str(e)
        else:
            run_dir = _new_run_dir(output)
            name = run_dir.name
            (run_dir / "config").mkdir()
            # The config files this run used, as they were at its start.
            files = [config.file, config.dataset.file] + [e.dataset.file for e in config.eval_datasets]
            for f in dict.fromkeys(files):
                _copy_redacted(f, run_dir / "config" / f.name, log)
    name, error = place.broadcast_object((name, error))
    if error:
        raise ResumeError(error)
    return config.settings.output_dir / name


def _new_run_dir(output: Path) -> Path:
    """Create a folder named by the start time, or `<time>-2`, ... when that exists: mkdir
    fails on an existing folder, so two runs starting in the same second never share one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        run_dir = output / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise FileExistsError(f"{output}: no free run folder name for {stamp}")


def _copy_redacted(source: Path, target: Path, log) -> None:
    text = source.read_text(encoding="utf-8")
    clean, count = redact(text)
    target.write_text(clean, encoding="utf-8")
    shutil.copystat(source, target)
    if count:
        log(f"warning: {source}: {count} token or key value(s) replaced by <redacted> in the run folder's copy; "
            f"keep secrets out of config files (set HF_TOKEN in the environment, or run `hf auth login`)")


def find_run_with_checkpoint(output_dir: Path, resume: str) -> Path:
    """The run folder to resume: the newest with a complete checkpoint, or the one named
    `resume` (a run folder, or a checkpoint `step<N>` inside one)."""
    runs = sorted((p for p in output_dir.iterdir() if (p / CHECKPOINTS / "latest").is_file()),
                  key=lambda p: (p / CHECKPOINTS / "latest").stat().st_mtime)
    if resume == "latest":
        if not runs:
            raise ResumeError(f"--resume_from_checkpoint: no run in {output_dir} has a checkpoint")
        return runs[-1]
    for run in reversed(runs):
        if (run / CHECKPOINTS / resume / "trainer_state.json").is_file() or run.name == resume:
            return run
    raise ResumeError(f"--resume_from_checkpoint: no checkpoint or run named {resume!r} in {output_dir}")
