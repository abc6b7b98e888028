"""The latent / text cache, in-process: what gets encoded when, and the TensorStore under it.

Everything runs as one process (world=1, rank=0, CPU) with no torch.distributed process group;
the `no_distributed` fixture makes every collective raise, so a world=1 code path that still
called one would fail here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from config.dataset_config import load_dataset_config
from data.prepare import prepare_dataset
from data.tensor_store import TensorStore
from models.flux import FluxConfig, FluxModel
from data import tensor_store
from utils.dist import Distributed

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_distributed(monkeypatch):
    """Any torch.distributed collective fails the test: world=1 must never need a process group."""

    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"torch.distributed.{name} called with world=1")
        return call

    for name in ("barrier", "broadcast", "broadcast_object_list", "gather_object", "all_gather_object",
                 "all_reduce", "gather", "all_gather"):
        monkeypatch.setattr(dist, name, forbidden(name))


class CountingFlux(FluxModel):
    """The real Flux model, counting the captions and images it is asked to encode."""

    def __init__(self, config):
        super().__init__(config)
        self.texts = 0
        self.latents = 0

    def encode_captions(self, captions):
        self.texts += len(captions)
        return super().encode_captions(captions)

    def encode_pixels(self, pixels):
        self.latents += pixels.shape[0]
        return super().encode_pixels(pixels)


@pytest.fixture
def model(tiny_models):
    return CountingFlux(FluxConfig(type="flux", diffusers_path=str(tiny_models / "flux"), dtype="float32",
                                   max_sequence_length=32))


def write_dataset_toml(data_dir: Path, resolutions=(64,)) -> Path:
    path = data_dir.parent / "dataset.toml"
    path.write_text(f"resolutions = {list(resolutions)}\nenable_ar_bucket = true\nnum_ar_buckets = 3\n\n"
                    f"[[directory]]\npath = \"{data_dir.name}\"\n")
    return path


def build(model: CountingFlux, dataset_toml: Path, regenerate=False, caching_batch_size=2):
    """One cache build as train.py does it; returns (reader, texts encoded, latents encoded)."""
    model.texts = model.latents = 0
    reader = prepare_dataset(load_dataset_config(dataset_toml), model, title="test", micro_batch_size=2,
                             caching_batch_size=caching_batch_size, regenerate=regenerate,
                             place=Distributed.alone(CPU), log=lambda *_: None)
    # The launcher's "N new entries encoded" is reader.encoded: it must count what was encoded.
    assert reader.encoded == model.texts + model.latents
    return reader, model.texts, model.latents


def tensors(reader) -> dict[str, tuple[dict, dict]]:
    """Every sample's (latent tensors, text tensors), by image file name."""
    return {c.sample.item.path.name: reader.load(i) for i, c in enumerate(reader.samples)}


def assert_same(a: dict, b: dict, names=None):
    names = names if names is not None else a.keys()
    for name in names:
        for part_a, part_b in zip(a[name], b[name]):
            assert part_a.keys() == part_b.keys()
            for k in part_a:
                assert part_a[k].dtype == part_b[k].dtype
                assert torch.equal(part_a[k], part_b[k]), (name, k)


def test_unchanged_dataset_reuses_everything(model, image_dataset):
    toml = write_dataset_toml(image_dataset)
    first, texts, latents = build(model, toml)
    assert (texts, latents) == (8, 8)
    assert len(first) == 8 and first.problems == []
    before = tensors(first)
    latent = before["shape_000.png"][0]["latents"]
    assert latent.shape == (16, 8, 8) and latent.dtype == torch.float32  # 64x64 image, 8x VAE
    assert before["shape_000.png"][1]["text"].shape == (32, 32)  # max_sequence_length x T5 width

    second, texts, latents = build(model, toml)
    assert (texts, latents) == (0, 0)
    assert len(second) == 8
    assert_same(before, tensors(second))


def test_changed_caption_reencodes_only_that_text(model, image_dataset):
    toml = write_dataset_toml(image_dataset)
    before = tensors(build(model, toml)[0])
    caption = image_dataset / "shape_002.txt"
    new_caption = "a photo of a cat sitting on a red chair"
    assert new_caption not in {p.read_text().strip() for p in image_dataset.glob("*.txt")}
    caption.write_text(new_caption + "\n")

    reader, texts, latents = build(model, toml)
    assert (texts, latents) == (1, 0)
    after = tensors(reader)
    assert not torch.equal(after["shape_002.png"][1]["text"], before["shape_002.png"][1]["text"])
    assert_same(before, after, [n for n in before if n != "shape_002.png"])
    assert torch.equal(after["shape_002.png"][0]["latents"], before["shape_002.png"][0]["latents"])


def test_changed_image_reencodes_only_that_latent(model, image_dataset):
    toml = write_dataset_toml(image_dataset)
    before = tensors(build(model, toml)[0])

    # A new modification time alone, same bytes: rehashed, but the content hash is unchanged.
    image = image_dataset / "shape_004.png"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert build(model, toml)[1:] == (0, 0)

    # New pixels, same size (so the same bucket): exactly that latent is encoded again.
    pixels = np.asarray(Image.open(image).convert("RGB")).copy()
    pixels[:16, :16] = 255 - pixels[:16, :16]
    Image.fromarray(pixels).save(image)
    reader, texts, latents = build(model, toml)
    assert (texts, latents) == (0, 1)
    after = tensors(reader)
    assert not torch.equal(after["shape_004.png"][0]["latents"], before["shape_004.png"][0]["latents"])
    assert_same(before, after, [n for n in before if n != "shape_004.png"])


def test_changed_resolution_reencodes_latents_not_text(model, image_dataset):
    toml = write_dataset_toml(image_dataset, resolutions=[64])
    before = tensors(build(model, toml)[0])
    write_dataset_toml(image_dataset, resolutions=[32])
    reader, texts, latents = build(model, toml)
    assert (texts, latents) == (0, 8)
    after = tensors(reader)
    assert after["shape_000.png"][0]["latents"].shape == (16, 4, 4)
    for name in before:
        assert torch.equal(after[name][1]["text"], before[name][1]["text"])


def test_regenerate_reencodes_everything(model, image_dataset):
    toml = write_dataset_toml(image_dataset)
    before = tensors(build(model, toml)[0])
    reader, texts, latents = build(model, toml, regenerate=True)
    assert (texts, latents) == (8, 8)
    assert reader.encoded == 16
    # The encoders are deterministic: a rebuilt cache holds the same tensors.
    assert_same(before, tensors(reader))


def test_truncated_image_is_reported_and_the_rest_cache(model, image_dataset):
    toml = write_dataset_toml(image_dataset)
    bad = image_dataset / "shape_005.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # the header survives, the pixel data does not

    # Batches of 4: the bad file's batch fails as a whole and is retried item by item.
    reader, texts, latents = build(model, toml, caching_batch_size=4)
    assert [path for path, _ in reader.problems] == [bad]
    assert "truncated" in reader.problems[0][1]
    assert latents == 7
    assert len(reader) == 7
    assert bad not in {c.sample.item.path for c in reader.samples}
    for name, (latent, text) in tensors(reader).items():
        assert latent["latents"].shape[0] == 16 and text["text"].shape == (32, 32), name


def test_same_caption_and_image_in_two_folders_are_cached_for_both(model, image_dataset):
    # Each folder has its own stores: an entry two folders share must be written to both, or the
    # second folder's copy is silently missing from the first run.
    other = image_dataset.parent / "other"
    other.mkdir()
    for name in ("shape_000.png", "shape_000.txt", "shape_001.png", "shape_001.txt"):
        (other / name).write_bytes((image_dataset / name).read_bytes())
    toml = image_dataset.parent / "dataset.toml"
    toml.write_text(f"resolutions = [64]\nnum_ar_buckets = 3\n\n[[directory]]\npath = \"{image_dataset.name}\"\n\n"
                    f"[[directory]]\npath = \"other\"\n")
    reader, texts, latents = build(model, toml)
    assert len(reader) == 10
    assert (texts, latents) == (10, 10)
    assert build(model, toml)[1:] == (0, 0)


# ------------------------------------------------------------------------------------ TensorStore


def test_bfloat16_round_trips_bit_exactly_at_two_bytes_per_element(tmp_path):
    values = torch.randn(100, 1000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-40, 3.0e38],
                           dtype=torch.bfloat16)
    TensorStore(tmp_path / "store").write_part([("k", {"values": values, "special": special})])

    store = TensorStore(tmp_path / "store")  # read back from disk
    got = store.get("k")
    for name, original in (("values", values), ("special", special)):
        assert got[name].dtype == torch.bfloat16 and got[name].shape == original.shape
        # Compare the bits, so NaN and -0.0 count too.
        assert torch.equal(got[name].view(torch.int16), original.view(torch.int16)), name
    record = store.parts[0][0]
    assert len(record["values"]) == 2 * values.numel()
    on_disk = sum(f.stat().st_size for f in (tmp_path / "store").rglob("*.arrow"))
    assert 2 * values.numel() <= on_disk < 3 * values.numel()  # float32 would need 4 bytes each


def test_interrupted_write_is_ignored_then_cleaned_up(tmp_path, monkeypatch):
    root = tmp_path / "store"
    one = {"x": torch.arange(4, dtype=torch.float32)}
    TensorStore(root).write_part([("a", one)])

    class Killed(Exception):
        pass

    real_replace = os.replace

    def killed_before_rename(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr(tensor_store.os, "replace", killed_before_rename)
    # A kill -9 runs no clean-up: the temporary part stays behind.
    monkeypatch.setattr(tensor_store, "remove_quietly", lambda path: None)
    with pytest.raises(Killed):
        TensorStore(root).write_part([("b", {"x": torch.ones(4)})])
    monkeypatch.undo()
    leftovers = list(root.glob(".tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "state.json").is_file()  # a complete-looking part

    store = TensorStore(root)
    assert "a" in store and "b" not in store and len(store) == 1
    store.write_part([("c", {"x": torch.zeros(4)})])
    assert list(root.glob(".tmp-*")) == []
    store = TensorStore(root)
    assert sorted(store.index) == ["a", "c"]
    assert torch.equal(store.get("a")["x"], one["x"])


def _part_bytes(root: Path) -> list[bytes]:
    """The Arrow data of every part of the cache under `root`, in part order (the part names end
    in a random suffix, so the files are compared, not the names)."""
    parts = sorted(p for p in root.rglob("*.arrow"))
    return [p.read_bytes() for p in sorted(parts, key=lambda p: (p.parent.parent.name, p.parent.name[:10]))]


def test_caching_workers_write_the_same_cache(model, image_dataset, monkeypatch):
    # Reading the files in worker processes must not change the cache: same batches, same order,
    # byte for byte, a bad file listed the same way.
    from data import cache as cache_module

    bad = image_dataset / "shape_005.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # the header survives, the pixel data does not
    toml = write_dataset_toml(image_dataset)
    reader, _, latents = build(model, toml, caching_batch_size=2)
    alone = _part_bytes(image_dataset / "cache")
    assert latents == 7 and [p for p, _ in reader.problems] == [bad]

    pids = image_dataset.parent / "pids"
    real_load = cache_module.load_media

    def load_and_note_the_process(batch):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real_load(batch)

    monkeypatch.setattr(cache_module, "load_media", load_and_note_the_process)
    model.texts = model.latents = 0
    with_workers = prepare_dataset(load_dataset_config(toml), model, title="test", micro_batch_size=2,
                                   caching_batch_size=2, regenerate=True, place=Distributed.alone(CPU),
                                   log=lambda *_: None, caching_workers=2)
    assert model.latents == 7 and with_workers.problems == reader.problems
    readers = {int(line) for line in pids.read_text().split()}
    assert readers and os.getpid() not in readers and len(readers) <= 2
    assert _part_bytes(image_dataset / "cache") == alone
    assert len(alone) >= 2  # text and latents


def test_default_caching_workers_share_the_cores(monkeypatch):
    from data import cache as cache_module

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(cache_module, "available_cores", lambda: 64)
    monkeypatch.setenv("LOCAL_SIZE", "4")
    assert cache_module.default_caching_workers() == 8  # at most 8
    monkeypatch.setenv("LOCAL_SIZE", "16")
    assert cache_module.default_caching_workers() == 4
    monkeypatch.setattr(cache_module, "available_cores", lambda: 2)
    assert cache_module.default_caching_workers() == 0  # fewer cores than processes: they read their own files
