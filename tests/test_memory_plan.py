"""The memory plan (memory/plan.py): with a configured budget the tiny Flux gets the fastest
settings its estimate fits, a setting in the config file is kept, and a budget nothing fits is
one error line naming what would fit. The launch runs train.py with a plan that changes two
settings, and checks the start-up times it records (training/trainer.py)."""

from __future__ import annotations

import json

import pytest

from config.train_config import load_train_config
from conftest import launch, write_configs
from memory.plan import HEADROOM, Plan
from models import get_model_class
from parallel.stages import partition, plan_stages, resolve_partition_method
from memory import plan as memory_plan
from utils.dist import Distributed
from utils.errors import ConfigError

GIB = 2**30
# What train.py counts for the demo images at resolution 64: 18 latent tokens in the largest aspect
# bucket and max_sequence_length = 32 text tokens.
TOKENS = 50


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tools.make_demo_dataset import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("plan") / "data", count=2, seed=0)


def setup(tmp_path, tiny_models, data, **overrides):
    """(config, model, layers, parts, hidden) of a bfloat16 tiny Flux LoRA run."""
    overrides["model"] = {"dtype": "bfloat16", **overrides.get("model", {})}
    config = load_train_config(write_configs(tmp_path, tiny_models / "flux", data, **overrides), get_model_class)
    model = get_model_class("flux")(config.model)
    transformer, layers, parts = plan_stages(model, config)
    return config, model, layers, parts, model.hidden_size(transformer)


def budget_for(need: int) -> int:
    """The smallest budget (bytes) in which a peak of `need` fits."""
    return int(need / (1 - HEADROOM)) + 64


def choose(config, model, layers, parts, hidden, budget):
    method = resolve_partition_method(config.settings.partition_method, layers, config.full_finetune)
    split = lambda k: partition(layers, k, method)  # noqa: E731
    return memory_plan.choose(model, layers, parts, config, TOKENS, hidden, budget, split)[0]


def test_the_fastest_plan_that_fits_is_chosen(tmp_path, tiny_models, data):
    config, model, layers, parts, hidden = setup(tmp_path, tiny_models, data)
    assert not config.given & set(memory_plan.LEVERS)
    peak = {p: memory_plan.peak(model, layers, parts, config, p, TOKENS, hidden) for p in memory_plan.ordered(model, config)}
    # Fastest first: no checkpointing, "selective" (Flux's single blocks), all; then with float8.
    assert list(peak) == [Plan(False, False, 0), Plan("selective", False, 0), Plan(True, False, 0),
                          Plan(False, True, 0), Plan("selective", True, 0), Plan(True, True, 0)]
    assert peak[Plan(False, False, 0)] > peak[Plan("selective", False, 0)] > peak[Plan(True, False, 0)] \
        > peak[Plan(True, True, 0)]
    # Each budget picks the first plan in that order that fits it.
    for plan in [Plan(False, False, 0), Plan("selective", False, 0), Plan(True, False, 0), Plan(True, True, 0)]:
        assert choose(config, model, layers, parts, hidden, budget_for(peak[plan])) == plan
    # Less than that: the fewest swapped blocks that fit (two stay on the device, so three first save).
    swap3 = memory_plan.peak(model, layers, parts, config, Plan(True, True, 3), TOKENS, hidden)
    assert swap3 < peak[Plan(True, True, 0)]
    assert choose(config, model, layers, parts, hidden, budget_for(swap3)) == Plan(True, True, 3)
    # Full fine-tuning: neither float8 nor swapping is possible, so checkpointing is the last lever.
    full = setup(tmp_path / "full", tiny_models, data, adapter=None)
    assert memory_plan.ordered(full[1], full[0])[-1] == Plan(True, False, 0)


def test_a_setting_in_the_config_is_kept(tmp_path, tiny_models, data):
    free, model, layers, parts, hidden = setup(tmp_path / "free", tiny_models, data)
    peak = lambda plan: memory_plan.peak(model, layers, parts, free, plan, TOKENS, hidden)  # noqa: E731
    blocks = len(layers) - 2
    lean = peak(Plan(True, True, 0))
    # Set to its default value, activation_checkpointing = false still counts as chosen by the user:
    # the plan then swaps blocks rather than recompute.
    config, *_ = setup(tmp_path / "off", tiny_models, data, activation_checkpointing=False)
    assert "activation_checkpointing" in config.given
    plan = choose(config, model, layers, parts, hidden, budget_for(peak(Plan(False, True, blocks))))
    assert plan.checkpointing is False and plan.float8 and plan.blocks_to_swap > 0
    # transformer_dtype = model.dtype keeps float8 out of the plan.
    config, *_ = setup(tmp_path / "bf16", tiny_models, data, model={"transformer_dtype": "bfloat16"})
    plan = choose(config, model, layers, parts, hidden, budget_for(peak(Plan(True, False, blocks))))
    assert plan.checkpointing is True and not plan.float8 and plan.blocks_to_swap > 0
    # plan_memory applies the plan in place and says what it chose; with every lever set it chooses nothing.
    split = lambda k: partition(layers, k, "parameters")  # noqa: E731
    line = memory_plan.plan_memory(model, layers, parts, free, TOKENS, hidden, budget_for(lean), split)
    assert (free.settings.activation_checkpointing, free.model.transformer_dtype) == (True, "float8"), line
    assert line.startswith("memory plan for ") and 'activation_checkpointing = true, blocks_to_swap = 0, ' \
        'transformer_dtype = "float8"' in line and "faster plans need more" in line and "\n" not in line
    config, *_ = setup(tmp_path / "all", tiny_models, data, activation_checkpointing=False, blocks_to_swap=0,
                       model={"transformer_dtype": "bfloat16"})
    assert "nothing to choose" in memory_plan.plan_memory(model, layers, parts, config, TOKENS, hidden, 1, split)
    assert config.settings.activation_checkpointing is False


def test_a_budget_nothing_fits_is_one_line_naming_what_would(tmp_path, tiny_models, data):
    config, model, layers, parts, hidden = setup(tmp_path, tiny_models, data, pipeline_stages=1)
    swapped_all = memory_plan.peak(model, layers, parts, config, Plan(True, True, len(layers) - 2), TOKENS, hidden)
    with pytest.raises(ConfigError) as e:
        choose(config, model, layers, parts, hidden, budget_for(swapped_all) - 4096)
    message = str(e.value)
    assert message.startswith(f"{config.file}: memory plan: the fullest pipeline stage needs about ")
    assert "\n" not in message and "what would fit: " in message
    # Two stages halve the weights (micro_batch_size_per_gpu is 2 in these configs, 1 halves activations).
    assert "pipeline_stages = 2" in message or "micro_batch_size_per_gpu = 1" in message, message
    with pytest.raises(ConfigError, match="what would fit: a GPU with more memory"):
        choose(config, model, layers, parts, hidden, 1024)


def test_budget_key_and_transformer_dtype_values(tmp_path, tiny_models, data):
    config, *_ = setup(tmp_path / "ok", tiny_models, data, memory_budget_gib=0.5)
    assert memory_plan.device_budget(config, Distributed.alone()) == GIB // 2
    config, *_ = setup(tmp_path / "none", tiny_models, data)
    assert memory_plan.device_budget(config, Distributed.alone()) is None
    for value, message in [(0, "'memory_budget_gib' must be > 0"), (-1.5, "'memory_budget_gib' must be > 0")]:
        with pytest.raises(ConfigError, match=message):
            setup(tmp_path / "bad", tiny_models, data, memory_budget_gib=value)
    with pytest.raises(ConfigError, match=r"'model.transformer_dtype' = 'float32' must be 'float8' or model.dtype "
                                          r"\('bfloat16'\)"):
        setup(tmp_path / "dtype", tiny_models, data, model={"transformer_dtype": "float32"})


@pytest.mark.slow
def test_train_py_runs_the_plan_and_records_start_up(tmp_path, tiny_models, data):
    """One launch: a budget that fits checkpointing with float8 but nothing faster; the run trains
    with that plan and records the time to its first step."""
    config, model, layers, parts, hidden = setup(tmp_path / "probe", tiny_models, data, max_steps=3)
    lean, next_faster = (memory_plan.peak(model, layers, parts, config, plan, TOKENS, hidden)
                         for plan in (Plan(True, True, 0), Plan(True, False, 0)))
    path = write_configs(tmp_path / "run", tiny_models / "flux", data, model={"dtype": "bfloat16"}, max_steps=3,
                         memory_budget_gib=budget_for((lean + next_faster) // 2) / GIB)
    result = launch(path)
    assert result.returncode == 0, result.output[-5000:]
    plan_line = next(line for line in result.output.splitlines() if line.startswith("memory plan for "))
    assert 'activation_checkpointing = true, blocks_to_swap = 0, transformer_dtype = "float8"' in plan_line
    assert "x 50 tokens, activation_checkpointing = true):" in result.output  # the estimate follows the plan
    losses = result.losses()
    assert len(losses) == 3 and all(x == x for x in losses)
    start = json.loads((result.run_dirs()[-1] / "startup.json").read_text())
    assert 0 < start["seconds_to_first_step"] and 0 < start["first_step_seconds"]
    # The libraries' objects, and the first step's, are out of the garbage collector's full passes.
    assert start["frozen_objects"] > 100_000
    assert "from launch to the end of the first training step" in result.output
    assert "(median)" in result.output and "steady_step_seconds" in start
