"""`attention_backend`: the transformer's attention runs through the diffusers backend the config
names (on GPUs, "_native_cudnn" is the fast one: docs/benchmarks.md); a name diffusers does not
know is a config error."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName

from conftest import write_configs
from test_low_memory import data, loaded  # noqa: F401  (data is a fixture)
from config.train_config import load_train_config
from models import get_model_class
from training import objective
from utils.errors import ConfigError


def backends(transformer) -> set:
    return {m.processor._attention_backend for m in transformer.modules()
            if hasattr(getattr(m, "processor", None), "_attention_backend")}


def loss(model, layers) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 4, 4, generator=g)
    text = {"text": torch.randn(2, 8, 32, generator=g), "pooled": torch.randn(2, 32, generator=g)}
    inputs, labels = objective.training_example(model, latents, text, [torch.Generator().manual_seed(i) for i in range(2)])
    with torch.no_grad():
        return objective.loss(model, torch.nn.Sequential(*layers)(inputs), labels)


def test_named_backend_runs_every_attention_and_computes_the_same(tmp_path, tiny_models, data):
    _, model, transformer, layers = loaded(tmp_path / "default", tiny_models, data)
    assert backends(transformer) == {None}  # diffusers' default: torch's scaled-dot-product attention
    reference = loss(model, layers)
    _, model, transformer, layers = loaded(tmp_path / "math", tiny_models, data, attention_backend="_native_math")
    try:
        assert backends(transformer) == {AttentionBackendName._NATIVE_MATH}
        torch.testing.assert_close(loss(model, layers), reference, rtol=1e-5, atol=1e-6)
    finally:
        transformer.set_attention_backend("native")  # diffusers keeps the last choice process-wide


def test_unknown_backend_is_a_config_error(tmp_path, tiny_models, data):
    with pytest.raises(ConfigError, match=r"train.toml: 'attention_backend' = 'cudnn' is not a diffusers attention "
                                          r"backend; one of: .*_native_cudnn"):
        load_train_config(write_configs(tmp_path, tiny_models / "flux", data, attention_backend="cudnn"),
                          get_model_class)


def test_backend_that_cannot_run_here_is_a_config_error(tmp_path, tiny_models, data):
    # cuDNN attention has no CPU kernel: one line naming the key when the stage loads.
    with pytest.raises(ConfigError, match=r"train.toml: 'attention_backend' = '_native_cudnn' cannot run on this cpu "
                                          r"device with float32: No viable backend"):
        loaded(tmp_path / "cudnn", tiny_models, data, attention_backend="_native_cudnn")
    # ... and leaves diffusers' process-wide choice as it was: a default model still runs on the CPU.
    _, model, _, layers = loaded(tmp_path / "default", tiny_models, data)
    assert torch.isfinite(loss(model, layers))


def test_default_backend_is_cudnn_where_its_probe_passes(tmp_path, tiny_models, data, monkeypatch):
    """Not set: unchanged on CPU, no probe; on a CUDA device cuDNN's backend when its probe passes,
    else torch's default with one line; a set value is kept without a probe."""
    from parallel import stages
    from utils.dist import Distributed

    config = load_train_config(write_configs(tmp_path, tiny_models / "flux", data), get_model_class)
    assert config.settings.attention_backend is None
    lines = []
    probed = []

    def probe(result):
        def run(name, device, dtype):
            probed.append(name)
            return result
        return run

    monkeypatch.setattr(stages, "attention_probe", probe(None))
    cpu, gpu = Distributed.alone("cpu"), Distributed.alone("cuda")  # only the device type is read
    assert stages.resolve_attention_backend(config, cpu, torch.float32, lines.append) is config
    assert probed == [] and lines == []
    chosen = stages.resolve_attention_backend(config, gpu, torch.bfloat16, lines.append)
    assert chosen.settings.attention_backend == "_native_cudnn" and probed == ["_native_cudnn"]
    assert len(lines) == 1 and 'attention_backend = "native"' in lines[0]
    monkeypatch.setattr(stages, "attention_probe", probe("CUDNN_STATUS_NOT_SUPPORTED"))
    kept = stages.resolve_attention_backend(config, gpu, torch.bfloat16, lines.append)
    assert kept.settings.attention_backend is None
    assert len(lines) == 2 and "CUDNN_STATUS_NOT_SUPPORTED" in lines[1]
    explicit = load_train_config(write_configs(tmp_path / "native", tiny_models / "flux", data,
                                               attention_backend="native"), get_model_class)
    probed.clear()
    assert stages.resolve_attention_backend(explicit, gpu, torch.bfloat16, lines.append) is explicit
    assert probed == [] and len(lines) == 2


def test_attention_probe_checks_against_the_math_kernel(monkeypatch):
    from parallel import stages

    cpu = torch.device("cpu")
    assert stages.attention_probe("_native_math", cpu, torch.float32) is None
    assert stages.attention_probe("native", cpu, torch.bfloat16) is None  # to bfloat16's round-off
    assert "No viable backend" in stages.attention_probe("_native_cudnn", cpu, torch.float32)  # no CPU kernel

    # A kernel that runs but computes something else: its numbers fail the check, not a crash.
    real = stages.dispatch_attention_fn

    def off_by_a_little(q, k, v, attn_mask=None, backend=None):
        out = real(q, k, v, attn_mask=attn_mask, backend=AttentionBackendName._NATIVE_MATH)
        return out * 1.01 if backend != AttentionBackendName._NATIVE_MATH else out

    monkeypatch.setattr(stages, "dispatch_attention_fn", off_by_a_little)
    assert "output differs from the math kernel's" in stages.attention_probe("native", cpu, torch.float32)
