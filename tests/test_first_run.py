"""What a new user meets first: DeepSpeed's one-time CPU op build, Ctrl-C through DeepSpeed's
launcher, and train.py run as one plain process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, wait_group_gone, write_configs
from utils.errors import ConfigError


def test_torch_extensions_are_built_per_python_environment(monkeypatch, tmp_path):
    from parallel.launch import torch_extensions_dir

    # setenv first: monkeypatch then restores the variable as it was, also when it was unset.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "unset below")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    if os.access(sys.prefix, os.W_OK):
        assert torch_extensions_dir() == Path(sys.prefix) / "torch_extensions"
        assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert torch_extensions_dir() == tmp_path  # the user's choice stands


def test_cpu_comm_op_build_needs_a_compiler_and_is_announced(monkeypatch, tmp_path):
    from parallel.launch import prepare_cpu_comm_op

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CXX", "no-such-c++")
    with pytest.raises(ConfigError) as info:
        prepare_cpu_comm_op()
    assert str(info.value).startswith("a C++ compiler is needed: on a CPU, DeepSpeed compiles its communication op "
                                      "(deepspeed_shm_comm) once per Python environment, and the compiler "
                                      "'no-such-c++' was not found; install one (Debian/Ubuntu: apt-get install g++")
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler here")
    monkeypatch.setenv("CXX", compiler)
    said = []
    prepare_cpu_comm_op(log=said.append)
    assert said == [f"compiling DeepSpeed's CPU communication op (deepspeed_shm_comm) into "
                    f"{tmp_path / 'deepspeed_shm_comm'}: once for this Python environment, about a minute"]
    # Built once: nothing more to say, and no compiler needed.
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").touch()
    monkeypatch.setenv("CXX", "no-such-c++")
    said.clear()
    prepare_cpu_comm_op(log=said.append)
    assert said == []


def start(cmd: list[str], log) -> subprocess.Popen:
    """Start `cmd` in a process group of its own, as a shell starts a foreground job."""
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def wait_for_steps(runs: Path, steps: int, proc: subprocess.Popen, log_path: Path) -> None:
    """Until the run under `runs` has logged `steps` steps."""
    deadline = time.time() + 300
    while not any(len(p.read_text().splitlines()) >= steps for p in runs.glob("*/metrics.jsonl")):
        assert time.time() < deadline and proc.poll() is None, log_path.read_text()[-3000:]
        time.sleep(0.1)


@pytest.mark.slow
def test_ctrl_c_through_the_launcher_checkpoints_and_says_where(tmp_path, tiny_models, image_dataset):
    cfg = write_configs(tmp_path / "t", tiny_models / "flux", image_dataset, max_steps=400,
                        checkpoint_every_n_steps=1000)
    runs = cfg.parent / "runs"
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = start(["deepspeed", "--num_gpus=1", f"--master_port={free_port()}", str(REPO / "train.py"),
                      "--deepspeed", "--config", str(cfg)], log)
        wait_for_steps(runs, 3, proc, log_path)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals every process of the foreground job
        returncode = proc.wait(timeout=120)
        wait_group_gone(proc)
    output = log_path.read_text()
    # DeepSpeed's launcher dies of the SIGINT itself (a shell shows 130), whatever the trainer did.
    assert returncode == -signal.SIGINT, output[-3000:]
    (run_dir,) = runs.iterdir()
    tag = (run_dir / "checkpoints" / "latest").read_text()
    step = int(tag.removeprefix("step"))
    assert 3 <= step < 400
    assert (run_dir / "checkpoints" / tag / "trainer_state.json").is_file()
    assert (f"stopped by a signal (SIGINT, Ctrl-C) at step {step}: checkpoint {run_dir / 'checkpoints' / tag} "
            f"saved; continue from it with --resume_from_checkpoint") in output


@pytest.mark.slow
def test_sigterm_to_a_plain_process_checkpoints_and_exits_143(tmp_path, tiny_models, image_dataset):
    cfg = write_configs(tmp_path / "t", tiny_models / "flux", image_dataset, max_steps=400,
                        checkpoint_every_n_steps=1000)
    runs = cfg.parent / "runs"
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = start([sys.executable, str(REPO / "train.py"), "--config", str(cfg)], log)
        wait_for_steps(runs, 3, proc, log_path)
        proc.send_signal(signal.SIGTERM)  # what a job scheduler sends
        returncode = proc.wait(timeout=120)
    output = log_path.read_text()
    assert returncode == 128 + signal.SIGTERM, output[-3000:]
    (run_dir,) = runs.iterdir()
    tag = (run_dir / "checkpoints" / "latest").read_text()
    step = int(tag.removeprefix("step"))
    assert 3 <= step < 400
    assert (run_dir / "checkpoints" / tag / "trainer_state.json").is_file()
    assert f"stopped by a signal (SIGTERM) at step {step}: checkpoint " in output
    # before saving, the run said which checkpoint stands if the save were cut off
    said = output.index(f"stop signal: saving a checkpoint of step {step}; until a line 'checkpoint ... saved' "
                        f"follows, the last complete checkpoint is none (this run has none)")
    assert said < output.index(f"step {step}: checkpoint {run_dir / 'checkpoints' / tag} saved")


@pytest.mark.slow
def test_ctrl_c_before_training_is_one_line(tmp_path, tiny_models, image_dataset):
    cfg = write_configs(tmp_path / "t", tiny_models / "flux", image_dataset)
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(cfg)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # the bucket table comes just before the encoders load
        if line.startswith("training dataset:"):
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == ("error: interrupted (SIGINT, Ctrl-C) before training started: nothing "
                                               "was trained; the cache entries encoded so far are kept")
