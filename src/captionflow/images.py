"""Decoding one image, once, into the small RGB picture that every model then shares."""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from captionflow.formats import (
    ALLOWED_FORMATS,
    IMAGE_EXTENSIONS,
    UNSUPPORTED_IMAGE_EXTENSIONS,
    looks_like_image,
    why_not_decoded,
)

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SIDE",
    "IMAGE_EXTENSIONS",
    "UNSUPPORTED_IMAGE_EXTENSIONS",
    "ImageTooLargeError",
    "UnsupportedFormatError",
    "decode_image",
    "limit_pillow_pixels",
    "looks_like_image",
]

DEFAULT_MAX_SIDE = 768
# Where `decode_image` notes the file's own size, upright, in the image's `info`.
SHOWN_SIZE = "captionflow.shown_size"
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # the largest file read, in bytes
MAX_ASPECT_RATIO = 8  # beyond this, a resize-shortest-edge processor would allocate huge arrays
SNIFF_BYTES = 4096  # enough of a file's start to tell an SVG, HEIC or EPS from its content
# EXIF orientations that show the stored image turned a quarter: its width is shown as height.
_QUARTER_TURNS = {5, 6, 7, 8}


class ImageTooLargeError(ValueError):
    """The header announces more pixels than allowed: refused before any pixel is decoded."""


class UnsupportedFormatError(UnidentifiedImageError):
    """A known image format that is not decoded (HEIC, SVG, EPS, raw...): the message says why
    and what to do, instead of Pillow's "cannot identify image file"."""


def limit_pillow_pixels(max_pixels: int) -> None:
    """Make Pillow's own, process-wide decompression-bomb limit ours.

    Pillow refuses images of more than twice its limit (about 179 MP as it ships, whatever
    `--max-pixels` says) and warns above it, naming no file. With its limit at ours, every image
    it warns about is one that `decode_image` refuses with a record naming the file, so the
    warning says nothing more and is silenced.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_image(
    data: bytes | BinaryIO,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cover: tuple[int, int] | None = None,
    name: str = "",
) -> Image.Image:
    """Bytes, or a seekable binary file, to an upright RGB image: a picture no larger than
    `max_side` on its longer side or, given `cover`, pixels for views to be cut from. `name`
    (the file's path or URI) only helps explain an unsupported format.

    Only `ALLOWED_FORMATS` are tried: an EPS never reaches Pillow's Ghostscript plugin. A file is
    read as Pillow needs it, so an image refused from its header (too many pixels) costs only
    the header. JPEGs are decoded at a reduced scale (draft mode) when they are much larger than
    needed, which is several times faster than decoding full size and shrinking afterwards.

    `cover` is the (height, width), as shown, that the image must still cover: the views'
    `covering_size`. A JPEG is then decoded at the smallest scale (1/2, 1/4 or 1/8) that covers
    it, and nothing is shrunk after: the views resize from these pixels, once each.
    """
    if cover is not None and min(cover) < 1:
        raise ValueError(f"cover must be at least 1x1, not {cover}")
    file = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with _open(file, name) as opened:
        width, height = opened.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
            )
        try:
            opened.draft("RGB", _draft_size(opened, max_side, cover))
            drafted = opened.size
            ImageOps.exif_transpose(opened, in_place=True)  # loads; turns only if it must
            turned = opened.size != drafted  # a quarter turn (a square one changes nothing)
            image = _to_rgb(opened)
        except Image.DecompressionBombError as error:  # a frame or tile larger than the image
            raise ImageTooLargeError(str(error)) from None
    image = _crop_extreme_aspect(image)
    if cover is None:
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    image.info[SHOWN_SIZE] = (height, width) if turned else (width, height)
    return image


def as_jpeg(data: bytes) -> bytes:
    """A JPEG file's bytes as they are; any other image decoded and saved as a JPEG (RGB,
    quality 95), for readers that expect `.jpg` samples."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            return data
        buffer = io.BytesIO()
        _to_rgb(image).save(buffer, "JPEG", quality=95)
        return buffer.getvalue()


def shown_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the image as shown at full size: what `decode_image` read from the
    file (turned upright), not the smaller copy it may have decoded; else the image's own."""
    return image.info.get(SHOWN_SIZE, image.size)


def _draft_size(
    image: Image.Image, max_side: int, cover: tuple[int, int] | None
) -> tuple[int, int]:
    """The (width, height) that Pillow's `draft` must keep, as the file stores the image (the
    EXIF turn comes later): it takes the smallest scale whose result still covers it."""
    if cover is None:
        return max_side, max_side
    height, width = cover
    if image.getexif().get(ExifTags.Base.Orientation) in _QUARTER_TURNS:
        height, width = width, height
    return width, height


def _open(file: BinaryIO, name: str) -> ImageFile.ImageFile:
    """Identify the image from its header; the pixels are read later, and only if needed."""
    try:
        return Image.open(file, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        # Pillow's limit (process-wide: maybe set for another run) is below this image's size;
        # identify it without that limit and let our own check, which names its size, decide.
        return _open_without_pillow_limit(file)
    except UnidentifiedImageError:
        file.seek(0)
        if why := why_not_decoded(file.read(SNIFF_BYTES), name):
            raise UnsupportedFormatError(why) from None
        size = file.seek(0, io.SEEK_END)
        kind = "an empty file" if not size else "not an image Pillow can read"
        raise UnidentifiedImageError(f"{kind} ({size} bytes)") from None


def _open_without_pillow_limit(file: BinaryIO) -> ImageFile.ImageFile:
    """What `Image.open` does with our formats, in their order, minus its pixel check."""
    file.seek(0)
    prefix = file.read(16)
    for name in ALLOWED_FORMATS:
        factory, accept = Image.OPEN[name]
        accepted = accept(prefix) if accept else True
        if accepted and not isinstance(accepted, str):  # a string: "accepted, but no codec"
            file.seek(0)
            with contextlib.suppress(SyntaxError, IndexError, TypeError, struct.error):
                return factory(file, "")
    raise UnidentifiedImageError("Pillow refused the image for its size, then could not open it")


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
    """Any mode to RGB: transparency flattened on white, deep greys scaled rather than clipped.
    An RGB image is returned as it is, not copied."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8_bits(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float grey image as 8-bit grey, its tones kept (Pillow's own convert
    clips them: a float or 32-bit TIFF would come out solid black or white).

    16-bit modes, and 32-bit data within 0..65535, are divided by 257 (65535 -> 255); 32-bit data
    within 0..255 is kept as is; floats within 0..1 are multiplied by 255; anything else is
    stretched from its lowest to its highest finite value. NaN becomes black, infinities the ends.
    """
    values = np.asarray(image).astype(np.float32)
    finite = values[np.isfinite(values)]
    if not finite.size:
        raise ValueError(f"every pixel is NaN or infinite (mode {image.mode}): nothing to show")
    low, high = float(finite.min()), float(finite.max())
    if image.mode.startswith("I;16"):
        values /= 257
    elif image.mode == "F" and low >= 0 and high <= 1:
        values *= 255
    elif image.mode != "F" and low >= 0 and high <= 255:
        pass
    elif image.mode != "F" and low >= 0 and high <= 65535:
        values /= 257
    else:
        values = (values - low) * (255 / (high - low) if high > low else 0)
    values = np.nan_to_num(values, nan=0, posinf=255, neginf=0)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
