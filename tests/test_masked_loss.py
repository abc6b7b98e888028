"""Masked loss: a mask image per media file (in the directory's mask_path), cropped to the bucket
with its media, cached with the latent at the latent's size, weighting each element's loss.
A missing or misshapen mask is a listed problem; without masks nothing changes."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config.dataset_config import load_dataset_config
from data.batches import Slot, collate
from data.cache import latent_mask
from data.media import write_video
from data.prepare import prepare_dataset
from data.scan import scan_dataset
from make_tiny_models import make_tiny_hunyuan_video, make_tiny_ltx_video
from models import get_model_class
from models.flux import FluxConfig, FluxModel
from training.objective import loss, training_example
from utils.dist import Distributed
from utils.errors import ConfigError
from utils.seeding import generator_for

CPU = torch.device("cpu")


def write_mask(path: Path, width: int, height: int, white_rows: int) -> None:
    """A mask whose top `white_rows` rows are white, the rest black."""
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[:white_rows] = 255
    Image.fromarray(pixels, mode="L").save(path)


def write_dataset(folder: Path, *directories: dict) -> Path:
    lines = ["resolutions = [64]", "enable_ar_bucket = true", "num_ar_buckets = 3"]
    for d in directories:
        lines += ["", "[[directory]]"] + [f'{k} = "{v}"' for k, v in d.items()]
    path = folder / "dataset.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def flux(tiny_models) -> FluxModel:
    return FluxModel(FluxConfig(type="flux", diffusers_path=str(tiny_models / "flux"), dtype="float32",
                                max_sequence_length=32))


def test_masks_are_found_and_bad_ones_listed(tmp_path, image_dataset):
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(6):  # images are 64x64, 96x64, 64x96 in turn; masks at half size keep the aspect
        w, h = ((64, 64), (96, 64), (64, 96))[i % 3]
        write_mask(masks / f"shape_{i:03d}.png", w // 2, h // 2, 8)
    write_mask(masks / "shape_007.png", 32, 32, 8)  # shape_007 is 96x64: another aspect ratio
    (masks / "shape_005.jpg").write_bytes((masks / "shape_005.png").read_bytes())  # two masks for one file
    dataset = load_dataset_config(write_dataset(tmp_path, {"path": image_dataset, "mask_path": "masks"}))
    scan = scan_dataset(dataset)
    assert {i.path.name: i.mask.name for i in scan.items} == {f"shape_{i:03d}.png": f"shape_{i:03d}.png"
                                                              for i in range(5)}
    reasons = {p.name: r for p, r in scan.problems}
    assert reasons["shape_006.png"] == f"no mask in {masks} (an image named shape_006.png, .jpg, ...)"
    assert reasons["shape_007.png"] == (f"mask {masks / 'shape_007.png'} is 32x32, not of the media's aspect "
                                        f"ratio (96x64)")
    assert reasons["shape_005.png"] == f"2 masks in {masks} (shape_005.jpg, shape_005.png); keep one"

    for value, message in [("nowhere", f"is not a folder: {tmp_path / 'nowhere'}"),
                           (str(image_dataset), "is the directory's own folder")]:
        with pytest.raises(ConfigError, match="directory\\[0\\].mask_path' " + message):
            load_dataset_config(write_dataset(tmp_path, {"path": image_dataset, "mask_path": value}))


def test_masks_are_cropped_with_the_media_and_cached_with_the_latents(tmp_path, tiny_models, image_dataset):
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(8):
        w, h = ((64, 64), (96, 64), (64, 96))[i % 3]
        write_mask(masks / f"shape_{i:03d}.png", w, h, 16)  # the top quarter white
    plain = tmp_path / "plain"  # a folder without masks, sharing the buckets
    plain.mkdir()
    for name in ("shape_001.png", "shape_001.txt"):
        shutil.copy(image_dataset / name, plain / name)
    toml = write_dataset(tmp_path, {"path": image_dataset, "mask_path": "masks"}, {"path": plain})
    model = flux(tiny_models)

    def build():
        return prepare_dataset(load_dataset_config(toml), model, title="test", micro_batch_size=2,
                               caching_batch_size=2, regenerate=False, place=Distributed.alone(CPU),
                               log=lambda *_: None)

    reader = build()
    assert reader.encoded == 9 + 9  # 9 latents, 9 captions (a text store per folder)
    loaded = {(c.folder.name, c.sample.item.path.name): reader.load(i)[0] for i, c in enumerate(reader.samples)}
    assert "mask" not in loaded["plain", "shape_001.png"]
    # shape_001 is 96x64, in the 96x48 bucket: 8 rows cropped at the top and the bottom, as the
    # image is. So the 16 white rows become the top 8 of 48: latent row 0 of 6 (an 8x VAE).
    mask = loaded[image_dataset.name, "shape_001.png"]["mask"]
    assert mask.shape == (1, 6, 12) and mask.dtype == torch.float32
    torch.testing.assert_close(mask[0, 0], torch.ones(12))
    torch.testing.assert_close(mask[0, 1:], torch.zeros(5, 12))
    # a batch of a masked and an unmasked sample: the unmasked one weighs 1 everywhere
    index = {(c.folder.name, c.sample.item.path.name): i for i, c in enumerate(reader.samples)}
    batch = [Slot(index[image_dataset.name, "shape_001.png"], 0), Slot(index["plain", "shape_001.png"], 0)]
    _, (target, _, packed) = collate(partial(training_example, model), reader, batch, 0, "train", 0, train=True)
    assert packed.shape == target.shape
    assert torch.all(packed[1] == 1) and packed[0].sum() == 16 * 12  # one latent row of 12, 16 channels

    # A changed mask re-encodes exactly its latent; the rest come from the cache.
    write_mask(masks / "shape_004.png", 96, 64, 32)
    reader = build()
    assert reader.encoded == 1
    # Without mask_path, the folder's latents are other entries: encoded again, without masks.
    write_dataset(tmp_path, {"path": image_dataset}, {"path": plain})
    reader = build()
    assert reader.encoded == 8
    assert all("mask" not in reader.load(i)[0] for i in range(len(reader)))


def test_the_mask_weights_each_elements_loss(tiny_models):
    model = flux(tiny_models)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    text = {"text": torch.zeros(2, 32, 32), "pooled": torch.zeros(2, 32)}

    def example(mask=None):
        generators = [generator_for(0, "train", 0, i, 0) for i in range(2)]
        return training_example(model, latents, text, generators, mask=mask)

    inputs, labels = example()
    assert len(labels) == 2  # without a mask, the labels are as they always were
    ones_inputs, ones_labels = example(torch.ones(2, 1, 8, 8))
    assert all(torch.equal(a, b) for a, b in zip(inputs, ones_inputs))  # a mask never touches the inputs
    mask = torch.ones(2, 1, 8, 8)
    mask[0, :, :, :4] = 0  # sample 0: the left half weighs nothing
    mask[1] = 0.25
    _, masked_labels = example(mask)

    prediction = torch.randn_like(labels[0], requires_grad=True)
    plain = loss(model, prediction, labels)
    # a mask of ones is no mask, to the bit
    assert torch.equal(loss(model, prediction, ones_labels), plain)
    (grad_plain,) = torch.autograd.grad(plain, prediction)
    (grad_masked,) = torch.autograd.grad(loss(model, prediction, masked_labels), prediction)
    # each element's gradient is scaled by its weight: none from the masked-out half (tokens of
    # the 2x2 patches in latent columns 0-3: token columns 0-1 of 4), a quarter from sample 1
    tokens = masked_labels[2][0, :, 0].view(4, 4)
    assert torch.equal(tokens, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4))
    assert torch.all(grad_masked[0].view(4, 4, -1)[:, :2] == 0)
    torch.testing.assert_close(grad_masked, grad_plain * masked_labels[2])
    torch.testing.assert_close(grad_masked[1], grad_plain[1] * 0.25)


@pytest.mark.parametrize("name, latent_shape", [("ltx-video", (2, 16, 3, 2, 4)), ("hunyuan-video", (2, 16, 3, 4, 6))])
def test_one_mask_weighs_every_frame_of_a_video(tmp_path, name, latent_shape):
    (make_tiny_ltx_video if name == "ltx-video" else make_tiny_hunyuan_video)(tmp_path)
    cls = get_model_class(name)
    model = cls(cls.config_class(type=name, diffusers_path=str(tmp_path / name), dtype="float32"))
    latents = torch.randn(latent_shape, generator=torch.Generator().manual_seed(0))
    h, w = latent_shape[-2:]
    pixels = torch.zeros(1, 8 * h, 8 * w)
    pixels[:, :, : 4 * w] = 1.0  # the left half of the picture
    mask = latent_mask(pixels, latents[0])
    assert mask.shape == (1, 1, h, w)  # one frame, broadcast over the latent frames
    text = {"text": torch.zeros(2, 12, 32), "text_mask": torch.ones(2, 12, dtype=torch.bool),
            "pooled": torch.zeros(2, 32)}
    generators = [generator_for(0, "train", 0, i, 0) for i in range(2)]
    _, (target, _, packed) = training_example(model, latents, text, generators, mask=torch.stack([mask, mask]))
    # packed as the target is: the same weight reaches the same element whatever the patching
    expected = model.pack_latents(torch.zeros(latent_shape).index_fill(-1, torch.arange(w // 2), 1.0))
    assert packed.shape == target.shape and torch.equal(packed, expected)


def write_frames(path: Path, white_frames: int, frames: int = 9, size=(64, 64)) -> None:
    """A mask video whose first `white_frames` frames are white, the rest black."""
    pixels = np.zeros((frames, size[1], size[0], 3), dtype=np.uint8)
    pixels[:white_frames] = 255
    write_video(path, pixels, fps=8)


def test_masks_per_frame_weigh_their_latent_frames(tmp_path):
    # HunyuanVideo's VAE: 4x in time (latent frame 0 = pixel frame 0, then groups of 4), 8x in space.
    make_tiny_hunyuan_video(tmp_path)
    cls = get_model_class("hunyuan-video")
    model = cls(cls.config_class(type="hunyuan-video", diffusers_path=str(tmp_path / "hunyuan-video"),
                                 dtype="float32"))
    data, masks = tmp_path / "data", tmp_path / "masks"
    data.mkdir(), masks.mkdir()
    rng = np.random.default_rng(0)
    for name in ("per_frame", "all_ones", "one_image", "short", "wide", "image"):
        if name == "image":
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data / "image.png")
        else:
            frames = 13 if name == "per_frame" else 9
            write_video(data / f"{name}.mp4", rng.integers(0, 256, (frames, 64, 64, 3), dtype=np.uint8), fps=8)
        (data / f"{name}.txt").write_text("a clip")
    # 13 frames: its 9-frame clip (single_middle) starts at frame 2; frames 2-4 of it weigh 1, 5-12 nothing
    write_frames(masks / "per_frame.mp4", white_frames=5, frames=13)
    write_frames(masks / "all_ones.mkv", white_frames=9)
    write_mask(masks / "one_image.png", 64, 64, 64)  # an image for every frame, all white
    write_frames(masks / "short.mp4", white_frames=5, frames=5)
    write_frames(masks / "wide.mp4", white_frames=9, size=(96, 64))
    write_frames(masks / "image.mp4", white_frames=1, frames=1)  # an image's mask is an image
    toml = tmp_path / "dataset.toml"
    toml.write_text('resolutions = [64]\nframe_buckets = [9]\nvideo_clip_mode = "single_middle"\n\n'
                    '[[directory]]\npath = "data"\nmask_path = "masks"\n')
    dataset = load_dataset_config(toml)

    reasons = {p.name: r for p, r in scan_dataset(dataset).problems}
    assert reasons == {
        "short.mp4": f"mask {masks / 'short.mp4'} has 5 frames, the video 9: a mask video has one per frame",
        "wide.mp4": f"mask {masks / 'wide.mp4'} is 96x64, not of the media's aspect ratio (64x64)",
        "image.png": f"no mask in {masks} (an image named image.png, .jpg, ...)"}
    reader = prepare_dataset(dataset, model, title="test", micro_batch_size=3, caching_batch_size=3,
                             regenerate=False, place=Distributed.alone(CPU), log=lambda *_: None)
    index = {c.sample.item.path.stem: i for i, c in enumerate(reader.samples)}
    assert set(index) == {"per_frame", "all_ones", "one_image"}
    latents = reader.load(index["per_frame"])[0]["latents"]
    assert latents.shape == (16, 3, 8, 8)
    # By hand: latent frame 0 is clip frame 0 (white), 1 is clip frames 1-4 (2 of 4 white), 2 is 5-8.
    # (Cut from frame 0 instead of the clip's, it would be 1, 1, 0.)
    by_hand = torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    assert torch.equal(reader.load(index["per_frame"])[0]["mask"], by_hand)
    assert torch.equal(reader.load(index["all_ones"])[0]["mask"], torch.ones(1, 3, 8, 8))
    assert reader.load(index["one_image"])[0]["mask"].shape == (1, 1, 8, 8)

    # A batch mixes masks per frame with one image for all frames; each sample's loss is as with
    # its mask written by hand, and the all-ones mask video's as without a mask.
    batch = [Slot(index[n], 0) for n in ("per_frame", "all_ones", "one_image")]
    example = partial(training_example, model)
    _, labels = collate(example, reader, batch, 0, "train", 0, train=True)
    loaded = [reader.load(s.index) for s in batch]
    prediction = torch.randn(labels[0].shape, generator=torch.Generator().manual_seed(1))

    def sample_loss(i, mask):
        s = batch[i]
        latents, text = loaded[i][0]["latents"][None], {k: v[None] for k, v in loaded[i][1].items()}
        _, own = training_example(model, latents, text, [generator_for(0, "train", 0, s.index, s.repeat, s.timestep)],
                                  mask=mask)
        return loss(model, prediction[i:i + 1], own)

    per_sample = [loss(model, prediction[i:i + 1], tuple(x[i:i + 1] for x in labels)) for i in range(3)]
    assert torch.equal(per_sample[0], sample_loss(0, by_hand[None]))
    assert torch.equal(per_sample[1], sample_loss(1, None))
    assert torch.equal(per_sample[2], sample_loss(2, None))
    assert not torch.equal(per_sample[0], sample_loss(0, None))


def test_masks_per_frame_follow_each_vae_temporal_compression():
    # LTX-Video's VAE is 8x in time: 17 frames are latent frames {0}, {1-8}, {9-16}.
    pixels = torch.zeros(1, 17, 32, 32)
    pixels[:, :5] = 1.0
    weights = latent_mask(pixels, torch.zeros(128, 3, 1, 1))
    assert torch.equal(weights.flatten(), torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match="a mask of 16 frames does not fit a latent of 3 frames"):
        latent_mask(pixels[:, :16], torch.zeros(128, 3, 1, 1))
