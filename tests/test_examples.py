"""The example configs: every config key is documented in them, and they load.

A key added to a config dataclass without a line in the examples (`key = ...` or `# key = ...`,
in the table it belongs to) fails here.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tomllib
import typing
from pathlib import Path

import pytest

from conftest import REPO, to_toml
from make_demo_dataset import make_demo_dataset
from config.data import DataSettings
from config.dataset_config import BucketSettings, DatasetConfig, DirectoryConfig
from config.evaluation import EvalDatasetConfig, EvalSettings
from config.memory import MemorySettings
from config.parallel import ParallelSettings
from config.saving import SavingSettings
from config.sampling import SampleConfig, SamplePrompt
from config.schema import toml_key
from config.train_config import ModelConfig, TrainConfigFile, load_train_config
from config.training import AdapterConfig, EmaConfig, MonitoringConfig, OptimizerConfig
from config.training import TrainingSettings
from models import MODEL_CLASSES, get_model_class

EXAMPLES = REPO / "examples"
FLUX = EXAMPLES / "flux.toml"
DATASET = EXAMPLES / "dataset.toml"

# Where each config table is documented: (file, table; "" is the top level).
DOCUMENTED_IN = {
    TrainConfigFile: (FLUX, ""),
    DataSettings: (FLUX, ""),
    TrainingSettings: (FLUX, ""),
    ParallelSettings: (FLUX, ""),
    MemorySettings: (FLUX, ""),
    SavingSettings: (FLUX, ""),
    EvalSettings: (FLUX, ""),
    ModelConfig: (FLUX, "model"),
    AdapterConfig: (FLUX, "adapter"),
    OptimizerConfig: (FLUX, "optimizer"),
    EmaConfig: (FLUX, "ema"),
    EvalDatasetConfig: (FLUX, "eval_datasets"),
    SampleConfig: (FLUX, "sample"),
    SamplePrompt: (FLUX, "sample.prompts"),
    MonitoringConfig: (FLUX, "monitoring"),
    DatasetConfig: (DATASET, ""),
    BucketSettings: (DATASET, ""),
    DirectoryConfig: (DATASET, "directory"),
}

# A table header, also commented out: "[model]", "# [[eval_datasets]]".
_HEADER = re.compile(r"^\s*#?\s*\[\[?\s*([A-Za-z0-9_.]+)\s*\]\]?\s*(#.*)?$")


def toml_sections(path: Path) -> dict[str, str]:
    """The text of each table of a TOML file by name ('' for the top level), commented-out
    table headers included."""
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _HEADER.match(line)
        if match:
            current = match.group(1)
            sections.setdefault(current, [])
        else:
            sections[current].append(line)
    return {name: "\n".join(lines) for name, lines in sections.items()}


def is_documented(key: str, path: Path, table: str) -> bool:
    """`key = ...` or `# key = ...` in `table` of `path`, or a table of that name (for keys
    that are tables themselves, like [model] or [[directory]])."""
    sections = toml_sections(path)
    if re.search(rf"^\s*#?\s*{re.escape(key)}\s*=", sections.get(table, ""), re.MULTILINE):
        return True
    return table == "" and key in sections


def own_fields(cls) -> list[str]:
    """The TOML keys of the fields `cls` adds to its dataclass bases (inherited ones are checked with the base)."""
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)
                 for f in dataclasses.fields(base)}
    return [toml_key(f) for f in dataclasses.fields(cls) if f.init and f.name not in inherited]


def _dataclasses_in(tp) -> set[type]:
    if dataclasses.is_dataclass(tp):
        return {tp}
    return {dc for arg in typing.get_args(tp) for dc in _dataclasses_in(arg)}


def config_tables(roots) -> set[type]:
    """Every dataclass reachable from `roots` through field types (tables of the TOML files)."""
    found, todo = set(), list(roots)
    while todo:
        cls = todo.pop()
        if cls in found:
            continue
        found.add(cls)
        for base in cls.__mro__[1:]:
            if dataclasses.is_dataclass(base):
                todo.append(base)
        for tp in typing.get_type_hints(cls).values():
            todo.extend(_dataclasses_in(tp))
    return found


def test_every_config_table_has_a_place_in_the_examples():
    # A new nested table must be added to DOCUMENTED_IN, so its keys get checked too.
    missing = config_tables([TrainConfigFile, DatasetConfig]) - set(DOCUMENTED_IN)
    assert not missing, f"add these config tables to DOCUMENTED_IN: {sorted(c.__name__ for c in missing)}"


@pytest.mark.parametrize("cls", list(DOCUMENTED_IN), ids=lambda c: c.__name__)
def test_every_key_is_documented(cls):
    path, table = DOCUMENTED_IN[cls]
    undocumented = [k for k in own_fields(cls) if not is_documented(k, path, table)]
    where = f"[{table}] of {path.name}" if table else f"the top level of {path.name}"
    assert not undocumented, f"{cls.__name__} keys not explained in {where}: {undocumented}"


@pytest.mark.parametrize("model_type", sorted(MODEL_CLASSES))
def test_every_model_key_is_documented(model_type):
    # Each model type has its own example, examples/<type with _ for ->.toml, whose [model] table explains the
    # keys its config class adds to ModelConfig (FluxConfig: guidance, max_sequence_length).
    config_class = get_model_class(model_type).config_class
    path = EXAMPLES / f"{model_type.replace('-', '_')}.toml"
    keys = [f.name for f in dataclasses.fields(config_class) if f.init]
    assert path.is_file(), (f"model type '{model_type}' has no example config: add {path.relative_to(REPO)}, "
                            f"with a [model] table explaining {keys}")
    undocumented = [k for k in keys if not is_documented(k, path, "model")]
    assert not undocumented, f"{config_class.__name__} keys not explained in [model] of {path.name}: {undocumented}"


def _as_written(value):
    # Loaded values as TOML writes them (tuples are lists there).
    return list(value) if isinstance(value, tuple) else value


def test_flux_example_loads(tmp_path, tiny_models, image_dataset):
    """examples/flux.toml and examples/dataset.toml, with the tiny model and a generated dataset in
    place of their placeholder paths, pass every check and keep the values they set."""
    text = FLUX.read_text(encoding="utf-8")
    # The optional parts shown commented out work when uncommented: the eval dataset tables
    # and the single files of the transformer, VAE and text encoders.
    text, found = re.subn(r"^# (\[\[eval_datasets\]\]\n)# (name = .*\n)# (config = .*\n)", r"\1\2\3", text,
                          flags=re.MULTILINE)
    assert found == 1, "expected the commented-out [[eval_datasets]] example in flux.toml"
    single_files = {"transformer_path": "flux1-tiny-original.safetensors", "vae_path": "ae_tiny.safetensors",
                    "clip_path": "clip_l_tiny.safetensors", "t5_path": "t5xxl_tiny.safetensors"}
    for key in single_files:
        text, found = re.subn(rf"^# ({key} = .*)$", r"\1", text, flags=re.MULTILINE)
        assert found == 1, f"expected the commented-out {key} example in flux.toml"
    config = tomllib.loads(text)
    dataset = tomllib.loads(DATASET.read_text(encoding="utf-8"))
    assert config["dataset"] == DATASET.name  # the example pair belongs together

    for directory in dataset["directory"]:
        directory["path"] = str(image_dataset)
    dataset_file = tmp_path / "dataset.toml"
    dataset_file.write_text(to_toml(dataset))

    config["output_dir"] = str(tmp_path / "runs")
    config["dataset"] = str(dataset_file)
    for eval_dataset in config.get("eval_datasets", []):
        eval_dataset["config"] = str(dataset_file)
    model = config["model"]
    model["diffusers_path"] = str(tiny_models / "flux")
    for key, file in single_files.items():
        model[key] = str(tiny_models / "flux" / file)
    assert "init_from_existing" not in config.get("adapter", {}), "the example should not need an existing LoRA"
    train_file = tmp_path / "train.toml"
    train_file.write_text(to_toml(config))

    loaded = load_train_config(train_file, get_model_class)

    s = loaded.settings
    for key, value in config.items():
        if not isinstance(value, (dict, list)) and key not in ("output_dir", "dataset"):
            assert getattr(s, key) == value, key
    for key, value in model.items():
        if not key.endswith("_path"):
            assert _as_written(getattr(loaded.model, key)) == value, f"model.{key}"
    for table in ("adapter", "optimizer"):
        for key, value in config.get(table, {}).items():
            assert _as_written(getattr(getattr(s, table), key)) == value, f"{table}.{key}"
    assert loaded.model.diffusers_path == str((tiny_models / "flux").resolve())
    for key in single_files:
        assert getattr(loaded.model, key) == model[key]
    assert [e.name for e in loaded.eval_datasets] == [e["name"] for e in config["eval_datasets"]]
    assert loaded.settings.output_dir == (tmp_path / "runs").resolve()

    assert len(loaded.dataset.directories) == len(dataset["directory"])
    for directory, table in zip(loaded.dataset.directories, dataset["directory"]):
        assert directory.path == image_dataset.resolve()
        for key, value in {**dataset, **table}.items():
            if key not in ("directory", "path"):
                assert _as_written(getattr(directory.settings, key)) == value, key


def test_demo_example_loads(tmp_path, tiny_models):
    """examples/demo.toml as the README's demo block runs it: the inputs made under demo_work/ beside
    examples/, reached through the demo's own relative paths."""
    examples = tmp_path / "examples"
    examples.mkdir()
    for name in ("demo.toml", "demo_dataset.toml"):
        shutil.copy(EXAMPLES / name, examples / name)
    demo_work = tmp_path / "demo_work"
    # What `python tools/make_tiny_models.py demo_work/models` and
    # `python tools/make_demo_dataset.py demo_work/data` write.
    shutil.copytree(tiny_models / "flux", demo_work / "models" / "flux")
    make_demo_dataset(demo_work / "data")

    loaded = load_train_config(examples / "demo.toml", get_model_class)

    assert loaded.model.type == "flux"
    assert loaded.model.diffusers_path == str((demo_work / "models" / "flux").resolve())
    assert loaded.settings.output_dir == (demo_work / "runs").resolve()
    assert [d.path for d in loaded.dataset.directories] == [(demo_work / "data").resolve()]
    assert [e.name for e in loaded.eval_datasets] == ["demo"]
    assert loaded.settings.adapter is not None  # training needs an adapter


def test_readme_and_ci_agree():
    """The README's test block runs the command .ci/run runs, and both install torch first."""
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.DOTALL)
    assert len(blocks) >= 2
    demo_block, test_block = blocks[0], blocks[1]
    test_command = re.search(r"^\s*(python3 -m pytest[^\n<]*?)\s*(<.*)?$", ci, re.MULTILINE).group(1)
    assert test_command in test_block
    assert "deepspeed --num_gpus=1 train.py --deepspeed --config examples/demo.toml" in demo_block
    for text in (demo_block, test_block, ci):
        torch_at = text.index("pip install torch==2.13.0")
        assert torch_at < text.index("-r requirements.txt")
    requirements = (REPO / "requirements.txt").read_text(encoding="utf-8")
    pins = [line.split("#")[0].strip() for line in requirements.splitlines()]
    pins = [p for p in pins if p]
    assert "torch==2.13.0" in pins
    assert all("==" in p for p in pins), [p for p in pins if "==" not in p]
