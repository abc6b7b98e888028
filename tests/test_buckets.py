"""Bucket shapes, resolution checks, bucket assignment, batch planning and the bucket table."""

import math
from pathlib import Path

import pytest

from config.dataset_config import BUCKET_DEFAULTS, BucketSettings, Dataset, ResolvedDirectory, load_dataset_config
from data.buckets import (Bucket, Sample, assign_buckets, bucket_shapes, check_resolutions, format_bucket_table,
                          nearest_bucket, plan_batches)
from data.scan import Item
from utils.errors import ConfigError


def _settings(**overrides) -> BucketSettings:
    return BUCKET_DEFAULTS.overridden_by(BucketSettings(**overrides))


def _item(name: str, width: int, height: int, directory_index: int = 0) -> Item:
    return Item(Path(f"/data/{name}.png"), name, width, height, directory_index)


def test_bucket_label_aspect_and_order():
    bucket = Bucket(768, 512)
    assert bucket.label == "768x512x1"
    assert bucket.aspect == 1.5
    assert sorted([Bucket(512, 768), Bucket(512, 512, 2), Bucket(512, 512)]) == \
        [Bucket(512, 512), Bucket(512, 512, 2), Bucket(512, 768)]


def test_default_shapes_are_multiples_near_the_area_and_in_range():
    shapes = bucket_shapes(_settings(resolutions=[512]), size_multiple=16)
    buckets = shapes[512]
    assert [(b.width, b.height) for b in buckets] == [
        (368, 720), (400, 640), (464, 576), (512, 512), (576, 464), (640, 400), (720, 368)]
    for bucket in buckets:
        assert bucket.width % 16 == 0 and bucket.height % 16 == 0
        assert abs(bucket.width * bucket.height / 512**2 - 1) < 0.05
        assert 0.5 / 1.05 <= bucket.aspect <= 2.0 * 1.05
    aspects = [b.aspect for b in buckets]
    assert aspects == sorted(aspects)
    # Evenly spaced in log space: neighbouring ratios differ by about 2 ** (1/3).
    steps = [math.log(b / a) for a, b in zip(aspects, aspects[1:])]
    assert all(abs(step - math.log(2) / 3) < 0.06 for step in steps)


def test_single_bucket_is_square_or_the_geometric_mean():
    assert bucket_shapes(_settings(resolutions=[256], num_ar_buckets=1), 16) == {256: [Bucket(256, 256)]}
    (wide,) = bucket_shapes(_settings(resolutions=[256], num_ar_buckets=1, min_ar=1.5, max_ar=2.0), 16)[256]
    assert abs(wide.aspect - math.sqrt(3.0)) < 0.1
    assert (wide.width, wide.height) == (336, 192)


def test_a_pair_is_an_area_as_in_diffusion_pipe():
    # Without AR buckets: one square of the pair's area (1280 x 720 = 960 x 960), rounded.
    shapes = bucket_shapes(_settings(resolutions=[512, (1280, 720), (768, 512)], enable_ar_bucket=False), 16)
    assert shapes == {512: [Bucket(512, 512)], (1280, 720): [Bucket(960, 960)], (768, 512): [Bucket(624, 624)]}
    # With AR buckets: the same shapes as the square resolution of that area.
    with_ar = bucket_shapes(_settings(resolutions=[(1024, 256), 512]), 16)
    assert with_ar[(1024, 256)] == with_ar[512] and len(with_ar[512]) == 7


def test_small_resolution_rounds_to_at_least_the_multiple_without_duplicates():
    buckets = bucket_shapes(_settings(resolutions=[16], num_ar_buckets=9, min_ar=0.25, max_ar=4.0), 16)[16]
    assert buckets == [Bucket(16, 32), Bucket(16, 16), Bucket(32, 16)]


def test_nearest_bucket_is_nearest_in_log_space():
    buckets = [Bucket(100, 200), Bucket(200, 100)]
    # 1.0 is equally far from 0.5 and 2.0 in log space (but not linearly); the first one wins.
    assert nearest_bucket(1.0, buckets) == Bucket(100, 200)
    assert nearest_bucket(1.1, buckets) == Bucket(200, 100)


def test_assign_picks_nearest_ar_per_resolution_and_counts_outside_range(tmp_path):
    dataset = Dataset(tmp_path / "dataset.toml", [
        ResolvedDirectory(tmp_path / "a", _settings(resolutions=[512, 256], num_repeats=3)),
        ResolvedDirectory(tmp_path / "b", _settings(resolutions=[(768, 512)], num_repeats=1)),
    ])
    items = [_item("wide", 300, 200), _item("square", 100, 100), _item("strip", 1000, 100),
             _item("tall", 200, 300, directory_index=1)]

    samples = assign_buckets(items, dataset, size_multiple=16)

    placed = [(s.item.caption, s.resolution, (s.bucket.width, s.bucket.height), s.repeats, s.outside_ar_range)
              for s in samples]
    assert placed == [
        ("wide", 512, (640, 400), 3, False),   # 1.5 lies between 1.26 and 1.59; nearer 1.59
        ("wide", 256, (320, 208), 3, False),
        ("square", 512, (512, 512), 3, False),
        ("square", 256, (256, 256), 3, False),
        ("strip", 512, (720, 368), 3, True),   # aspect 10: widest bucket, cropped more
        ("strip", 256, (368, 176), 3, True),
        ("tall", (768, 512), (496, 784), 1, False),  # a pair is an area: the tall bucket of 768 x 512 pixels
    ]


def _write_dataset(tmp_path: Path, text: str) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    path = tmp_path / "dataset.toml"
    path.write_text(text)
    return path


def test_check_resolutions_names_dataset_level_key(tmp_path):
    path = _write_dataset(tmp_path, 'resolutions = [512, 500]\n[[directory]]\npath = "images"\n')
    dataset = load_dataset_config(path)
    with pytest.raises(ConfigError) as error:
        check_resolutions(dataset, 16, "flux")
    message = str(error.value)
    assert message.startswith(f"{path.resolve()}: 'resolutions[1]' is 500")
    assert "flux takes multiples of 16" in message
    assert "496 or 512" in message


def test_check_resolutions_names_directory_key(tmp_path):
    path = _write_dataset(tmp_path, 'resolutions = [512]\n'
                                    '[[directory]]\npath = "images"\n'
                                    '[[directory]]\npath = "images"\nresolutions = [[768, 520], 250]\n')
    with pytest.raises(ConfigError) as error:
        check_resolutions(load_dataset_config(path), 16, "flux")
    message = str(error.value)
    # The pair is an area (its sides need not be multiples); the side 250 must be one.
    assert message.startswith(f"{path.resolve()}: 'directory[1].resolutions[1]' is 250")


def test_check_resolutions_accepts_multiples_and_datasets_built_in_code(tmp_path):
    path = _write_dataset(tmp_path, 'resolutions = [256, [768, 520]]\n[[directory]]\npath = "images"\n')
    check_resolutions(load_dataset_config(path), 16, "flux")  # sides multiples of 16, a pair any area: no error

    built = Dataset(tmp_path / "made.toml", [ResolvedDirectory(tmp_path, _settings(resolutions=[512, 1000]))])
    expected = r"made.toml: 'directory\[0\].resolutions\[1\]' is 1000.*sdxl takes multiples of 64"
    with pytest.raises(ConfigError, match=expected):
        check_resolutions(built, 64, "sdxl")


def test_plan_batches_pads_small_buckets_instead_of_dropping():
    small, big = Bucket(512, 512), Bucket(640, 400)
    samples = [Sample(_item(f"s{i}", 1, 1), small, repeats=1) for i in range(3)]
    samples += [Sample(_item(f"b{i}", 3, 2), big, repeats=2) for i in range(5)]

    plans = plan_batches(samples, micro_batch_size=4)

    assert list(plans) == [small, big]
    assert (plans[small].items, plans[small].repeated_items, plans[small].batches, plans[small].padding) == (3, 3, 1, 1)
    assert (plans[big].items, plans[big].repeated_items, plans[big].batches, plans[big].padding) == (5, 10, 3, 2)
    with pytest.raises(ValueError):
        plan_batches(samples, 0)


def test_bucket_table_shows_counts_totals_and_notes(tmp_path):
    dataset = Dataset(tmp_path / "d.toml", [ResolvedDirectory(tmp_path, _settings(resolutions=[512], num_repeats=2))])
    items = [_item(f"w{i}", 300, 200) for i in range(3)] + [_item("sq", 50, 50), _item("strip", 1000, 100)]
    table = format_bucket_table(assign_buckets(items, dataset, 16), micro_batch_size=4)
    lines = table.splitlines()

    header = lines[0].split()
    assert header == ["resolution", "bucket", "aspect", "frames", "items", "repeats", "samples", "batches", "padded"]
    rows = {line.split()[1]: line.split() for line in lines[2:] if line and line[0].isdigit()}
    assert rows["640x400"] == ["512", "640x400", "1.60", "1", "3", "2", "6", "2", "2"]
    assert rows["512x512"] == ["512", "512x512", "1.00", "1", "1", "2", "2", "1", "2"]
    assert rows["720x368"] == ["512", "720x368", "1.96", "1", "1", "2", "2", "1", "2"]
    assert "total: 5 items, 5 item-resolution pairs in 3 buckets, 10 samples per epoch in 4 batches of 4" in table
    assert "note: 1 item(s) have an aspect ratio outside" in table
    assert "note: 6 batch slot(s) in 3 bucket(s) are filled by repeating items of the same bucket" in table


def test_bucket_table_without_adjustments_has_no_notes(tmp_path):
    dataset = Dataset(tmp_path / "d.toml", [ResolvedDirectory(tmp_path, _settings(resolutions=[64]))])
    items = [_item(f"sq{i}", 64, 64) for i in range(4)]
    table = format_bucket_table(assign_buckets(items, dataset, 16), micro_batch_size=2)
    assert "note:" not in table
    assert "4 samples per epoch in 2 batches of 2" in table
    assert format_bucket_table([], 2) == "no samples: the dataset has no usable items"
