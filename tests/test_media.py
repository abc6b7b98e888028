"""Image reading: EXIF orientation, transparency, unreadable files, fitting to a bucket."""

import pytest
import torch
from PIL import Image

from data.media import IMAGE_EXTENSIONS, fit_to_bucket, image_size, is_image_file, load_image
from utils.errors import MediaError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _two_colour_image(width, height, left_colour, right_colour):
    image = Image.new("RGB", (width, height), left_colour)
    image.paste(right_colour, (width // 2, 0, width, height))
    return image


def _close(pixel, expected, tolerance=40):
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


def test_extensions_are_case_insensitive():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".webp"}
    assert is_image_file("a/B.JPG") and is_image_file("x.WebP")
    assert not is_image_file("x.txt") and not is_image_file("x.gif")


def test_exif_rotated_jpeg_reports_swapped_size_and_loads_upright(tmp_path):
    # Stored 40x20, left half red, right half blue. Orientation 6 = rotate 90 degrees clockwise
    # to display, which puts the left (red) side on top.
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    _two_colour_image(40, 20, RED, BLUE).save(path, exif=exif.tobytes(), quality=95)

    assert image_size(path) == (20, 40)
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (20, 40)
    assert _close(image.getpixel((10, 5)), RED)
    assert _close(image.getpixel((10, 34)), BLUE)


def test_unrotated_image_size_is_the_stored_size(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (30, 12)).save(path)
    assert image_size(path) == (30, 12)


def test_rgba_png_composites_onto_white(tmp_path):
    path = tmp_path / "alpha.png"
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (0, 0, 0, 0))        # fully transparent black
    image.putpixel((1, 0), (255, 0, 0, 128))    # half transparent red
    image.putpixel((2, 0), (0, 0, 255, 255))    # opaque blue
    image.save(path)

    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == WHITE
    red, green, blue = loaded.getpixel((1, 0))
    assert red == 255 and 125 <= green <= 129 and 125 <= blue <= 129
    assert loaded.getpixel((2, 0)) == BLUE


def test_la_and_palette_transparency_composite_onto_white(tmp_path):
    gray_path = tmp_path / "gray_alpha.png"
    Image.new("LA", (2, 2), (0, 0)).save(gray_path)
    assert load_image(gray_path).getpixel((1, 1)) == WHITE

    palette_path = tmp_path / "palette.png"
    palette_image = Image.new("P", (2, 1), 0)
    palette_image.putpalette([0, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    palette_image.putpixel((1, 0), 1)
    palette_image.save(palette_path, transparency=0)
    loaded = load_image(palette_path)
    assert loaded.getpixel((0, 0)) == WHITE
    assert loaded.getpixel((1, 0)) == GREEN


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.new("I;16", (2, 2), 32768).save(path)
    assert load_image(path).getpixel((0, 0)) == (128, 128, 128)


def test_zero_byte_file_gives_media_error_naming_it(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(MediaError, match="empty.png.*empty file"):
        load_image(path)
    with pytest.raises(MediaError, match="empty.png"):
        image_size(path)


def test_truncated_image_gives_media_error_naming_it(tmp_path):
    path = tmp_path / "cut.png"
    noise = Image.effect_noise((64, 64), 50).convert("RGB")  # noise: does not compress away
    noise.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="cut.png.*cannot read image"):
        load_image(path)


def test_not_an_image_gives_media_error(tmp_path):
    path = tmp_path / "fake.jpg"
    path.write_text("not an image")
    with pytest.raises(MediaError, match="fake.jpg"):
        image_size(path)


def test_decompression_bomb_is_reported_clearly(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (40, 40)).save(path)
    # Pillow refuses images over twice MAX_IMAGE_PIXELS; 1600 pixels > 2 * 100.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(MediaError, match="huge.png.*too large to open safely.*MAX_IMAGE_PIXELS"):
        load_image(path)
    with pytest.raises(MediaError, match="too large"):
        image_size(path)


def test_fit_to_bucket_shape_range_and_center_crop():
    # 200x100: red | green (40..160) | blue. Fitting to a square keeps the middle 100x100,
    # which is all green.
    image = Image.new("RGB", (200, 100), RED)
    image.paste(GREEN, (40, 0, 160, 100))
    image.paste(BLUE, (160, 0, 200, 100))

    tensor = fit_to_bucket(image, 32, 32)
    assert tensor.shape == (3, 32, 32)
    assert tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    expected = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 32, 32)
    assert torch.allclose(tensor, expected, atol=0.02)


def test_fit_to_bucket_upscales_and_maps_white_to_one():
    tensor = fit_to_bucket(Image.new("RGB", (10, 30), WHITE), 48, 64)
    assert tensor.shape == (3, 64, 48)
    assert torch.allclose(tensor, torch.ones(3, 64, 48))


def test_fit_to_bucket_crops_portrait_top_and_bottom():
    # 50x200: rows 0..40 red, 160..200 blue. Fitting to 50x100 keeps rows 50..150, all green.
    image = Image.new("RGB", (50, 200), GREEN)
    image.paste(RED, (0, 0, 50, 40))
    image.paste(BLUE, (0, 160, 50, 200))
    tensor = fit_to_bucket(image, 50, 100)
    assert tensor.shape == (3, 100, 50)
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1)
    assert torch.allclose(tensor, green.expand(3, 100, 50), atol=0.02)
