"""Shared fixtures: tiny models, generated datasets, config files and real DeepSpeed launches."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from make_demo_dataset import make_demo_dataset  # noqa: E402
from make_tiny_models import make_tiny_flux, make_tiny_hunyuan_video, make_tiny_ltx_video  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """Folder holding tiny random-weight models in their real layouts (flux/, ...)."""
    root = tmp_path_factory.mktemp("tiny_models")
    make_tiny_flux(root)
    return root


# The tiny video models' original-layout single files, in their folders of `video_models`.
ORIGINAL_FILE = {"ltx-video": "ltx-video-tiny-original.safetensors",
                 "hunyuan-video": "hunyuan-video-tiny-original.safetensors"}


@pytest.fixture(scope="module")
def video_models(tmp_path_factory) -> Path:
    """Folder holding tiny LTX-Video and HunyuanVideo (ltx-video/, hunyuan-video/), made per module:
    some tests write beside them."""
    root = tmp_path_factory.mktemp("video_models")
    make_tiny_ltx_video(root)
    make_tiny_hunyuan_video(root)
    return root


@pytest.fixture
def image_dataset(tmp_path) -> Path:
    """A fresh generated image dataset (8 images, 3 aspect ratios) with captions."""
    return make_demo_dataset(tmp_path / "data", count=8, seed=0)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def to_toml(table: dict) -> str:
    """A small TOML writer: scalars first, then [tables] and [[arrays of tables]]."""
    lines, tables = [], []
    for k, v in table.items():
        if isinstance(v, dict):
            tables.append((f"[{k}]", v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v) and k == "directory":
            tables += [(f"[[{k}]]", x) for x in v]
        else:
            lines.append(f"{k} = {toml_value(v)}")
    for header, body in tables:
        lines += ["", header] + [f"{k} = {toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def write_configs(folder: Path, model_dir: Path, data_dir: Path, *, dataset: dict | None = None,
                  **overrides) -> Path:
    """Write a training TOML and its dataset TOML into `folder`; return the training TOML.

    `overrides` replace top-level keys; `model`, `adapter` and `optimizer` dicts are merged into
    the defaults (a value of None removes the table).
    """
    folder.mkdir(parents=True, exist_ok=True)
    ds = {"resolutions": [64], "enable_ar_bucket": True, "num_ar_buckets": 3,
          "directory": [{"path": str(data_dir)}]}
    ds.update(dataset or {})
    (folder / "dataset.toml").write_text(to_toml(ds))
    config = {
        "output_dir": str(folder / "runs"), "dataset": "dataset.toml", "max_steps": 4,
        "micro_batch_size_per_gpu": 2, "steps_per_print": 1, "eval_at_start": False, "save_dtype": "float32",
        "seed": 0,
        "model": {"type": "flux", "diffusers_path": str(model_dir), "dtype": "float32", "max_sequence_length": 32},
        "adapter": {"type": "lora", "rank": 4, "alpha": 4},
        "optimizer": {"type": "adamw", "lr": 1e-3},
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(config.get(k), dict):
            config[k] = {**config[k], **v}
        elif v is None:
            config.pop(k, None)
        else:
            config[k] = v
    path = folder / "train.toml"
    path.write_text(to_toml(config))
    return path


def held_out_work(root: Path, tiny_models: Path) -> dict:
    """Under `root`: 8 demo images to train on, 4 others as a held-out eval set (eval.toml), and the
    tiny FLUX.1; for `configure_held_out`."""
    data = make_demo_dataset(root / "data", count=8, seed=0)
    eval_data = make_demo_dataset(root / "eval_data", count=4, seed=1)
    (root / "eval.toml").write_text(f"resolutions = [64]\nnum_ar_buckets = 3\n\n[[directory]]\npath = \"{eval_data}\"\n")
    return {"root": root, "data": data, "model": tiny_models / "flux"}


def configure_held_out(work: dict, name: str, base: dict, eval_name: str, **overrides) -> Path:
    """The configs of run `name` in `work` (held_out_work): `base` settings with the held-out set as eval
    set `eval_name`; `overrides` replace keys (tables merged key by key)."""
    settings = {**base, "eval_datasets": [{"name": eval_name, "config": str(work["root"] / "eval.toml")}]}
    for k, v in overrides.items():
        settings[k] = {**settings[k], **v} if isinstance(v, dict) and isinstance(settings.get(k), dict) else v
    return write_configs(work["root"] / name, work["model"], work["data"], **settings)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """Result of one `deepspeed ... train.py` run."""

    def __init__(self, proc: subprocess.CompletedProcess, config: Path):
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        self.output = proc.stdout + proc.stderr
        self.config = config

    def run_dirs(self) -> list[Path]:
        runs = self.config.parent / "runs"
        return sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []

    def losses(self, run_dir: Path | None = None) -> list[float]:
        run_dir = run_dir or self.run_dirs()[-1]
        return json.loads((run_dir / "losses.json").read_text())


def launch(config: Path, *args: str, num_gpus: int = 1, timeout: int = 600, env: dict | None = None,
           launcher: bool | None = None) -> Launch:
    """Run training as users do: `deepspeed --num_gpus=N train.py --deepspeed --config X` for
    several processes (or `launcher=True`), and `python3 train.py --config X`, the README's one
    plain process, for one: DeepSpeed's launcher costs about 4 s more per launch on 2 cores
    (two more Python processes importing torch and DeepSpeed)."""
    if launcher is None:
        launcher = num_gpus > 1
    if launcher:
        cmd = ["deepspeed", f"--num_gpus={num_gpus}", f"--master_port={free_port()}", str(REPO / "train.py"),
               "--deepspeed", "--config", str(config), *args]
    else:
        assert num_gpus == 1, "several processes need DeepSpeed's launcher"
        cmd = [sys.executable, str(REPO / "train.py"), "--config", str(config), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
    return Launch(proc, config)


def eval_loss_through_diffusers(config_path: Path, transformer, items: int | None = None) -> float:
    """The eval loss of `transformer` on the run's eval set, rebuilt with the repo's own data code
    (same cache, same fixed timesteps and noise) but run through diffusers' forward (the model's
    `reference_forward`), not our layers. `items`: the eval set's expected size, checked."""
    import torch

    from config.train_config import load_train_config
    from data.batches import EvalPlan, collate
    from data.prepare import prepare_dataset
    from models import get_model_class
    from training.objective import training_example
    from utils.dist import Distributed

    config = load_train_config(config_path, get_model_class)
    s = config.settings
    model = get_model_class(config.model.type)(config.model)
    (eval_set,) = config.eval_datasets
    reader = prepare_dataset(eval_set.dataset, model, title="eval", micro_batch_size=s.micro_batch_size_per_gpu,
                             caching_batch_size=1, regenerate=False, place=Distributed.alone(),
                             log=lambda *_: None)
    assert reader.encoded == 0 and (items is None or len(reader) == items)
    total = weights = 0.0
    transformer.eval()
    for batch in EvalPlan(reader, s.micro_batch_size_per_gpu).rank_batches(0, 1):
        inputs, labels = collate(partial(training_example, model), reader, batch, s.seed, f"eval/{eval_set.name}", 0)
        with torch.no_grad():
            prediction = model.reference_forward(transformer, model.input_fields.unpack(inputs))
        # training/objective.loss, written out: per-sample MSE, weighted mean (eval padding has weight 0).
        target, w = labels
        per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        loss = (per_sample * w).sum() / w.sum()
        weight = sum(slot.weight for slot in batch)
        total += float(loss) * weight
        weights += weight
    return total / weights


class KilledRank:
    """A launch of which one rank was SIGKILLed: the launcher's output, its exit status and the
    seconds from the kill until the whole job had ended (None: still running after the wait)."""

    def __init__(self, output: str, returncode: int | None, seconds: float | None):
        self.output, self.returncode, self.seconds = output, returncode, seconds


def launch_and_kill_rank(config: Path, num_gpus: int, local_rank: int, ready, env: dict | None = None,
                         log: Path | None = None, wait: float = 90) -> KilledRank:
    """Launch as `launch` does with the deepspeed launcher, wait until `ready()` (at most 180 s),
    SIGKILL the process of `local_rank` (it can say nothing itself) and wait up to `wait` seconds
    for the job to end; whatever is left then is killed."""
    import psutil

    log = log or config.parent / "killed_rank_log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(["deepspeed", f"--num_gpus={num_gpus}", f"--master_port={free_port()}",
                                 str(REPO / "train.py"), "--deepspeed", "--config", str(config)],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})})
        deadline = time.time() + 180
        while not ready() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        # The rank itself, not a process it forked (a forked child keeps its parent's command line).
        flag = f"--local_rank={local_rank}"
        victims = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if flag in p.cmdline() and flag not in p.parent().cmdline()] if proc.poll() is None else []
        assert victims, f"rank {local_rank} was not running when it was to be killed:\n{log.read_text()[-3000:]}"
        killed = time.time()
        victims[0].kill()
        deadline = killed + wait
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        seconds = time.time() - killed if proc.poll() is not None else None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return KilledRank(log.read_text(), proc.returncode, seconds)


def assert_killed_rank_ended_the_job(result: KilledRank, local_rank: int, within: float = 60) -> None:
    """The job failed within `within` seconds of the kill, and DeepSpeed's launcher's last line gives
    how the dead rank died: exit code -9, SIGKILL, not the 1 of a rank it left behind (the line
    always shows the last local rank's command, which the tests kill)."""
    assert result.seconds is not None and result.seconds < within, \
        f"the job was still running {within:.0f} s after a rank died:\n{result.output[-3000:]}"
    assert result.returncode != 0
    assert re.search(rf"'--local_rank={local_rank}'.*exits with return code = -9", result.output), result.output[-3000:]


def wait_group_gone(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until every process of `proc`'s process group has exited; kill them all and fail after
    `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        proc.poll()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the run did not exit")


def ok(result):
    """A launch result that exited 0 (its output's tail as the failure message)."""
    assert result.returncode == 0, result.output[-5000:]
    return result


def run_folder(result) -> Path:
    """The one run folder a launch made."""
    (folder,) = result.run_dirs()
    return folder


def losses(run) -> list[float]:
    """The training losses, step by step, of a launch's run folder or of run folder `run`."""
    folder = run if isinstance(run, Path) else run_folder(run)
    return json.loads((folder / "losses.json").read_text())


def evals(run, name: str = "train") -> dict[int, float]:
    """The eval loss of eval set `name` by step, of a launch's run folder or of run folder `run`."""
    folder = run if isinstance(run, Path) else run_folder(run)
    return {e["step"]: e[name] for e in json.loads((folder / "eval.json").read_text())}
