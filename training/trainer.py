"""The training loop: steps, evaluation, adapter (or full model) saves and checkpoints on their schedules."""

from __future__ import annotations

import gc
import json
import math
import signal
import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from config.train_config import TrainConfig
from data.batches import EvalPlan, TrainPlan, collate
from data.cache import CacheReader
from saving.checkpoints import Checkpoints, run_fingerprint
from saving.export import save_adapter, save_full_model
from training.ema import ema_for
from training.objective import training_example
from training.optimizers import last_step
from training.sampling import Sampler
from utils.atomic import write_text_atomic
from utils.dist import Distributed
from utils.dtypes import DTYPES
from utils.errors import TrainingStopped
from utils.faults import DeadRankWatch, fail_for_fault_tests
from utils.metrics import Metrics, peak_memory_gib

def freeze_heap() -> None:
    """Exempt every object alive now from Python's cyclic garbage collector, after one collection.
    A full collection walks every tracked object, 0.6-0.7 s once the libraries and compiled
    graphs are loaded, and it starts on its own mid-step: on one pipeline stage it stalls every
    stage (docs/benchmarks.md, "Several GPUs, fourth run"). What the set-up built lives to the end anyway."""
    gc.collect()
    gc.freeze()


# Steps after the first whose median the start-up report compares the first step with.
STARTUP_STEADY_STEPS = 3


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Steps to train: `max_steps`, `epochs` worth of steps, or the smaller when both are set."""
    s = config.settings
    limits = [s.max_steps] if s.max_steps else []
    if s.epochs:
        limits.append(s.epochs * steps_per_epoch)
    return min(limits)


@dataclass
class Schedule:
    """Whether something is due at a step, from its every-n-steps / every-n-epochs settings."""

    every_steps: int | None
    every_epochs: int | None

    def due(self, step: int, steps_per_epoch: int) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_epochs and step % steps_per_epoch == 0
                    and (step // steps_per_epoch) % self.every_epochs == 0)


def compile_counters() -> dict:
    """What torch.compile did in this process so far: graphs traced, and Inductor's FX graph cache
    hits (compiled code loaded from an earlier run) and misses (compiled now)."""
    # torch.compile's internals, loaded only by runs that compile
    from torch._dynamo.utils import counters
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return {"compiled_graphs": counters["stats"]["unique_graphs"],
            "fx_graph_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
            "fx_graph_cache_misses": counters["inductor"]["fxgraph_cache_miss"], "compile_cache_dir": cache_dir()}


@dataclass(frozen=True)
class Run:
    """What a training run works on, as train.py builds it: the model recipe and its config, the
    DeepSpeed engine over the local stage of `transformer`, the cached training and eval sets,
    the run folder, this process's place in the job, the batch plan and the steps to train."""

    model: object
    config: TrainConfig
    engine: object
    transformer: torch.nn.Module
    train: CacheReader
    evals: dict[str, CacheReader]
    run_dir: Path
    place: Distributed
    plan: TrainPlan
    total_steps: int


class Trainer:
    def __init__(self, run: Run, resume: str | None = None, launched: float | None = None):
        model, config, engine, transformer = run.model, run.config, run.engine, run.transformer
        train, run_dir, place, total = run.train, run.run_dir, run.place, run.total_steps
        self.model, self.config, self.engine, self.transformer = model, config, engine, transformer
        self.train, self.evals, self.run_dir = train, run.evals, run_dir
        self.place, self.plan, self.total = place, run.plan, total
        s = config.settings
        self.checkpoints = Checkpoints(run_dir, s.checkpoints_to_keep, place)
        self.fingerprint = run_fingerprint(config, train.samples)
        self.ema = None if s.ema is None else ema_for(transformer, s.ema)
        self.step = 0
        self.resumed_from: Path | None = None  # the checkpoint loaded
        if resume is not None:
            tag = None if resume in ("latest", run_dir.name) else resume
            self.step = self.checkpoints.load(engine, tag, self.fingerprint, ema=self.ema)
            self.resumed_from = self.checkpoints.root / (tag or self.checkpoints.latest())
        start_step = self.step
        self.save_schedule = Schedule(s.save_every_n_steps, s.save_every_n_epochs)
        self.eval_schedule = Schedule(s.eval_every_n_steps, s.eval_every_n_epochs)
        self.checkpoint_schedule = Schedule(s.checkpoint_every_n_steps, s.checkpoint_every_n_epochs)
        self.last_checkpoint_time = time.monotonic()
        # A finished run resumed trains nothing: it leaves the logs as they are.
        self.metrics = Metrics(run_dir, total, start_step, enabled=place.is_main and start_step < total,
                               monitoring=s.monitoring)
        sample = s.sample
        self.sampler = Sampler(model, engine, config.samples, train, run_dir / "samples", place,
                               log=self.metrics.print, writer=self.metrics.writer) if config.samples else None
        self.sample_schedule = Schedule(sample.every_n_steps, sample.every_n_epochs) if sample else None
        self.stop_signal: int | None = None
        self.dead_rank_watch = DeadRankWatch(place.rank)
        # time.time() when train.py started: the start-up report measures from there.
        self.launched = launched if launched is not None else time.time()
        self.step_seconds: list[float] = []  # this process's steps, for the start-up report
        # The signal that stopped training (every rank agrees), for the exit code; None otherwise.
        self.stopped_by: int | None = None
        # Per-step train losses and eval results, kept in the run folder (resumes extend them).
        self.losses: list[float] = self._read_history("losses.json")[:start_step]
        self.eval_history: list[dict] = [e for e in self._read_history("eval.json") if e["step"] <= start_step]

    def _read_history(self, name: str) -> list:
        try:
            return json.loads((self.run_dir / name).read_text())
        except (OSError, ValueError):
            return []

    def _write_history(self) -> None:
        if self.place.is_main:
            for name, value in (("losses.json", self.losses), ("eval.json", self.eval_history)):
                write_text_atomic(self.run_dir / name, json.dumps(value))

    def _write_memory_peaks(self) -> None:
        """Every rank's peak memory in <run>/memory.json and one line, beside the per-stage
        estimate printed at start: the allocator's peak and reserve on a GPU, host RSS on CPU."""
        device = self.place.device
        mine = {"rank": self.place.rank, "stage": self.place.stage, "peak_gib": round(peak_memory_gib(device), 3)}
        if device.type == "cuda":
            mine["reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
        peaks = self.place.gather_object(mine)
        if self.place.is_main:
            write_text_atomic(self.run_dir / "memory.json", json.dumps(peaks))
            kind = "allocated" if device.type == "cuda" else "host RSS"
            self.metrics.print(f"peak memory ({kind}): " + ", ".join(
                f"rank {p['rank']} stage {p['stage']} {p['peak_gib']:.2f} GiB" for p in peaks))

    def micro_batches(self, epoch: int, step_in_epoch: int):
        # A generator: only the first and last pipeline stages pull from it.
        s = self.config.settings
        for batch in self.plan.step_batches(epoch, step_in_epoch, self.place.dp_rank, s.gradient_accumulation_steps):
            yield collate(partial(training_example, self.model), self.train, batch, s.seed, "train", epoch, train=True)

    def evaluate(self) -> dict[str, float]:
        """Loss on each eval set at fixed timesteps and noise, averaged over all its samples."""
        results = {}
        s = self.config.settings
        for name, reader in self.evals.items():
            total = torch.zeros(2, dtype=torch.float64)
            plan = EvalPlan(reader, s.micro_batch_size_per_gpu)
            for batch in plan.rank_batches(self.place.dp_rank, self.place.dp_world):
                weight = sum(slot.weight for slot in batch)
                inputs = iter([collate(partial(training_example, self.model), reader, batch, s.seed, f"eval/{name}", 0)])
                loss = self.engine.eval_batch(inputs, num_micro_batches=1)
                total += torch.tensor([float(loss) * weight, weight], dtype=torch.float64)
            if self.place.dp_world > 1:
                # every stage of a replica holds the same value; sum over replicas only
                dist.all_reduce(total, group=self.engine.grid.get_data_parallel_group())
            results[name] = (total[0] / total[1]).item()
        return results

    def draw_samples(self, step: int) -> None:
        """The [sample] pictures for `step`, with the averaged weights where [ema] samples says so."""
        if self.ema is not None and self.config.settings.ema.samples:
            with self.ema.applied():
                self.sampler.run(step)
        else:
            self.sampler.run(step)

    def log_eval(self):
        results = self.evaluate()
        if self.ema is not None and self.config.settings.ema.eval and self.evals:
            with self.ema.applied():
                results.update({f"{name}/ema": loss for name, loss in self.evaluate().items()})
        if results:
            self.eval_history.append({"step": self.step, **results})
            self._write_history()
            self.metrics.scalars(self.step, {f"eval/{k}": v for k, v in results.items()})
            self.metrics.print(f"step {self.step}: " + ", ".join(f"eval {k} loss {v:.5f}" for k, v in results.items()))
        return results

    def report_startup(self) -> None:
        """Print and record (startup.json, TensorBoard) the time from the launch to the end of
        the first training step; once later steps ran, also how much longer the first took than
        their median: compiling (compile = true), autotuning and allocator warm-up."""
        first = self.step_seconds[0]
        if len(self.step_seconds) == 1:
            self.startup_seconds = time.time() - self.launched
        report = {"seconds_to_first_step": round(self.startup_seconds, 3), "first_step_seconds": round(first, 3),
                  "compile": self.config.settings.compile, "frozen_objects": gc.get_freeze_count()}
        if len(self.step_seconds) == 1:
            self.metrics.print(f"start-up: {self.startup_seconds:.1f} s from launch to the end of the first training "
                               f"step (the step itself {first:.1f} s)")
            if self.config.settings.compile:
                report.update(compile_counters())
                self.metrics.print(f"compiled graphs: {report['compiled_graphs']} (Inductor's cache in "
                                   f"{report['compile_cache_dir']}: {report['fx_graph_cache_hits']} graphs loaded, "
                                   f"{report['fx_graph_cache_misses']} compiled)")
        else:
            steady = statistics.median(self.step_seconds[1:])
            report.update(steady_step_seconds=round(steady, 3), first_step_extra_seconds=round(first - steady, 3))
            self.metrics.print(f"start-up: the first step took {first:.2f} s, the next {len(self.step_seconds) - 1} "
                               f"{steady:.2f} s (median): {first - steady:.2f} s of "
                               + ("compiling and " if self.config.settings.compile else "") + "warm-up")
        self.metrics.scalars(self.step, {f"startup/{k}": v for k, v in report.items() if isinstance(v, float)})
        if self.place.is_main:
            path = self.run_dir / "startup.json"
            try:
                previous = json.loads(path.read_text()) if path.exists() and len(self.step_seconds) > 1 else {}
                path.write_text(json.dumps({**previous, **report}, indent=1) + "\n")
            except OSError:
                pass  # only a report: a full disk stops the run at the next checkpoint or save, with its message

    def report_sampling_time(self, seconds: float) -> None:
        """Print and record the time drawing samples took, as a share of this run's `seconds` (its
        steps, evaluations, samples, saves and checkpoints)."""
        spent = self.sampler.seconds
        share = spent / seconds if seconds > 0 else 0.0
        self.metrics.print(f"sampling: {spent:.1f} s in {self.sampler.rounds} round(s), {100 * share:.1f}% of the "
                           f"{seconds:.1f} s this run trained (steps, evaluations, samples, saves)")
        self.metrics.scalars(self.step, {"samples/seconds": spent, "samples/share_of_training": share})

    def save(self, name: str) -> None:
        s = self.config.settings
        if s.adapter is None:  # full fine-tuning: the whole transformer
            files = save_full_model(self.model, self.transformer, self.engine, self.run_dir / "models" / name,
                                    DTYPES[s.save_dtype], self.place)
        else:
            files = save_adapter(self.model, self.transformer, s.adapter, self.run_dir / "adapters" / name,
                                 DTYPES[s.save_dtype], self.place, ema=self.ema)
        if files:
            self.metrics.print(f"step {self.step}: saved {', '.join(str(f) for f in files)}")

    def checkpoint(self) -> None:
        self._write_history()
        tag = self.checkpoints.save(self.engine, self.step, self.fingerprint, ema=self.ema)
        self.last_checkpoint_time = time.monotonic()
        self.metrics.print(f"step {self.step}: checkpoint {self.checkpoints.root / tag} saved")

    def _on_signal(self, signum, frame):
        # Only note it: the step in flight finishes, then every rank checkpoints together. The
        # first one counts: after Ctrl-C, DeepSpeed's launcher sends SIGTERM too.
        if self.stop_signal is None:
            self.stop_signal = signum

    def stop_requested(self) -> int:
        """The signal number (SIGINT/SIGTERM) on every rank once any rank got one, else 0 (one
        tiny all-reduce a step)."""
        return self.place.max_over_ranks(self.stop_signal or 0)

    def non_finite(self, loss: float) -> bool:
        """Whether this step's loss or gradient was NaN or infinite (then the optimizer skipped
        the step: see GradNormClipping). The same answer on every rank."""
        norm, skipped = last_step(self.engine)
        bad = not math.isfinite(loss) or skipped or (norm is not None and not math.isfinite(norm))
        return self.place.any_rank(bad)

    def stop_non_finite(self, loss: float, epoch: int, step_in_epoch: int) -> None:
        """Stop with the step, the files of its batch and the checkpoint to go back to. The
        optimizer skipped this step, so the weights are still those of the step before."""
        s = self.config.settings
        slots = [slot for dp_rank in range(self.place.dp_world)
                 for batch in self.plan.step_batches(epoch, step_in_epoch, dp_rank, s.gradient_accumulation_steps)
                 for slot in batch]
        paths = list(dict.fromkeys(self.train.samples[slot.index].sample.item.path for slot in slots))
        poisoned = []
        for index in dict.fromkeys(slot.index for slot in slots):
            latents, text = self.train.load(index)
            bad = [name for name, t in {**latents, **text}.items() if not torch.isfinite(t.float()).all()]
            if bad:
                poisoned.append(f"{self.train.samples[index].sample.item.path} ({', '.join(sorted(bad))})")
        norm, skipped = last_step(self.engine)
        lines = [f"step {self.step}: the loss is {loss} (gradient norm {norm}); training stopped. "
                 + ("The optimizer skipped this step, so no weight changed." if skipped else
                    "The gradient was finite, so the weights are too."),
                 f"the step's batch: {', '.join(str(p) for p in paths)}"]
        if poisoned:
            lines.append(f"non-finite values in the cached tensors of: {'; '.join(poisoned)}; rebuild the cache "
                         f"with --regenerate_cache (and check those files)")
        else:
            lines.append("the cached inputs are finite: likely causes are a learning rate too high "
                         "(lower optimizer.lr, add warmup_steps) or float16 overflow (use bfloat16)"
                         + (f", or the attention kernel: attention_backend = '{s.attention_backend}' (resume "
                            f"with attention_backend = \"native\", torch's default kernels)"
                            if s.attention_backend not in (None, "native") else ""))
        latest = self.checkpoints.latest()
        lines.append(f"the last good checkpoint, {self.checkpoints.root / latest}, is kept: continue from it with "
                     f"--resume_from_checkpoint" if latest else "this run has no checkpoint to go back to")
        self._write_history()
        self.dead_rank_watch.disarm()  # every rank stops here together
        raise TrainingStopped("\n".join(lines))

    def checkpoints_enabled(self) -> bool:
        s = self.config.settings
        return any(v is not None for v in (s.checkpoint_every_n_minutes, s.checkpoint_every_n_steps,
                                           s.checkpoint_every_n_epochs))

    def checkpoint_due(self, spe: int) -> bool:
        minutes = self.config.settings.checkpoint_every_n_minutes
        due = self.checkpoint_schedule.due(self.step, spe)
        if minutes is not None:
            # Rank 0's clock decides: all ranks must agree, or the save would hang.
            elapsed = self.place.broadcast_object(time.monotonic() - self.last_checkpoint_time >= minutes * 60)
            due = due or elapsed
        return due

    def run(self) -> list[float]:
        """Train to the end (or to a stop signal) and return the losses of the steps trained."""
        try:
            return self._train()
        finally:
            # On an error too: the TensorBoard events written so far reach the disk before the
            # process exits (train.py ends a failed distributed run without Python's teardown).
            self.metrics.close()

    def _stop_at_signal(self, signum: int) -> None:
        """Checkpoint the steps done so far together and stop (SIGINT or SIGTERM at a step boundary)."""
        previous = self.checkpoints.latest()
        # Said before saving: DeepSpeed's launcher kills the processes 30 s after a
        # Ctrl-C, and a save cut short must not look like one that finished.
        self.metrics.print(f"stop signal: saving a checkpoint of step {self.step}; until a line "
                           f"'checkpoint ... saved' follows, the last complete checkpoint is "
                           + (str(self.checkpoints.root / previous) if previous else "none (this run has none)"))
        self.checkpoint()
        name = {signal.SIGINT: "SIGINT, Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(signum, f"signal {signum}")
        self.metrics.print(f"stopped by a signal ({name}) at step {self.step}: checkpoint "
                           f"{self.checkpoints.root / self.checkpoints.latest()} saved; continue from it "
                           f"with --resume_from_checkpoint")
        self.dead_rank_watch.disarm()  # every rank saved and leaves: none has died
        self.stopped_by = signum

    def _log_step(self, loss: float, elapsed: float, epoch: int, samples_per_step: int) -> None:
        """The finished step's numbers: TensorBoard, metrics.jsonl, the progress bar and its printed line."""
        self.losses.append(loss)
        values = {"train/loss": loss, "train/lr": self.engine.get_lr()[0],
                  "train/grad_norm": last_step(self.engine)[0] or 0.0,
                  "train/samples_per_sec": samples_per_step / elapsed,
                  "train/peak_memory_gib": peak_memory_gib(self.place.device), "train/epoch": epoch + 1}
        self.metrics.scalars(self.step, values)
        self.metrics.record({"step": self.step, "seconds": elapsed, **values})
        self.step_seconds.append(elapsed)
        if len(self.step_seconds) == 1:
            freeze_heap()  # the first step's compiled graphs and kernels
        if len(self.step_seconds) in (1, STARTUP_STEADY_STEPS + 1):
            self.report_startup()
        self.metrics.step({"loss": loss, "lr": values["train/lr"]})
        if self.step % self.config.settings.steps_per_print == 0:
            self.metrics.print(f"step {self.step}/{self.total} epoch {epoch + 1} loss {loss:.5f} "
                               f"grad_norm {values['train/grad_norm']:.4f} lr {values['train/lr']:.3g} "
                               f"{values['train/samples_per_sec']:.2f} samples/s")

    def _train(self) -> list[float]:
        s = self.config.settings
        spe = self.plan.steps_per_epoch
        samples_per_step = s.micro_batch_size_per_gpu * s.gradient_accumulation_steps * self.place.dp_world
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self.dead_rank_watch.start()
        if self.step >= self.total:
            # A finished run resumed: its final save and checkpoint exist already.
            if self.place.is_main:
                print(f"nothing to train: the checkpoint is at step {self.step}, "
                      f"{'the end' if self.step == self.total else 'past the end'} of this config's "
                      f"{self.total} steps, so nothing was trained or saved (raise max_steps or epochs to train "
                      f"longer)")
            return self.losses
        started = time.perf_counter()
        freeze_heap()
        if s.eval_at_start and self.step == 0:
            self.log_eval()
        if self.sampler and s.sample.at_start and self.step == 0:
            self.draw_samples(0)
        while self.step < self.total:
            signum = self.stop_requested()
            if signum:
                self._stop_at_signal(signum)
                return self.losses
            epoch, step_in_epoch = divmod(self.step, spe)
            start = time.perf_counter()
            fail_for_fault_tests(f"step{self.step + 1}", self.place.rank)
            loss = self.engine.train_batch(self.micro_batches(epoch, step_in_epoch)).item()
            elapsed = time.perf_counter() - start
            self.step += 1
            if self.non_finite(loss):
                self.stop_non_finite(loss, epoch, step_in_epoch)
            if self.ema is not None:
                self.ema.update(self.step)
            self._log_step(loss, elapsed, epoch, samples_per_step)
            if self.step == self.total:
                break
            if self.eval_schedule.due(self.step, spe):
                self.log_eval()
            if self.sampler and self.sample_schedule.due(self.step, spe):
                self.draw_samples(self.step)
            if self.save_schedule.due(self.step, spe):
                self.save(f"step{self.step:08d}")
            if self.checkpoint_due(spe):
                self.checkpoint()
        if 1 < len(self.step_seconds) <= STARTUP_STEADY_STEPS:
            self.report_startup()  # a run too short for the full report: what it has
        if self.evals:
            self.log_eval()
        if self.sampler:
            self.draw_samples(self.step)
            self.report_sampling_time(time.perf_counter() - started)
        self._write_memory_peaks()
        self.save("final")
        if self.checkpoints_enabled():
            self.checkpoint()  # so a longer run can resume from the end of this one
        self._write_history()
        self.dead_rank_watch.disarm()
        return self.losses
