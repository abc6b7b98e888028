"""Checkpoints: exact resume, kill -9 during a save, resuming a finished run, and refusing a
changed config. (SIGINT and SIGTERM: tests/test_first_run.py.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, free_port, launch, wait_group_gone, write_configs
from tools.make_demo_dataset import make_demo_dataset


def adapter(run_dir, name="final"):
    return load_file(run_dir / "adapters" / name / "pytorch_lora_weights.safetensors")


def assert_same_adapter(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def start(config, *args, env=None, log=None):
    """Launch in its own process group, so a test can signal or kill the whole run."""
    cmd = ["deepspeed", "--num_gpus=1", f"--master_port={free_port()}", str(REPO / "train.py"), "--deepspeed",
           "--config", str(config), *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})})


def wait_for(path_fn, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path_fn():
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_models):
    """An uninterrupted 8-step run with a checkpoint every 2 steps, launched once for the module."""
    root = tmp_path_factory.mktemp("reference")
    data = make_demo_dataset(root / "data", count=8, seed=0)
    cfg = write_configs(root / "ref", tiny_models / "flux", data, max_steps=8,
                        checkpoint_every_n_steps=2, checkpoints_to_keep=2, adapter={"dropout": 0.0})
    run = launch(cfg)
    assert run.returncode == 0, run.output[-3000:]
    return cfg, run


@pytest.fixture
def reference(reference_run, tmp_path):
    """The reference run's config and run folder, copied for a test to resume and change at will."""
    cfg, run = reference_run
    folder = tmp_path / "ref"
    shutil.copytree(cfg.parent, folder)
    copy = folder / cfg.name
    copy.write_text(cfg.read_text().replace(str(cfg.parent), str(folder)))
    return copy, run


@pytest.mark.slow
def test_resume_is_exact_and_old_checkpoints_are_pruned(reference):
    cfg, ref = reference
    run_dir = next((cfg.parent / "runs").iterdir())
    # keep 2: steps 2 and 4 were deleted once 6 and 8 were complete
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step00000006", "step00000008"]
    ref_losses = ref.losses()
    ref_adapter = adapter(ref.run_dirs()[-1])
    resumed = launch(cfg, "--resume_from_checkpoint", "step00000006")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"starting at step 6 (resumed from {run_dir / 'checkpoints' / 'step00000006'})" in resumed.output
    # losses.json: steps 1-6 kept from before, 7-8 trained again: identical to the uninterrupted run
    assert resumed.losses(run_dir) == pytest.approx(ref_losses, rel=1e-6, abs=0)
    assert_same_adapter(adapter(run_dir), ref_adapter)


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_and_writes_nothing(reference):
    # `python3 train.py`: one process without DeepSpeed's launcher, as the README offers.
    cfg, _ = reference
    run_dir = next((cfg.parent / "runs").iterdir())
    files = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(cfg), "--resume_from_checkpoint"],
                            cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f"starting at step 8 (resumed from {run_dir / 'checkpoints' / 'step00000008'})" in result.stdout
    assert ("nothing to train: the checkpoint is at step 8, the end of this config's 8 steps, so nothing was "
            "trained or saved (raise max_steps or epochs to train longer)") in result.stdout
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == files


@pytest.mark.slow
def test_kill_9_during_a_save_loses_nothing_before_it(reference, tmp_path):
    cfg, ref = reference
    ref_losses = ref.losses()
    out = cfg.parent / "runs2"
    cfg2 = cfg.with_name("train2.toml")
    cfg2.write_text(cfg.read_text().replace(str(cfg.parent / "runs"), str(out)))
    with open(tmp_path / "log.txt", "w") as log:
        proc = start(cfg2, env={"TRAINER_TEST_PAUSE_AT": "checkpoint4:60"}, log=log)
        # The save of step 4 has written its files and now waits before moving `latest`: kill -9 there.
        wait_for(lambda: any(out.glob("*/checkpoints/step00000004/trainer_state.json")))
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        wait_group_gone(proc)
    run_dir = next(out.iterdir())
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000002"
    resumed = launch(cfg2, "--resume_from_checkpoint")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "starting at step 2" in resumed.output
    assert resumed.losses(run_dir) == pytest.approx(ref_losses, rel=1e-6, abs=0)
    assert_same_adapter(adapter(run_dir), adapter(ref.run_dirs()[-1]))
    # the unfinished save was replaced by a complete one, never trusted as it was
    assert (run_dir / "checkpoints" / "step00000008" / "trainer_state.json").is_file()


@pytest.mark.slow
def test_resume_refuses_a_changed_adapter_but_allows_a_new_learning_rate(reference):
    cfg, ref = reference
    text = cfg.read_text()
    cfg.write_text(text.replace("rank = 4", "rank = 8"))
    refused = launch(cfg, "--resume_from_checkpoint")
    assert refused.returncode == 2
    assert "cannot resume" in refused.stderr and "adapter: checkpoint has 'lora rank=4" in refused.stderr
    assert "Traceback" not in refused.output
    cfg.write_text(text.replace("lr = 0.001", "lr = 0.0005").replace("max_steps = 8", "max_steps = 10"))
    allowed = launch(cfg, "--resume_from_checkpoint")
    assert allowed.returncode == 0, allowed.output[-3000:]
    assert "starting at step 8" in allowed.output
    assert len(allowed.losses()) == 10


@pytest.mark.slow
def test_resume_with_two_pipeline_stages_is_exact(tmp_path, tiny_models, image_dataset):
    cfg = write_configs(tmp_path / "pp", tiny_models / "flux", image_dataset, max_steps=6, pipeline_stages=2,
                        checkpoint_every_n_steps=2, checkpoints_to_keep=5)
    full = launch(cfg, num_gpus=2)
    assert full.returncode == 0, full.output[-3000:]
    run_dir = full.run_dirs()[-1]
    ref_losses, ref_adapter = full.losses(), adapter(run_dir)
    # each stage wrote its own optimizer state
    assert len(list((run_dir / "checkpoints" / "step00000004").glob("mp_rank_*_model_states.pt"))) == 2
    resumed = launch(cfg, "--resume_from_checkpoint", "step00000004", num_gpus=2)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "starting at step 4" in resumed.output
    assert resumed.losses(run_dir) == pytest.approx(ref_losses, rel=1e-6, abs=0)
    assert_same_adapter(adapter(run_dir), ref_adapter)
