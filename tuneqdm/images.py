"""Robust loading of subject photos into 8-bit sRGB-ish RGB PIL images.

Users hand us whatever their phone, scanner or editor wrote: EXIF-rotated JPEGs,
PNGs with transparency, grayscale scans, CMYK JPEGs from print workflows, 16-bit
PNG/TIFF, palette GIFs, thumbnails and 100-megapixel panoramas. Training wants one
thing: an RGB image of sensible size. This module turns the first into the second or
refuses with an `ImageLoadError` that names the file and says what is allowed.

- `check_image` reads the header only (cheap; used to validate a whole CSV before any
  work starts): format, size, decompression-bomb and tiny-image limits.
- `load_image` decodes fully: EXIF orientation applied, transparency composited on
  white, every mode converted to RGB (ICC profiles converted to sRGB when present),
  optionally reduced so its shorter side is `shorter_side` (huge photos never reach
  the trainer at full size).

Limits are checked from the header, before pixels are decoded, so a decompression
bomb (a small file declaring a gigantic canvas) costs nothing.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 50 megapixels: above any phone camera's full resolution, far below what would
# exhaust memory (an RGB 50 MP image is 150 MB decoded). PIL's own bomb limit is
# ~89 MP (warning) / ~179 MP (error); ours is stricter and always an error.
DEFAULT_MAX_PIXELS = 50_000_000
# Shorter side below this is a thumbnail or an icon, not a training photo.
DEFAULT_MIN_SIDE = 32
# Formats PIL can decode that are photographs (not PDFs, icons, fonts, ...).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "MPO", "PPM")
# Suffixes treated as images when a folder or prefix is listed.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif",
                  ".ppm", ".mpo")

ImageSource = str | Path | bytes | BinaryIO


class ImageLoadError(ValueError):
    """An image that cannot be used for training; the message names the file."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


@dataclass(frozen=True)
class ImageInfo:
    """What the header says about an image (no pixels decoded)."""

    name: str
    format: str
    mode: str
    width: int           # stored width (before EXIF rotation)
    height: int          # stored height
    frames: int = 1

    @property
    def pixels(self) -> int:
        return self.width * self.height


def check_image(source: ImageSource, *, name: str | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS,
                min_side: int = DEFAULT_MIN_SIDE) -> ImageInfo:
    """Check an image from its header: readable, an allowed format, not a
    decompression bomb, not tiny. Raises `ImageLoadError` naming the file.

    PNG files are also verified (chunk checksums); other formats are only fully
    checked by `load_image`, which decodes them.
    """
    name = _name_of(source, name)
    with _open(source, name) as image:
        info = _header_info(image, name, max_pixels, min_side)
        if info.format == "PNG":
            try:
                image.verify()
            except Exception as err:  # PIL raises many types for corrupt chunks
                raise ImageLoadError(name, f"corrupt PNG data ({err})") from err
    return info


def load_image(source: ImageSource, *, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE,
               shorter_side: int | None = None,
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode an image into an 8-bit RGB PIL image.

    Args:
        source: a path, raw bytes or a binary file object.
        name: how errors name the image (default: the path, or "<bytes>").
        max_pixels: refuse images whose declared width * height exceeds this.
        min_side: refuse images whose shorter side is below this (in pixels).
        shorter_side: if given, shrink (never enlarge) so the shorter side is this.
        background: colour that transparent pixels are composited on.

    Returns:
        a fully loaded RGB image (mode "RGB", uint8), upright per its EXIF tag.
    """
    if shorter_side is not None and shorter_side < 1:
        raise ValueError(f"shorter_side={shorter_side!r} is invalid: must be >= 1 or None")
    name = _name_of(source, name)
    with _open(source, name) as image:
        _header_info(image, name, max_pixels, min_side)
        if shorter_side is not None and image.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: huge JPEGs stay cheap.
            w, h = image.size
            scale = shorter_side / min(w, h)
            if scale < 1.0:
                image.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
                image = ImageOps.exif_transpose(image)
                rgb = _to_rgb(image, background, name)
        except ImageLoadError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageLoadError(name, f"refused as a decompression bomb ({err})") from err
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise ImageLoadError(name, f"cannot decode image data ({err})") from err
    if shorter_side is not None and min(rgb.size) > shorter_side:
        w, h = rgb.size
        scale = shorter_side / min(w, h)
        size = (shorter_side, max(shorter_side, round(h * scale))) if w <= h else (
            max(shorter_side, round(w * scale)), shorter_side)
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return rgb


def is_image_name(path: str) -> bool:
    """Whether a file name has one of the image suffixes (case-insensitive)."""
    return path.lower().endswith(IMAGE_SUFFIXES)


# -- internals -----------------------------------------------------------------------


def _name_of(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, Path)):
        return str(source)
    return getattr(source, "name", None) or "<bytes>"


class _open:
    """Context manager: PIL-open a source, turning every open failure into an
    ImageLoadError naming the file."""

    def __init__(self, source: ImageSource, name: str) -> None:
        self.source, self.name = source, name
        self.image: Image.Image | None = None

    def __enter__(self) -> Image.Image:
        source = self.source
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise ImageLoadError(self.name, "empty file (0 bytes)")
            source = io.BytesIO(bytes(source))
        elif isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_file():
                raise ImageLoadError(self.name, "no such file")
            if path.stat().st_size == 0:
                raise ImageLoadError(self.name, "empty file (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                self.image = Image.open(source)
        except UnidentifiedImageError as err:
            allowed = ", ".join(ALLOWED_FORMATS)
            raise ImageLoadError(
                self.name, f"not an image PIL can read; allowed formats: {allowed}"
            ) from err
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageLoadError(self.name, f"refused as a decompression bomb ({err})") from err
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise ImageLoadError(self.name, f"cannot read image header ({err})") from err
        return self.image

    def __exit__(self, *exc) -> None:
        if self.image is not None:
            self.image.close()


def _header_info(image: Image.Image, name: str, max_pixels: int, min_side: int) -> ImageInfo:
    fmt = image.format or "unknown"
    if fmt not in ALLOWED_FORMATS:
        raise ImageLoadError(name, f"format {fmt} is not allowed; allowed: "
                                   f"{', '.join(ALLOWED_FORMATS)}")
    width, height = image.size
    info = ImageInfo(name, fmt, image.mode, width, height, getattr(image, "n_frames", 1))
    if width <= 0 or height <= 0:
        raise ImageLoadError(name, f"has an empty canvas ({width}x{height})")
    if info.pixels > max_pixels:
        raise ImageLoadError(
            name, f"refused as a possible decompression bomb: {width}x{height} = "
                  f"{info.pixels:,} pixels, more than the limit of {max_pixels:,}; "
                  f"downscale it first")
    if min(width, height) < min_side:
        raise ImageLoadError(
            name, f"too small: {width}x{height}, the shorter side must be at least "
                  f"{min_side} px")
    return info


def _to_rgb(image: Image.Image, background: tuple[int, int, int], name: str) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; alpha is composited on `background`."""
    image = _to_srgb(image)
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grayscale: scale the 16-bit range to 8 bits.
        values = np.asarray(image, dtype=np.int64)
        if mode == "I" and values.max(initial=0) <= 255:
            gray = values.clip(0, 255).astype(np.uint8)
        else:
            gray = (values.clip(0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        gray = (values / top * 255.0).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    elif mode == "P":
        return image.convert("RGB")
    if mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        canvas = Image.new("RGBA", image.size, (*background, 255))
        canvas.alpha_composite(image)
        return canvas.convert("RGB")
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, ...
    except (ValueError, OSError) as err:
        raise ImageLoadError(name, f"image mode {mode} cannot be converted to RGB") from err


def _to_srgb(image: Image.Image) -> Image.Image:
    """Convert with the embedded ICC profile to sRGB when there is one (CMYK print
    files especially); leave the image as it is if the profile cannot be used."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "CMYK"):
        return image
    try:
        from PIL import ImageCms

        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        target = ImageCms.createProfile("sRGB")
        return ImageCms.profileToProfile(image, source, target, outputMode="RGB")
    except Exception:  # missing littlecms, broken profile: fall back to PIL's conversion
        return image
