"""Fuzzing the config loader: random TOML documents, and mutations of valid training and dataset
configs (keys deleted, renamed or added, values of every TOML type, text cut and spliced), must
only ever load or raise a ConfigError naming a file, never any other exception."""

from __future__ import annotations

import datetime
import json
import math
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.train_config import TrainConfig, load_train_config
from conftest import REPO
from models import get_model_class
from utils.errors import ConfigError

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Valid key names, so mutations reach the checks behind the unknown-key check.
KEYS = sorted({"output_dir", "dataset", "model", "adapter", "optimizer", "eval_datasets", "epochs", "max_steps",
               "micro_batch_size_per_gpu", "pipeline_stages", "partition_method", "gradient_accumulation_steps",
               "gradient_clipping", "warmup_steps", "lr_scheduler", "save_every_n_steps", "checkpoint_every_n_minutes",
               "checkpoints_to_keep", "eval_every_n_steps", "eval_at_start", "activation_checkpointing", "seed",
               "caching_batch_size", "save_dtype", "type", "diffusers_path", "transformer_path", "vae_path", "llm_path",
               "clip_path", "t5_path", "dtype", "shift",
               "sigmoid_scale", "resolution_dependent_shift", "guidance", "max_sequence_length", "rank", "alpha",
               "dropout", "target_modules", "init_from_existing", "lr", "betas", "eps", "weight_decay", "name",
               "config", "resolutions", "enable_ar_bucket", "min_ar", "max_ar", "num_ar_buckets", "num_repeats",
               "frame_buckets", "video_clip_mode", "missing_caption", "strict", "directory", "path"})

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
scalars = st.one_of(
    st.booleans(), st.integers(min_value=-2**63, max_value=2**63 - 1), st.integers(-3, 3000),
    st.floats(allow_nan=True, allow_infinity=True), text, st.dates(),
    st.sampled_from(["flux", "lora", "adamw", "data", "model", "dataset.toml", "bfloat16", "type:Flux", "[",
                     "uniform", "skip", "~", "/", "\x00", "..", "type:(", "cosine"]))
# Values at the edges of what the keys take.
edge_values = st.sampled_from([0, -1, 1, 2, 3, 15, 17, 2**63 - 1, -2**63, 0.0, -0.0, 1e-300, 1e308, float("nan"),
                               float("inf"), "", [], {}, [0], [[0, 0]], [[64, 64, 64]], [1, 1], [-1]])
# Path values that are no usable path, or not what the key wants.
PATH_KEYS = {"output_dir", "dataset", "diffusers_path", "transformer_path", "vae_path", "llm_path", "clip_path",
             "t5_path", "init_from_existing", "config", "path"}
path_values = st.sampled_from(["\x00", "a\x00b", "~no_such_user_here/x", "x" * 300, "/".join(["x" * 200] * 30), "loop",
                               "loop/inside", "afile", "afile/below", "data", "model", "dataset.toml", "train.toml",
                               ".", "", "/", "/dev/null", "runs"]) | text
values = st.recursive(scalars | edge_values, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS) | text, inner, max_size=4)), max_leaves=12)
keys = st.sampled_from(KEYS) | text


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def toml_value(value) -> str:
    """Any value as inline TOML (tables inline too, so any nesting is one line)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def to_toml(table: dict) -> str:
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in table.items())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The folders the valid configs name: a model folder and a data folder (empty: only their
    paths are checked when loading); and a symlink loop and a file for paths to point at."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "model").mkdir()
    (root / "data").mkdir()
    (root / "loop").symlink_to(root / "loop")
    (root / "afile").write_text("not a folder, not TOML: [")
    return root


VALID_TRAIN = {"output_dir": "runs", "dataset": "dataset.toml", "max_steps": 10, "micro_batch_size_per_gpu": 1,
               "eval_datasets": [{"name": "held", "config": "dataset.toml"}],
               "model": {"type": "flux", "diffusers_path": "model", "dtype": "bfloat16", "guidance": 1.0},
               "adapter": {"type": "lora", "rank": 8, "alpha": 8.0, "target_modules": ["to_q", "to_k"]},
               "optimizer": {"type": "adamw", "lr": 1e-4, "betas": [0.9, 0.99]}}
VALID_DATASET = {"resolutions": [64, [64, 32]], "num_ar_buckets": 3, "min_ar": 0.5, "missing_caption": "skip",
                 "directory": [{"path": "data", "num_repeats": 2}]}


def load(folder: Path, train: str, dataset: str):
    """Write the two files and load them: a TrainConfig, or the ConfigError's message."""
    (folder / "train.toml").write_text(train, encoding="utf-8", errors="surrogatepass")
    (folder / "dataset.toml").write_text(dataset, encoding="utf-8", errors="surrogatepass")
    try:
        return load_train_config(folder / "train.toml", get_model_class)
    except ConfigError as e:
        message = str(e)
        # Every message names the file it is about (the training or a dataset TOML).
        assert message.startswith("/") and ": " in message, message
        return message


def test_the_unmutated_configs_load(folder):
    assert isinstance(load(folder, to_toml(VALID_TRAIN), to_toml(VALID_DATASET)), TrainConfig)


@FUZZ
@given(train=st.dictionaries(keys, values, max_size=8), dataset=st.dictionaries(keys, values, max_size=6))
def test_random_documents(folder, train, dataset):
    load(folder, to_toml(train), to_toml(dataset))


def _mutate(data, table: dict, depth: int = 0) -> dict:
    table = dict(table)
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["delete", "replace", "add", "rename", "nested", "path", "edge"]))
        key = data.draw(st.sampled_from(sorted(table))) if table else None
        paths = sorted(PATH_KEYS & set(table))
        if action == "path" and paths:
            table[data.draw(st.sampled_from(paths))] = data.draw(path_values)
        elif action == "edge" and key is not None:
            table[key] = data.draw(edge_values)
        elif action == "delete" and key is not None:
            del table[key]
        elif action == "replace" and key is not None:
            table[key] = data.draw(values)
        elif action == "add":
            table[data.draw(keys)] = data.draw(values)
        elif action == "rename" and key is not None:
            new = data.draw(st.sampled_from([key + "s", key[:-1], key.upper(), key.replace("_", "-")]))
            table[new] = table.pop(key)
        elif action == "nested" and key is not None and depth < 2:
            inner = table[key]
            if isinstance(inner, dict):
                table[key] = _mutate(data, inner, depth + 1)
            elif isinstance(inner, list) and inner and all(isinstance(x, dict) for x in inner):
                table[key] = [_mutate(data, x, depth + 1) for x in inner]
    return table


@FUZZ
@given(data=st.data())
def test_mutated_valid_configs(folder, data):
    train = _mutate(data, VALID_TRAIN) if data.draw(st.booleans()) else VALID_TRAIN
    dataset = _mutate(data, VALID_DATASET) if data.draw(st.booleans()) else VALID_DATASET
    load(folder, to_toml(train), to_toml(dataset))


def _example_texts() -> list[str]:
    """examples/flux.toml and examples/dataset.toml with their placeholder paths pointed at the
    fuzz folder's, as text (their comments and layout included)."""
    flux = (REPO / "examples" / "flux.toml").read_text(encoding="utf-8")
    dataset = (REPO / "examples" / "dataset.toml").read_text(encoding="utf-8")
    flux = re.sub(r'^output_dir = ".*"$', 'output_dir = "runs"', flux, flags=re.MULTILINE)
    flux = re.sub(r'^diffusers_path = ".*"$', 'diffusers_path = "model"', flux, flags=re.MULTILINE)
    dataset = re.sub(r'^path = ".*"$', 'path = "data"', dataset, flags=re.MULTILINE)
    return [flux, dataset]


def test_the_examples_load_with_real_paths(folder):
    flux, dataset = _example_texts()
    tomllib.loads(flux)
    assert isinstance(load(folder, flux, dataset), TrainConfig)


@FUZZ
@given(data=st.data())
def test_mutated_example_text(folder, data):
    texts = _example_texts()
    which = data.draw(st.integers(0, 1))
    target = texts[which]
    for _ in range(data.draw(st.integers(1, 3))):
        lines = target.splitlines(keepends=True)
        if not lines:
            break
        i = data.draw(st.integers(0, len(lines) - 1))
        edit = data.draw(st.sampled_from(["drop", "duplicate", "uncomment", "splice", "truncate"]))
        if edit == "drop":
            del lines[i]
        elif edit == "duplicate":
            lines.insert(i, lines[i])
        elif edit == "uncomment":
            lines[i] = lines[i].lstrip("# ")
        elif edit == "splice":
            at = data.draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + data.draw(st.text(max_size=8)) + lines[i][at:]
        else:
            lines = lines[:i]
        target = "".join(lines)
    texts[which] = target
    load(folder, *texts)
