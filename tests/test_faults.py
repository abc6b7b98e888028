"""Faults during a run: a non-finite loss, a full disk, a cache deleted or damaged between runs,
a run killed while caching, two runs on one machine. Each test checks the message the user gets
and that nothing that was done before is lost."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from config.dataset_config import load_dataset_config
from config.train_config import load_train_config
from conftest import REPO, assert_killed_rank_ended_the_job, free_port, launch, launch_and_kill_rank, write_configs
from data.batches import TrainPlan
from data.prepare import prepare_dataset
from data.tensor_store import TensorStore
from models import get_model_class
from models.flux import FluxConfig, FluxModel
from training.lora import add_lora
from training.optimizers import ClippedAdamW
from utils.dist import Distributed

CPU = torch.device("cpu")


def flux(tiny_models) -> FluxModel:
    return FluxModel(FluxConfig(type="flux", diffusers_path=str(tiny_models / "flux"), dtype="float32",
                                max_sequence_length=32))


def build_cache(model, dataset_toml: Path, log=None, **kwargs):
    """One cache build as train.py does it, in this process."""
    return prepare_dataset(load_dataset_config(dataset_toml), model, title="test", micro_batch_size=2,
                           caching_batch_size=kwargs.pop("caching_batch_size", 4), regenerate=False,
                           place=Distributed.alone(CPU), log=log or (lambda *_: None), **kwargs)


def cached_tensors(reader) -> dict[str, tuple[dict, dict]]:
    return {f"{c.sample.item.path.name}@{c.sample.bucket.label}": reader.load(i) for i, c in enumerate(reader.samples)}


def assert_same_tensors(a: dict, b: dict, atol: float = 0.0):
    """Equal, or within `atol` where entries were encoded in other batches (CPU kernels round
    slightly differently by batch size)."""
    assert a.keys() == b.keys()
    for name in a:
        for part_a, part_b in zip(a[name], b[name]):
            assert part_a.keys() == part_b.keys()
            for k in part_a:
                assert part_a[k].shape == part_b[k].shape and part_a[k].dtype == part_b[k].dtype
                assert torch.allclose(part_a[k], part_b[k], rtol=0, atol=atol), (name, k)


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
    config = load_train_config(cfg, get_model_class)
    reader = build_cache(flux(tiny_models), config.dataset.file)
    # Poison the cached latent of a sample that step 3 trains and steps 1 and 2 do not.
    plan = TrainPlan(reader, 2, 1, config.settings.seed)
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
            # An address of their own only to find their shared memory afterwards (they use a file to meet).
            cmd = ["deepspeed", f"--num_gpus={gpus}", "--master_port=29500", "--master_addr=127.0.0.2",
                   str(REPO / "train.py"), "--deepspeed", "--config", str(cfg)]
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
    # Nothing left behind: DeepSpeed's shared memory (64 MiB a process, on CPU) is released.
    assert [n for n in os.listdir("/dev/shm") if "_127.0.0.2_" in n] == []


# ------------------------------------------------------------------------------------------------
# Disk full


def store_contents(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    store = TensorStore(root)
    return {key: store.get(key) for key in store.index}


def no_leftovers(folder: Path) -> list[Path]:
    """Temporary files or folders under `folder` that a crash could have left."""
    return [p for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]


def test_disk_full_while_caching_keeps_the_cache_and_the_next_run_continues(tmp_path, tiny_models, monkeypatch):
    from tools.make_demo_dataset import make_demo_dataset
    import datasets

    data = make_demo_dataset(tmp_path / "data", count=6, seed=0)
    for extra in ("shape_004", "shape_005"):  # added to the dataset after the first run
        for suffix in (".png", ".txt"):
            (data / (extra + suffix)).rename(tmp_path / (extra + suffix))
    toml = tmp_path / "dataset.toml"
    toml.write_text(f'resolutions = [64]\nnum_ar_buckets = 3\n\n[[directory]]\npath = "{data.name}"\n')
    model = flux(tiny_models)
    first = cached_tensors(build_cache(model, toml))
    latents_root = data / "cache" / "flux" / "latents"
    before = store_contents(latents_root)
    for extra in ("shape_004", "shape_005"):
        for suffix in (".png", ".txt"):
            (tmp_path / (extra + suffix)).rename(data / (extra + suffix))

    real_save = datasets.Dataset.save_to_disk

    def full_disk(self, path, *args, **kwargs):
        # Half a file, then no more room: what a full disk does to the Arrow writer.
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"\xff" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full_disk)
    with pytest.raises(OSError) as info:
        build_cache(model, toml)
    message = str(info.value)
    assert message.startswith(f"disk full: cannot write 2 cache entries to {data / 'cache' / 'flux' / 'text'} (")
    assert message.endswith("free). The cache entries written before are kept, and the next run encodes only what "
                            "is missing. Free some space on that disk and run again.")
    assert no_leftovers(data / "cache") == []  # the half-written part is gone
    after = store_contents(latents_root)
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key]["latents"], before[key]["latents"])

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", real_save)
    printed = []
    reader = build_cache(model, toml, log=printed.append)
    assert "cache: 4 new entries encoded, 6 samples ready" in printed  # only the two new items, text and latent
    again = cached_tensors(reader)
    assert_same_tensors(first, {k: v for k, v in again.items() if k in first})


def _fake_engine(save):
    class Engine:
        def save_checkpoint(self, root, tag, **kwargs):
            save(Path(root) / tag)
    return Engine()


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from saving.checkpoints import Checkpoints
    from utils import faults

    checkpoints = Checkpoints(tmp_path / "run", keep=3, place=Distributed.alone())

    def good(folder):
        folder.mkdir(parents=True)
        torch.save({"lora": torch.ones(3)}, folder / "layer_01-model_states.pt")

    assert checkpoints.save(_fake_engine(good), 2, {"model": "m"}) == "step00000002"
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}

    def full(folder):
        folder.mkdir(parents=True)
        (folder / "layer_01-model_states.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 50)  # cut short
        # torch.save's own words for a full disk, which say nothing of the disk:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(faults, "free_bytes", lambda path: 4096)  # what is left on that disk
    with pytest.raises(OSError) as info:
        checkpoints.save(_fake_engine(full), 4, {"model": "m"})
    root = tmp_path / "run" / "checkpoints"
    assert str(info.value) == (f"disk full: cannot write the checkpoint of step 4 to {root / 'step00000004'} (4.0 "
                               f"KiB free). The last complete checkpoint, {root / 'step00000002'}, is kept: resume "
                               f"from it with --resume_from_checkpoint. Free some space on that disk and run again.")
    assert not (root / "step00000004").exists() and no_leftovers(tmp_path) == []
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    assert checkpoints.latest() == "step00000002"

    # Any other failure is not called a full disk.
    monkeypatch.setattr(faults, "free_bytes", lambda path: 50 * 2**30)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        checkpoints.save(_fake_engine(full), 4, {"model": "m"})


def test_disk_full_while_saving_the_adapter_keeps_the_previous_one(tmp_path, tiny_models, monkeypatch):
    import safetensors.torch

    import saving.export
    from config.training import AdapterConfig
    from saving.export import save_adapter

    model = flux(tiny_models)
    adapter = AdapterConfig(rank=4, alpha=4.0)
    transformer = model.build_empty_transformer()
    add_lora(model, transformer, adapter)
    lora = {n.replace(".default.", "."): torch.full(p.shape, 0.5) for n, p in transformer.named_parameters()
            if "lora_" in n}
    # What this process gathers (its materialised LoRA weights), replaced where save_adapter reads it.
    monkeypatch.setattr(sys.modules[save_adapter.__module__], "lora_state_dict", lambda transformer: lora)
    final = tmp_path / "run" / "adapters" / "final"
    save_adapter(model, transformer, adapter, final, torch.float32, Distributed.alone())
    before = {p.name: p.read_bytes() for p in final.iterdir()}

    real_save_file = saving.export.save_file

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 64)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(saving.export, "save_file", full_disk)
    lora = {k: v * 2 for k, v in lora.items()}
    with pytest.raises(OSError) as info:
        save_adapter(model, transformer, adapter, final, torch.float32, Distributed.alone())
    assert str(info.value).startswith(f"disk full: cannot write the adapter to {final} (")
    assert str(info.value).endswith("free). Earlier adapters and checkpoints are kept; final is unchanged. Free some "
                                    "space on that disk and run again.")
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    assert no_leftovers(tmp_path) == []
    monkeypatch.setattr(saving.export, "save_file", real_save_file)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a disk that really fills up (mounting needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the disk-full tests above simulate one")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_disk_full_during_training_keeps_the_last_checkpoint_and_resumes(tmp_path, tiny_models, image_dataset,
                                                                          small_disk):
    cfg = write_configs(tmp_path / "full", tiny_models / "flux", image_dataset, max_steps=12,
                        checkpoint_every_n_steps=1, checkpoints_to_keep=100, output_dir=str(small_disk / "runs"))
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 1000 * 1024))  # room for about 3 checkpoints
    result = launch(cfg)
    assert result.returncode == 1, result.output[-4000:]
    assert "Traceback" not in result.output
    (run_dir,) = [p for p in (small_disk / "runs").iterdir()]
    root = run_dir / "checkpoints"
    match = re.search(r"error: disk full: cannot write the checkpoint of step (\d+) to (\S+) \(.* free\)\. The last "
                      r"complete checkpoint, (\S+), is kept: resume from it with --resume_from_checkpoint\. Free some "
                      r"space on that disk and run again\.", result.stderr)
    assert match, result.stderr[-3000:]
    step = int(match.group(1))
    assert 1 < step < 12 and match.group(3) == str(root / f"step{step - 1:08d}")
    assert (root / "latest").read_text() == f"step{step - 1:08d}"
    assert not (root / f"step{step:08d}").exists() and no_leftovers(run_dir) == []
    assert all_finite_checkpoint(root / f"step{step - 1:08d}") > 0

    filler.unlink()  # space freed: the run continues from its last checkpoint
    resumed = launch(cfg, "--resume_from_checkpoint")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert f"starting at step {step - 1}" in resumed.output
    assert len(json.loads((run_dir / "losses.json").read_text())) == 12


# ------------------------------------------------------------------------------------------------
# The cache deleted or damaged between runs


@pytest.fixture
def cached(tmp_path, tiny_models, image_dataset):
    """A dataset with its cache built once: (model, dataset TOML, the cached tensors)."""
    toml = tmp_path / "dataset.toml"
    toml.write_text(f'resolutions = [64]\nnum_ar_buckets = 3\n\n[[directory]]\npath = "{image_dataset.name}"\n')
    model = flux(tiny_models)
    return model, toml, cached_tensors(build_cache(model, toml))


def test_deleted_cache_is_rebuilt(cached, image_dataset):
    model, toml, before = cached
    shutil.rmtree(image_dataset / "cache")
    printed = []
    reader = build_cache(model, toml, log=printed.append)
    assert "cache: 16 new entries encoded, 8 samples ready" in printed
    assert_same_tensors(before, cached_tensors(reader))


# (store, how it is damaged, the reason reported for it)
DAMAGE = {
    "truncated arrow file": ("latents", lambda part: _truncate(next(part.glob("*.arrow"))),
                             r"file data-00000-of-00001\.arrow has \d+ bytes, \d+ were written"),
    "garbage over the arrow file": ("text", lambda part: _scribble(next(part.glob("*.arrow"))),
                                    r"cannot be read \(\w+: .*\)"),
    "state.json deleted": ("latents", lambda part: (part / "state.json").unlink(), r"lacks its file state\.json"),
    "dataset_info.json garbage": ("text", lambda part: (part / "dataset_info.json").write_text("{not json"),
                                  r"file dataset_info\.json has 9 bytes, \d+ were written"),
    "part folder emptied": ("latents", lambda part: [f.unlink() for f in part.iterdir()], r"is incomplete \(no state\.json\)"),
}


def _truncate(f: Path):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _scribble(f: Path):
    size = f.stat().st_size
    f.write_bytes(os.urandom(size))  # same size: only reading it can tell


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_cache_part_is_reported_and_rebuilt(cached, image_dataset, damage):
    model, toml, before = cached
    kind, do, reason = DAMAGE[damage]
    (part,) = (image_dataset / "cache" / "flux" / kind).glob("part-*")
    do(part)
    printed = []
    reader = build_cache(model, toml, log=printed.append)
    text = "\n".join(printed)
    assert re.search(f"cache: 1 damaged part\\(s\\) are left out, removed, and their entries encoded again:\n"
                     f"  {re.escape(str(part))}: {reason}\n", text + "\n"), text
    assert "cache: 8 new entries encoded, 8 samples ready" in printed  # exactly that part's 8 entries
    assert not part.exists()
    assert_same_tensors(before, cached_tensors(reader))
    printed.clear()
    build_cache(model, toml, log=printed.append)
    assert "cache: 0 new entries encoded, 8 samples ready" in printed and "damaged part" not in "\n".join(printed)


def test_cache_folder_replaced_by_a_file_and_a_garbled_hash_index(cached, image_dataset):
    model, toml, before = cached
    latents = image_dataset / "cache" / "flux" / "latents"
    shutil.rmtree(latents)
    latents.write_text("oops")
    (image_dataset / "cache" / "file_hashes.json").write_text("\x00garbage")
    printed = []
    reader = build_cache(model, toml, log=printed.append)
    assert f"  {latents}: is a file, not the cache folder" in "\n".join(printed)
    assert "cache: 8 new entries encoded, 8 samples ready" in printed
    assert latents.is_dir() and json.loads((image_dataset / "cache" / "file_hashes.json").read_text())
    assert_same_tensors(before, cached_tensors(reader))


# ------------------------------------------------------------------------------------------------
# Killed while caching


def test_caching_killed_midway_resumes_without_starting_over(cached, image_dataset, monkeypatch):
    from data import cache

    model, toml, reference = cached
    shutil.rmtree(image_dataset / "cache")
    monkeypatch.setattr(cache, "ROWS_PER_PART", 2)  # parts of 2 entries, so a kill leaves some behind

    class Killed(BaseException):  # like SIGKILL: no handler of the product runs for it
        pass

    real_encode = model.encode_pixels
    done = []

    def dies_at_the_third_batch(pixels):
        if len(done) == 2:
            raise Killed
        done.append(len(pixels))
        return real_encode(pixels)

    monkeypatch.setattr(model, "encode_pixels", dies_at_the_third_batch)
    with pytest.raises(Killed):
        build_cache(model, toml, caching_batch_size=2)
    store = TensorStore(image_dataset / "cache" / "flux" / "latents")
    assert 0 < len(store) < 8  # some latents were written, in whole parts only
    assert list((image_dataset / "cache" / "flux" / "latents").glob(".tmp-*")) == []

    monkeypatch.setattr(model, "encode_pixels", real_encode)
    printed = []
    reader = build_cache(model, toml, log=printed.append)
    assert f"cache: {8 - len(store)} new entries encoded, 8 samples ready" in printed  # the rest only
    assert_same_tensors(reference, cached_tensors(reader), atol=1e-5)


@pytest.mark.slow
def test_kill_9_while_writing_the_cache_trusts_no_partial_entry(tmp_path, tiny_models, image_dataset):
    cfg = write_configs(tmp_path / "kill", tiny_models / "flux", image_dataset)
    log = open(tmp_path / "log.txt", "w")
    cmd = ["deepspeed", "--num_gpus=1", str(REPO / "train.py"), "--deepspeed", "--config", str(cfg), "--cache_only"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TRAINER_TEST_PAUSE_AT": "cache_part_latents:60"})
    latents = image_dataset / "cache" / "flux" / "latents"
    try:
        # The latent part is written completely under its temporary name, not yet renamed: kill -9 there.
        deadline = time.time() + 120
        while not list(latents.glob(".tmp-*/state.json")):
            assert time.time() < deadline and proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        log.close()
    assert len(TensorStore(image_dataset / "cache" / "flux" / "text")) == 8  # the text phase had finished
    assert len(TensorStore(latents)) == 0  # the complete-looking temporary part is not trusted

    resumed = launch(cfg, "--cache_only")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "cache: 8 new entries encoded, 8 samples ready" in resumed.output  # the latents only, not the text
    assert list(latents.glob(".tmp-*")) == [] and len(TensorStore(latents)) == 8


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_in_bounded_time_and_the_last_checkpoint_resumes(tmp_path, tiny_models,
                                                                                    image_dataset):
    # 2 processes; tests/test_full_finetune.py kills one of 4 (2 stages x 2 replicas) the same way.
    cfg = write_configs(tmp_path / "k", tiny_models / "flux", image_dataset, max_steps=400, micro_batch_size_per_gpu=1,
                        checkpoint_every_n_steps=2)
    runs = cfg.parent / "runs"
    result = launch_and_kill_rank(cfg, 2, 1, ready=lambda: any(runs.glob("*/checkpoints/latest")))
    assert_killed_rank_ended_the_job(result, 1)
    # the rank left behind names the dead one and how it died (the launcher's line shows the last rank's command)
    assert ("error: [rank 0] stopped: local rank 1 of this machine ended first (killed by SIGKILL: a signal from "
            "outside, e.g. the kernel's out-of-memory killer or kill -9)") in result.output, result.output[-3000:]
    # the last complete checkpoint resumes
    run_dir = next(runs.iterdir())
    step = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step"))
    cfg.write_text(cfg.read_text().replace("max_steps = 400", f"max_steps = {step + 1}"))
    resumed = launch(cfg, "--resume_from_checkpoint", num_gpus=2)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"starting at step {step}" in resumed.output


# A stand-in for DeepSpeed's launcher: children given --local_rank=N, one of which ends (argv[1]:
# "kill" or "exit") and is looked at before and after its parent reaps it.
STAND_IN_LAUNCHER = """
import json, os, subprocess, sys, time
from utils.faults import _children, ended_local_ranks
wait_then = "import sys; sys.exit(int(sys.stdin.readline()))"
kids = [subprocess.Popen([sys.executable, "-c", wait_then, f"--local_rank={r}"], stdin=subprocess.PIPE, text=True)
        for r in range(3)]
time.sleep(1.0)
seen = [ended_local_ranks(_children(os.getpid()), 3)]
if sys.argv[1] == "kill":
    kids[1].kill()
else:
    kids[1].stdin.write("3\\n"); kids[1].stdin.flush()
time.sleep(1.0)  # ended, not yet reaped: a zombie
seen.append(ended_local_ranks(_children(os.getpid()), 3))
kids[1].wait()  # reaped: how it ended is gone with it
seen.append(ended_local_ranks(_children(os.getpid()), 3))
kids[2].kill()  # a second one: the zombie's status could be either's
time.sleep(1.0)
seen.append(ended_local_ranks(_children(os.getpid()), 3))
for kid in kids:
    kid.kill()
print(json.dumps(seen))
"""


@pytest.mark.parametrize("end, how", [("kill", "killed by SIGKILL"), ("exit", "exit code 3")])
def test_the_ranks_of_this_machine_that_ended_are_named_with_how_they_ended(end, how):
    result = subprocess.run([sys.executable, "-c", STAND_IN_LAUNCHER, end], cwd=REPO, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    running, ended, reaped, two = json.loads(result.stdout)
    assert running == {}
    assert ended == {"1": how}
    assert reaped == {"1": None}
    assert two == {"1": None, "2": None}


@pytest.mark.slow
def test_out_of_memory_on_one_rank_is_one_line_naming_it_and_ends_the_job(tmp_path, tiny_models, image_dataset):
    # Rank 1 (stage 1 of 2) meets the error a full GPU raises at its third step, alone.
    cfg = write_configs(tmp_path / "oom", tiny_models / "flux", image_dataset, max_steps=6, micro_batch_size_per_gpu=1,
                        pipeline_stages=2)
    started = time.time()
    result = subprocess.run(["deepspeed", "--num_gpus=2", f"--master_port={free_port()}", str(REPO / "train.py"),
                             "--deepspeed", "--config", str(cfg)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "TRAINER_TEST_FAIL_AT": "step3:1"})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    lines = re.findall(r"error: [^\r\n]*", output)  # rank 1's may follow rank 0's progress bar on its line
    oom = [line for line in lines if "out of GPU memory" in line]
    assert len(oom) == 1, output[-3000:]
    assert oom[0].startswith("error: [rank 1] out of GPU memory: CUDA out of memory. Tried to allocate 20.00 GiB")
    assert "activation_checkpointing = true" in oom[0] and "more pipeline_stages" in oom[0]
    # rank 0, whose next send found rank 1 gone, points at it instead of printing gloo's traceback
    assert [line for line in lines if line not in oom] == [
        "error: [rank 0] stopped: local rank 1 of this machine ended first (exit code 1: its output above says why)"], \
        output[-4000:]
    assert "Traceback" not in output, output[-3000:]
    assert time.time() - started < 240, "the other rank was left waiting for the failed one"
