"""Run folders, adapter files and training checkpoints."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from utils.config import TrainConfig
from utils.faults import disk_full, disk_full_error, pause_for_fault_tests, remove_quietly
from utils.pipeline_layers import named_weights
from utils.schema import ConfigError
from utils.secrets import redact, redacted

CHECKPOINTS = "checkpoints"


def create_run_dir(config: TrainConfig, rank: int, world: int, resume: str | None, log=print) -> Path:
    """A new timestamped run folder under output_dir (never reusing another run's), or, when
    resuming, the run folder that holds the checkpoint. Rank 0 decides; all ranks agree.

    The run folder gets copies of the config files with every token or key in them replaced
    by `<redacted>` (see utils/secrets.py); a warning names the files that had one.
    """
    name, error = None, None
    if rank == 0:
        output = config.output_dir
        output.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            try:
                name = find_run_with_checkpoint(output, resume).name
            except FileNotFoundError as e:
                error = str(e)
        else:
            run_dir = _new_run_dir(output)
            name = run_dir.name
            (run_dir / "config").mkdir()
            # The config files this run used, as they were at its start.
            files = [config.file, config.dataset.file] + [e.dataset.file for e in config.eval_datasets]
            for f in dict.fromkeys(files):
                _copy_redacted(f, run_dir / "config" / f.name, log)
    if world > 1:
        box = [(name, error)]
        dist.broadcast_object_list(box, src=0)
        name, error = box[0]
    if error:
        raise FileNotFoundError(error)
    return config.output_dir / name


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


def run_fingerprint(config: TrainConfig, samples) -> dict:
    """What a checkpoint's weights mean: resuming with any of these changed is refused.

    The learning rate, schedule, epochs and save settings are not part of it: changing them
    on resume is allowed.
    """
    import hashlib

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
            # None for LoRA runs, so checkpoints from before full fine-tuning existed still match.
            "full_finetune": None if a is not None else f"dtype={config.trained_dtype}",
            "dataset": f"{len(samples)} samples, content {digest.hexdigest()[:12]}",
            "pipeline_stages": config.settings.pipeline_stages,
            # ZeRO-1 checkpoints hold the optimizer state in per-replica slices; None when off, so
            # checkpoints from before it existed still match.
            "zero_stage": config.settings.zero_stage or None}


def find_run_with_checkpoint(output_dir: Path, resume: str) -> Path:
    """The run folder to resume: the newest with a complete checkpoint, or the one named
    `resume` (a run folder, or a checkpoint `step<N>` inside one)."""
    runs = sorted((p for p in output_dir.iterdir() if (p / CHECKPOINTS / "latest").is_file()),
                  key=lambda p: (p / CHECKPOINTS / "latest").stat().st_mtime)
    if resume == "latest":
        if not runs:
            raise FileNotFoundError(f"--resume_from_checkpoint: no run in {output_dir} has a checkpoint")
        return runs[-1]
    for run in reversed(runs):
        if (run / CHECKPOINTS / resume / "trainer_state.json").is_file() or run.name == resume:
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
                 world: int, ema=None) -> list[Path]:
    """Write the adapter files to `out_dir` atomically (a temporary folder renamed at the end);
    with `ema` (utils/ema.EMA), the averaged adapter too, in the same formats, in `out_dir/ema/`."""
    lora = gather_adapter(model, transformer, engine, rank, world)
    averaged = None
    if ema is not None:
        with ema.applied():
            averaged = gather_adapter(model, transformer, engine, rank, world)
            # On CPU, .cpu() returns the parameters' own storage, which the block's end restores.
            averaged = None if averaged is None else {k: v.clone() for k, v in averaged.items()}
    if rank != 0:
        return []
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        files = model.save_lora(lora, adapter, tmp, dtype)
        if averaged is not None:
            files += model.save_lora(averaged, adapter, tmp / "ema", dtype)
    except Exception as e:
        remove_quietly(tmp)
        if disk_full(e, out_dir.parent):
            raise disk_full_error(out_dir, "the adapter", "Earlier adapters and checkpoints are kept; "
                                  f"{out_dir.name} is {'unchanged' if out_dir.exists() else 'not written'}.") from e
        raise
    replace_folder(tmp, out_dir)
    return [out_dir / f.relative_to(tmp) for f in files]


def replace_folder(new: Path, target: Path) -> None:
    """Put folder `new` in the place of `target`. The old one is moved aside first and deleted
    last, so a run killed in between leaves one of the two whole (`<target>.old` at worst)."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


# Largest diffusers weight shard of a full-model save; also bounds the host memory a save takes.
SHARD_BYTES = 4 * 2**30
ORIGINAL_LAYOUT_FILE = "transformer_original_layout.safetensors"


def stage_weights(transformer, layers) -> list[list[str]]:
    """The transformer weight names owned by each of `layers` (pipeline layers), found through
    their `module_names` as the weights are loaded, named as in the transformer (the diffusers
    keys), not as in the layer modules."""
    return [[n for n, _ in named_weights(transformer, layer.module_names)] for layer in layers]


def save_full_model(model, transformer, engine, out_dir: Path, dtype: torch.dtype, rank: int, world: int) -> list[Path]:
    """Write the whole transformer, in `dtype`, to `out_dir` atomically (temporary folder, then a
    rename): `transformer/` in the diffusers layout (config.json, safetensors shards and their
    index) and, when the model has one, the original release's single-file layout.

    Nothing is gathered through one process: data-parallel rank 0 of each pipeline stage writes
    its own stage's shards, a few GiB at a time (SHARD_BYTES), and the parts of the single file;
    rank 0 then writes the index and config and joins the parts on disk.
    """
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "transformer").mkdir(parents=True)
    _barrier(world)
    writer = engine.grid.get_data_parallel_rank() == 0
    params = dict(transformer.named_parameters())
    chunks = []
    if writer:
        chunk, size = [], 0
        for names in stage_weights(transformer, engine.module.forward_funcs):
            nbytes = sum(params[n].numel() for n in names) * dtype.itemsize
            if chunk and size + nbytes > SHARD_BYTES:
                chunks.append(chunk)
                chunk, size = [], 0
            chunk += names
            size += nbytes
        if chunk:
            chunks.append(chunk)
    # Shards are numbered across stages (stage k's writer has a lower rank than stage k+1's).
    counts = [len(chunks)]
    if world > 1:
        counts = [None] * world
        dist.all_gather_object(counts, len(chunks))
    total, first = sum(counts), sum(counts[:rank])
    try:
        weight_map = _write_parts(model, params, chunks, tmp, dtype, first, total)
    except Exception as e:
        _save_failed(e, tmp, out_dir)
    maps = [weight_map]
    if world > 1:
        maps = [None] * world if rank == 0 else None
        dist.gather_object(weight_map, maps, dst=0)
    written = []
    if rank == 0:
        try:
            _finish_full_model(transformer, tmp, maps, total, params, dtype)
        except Exception as e:
            _save_failed(e, tmp, out_dir)
        replace_folder(tmp, out_dir)
        written = sorted(p for p in out_dir.rglob("*") if p.is_file())
    _barrier(world)
    return written


def _write_parts(model, params, chunks, tmp: Path, dtype, first: int, total: int) -> dict[str, str]:
    """Write this stage's diffusers shards and original-layout parts; returns {weight: shard}."""
    weight_map = {}
    for j, names in enumerate(chunks):
        tensors = {n: params[n].detach().to("cpu", dtype).contiguous() for n in names}
        shard = f"diffusion_pytorch_model-{first + j + 1:05d}-of-{total:05d}.safetensors"
        save_file(tensors, tmp / "transformer" / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        original = model.original_layout(tensors)
        if original is not None:
            save_file({k: v.contiguous() for k, v in original.items()}, tmp / f"original-part-{first + j:05d}.safetensors",
                      metadata={"format": "pt"})
        del tensors, original
    return weight_map


def _finish_full_model(transformer, tmp: Path, maps: list[dict], total: int, params, dtype) -> None:
    """Rank 0: the config, the shard index (or the single shard's name), the joined single file."""
    folder = tmp / "transformer"
    transformer.save_config(folder)
    merged = {k: v for part in maps for k, v in part.items()}
    if total == 1:  # one shard: diffusers' name for an unsharded model
        (folder / "diffusion_pytorch_model-00001-of-00001.safetensors").rename(
            folder / "diffusion_pytorch_model.safetensors")
    else:
        size = sum(params[k].numel() for k in merged) * dtype.itemsize
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": size}, "weight_map": dict(sorted(merged.items()))}, indent=2))
    parts = sorted(tmp.glob("original-part-*.safetensors"))
    if parts:
        join_safetensors(parts, tmp / ORIGINAL_LAYOUT_FILE)
        for part in parts:
            part.unlink(missing_ok=True)  # a single part was renamed


def _save_failed(error: Exception, tmp: Path, out_dir: Path):
    """Remove the half-written save and raise: a clear DiskFullError when the disk is full (the
    launcher then stops the other ranks)."""
    remove_quietly(tmp)
    if disk_full(error, out_dir.parent):
        raise disk_full_error(out_dir, "the transformer", "Earlier saves and checkpoints are kept; "
                              f"{out_dir.name} is {'unchanged' if out_dir.exists() else 'not written'}.") from error
    raise error


def join_safetensors(parts: list[Path], out: Path) -> None:
    """Join safetensors files with distinct keys into one, copying their data on disk (memory
    use does not grow with the model). The format: an 8-byte little-endian header length, a
    JSON header (dtype, shape, data offsets of each tensor), then the data. A single part is
    renamed."""
    if len(parts) == 1:
        os.replace(parts[0], out)
        return
    headers, sizes, starts = [], [], []
    for part in parts:
        with open(part, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        headers.append(header)
        starts.append(8 + n)
        sizes.append(part.stat().st_size - 8 - n)
    joined, offset = {"__metadata__": {"format": "pt"}}, 0
    for header, size in zip(headers, sizes):
        for key, info in header.items():
            if key in joined:
                raise ValueError(f"join_safetensors: {key} is in more than one part")
            begin, end = info["data_offsets"]
            joined[key] = {**info, "data_offsets": [begin + offset, end + offset]}
        offset += size
    text = json.dumps(joined, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors writes it
    with open(out, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for part, start in zip(parts, starts):
            with open(part, "rb") as src:
                src.seek(start)
                shutil.copyfileobj(src, f, 64 * 2**20)


class Checkpoints:
    """Whole-training-state checkpoints in `<run>/checkpoints/`, atomic and pruned.

    A checkpoint is a folder `step<N>` written by DeepSpeed (trainable weights, optimizer and
    scheduler per pipeline stage), plus every rank's random state and `trainer_state.json`
    (step, and the fingerprint of what the weights mean). It counts only once the file `latest`
    names it; `latest` is replaced atomically after every rank has finished writing, so a
    process killed at any moment (even `kill -9`) leaves the previous checkpoint loadable.
    """

    def __init__(self, run_dir: Path, keep: int, rank: int, world: int):
        self.root = run_dir / CHECKPOINTS
        self.keep, self.rank, self.world = keep, rank, world

    def latest(self) -> str | None:
        try:
            return (self.root / "latest").read_text().strip() or None
        except OSError:
            return None

    def save(self, engine, step: int, fingerprint: dict, ema=None) -> str:
        """Write checkpoint `step<step>` on every rank; raises DiskFullError when the disk is
        full, with the half-written checkpoint removed and `latest` unchanged."""
        tag = f"step{step:08d}"
        if self.rank == 0 and (self.root / tag).exists():
            shutil.rmtree(self.root / tag)  # an earlier, unfinished save of this step
        _barrier(self.world)
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step}, save_latest=False,
                                   exclude_frozen_parameters=True)
            torch.save(_random_states(), self.root / tag / f"random_state_rank{self.rank:04d}.pt")
            if ema is not None:
                torch.save(ema.state_dict(), self.root / tag / f"ema_rank{self.rank:04d}.pt")
            _barrier(self.world)
            # trainer_state.json only once every rank's files are complete: a checkpoint named
            # on the command line is trusted by it.
            if self.rank == 0:
                _write_json_atomic(self.root / tag / "trainer_state.json", {"step": step, "fingerprint": fingerprint})
            pause_for_fault_tests(f"checkpoint{step}")
            if self.rank == 0:
                _write_text_atomic(self.root / "latest", tag)
                self._prune(tag)
        except Exception as e:
            if not disk_full(e, self.root):
                raise
            remove_quietly(self.root / tag)
            latest = self.latest()
            kept = (f"The last complete checkpoint, {self.root / latest}, is kept: resume from it with "
                    f"--resume_from_checkpoint." if latest else "There is no earlier checkpoint of this run.")
            raise disk_full_error(self.root / tag, f"the checkpoint of step {step}", kept) from e
        _barrier(self.world)
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
            raise FileNotFoundError(f"--resume_from_checkpoint: no complete checkpoint {tag or ''} in {self.root}")
        state = json.loads((self.root / tag / "trainer_state.json").read_text())
        differences = [f"{key}: checkpoint has {state['fingerprint'].get(key)!r}, this run has {value!r}"
                       for key, value in fingerprint.items() if state["fingerprint"].get(key) != value]
        if differences:
            raise ConfigError("cannot resume: the config changes what the checkpoint means\n  "
                              + "\n  ".join(differences))
        from deepspeed.runtime.zero.utils import ZeRORuntimeException

        try:
            path, _ = engine.load_checkpoint(str(self.root), tag=tag, load_module_strict=False)
        except ZeRORuntimeException as e:  # zero_stage = 1 slices made for another number of replicas
            raise ConfigError(f"cannot resume from {self.root / tag}: {e} (zero_stage = 1: resume with as many "
                              f"replicas, number of GPUs / pipeline_stages, as the checkpoint was written with)") from None
        if path is None:
            raise FileNotFoundError(f"--resume_from_checkpoint: DeepSpeed could not load {self.root / tag}")
        random_file = self.root / tag / f"random_state_rank{self.rank:04d}.pt"
        if random_file.is_file():
            _set_random_states(torch.load(random_file, weights_only=False))
        if ema is not None:
            ema_file = self.root / tag / f"ema_rank{self.rank:04d}.pt"
            if ema_file.is_file():
                ema.load_state_dict(torch.load(ema_file, weights_only=True))
            else:
                ema.restart()  # the average was made from the weights before they loaded
        return int(state["step"])


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _write_json_atomic(path: Path, value) -> None:
    _write_text_atomic(path, json.dumps(value, indent=1, sort_keys=True))


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


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
