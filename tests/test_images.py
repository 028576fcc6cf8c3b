"""Decoding: every kind of image becomes one small upright RGB picture, or a clear error."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError, features

from captionflow.images import (
    ALLOWED_FORMATS,
    IMAGE_EXTENSIONS,
    UNSUPPORTED_IMAGE_EXTENSIONS,
    ImageTooLargeError,
    UnsupportedFormatError,
    decode_image,
    looks_like_image,
)
from captionflow.views import ViewSpec, covering_size, make_view

BLIP_SPEC = ViewSpec((384, 384), "squash", squash_size=(384, 384))
CLIP_SPEC = ViewSpec((224, 224), "shortest_edge", shortest_edge=224, center_crop=True)

PILLOW_LIMIT = 1024 * 1024 * 1024 // 4 // 3  # Pillow's own MAX_IMAGE_PIXELS, as it ships


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_large_jpeg_is_shrunk_to_max_side_keeping_aspect() -> None:
    image = Image.new("RGB", (2000, 1000), (200, 10, 10))
    decoded = decode_image(encode(image, "JPEG"), max_side=256)
    assert decoded.mode == "RGB"
    assert decoded.size == (256, 128)


def photo(width: int, height: int) -> Image.Image:
    """Smooth gradients with some grain: what a reduced-scale JPEG decode is meant for."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)])
    grain = np.random.default_rng(0).normal(0, 6, base.shape)
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8).transpose(1, 2, 0))


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return encode(photo(4000, 3000), "JPEG", quality=90)


@pytest.mark.parametrize(
    ("cover", "size"),
    [
        ((384, 384), (1000, 750)),  # 1/4: at 1/8, 375 rows would not cover 384
        ((224, 224), (500, 375)),  # 1/8
        ((384, 1001), (2000, 1500)),  # 1/2: at 1/4, 1000 columns would not cover 1001
        ((1600, 1600), (4000, 3000)),  # no smaller scale covers it
    ],
)
def test_a_jpeg_is_drafted_to_the_smallest_scale_that_covers_the_views(
    big_jpeg: bytes, cover: tuple[int, int], size: tuple[int, int]
) -> None:
    """With `cover` nothing is shrunk after the draft: the views resize from these pixels."""
    assert decode_image(big_jpeg, cover=cover).size == size


def test_pictures_are_still_drafted_and_shrunk_to_max_side(big_jpeg: bytes) -> None:
    assert decode_image(big_jpeg).size == (768, 576)


def test_a_photo_no_smaller_scale_covers_is_decoded_whole() -> None:
    data = encode(photo(640, 480), "JPEG", quality=90)
    decoded = decode_image(data, cover=(384, 384))
    assert decoded.size == (640, 480)
    assert decoded.tobytes() == Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def test_views_of_a_drafted_jpeg_stay_close_to_those_of_the_whole_image(big_jpeg: bytes) -> None:
    """The draft changes pixels (the DCT's own downscale), but not what the views show: a
    quarter of a level on average here (at most 2)."""
    specs = [BLIP_SPEC, CLIP_SPEC]
    whole = Image.open(io.BytesIO(big_jpeg)).convert("RGB")
    drafted = decode_image(big_jpeg, cover=covering_size(specs))
    assert drafted.size == (1000, 750)
    for spec in specs:
        difference = make_view(drafted, spec).astype(int) - make_view(whole, spec).astype(int)
        assert np.abs(difference).mean() < 1, spec.size


def test_the_cover_is_turned_with_the_exif_orientation() -> None:
    """Stored 2400x600 and shown turned (600x2400): covering 300 wide by 1200 high as shown is
    covering 1200 by 300 as stored, which a 1/2 scale does."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(photo(2400, 600), "JPEG", exif=exif)
    assert decode_image(data, cover=(1200, 300)).size == (300, 1200)
    assert decode_image(data, cover=(1201, 300)).size == (600, 2400)


def test_with_a_cover_other_formats_are_not_shrunk() -> None:
    decoded = decode_image(encode(Image.new("RGB", (2000, 1000)), "PNG"), cover=(384, 384))
    assert decoded.size == (2000, 1000)


def test_small_image_is_not_enlarged() -> None:
    decoded = decode_image(encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"))
    assert decoded.size == (1, 1)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(encode(image, "JPEG", exif=exif))
    assert decoded.size == (20, 40)


def test_alpha_is_flattened_on_white() -> None:
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    decoded = decode_image(encode(transparent, "PNG"))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency_is_flattened_on_white() -> None:
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    decoded = decode_image(encode(palette, "PNG", transparency=0))
    assert decoded.getpixel((4, 4)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    grey = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    decoded = decode_image(encode(grey, "PNG"))
    assert decoded.getpixel((0, 0)) == (128, 128, 128)


def test_cmyk_jpeg_becomes_rgb() -> None:
    decoded = decode_image(encode(Image.new("CMYK", (16, 16), (0, 0, 0, 0)), "JPEG"))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((8, 8))[0] > 240


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(buffer.getvalue())
    red, _, blue = decoded.getpixel((5, 5))
    assert red > 200 and blue < 50


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = encode(Image.new("RGB", (300, 300)), "PNG")
    with pytest.raises(ImageTooLargeError, match="90000 pixels exceeds the limit of 1000"):
        decode_image(data, max_pixels=1000)


@pytest.mark.parametrize(
    ("data", "message"), [(b"", "an empty file"), (b"hello, world", "not an image")]
)
def test_non_images_fail_with_a_readable_reason(data: bytes, message: str) -> None:
    with pytest.raises(UnidentifiedImageError, match=message):
        decode_image(data)


def test_truncated_jpeg_fails() -> None:
    data = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(OSError):
        decode_image(data[: len(data) // 2])


def test_extreme_aspect_ratio_is_cropped_to_a_sane_strip() -> None:
    decoded = decode_image(encode(Image.new("RGB", (3, 3000), (5, 5, 5)), "PNG"), max_side=768)
    assert decoded.size == (3, 24)


def test_a_bomb_is_refused_after_reading_only_its_header(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    Image.fromarray(np.random.default_rng(0).random((3000, 3000)) > 0.5).save(path)
    with open(path, "rb") as file:
        with pytest.raises(ImageTooLargeError, match="3000x3000 = 9000000 pixels"):
            decode_image(file, max_pixels=1000)
        assert file.tell() < 1000 < 100_000 < path.stat().st_size


def huge_png(width: int, height: int) -> bytes:
    """Hundreds of megapixels in a few kilobytes: one bit a pixel, all zero."""
    return encode(Image.new("1", (width, height)), "PNG")


def test_max_pixels_above_pillows_own_limit_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_LIMIT)  # it refuses over twice that
    decoded = decode_image(huge_png(20000, 10000), max_pixels=300_000_000)
    assert decoded.size == (768, 384)


def test_pillows_own_refusal_comes_out_as_ours_with_the_dimensions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # as LoadImages sets it
    with pytest.raises(
        ImageTooLargeError, match=r"^300x300 = 90000 pixels exceeds the limit of 1000$"
    ):
        decode_image(encode(Image.new("RGB", (300, 300)), "PNG"), max_pixels=1000)
    # Pillow's limit is process-wide; one left lower by another run does not refuse for us.
    assert decode_image(encode(Image.new("RGB", (300, 300)), "PNG")).size == (300, 300)


def tiff(values: np.ndarray) -> bytes:
    return encode(Image.fromarray(values), "TIFF")


@pytest.mark.parametrize(
    "values",
    [
        np.linspace(0, 1, 64, dtype=np.float32),
        np.linspace(0, 1000, 64, dtype=np.float32),
        np.linspace(-5, 1_000_000, 64).astype(np.int32),
    ],
    ids=["float 0..1", "float 0..1000", "int32 up to 1e6"],
)
def test_float_and_32_bit_tiffs_keep_their_tones(values: np.ndarray) -> None:
    gradient = np.tile(values, (16, 1))
    assert Image.open(io.BytesIO(tiff(gradient))).mode in ("F", "I")
    grey = np.asarray(decode_image(tiff(gradient)))[0, :, 0].astype(int)
    assert grey.min() < 32 and grey.max() > 223  # neither solid black nor solid white
    assert (np.diff(grey) >= 0).all() and len(set(grey)) > 32  # darker stays darker


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.float32([0.0, 0.5, 1.0]), [0, 128, 255]),  # floats in [0, 1]: x255
        (np.int32([0, 100, 255]), [0, 100, 255]),  # 32-bit data that fits 8 bits: as is
        (np.int32([0, 32768, 65535]), [0, 128, 255]),  # fits 16 bits: /257
        (np.float32([np.nan, 2.0, np.inf, 4.0]), [0, 0, 255, 255]),  # min-max of finite values
    ],
)
def test_deep_values_map_to_eight_bits(values: np.ndarray, expected: list[int]) -> None:
    decoded = decode_image(tiff(np.tile(values, (4, 1))))
    assert [decoded.getpixel((x, 0)) for x in range(len(values))] == [(v, v, v) for v in expected]


def test_an_image_with_no_finite_value_is_a_clear_error() -> None:
    values = np.full((8, 8), np.nan, dtype=np.float32)
    values[0, 0] = np.inf
    with pytest.raises(ValueError, match="every pixel is NaN or infinite"):
        decode_image(tiff(values))


EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
    b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
)


def test_eps_is_refused_without_pillows_eps_plugin_ever_seeing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from PIL import EpsImagePlugin

    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # Pillow alone opens it (then runs gs)

    def tripwire(*args: object) -> None:
        raise AssertionError("Pillow's EPS plugin was asked to open the file")

    monkeypatch.setitem(Image.OPEN, "EPS", (tripwire, EpsImagePlugin._accept))
    with pytest.raises(UnsupportedFormatError, match="EPS/PostScript is not supported"):
        decode_image(EPS, name="drawing.eps")


def test_allowed_formats_are_pillows_raster_formats_minus_the_refused() -> None:
    Image.init()
    assert {"JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "JPEG2000", "QOI"} <= set(ALLOWED_FORMATS)
    assert not {"EPS", "WMF", "MPEG", "IPTC", "BUFR", "GRIB", "HDF5"} & set(ALLOWED_FORMATS)
    assert set(ALLOWED_FORMATS) <= set(Image.OPEN)


def test_image_extensions_are_those_pillow_opens_and_unsupported_ones_are_named() -> None:
    old = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif"}
    assert old | {".jp2", ".qoi", ".tga", ".ico", ".apng", ".mpo"} <= IMAGE_EXTENSIONS
    refused = {".eps", ".ps", ".wmf", ".emf", ".mpg", ".h5", ".iim", ".pdf", ".txt"}
    assert not refused & IMAGE_EXTENSIONS
    unsupported = {".heic", ".heif", ".svg", ".jxl", ".eps", ".ps", ".cr2", ".nef", ".dng", ".raf"}
    assert unsupported <= UNSUPPORTED_IMAGE_EXTENSIONS
    assert not IMAGE_EXTENSIONS & UNSUPPORTED_IMAGE_EXTENSIONS
    assert (".avif" in IMAGE_EXTENSIONS) == features.check("avif")
    assert (".psd" in UNSUPPORTED_IMAGE_EXTENSIONS) == ("PSD" not in ALLOWED_FORMATS)
    assert looks_like_image("photos/IMG_1.HEIC") and looks_like_image("gs://b/x y/cat.JPG")
    assert not looks_like_image("notes.txt") and not looks_like_image("clip.mpg")
    assert not looks_like_image("folder.d/README")


HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>\n'


@pytest.mark.parametrize(
    ("data", "name", "message"),
    [
        (HEIC, "IMG_0001.HEIC", "HEIC/HEIF images are not supported by the installed Pillow"),
        (HEIC, "misnamed.jpg", "install pillow-heif"),
        (SVG, "logo.svg", "SVG is a vector format; rasterise it first"),
        (b"\xff\x0a" + bytes(64), "photo.jxl", "JPEG XL images are not supported"),
        (b"IIRO\x08\x00\x00\x00" + bytes(64), "P1010001.ORF", "raw camera files are not supported"),
        (b"II*\x00\x10\x00\x00\x00CR\x02\x00" + bytes(64), "IMG_2.CR2", "raw camera files"),
        (EPS, "drawing.jpg", "EPS/PostScript is not supported"),
        (
            b"\xd7\xcd\xc6\x9a\x00\x00" + bytes(64),
            "chart.wmf",
            "WMF/EMF drawings are not supported",
        ),
    ],
)
def test_images_the_installed_pillow_cannot_open_say_why(
    data: bytes, name: str, message: str
) -> None:
    with pytest.raises(UnsupportedFormatError, match=message):
        decode_image(data, name=name)


def test_a_broken_file_with_a_supported_extension_still_says_it_is_not_an_image() -> None:
    with pytest.raises(UnidentifiedImageError, match="not an image Pillow can read") as error:
        decode_image(b"\x89PNG but not really", name="x.png")
    assert not isinstance(error.value, UnsupportedFormatError)
