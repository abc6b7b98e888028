"""Train a diffusion transformer (a LoRA adapter, or all its weights) with DeepSpeed's pipeline engine.

    deepspeed --num_gpus=1 train.py --deepspeed --config examples/flux.toml [--cache_only]
        [--regenerate_cache] [--resume_from_checkpoint [NAME]]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# The start-up report (training/trainer.py) measures from here, before the heavy imports.
LAUNCHED = time.time()

# torch.compile's caches (Inductor's FX graphs, AOTAutograd's, Triton's kernels) in the user's cache
# folder, not /tmp/torchinductor_<user>, which reboots and fresh containers empty: a later run
# loads the compiled layers instead of compiling them again (docs/benchmarks.md, "Start-up").
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torchinductor"))
# Quiet third-party start-up chatter before they are imported.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Neither imports torch: a config error is reported before torch loads.
from utils.errors import UserError  # noqa: E402
from utils.faults import (OUT_OF_MEMORY_HINT, disk_full, let_the_launcher_see_the_first_death,  # noqa: E402
                          out_of_memory, peer_gone, who_ended_first)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the training TOML")
    p.add_argument("--deepspeed", action="store_true", help="accepted for the DeepSpeed launcher")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the DeepSpeed launcher")
    p.add_argument("--cache_only", action="store_true", help="encode the dataset cache, then exit")
    p.add_argument("--regenerate_cache", action="store_true", help="delete and rebuild the cache")
    p.add_argument("--resume_from_checkpoint", nargs="?", const="latest", default=None,
                   help="resume the newest checkpoint, or the one (or run folder) named")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # The heavy imports after the arguments: --help and a bad command line answer at once.
    import datasets
    import torch.distributed as dist

    from config.train_config import load_train_config
    from data.batches import TrainPlan
    from data.prepare import cache_summary, prepare_dataset, regenerate_caches
    from models import get_model_class
    from parallel.engine import build_engine, resolve_compile
    from parallel.launch import init_distributed
    from parallel.stages import make_topology, resolve_attention_backend
    from saving.run_dir import create_run_dir
    from training.preflight import check_inputs
    from training.sampling import sample_prompts
    from training.trainer import Run, Trainer, total_steps

    datasets.disable_progress_bars()
    config = load_train_config(args.config, get_model_class)  # every config error surfaces before any model loads
    place = init_distributed()
    s = config.settings
    if place.is_main:
        for note in config.notes:
            print(f"note: {note}", file=sys.stderr)
        for warning in config.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    # Needs the GPU count, so not part of loading the config; still before any model loads.
    make_topology(place.world, s.pipeline_stages, config.file)
    place = place.with_stages(s.pipeline_stages)
    model = get_model_class(config.model.type)(config.model)
    config = resolve_attention_backend(resolve_compile(config, place, model.dtype), place, model.dtype)
    s = config.settings
    # The model files and the LoRA to start from, by their headers: before hours of caching.
    check_inputs(model, config.file, s.adapter)
    if args.regenerate_cache:
        regenerate_caches([config.dataset] + [e.dataset for e in config.eval_datasets], model, place)
    common = dict(micro_batch_size=s.micro_batch_size_per_gpu, caching_batch_size=s.caching_batch_size,
                  caching_workers=s.caching_workers, regenerate=False, place=place)
    # The sample prompts are embedded with the training captions, before the text encoders go.
    train = prepare_dataset(config.dataset, model, title="training dataset", **common,
                            prompts=sample_prompts(config.samples, model))
    evals = {e.name: prepare_dataset(e.dataset, model, title=f"eval dataset '{e.name}'", **common)
             for e in config.eval_datasets}
    if args.cache_only:
        if place.is_main:
            print(cache_summary([train, *evals.values()], model))
        dist.destroy_process_group()
        return 0

    plan = TrainPlan(train, s.micro_batch_size_per_gpu, place.dp_world * s.gradient_accumulation_steps, s.seed)
    steps = total_steps(config, plan.steps_per_epoch)
    run_dir = create_run_dir(config, place, args.resume_from_checkpoint)
    # The largest training shape sizes the activations in the memory estimate.
    tokens = max((model.tokens_per_sample(c.sample.bucket.width, c.sample.bucket.height, c.sample.bucket.frames) or 0
                  for c in train.samples), default=0) or None
    engine, transformer = build_engine(model, config, place, steps, tokens=tokens)
    run = Run(model, config, engine, transformer, train, evals, run_dir, place, plan, steps)
    trainer = Trainer(run, resume=args.resume_from_checkpoint, launched=LAUNCHED)
    if place.is_main:
        print(f"run folder: {run_dir}\n{steps} steps ({plan.steps_per_epoch} per epoch), starting at step {trainer.step}"
              + (f" (resumed from {trainer.resumed_from})" if trainer.resumed_from else ""))
    trainer.run()
    dist.destroy_process_group()
    # Stopped by a signal: the shell's code for it (130 for Ctrl-C), as DeepSpeed's launcher exits.
    return 128 + trainer.stopped_by if trainer.stopped_by else 0


def report_error(error: BaseException) -> int | None:
    """Print `error` as a message for the user and return the exit code, or None for an error
    that is not the user's to fix (a bug: it keeps its traceback).

    Bad input exits with 2, a fault during the run (non-finite loss, full disk) with 1.
    """
    rank = os.environ.get("RANK", "0")
    if isinstance(error, UserError):
        # Every rank raises the same, except for a fault one rank can meet alone (its own
        # checkpoint files on a full disk): rank 0 speaks for all of them unless each must.
        if error.every_rank:
            print(f"error: {'' if rank == '0' else f'[rank {rank}] '}{error}", file=sys.stderr)
        elif rank == "0":
            print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    if isinstance(error, OSError) and disk_full(error):
        where = "" if rank == "0" else f"[rank {rank}] "
        print(f"error: {where}disk full: {error}. Free some space on that disk and run again.", file=sys.stderr)
        return 1
    if out_of_memory(error):
        # One rank alone may run out (the fullest stage): it names itself; the launcher then ends the others.
        first = (str(error).strip().splitlines() or ["out of memory"])[0]
        print(f"error: [rank {rank}] out of GPU memory: {first} {OUT_OF_MEMORY_HINT}", file=sys.stderr)
        return 1
    if peer_gone(error):
        # Not this rank's fault: the rank that ended first says why; its traceback would bury that.
        print(f"error: [rank {rank}] stopped: {who_ended_first(wait=1.0)}", file=sys.stderr, flush=True)
        let_the_launcher_see_the_first_death()
        return 1
    return None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # Ctrl-C before training began (training itself stops at a step boundary, with a checkpoint).
        if os.environ.get("RANK", "0") == "0":
            print("error: interrupted (SIGINT, Ctrl-C) before training started: nothing was trained; the cache "
                  "entries encoded so far are kept", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        code = report_error(e)
        if code is None:
            raise
        if "torch" in sys.modules and sys.modules["torch"].distributed.is_initialized():
            # Python's teardown would destroy the process group with a peer's operation still
            # pending, and gloo can abort there (SIGABRT) in place of this exit code.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        sys.exit(code)
