"""tuneqdm.images: every odd photo either becomes an upright 8-bit RGB image or is
refused with an ImageLoadError that names the file."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tuneqdm.images import ImageLoadError, check_image, is_image_name, load_image

DREAMBOOTH = Path(__file__).resolve().parents[3] / "shared" / "dreambooth"  # beside the repo


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _rgb_at(image: Image.Image, xy: tuple[int, int]) -> np.ndarray:
    return np.asarray(image, dtype=np.int32)[xy[1], xy[0]]


def test_exif_rotation_is_applied(tmp_path):
    # Stored 64 wide x 40 high, left half red; orientation 6 = rotate 90 degrees CW
    # on display, so the upright image is 40 wide x 64 high with red on top.
    stored = Image.new("RGB", (64, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(stored, tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 64)
    assert _rgb_at(image, (20, 5))[0] > 200    # top is red
    assert _rgb_at(image, (20, 60))[2] > 200   # bottom is blue
    assert check_image(path).width == 64       # the header reports the stored size


def test_rgba_is_composited_on_white(tmp_path):
    array = np.zeros((40, 40, 4), dtype=np.uint8)
    array[:, :20] = (0, 128, 0, 255)       # opaque green on the left
    array[:, 20:] = (255, 0, 0, 0)         # fully transparent red on the right
    path = _save(Image.fromarray(array, "RGBA"), tmp_path / "alpha.png")
    image = load_image(path)
    assert image.mode == "RGB"
    assert tuple(_rgb_at(image, (5, 5))) == (0, 128, 0)
    assert tuple(_rgb_at(image, (35, 5))) == (255, 255, 255)
    black = load_image(path, background=(0, 0, 0))
    assert tuple(_rgb_at(black, (35, 5))) == (0, 0, 0)


def test_gray_alpha_and_palette_with_transparency(tmp_path):
    la = Image.new("LA", (40, 40), (100, 0))
    la.paste((30, 255), (0, 0, 20, 40))
    image = load_image(_save(la, tmp_path / "la.png"))
    assert tuple(_rgb_at(image, (5, 5))) == (30, 30, 30)
    assert tuple(_rgb_at(image, (35, 5))) == (255, 255, 255)

    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([10, 20, 30] + [200, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 20, 40))
    path = _save(palette, tmp_path / "pal.png", transparency=0)
    image = load_image(path)
    assert tuple(_rgb_at(image, (5, 5))) == (200, 0, 0)
    assert tuple(_rgb_at(image, (35, 5))) == (255, 255, 255)  # index 0 is transparent
    gif = load_image(_save(palette, tmp_path / "pal.gif"))     # no transparency: colours kept
    assert tuple(_rgb_at(gif, (35, 5))) == (10, 20, 30)


def test_grayscale_and_bilevel(tmp_path):
    gray = load_image(_save(Image.new("L", (40, 40), 77), tmp_path / "gray.png"))
    assert gray.mode == "RGB" and tuple(_rgb_at(gray, (3, 3))) == (77, 77, 77)
    bilevel = load_image(_save(Image.new("1", (40, 40), 1), tmp_path / "one.png"))
    assert tuple(_rgb_at(bilevel, (3, 3))) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # pure red in CMYK
    image = load_image(_save(cmyk, tmp_path / "cmyk.jpg", quality=95))
    assert image.mode == "RGB"
    r, g, b = _rgb_at(image, (20, 20))
    assert r > 230 and g < 25 and b < 25


def test_sixteen_bit_grayscale_png_and_tiff(tmp_path):
    values = np.full((40, 40), 40000, dtype=np.uint16)
    values[:, :20] = 65535
    sixteen = Image.fromarray(values)
    assert sixteen.mode.startswith("I;16")
    for suffix in ("png", "tif"):
        image = load_image(_save(sixteen, tmp_path / f"deep.{suffix}"))
        assert image.mode == "RGB"
        assert tuple(_rgb_at(image, (5, 5))) == (255, 255, 255)
        assert tuple(_rgb_at(image, (35, 5))) == (40000 >> 8,) * 3


def test_tiny_image_is_refused_with_its_name(tmp_path):
    path = _save(Image.new("RGB", (16, 300)), tmp_path / "thumb.png")
    with pytest.raises(ImageLoadError, match=r"thumb\.png: too small: 16x300.*at least 32 px"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="too small"):
        check_image(path)
    assert load_image(path, min_side=8).size == (16, 300)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (valid CRC) followed by one tiny IDAT:
    a decompression-bomb shaped file of a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(8000, 7500), (40000, 40000)])
def test_decompression_bombs_are_refused_before_decoding(tmp_path, size):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(*size))
    for fn in (check_image, load_image):
        with pytest.raises(ImageLoadError, match=r"bomb\.png: refused as a .*decompression bomb"):
            fn(path)


def test_huge_image_is_reduced_to_the_requested_shorter_side(tmp_path):
    big = Image.new("RGB", (3000, 2000), (10, 200, 30))
    for suffix in ("jpg", "png"):
        image = load_image(_save(big, tmp_path / f"big.{suffix}"), shorter_side=64)
        assert image.size == (96, 64)
        assert abs(int(_rgb_at(image, (40, 30))[1]) - 200) < 8
    small = load_image(_save(Image.new("RGB", (50, 40)), tmp_path / "s.png"), shorter_side=64)
    assert small.size == (50, 40)  # never enlarged


def test_truncated_jpeg_passes_the_header_check_but_not_decoding(tmp_path):
    data = (DREAMBOOTH / "dog" / "00.jpg").read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 3])
    assert check_image(path).format == "JPEG"
    with pytest.raises(ImageLoadError, match=r"cut\.jpg: cannot decode image data"):
        load_image(path)


def test_corrupt_png_is_caught_by_the_header_check(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(good, format="PNG")
    data = bytearray(good.getvalue())
    data[-20] ^= 0xFF  # flip a byte inside IDAT: CRC no longer matches
    path = tmp_path / "flip.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageLoadError, match=r"flip\.png"):
        check_image(path)


def test_non_images_empty_and_missing_files(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a photo")
    with pytest.raises(ImageLoadError, match=r"notes\.jpg: not an image PIL can read; allowed"):
        check_image(text)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.png: empty file"):
        load_image(empty)
    with pytest.raises(ImageLoadError, match=r"gone\.png: no such file"):
        load_image(tmp_path / "gone.png")
    with pytest.raises(ImageLoadError, match=r"<bytes>: empty file"):
        load_image(b"")
    pdf_like = io.BytesIO()
    Image.new("RGB", (40, 40)).save(pdf_like, format="ICO")
    with pytest.raises(ImageLoadError, match="format ICO is not allowed"):
        load_image(pdf_like.getvalue(), name="icon.ico")


def test_real_photos_load_from_bytes_and_paths():
    paths = sorted((DREAMBOOTH / "dog").glob("*.jpg"))
    assert paths
    for path in paths:
        from_path = load_image(path, shorter_side=64)
        from_bytes = load_image(path.read_bytes(), name=path.name, shorter_side=64)
        assert from_path.mode == "RGB" and min(from_path.size) == 64
        assert np.array_equal(np.asarray(from_path), np.asarray(from_bytes))
    assert is_image_name("A.JPG") and not is_image_name("notes.txt")
