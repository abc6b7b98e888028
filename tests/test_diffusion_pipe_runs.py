"""Configs as diffusion-pipe users have them, for FLUX.1, LTX-Video and HunyuanVideo, converted by
nothing: written here in its key names and meanings (its example configs' keys), against the tiny
models. Each first stops with one message naming the replacement for every key that has no
equivalent here; with exactly those keys changed as the message says, it trains, and its bucket
table holds the buckets diffusion-pipe's rule gives (a resolution is an area; aspect ratios
evenly spaced in log space; each item in the bucket nearest its aspect ratio; videos in the
longest frame bucket they fill, never in the image bucket).

One launch per model (slow, about a minute for the three).
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import launch, to_toml
from make_demo_dataset import make_demo_dataset, make_demo_videos
from config.dataset_config import load_dataset_config
from config.train_config import load_train_config
from data.scan import scan_dataset
from models import get_model_class
from utils.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_models import make_tiny_hunyuan_video, make_tiny_ltx_video  # noqa: E402

SIZE_MULTIPLE = {"flux": 16, "ltx-video": 32, "hunyuan-video": 16}


def diffusion_pipe_main(model: dict, dataset: str = "dataset.toml") -> dict:
    """The top level of its main_example.toml / hunyuan_video.toml, as a user copies it."""
    return {
        "output_dir": "runs", "dataset": dataset, "epochs": 1000, "max_steps": 2,
        "micro_batch_size_per_gpu": 1, "pipeline_stages": 1, "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0, "warmup_steps": 0,
        "eval_before_first_step": False, "eval_micro_batch_size_per_gpu": 1, "eval_gradient_accumulation_steps": 1,
        "save_every_n_epochs": 2, "checkpoint_every_n_minutes": 120, "activation_checkpointing": True,
        "partition_method": "parameters", "save_dtype": "float32", "caching_batch_size": 1, "steps_per_print": 1,
        "video_clip_mode": "single_beginning",
        "model": model,
        "adapter": {"type": "lora", "rank": 4, "dtype": "float32"},
        "optimizer": {"type": "adamw_optimi", "lr": 2e-5, "betas": [0.9, 0.99], "weight_decay": 0.01, "eps": 1e-8},
        "monitoring": {"enable_wandb": False, "wandb_api_key": "", "wandb_tracker_name": "", "wandb_run_name": ""},
    }


def diffusion_pipe_dataset(folders: list[Path], frame_buckets: list[int]) -> dict:
    """Its dataset.toml: a (width, height) resolution (an area there), AR buckets on, frame buckets."""
    return {"resolutions": [[96, 64]], "enable_ar_bucket": True, "min_ar": 0.5, "max_ar": 2.0, "num_ar_buckets": 3,
            "frame_buckets": frame_buckets, "directory": [{"path": str(f), "num_repeats": 1} for f in folders]}


def expected_buckets(dataset_file: Path, size_multiple: int) -> Counter:
    """diffusion-pipe's bucket of every item, by its rule (written from its documentation and
    dataset code's meaning): area w*h of the resolution; aspect ratios geomspace(min_ar, max_ar,
    num_ar_buckets); the nearest one in log space; sides sqrt(area * ar) and area / that, rounded
    to a multiple; frames: the longest frame bucket the item fills, a video never 1. Sides are
    rounded to `size_multiple`: the model's here, 32 there (the one difference, in docs/migrating.md)."""
    dataset = load_dataset_config(dataset_file)
    raw = dataset.raw
    (width, height), = raw.resolutions
    area = width * height
    ars = [math.exp(math.log(raw.min_ar) + i * (math.log(raw.max_ar) - math.log(raw.min_ar)) / (raw.num_ar_buckets - 1))
           for i in range(raw.num_ar_buckets)]
    counts = Counter()
    for item in scan_dataset(dataset).items:
        ar = min(ars, key=lambda a: abs(math.log(item.width / item.height) - math.log(a)))
        fits = [f for f in raw.frame_buckets if f <= item.frames and not (item.is_video and f == 1)]
        if not fits:
            continue
        w = math.sqrt(area * ar)
        side = lambda x: size_multiple * round(x / size_multiple)  # noqa: E731
        counts[(side(w), side(area / w), max(fits))] += 1
    return counts


def trained_buckets(output: str) -> Counter:
    """The bucket table printed at start: (width, height, frames) -> items."""
    rows = re.findall(r"^\S+\s+(\d+)x(\d+)\s+[\d.]+\s+(\d+)\s+(\d+)\s", output, re.MULTILINE)
    return Counter({(int(w), int(h), int(f)): int(n) for w, h, f, n in rows})


def drop_named(config: dict, message: str) -> dict:
    """The config with every key the message says to remove taken out (and nothing else)."""
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    for key in re.findall(r"unknown key '([\w.]+)' \(diffusion-pipe's;", message):
        table, _, name = key.rpartition(".")
        (config[table] if table else config).pop(name)
    return config


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dp_media")
    return {"images": make_demo_dataset(root / "images", count=6, seed=0),
            "videos": make_demo_videos(root / "videos", count=2, seed=0, frames=(9, 17))}


CASES = {
    # (model table as diffusion-pipe's example writes it, what our message must name, frame buckets)
    "flux": ({"type": "flux", "transformer_path": "flux1-tiny-original.safetensors", "dtype": "float32",
              "flux_shift": True, "bypass_guidance_embedding": False},
             ["model.bypass_guidance_embedding"], [1]),
    "ltx-video": ({"type": "ltx-video", "single_file_path": "ltx-video-tiny-original.safetensors", "dtype": "float32",
                   "timestep_sample_method": "logit_normal", "first_frame_conditioning_p": 0.1},
                  ["model.single_file_path", "model.first_frame_conditioning_p"], [1, 9]),
    # Its hunyuan_video.toml's files: the transformer and VAE as ComfyUI's single files, llm_path
    # a transformers folder with its tokenizer; clip_path here ComfyUI's single file, which is read too.
    "hunyuan-video": ({"type": "hunyuan-video", "transformer_path": "hunyuan-video-tiny-original.safetensors",
                       "vae_path": "hunyuan_video_vae_tiny.safetensors",
                       "llm_path": "llava-llama-3-tiny-text-encoder-tokenizer", "clip_path": "clip_l_tiny.safetensors",
                       "dtype": "float32", "transformer_dtype": "float8", "timestep_sample_method": "logit_normal"},
                      [], [1, 9]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_diffusion_pipe_config_stops_with_replacements_then_trains_its_buckets(tmp_path, tiny_models, media, name):
    model_table, named, frame_buckets = CASES[name]
    models = tiny_models if name == "flux" else tmp_path
    if name == "ltx-video":
        make_tiny_ltx_video(tmp_path)
    elif name == "hunyuan-video":
        make_tiny_hunyuan_video(tmp_path)
    model_dir = models / name
    folders = [media["images"]] + ([media["videos"]] if frame_buckets != [1] else [])
    (tmp_path / "dataset.toml").write_text(to_toml(diffusion_pipe_dataset(folders, frame_buckets)))
    model_table = {k: (str(model_dir / v) if k.endswith("_path") else v) for k, v in model_table.items()}
    config = diffusion_pipe_main(model_table)
    path = tmp_path / "train.toml"
    path.write_text(to_toml(config))

    # 1. As written for diffusion-pipe: one message naming every key to change, each with its replacement.
    with pytest.raises(ConfigError) as info:
        load_train_config(path, get_model_class)
    message = str(info.value)
    listed = re.findall(r"^  (?:unknown key )?'([\w.]+)'", message, re.MULTILINE)
    common = ["eval_micro_batch_size_per_gpu", "eval_gradient_accumulation_steps", "video_clip_mode"]
    assert sorted(listed) == sorted(common + named), message
    assert "(diffusion-pipe's; " in message and "did you mean" not in message

    # 2. Those keys changed as the message says (removed; the model as a diffusers folder): it trains.
    config = drop_named(config, message)
    if "transformer_path" in config["model"]:
        # Its configs name the single files only: the folder for the configs is asked for in one line.
        path.write_text(to_toml(config))
        with pytest.raises(ConfigError, match=r"missing required key 'model.diffusers_path': a diffusers folder of "
                                              r"the model, for its configs, tokenizers and scheduler"):
            load_train_config(path, get_model_class)
    config["model"]["diffusers_path"] = str(model_dir)
    if name == "ltx-video":
        config["model"]["transformer_path"] = str(model_dir / "ltx-video-tiny-original.safetensors")
    if name == "hunyuan-video":
        # Only the diffusers folder's configs and tokenizers are read: every weight comes from its files.
        for weights in model_dir.glob("*/*.safetensors"):
            if weights.parent.name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
                weights.unlink()
    path.write_text(to_toml(config))
    result = launch(path)
    assert result.returncode == 0, result.output[-4000:]
    assert "Traceback" not in result.output
    # The names read with diffusion-pipe's meaning are said at start.
    assert "'eval_before_first_step' is diffusion-pipe's name: read as eval_at_start = false" in result.stderr
    assert "'optimizer.type' = 'adamw_optimi' is diffusion-pipe's value: read as 'adamw'" in result.stderr
    if name == "flux":
        assert "read as model.resolution_dependent_shift = true" in result.stderr
    assert len(result.losses()) == 2

    # 3. The buckets it trained are diffusion-pipe's (sides rounded to the model's multiple).
    trained = trained_buckets(result.output)
    assert trained == expected_buckets(tmp_path / "dataset.toml", SIZE_MULTIPLE[name]), result.output[:6000]
    assert len(trained) >= 2  # more than one aspect-ratio bucket: the pair was read as an area
