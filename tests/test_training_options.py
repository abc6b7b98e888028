"""The training options that touch the step, all on at once, train the same on every layout: 1
process, 2 pipeline stages and 2 data-parallel replicas give the same losses, adapter, averaged
(EMA) adapter and eval losses. The options: a robust loss, a timestep density and range,
modulation layers added to the adapter and a double block left out, LoRA+, DoRA, EMA, caption
dropout, caption shuffling and a loss mask per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import launch
from test_parallel import compare, run_layout
from data.tensor_store import TensorStore

OPTIONS = dict(
    model={"loss_type": "pseudo_huber", "huber_delta": 0.5, "timestep_sample_method": "mode",
           "min_timestep": 0.2, "max_timestep": 0.9},
    adapter={"target_include": [r"norm\.linear$"], "target_exclude": [r"^transformer_blocks\.1\."],
             "lora_plus_ratio": 4.0, "use_dora": True},
    ema={"decay": 0.5, "update_every": 2, "eval": True},
    dataset={"caption_dropout": 0.5, "caption_shuffle_variants": 2, "keep_tokens": 1},
)

# Each layout trains on 2 micro-batches of 1 sample per optimizer step.
LAYOUTS = {
    "1 stage": dict(num_gpus=1, pipeline_stages=1, gradient_accumulation_steps=2),
    "2 stages": dict(num_gpus=2, pipeline_stages=2, gradient_accumulation_steps=2),
    "2 replicas": dict(num_gpus=2, pipeline_stages=1, gradient_accumulation_steps=1),
}


@pytest.mark.slow
def test_options_train_the_same_on_every_layout(tmp_path, tiny_models, image_dataset):
    for i, caption in enumerate(sorted(image_dataset.glob("*.txt"))):  # tags to shuffle
        caption.write_text(f"{caption.read_text().strip()}, style {i}, sharp, bright")
    masks = tmp_path / "masks"  # gray levels at random, per 8x8 pixels (one latent element)
    masks.mkdir()
    rng = np.random.default_rng(0)
    for image in sorted(image_dataset.glob("*.png")):
        w, h = Image.open(image).size
        gray = rng.integers(0, 256, (h // 8, w // 8), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        Image.fromarray(gray, mode="L").save(masks / image.name)
    options = {**OPTIONS, "dataset": {**OPTIONS["dataset"],
                                      "directory": [{"path": str(image_dataset), "mask_path": str(masks)}]}}
    results = {name: run_layout(tmp_path, tiny_models, image_dataset, name, **settings, **options)
               for name, settings in LAYOUTS.items()}
    reference = results["1 stage"]
    losses, weights, evals, output = reference
    # the options took effect: the printed target set, LoRA on the modulation layers, none on
    # double block 1; the averaged adapter and its eval loss
    assert "single_transformer_blocks.{0-1}: norm.linear, proj_mlp" in output
    assert any("norm.linear.lora_B" in k for k in weights)
    assert any(k.endswith(".lora_magnitude_vector") for k in weights)  # DoRA
    assert not any(k.startswith("transformer.transformer_blocks.1.") for k in weights)
    run_dirs = {name: sorted((tmp_path / name.replace(" ", "_")).glob("runs/*"))[-1] for name in LAYOUTS}
    averaged = {name: load_file(d / "adapters" / "final" / "ema" / "pytorch_lora_weights.safetensors")
                for name, d in run_dirs.items()}
    assert averaged["1 stage"].keys() == weights.keys()
    assert any(not torch.equal(averaged["1 stage"][k], weights[k]) for k in weights)
    assert all("held/ema" in e for e in evals)
    latents = TensorStore(image_dataset / "cache" / "flux" / "latents")
    assert latents.index and all("mask" in latents.get(k) for k in latents.index)
    for name in ("2 stages", "2 replicas"):
        compare(reference, results[name], name)
        for k, v in averaged[name].items():
            torch.testing.assert_close(v, averaged["1 stage"][k], atol=1e-5, rtol=1e-4, msg=f"{name}: ema {k}")
        for e, r in zip(results[name][2], evals):
            assert e["held/ema"] == pytest.approx(r["held/ema"], rel=1e-6), name


@pytest.mark.slow
def test_lokr_and_loha_train_the_same_on_every_layout(tmp_path, tiny_models, image_dataset):
    """LoKr on 1 stage, 2 stages and 2 replicas, LoHa on 1 stage and 2 stages: the same losses,
    adapter and eval losses. Their weights are seeded by name, so every split starts alike. The
    2-stage LoKr run, resumed from its step-2 checkpoint, ends with the same losses and adapter."""
    results = {}
    for kind, names, marker in (("lokr", list(LAYOUTS), ".lokr_w1"), ("loha", ["1 stage", "2 stages"], ".hada_w1_a")):
        adapter = {"type": kind, "rank": 4, "alpha": 2.0}
        results[kind] = {name: run_layout(tmp_path / kind, tiny_models, image_dataset, name, **LAYOUTS[name],
                                          adapter=adapter, checkpoint_every_n_steps=2, checkpoints_to_keep=5)
                         for name in names}
        reference = results[kind]["1 stage"]
        assert any(k.endswith(marker) for k in reference[1]) and not any("lora_" in k for k in reference[1])
        assert reference[0][0] != reference[0][-1]  # it trained
        for name in names[1:]:
            compare(reference, results[kind][name], f"{kind}, {name}")
    full_losses, full_weights = results["lokr"]["2 stages"][:2]
    cfg = tmp_path / "lokr" / "2_stages" / "train.toml"
    resumed = launch(cfg, "--resume_from_checkpoint", "step00000002", num_gpus=2)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "starting at step 2" in resumed.output
    run_dir = resumed.run_dirs()[-1]
    assert resumed.losses(run_dir) == pytest.approx(full_losses, rel=1e-6, abs=0)
    resumed_weights = load_file(run_dir / "adapters" / "final" / "pytorch_lora_weights.safetensors")
    assert resumed_weights.keys() == full_weights.keys()
    for k, v in resumed_weights.items():
        torch.testing.assert_close(v, full_weights[k], atol=1e-6, rtol=0, msg=k)
