"""`compile = true`: every pipeline layer's `run` goes through torch.compile.

Compiled layers must compute what the eager layers compute: the same loss and LoRA gradients
(float32 on CPU, to round-off), with activation checkpointing, block swapping and float8 base
weights, and through train.py in DeepSpeed's pipeline engine.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import launch, write_configs
from test_low_memory import data, example, loaded, loss_and_grads  # noqa: F401  (data is a fixture)
from memory.block_swap import BlockSwap, swapped_layer_indices
from config.train_config import load_train_config
from models import get_model_class
from parallel import engine
from utils.dist import Distributed


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Each test compiles a model of its own. Dynamo keeps earlier tests' code for the same
    # functions and, past its recompile limit (8 per function), runs the rest eagerly without a
    # word: the bfloat16 test then compared eager with eager. Forget earlier code, and fail at the limit.
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def lift_lora_b(transformer):
    # LoRA B starts at zero; lift it so gradients reach through every block.
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)


def assert_same_loss_and_grads(result, reference, atol):
    (loss, grads), (ref_loss, ref_grads) = result, reference
    assert len(grads) == len(ref_grads) > 0
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=atol)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, atol=atol, rtol=atol)


def compiled_matches_eager(model, layers, checkpointed, atol):
    inputs, labels = example(model)
    reference = loss_and_grads(model, layers, inputs, labels, checkpointed)
    for layer in layers:
        layer.compile_run()
    assert_same_loss_and_grads(loss_and_grads(model, layers, inputs, labels, checkpointed), reference, atol)


@pytest.mark.slow
def test_compiled_layers_give_the_eager_loss_and_gradients(tmp_path, tiny_models, data):
    # One model compiled once for all three float32 checks: plain, checkpointed, then with two
    # blocks swapped (compiling costs far more than the forward and backward passes).
    _, model, transformer, layers = loaded(tmp_path, tiny_models, data)
    lift_lora_b(transformer)
    inputs, labels = example(model)
    eager = {c: loss_and_grads(model, layers, inputs, labels, c) for c in (False, True)}
    for layer in layers:
        layer.compile_run()
    for checkpointed, reference in eager.items():
        assert_same_loss_and_grads(loss_and_grads(model, layers, inputs, labels, checkpointed), reference, 1e-5)

    # Block swapping around compiled layers: the eager reference is without swapping, which
    # test_low_memory shows computes what swapping does.
    chosen = [layers[i] for i in swapped_layer_indices(layers, 2)]
    owned = [[transformer.get_submodule(n) for n in layer.module_names] for layer in chosen]
    swap = BlockSwap(chosen, owned, [True] * 2, torch.device("cpu"))
    assert_same_loss_and_grads(loss_and_grads(model, layers, inputs, labels, True), eager[True], 1e-5)
    assert swap.loads > 0


def saved_activation_bytes(transformer, run) -> int:
    """Bytes of the tensors other than weights that autograd keeps for the backward during `run()`."""
    weights = {p.data_ptr() for p in transformer.parameters()}
    saved = {}

    def pack(t):
        if t.data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(saved.values())


@pytest.mark.slow
def test_checkpoint_inside_compiled_layers_keeps_only_their_inputs(tmp_path, tiny_models, data):
    # recomputes_inside_graph: the backward graph recomputes each layer, so the forward keeps far
    # less than the same compiled layers without checkpointing (attention and MLP activations),
    # and the loss and gradients are the eager checkpointed ones.
    _, model, transformer, layers = loaded(tmp_path, tiny_models, data)
    lift_lora_b(transformer)
    inputs, labels = example(model)
    reference = loss_and_grads(model, layers, inputs, labels, True)
    engine.compile_layers(layers)
    kept_plain = saved_activation_bytes(transformer, lambda: loss_and_grads(model, layers, inputs, labels, False))
    engine.compile_layers(layers, lambda layer: layer.kind == "block")
    result = []
    kept_inside = saved_activation_bytes(  # blocks recompute inside; input and output layers are left plain
        transformer, lambda: result.append(loss_and_grads(model, layers, inputs, labels, False)))
    assert_same_loss_and_grads(result[0], reference, 1e-5)
    assert 0 < kept_inside < kept_plain / 3, (kept_inside, kept_plain)


@pytest.mark.slow
def test_compiled_layers_with_float8_base_weights(tmp_path, tiny_models, data):
    _, model, transformer, layers = loaded(tmp_path, tiny_models, data, model={"transformer_dtype": "float8"})
    lift_lora_b(transformer)
    compiled_matches_eager(model, layers, checkpointed=True, atol=1e-5)


@pytest.mark.slow
def test_compiled_layers_with_float8_products(tmp_path, tiny_models, data):
    # float8_matmul computes in bfloat16: compiled and eager differ by bfloat16 round-off only.
    _, model, transformer, layers = loaded(tmp_path, tiny_models, data, model={
        "dtype": "bfloat16", "transformer_dtype": "float8", "float8_matmul": True})
    lift_lora_b(transformer)
    compiled_matches_eager(model, layers, checkpointed=True, atol=3e-2)


@pytest.mark.slow
def test_train_py_with_compile_matches_eager_on_two_stages(tmp_path, tiny_models, data):
    from safetensors.torch import load_file

    common = dict(max_steps=4, optimizer={"lr": 3e-3}, activation_checkpointing=True, eval_at_start=False)
    eager = launch(write_configs(tmp_path / "eager", tiny_models / "flux", data, **common))
    # A cache folder of its own: this run compiles everything, the next one below loads it all.
    cache = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    compiled_config = write_configs(tmp_path / "compiled", tiny_models / "flux", data, compile=True,
                                    pipeline_stages=2, **common)
    compiled = launch(compiled_config, num_gpus=2, env=cache)
    for result in (eager, compiled):
        assert result.returncode == 0, result.output[-5000:]
    # The start-up report: the first step's extra time, and what compiling did (rank 0's stage).
    first = json.loads((compiled.run_dirs()[-1] / "startup.json").read_text())
    assert first["compile"] and first["compiled_graphs"] > 0 and first["fx_graph_cache_misses"] > 0
    assert first["compile_cache_dir"] == cache["TORCHINDUCTOR_CACHE_DIR"]
    assert first["first_step_extra_seconds"] > 0
    assert "compiled_graphs" not in json.loads((eager.run_dirs()[-1] / "startup.json").read_text())
    again = launch(compiled_config, num_gpus=2, env=cache)
    assert again.returncode == 0, again.output[-5000:]
    second = json.loads((again.run_dirs()[-1] / "startup.json").read_text())
    # Every graph the first run looked up (compiled, or found again in its own new cache) now loads.
    assert second["fx_graph_cache_misses"] == 0
    assert second["fx_graph_cache_hits"] == first["fx_graph_cache_misses"] + first["fx_graph_cache_hits"]
    assert again.losses() == compiled.losses()
    assert len(compiled.losses()) == 4
    torch.testing.assert_close(compiled.losses(), eager.losses(), rtol=1e-5, atol=1e-6)
    a, b = (load_file(r.run_dirs()[-1] / "adapters" / "final" / "pytorch_lora_weights.safetensors")
            for r in (compiled, eager))
    assert a.keys() == b.keys()
    for key in a:  # Adam normalises the step, so round-off in a gradient moves a weight by up to ~lr * 1e-3
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=2e-5)


def test_compile_cache_is_kept_in_the_users_cache_folder(tmp_path):
    # train.py points Inductor's caches at ~/.cache (or $XDG_CACHE_HOME), which outlive /tmp;
    # a folder the user chose stays.
    import os
    import subprocess
    import sys

    from conftest import REPO

    def cache_dir(**env):
        base = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME")}
        code = "import os, train; print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**base, "HOME": str(tmp_path), **env},
                              capture_output=True, text=True, check=True).stdout.strip()

    assert cache_dir() == str(tmp_path / ".cache" / "torchinductor")
    assert cache_dir(XDG_CACHE_HOME=str(tmp_path / "xdg")) == str(tmp_path / "xdg" / "torchinductor")
    assert cache_dir(TORCHINDUCTOR_CACHE_DIR="/somewhere") == "/somewhere"


def test_compile_default_is_off_on_cpu_and_a_failed_probe_turns_it_off(tmp_path, tiny_models, data, monkeypatch):
    """Not set: off on CPU without a probe; on a CUDA device the probe decides, with one line."""
    config = load_train_config(write_configs(tmp_path, tiny_models / "flux", data), get_model_class)
    assert config.settings.compile is None
    cpu = Distributed.alone("cpu")
    lines = []
    assert engine.resolve_compile(config, cpu, torch.float32, lines.append).settings.compile is False
    assert lines == []
    # A real compile on this CPU passes the probe's check against eager.
    assert engine.compile_probe(torch.device("cpu"), torch.float32) is None
    # As on a GPU where the compiler stack fails: off, and said once.
    gpu = Distributed.alone("cuda")  # only its device type is read
    monkeypatch.setattr(engine, "compile_probe", lambda device, dtype: "Triton has no support for this GPU")
    assert engine.resolve_compile(config, gpu, torch.bfloat16, lines.append).settings.compile is False
    assert len(lines) == 1 and "Triton has no support" in lines[0] and "compile = false" in lines[0]
    monkeypatch.setattr(engine, "compile_probe", lambda device, dtype: None)
    assert engine.resolve_compile(config, gpu, torch.bfloat16, lines.append).settings.compile is True
    # Set by the user: kept, no probe.
    explicit = load_train_config(write_configs(tmp_path / "off", tiny_models / "flux", data, compile=False), get_model_class)
    assert engine.resolve_compile(explicit, gpu, torch.bfloat16, lines.append).settings.compile is False
    assert len(lines) == 2


@pytest.mark.slow
def test_blocks_of_a_kind_share_their_compiled_graphs(tmp_path, tiny_models, data):
    """7 blocks compile 2 graphs per block kind, not one per block; a second bucket and
    evaluation without gradients recompile within the limit compile_layers sets, instead of
    running the rest eagerly (the fixture fails at the limit)."""
    from diffusers import FluxTransformer2DModel
    from torch._dynamo.utils import counters

    from make_tiny_models import FLUX_TRANSFORMER
    from training import objective

    root = tmp_path / "models"
    (root / "flux").mkdir(parents=True)
    for part in (tiny_models / "flux").iterdir():
        if part.name != "transformer":
            (root / "flux" / part.name).symlink_to(part)
    FluxTransformer2DModel(**{**FLUX_TRANSFORMER, "num_layers": 3, "num_single_layers": 4}).save_pretrained(
        root / "flux" / "transformer")
    _, model, _, layers = loaded(tmp_path / "run", root, data)
    assert [type(layer).__name__ for layer in layers].count("FluxSingleBlockLayer") == 4
    engine.compile_layers(layers)
    counters.clear()
    inputs, labels = example(model)
    loss_and_grads(model, layers, inputs, labels, False)
    # Input and final layer; per block kind, its first block (an input without gradient, or a
    # contiguous one) and the others.
    assert counters["stats"]["unique_graphs"] == 6

    g = torch.Generator().manual_seed(2)
    text = {"text": torch.randn(2, 8, 32, generator=g), "pooled": torch.randn(2, 32, generator=g)}
    wide = objective.training_example(model, torch.randn(2, 16, 4, 6, generator=g), text,
                                      [torch.Generator().manual_seed(i) for i in range(2)])
    loss_and_grads(model, layers, *wide, False)
    with torch.no_grad():
        x = inputs
        for layer in layers:
            x = layer(x)
    assert counters["stats"]["unique_graphs"] > 6  # compiled, not eager
