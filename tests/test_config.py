"""Config loading errors: every bad input is a ConfigError naming the file and the key.

The TOMLs are written out as text, as a user would write them; each test edits one line of a
valid pair of files (which `test_valid_config_loads` shows loads) and checks the message.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from config.parallel import accumulation_for_efficiency, pipeline_efficiency, pipeline_summary
from config.train_config import load_train_config
from models import get_model_class
from utils.dist import Distributed
from utils.errors import ConfigError

from conftest import launch

TRAIN = """\
output_dir = "runs"
dataset = "dataset.toml"
max_steps = 10

[model]
type = "flux"
diffusers_path = "model"

[adapter]
type = "lora"
rank = 8

[optimizer]
lr = 1e-4
"""

DATASET = """\
resolutions = [64]
num_ar_buckets = 3

[[directory]]
path = "data"
"""


def edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is not once in the template"
    return text.replace(old, new)


def write(folder: Path, train: str = TRAIN, dataset: str = DATASET) -> Path:
    """The two TOMLs plus the folders they name (an empty model folder: only its path is checked)."""
    (folder / "model").mkdir(exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    (folder / "dataset.toml").write_text(dataset)
    path = folder / "train.toml"
    path.write_text(train)
    return path


def error(folder: Path, train: str = TRAIN, dataset: str = DATASET) -> str:
    path = write(folder, train, dataset)
    with pytest.raises(ConfigError) as info:
        load_train_config(path, get_model_class)
    return str(info.value)


def test_valid_config_loads(tmp_path):
    config = load_train_config(write(tmp_path), get_model_class)
    assert config.settings.max_steps == 10 and config.settings.epochs is None
    assert config.model.type == "flux" and config.model.diffusers_path == str(tmp_path / "model")
    assert config.settings.adapter.rank == 8 and config.settings.adapter.alpha == 8.0  # alpha defaults to rank
    assert config.settings.optimizer.lr == 1e-4
    (directory,) = config.dataset.directories
    assert directory.path == tmp_path / "data" and directory.settings.resolutions == [64]
    assert config.settings.output_dir == tmp_path / "runs"


# (which file, template line, replacement, the key the message names, the suggested key)
UNKNOWN_KEYS = {
    "top level": ("train", "max_steps = 10", "max_step = 10", "max_step", "max_steps"),
    "model": ("train", 'type = "flux"', 'type = "flux"\nguidence = 3.5', "model.guidence", "guidance"),
    "adapter": ("train", "rank = 8", "rank = 8\nalpah = 8", "adapter.alpah", "alpha"),
    "optimizer": ("train", "lr = 1e-4", "lr = 1e-4\nweight_decy = 0.1", "optimizer.weight_decy", "weight_decay"),
    "dataset": ("dataset", "num_ar_buckets = 3", "num_ar_bucket = 3", "num_ar_bucket", "num_ar_buckets"),
    "dataset directory": ("dataset", 'path = "data"', 'path = "data"\nnum_repeat = 2', "directory[0].num_repeat",
                          "num_repeats"),
}


@pytest.mark.parametrize("case", UNKNOWN_KEYS.values(), ids=UNKNOWN_KEYS.keys())
def test_unknown_key_suggests_the_nearest(tmp_path, case):
    which, old, new, key, suggestion = case
    if which == "train":
        message = error(tmp_path, train=edit(TRAIN, old, new))
    else:
        message = error(tmp_path, dataset=edit(DATASET, old, new))
    assert message.startswith(f"{tmp_path / (which + '.toml')}: ")
    assert f"unknown key '{key}' (did you mean '{suggestion}'?)" in message


def test_unknown_key_without_a_near_name_lists_the_valid_ones(tmp_path):
    message = error(tmp_path, train=edit(TRAIN, "lr = 1e-4", "lr = 1e-4\nmomentum = 0.9"))
    assert message == (f"{tmp_path / 'train.toml'}: unknown key 'optimizer.momentum'; "
                       f"valid keys here: betas, eps, lr, stochastic_rounding, type, weight_decay")


WRONG_TYPES = {
    "string for int": ("train", "rank = 8", 'rank = "8"', "'adapter.rank' must be an integer, got '8'"),
    "float for int": ("train", "max_steps = 10", "max_steps = 10.5", "'max_steps' must be an integer, got 10.5"),
    "string for bool": ("train", "max_steps = 10", 'max_steps = 10\neval_at_start = "yes"',
                        "'eval_at_start' must be true or false, got 'yes'"),
    "choice": ("train", 'type = "lora"', 'type = "lycoris"',
               "'adapter.type' must be 'lora' | 'lokr' | 'loha', got 'lycoris'"),
    "resolution": ("dataset", "resolutions = [64]", 'resolutions = ["a"]',
                   "'resolutions[0]' must be a size like 512 or [1280, 720], got 'a'"),
    "number for list": ("dataset", 'path = "data"', 'path = "data"\nresolutions = 128',
                        "'directory[0].resolutions' must be a list like [512] or [[1280, 720]], got 128"),
    "pair": ("train", "lr = 1e-4", "lr = 1e-4\nbetas = 0.9", "'optimizer.betas' must be a list of 2 finite numbers"),
    # typing keeps one Union per set of types, in the order it was first written anywhere
    "list of strings": ("train", "rank = 8", "rank = 8\ntarget_modules = 1",
                        ("'adapter.target_modules' must be a list of strings or a string, got 1",
                         "'adapter.target_modules' must be a string or a list of strings, got 1")),
}


@pytest.mark.parametrize("case", WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_wrong_type_names_key_and_expected_type(tmp_path, case):
    which, old, new, expected = case
    if which == "train":
        message = error(tmp_path, train=edit(TRAIN, old, new))
    else:
        message = error(tmp_path, dataset=edit(DATASET, old, new))
    assert message.startswith(f"{tmp_path / (which + '.toml')}: ")
    assert any(e in message for e in ((expected,) if isinstance(expected, str) else expected)), message


def test_missing_required_keys(tmp_path):
    train = tmp_path / "train.toml"
    message = error(tmp_path, train=edit(TRAIN, 'output_dir = "runs"\n', ""))
    assert message == f"{train}: missing required key 'output_dir' (a string)"
    message = error(tmp_path, train=edit(TRAIN, 'diffusers_path = "model"\n', ""))
    assert message == f"{train}: missing required key 'model.diffusers_path' (a string)"
    message = error(tmp_path, train=edit(TRAIN, 'type = "flux"\n', ""))
    assert message.startswith(f"{train}: missing required key 'model.type'")
    message = error(tmp_path, dataset=edit(DATASET, 'path = "data"\n', 'num_repeats = 2\n'))
    assert message == f"{tmp_path / 'dataset.toml'}: missing required key 'directory[0].path' (a string)"
    message = error(tmp_path, dataset="resolutions = [64]\n")
    assert message.startswith(f"{tmp_path / 'dataset.toml'}: 'directory' needs at least one [[directory]]")


def test_missing_paths(tmp_path):
    message = error(tmp_path, dataset=edit(DATASET, 'path = "data"', 'path = "no_such_folder"'))
    assert message == (f"{tmp_path / 'dataset.toml'}: 'directory[0].path' is not a folder: "
                       f"{tmp_path / 'no_such_folder'}")
    message = error(tmp_path, train=edit(TRAIN, 'diffusers_path = "model"', 'diffusers_path = "no_model"'))
    assert message == f"{tmp_path / 'train.toml'}: 'model.diffusers_path' does not exist: {tmp_path / 'no_model'}"
    message = error(tmp_path, train=edit(TRAIN, 'type = "flux"', 'type = "flux"\ntransformer_path = "x.safetensors"'))
    assert message.startswith(f"{tmp_path / 'train.toml'}: 'model.transformer_path' does not exist")
    message = error(tmp_path, train=edit(TRAIN, 'type = "flux"', 'type = "flux"\ntransformer_path = "data"'))
    assert message == (f"{tmp_path / 'train.toml'}: 'model.transformer_path' is a folder: {tmp_path / 'data'}; "
                       f"expected the transformer's single .safetensors file (a diffusers folder goes in "
                       f"model.diffusers_path)")
    message = error(tmp_path, train=edit(TRAIN, 'rank = 8', 'rank = 8\ninit_from_existing = "old_lora"'))
    assert message.startswith(f"{tmp_path / 'train.toml'}: 'adapter.init_from_existing' does not exist")
    message = error(tmp_path, train=edit(TRAIN, 'dataset = "dataset.toml"', 'dataset = "datset.toml"'))
    assert message == f"{tmp_path / 'datset.toml'}: file not found"


def test_unknown_model_type(tmp_path):
    message = error(tmp_path, train=edit(TRAIN, 'type = "flux"', 'type = "flux9"'))
    prefix = f"{tmp_path / 'train.toml'}: 'model.type' is 'flux9', which is not a known model; known: "
    assert message.startswith(prefix)
    assert "flux" in message.removeprefix(prefix).split(", ")


def test_resolution_not_a_multiple_of_16_names_the_dataset_key(tmp_path):
    dataset_file = tmp_path / "dataset.toml"
    message = error(tmp_path, dataset=edit(DATASET, "resolutions = [64]", "resolutions = [64, 100]"))
    assert message.startswith(f"{dataset_file}: 'resolutions[1]' is 100: ")
    assert "not a multiple of 16" in message and "nearest: 96 or 112" in message
    message = error(tmp_path, dataset=edit(DATASET, 'path = "data"', 'path = "data"\nresolutions = [[96, 72], 72]'))
    assert message.startswith(f"{dataset_file}: 'directory[0].resolutions[1]' is 72: ")


def test_eval_dataset_errors_name_the_eval_dataset_file(tmp_path):
    train = edit(TRAIN, "max_steps = 10", 'max_steps = 10\neval_datasets = [{ name = "val", config = "eval.toml" }]')
    (tmp_path / "eval.toml").write_text(edit(DATASET, "num_ar_buckets = 3", "num_ar_buckets = 0"))
    message = error(tmp_path, train=train)
    assert message == f"{tmp_path / 'eval.toml'}: 'num_ar_buckets' must be at least 1"


def test_bad_toml_syntax_names_the_file_and_line(tmp_path):
    message = error(tmp_path, train=edit(TRAIN, "max_steps = 10", "max_steps = "))
    assert message.startswith(f"{tmp_path / 'train.toml'}: not valid TOML: ")
    assert "line 3" in message
    message = error(tmp_path, dataset=edit(DATASET, "[[directory]]", "[[directory]"))
    assert message.startswith(f"{tmp_path / 'dataset.toml'}: not valid TOML: ")
    assert "line 4" in message


def test_a_key_or_table_set_twice_is_named(tmp_path):
    train = tmp_path / "train.toml"
    message = error(tmp_path, train=edit(TRAIN, "lr = 1e-4", "lr = 1e-4\n  lr  = 1e-3  # again"))
    assert message == f"{train}: not valid TOML: 'optimizer.lr' is set twice (at line 15, column 13); a key may be set only once"
    message = error(tmp_path, train=edit(TRAIN, "max_steps = 10", "max_steps = 10\nmax_steps = 20"))
    assert message == f"{train}: not valid TOML: 'max_steps' is set twice (at line 4, column 15); a key may be set only once"
    message = error(tmp_path, train=TRAIN + "\n[adapter]\ndropout = 0.1\n")
    assert message == (f"{train}: not valid TOML: the table [adapter] is declared twice (at line 16, column 9); "
                       f"put all its keys under one [adapter] header")


def test_a_top_level_key_below_a_table_header_gets_the_toml_table_rule(tmp_path):
    eval_table = '[[eval_datasets]]\nname = "val"\nconfig = "dataset.toml"\nepochs = 3\n'
    message = error(tmp_path, train=edit(TRAIN, "[optimizer]", eval_table + "\n[optimizer]"))
    assert message == (f"{tmp_path / 'train.toml'}: unknown key 'eval_datasets[0].epochs': 'epochs' is a top-level "
                       f"key, but TOML puts every key written after the [[eval_datasets]] header into that table; "
                       f"move 'epochs' above the first [table] header of the file")
    message = error(tmp_path, train=edit(TRAIN, 'diffusers_path = "model"', 'diffusers_path = "model"\nseed = 1'))
    assert "unknown key 'model.seed': 'seed' is a top-level key" in message and "after the [model] header" in message
    message = error(tmp_path, dataset=DATASET + "strict = true\n")
    assert "unknown key 'directory[0].strict': 'strict' is a top-level key" in message
    assert "after the [[directory]] header" in message


def test_training_length_is_required(tmp_path):
    message = error(tmp_path, train=edit(TRAIN, "max_steps = 10\n", ""))
    assert message == f"{tmp_path / 'train.toml'}: 'epochs' or 'max_steps' must be set (how long to train)"
    config = load_train_config(write(tmp_path, edit(TRAIN, "max_steps = 10", "epochs = 2")), get_model_class)
    assert config.settings.epochs == 2


def test_values_out_of_range(tmp_path):
    message = error(tmp_path, train=edit(TRAIN, "max_steps = 10", "max_steps = 0"))
    assert message == f"{tmp_path / 'train.toml'}: 'max_steps' must be at least 1, got 0"
    message = error(tmp_path, train=edit(TRAIN, "rank = 8", "rank = 0"))
    assert message == f"{tmp_path / 'train.toml'}: 'adapter.rank' must be at least 1"


def test_zero_stage_1_is_for_full_finetuning_with_adamw(tmp_path):
    file = tmp_path / "train.toml"
    full = edit(TRAIN, "[adapter]\ntype = \"lora\"\nrank = 8\n", "").replace("max_steps = 10", "max_steps = 10\nzero_stage = 1")
    assert load_train_config(write(tmp_path, full), get_model_class).settings.zero_stage == 1
    assert error(tmp_path, edit(TRAIN, "max_steps = 10", "max_steps = 10\nzero_stage = 1")) == (
        f"{file}: 'zero_stage' = 1 is for full fine-tuning (no [adapter] table): a LoRA's optimizer state is small")
    assert error(tmp_path, full.replace("zero_stage = 1", "zero_stage = 2")).startswith(
        f"{file}: 'zero_stage' must be 0 or 1, got 2: stages 2 and 3 shard gradients and weights")
    assert error(tmp_path, full.replace("lr = 1e-4", "lr = 1e-4\ntype = \"adafactor\"")).startswith(
        f"{file}: 'zero_stage' = 1 needs optimizer.type = 'adamw' (got 'adafactor')")
    bf16 = full.replace("zero_stage = 1", "zero_stage = 1\nfull_finetune_dtype = \"bfloat16\"")
    assert error(tmp_path, bf16.replace("lr = 1e-4", "lr = 1e-4\nstochastic_rounding = true")).startswith(
        f"{file}: 'optimizer.stochastic_rounding' = true has nothing to round with zero_stage = 1")


def test_pipeline_stages_must_divide_the_gpu_count(tmp_path):
    from parallel.stages import make_topology

    config_file = tmp_path / "train.toml"
    with pytest.raises(ConfigError) as info:
        make_topology(world_size=1, stages=2, config_file=config_file)
    assert str(info.value) == (f"{config_file}: 'pipeline_stages' = 2 does not divide the number of GPUs (1); "
                               f"use a GPU count that is a multiple of it")
    with pytest.raises(ConfigError, match="'pipeline_stages' = 4 does not divide the number of GPUs \\(6\\)"):
        make_topology(world_size=6, stages=4, config_file=config_file)
    topology = make_topology(world_size=6, stages=3, config_file=config_file)
    assert topology.get_dim("pipe") == 3 and topology.get_dim("data") == 2


@pytest.mark.slow
def test_launch_with_misspelt_key_prints_one_error_line(tmp_path):
    # Before any model loads: an empty model folder is enough to show the error comes first.
    config = write(tmp_path, train=edit(TRAIN, "max_steps = 10", "max_stesp = 10"))
    result = launch(config, launcher=True)
    assert result.returncode == 2, result.output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {config}: unknown key 'max_stesp' (did you mean 'max_steps'?)"]
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_nan_and_infinity_are_not_numbers_a_setting_takes(tmp_path):
    for value in ("nan", "inf", "-inf"):
        message = error(tmp_path, train=edit(TRAIN, "lr = 1e-4", f"lr = {value}"))
        assert message == f"{tmp_path / 'train.toml'}: 'optimizer.lr' must be a finite number, got {float(value)!r}"
    message = error(tmp_path, dataset=edit(DATASET, "num_ar_buckets = 3", "num_ar_buckets = 3\nmax_ar = inf"))
    assert message == f"{tmp_path / 'dataset.toml'}: 'max_ar' must be a finite number, got inf"


def test_paths_that_cannot_be_used(tmp_path):
    train, dataset = tmp_path / "train.toml", tmp_path / "dataset.toml"
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    message = error(tmp_path, dataset=edit(DATASET, 'path = "data"', 'path = "loop"'))
    assert message.startswith(f"{dataset}: 'directory[0].path' is not a usable path (Symlink loop from ")
    assert message.endswith(": 'loop'")
    message = error(tmp_path, train=edit(TRAIN, 'output_dir = "runs"', 'output_dir = "ru\\u0000ns"'))
    assert message == f"{train}: 'output_dir' is not a usable path (embedded null byte): 'ru\\x00ns'"
    (tmp_path / "runs").write_text("a file where the runs should go")
    message = error(tmp_path)
    assert message == f"{train}: 'output_dir' is a file, not a folder: {tmp_path / 'runs'}"
    (tmp_path / "runs").unlink()
    message = error(tmp_path, train=edit(TRAIN, 'dataset = "dataset.toml"', 'dataset = "data"'))
    assert message == f"{tmp_path / 'data'}: is a folder; expected a TOML file"
    message = error(tmp_path, train=edit(TRAIN, 'diffusers_path = "model"', f'diffusers_path = "{"x" * 5000}"'))
    assert message.startswith(f"{train}: 'model.diffusers_path' does not exist: ")


def test_regular_expressions_are_checked(tmp_path):
    message = error(tmp_path, train=edit(TRAIN, "max_steps = 10", 'max_steps = 10\npartition_method = "type:Block("'))
    assert message.startswith(f"{tmp_path / 'train.toml'}: 'partition_method' is not a valid regular expression "
                              f"(missing ), unterminated subpattern")
    message = error(tmp_path, train=edit(TRAIN, "rank = 8", 'rank = 8\ntarget_modules = "to_[qkv"'))
    assert message.startswith(f"{tmp_path / 'train.toml'}: 'adapter.target_modules' is not a valid regular expression")


def test_pipeline_efficiency_below_75_percent_is_a_warning_naming_the_accumulation_to_use(tmp_path):
    config = load_train_config(write(tmp_path, edit(TRAIN, "max_steps = 10", "max_steps = 10\npipeline_stages = 4")),
                               get_model_class)
    assert config.warnings == [
        f"{tmp_path / 'train.toml'}: 'gradient_accumulation_steps' = 1 with 'pipeline_stages' = 4: each GPU idles 75% "
        f"of each step (a pipeline fills and drains once a step: the idle share is (stages - 1) / (accumulation + "
        f"stages - 1)); set gradient_accumulation_steps to at least 9 for 75% busy (more is better)"]
    # 8 / (8 + 3) = 73%: still below
    eight = edit(TRAIN, "max_steps = 10", "max_steps = 10\npipeline_stages = 4\ngradient_accumulation_steps = 8")
    assert "at least 9 for 75% busy" in load_train_config(write(tmp_path, eight), get_model_class).warnings[0]
    fine = edit(TRAIN, "max_steps = 10", "max_steps = 10\npipeline_stages = 2\ngradient_accumulation_steps = 3")
    assert load_train_config(write(tmp_path, fine), get_model_class).warnings == []
    for stages in (2, 3, 4, 8):
        m = accumulation_for_efficiency(stages, 0.75)
        assert pipeline_efficiency(stages, m) >= 0.75 > pipeline_efficiency(stages, m - 1)
    assert pipeline_summary(2, 8).startswith("pipeline: 2 stages, 8 micro-batches a step: each GPU computes at most 89%")


def test_eval_set_that_is_the_training_set_is_a_warning(tmp_path):
    (tmp_path / "held_out").mkdir()
    (tmp_path / "eval.toml").write_text(DATASET + '\n[[directory]]\npath = "held_out"\n')
    train = edit(TRAIN, "max_steps = 10", 'max_steps = 10\neval_datasets = [{ name = "same", config = "dataset.toml" },'
                                          ' { name = "part", config = "eval.toml" }]')
    config = load_train_config(write(tmp_path, train), get_model_class)
    # Still loads and trains: only said.
    assert [e.name for e in config.eval_datasets] == ["same", "part"]
    assert config.warnings == [
        f"{tmp_path / 'train.toml'}: eval dataset '{name}' ({tmp_path / toml}) reads training folder(s) "
        f"{tmp_path / 'data'}: its eval loss measures fitting the training data, not how the model does on unseen "
        f"data; give it a folder of held-out items" for name, toml in (("same", "dataset.toml"), ("part", "eval.toml"))]
    held_out = edit(TRAIN, "max_steps = 10", 'max_steps = 10\neval_datasets = [{ name = "h", config = "h.toml" }]')
    (tmp_path / "h.toml").write_text(edit(DATASET, 'path = "data"', 'path = "held_out"'))
    assert load_train_config(write(tmp_path, held_out), get_model_class).warnings == []


def test_output_folder_holding_other_runs_gets_a_new_run_folder_beside_them(tmp_path, monkeypatch):
    from saving import run_dir as run_folders

    config = load_train_config(write(tmp_path), get_model_class)
    monkeypatch.setattr(run_folders.time, "strftime", lambda _: "20250101-120000")
    old = tmp_path / "runs" / "20250101-120000"
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "latest").write_text("step00000010")
    (old / "losses.json").write_text("[1.0, 0.5]")
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    first = run_folders.create_run_dir(config, Distributed.alone(), resume=None)
    second = run_folders.create_run_dir(config, Distributed.alone(), resume=None)  # the same second again
    assert (first.name, second.name) == ("20250101-120000-2", "20250101-120000-3")
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before  # never overwritten
    assert not (old / "config").exists()
    assert (first / "config" / "train.toml").read_text() == TRAIN


def test_run_folder_config_copies_never_hold_a_token(tmp_path, monkeypatch):
    from saving.run_dir import create_run_dir

    env_token = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7"
    pasted = "hf_" + "Z9y8X7w6V5u4T3s2R1q0P9o8N7m6L5k4J3"
    monkeypatch.setenv("HF_TOKEN", env_token)
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    train = edit(TRAIN, "max_steps = 10", f"max_steps = 10\n# my token, for later: {pasted}\n"
                                          f"# wandb: 0123456789abcdef0123456789abcdef01234567")
    dataset = DATASET + f"# downloaded with HF_TOKEN={env_token}\n# hf_token = \"secret value\"\n"
    config = load_train_config(write(tmp_path, train, dataset), get_model_class)
    printed = []
    run_dir = create_run_dir(config, Distributed.alone(), resume=None, log=printed.append)
    copy_train = (run_dir / "config" / "train.toml").read_text()
    copy_dataset = (run_dir / "config" / "dataset.toml").read_text()
    for text in (copy_train, copy_dataset):
        for secret in (env_token, pasted, "0123456789abcdef0123456789abcdef01234567", "secret value"):
            assert secret not in text
    # Only the secrets are gone: everything else is as written.
    assert copy_train == train.replace(pasted, "<redacted>").replace("0123456789abcdef0123456789abcdef01234567",
                                                                     "<redacted>")
    assert copy_dataset == DATASET + '# downloaded with HF_TOKEN=<redacted>\n# hf_token = "<redacted>"\n'
    assert printed == [f"warning: {tmp_path / name}: {n} token or key value(s) replaced by <redacted> in the run "
                       f"folder's copy; keep secrets out of config files (set HF_TOKEN in the environment, or run "
                       f"`hf auth login`)" for name, n in (("train.toml", 2), ("dataset.toml", 2))]


def test_sample_table_resolves_every_setting(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n\n  a dog on a hill  \n")
    train = TRAIN + '''
[sample]
prompts = ["a red fox", { prompt = "a ship", seed = 7, width = 512, guidance = 5.0 }]
prompts_file = "prompts.txt"
height = 768
every_n_steps = 100
'''
    config = load_train_config(write(tmp_path, train), get_model_class)
    requests = config.samples
    assert [r.prompt for r in requests] == ["a red fox", "a ship", "a cat", "a dog on a hill"]
    assert [r.index for r in requests] == [0, 1, 2, 3]
    # The prompt's own value, else [sample]'s, else FluxPipeline's default (seed: the top-level one).
    assert [(r.width, r.height, r.seed, r.guidance) for r in requests[:2]] == [(1024, 768, 42, 3.5),
                                                                              (512, 768, 7, 5.0)]
    assert {(r.steps, r.frames) for r in requests} == {(28, 1)}
    assert config.settings.sample.every_n_steps == 100


@pytest.mark.parametrize("sample, expected", [
    ('prompts = []', "'sample.prompts' lists no prompt"),
    ('prompts = ["a cat", "  "]', "'sample.prompts[1]' is an empty prompt"),
    ('prompts = ["a cat"]\nwidth = 1000', "'sample.width' = 1000 is not a multiple of 16"),
    ('prompts = ["a cat", { prompt = "x", height = 40 }]', "'sample.prompts[1].height' = 40 is not a multiple of 16"),
    ('prompts = ["a cat"]\nframes = 9', "'sample.frames' = 9: model type 'flux' makes images (1 frame)"),
    ('prompts = ["a cat"]\nsteps = 0', "'sample.steps' must be at least 1, got 0"),
    ('prompts_file = "missing.txt"', "'sample.prompts_file' is not a file"),
    ('prompts = ["a cat"]\nevery_n_step = 3', "unknown key 'sample.every_n_step' (did you mean 'every_n_steps'?)"),
])
def test_bad_sample_settings_are_one_line_errors_naming_the_key(tmp_path, sample, expected):
    message = error(tmp_path, TRAIN + f"\n[sample]\n{sample}\n")
    assert message.startswith(str(tmp_path / "train.toml")) and expected in message and "\n" not in message
