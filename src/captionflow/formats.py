"""Which files are images we decode, and why the others that look like images are not.

We decode every raster format the installed Pillow opens, except the few that run an external
program on the file (or could hand it to one), are vector drawings, or of which Pillow reads
only the header: inputs are untrusted, and a Ghostscript run on a crafted EPS is a classic
exploit.
"""

from __future__ import annotations

import os

from PIL import Image, ImageFile

Image.init()  # register every plugin now, so that the sets below are complete

_POSTSCRIPT = (
    "EPS/PostScript is not supported: Pillow would run Ghostscript, a full interpreter, on the "
    "file; rasterise it first (e.g. `gs -sDEVICE=png16m -o x.png x.eps` where it is trusted)"
)
_METAFILE = "WMF/EMF drawings are not supported: they are vector formats; rasterise them first"
DENIED_FORMATS = frozenset(
    {
        "EPS",  # PostScript: Pillow loads it by running Ghostscript on the file
        "WMF",  # WMF and EMF: vector drawings, rendered by Pillow only on Windows
        "MPEG",  # video: Pillow reads only its header
        "IPTC",  # tried on any file; Pillow opens the data inside with every format, EPS too
    }
)
# Tried first, as Pillow's own `Image.open` does: they are the common case, and some rarer
# plugins accept files on weak evidence.
_COMMON_FIRST = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "PPM")


def _decodable(name: str) -> bool:
    """Not denied, and not one of Pillow's stubs (BUFR, GRIB, HDF5...), which read a header and
    need a separately installed handler for the pixels."""
    factory, _ = Image.OPEN[name]
    stub = isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
    return name not in DENIED_FORMATS and not stub


ALLOWED_FORMATS: tuple[str, ...] = tuple(
    dict.fromkeys(
        name for name in (*_COMMON_FIRST, *Image.ID) if name in Image.OPEN and _decodable(name)
    )
)
_OPENED_AS = {"MPO": "JPEG"}  # multi-picture JPEGs are opened by the JPEG plugin

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    extension
    for extension, name in Image.registered_extensions().items()
    if _OPENED_AS.get(name, name) in ALLOWED_FORMATS
)

_HEIF = (
    "HEIC/HEIF images are not supported by the installed Pillow; convert them (e.g. "
    "`heif-convert x.heic x.jpg`, or export as JPEG) or install pillow-heif"
)
_AVIF = (
    "AVIF images are not supported by the installed Pillow; convert them (e.g. "
    "`avifdec x.avif x.png`) or install a Pillow built with AVIF"
)
_JXL = (
    "JPEG XL images are not supported by the installed Pillow; convert them (e.g. "
    "`djxl x.jxl x.png`)"
)
_SVG = "SVG is a vector format; rasterise it first (e.g. `rsvg-convert x.svg -o x.png`)"
_PSD = "Photoshop files are not supported by the installed Pillow; export them as PNG or TIFF"
_RAW = (
    "raw camera files are not supported; develop them into JPEG or TIFF first (e.g. with "
    "darktable, RawTherapee or dcraw)"
)
_RAW_EXTENSIONS = (".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".dng", ".raf", ".orf", ".rw2")
_RAW_EXTENSIONS += (".pef", ".srw", ".x3f")
_WHY_BY_EXTENSION: dict[str, str] = {
    ".heic": _HEIF,
    ".heif": _HEIF,
    ".hif": _HEIF,
    ".avif": _AVIF,
    ".jxl": _JXL,
    ".svg": _SVG,
    ".svgz": _SVG,
    ".eps": _POSTSCRIPT,
    ".ps": _POSTSCRIPT,
    ".wmf": _METAFILE,
    ".emf": _METAFILE,
    ".psd": _PSD,
    **dict.fromkeys(_RAW_EXTENSIONS, _RAW),
}
# Extensions of images the installed Pillow cannot open, or that we refuse: reading them still
# gives each an error record saying why, rather than silently skipping it.
UNSUPPORTED_IMAGE_EXTENSIONS: frozenset[str] = frozenset(_WHY_BY_EXTENSION) - IMAGE_EXTENSIONS


def extension(path: str) -> str:
    """The lower-case extension of a local path or URI (`gs://b/x.JPG` -> `.jpg`)."""
    return os.path.splitext(path)[1].lower()


def looks_like_image(path: str) -> bool:
    """Whether a folder's file is an input: an image we decode, or one we explain refusing."""
    return extension(path) in IMAGE_EXTENSIONS | UNSUPPORTED_IMAGE_EXTENSIONS


_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"}


def _why_from_content(head: bytes) -> str | None:
    if head.startswith(b"%!PS") or head.startswith(b"\xc5\xd0\xd3\xc6"):
        return _POSTSCRIPT
    if head.startswith((b"\xd7\xcd\xc6\x9a", b"\x01\x00\x09\x00", b"\x02\x00\x09\x00")) or (
        head.startswith(b"\x01\x00\x00\x00") and head[40:44] == b" EMF"
    ):
        return _METAFILE
    if head[4:8] == b"ftyp":  # ISO media: the brand says what it holds
        end = min(len(head), int.from_bytes(head[:4], "big"))  # major brand, then compatible ones
        brands = {head[8:12]} | {head[i : i + 4] for i in range(16, end, 4)}
        if b"avif" in brands or b"avis" in brands:
            return _AVIF if ".avif" in UNSUPPORTED_IMAGE_EXTENSIONS else None
        if brands & _HEIF_BRANDS or head[8:12] in (b"mif1", b"msf1"):
            return _HEIF
        if b"jxl " in brands:
            return _JXL
        if b"crx " in brands:
            return _RAW
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return _JXL
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<svg") or (text.startswith(b"<") and b"<svg" in text):
        return _SVG
    return None


def why_not_decoded(head: bytes, name: str = "") -> str | None:
    """Why a file that Pillow, restricted to `ALLOWED_FORMATS`, could not identify is not
    decoded, when it is a known image format: from its first bytes (a HEIC named `.jpg` is
    still a HEIC), else from its name's extension. `None` when it looks like nothing known."""
    if why := _why_from_content(head):
        return why
    suffix = extension(name)
    return _WHY_BY_EXTENSION[suffix] if suffix in UNSUPPORTED_IMAGE_EXTENSIONS else None
