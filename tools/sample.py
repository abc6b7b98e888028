"""Draw a training config's [sample] prompts without training: from a saved adapter, a checkpoint,
a full fine-tune's saved model, or the base model alone (to compare).

    deepspeed --num_gpus=N tools/sample.py --deepspeed --config my_flux.toml --adapter <run>/adapters/final
    deepspeed --num_gpus=N tools/sample.py --deepspeed --config my_flux.toml --checkpoint <run>/checkpoints/step00000030
    deepspeed --num_gpus=N tools/sample.py --deepspeed --config my_flux.toml --full_model <run>/models/final
    deepspeed --num_gpus=N tools/sample.py --deepspeed --config my_flux.toml --base

The samples are drawn exactly as training draws them (same engine, stages and settings: set
`pipeline_stages` as the GPUs need) into `<out>/step<N>/` (N from the source's name, else 0). Default
`<out>`: `samples/` beside the adapter, checkpoint or model folder; `<output_dir>/base_samples` for
--base.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from train import report_error  # noqa: E402
from utils.errors import ConfigError, UserError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the training TOML, with a [sample] table")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", type=Path, help="a saved adapter folder (or its pytorch_lora_weights.safetensors)")
    source.add_argument("--checkpoint", type=Path, help="a checkpoint folder, <run>/checkpoints/step<N>")
    source.add_argument("--full_model", type=Path, help="a full fine-tune's saved model, <run>/models/<name>")
    source.add_argument("--base", action="store_true", help="the base model alone")
    p.add_argument("--out", type=Path, help="where the step<N>/ folder goes (see above)")
    p.add_argument("--deepspeed", action="store_true", help="accepted for the DeepSpeed launcher")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the DeepSpeed launcher")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch.distributed as dist

    from config.train_config import load_train_config
    from data.cache import DatasetCache
    from models import get_model_class
    from parallel.engine import build_engine
    from parallel.launch import init_distributed
    from parallel.stages import make_topology
    from training.preflight import check_inputs
    from training.sampling import Sampler, sample_prompts

    config = load_train_config(args.config, get_model_class)
    if not config.samples:
        raise ConfigError(f"{config.file}: has no [sample] table: no prompts to draw")
    s = config.settings
    source = args.adapter or args.checkpoint or args.full_model
    if source is not None and not source.exists():
        raise UserError(f"{source}: not found")
    place = init_distributed()
    make_topology(place.world, s.pipeline_stages, config.file)
    place = place.with_stages(s.pipeline_stages)
    model = get_model_class(config.model.type)(config.model)
    if args.adapter is not None:
        if s.adapter is None:
            raise ConfigError(f"{config.file}: --adapter needs the [adapter] table of the run that trained it")
        s.adapter.init_from_existing = str(args.adapter.resolve())
    elif args.full_model is not None:
        folder = args.full_model / "transformer"
        if not (folder / "config.json").is_file():
            raise UserError(f"--full_model: {args.full_model} holds no transformer/config.json "
                            f"(expected a saved model, <run>/models/<name>)")
        s.adapter = None  # every weight from the saved model; nothing of it trains here
        config.model.transformer_path = None
        model.transformer_dir = folder.resolve()
    elif s.adapter is not None:
        s.adapter.init_from_existing = None  # --base, or the checkpoint's weights replace it
    check_inputs(model, config.file, s.adapter)

    # The prompts' embeddings, in the training dataset's text cache (encoded only if missing).
    cache = DatasetCache(model, [], sample_prompts(config.samples, model), text_folder=config.dataset.directories[0].path)
    texts = cache.build(place, s.caching_batch_size)
    engine, _ = build_engine(model, config, place, 1, log=print if place.is_main else (lambda *_: None))
    step = 0
    if args.checkpoint is not None:
        path, _ = engine.load_checkpoint(str(args.checkpoint.parent), tag=args.checkpoint.name,
                                         load_module_strict=False, load_optimizer_states=False,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise UserError(f"--checkpoint: DeepSpeed could not load {args.checkpoint}")
    if source is not None:
        found = re.search(r"step(\d+)", source.resolve().name)
        step = int(found.group(1)) if found else 0
    out = args.out or (config.settings.output_dir / "base_samples" if args.base else
                       (source.parent if source.is_file() else source) / "samples")
    ok = Sampler(model, engine, config.samples, texts, out, place).run(step)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:
        code = report_error(e)
        if code is None:
            raise
        sys.exit(code)
