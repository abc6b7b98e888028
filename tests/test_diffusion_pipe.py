"""Configs written for diffusion-pipe: its keys either work with the same meaning (a note at start
says how each was read) or give one line naming what to write here, all of a file's at once.

Fast tests, no launch: loading configs only. tests/test_diffusion_pipe_runs.py trains them.
"""

from __future__ import annotations

import pytest

from config.train_config import load_train_config
from models import get_model_class
from utils.dist import Distributed
from utils.errors import ConfigError

from test_config import DATASET, TRAIN, edit, error, write


def test_every_unknown_key_of_a_file_is_reported_at_once(tmp_path):
    train = edit(TRAIN, "max_steps = 10", "max_steps = 10\nmax_step = 3\neval_micro_batch_size_per_gpu = 1\n"
                                          "pseudo_huber_c = 0.5")
    train = edit(train, "rank = 8", "rank = 8\nalpah = 8")
    train = edit(train, "lr = 1e-4", "lr = 1e-4\nstabilize = false")
    train = edit(train, 'type = "flux"', 'type = "flux"\nguidence = 3.5\nbypass_guidance_embedding = true')
    message = error(tmp_path, train=train)
    head, *lines = message.split("\n")
    assert head == f"{tmp_path / 'train.toml'}: 7 keys to change:"
    assert sorted(line.split("'")[1] for line in lines) == sorted([
        "max_step", "eval_micro_batch_size_per_gpu", "pseudo_huber_c", "adapter.alpah", "optimizer.stabilize",
        "model.guidence", "model.bypass_guidance_embedding"])
    text = "\n".join(lines)
    assert "unknown key 'max_step' (did you mean 'max_steps'?)" in text
    assert "unknown key 'adapter.alpah' (did you mean 'alpha'?)" in text
    assert "unknown key 'model.guidence' (did you mean 'guidance'?)" in text
    assert ("unknown key 'eval_micro_batch_size_per_gpu' (diffusion-pipe's; eval runs at micro_batch_size_per_gpu "
            "here") in text
    assert "unknown key 'optimizer.stabilize' (diffusion-pipe's; not an option of the optimizers here" in text


def test_dataset_unknown_keys_at_once_with_diffusion_pipe_hints(tmp_path):
    dataset = edit(DATASET, "num_ar_buckets = 3", "num_ar_buckets = 3\nar_buckets = [1.0]\ncache_shuffle_num = 2")
    dataset = edit(dataset, 'path = "data"', 'path = "data"\ndefault_mask_file = "m.png"\nnum_repeat = 2')
    message = error(tmp_path, dataset=dataset)
    assert message.startswith(f"{tmp_path / 'dataset.toml'}: 4 keys to change:\n")
    assert "unknown key 'ar_buckets' (diffusion-pipe's; write min_ar, max_ar and num_ar_buckets" in message
    assert "unknown key 'directory[0].default_mask_file' (diffusion-pipe's; every media file needs its own mask" in message
    assert "unknown key 'directory[0].num_repeat' (did you mean 'num_repeats'?)" in message
    assert "'cache_shuffle_num' (diffusion-pipe's; write caption_shuffle_variants" in message


def test_diffusion_pipe_values_of_our_keys_name_the_replacement(tmp_path):
    train = edit(TRAIN, "max_steps = 10", "max_steps = 10\nmicro_batch_size_per_gpu = [[512, 4], [1024, 1]]\n"
                                          "activation_checkpointing = 'unsloth'\npartition_method = 'manual'\n"
                                          "partition_split = [10]\nvideo_clip_mode = 'single_beginning'")
    train = edit(train, "lr = 1e-4", "lr = 1e-4\ntype = 'Prodigy'")
    message = error(tmp_path, train=train)
    assert message.startswith(f"{tmp_path / 'train.toml'}: 6 keys to change:\n")
    for expected in [
        "'micro_batch_size_per_gpu' = [[512, 4], [1024, 1]] is diffusion-pipe's; per-resolution micro-batch sizes "
        "are not available here: write one integer",
        "'activation_checkpointing' = 'unsloth' is diffusion-pipe's; 'unsloth' (offloading checkpoints to CPU "
        "memory) is not available here: true recomputes every layer",
        "'partition_method' = 'manual' is diffusion-pipe's; 'manual' (with partition_split) is not available here: "
        "'type:BlockLayer'",
        "unknown key 'partition_split' (diffusion-pipe's; no manual split here",
        "unknown key 'video_clip_mode' (diffusion-pipe's; is a dataset key here: write it in the dataset TOML",
        "'optimizer.type' = 'Prodigy' is diffusion-pipe's; here: 'adamw', 'adamw8bit' or 'adafactor'",
    ]:
        assert expected in message, expected


def test_same_meaning_under_another_name_is_read_with_a_note(tmp_path):
    train = edit(TRAIN, "max_steps = 10", "max_steps = 10\neval_before_first_step = false\n"
                                          "checkpoint_every_n_minutes = 120")
    train = edit(train, 'type = "flux"', 'type = "flux"\nflux_shift = true\ntransformer_dtype = "float8_e4m3fn"')
    train = edit(train, "rank = 8", 'rank = 8\ndtype = "bfloat16"')
    train = edit(train, "lr = 1e-4", "lr = 1e-4\ntype = 'adamw_optimi'")
    dataset = edit(DATASET, "num_ar_buckets = 3", "num_ar_buckets = 3\nskip_empty_caption = false")
    config = load_train_config(write(tmp_path, train, dataset), get_model_class)
    s = config.settings
    assert s.eval_at_start is False
    assert config.model.resolution_dependent_shift is True and config.model.transformer_dtype == "float8"
    # optimi's AdamW keeps small bfloat16 updates (Kahan summation): stochastic rounding here.
    assert s.optimizer.type == "adamw" and s.optimizer.stochastic_rounding is True
    assert config.dataset.directories[0].settings.missing_caption == "empty"
    train_file, dataset_file = tmp_path / "train.toml", tmp_path / "dataset.toml"
    assert config.notes == [
        f"{train_file}: 'eval_before_first_step' is diffusion-pipe's name: read as eval_at_start = false",
        f"{train_file}: 'model.flux_shift' is diffusion-pipe's name: read as model.resolution_dependent_shift = true",
        f"{train_file}: 'model.transformer_dtype' = 'float8_e4m3fn' is diffusion-pipe's value: read as 'float8'",
        f"{train_file}: 'optimizer.type' = 'adamw_optimi' is diffusion-pipe's value: read as 'adamw'",
        f"{train_file}: optimizer.type 'adamw_optimi' keeps small updates of bfloat16 weights with Kahan summation; "
        f"here stochastic rounding does that: read as stochastic_rounding = true",
        f"{train_file}: checkpoints_to_keep is not set: the newest 3 checkpoints are kept and older ones deleted "
        f"(diffusion-pipe keeps them all); set it to keep more",
        f"{dataset_file}: 'skip_empty_caption' is diffusion-pipe's name: read as missing_caption = 'empty'",
        f"{dataset_file}: enable_ar_bucket is not set: aspect-ratio buckets are on (diffusion-pipe's default is off, "
        f"which trains every item square); set enable_ar_bucket to choose",
    ]


def test_both_names_of_one_key_is_an_error(tmp_path):
    train = edit(TRAIN, "max_steps = 10", "max_steps = 10\neval_before_first_step = false\neval_at_start = true")
    assert error(tmp_path, train=train) == (f"{tmp_path / 'train.toml'}: 'eval_before_first_step' is diffusion-pipe's "
                                            f"name for 'eval_at_start', which is also set: keep one")


def test_our_own_config_gets_no_notes_when_it_says_what_it_means(tmp_path):
    dataset = edit(DATASET, "num_ar_buckets = 3", "num_ar_buckets = 3\nenable_ar_bucket = true")
    assert load_train_config(write(tmp_path, dataset=dataset), get_model_class).notes == []


@pytest.mark.parametrize("tables", [("", "directory"), ("directory", "")])
def test_min_ar_above_max_ar_is_checked_on_the_merged_values(tmp_path, tables):
    min_table, max_table = tables
    lines = {"": ["resolutions = [64]"], "directory": ['path = "data"']}
    lines[min_table].append("min_ar = 1.5")
    lines[max_table].append("max_ar = 1.2")
    dataset = "\n".join(lines[""]) + "\n\n[[directory]]\n" + "\n".join(lines["directory"]) + "\n"
    message = error(tmp_path, dataset=dataset)
    min_key = "min_ar" if min_table == "" else "directory[0].min_ar"
    max_key = "max_ar" if max_table == "" else "directory[0].max_ar"
    assert message == (f"{tmp_path / 'dataset.toml'}: '{min_key}' gives directory[0] min_ar = 1.5, above its "
                       f"max_ar = 1.2 (from '{max_key}'); min_ar must not exceed max_ar")


def test_min_ar_above_the_default_max_ar_names_the_default(tmp_path):
    message = error(tmp_path, dataset=edit(DATASET, 'path = "data"', 'path = "data"\nmin_ar = 3.0'))
    assert "'directory[0].min_ar' gives directory[0] min_ar = 3.0, above its max_ar = 2.0 (from 'max_ar, by " \
           "default')" in message


def test_wandb_without_the_package_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    train = TRAIN + "\n[monitoring]\nenable_wandb = true\nwandb_api_key = ''\nwandb_tracker_name = 'p'\n"
    assert error(tmp_path, train=train) == (
        f"{tmp_path / 'train.toml'}: 'monitoring.enable_wandb' = true needs the wandb package, which is not "
        f"installed: pip install wandb (or set enable_wandb = false)")
    # diffusion-pipe's example table, logging off: loads as it is.
    off = TRAIN + "\n[monitoring]\nenable_wandb = false\nwandb_api_key = ''\nwandb_tracker_name = ''\n" \
                  "wandb_run_name = ''\n"
    assert load_train_config(write(tmp_path, off), get_model_class).settings.monitoring.enable_wandb is False


def test_wandb_key_in_the_config_is_not_in_the_run_folder(tmp_path):
    from saving.run_dir import create_run_dir

    key = "0123456789abcdef0123456789abcdef01234567"
    train = TRAIN + f"\n[monitoring]\nenable_wandb = false\nwandb_api_key = '{key}'\n"
    config = load_train_config(write(tmp_path, train), get_model_class)
    run_dir = create_run_dir(config, Distributed.alone(), resume=None, log=lambda _: None)
    assert all(key not in p.read_text() for p in run_dir.rglob("*") if p.is_file())
    assert "wandb_api_key = \"<redacted>\"" in (run_dir / "config" / "train.toml").read_text()


def test_wandb_offline_logs_every_step_and_writes_no_key(tmp_path, monkeypatch):
    # wandb is optional (not in requirements.txt): this runs where it is installed.
    pytest.importorskip("wandb")
    from config.training import MonitoringConfig
    from utils.metrics import Metrics

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    key = "0123456789abcdef0123456789abcdef01234567"
    metrics = Metrics(tmp_path, 3, 0, True, MonitoringConfig(enable_wandb=True, wandb_api_key=key,
                                                             wandb_tracker_name="proj", wandb_run_name="run"))
    for step in range(1, 4):
        metrics.scalars(step, {"train/loss": 1.0 / step})
    metrics.close()
    (log,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    assert log.read_bytes().count(b"train/loss") >= 3
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
