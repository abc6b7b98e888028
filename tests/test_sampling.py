"""Samples during training ([sample], training/sampling.py), checked against diffusers' own pipeline.

One launch per pipeline layout (1 stage, 2 stages) trains a tiny FLUX.1 LoRA and draws its samples
at the start (the base model) and at the end (with the trained adapter's EMA: [ema] samples).
`FluxPipeline`, given the same seed, steps and guidance, with no LoRA and then with our saved
diffusers-format averaged LoRA, must reproduce the latents and the decoded pictures.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import launch, write_configs
from tools.make_demo_dataset import make_demo_dataset

# Two prompts of one shape (with two replicas, one each) and one of another shape and guidance.
SAMPLE = {"prompts": ["a red circle on a blue background",
                      {"prompt": "a green square", "seed": 7, "width": 96, "height": 48, "guidance": 5.0},
                      {"prompt": "a yellow triangle", "seed": 5}],
          "steps": 4, "at_start": True, "every_n_steps": 3}


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("sampling")
    return {"root": root, "data": make_demo_dataset(root / "data", count=4, seed=0), "model": tiny_models / "flux"}


def train_with_samples(work, name: str, num_gpus: int, **overrides):
    # The samples use the average (decay 0.5: far from the trained weights after 4 steps).
    config = write_configs(work["root"] / name, work["model"], work["data"], max_steps=4, sample=SAMPLE,
                           optimizer={"lr": 3e-2}, ema={"decay": 0.5, "samples": True}, **overrides)
    result = launch(config, num_gpus=num_gpus)
    assert result.returncode == 0, result.output[-5000:]
    (run,) = result.run_dirs()
    return run, result


@pytest.fixture(scope="module")
def one_stage(work):
    return train_with_samples(work, "one", 1)


@pytest.fixture(scope="module")
def two_stages(work):
    # 2 replicas of a 2-stage pipeline: the two prompts are shared out, one to each replica.
    return train_with_samples(work, "two", 4, pipeline_stages=2, gradient_accumulation_steps=2)


def pipeline_latents(model_dir, adapter_dir, request):
    """FluxPipeline's latents (packed, as output_type="latent" returns them) and picture."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        pipe.load_lora_weights(adapter_dir)
    common = dict(prompt=request["prompt"], height=request["height"], width=request["width"],
                  num_inference_steps=request["steps"], guidance_scale=request["guidance"], max_sequence_length=32)
    latents = pipe(**common, generator=torch.Generator().manual_seed(request["seed"]), output_type="latent").images
    picture = pipe(**common, generator=torch.Generator().manual_seed(request["seed"]), output_type="np").images[0]
    return latents, (picture * 255).round().astype("uint8")


def check_against_pipeline(work, run):
    from diffusers import FluxPipeline

    steps = sorted(p.name for p in (run / "samples").iterdir())
    assert steps == ["step00000000", "step00000003", "step00000004"]
    final = run / "adapters" / "final"
    trained, averaged = (load_file(d / "pytorch_lora_weights.safetensors") for d in (final, final / "ema"))
    assert any(not torch.allclose(trained[k], averaged[k], atol=1e-4) for k in trained)
    for step, adapter in (("step00000000", None), ("step00000004", final / "ema")):
        folder = run / "samples" / step
        index = json.loads((folder / "index.json").read_text())
        assert [e["file"] for e in index] == ["0.png", "1.png", "2.png"]
        ours = load_file(folder / "latents.safetensors")
        for entry in index:
            theirs, picture = pipeline_latents(work["model"], adapter, entry)
            mine = FluxPipeline._pack_latents(ours[str(entry["index"])], *ours[str(entry["index"])].shape)
            assert mine.shape == theirs.shape
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
            drawn = np.asarray(Image.open(folder / entry["file"]))
            assert drawn.shape == picture.shape
            assert np.abs(drawn.astype(int) - picture.astype(int)).max() <= 1
    # The adapter changed what the model draws (else the comparison above would prove little).
    start = load_file(run / "samples" / "step00000000" / "latents.safetensors")
    end = load_file(run / "samples" / "step00000004" / "latents.safetensors")
    assert not torch.allclose(start["0"], end["0"], atol=1e-3)


@pytest.mark.slow
def test_samples_equal_the_diffusers_pipeline_at_one_stage(work, one_stage):
    run, result = one_stage
    check_against_pipeline(work, run)
    assert "3 sample(s) in" in result.output
    # The time sampling took, as a share of the run (at the start, at step 3 and at the end).
    (line,) = re.findall(r"sampling: [0-9.]+ s in 3 round\(s\), ([0-9.]+)% of the [0-9.]+ s this run trained",
                         result.output)
    assert 0 < float(line) < 100


@pytest.mark.slow
def test_samples_equal_the_diffusers_pipeline_at_two_stages_and_two_replicas(work, two_stages):
    run, _ = two_stages
    check_against_pipeline(work, run)


def sample_tool(config, *args):
    """tools/sample.py as a user runs it on one process (no launcher needed)."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, str(REPO / "tools" / "sample.py"), "--config", str(config), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc


@pytest.mark.slow
def test_sample_tool_redraws_the_training_samples_from_the_saved_adapter_and_the_base_model(work, one_stage):
    run, _ = one_stage
    config = work["root"] / "one" / "train.toml"
    adapter = run / "adapters" / "final" / "ema"  # the averaged adapter drew the training samples
    proc = sample_tool(config, "--adapter", str(adapter))
    assert proc.returncode == 0, proc.stderr[-3000:]
    drawn = load_file(adapter / "samples" / "step00000000" / "latents.safetensors")
    trained = load_file(run / "samples" / "step00000004" / "latents.safetensors")
    assert drawn.keys() == trained.keys()
    for k in drawn:
        torch.testing.assert_close(drawn[k], trained[k], rtol=1e-5, atol=1e-6)

    proc = sample_tool(config, "--base", "--out", str(work["root"] / "base"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    drawn = load_file(work["root"] / "base" / "step00000000" / "latents.safetensors")
    start = load_file(run / "samples" / "step00000000" / "latents.safetensors")
    for k in drawn:
        torch.testing.assert_close(drawn[k], start[k], rtol=1e-5, atol=1e-6)

    proc = sample_tool(config, "--adapter", str(work["root"] / "nowhere"))
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 2 and errors == [f"error: {work['root'] / 'nowhere'}: not found"]
