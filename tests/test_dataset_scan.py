"""Dataset scanning: items with captions and sizes, problems collected instead of raised."""

from pathlib import Path

from PIL import Image

from config.dataset_config import BUCKET_DEFAULTS, Dataset, ResolvedDirectory
from data.scan import Item, format_problems, scan_dataset, scan_directory
from tools.make_demo_dataset import SIZES, make_demo_dataset


def _image(path: Path, size=(32, 16), caption: str | bytes | None = None) -> Path:
    Image.new("RGB", size, (10, 20, 30)).save(path)
    caption_path = path.with_suffix(".txt")
    if isinstance(caption, bytes):
        caption_path.write_bytes(caption)
    elif caption is not None:
        caption_path.write_text(caption, encoding="utf-8")
    return path


def _directory(path: Path) -> ResolvedDirectory:
    return ResolvedDirectory(path, BUCKET_DEFAULTS)


def test_scan_collects_problems_and_keeps_the_rest(tmp_path):
    good = _image(tmp_path / "a_good.png", (32, 16), "  a photo of a cat \n")
    upper = _image(tmp_path / "b_upper.JPG", (16, 48), "\ufeffa dog")  # BOM from a Windows editor
    no_caption = _image(tmp_path / "c_no_caption.png")
    latin1 = _image(tmp_path / "d_latin1.png", caption="caf\u00e9".encode("latin-1"))
    broken = tmp_path / "e_empty.webp"
    broken.write_bytes(b"")
    broken.with_suffix(".txt").write_text("an empty file")
    (tmp_path / "notes.md").write_text("not media")
    (tmp_path / "cache").mkdir()
    _image(tmp_path / "cache" / "cached.png", caption="must not be scanned")

    result = scan_directory(_directory(tmp_path), index=3)

    assert result.items == [
        Item(good, "a photo of a cat", 32, 16, 3),
        Item(upper, "a dog", 16, 48, 3),
    ]
    assert [path for path, _ in result.problems] == [no_caption, latin1, broken]
    reasons = [reason for _, reason in result.problems]
    assert reasons[0] == "no caption file (c_no_caption.txt)"
    assert reasons[1] == "caption d_latin1.txt is not UTF-8 text (byte 0xe9 at position 3)"
    assert reasons[2] == "empty file (0 bytes)"


def test_scan_uses_displayed_size_of_exif_rotated_images(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (60, 20)).save(path, exif=exif.tobytes())
    path.with_suffix(".txt").write_text("rotated")
    (item,) = scan_directory(_directory(tmp_path), 0).items
    assert (item.width, item.height, item.frames) == (20, 60, 1)


def test_scan_dataset_reports_empty_folder_and_indexes_directories(tmp_path):
    first, empty, second = tmp_path / "first", tmp_path / "empty", tmp_path / "second"
    for folder in (first, empty, second):
        folder.mkdir()
    (empty / "caption_only.txt").write_text("no image here")
    _image(first / "x.png", caption="x")
    _image(second / "y.png", caption="y")
    dataset = Dataset(tmp_path / "dataset.toml", [_directory(first), _directory(empty), _directory(second)])

    result = scan_dataset(dataset)

    assert [(i.path.name, i.directory_index) for i in result.items] == [("x.png", 0), ("y.png", 2)]
    assert len(result.problems) == 1
    path, reason = result.problems[0]
    assert path == empty
    assert reason.startswith("no media files (.jpeg, .jpg, .png, .webp)")


def test_format_problems_one_line_per_path():
    text = format_problems([(Path("/d/a.png"), "no caption file (a.txt)"), (Path("/d"), "no media files")])
    assert text.splitlines() == ["/d/a.png: no caption file (a.txt)", "/d: no media files"]
    assert format_problems([]) == ""


def test_demo_dataset_scans_cleanly_and_is_deterministic(tmp_path):
    out = make_demo_dataset(tmp_path / "one", count=7, seed=5)
    result = scan_directory(_directory(out), 0)

    assert result.problems == []
    assert len(result.items) == 7
    assert {(i.width, i.height) for i in result.items} == set(SIZES)
    for item in result.items:
        words = item.caption.split()
        assert words[0] in ("a", "an") and words[-1] == "background" and " on " in item.caption
        assert item.path.stat().st_size < 4096

    again = make_demo_dataset(tmp_path / "two", count=7, seed=5)
    for item in result.items:
        twin = again / item.path.name
        assert twin.read_bytes() == item.path.read_bytes()
        assert twin.with_suffix(".txt").read_text() == item.path.with_suffix(".txt").read_text()

    other_seed = make_demo_dataset(tmp_path / "three", count=7, seed=6)
    captions = [p.read_text() for p in sorted(other_seed.glob("*.txt"))]
    assert captions != [i.path.with_suffix(".txt").read_text() for i in result.items]
