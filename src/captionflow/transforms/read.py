"""Which images to caption: a list file, a glob or a folder, on any Beam filesystem."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io import ReadFromText
from apache_beam.io.fileio import EmptyMatchTreatment, MatchAll
from apache_beam.pvalue import PBegin, PCollection

from captionflow.images import IMAGE_EXTENSIONS
from captionflow.paths import absolute, dirname, is_remote, join, normalise

LIST_EXTENSIONS = (".txt", ".lst")
GLOB_CHARACTERS = frozenset("*?[")
RECURSIVE_COMPONENT = re.compile(r"(?:(?<=/)|^)\*\*/")  # a `**/` that is a whole path component


def source_pattern(source: str) -> tuple[str, bool]:
    """`(pattern, is_list_file)`: a list file, a glob or single image as given, or a folder's
    images at any depth."""
    if source.endswith(LIST_EXTENSIONS):
        return source, True
    if GLOB_CHARACTERS & set(source) or source.lower().endswith(tuple(IMAGE_EXTENSIONS)):
        return source, False
    return join(source.rstrip("/"), "**"), False


def pattern_variants(pattern: str) -> list[str]:
    """The patterns Beam must match to give what Python's `glob(recursive=True)` gives.

    In Python (and in shells with globstar) `DIR/**/*.jpg` also matches `DIR/a.jpg`: `**/`
    stands for zero or more folders. Beam's `**` is `.*`, so its `**/` needs at least one.
    Matching each variant with every `**/` kept or removed, then taking distinct paths, gives
    Python's set on every Beam filesystem.
    """
    pieces = RECURSIVE_COMPONENT.split(pattern)
    variants = [pieces[0]]
    for piece in pieces[1:]:
        variants = [variant + middle + piece for variant in variants for middle in ("**/", "")]
    return sorted(set(variants))


def has_image_extension(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def parse_list_line(line: str, base: str) -> Iterator[str]:
    """One path a line; blank lines and `#` comments skipped; relative paths are relative to
    the list file's folder."""
    path = line.strip()
    if path and not path.startswith("#"):
        yield path if is_remote(path) else absolute(join(base, path))


class ReadImagePaths(beam.PTransform):
    """Distinct image URIs, spread across workers.

    `source` is a `dataset.txt`-style list (`.txt`/`.lst`), a glob, a single image, or a folder
    (searched recursively for image files). `limit` keeps the first N paths in sorted order, a
    reproducible sample for trial runs.
    """

    def __init__(self, source: str, *, limit: int | None = None) -> None:
        super().__init__()
        self.source = absolute(source)
        self.limit = limit

    def expand(self, pbegin: PBegin) -> PCollection[str]:
        pattern, is_list = source_pattern(self.source)
        if is_list:
            paths = (
                pbegin
                | "ReadList" >> ReadFromText(pattern, validate=False)
                | "ParseLines" >> beam.FlatMap(parse_list_line, base=dirname(pattern))
            )
        else:
            matched = (
                pbegin
                | "Patterns" >> beam.Create(pattern_variants(pattern))
                | "Match" >> MatchAll(EmptyMatchTreatment.ALLOW)
                | "Paths" >> beam.Map(lambda metadata: normalise(metadata.path))
            )
            paths = (
                matched
                if pattern == self.source
                else (matched | "ImagesOnly" >> beam.Filter(has_image_extension))
            )
        # Distinct also redistributes: a list file is read by one worker, its images are not.
        paths = paths | "Distinct" >> beam.Distinct()
        if self.limit is not None:
            paths = (
                paths
                | "FirstN" >> beam.combiners.Top.Smallest(self.limit)
                | "Flatten" >> beam.FlatMap(lambda first: first)
                | "Spread" >> beam.Reshuffle()
            )
        return paths
