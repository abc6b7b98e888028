"""Video data: decoding clips, frame buckets, clip modes, scanning mixed datasets, caching clips."""

import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config.dataset_config import BUCKET_DEFAULTS, BucketSettings, Dataset, ResolvedDirectory, load_dataset_config
from data import media
from data.buckets import Bucket, assign_buckets, check_frame_buckets, clip_starts, format_bucket_table, frame_bucket_for
from data.cache import DatasetCache
from data.media import load_sample_pixels, video_info
from data.scan import Item, scan_dataset, scan_directory
from models.base import ModelRecipe
from tools.make_demo_dataset import COLOURS, make_demo_dataset, make_demo_videos
from utils.dist import Distributed
from utils.errors import ConfigError, MediaError


def _settings(**overrides) -> BucketSettings:
    return BUCKET_DEFAULTS.overridden_by(BucketSettings(**overrides))


def _video_item(name: str, frames: int, directory_index: int = 0, size=(64, 64)) -> Item:
    return Item(Path(f"/data/{name}.mp4"), name, size[0], size[1], directory_index, frames)


def _image_item(name: str, directory_index: int = 0) -> Item:
    return Item(Path(f"/data/{name}.png"), name, 64, 64, directory_index)


def _colour(name: str) -> torch.Tensor:
    return torch.tensor(COLOURS[name], dtype=torch.float32) / 127.5 - 1


def _caption_colours(caption: str) -> tuple[str, str, str]:
    """(foreground, direction, background) from 'a red circle moving left on a blue background'."""
    words = caption.split()
    return words[1], words[4], words[-2]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Two generated clips: clip_000 has 9 frames, clip_001 has 17 (keyframe every 4 frames)."""
    return make_demo_videos(tmp_path_factory.mktemp("videos"), count=2, seed=3, frames=(9, 17), size=(64, 48))


def _write_video(path: Path, frames: int, codec: str = "libx264", rotation: int = 0) -> Path:
    """A 32x16 clip whose left half is red and right half blue; frame i has brightness marker i."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for _ in range(frames):
            pixels = np.zeros((16, 32, 3), np.uint8)
            pixels[:, :16] = (255, 0, 0)
            pixels[:, 16:] = (0, 0, 255)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))
    return path


# ----------------------------------------------------------------------------------------------
# Decoding


def test_generated_mp4_decodes_with_its_size_frames_and_colours(videos):
    short, long = videos / "clip_000.mp4", videos / "clip_001.mp4"
    assert video_info(short) == (64, 48, 9, 24.0)
    assert video_info(long).frames == 17

    pixels = load_sample_pixels(long, 32, 24, frames=17)
    assert pixels.shape == (3, 17, 24, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    foreground, direction, background = _caption_colours(long.with_suffix(".txt").read_text())
    # The shape covers a ninth of the frame at most: the median pixel is the background.
    first = pixels[:, 0].reshape(3, -1).median(dim=1).values
    assert torch.allclose(first, _colour(background), atol=0.08)

    # The shape crosses the frame in the captioned direction, so frames come out in order.
    def shape_x(frame):
        near = (frame - _colour(foreground).view(3, 1, 1)).abs().amax(dim=0) < 0.2
        return near.nonzero()[:, 1].float().mean().item()
    xs = [shape_x(pixels[:, f]) for f in range(17)]
    steps = np.diff(xs) if direction == "right" else -np.diff(xs)
    assert (steps >= 0).all() and xs[0] != xs[-1]


def test_clip_from_the_middle_seeks_and_matches_the_full_decode(videos, monkeypatch):
    path = videos / "clip_001.mp4"
    full = load_sample_pixels(path, 64, 48, frames=17)
    opened = []
    real_open = media._open_video
    monkeypatch.setattr(media, "_open_video", lambda p: opened.append(p) or real_open(p))

    clip = load_sample_pixels(path, 64, 48, frames=5, clip_start=10)

    assert clip.shape == (3, 5, 48, 64)
    assert torch.equal(clip, full[:, 10:15])
    # Opened once: the seek found the clip, no decode from the start was needed.
    assert len(opened) == 1


def test_clip_past_the_end_is_a_media_error(videos):
    with pytest.raises(MediaError, match=r"clip_001.mp4: video has 17 frames, too few for a 5-frame clip from frame 15"):
        load_sample_pixels(videos / "clip_001.mp4", 64, 48, frames=5, clip_start=15)
    with pytest.raises(ValueError, match="an image has one frame"):
        load_sample_pixels(videos / "missing.png", 8, 8, frames=9)


def test_matroska_without_a_frame_count_is_counted_by_decoding(tmp_path):
    path = _write_video(tmp_path / "clip.mkv", frames=7)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # the container does not say
    assert video_info(path) == (32, 16, 7, 30.0)
    assert load_sample_pixels(path, 16, 16, frames=3, clip_start=4).shape == (3, 3, 16, 16)


def test_rotation_metadata_turns_size_and_pixels_upright(tmp_path):
    # Stored 32x16, red left and blue right; a 90 degree counter-clockwise display rotation
    # shows it 16x32 with blue on top.
    path = _write_video(tmp_path / "phone.mp4", frames=3, rotation=90)
    assert video_info(path)[:2] == (16, 32)
    pixels = load_sample_pixels(path, 16, 32, frames=2, clip_start=1)
    assert pixels.shape == (3, 2, 32, 16)
    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
    assert torch.allclose(pixels[:, 0, 4, 8], blue, atol=0.1)
    assert torch.allclose(pixels[:, 1, 28, 8], red, atol=0.1)


# ----------------------------------------------------------------------------------------------
# Clips and frame buckets


def test_clip_starts_for_each_mode():
    assert clip_starts(17, 9, "single_beginning") == [0]
    assert clip_starts(17, 9, "single_middle") == [4]
    assert clip_starts(18, 9, "single_middle") == [4]
    assert clip_starts(9, 9, "single_middle") == [0]
    assert clip_starts(17, 9, "multiple_overlapping") == [0, 8]
    assert clip_starts(66, 33, "multiple_overlapping") == [0, 33]  # fits exactly: no overlap
    assert clip_starts(100, 33, "multiple_overlapping") == [0, 22, 44, 67]
    assert clip_starts(33, 33, "multiple_overlapping") == [0]
    with pytest.raises(ValueError, match="does not fit"):
        clip_starts(8, 9, "single_beginning")
    with pytest.raises(ValueError, match="unknown video_clip_mode"):
        clip_starts(9, 9, "random")


def test_multiple_overlapping_clips_cover_every_frame_with_the_fewest_clips():
    for clip in (1, 2, 5, 9, 17, 33):
        for length in range(clip, 120):
            starts = clip_starts(length, clip, "multiple_overlapping")
            assert len(starts) == math.ceil(length / clip)
            assert starts[0] == 0 and starts[-1] + clip == length
            assert all(0 < b - a <= clip for a, b in zip(starts, starts[1:])), (length, clip, starts)


def test_frame_bucket_is_the_largest_that_fits():
    buckets = [65, 1, 33]
    assert frame_bucket_for(100, buckets) == 65
    assert frame_bucket_for(65, buckets) == 65
    assert frame_bucket_for(64, buckets) == 33
    assert frame_bucket_for(20, buckets) == 1
    assert frame_bucket_for(1, buckets) == 1
    assert frame_bucket_for(20, [33, 65]) is None
    assert frame_bucket_for(1, [33]) is None


def test_assign_cuts_clips_per_directory_mode_and_reports_too_short(tmp_path):
    dataset = Dataset(tmp_path / "d.toml", [
        ResolvedDirectory(tmp_path / "a", _settings(resolutions=[64], frame_buckets=[1, 9, 17],
                                                    video_clip_mode="multiple_overlapping")),
        ResolvedDirectory(tmp_path / "b", _settings(resolutions=[64], frame_buckets=[9, 17],
                                                    video_clip_mode="single_middle")),
    ])
    items = [_video_item("long", 40), _video_item("short", 5), _image_item("still"),
             _video_item("mid", 12, 1), _video_item("tiny", 5, 1), _image_item("photo", 1)]
    too_short = []

    samples = assign_buckets(items, dataset, 16, too_short)

    placed = [(s.item.caption, s.bucket.frames, s.clip_start) for s in samples]
    assert placed == [
        ("long", 17, 0), ("long", 17, 11), ("long", 17, 23),  # 3 clips cover 40 frames
        ("short", 1, 0),                                       # only the 1-frame bucket fits
        ("still", 1, 0),
        ("mid", 9, 1),                                         # centred: (12 - 9) // 2
    ]
    assert all(s.bucket.width == 64 and s.bucket.height == 64 for s in samples)
    assert [path.name for path, _ in too_short] == ["tiny.mp4", "photo.png"]
    assert too_short[0][1].startswith("video has 5 frame(s), fewer than the smallest frame bucket (9)")
    assert "has no 1" in too_short[1][1]

    table = format_bucket_table(samples, micro_batch_size=2, too_short=too_short)
    lines = table.splitlines()
    assert lines[0].split() == ["resolution", "bucket", "aspect", "frames", "items", "clips", "repeats",
                                "samples", "batches", "padded"]
    rows = {line.split()[3]: line.split() for line in lines[2:] if line and line[0].isdigit()}
    assert rows["17"][4:6] == ["1", "3"]       # one video, three clips
    assert rows["1"][4:6] == ["2", "2"]        # 'short' (first frame) and 'still'
    assert rows["9"][4:6] == ["1", "1"]
    assert "total: 4 items (3 videos), 6 clips of 4 item-resolution pairs in 3 buckets" in table
    assert "multiple_overlapping cut 1 video(s) into several clips" in table
    assert "note: 1 video(s) are shorter than every frame bucket above 1" in table and "(short.mp4)" in table
    assert "note: 2 file(s) are shorter than every frame bucket of their directory and are skipped " \
           "(tiny.mp4, photo.png)" in table


def test_all_items_too_short_still_reports_them(tmp_path):
    dataset = Dataset(tmp_path / "d.toml", [ResolvedDirectory(tmp_path, _settings(frame_buckets=[33]))])
    too_short = []
    assert assign_buckets([_video_item("v", 20)], dataset, 16, too_short) == []
    table = format_bucket_table([], 1, too_short)
    assert table.startswith("no samples") and "1 file(s) are shorter than every frame bucket" in table


def test_videos_in_an_image_only_dataset_train_on_their_first_frame(tmp_path):
    # The default frame_buckets [1]: a video gives one sample, its first frame, and a note.
    dataset = Dataset(tmp_path / "d.toml", [ResolvedDirectory(tmp_path, _settings(resolutions=[64]))])
    samples = assign_buckets([_video_item("v", 30), _image_item("i")], dataset, 16)
    assert [(s.bucket, s.clip_start) for s in samples] == [(Bucket(64, 64, 1), 0)] * 2
    table = format_bucket_table(samples, 2)
    assert "clips" not in table.splitlines()[0]
    assert "note: 1 video(s) are shorter than every frame bucket above 1" in table


# ----------------------------------------------------------------------------------------------
# Scanning


def test_mixed_image_and_video_dataset_scans_and_buckets(tmp_path, videos):
    folder = make_demo_dataset(tmp_path / "mixed", count=3, seed=0)
    for video in sorted(videos.glob("clip_*")):
        (folder / video.name).write_bytes(video.read_bytes())
    config = tmp_path / "dataset.toml"
    config.write_text('resolutions = [64]\nnum_ar_buckets = 1\nframe_buckets = [1, 9]\n'
                      '[[directory]]\npath = "mixed"\nvideo_clip_mode = "multiple_overlapping"\n')
    dataset = load_dataset_config(config)

    scan = scan_dataset(dataset)

    assert scan.problems == []
    assert [(i.path.name, i.frames) for i in scan.items] == [
        ("clip_000.mp4", 9), ("clip_001.mp4", 17), ("shape_000.png", 1), ("shape_001.png", 1), ("shape_002.png", 1)]
    assert scan.items[1].caption.split()[3] == "moving"
    samples = assign_buckets(scan.items, dataset, 16)
    assert sorted((s.item.path.name, s.bucket.frames, s.clip_start) for s in samples) == [
        ("clip_000.mp4", 9, 0), ("clip_001.mp4", 9, 0), ("clip_001.mp4", 9, 8),
        ("shape_000.png", 1, 0), ("shape_001.png", 1, 0), ("shape_002.png", 1, 0)]
    table = format_bucket_table(samples, 2)
    assert "total: 5 items (2 videos), 6 clips of 5 item-resolution pairs" in table


def test_undecodable_videos_are_reported_by_name_and_the_rest_scan(tmp_path, videos):
    (tmp_path / "good.mp4").write_bytes((videos / "clip_000.mp4").read_bytes())
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.webm").write_text("not a video at all")
    for stem in ("good", "noise", "empty", "text"):
        (tmp_path / f"{stem}.txt").write_text(stem)

    result = scan_directory(ResolvedDirectory(tmp_path, BUCKET_DEFAULTS), 0)

    assert [(i.path.name, i.frames) for i in result.items] == [("good.mp4", 9)]
    problems = {path.name: reason for path, reason in result.problems}
    assert problems["empty.mp4"] == "empty file (0 bytes)"
    assert problems["noise.mp4"].startswith("cannot read video: ")
    assert problems["text.webm"].startswith("cannot read video: ")
    for name in ("noise.mp4", "text.webm"):
        with pytest.raises(MediaError, match=name):
            load_sample_pixels(tmp_path / name, 16, 16, frames=1)


# ----------------------------------------------------------------------------------------------
# Config checks


def _dataset_file(tmp_path: Path, text: str) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "dataset.toml"
    path.write_text(text)
    return path


def test_check_frame_buckets_names_file_key_and_nearest_counts(tmp_path):
    path = _dataset_file(tmp_path, 'frame_buckets = [1, 32]\n[[directory]]\npath = "data"\n')
    with pytest.raises(ConfigError) as error:
        check_frame_buckets(load_dataset_config(path), 8, "ltx-video")
    assert str(error.value) == \
        f"{path.resolve()}: 'frame_buckets[1]' is 32: ltx-video takes 8k+1 frames (nearest: 25 or 33)"

    path = _dataset_file(tmp_path, 'frame_buckets = [1, 33]\n[[directory]]\npath = "data"\n'
                                   '[[directory]]\npath = "data"\nframe_buckets = [1, 35]\n')
    dataset = load_dataset_config(path)
    with pytest.raises(ConfigError, match=r"'directory\[1\]\.frame_buckets\[1\]' is 35: hunyuan-video takes "
                                          r"4k\+1 frames \(nearest: 33 or 37\)"):
        check_frame_buckets(dataset, 4, "hunyuan-video")
    with pytest.raises(ConfigError, match=r"'frame_buckets\[1\]' is 33: flux trains on images only"):
        check_frame_buckets(dataset, 0, "flux")


def test_check_frame_buckets_accepts_valid_lists_and_the_default(tmp_path):
    path = _dataset_file(tmp_path, 'frame_buckets = [1, 9, 17]\n[[directory]]\npath = "data"\n')
    check_frame_buckets(load_dataset_config(path), 8, "ltx-video")
    check_frame_buckets(load_dataset_config(path), 4, "hunyuan-video")
    default = _dataset_file(tmp_path, '[[directory]]\npath = "data"\n')
    check_frame_buckets(load_dataset_config(default), 0, "flux")  # [1]: every model takes it
    built = Dataset(tmp_path / "made.toml", [ResolvedDirectory(tmp_path, _settings(frame_buckets=[1, 8]))])
    with pytest.raises(ConfigError, match=r"made.toml: 'directory\[0\]\.frame_buckets\[1\]' is 8"):
        check_frame_buckets(built, 8, "ltx-video")


def test_model_check_dataset_uses_frame_multiple(tmp_path):
    class Video(ModelRecipe):
        name = "ltx-video"
        frame_multiple = 8

    path = _dataset_file(tmp_path, 'resolutions = [64]\nframe_buckets = [1, 33, 40]\n[[directory]]\npath = "data"\n')
    with pytest.raises(ConfigError, match=r"'frame_buckets\[2\]' is 40: ltx-video takes 8k\+1 frames"):
        Video.check_dataset(load_dataset_config(path))
    assert ModelRecipe.frame_multiple == 0


@pytest.mark.parametrize("text, message", [
    ("frame_buckets = []", r"'frame_buckets' must list at least one frame count"),
    ("frame_buckets = [1, 0]", r"'frame_buckets\[1\]' must be at least 1, got 0"),
    ("frame_buckets = [9, 1, 9]", r"'frame_buckets\[2\]' repeats 9"),
    ('video_clip_mode = "random"', r"'video_clip_mode' must be 'single_beginning' \| 'single_middle' \| "
                                   r"'multiple_overlapping', got 'random'"),
])
def test_frame_keys_are_validated_when_loading(tmp_path, text, message):
    path = _dataset_file(tmp_path, f'{text}\n[[directory]]\npath = "data"\n')
    with pytest.raises(ConfigError, match=message):
        load_dataset_config(path)


def test_directory_overrides_frame_keys(tmp_path):
    path = _dataset_file(tmp_path, 'frame_buckets = [1, 9]\n[[directory]]\npath = "data"\n'
                                   '[[directory]]\npath = "data"\nframe_buckets = [17]\n'
                                   'video_clip_mode = "single_middle"\n')
    first, second = load_dataset_config(path).directories
    assert (first.settings.frame_buckets, first.settings.video_clip_mode) == ([1, 9], "single_beginning")
    assert (second.settings.frame_buckets, second.settings.video_clip_mode) == ([17], "single_middle")


# ----------------------------------------------------------------------------------------------
# Cache


class PooledVideoModel:
    """Just what DatasetCache uses: 'latents' are pixels average-pooled 8x8 per frame."""

    name = "pooled-video"

    def __init__(self):
        self.encoded_shapes = []

    def latent_cache_signature(self):
        return "pool8"

    def text_cache_signature(self):
        return "length"

    def load_text_encoders(self, device):
        pass

    def load_vae(self, device):
        pass

    def free_encoders(self):
        pass

    def encode_captions(self, captions):
        return [{"length": torch.tensor([float(len(c))])} for c in captions]

    def encode_pixels(self, pixels):
        assert pixels.dim() == 5  # (batch, 3, frames, height, width)
        self.encoded_shapes.append(tuple(pixels.shape))
        pooled = F.avg_pool3d(pixels, kernel_size=(1, 8, 8))
        return [{"latents": p} for p in pooled]


def test_cache_has_one_entry_per_clip_keyed_by_clip_start(tmp_path, videos):
    folder = make_demo_dataset(tmp_path / "data", count=1, seed=1)
    video = folder / "clip.mp4"
    video.write_bytes((videos / "clip_001.mp4").read_bytes())  # 17 frames, 64x48
    (folder / "clip.txt").write_text("a moving shape")
    dataset = Dataset(tmp_path / "d.toml", [ResolvedDirectory(folder, _settings(
        # A pair is an area: one aspect-ratio bucket at the pair's own ratio gives exactly 64x48.
        resolutions=[(64, 48)], min_ar=64 / 48, max_ar=64 / 48, num_ar_buckets=1, frame_buckets=[1, 9],
        video_clip_mode="multiple_overlapping"))])
    samples = assign_buckets(scan_dataset(dataset).items, dataset, 16)
    model = PooledVideoModel()

    reader = DatasetCache(model, samples).build(Distributed.alone(), batch_size=4)

    assert reader.problems == [] and reader.encoded == 3 + 2  # latents: 2 clips + 1 image; texts: 2
    clips = [c for c in reader.samples if c.sample.item.path == video]
    assert [c.sample.clip_start for c in clips] == [0, 8]
    assert clips[0].latent_key != clips[1].latent_key
    for index, c in enumerate(reader.samples):
        latents = reader.load(index)[0]["latents"]
        frames = c.sample.bucket.frames
        assert latents.shape == (3, frames, 6, 8)
        expected = F.avg_pool3d(load_sample_pixels(c.sample.item.path, 64, 48, frames, c.sample.clip_start),
                                kernel_size=(1, 8, 8))
        assert torch.allclose(latents, expected)
    # Same-shape batches only: the two 9-frame clips together, the image alone.
    assert sorted(model.encoded_shapes) == [(1, 3, 1, 48, 64), (2, 3, 9, 48, 64)]

    again = DatasetCache(model, samples).build(Distributed.alone(), batch_size=4)
    assert again.encoded == 0 and len(again) == 3


def test_video_that_fails_to_decode_at_cache_time_is_listed_and_skipped(tmp_path, videos):
    folder = make_demo_dataset(tmp_path / "data", count=1, seed=1)
    video = folder / "clip.mp4"
    video.write_bytes((videos / "clip_000.mp4").read_bytes())
    (folder / "clip.txt").write_text("a moving shape")
    dataset = Dataset(tmp_path / "d.toml", [ResolvedDirectory(folder, _settings(resolutions=[64],
                                                                                frame_buckets=[1, 9]))])
    samples = assign_buckets(scan_dataset(dataset).items, dataset, 16)
    video.write_bytes(b"\x00garbage" * 100)  # broken after the scan, before caching

    reader = DatasetCache(PooledVideoModel(), samples).build(Distributed.alone(), batch_size=2)

    assert [(path, "cannot read video" in reason) for path, reason in reader.problems] == [(video, True)]
    assert [c.sample.item.path.suffix for c in reader.samples] == [".png"]
