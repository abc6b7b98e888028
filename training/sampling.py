"""Samples from fixed prompts, drawn through the training engine's own pipeline stages.

Denoising runs the layers that train, in DeepSpeed's pipeline engine (`eval_batch`, the pipelined
forward the eval loss uses, here returning the predictions): no second copy of the transformer.
The model supplies the pieces its diffusers pipeline defines (starting noise, scheduler and shift,
guidance, unpacking, VAE decoding; `ModelRecipe.sample_*`); the loop here is the same for all.

Work is shared out: the prompts of one shape go round the data-parallel replicas, each replica's
prompts are micro-batches in flight together (they fill its pipeline), every stage of a replica
steps the scheduler on the last stage's prediction, and the final latents go to rank 0, which
loads the VAE, decodes, writes the files and frees the VAE again.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from config.sampling import SampleRequest
from data.media import write_video
from models.pipeline_layers import PipelineLayer, plain_precision
from utils.dist import Distributed
from utils.errors import ConfigError

# Frames per second of written sample videos (the models' pipelines export at this rate).
VIDEO_FPS = 24


def sample_prompts(requests: list[SampleRequest], model) -> list[str]:
    """Every text the samples need embedded: the prompts, and the negative prompt when the model
    samples with classifier-free guidance. A model that cannot sample as configured is a ConfigError
    here, before any caching."""
    reason = model.sampling_unsupported() if requests else None
    if reason:
        raise ConfigError(f"[sample]: {reason}; leave the [sample] table out")
    texts = [r.prompt for r in requests]
    if model.sample_guidance == "classifier_free":
        texts += [r.negative_prompt for r in requests]
    return list(dict.fromkeys(texts))


def share_out(requests: list[SampleRequest], dp_world: int) -> list[list[list[SampleRequest | None]]]:
    """Rounds of work: one per (shape, steps) group, each a list per replica of the requests it
    draws together. Every replica gets the same count in a round (None: a padding slot whose
    result is dropped), so all ranks run the same number of pipelined forwards."""
    groups: dict[tuple, list[SampleRequest]] = {}
    for r in requests:
        groups.setdefault((r.shape, r.steps), []).append(r)
    rounds = []
    for group in groups.values():
        per_replica = [group[i::dp_world] for i in range(dp_world)]
        count = max(len(p) for p in per_replica)
        rounds.append([p + [None] * (count - len(p)) for p in per_replica])
    return rounds


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Pixels (3, frames, height, width) in [-1, 1] as (frames, height, width, 3) uint8, rounded as
    diffusers' image processor rounds them."""
    x = (pixels.float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).cpu().numpy()
    return (x * 255).round().astype("uint8")


class Sampler:
    """Draws `requests` through `engine` and writes them under `<run>/samples/step<N>/`."""

    def __init__(self, model, engine, requests: list[SampleRequest], texts, out_dir: Path, place: Distributed,
                 log=print, writer=None):
        """`texts`: a CacheReader holding the prompts' embeddings (`prompt_text`); `writer`: a
        TensorBoard SummaryWriter (rank 0), or None."""
        self.model, self.engine, self.requests, self.texts = model, engine, requests, texts
        self.out_dir, self.place, self.log, self.writer = out_dir, place, log, writer
        self.seconds = 0.0  # spent in `run` so far (this rank), for the share of training time
        self.rounds = 0

    # ------------------------------------------------------------------ denoising
    def _text(self, prompt: str) -> dict[str, torch.Tensor]:
        return {k: v.unsqueeze(0) for k, v in self.texts.prompt_text(prompt).items()}

    def _forward(self, batches: list[tuple]) -> list[torch.Tensor]:
        """One pipelined forward of the micro-batches `batches` ((inputs, labels) each); the
        predictions, on every stage of this replica, on the CPU."""
        engine = self.engine
        # With compute_loss off, the engine sums each micro-batch's output into `total_loss`,
        # which still holds the last training loss (another shape): start it afresh.
        engine.total_loss = None
        outputs = engine.eval_batch(iter(batches), compute_loss=False, reduce_output=None, bcast_loss=False,
                                    num_micro_batches=len(batches))
        if engine.num_stages == 1:
            return [o.cpu() for o in outputs]
        group = engine.grid.get_pipe_parallel_group()
        src = engine.grid.stage_to_global(engine.num_stages - 1)
        meta = [[(tuple(o.shape), o.dtype) for o in outputs] if engine.is_last_stage() else None]
        dist.broadcast_object_list(meta, src=src, group=group)
        comm = engine.device if dist.get_backend() == "nccl" else torch.device("cpu")
        result = []
        for i, (shape, dtype) in enumerate(meta[0]):
            t = outputs[i].to(comm) if engine.is_last_stage() else torch.empty(shape, dtype=dtype, device=comm)
            dist.broadcast(t, src=src, group=group)
            result.append(t.cpu())
        return result

    def denoise(self) -> dict[int, torch.Tensor]:
        """Every request's final latents (1, ...) by index, on rank 0 ({} on the other ranks)."""
        rounds = share_out(self.requests, self.place.dp_world)
        firsts = [next(r for p in rnd for r in p if r is not None) for rnd in rounds]
        bar = tqdm(total=sum(r.steps for r in firsts), desc="sampling", unit="step", disable=not self.place.is_main,
                   dynamic_ncols=True, leave=False)
        mine: dict[int, torch.Tensor] = {}
        layers = [m for m in self.engine.module.modules() if isinstance(m, PipelineLayer)]
        with plain_precision(layers):
            for rnd, first in zip(rounds, firsts):
                self._denoise_round(rnd, first, mine, bar)
        bar.close()
        gathered = self.place.gather_object(mine)
        return {k: v for part in gathered for k, v in part.items()} if self.place.is_main else {}

    def _denoise_round(self, rnd, first, mine: dict[int, torch.Tensor], bar) -> None:
        """Denoise this replica's requests of one round together; its final latents into `mine`."""
        model = self.model
        slots = rnd[self.place.dp_rank]
        # A padding slot draws the round's first request again; its result is dropped.
        work = [r or first for r in slots]
        latents = [model.sample_noise(r.width, r.height, r.frames, r.seed) for r in work]
        schedulers = [model.sample_scheduler(r.steps, lat) for r, lat in zip(work, latents)]
        texts = [self._text(r.prompt) for r in work]
        negatives = [self._text(r.negative_prompt) if model.sample_guidance == "classifier_free" else None
                     for r in work]
        for t in schedulers[0][1]:
            batches = []
            for r, lat, text, negative in zip(work, latents, texts, negatives):
                inputs = model.sample_inputs(lat, t, text, negative, r.guidance)
                batches.append((model.input_fields.pack(inputs), torch.zeros(1)))
            predictions = self._forward(batches)
            for j, (r, (scheduler, _)) in enumerate(zip(work, schedulers)):
                prediction = model.unpack_latents(predictions[j], (predictions[j].shape[0], *latents[j].shape[1:]))
                velocity = model.guided_prediction(prediction, r.guidance)
                latents[j] = scheduler.step(velocity, t, latents[j], return_dict=False)[0]
            bar.update(1)
        if self.engine.stage_id == 0:  # every stage holds the same latents; the first one reports
            mine.update({r.index: lat for r, lat in zip(slots, latents) if r is not None})

    # ------------------------------------------------------------------ decoding and files
    def write(self, step: int, latents: dict[int, torch.Tensor]) -> list[str]:
        """Decode (rank 0 only: the VAE is loaded here and freed after) and write every sample and
        the step's index; returns one line for each sample that failed."""
        folder = self.out_dir / f"step{step:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        failed, index = [], []
        self.model.load_vae(self.place.device)
        try:
            if self.model.decode_tiled:
                self.model.vae.enable_tiling()
            for r in self.requests:
                try:
                    with torch.no_grad():
                        pixels = self.model.decode_latents(latents[r.index])[0]
                    frames = to_uint8(pixels)
                    name = f"{r.index}.png" if r.frames == 1 else f"{r.index}.mp4"
                    if r.frames == 1:
                        Image.fromarray(frames[0]).save(folder / name)
                    else:
                        write_video(folder / name, frames, VIDEO_FPS)
                    if self.writer is not None:
                        self.writer.add_images(f"samples/{r.index}", frames, step, dataformats="NHWC")
                    index.append({"file": name, "step": step, **asdict(r)})
                except Exception as e:  # noqa: BLE001 -- one bad sample must not cost the run
                    failed.append(f"sample {r.index} ({r.prompt[:40]!r}): {_one_line(e)}")
                    _free_memory()
        finally:
            self.model.free_encoders()
        (folder / "index.json").write_text(json.dumps(index, indent=1))
        # The final latents too (before the VAE), to decode again or compare: "<index>" -> (1, ...).
        save_file({str(i): t.contiguous() for i, t in sorted(latents.items())}, folder / "latents.safetensors")
        return failed

    def run(self, step: int) -> bool:
        """Draw and write every sample for `step`; a failure is reported in one line and the run
        goes on (returns False on rank 0). Call on every rank together."""
        start = time.perf_counter()
        try:
            return self._run(step, start)
        finally:
            self.seconds += time.perf_counter() - start
            self.rounds += 1

    def _run(self, step: int, start: float) -> bool:
        try:
            latents = self.denoise()
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory: report, keep training
            _free_memory()
            self.log(f"step {step}: samples failed: {_one_line(e)}; training goes on")
            return False
        if not self.place.is_main:
            return True
        try:
            failed = self.write(step, latents)
        except Exception as e:  # noqa: BLE001
            _free_memory()
            self.log(f"step {step}: samples failed: {_one_line(e)}; training goes on")
            return False
        for line in failed:
            self.log(f"step {step}: {line}; training goes on")
        done = len(self.requests) - len(failed)
        self.log(f"step {step}: {done} sample(s) in {self.out_dir / f'step{step:08d}'} "
                 f"({time.perf_counter() - start:.1f} s)")
        return not failed


def _one_line(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
