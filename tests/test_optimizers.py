"""Optimizers: stochastic rounding into bfloat16 (unbiased, reproducible, checkpointable) and the
config checks of the optimizer options."""

from __future__ import annotations

import pytest
import torch

from config.train_config import load_train_config
from config.training import OptimizerConfig, adamw8bit_missing
from conftest import write_configs
from models import get_model_class
from training.optimizers import build_optimizer, stochastic_round_to_bf16
from utils.errors import ConfigError


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 values on either side of each float32 value, by truncating its bit pattern
    (towards zero) and by stepping one bfloat16 ulp away from zero."""
    down = (x.view(torch.int32) & -65536).view(torch.float32)
    up = ((x.view(torch.int32) & -65536) + 65536).view(torch.float32)
    return down, up


def test_stochastic_rounding_is_unbiased():
    # Values of both signs and many magnitudes, each between two bfloat16 neighbours at a
    # different fraction (1/3, 1/2, 0.01, 0.99, ...) of the gap.
    torch.manual_seed(0)
    base = torch.tensor([1.0, -1.0, 3.140625, -0.0078125, 1e-3, -2e5, 7.5e-20, 1.0], dtype=torch.float32)
    fraction = torch.tensor([1 / 3, 0.5, 0.01, 0.99, 0.25, 0.7, 0.5, 1 / 4096])
    down, up = bf16_neighbours(base)
    x = down + (up - down) * fraction
    draws = 40_000
    rounded = stochastic_round_to_bf16(x.expand(draws, -1).contiguous(), torch.Generator().manual_seed(1))
    assert rounded.dtype == torch.bfloat16
    values = rounded.float()
    # Every draw is one of the two neighbours ...
    assert ((values == down) | (values == up)).all()
    # ... taken with the probability that makes the mean the float32 value: within 5 standard
    # errors of a Bernoulli(fraction) mean.
    gap = (up - down).abs()
    stderr = gap * (fraction * (1 - fraction) / draws).sqrt()
    error = (values.double().mean(0) - x.double()).abs()
    assert (error <= 5 * stderr.double() + 1e-12 * x.abs().double()).all(), (error / stderr)
    # Plain rounding is biased for the same values (here: all but the exact halves are off).
    plain = x.to(torch.bfloat16).float()
    assert ((plain.double() - x.double()).abs() > 10 * stderr.double()).sum() >= 5


def test_stochastic_rounding_keeps_exact_and_special_values():
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, float("inf"), float("-inf"), 1e-40])
    exact = exact.to(torch.bfloat16).float()  # representable in bfloat16 (1e-40: a subnormal)
    for seed in range(20):
        out = stochastic_round_to_bf16(exact, torch.Generator().manual_seed(seed)).float()
        assert torch.equal(out, exact)
        assert torch.equal(torch.signbit(out), torch.signbit(exact))  # -0.0 stays -0.0
    nan = stochastic_round_to_bf16(torch.tensor([float("nan")]), torch.Generator().manual_seed(0))
    assert nan.isnan().all()


def test_stochastic_rounding_is_reproducible():
    x = torch.randn(1000)
    a = stochastic_round_to_bf16(x, torch.Generator().manual_seed(7))
    b = stochastic_round_to_bf16(x, torch.Generator().manual_seed(7))
    c = stochastic_round_to_bf16(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def train_bf16(steps: int, lr: float, stochastic: bool, chunk_elements: int | None = None, seed: int = 0,
               state=None):
    """Weights of 1.0 in bfloat16, AdamW with a constant gradient of 1: each step should lower every
    weight by about lr, far below bfloat16's resolution at 1.0 (2^-8)."""
    weights = [torch.nn.Parameter(torch.ones(shape, dtype=torch.bfloat16)) for shape in ((64, 32), (500,), (3,))]
    names = {id(p): f"w{i}" for i, p in enumerate(weights)}
    config = OptimizerConfig(lr=lr, weight_decay=0.0, stochastic_rounding=stochastic)
    opt = build_optimizer(weights, config, 0.0, None, param_names=names, seed=seed)
    if chunk_elements is not None:
        opt.chunk_elements = chunk_elements
    if state is not None:
        with torch.no_grad():
            for p, value in zip(weights, state["weights"]):
                p.copy_(value)
        opt.load_state_dict(state["optimizer"])
    for _ in range(steps):
        for p in weights:
            p.grad = torch.ones_like(p)
        opt.step()
    return weights, opt


def test_stochastic_rounding_step_follows_the_float32_update():
    steps, lr = 50, 1e-4
    weights, opt = train_bf16(steps, lr, stochastic=True)
    assert all(p.dtype == torch.bfloat16 for p in weights)
    # the optimizer state of bfloat16 weights is float32
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in weights)
    mean = torch.cat([p.float().flatten() for p in weights]).double().mean().item()
    # AdamW with a constant gradient moves each weight by lr per step.
    assert mean == pytest.approx(1 - steps * lr, abs=2e-4)
    plain, _ = train_bf16(steps, lr, stochastic=False)
    assert all(torch.equal(p.float(), torch.ones_like(p.float())) for p in plain)  # every update lost


def test_stochastic_rounding_does_not_depend_on_the_slicing():
    # The noise is seeded per parameter and step, not per slice: any chunk size gives the same.
    a, _ = train_bf16(5, 1e-3, stochastic=True, chunk_elements=1)
    b, _ = train_bf16(5, 1e-3, stochastic=True)
    c, _ = train_bf16(5, 1e-3, stochastic=True, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_stochastic_rounding_state_survives_a_checkpoint():
    # 3 steps, save, 3 more == 6 uninterrupted: the float32 state comes back exactly (torch would
    # cast it to the bfloat16 of the parameter) and so does the step that seeds the noise.
    straight, _ = train_bf16(6, 1e-3, stochastic=True)
    first, opt = train_bf16(3, 1e-3, stochastic=True)
    state = {"weights": [p.detach().clone() for p in first], "optimizer": opt.state_dict()}
    resumed, opt2 = train_bf16(3, 1e-3, stochastic=True, state=state)
    assert all(opt2.state[p]["exp_avg_sq"].dtype == torch.float32 for p in resumed)
    assert all(torch.equal(x, y) for x, y in zip(straight, resumed))


def test_float32_weights_are_stepped_as_usual():
    # A float32 parameter next to bfloat16 ones takes the plain AdamW step.
    w32 = torch.nn.Parameter(torch.ones(10))
    w16 = torch.nn.Parameter(torch.ones(10, dtype=torch.bfloat16))
    reference = torch.nn.Parameter(torch.ones(10))
    opt = build_optimizer([w32, w16], OptimizerConfig(lr=1e-2, stochastic_rounding=True), 0.0, None)
    ref = build_optimizer([reference], OptimizerConfig(lr=1e-2), 0.0, None)
    for _ in range(3):
        for p in (w32, w16, reference):
            p.grad = torch.full_like(p, 0.5)
        opt.step()
        ref.step()
    assert torch.equal(w32, reference) and w16.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------ config checks


@pytest.fixture
def configs(tmp_path, tiny_models, image_dataset):
    def make(**overrides):
        return write_configs(tmp_path, tiny_models / "flux", image_dataset, **overrides)
    return make


def config_error(path) -> str:
    with pytest.raises(ConfigError) as info:
        load_train_config(path, get_model_class)
    return str(info.value)


@pytest.mark.skipif(not adamw8bit_missing(), reason="bitsandbytes and a CUDA GPU are both here")
def test_adamw8bit_without_bitsandbytes_or_a_gpu_is_a_config_error(configs):
    path = configs(optimizer={"type": "adamw8bit"})
    message = config_error(path)
    assert message.startswith(f"{path}: 'optimizer.type' = 'adamw8bit' needs ")
    if not torch.cuda.is_available():
        assert "a CUDA GPU" in message
    assert "pip install bitsandbytes" in message


def test_adamw8bit_state_size_formula():
    # bitsandbytes keeps float32 state below 4096 elements, else two uint8 states and a float32
    # scale per 256 values for each (memory/estimate.py relies on this).
    from memory.estimate import ParamInfo, optimizer_state_bytes

    config = OptimizerConfig(type="adamw8bit")
    assert optimizer_state_bytes(ParamInfo((1000,), torch.bfloat16, True), config) == 2 * 1000 * 4
    assert optimizer_state_bytes(ParamInfo((100, 100), torch.bfloat16, True), config) == 2 * 10000 + 2 * 40 * 4


def test_stochastic_rounding_needs_bfloat16_trained_weights(configs):
    # float32 model, full fine-tuning in its dtype: nothing to round into
    message = config_error(configs(adapter=None, optimizer={"stochastic_rounding": True}))
    assert "'optimizer.stochastic_rounding' rounds into bfloat16 weights, but the trained weights are float32" in message
    # a float32 LoRA
    message = config_error(configs(optimizer={"stochastic_rounding": True}))
    assert "float32 (adapter.dtype)" in message
    # bfloat16 full fine-tuning and a bfloat16 LoRA are fine
    full = load_train_config(configs(adapter=None, full_finetune_dtype="bfloat16", optimizer={"stochastic_rounding": True}),
                             get_model_class)
    assert full.full_finetune and full.trained_dtype == "bfloat16"
    lora = load_train_config(configs(adapter={"dtype": "bfloat16"}, optimizer={"stochastic_rounding": True}),
                             get_model_class)
    assert not lora.full_finetune and lora.trained_dtype == "bfloat16"


def test_full_finetune_settings(configs):
    # No [adapter]: full fine-tuning, in model.dtype unless full_finetune_dtype says otherwise.
    config = load_train_config(configs(adapter=None, model={"dtype": "bfloat16"}), get_model_class)
    assert config.full_finetune and config.trained_dtype == "bfloat16"
    config = load_train_config(configs(adapter=None, model={"dtype": "bfloat16"}, full_finetune_dtype="float32"),
                               get_model_class)
    assert config.trained_dtype == "float32"
    path = configs(full_finetune_dtype="float32")  # with an [adapter]
    assert config_error(path) == (f"{path}: 'full_finetune_dtype' is for full fine-tuning (no [adapter] table); "
                                  f"the LoRA weights' dtype is adapter.dtype")


def test_activation_checkpointing_values(configs):
    for value in (False, True, "selective"):
        assert load_train_config(configs(activation_checkpointing=value),
                                 get_model_class).settings.activation_checkpointing == value
    path = configs(activation_checkpointing="some")
    assert config_error(path) == (f"{path}: 'activation_checkpointing' must be true or false or 'selective', "
                                  f"got 'some'")
