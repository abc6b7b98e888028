"""The moving average of the trained weights (training/ema.py): its arithmetic, its schedule, and that
using it (saving, evaluating) leaves the trained weights exactly as they were."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import launch, write_configs
from training.ema import EMA


def params():
    torch.manual_seed(0)
    return {"a.lora_A.default.weight": torch.nn.Parameter(torch.randn(4, 3)),
            "a.lora_B.default.weight": torch.nn.Parameter(torch.randn(3, 4).to(torch.bfloat16))}


def test_update_follows_the_formula_on_its_schedule():
    p = params()
    ema = EMA(p, decay=0.9, update_every=2, device=torch.device("cpu"))
    expected = {n: t.detach().float().clone() for n, t in p.items()}
    for step in range(1, 6):
        with torch.no_grad():
            for t in p.values():
                t.add_(1.0)
        ema.update(step)
        if step % 2 == 0:
            expected = {n: 0.9 * e + 0.1 * p[n].detach().float() for n, e in expected.items()}
        for n in p:
            torch.testing.assert_close(ema.average[n], expected[n], rtol=1e-6, atol=1e-6)
    assert all(t.dtype == torch.float32 for t in ema.average.values())


def test_applied_swaps_in_the_average_and_restores_the_weights_bit_for_bit():
    p = params()
    ema = EMA(p, decay=0.5, update_every=1)
    with torch.no_grad():
        for t in p.values():
            t.mul_(3.0)
    ema.update(1)
    before = {n: t.detach().clone() for n, t in p.items()}
    with ema.applied():
        for n, t in p.items():
            assert torch.equal(t, ema.average[n].to(t.dtype))
    for n, t in p.items():
        assert torch.equal(t, before[n])


def test_state_round_trip_and_restart():
    p = params()
    ema = EMA(p, decay=0.5, update_every=1)
    with torch.no_grad():
        p["a.lora_A.default.weight"].add_(2.0)
    ema.update(1)
    other = EMA(params(), decay=0.5, update_every=1)
    other.load_state_dict(ema.state_dict())
    for n in p:
        assert torch.equal(other.average[n], ema.average[n])
    ema.restart()
    for n in p:
        assert torch.equal(ema.average[n], p[n].detach().float())


@pytest.mark.slow
def test_a_resumed_run_continues_the_average(tmp_path, tiny_models, image_dataset):
    # The average is in every checkpoint: resumed from step 2, the run ends with the same averaged
    # adapter (and losses) as the uninterrupted one.
    settings = dict(max_steps=4, micro_batch_size_per_gpu=1, checkpoint_every_n_steps=2, ema={"decay": 0.5})
    config = write_configs(tmp_path / "a", tiny_models / "flux", image_dataset, **settings)
    whole = launch(config)
    assert whole.returncode == 0, whole.output[-3000:]
    original = whole.run_dirs()[-1]
    assert (original / "checkpoints" / "step00000002" / "ema_rank0000.pt").is_file()
    resumed_config = write_configs(tmp_path / "b", tiny_models / "flux", image_dataset, **settings)
    copy = resumed_config.parent / "runs" / original.name
    shutil.copytree(original, copy)
    resumed = launch(resumed_config, "--resume_from_checkpoint", "step00000002")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert resumed.losses(copy) == whole.losses(original)
    final = "adapters/final/ema/pytorch_lora_weights.safetensors"
    a, b = load_file(original / final), load_file(copy / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
