"""Faults during a run: a non-finite loss, a full disk, a cache deleted or damaged between runs,
a run killed while caching, two runs on one machine. Each test checks the message the user gets
and that nothing that was done before is lost."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, launch, write_configs
from models.flux import FluxConfig, FluxModel
from utils.batches import TrainPlan
from utils.config import load_dataset_config, load_train_config
from utils.optimizers import ClippedAdamW
from utils.prepare import prepare_dataset
from utils.tensor_store import TensorStore

CPU = torch.device("cpu")


def flux(tiny_models) -> FluxModel:
    return FluxModel(FluxConfig(type="flux", diffusers_path=str(tiny_models / "flux"), dtype="float32",
                                max_sequence_length=32))


def build_cache(model, dataset_toml: Path, log=None, **kwargs):
    """One cache build as train.py does it, in this process."""
    return prepare_dataset(load_dataset_config(dataset_toml), model, title="test", micro_batch_size=2,
                           caching_batch_size=kwargs.pop("caching_batch_size", 4), regenerate=False, rank=0, world=1,
                           device=CPU, log=log or (lambda *_: None), **kwargs)


def cached_tensors(reader) -> dict[str, tuple[dict, dict]]:
    return {f"{c.sample.item.path.name}@{c.sample.bucket.label}": reader.load(i) for i, c in enumerate(reader.samples)}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        for part_a, part_b in zip(a[name], b[name]):
            assert part_a.keys() == part_b.keys()
            for k in part_a:
                assert torch.equal(part_a[k], part_b[k]), (name, k)


def all_finite_checkpoint(step_dir: Path) -> int:
    """Number of float tensors in a DeepSpeed checkpoint folder, asserting every one is finite."""
    count = 0

    def walk(value):
        nonlocal count
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                assert torch.isfinite(value).all(), step_dir
                count += 1
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    for f in step_dir.glob("*.pt"):
        walk(torch.load(f, map_location="cpu", weights_only=False))
    return count


# ------------------------------------------------------------------------------------------------
# Non-finite loss


def test_non_finite_gradient_skips_the_optimizer_step():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 3))
    opt = ClippedAdamW([weight], lr=0.1)
    opt.max_grad_norm = 1.0
    weight.grad = torch.ones(4, 3)
    opt.step()  # a good step: moves the weight and fills the Adam state
    assert not opt.skipped_step
    before = weight.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[weight].items()}

    for poison in (float("nan"), float("inf")):
        weight.grad = torch.ones(4, 3)
        weight.grad[1, 2] = poison
        opt.step()
        assert opt.skipped_step and not math.isfinite(opt._global_grad_norm)
        assert torch.equal(weight.detach(), before)  # not one weight moved
        for k, v in opt.state[weight].items():
            assert torch.equal(v, state_before[k]), k

    weight.grad = torch.ones(4, 3)
    opt.step()
    assert not opt.skipped_step and not torch.equal(weight.detach(), before)


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_files_and_keeps_the_last_good_checkpoint(tmp_path, tiny_models, image_dataset):
    cfg = write_configs(tmp_path / "nan", tiny_models / "flux", image_dataset, max_steps=6,
                        checkpoint_every_n_steps=1, checkpoints_to_keep=10)
    config = load_train_config(cfg)
    reader = build_cache(flux(tiny_models), config.dataset.file)
    # Poison the cached latent of a sample that step 3 trains and steps 1 and 2 do not.
    plan = TrainPlan(reader, 2, 1, config.seed)
    steps = [[slot.index for batch in plan.step_batches(0, i, 0, 1) for slot in batch] for i in range(3)]
    index = next(i for i in steps[2] if i not in steps[0] + steps[1])
    poisoned = reader.samples[index]
    latents = reader.load(index)[0]["latents"]
    store = TensorStore(poisoned.folder / "cache" / "flux" / "latents")
    store.write_part([(poisoned.latent_key, {"latents": torch.full_like(latents, float("nan"))})])

    result = launch(cfg)

    assert result.returncode == 1, result.output[-4000:]
    assert "Traceback" not in result.output
    (run_dir,) = result.run_dirs()
    checkpoints = run_dir / "checkpoints"
    message = result.stderr[result.stderr.index("error: step 3: the loss is nan"):]
    assert "The optimizer skipped this step, so no weight changed." in message
    batch_line = next(line for line in message.splitlines() if line.startswith("the step's batch: "))
    assert str(poisoned.sample.item.path) in batch_line
    assert f"non-finite values in the cached tensors of: {poisoned.sample.item.path} (latents)" in message
    assert f"the last good checkpoint, {checkpoints / 'step00000002'}, is kept" in message
    # Nothing from before the NaN is lost, nothing after it is trusted.
    assert (checkpoints / "latest").read_text() == "step00000002"
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step00000001", "step00000002"]
    assert all_finite_checkpoint(checkpoints / "step00000002") > 0
    losses = json.loads((run_dir / "losses.json").read_text())
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert not (run_dir / "adapters" / "final").exists()

    # A rebuilt cache and a resume from that checkpoint finish the run.
    resumed = launch(cfg, "--resume_from_checkpoint", "--regenerate_cache")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "starting at step 2" in resumed.output
    losses = json.loads((run_dir / "losses.json").read_text())
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert all(torch.isfinite(t).all() for t in
               load_file(run_dir / "adapters" / "final" / "pytorch_lora_weights.safetensors").values())


# ------------------------------------------------------------------------------------------------
# Two runs on one machine


@pytest.mark.slow
def test_two_runs_with_the_default_port_on_one_machine_both_train(tmp_path, tiny_models, image_dataset):
    """Both launched as `deepspeed train.py ...` without --master_port, at the same moment, on one
    dataset and one output folder; one has 2 processes. Port 29500 is even held by a third party."""
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 29500))
        holder.listen()
    except OSError:
        pass  # something already holds it: just as good
    cfg = write_configs(tmp_path / "shared", tiny_models / "flux", image_dataset, max_steps=3,
                        micro_batch_size_per_gpu=1)
    procs = []
    try:
        for n, gpus in ((0, 2), (1, 1)):
            log = open(tmp_path / f"run{n}.log", "w")
            cmd = ["deepspeed", f"--num_gpus={gpus}", "--master_port=29500", str(REPO / "train.py"), "--deepspeed",
                   "--config", str(cfg)]
            procs.append((subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                           env={**os.environ, "OMP_NUM_THREADS": "1"}), log))
        codes = [proc.wait(timeout=600) for proc, _ in procs]
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
        holder.close()
    outputs = [(tmp_path / f"run{n}.log").read_text() for n in range(2)]
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    runs = sorted(p for p in (cfg.parent / "runs").iterdir())
    assert len(runs) == 2  # a folder each, even when both start in the same second
    for run_dir in runs:
        assert len(json.loads((run_dir / "losses.json").read_text())) == 3
        assert (run_dir / "adapters" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"trainer-rendezvous-*-{procs[0][0].pid}-*"))
