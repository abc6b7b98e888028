"""Train a diffusion transformer (a LoRA adapter, or all its weights) with DeepSpeed's pipeline engine.

    deepspeed --num_gpus=1 train.py --deepspeed --config examples/flux.toml [--cache_only]
        [--regenerate_cache] [--resume_from_checkpoint [NAME]]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# The start-up report (utils/trainer.py) measures from here, before the heavy imports.
LAUNCHED = time.time()

# torch.compile's caches (Inductor's FX graphs, AOTAutograd's, Triton's kernels) in the user's cache
# folder, not /tmp/torchinductor_<user>, which reboots and fresh containers empty: a later run
# loads the compiled layers instead of compiling them again (docs/benchmarks.md, "Start-up").
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torchinductor"))
# Quiet third-party start-up chatter before they are imported.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from utils.schema import ConfigError  # noqa: E402


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
    import datasets
    import torch.distributed as dist

    from models import get_model_class
    from training.preflight import check_inputs
    from utils.batches import TrainPlan
    from utils.config import load_train_config
    from utils.engine import build_engine, init_distributed, make_topology
    from utils.prepare import cache_summary, prepare_dataset, regenerate_caches
    from utils.sampling import sample_prompts
    from utils.saving import create_run_dir
    from utils.trainer import Trainer, total_steps

    datasets.disable_progress_bars()
    config = load_train_config(args.config)  # every config error surfaces before any model loads
    rank, world, device = init_distributed()
    s = config.settings
    if rank == 0:
        for note in config.notes:
            print(f"note: {note}", file=sys.stderr)
        for warning in config.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    # Needs the GPU count, so not part of loading the config; still before any model loads.
    make_topology(world, s.pipeline_stages, config.file)
    model = get_model_class(config.model.type)(config.model)
    # The model files and the LoRA to start from, by their headers: before hours of caching.
    check_inputs(model, config.file, s.adapter)
    if args.regenerate_cache:
        regenerate_caches([config.dataset] + [e.dataset for e in config.eval_datasets], model, rank, world)
    common = dict(micro_batch_size=s.micro_batch_size_per_gpu, caching_batch_size=s.caching_batch_size,
                  regenerate=False, rank=rank, world=world, device=device)
    # The sample prompts are embedded with the training captions, before the text encoders go.
    train = prepare_dataset(config.dataset, model, title="training dataset", **common,
                            prompts=sample_prompts(config.samples, model))
    evals = {e.name: prepare_dataset(e.dataset, model, title=f"eval dataset '{e.name}'", **common)
             for e in config.eval_datasets}
    if args.cache_only:
        if rank == 0:
            print(cache_summary([train, *evals.values()], model))
        dist.destroy_process_group()
        return 0

    dp_world = world // s.pipeline_stages
    plan = TrainPlan(train, s.micro_batch_size_per_gpu, dp_world * s.gradient_accumulation_steps, s.seed)
    steps = total_steps(config, plan.steps_per_epoch)
    run_dir = create_run_dir(config, rank, world, args.resume_from_checkpoint)
    # The largest training shape sizes the activations in the memory estimate.
    tokens = max((model.tokens_per_sample(c.sample.bucket.width, c.sample.bucket.height, c.sample.bucket.frames) or 0
                  for c in train.samples), default=0) or None
    engine, transformer = build_engine(model, config, rank, world, device, steps, tokens=tokens)
    trainer = Trainer(model, config, engine, transformer, train, evals, run_dir, rank, world, device, plan, steps,
                      resume=args.resume_from_checkpoint, launched=LAUNCHED)
    if rank == 0:
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
    # Only modules already imported can have raised their errors: an early config error does
    # not wait for torch to import.
    dataset, faults, trainer = (sys.modules.get(f"utils.{m}") for m in ("dataset", "faults", "trainer"))
    rank = os.environ.get("RANK", "0")
    if isinstance(error, (ConfigError, FileNotFoundError)) or (dataset and isinstance(error, dataset.DataError)):
        # Every rank raises the same: rank 0 speaks for all of them.
        if rank == "0":
            print(f"error: {error}", file=sys.stderr)
        return 2
    if trainer and isinstance(error, trainer.TrainingStopped):
        if rank == "0":
            print(f"error: {error}", file=sys.stderr)
        return 1
    if faults and isinstance(error, OSError) and faults.disk_full(error):
        # A rank can meet a full disk alone (writing its own checkpoint files): each one says so.
        where = "" if rank == "0" else f"[rank {rank}] "
        message = str(error) if isinstance(error, faults.DiskFullError) else \
            f"disk full: {error}. Free some space on that disk and run again."
        print(f"error: {where}{message}", file=sys.stderr)
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
        sys.exit(code)
