"""Decoding one image, once, into the small RGB picture that every model then shares."""

from __future__ import annotations

import io
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif"}
)
DEFAULT_MAX_SIDE = 768
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # the largest file read, in bytes
MAX_ASPECT_RATIO = 8  # beyond this, a resize-shortest-edge processor would allocate huge arrays


class ImageTooLargeError(ValueError):
    """The header announces more pixels than allowed: refused before any pixel is decoded."""


def decode_image(
    data: bytes | BinaryIO,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Bytes, or a seekable binary file, to an upright RGB image no larger than `max_side` on its
    longer side.

    A file is read as Pillow needs it, so an image refused from its header (too many pixels)
    costs only the header. JPEGs are decoded at a reduced scale (draft mode) when they are much
    larger than needed, which is several times faster than decoding full size and shrinking
    afterwards.
    """
    file = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        opened = Image.open(file)
    except UnidentifiedImageError:
        size = file.seek(0, io.SEEK_END)
        kind = "an empty file" if not size else "not an image Pillow can read"
        raise UnidentifiedImageError(f"{kind} ({size} bytes)") from None
    with opened:
        width, height = opened.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
            )
        opened.draft("RGB", (max_side, max_side))
        image = ImageOps.exif_transpose(opened)
        image = _to_rgb(image)
    image = _crop_extreme_aspect(image)
    image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image


def _crop_extreme_aspect(image: Image.Image) -> Image.Image:
    """Centre-crop a strip longer than MAX_ASPECT_RATIO times its width; models crop or squash
    such images to a square anyway, and a 1x10000 strip would blow up their preprocessing."""
    width, height = image.size
    if width > MAX_ASPECT_RATIO * height:
        keep = MAX_ASPECT_RATIO * height
        return image.crop(((width - keep) // 2, 0, (width - keep) // 2 + keep, height))
    if height > MAX_ASPECT_RATIO * width:
        keep = MAX_ASPECT_RATIO * width
        return image.crop((0, (height - keep) // 2, width, (height - keep) // 2 + keep))
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB: transparency flattened on white, 16-bit scaled rather than clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
