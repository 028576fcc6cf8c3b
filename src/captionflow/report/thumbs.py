"""Thumbnails for the report: small JPEGs, made once each, in parallel.

Each is named by a hash of its image's URI, so a second report of the same output (a run that
went on, or was resumed) only makes the new ones. An image that cannot be read (moved,
deleted, not an image any more) gets no thumbnail and the page shows a placeholder: it never
fails the report. Images are decoded by `captionflow.images.decode_image`, as the captioning
job decodes them: EXIF orientation applied, JPEGs decoded small (draft mode), never more than
`DEFAULT_MAX_BYTES` read nor `DEFAULT_MAX_PIXELS` decoded.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from captionflow.files import open_image_file
from captionflow.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, decode_image
from captionflow.listing import MARKED_THUMBNAILS

THUMBS_DIR = MARKED_THUMBNAILS  # where listing an input knows to skip them
SUFFIX = ".jpg"
QUALITY = 80
SIDE_MARKER = ".side"  # the side the thumbnails in a folder were made for


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().strip()
    except OSError:
        return ""


def thumb_key(uri: str) -> str:
    """The thumbnail's name, without its suffix: 32 hex digits of the URI's SHA-256."""
    return hashlib.sha256(uri.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def thumb_path(key: str) -> str:
    """Where the page finds a thumbnail, relative to index.html (a URL path: `/` always)."""
    return f"{THUMBS_DIR}/{key}{SUFFIX}"


@dataclass
class ThumbnailCounts:
    made: int = 0
    kept: int = 0  # there already, from an earlier report
    unreadable: int = 0  # a placeholder instead


def make_thumbnail(sources: Sequence[str], destination: str, side: int) -> bool:
    """The first of `sources` (an image's URI, then other places it may be) that decodes, as a
    JPEG of at most `side` pixels a side at `destination` (temp name, then rename)."""
    for source in sources:
        try:
            with open_image_file(source, DEFAULT_MAX_BYTES) as file:
                # Decoded (JPEGs at a reduced scale) to just cover the thumbnail, then shrunk:
                # bilinear, which antialiases when it shrinks, is twice as fast as bicubic
                # and no different at this size.
                image = decode_image(
                    file, cover=(side, side), max_pixels=DEFAULT_MAX_PIXELS, name=source
                )
            image.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
            staging = f"{destination}.tmp-{uuid.uuid4().hex}"
            try:
                image.save(staging, "JPEG", quality=QUALITY)
                os.replace(staging, destination)
            finally:
                if os.path.exists(staging):
                    os.remove(staging)
            return True
        except Exception:  # any image that cannot be shown is a placeholder, not a failure
            continue
    return False


def make_thumbnails(
    wanted: dict[str, Sequence[str]], directory: str, *, side: int, workers: int | None = None
) -> tuple[set[str], ThumbnailCounts]:
    """Thumbnails for `wanted` (key -> the places its image may be read from) in `directory`:
    the keys that have one, and how many were made, kept and unreadable. Existing ones are
    kept as they are. Made by a pool of `workers` threads (Pillow decodes, resizes and encodes
    without holding the GIL); by default one per CPU."""
    os.makedirs(directory, exist_ok=True)
    marker = os.path.join(directory, SIDE_MARKER)
    existing: set[str] = set()
    if _read(marker) == str(side):  # thumbnails of another size are made again
        existing = {
            name[: -len(SUFFIX)]
            for name in os.listdir(directory)
            if name.endswith(SUFFIX) and not name.startswith(".")
        }
    else:  # none yet, or made for another size: those are removed, then made again
        for name in os.listdir(directory):
            if name.endswith(SUFFIX):
                os.remove(os.path.join(directory, name))
        with open(marker, "w", encoding="utf-8") as file:
            file.write(str(side))
    counts = ThumbnailCounts()
    have = {key for key in wanted if key in existing}
    counts.kept = len(have)
    todo = [key for key in wanted if key not in existing]
    if not todo:
        return have, counts
    workers = max(1, workers or os.cpu_count() or 1)

    def make(key: str) -> bool:
        return make_thumbnail(wanted[key], os.path.join(directory, key + SUFFIX), side)

    if workers == 1:
        results = map(make, todo)
        made = [key for key, ok in zip(todo, results, strict=True) if ok]
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="thumbnail") as pool:
            made = [key for key, ok in zip(todo, pool.map(make, todo), strict=True) if ok]
    counts.made = len(made)
    counts.unreadable = len(todo) - len(made)
    have.update(made)
    return have, counts
