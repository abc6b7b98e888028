"""Learning that inference can see: a tiny FLUX.1, fully fine-tuned from random weights on two
generated classes of pictures, draws each class for its own prompt. Its samples (latents before
the VAE) for "a red circle" lie nearer the red circles' cached latents than the blue squares', and
the other way round, for at least 90% of seeds: the objective, the timestep schedule, the text
conditioning and the sampler agree end to end."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from conftest import launch, write_configs
from make_tiny_models import FLUX_TRANSFORMER

from utils.dist import Distributed

CLASSES = {"a red circle": ("ellipse", (220, 30, 30)), "a blue square": ("rectangle", (30, 60, 220))}
SEEDS = range(10)


def make_classes(folder, per_class: int = 4):
    """Pictures of each class at random places and sizes, captioned with the class prompt."""
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for prompt, (shape, colour) in CLASSES.items():
        for i in range(per_class):
            image = Image.new("RGB", (64, 64), (245, 245, 240))
            side = rng.randint(24, 40)
            x, y = rng.randint(0, 64 - side), rng.randint(0, 64 - side)
            getattr(ImageDraw.Draw(image), shape)((x, y, x + side, y + side), fill=colour)
            stem = f"{shape}_{i}"
            image.save(folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(prompt)
    return folder


def wide_tiny_flux(tiny_models, folder):
    """The tiny FLUX.1 with a transformer 128 wide: the usual tiny one (32 wide) squeezes the 64
    values of each packed latent token through 32, so it cannot even pass the noise through, and
    its samples keep half of it whatever it learns."""
    from diffusers import FluxTransformer2DModel

    shutil.copytree(tiny_models / "flux", folder, ignore=shutil.ignore_patterns("*original*"))
    shutil.rmtree(folder / "transformer")
    torch.manual_seed(0)
    FluxTransformer2DModel(**{**FLUX_TRANSFORMER, "num_attention_heads": 8}).save_pretrained(folder / "transformer")
    return folder


@pytest.mark.slow
def test_samples_lie_nearer_their_own_class(tmp_path, tiny_models):
    from config.train_config import load_train_config
    from data.prepare import prepare_dataset
    from models import get_model_class

    data = make_classes(tmp_path / "data")
    model_dir = wide_tiny_flux(tiny_models, tmp_path / "flux")
    prompts = [{"prompt": p, "seed": s} for p in CLASSES for s in SEEDS]
    config = write_configs(tmp_path / "run", model_dir, data, adapter=None, max_steps=1200,
                           micro_batch_size_per_gpu=4, optimizer={"lr": 3e-3},
                           dataset={"enable_ar_bucket": False},
                           sample={"prompts": prompts, "width": 64, "height": 64, "steps": 20, "guidance": 1.0})
    result = launch(config)
    assert result.returncode == 0, result.output[-5000:]
    (run,) = result.run_dirs()
    drawn = load_file(run / "samples" / "step00001200" / "latents.safetensors")

    loaded = load_train_config(config, get_model_class)
    model = get_model_class("flux")(loaded.model)
    reader = prepare_dataset(loaded.dataset, model, title="classes", micro_batch_size=1, caching_batch_size=1,
                             regenerate=False, place=Distributed.alone(), log=lambda *_: None)
    assert reader.encoded == 0
    latents = {p: torch.stack([reader.load(i)[0]["latents"].float() for i, c in enumerate(reader.samples)
                               if c.sample.item.caption == p]) for p in CLASSES}

    def nearest(sample, prompt):
        return (latents[prompt] - sample).flatten(1).norm(dim=1).min()

    right, margins = 0, []  # margins: distance to the other class's nearest / to the own class's
    for index, entry in enumerate(prompts):
        own, other = entry["prompt"], next(p for p in CLASSES if p != entry["prompt"])
        sample = drawn[str(index)][0].float()
        right += bool(nearest(sample, own) < nearest(sample, other))
        margins.append(float(nearest(sample, other) / nearest(sample, own)))
    assert right >= 0.9 * len(prompts), f"{right} of {len(prompts)} nearer their own class; ratios {margins}"
    print(f"{right} of {len(prompts)} nearer their own class; distance ratio other/own: median "
          f"{sorted(margins)[len(margins) // 2]:.2f}, min {min(margins):.2f}")
