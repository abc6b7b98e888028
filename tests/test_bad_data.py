"""Bad training data: every file that cannot be used is listed by path, with the reason, in one
summary; the rest are cached and train. `missing_caption` decides what a missing caption is, and
`strict = true` stops instead (after listing everything, keeping what was cached).

Each case is a folder of two good images plus the bad input, prepared in this process exactly
as train.py prepares a dataset (scan, buckets, cache with the tiny FLUX model).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config.dataset_config import load_dataset_config
from data.prepare import prepare_dataset
from models.flux import FluxConfig, FluxModel
from tools.make_demo_dataset import make_demo_dataset
from utils.dist import Distributed
from utils.errors import DataError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tiny_models):
    return FluxModel(FluxConfig(type="flux", diffusers_path=str(tiny_models / "flux"), dtype="float32",
                                max_sequence_length=32))


@pytest.fixture
def folder(tmp_path) -> Path:
    """Two good captioned images (64x64 and 96x64) to which a test adds its bad input."""
    return make_demo_dataset(tmp_path / "data", count=2, seed=0)


def dataset_toml(folder: Path, extra: str = "", directory_extra: str = "") -> Path:
    path = folder.parent / "dataset.toml"
    path.write_text(f"resolutions = [64]\nnum_ar_buckets = 3\n{extra}\n[[directory]]\npath = \"{folder.name}\"\n"
                    f"{directory_extra}\n")
    return path


def prepare(model, toml: Path):
    """(reader, everything printed) of one preparation."""
    printed: list[str] = []
    reader = prepare_dataset(load_dataset_config(toml), model, title="training dataset", micro_batch_size=2,
                             caching_batch_size=2, regenerate=False, place=Distributed.alone(CPU),
                             log=printed.append)
    return reader, "\n".join(printed)


def summary(text: str) -> dict[str, str]:
    """The problem summary printed: {file name: reason}. Asserts there is exactly one."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if "cannot be used and are left out" in line]
    assert len(starts) == 1, text
    problems = {}
    for line in lines[starts[0] + 1:]:
        if not line.startswith("  "):
            break
        path, reason = line.strip().split(": ", 1)
        problems[Path(path).name] = reason
    return problems


def trained(reader) -> set[str]:
    return {c.sample.item.path.name for c in reader.samples}


def assert_good_ones_train(reader, folder: Path, extra: set[str] = frozenset()):
    assert trained(reader) == {"shape_000.png", "shape_001.png"} | set(extra)
    for i in range(len(reader)):
        latents, text = reader.load(i)
        assert torch.isfinite(latents["latents"]).all() and text["text"].shape == (32, 32)


def caption(path: Path, text: str = "a test picture") -> Path:
    path.with_suffix(".txt").write_text(text)
    return path


# ------------------------------------------------------------------------------------------------


def test_empty_folder_is_an_error_naming_it(model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("a caption without its image")
    with pytest.raises(DataError) as info:
        prepare(model, dataset_toml(empty))
    lines = str(info.value).splitlines()
    assert lines[0] == f"{tmp_path / 'dataset.toml'}: no usable items: nothing is left to train on:"
    assert lines[1].startswith(f"  {empty}: no media files (.jpeg, .jpg, .png, .webp) or videos (")
    assert not (empty / "cache").exists()


def test_empty_folder_beside_a_good_one_is_listed_and_the_rest_train(model, folder, tmp_path):
    (tmp_path / "empty").mkdir()
    toml = dataset_toml(folder)
    toml.write_text(toml.read_text() + '\n[[directory]]\npath = "empty"\n')
    reader, text = prepare(model, toml)
    assert summary(text) == {"empty": "no media files (.jpeg, .jpg, .png, .webp) or videos (.mkv, .mov, .mp4, .webm) "
                                      "in this folder"}
    assert_good_ones_train(reader, folder)


def test_missing_caption_skip_lists_it(model, folder):
    Image.new("RGB", (64, 64), "red").save(folder / "uncaptioned.png")
    reader, text = prepare(model, dataset_toml(folder))  # "skip" is the default
    assert summary(text) == {"uncaptioned.png": "no caption file (uncaptioned.txt)"}
    assert_good_ones_train(reader, folder)


def test_missing_caption_empty_trains_it_uncaptioned(model, folder):
    Image.new("RGB", (64, 64), "red").save(folder / "uncaptioned.png")
    reader, text = prepare(model, dataset_toml(folder, 'missing_caption = "empty"'))
    assert "cannot be used" not in text
    assert "note: 1 item(s) have no caption file and train with an empty caption (missing_caption = \"empty\"): " \
           "uncaptioned.png" in text
    assert_good_ones_train(reader, folder, {"uncaptioned.png"})
    (sample,) = [c for c in reader.samples if c.sample.item.path.name == "uncaptioned.png"]
    assert sample.sample.item.caption == ""


def test_missing_caption_error_stops_listing_every_one(model, folder):
    for name in ("b.png", "a.png"):
        Image.new("RGB", (64, 64), "red").save(folder / name)
    toml = dataset_toml(folder, directory_extra='missing_caption = "error"')  # set per directory
    with pytest.raises(DataError) as info:
        prepare(model, toml)
    assert str(info.value).splitlines() == [
        f"{toml}: missing_caption = \"error\" and 2 file(s) have no caption file:",
        f"  {folder / 'a.png'}: no caption file (a.txt)",
        f"  {folder / 'b.png'}: no caption file (b.txt)",
        "write their captions (photo.png -> photo.txt, UTF-8), or set missing_caption to \"skip\" (leave them out) "
        "or \"empty\" (train them uncaptioned)"]
    assert not (folder / "cache").exists()  # stopped before any encoding


def test_caption_not_utf8(model, folder):
    Image.new("RGB", (64, 64)).save(folder / "latin1.png")
    (folder / "latin1.txt").write_bytes("un caf\u00e9".encode("latin-1"))
    reader, text = prepare(model, dataset_toml(folder))
    assert summary(text) == {"latin1.png": "caption latin1.txt is not UTF-8 text (byte 0xe9 at position 6)"}
    assert_good_ones_train(reader, folder)


def test_truncated_and_zero_byte_images(model, folder):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noise.save(folder / "cut.png")
    data = (folder / "cut.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])  # the header survives, the pixels do not
    caption(folder / "cut.png")
    caption(folder / "empty.png").write_bytes(b"")
    reader, text = prepare(model, dataset_toml(folder))
    problems = summary(text)  # one list: the scan's problem and the encoder's
    assert problems.keys() == {"cut.png", "empty.png"}
    assert problems["empty.png"] == "empty file (0 bytes)"
    assert problems["cut.png"].startswith("cannot read image: ") and "truncated" in problems["cut.png"]
    assert_good_ones_train(reader, folder)


def test_unreadable_video(model, folder):
    caption(folder / "clip.mp4").write_bytes(np.random.default_rng(1).bytes(2048))
    reader, text = prepare(model, dataset_toml(folder))
    problems = summary(text)
    assert list(problems) == ["clip.mp4"] and problems["clip.mp4"].startswith("cannot read video: ")
    assert_good_ones_train(reader, folder)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height pixels (an 8-bit RGB header) and holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_huge_image(model, folder):
    _png_header_only(caption(folder / "huge.png"), 100_000, 100_000)
    reader, text = prepare(model, dataset_toml(folder))
    problems = summary(text)
    assert list(problems) == ["huge.png"]
    assert problems["huge.png"].startswith("image is too large to open safely (Image size (10000000000 pixels) "
                                           "exceeds limit")
    assert_good_ones_train(reader, folder)


def test_one_pixel_image_trains_with_a_note(model, folder):
    Image.new("RGB", (1, 1), "blue").save(caption(folder / "dot.png"))
    reader, text = prepare(model, dataset_toml(folder))
    assert "cannot be used" not in text
    assert "note: 1 item(s) are less than half their bucket's size and are upscaled, so they train blurred: " \
           "dot.png (1x1 -> 64x64)" in text
    assert_good_ones_train(reader, folder, {"dot.png"})


def test_file_name_with_spaces_and_non_ascii_letters(model, folder):
    name = "Straße am Meer — été 海.png"
    Image.new("RGB", (64, 96), "green").save(caption(folder / name, "une photo d'été"))
    toml = dataset_toml(folder)
    reader, text = prepare(model, toml)
    assert "cannot be used" not in text
    assert_good_ones_train(reader, folder, {name})
    again, text = prepare(model, toml)  # the cache finds it again by its name and content
    assert "cache: 0 new entries encoded, 3 samples ready" in text
    assert trained(again) == trained(reader)


def test_symlink_loop_and_broken_link(model, folder):
    os.symlink("loop.png", folder / "loop.png")
    caption(folder / "loop.png")
    os.symlink("gone.png", folder / "dangling.png")
    caption(folder / "dangling.png")
    reader, text = prepare(model, dataset_toml(folder))
    assert summary(text) == {
        "dangling.png": "broken symbolic link (to gone.png, which does not exist)",
        "loop.png": "symbolic link loop (the link leads back to itself); remove or fix the link"}
    assert_good_ones_train(reader, folder)


def test_every_bad_file_in_one_summary(model, folder):
    Image.new("RGB", (64, 64)).save(folder / "uncaptioned.png")
    caption(folder / "empty.png").write_bytes(b"")
    caption(folder / "clip.mp4").write_bytes(b"\x00" * 512)
    os.symlink("loop.png", folder / "loop.png")
    _png_header_only(caption(folder / "huge.png"), 100_000, 100_000)
    reader, text = prepare(model, dataset_toml(folder))
    assert summary(text).keys() == {"uncaptioned.png", "empty.png", "clip.mp4", "loop.png", "huge.png"}
    assert "training dataset: 5 file(s) cannot be used and are left out; the other 2 train:" in text
    assert_good_ones_train(reader, folder)


def test_strict_stops_before_caching_listing_everything(model, folder):
    Image.new("RGB", (64, 64)).save(folder / "uncaptioned.png")
    caption(folder / "empty.png").write_bytes(b"")
    toml = dataset_toml(folder, "strict = true")
    with pytest.raises(DataError) as info:
        prepare(model, toml)
    assert str(info.value).splitlines() == [
        f"{toml}: strict = true and 2 file(s) cannot be used:",
        f"  {folder / 'empty.png'}: empty file (0 bytes)",
        f"  {folder / 'uncaptioned.png'}: no caption file (uncaptioned.txt)",
        "fix or remove them, or set strict = false to train on the rest"]
    assert not (folder / "cache").exists()


def test_strict_stops_after_caching_on_a_file_that_fails_to_encode_and_keeps_the_cache(model, folder):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noise.save(caption(folder / "cut.png"))
    data = (folder / "cut.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    toml = dataset_toml(folder, "strict = true")
    with pytest.raises(DataError) as info:
        prepare(model, toml)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{toml}: strict = true and 1 file(s) cannot be used:"
    assert lines[1].startswith(f"  {folder / 'cut.png'}: cannot read image: ") and "truncated" in lines[1]
    # What was encoded is kept: without strict, the next run encodes nothing again.
    reader, text = prepare(model, dataset_toml(folder))
    assert "cache: 0 new entries encoded, 2 samples ready" in text
    assert_good_ones_train(reader, folder)


# ------------------------------------------------------------------------------------------------
# As users launch it


HF_TOKEN = "hf_" + "Qw3rTy7uIoP1aSdFgH2jKlZx4cVbNm5Lk9Pq"
WANDB_KEY = "5f0e8a9c2b7d4e6f1a3c5b7d9e0f2a4c6b8d0e1f"
PASTED = "hf_" + "Xy9Wv8Ut7Sr6Qp5On4Ml3Kj2Ih1Gf0EdCbA9"


@pytest.mark.slow
def test_launch_lists_bad_files_once_trains_the_rest_and_keeps_secrets_out_of_the_run_folder(tmp_path, tiny_models,
                                                                                             folder):
    from conftest import launch, write_configs

    Image.new("RGB", (64, 64), "red").save(folder / "uncaptioned.png")
    caption(folder / "empty.png").write_bytes(b"")
    cfg = write_configs(tmp_path / "run", tiny_models / "flux", folder, max_steps=4, checkpoint_every_n_steps=2,
                        save_every_n_steps=2, eval_datasets=[{"name": "same", "config": "dataset.toml"}])
    train_text = cfg.read_text() + f"# token for the gated model: {PASTED}\n# hf_token = \"{PASTED}\"\n"
    cfg.write_text(train_text)
    dataset_file = cfg.parent / "dataset.toml"
    dataset_text = dataset_file.read_text() + f"# wandb {WANDB_KEY}\n"
    dataset_file.write_text(dataset_text)

    result = launch(cfg, env={"HF_TOKEN": HF_TOKEN, "WANDB_API_KEY": WANDB_KEY})

    assert result.returncode == 0, result.output[-4000:]
    out = result.output
    # One summary per dataset (the eval set is the training set here), listing both files.
    assert out.count("training dataset: 2 file(s) cannot be used and are left out; the other 2 train:") == 1
    assert f"  {folder / 'empty.png'}: empty file (0 bytes)\n  {folder / 'uncaptioned.png'}: no caption file " \
           f"(uncaptioned.txt)\n" in out
    assert f"warning: {cfg}: eval dataset 'same' ({dataset_file}) reads training folder(s) {folder}" in out
    assert f"warning: {cfg}: 2 token or key value(s) replaced by <redacted>" in out
    (run_dir,) = result.run_dirs()
    assert len(json.loads((run_dir / "losses.json").read_text())) == 4  # trained on the rest
    assert (run_dir / "adapters" / "final" / "pytorch_lora_weights.safetensors").is_file()

    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pt" for p in files) and any(p.suffix == ".safetensors" for p in files)
    for path in files:
        data = path.read_bytes()
        for secret in (HF_TOKEN, WANDB_KEY, PASTED):
            assert secret.encode() not in data, f"{secret[:6]}... in {path}"
    for secret in (HF_TOKEN, WANDB_KEY, PASTED):
        assert secret not in out
    # The copies lose the secrets and nothing else.
    assert (run_dir / "config" / "train.toml").read_text() == train_text.replace(
        f"# hf_token = \"{PASTED}\"", '# hf_token = "<redacted>"').replace(PASTED, "<redacted>")
    assert (run_dir / "config" / "dataset.toml").read_text() == dataset_text.replace(WANDB_KEY, "<redacted>")


@pytest.mark.slow
def test_launch_in_strict_mode_stops_with_the_list_and_no_traceback(tmp_path, tiny_models, folder):
    from conftest import launch, write_configs

    Image.new("RGB", (64, 64), "red").save(folder / "uncaptioned.png")
    cfg = write_configs(tmp_path / "run", tiny_models / "flux", folder, dataset={"strict": True})
    result = launch(cfg)
    assert result.returncode == 2, result.output[-4000:]
    assert "Traceback" not in result.output
    dataset_file = cfg.parent / "dataset.toml"
    assert f"error: {dataset_file}: strict = true and 1 file(s) cannot be used:\n" \
           f"  {folder / 'uncaptioned.png'}: no caption file (uncaptioned.txt)\n" \
           f"fix or remove them, or set strict = false to train on the rest\n" in result.stderr
    assert not (folder / "cache").exists() and not (cfg.parent / "runs").exists()
