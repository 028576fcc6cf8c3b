"""Which images to caption: a list file, a glob or a folder, on any Beam filesystem.

Inputs that fail before any image is read (a list line or a file name that is not text, a
broken symbolic link) are error records here, so that every input ends up in the output or in
`errors.jsonl`.
"""

from __future__ import annotations

import codecs
import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from enum import Enum
from typing import BinaryIO, NamedTuple

import apache_beam as beam
from apache_beam.io.fileio import EmptyMatchTreatment, MatchAll
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.pvalue import PBegin, PCollection, TaggedOutput

from captionflow.images import looks_like_image
from captionflow.listfile import ListLine, decode_line, is_utf16, list_lines
from captionflow.listing import (
    SKIP_MARKER,
    Glob,
    gcs_in_order,
    gcs_top_level,
    is_marked_thumbnail,
    link_problem,
    literal,
    pattern_variants,
    walk_files,
    walk_in_order,
)
from captionflow.paths import absolute, dirname, is_remote, join, normalise
from captionflow.records import ErrorRecord
from captionflow.transforms.errors import ERRORS, error_output
from captionflow.transforms.grouping import GroupStrings, Strings
from captionflow.transforms.lines import Line, ReadLines

logger = logging.getLogger("captionflow")

LIST_EXTENSIONS = (".txt", ".lst")
GLOB_CHARACTERS = frozenset("*?[")
PATHS = "paths"
UTF16 = "utf16"
SUBFOLDERS = "subfolders"
UNDECODABLE = "UndecodablePath"
FILES_LISTED = Metrics.counter("captionflow", "files_listed")  # by a folder's or glob's walk
# Stripped from both ends of a list line: ASCII spaces and a stray BOM (lists joined with
# `cat`), never the Unicode spaces and separators that may end a file name.
LINE_SPACE = " \t\r\v\f\ufeff"


class InputKind(str, Enum):
    LIST = "list"
    FOLDER = "folder"
    GLOB = "glob"
    IMAGE = "image"


def input_kind(source: str) -> InputKind:
    """What `source` names. A local path is what it is on disk (a folder named `x.txt` is a
    folder, `photo[1].jpg` an image); a URI, not listed before the job runs, is what its name
    says: a list (`.txt`, `.lst`), a glob, an image, else a folder."""
    if not is_remote(source) and os.path.isdir(source):
        return InputKind.FOLDER
    if not is_remote(source) and os.path.lexists(source):
        return InputKind.LIST if is_list_file(source) else InputKind.IMAGE
    if is_list_file(source):
        return InputKind.LIST
    if GLOB_CHARACTERS & set(source):
        return InputKind.GLOB
    if is_remote(source) and not looks_like_image(source):
        return InputKind.FOLDER
    return InputKind.IMAGE  # a local path that does not exist: the read step reports it


def is_list_file(path: str) -> bool:
    return path.lower().endswith(LIST_EXTENSIONS)


def list_entries(file: BinaryIO) -> Iterator[tuple[ListLine, str]]:
    """`(line, entry)` for each line that names an input: blank lines and `#` comments are
    skipped, the entry is the line without surrounding spaces."""
    for line in list_lines(file):
        if entry := list_entry(line):
            yield line, entry


def list_entry(line: ListLine) -> str | None:
    """What a list line names, if anything (not blank, not a `#` comment)."""
    entry = line.text.strip(LINE_SPACE)
    return entry if entry and not entry.startswith("#") else None


def _input_of(line: ListLine, entry: str, path: str, where: str) -> str | TaggedOutput:
    """A list entry as a URI (relative paths are relative to the list's folder), or as an
    error record when its line cannot be decoded."""
    uri = entry if is_remote(entry) else absolute(join(dirname(path), entry))
    if line.valid:
        return uri
    message = (
        f"{where} is not valid {line.encoding}: '{entry}'; "
        "fix the list's encoding (save it as UTF-8)"
    )
    return error_output(ErrorRecord(uri, "read", UNDECODABLE, message))


def read_list(path: str) -> Iterator[str | TaggedOutput]:
    """A list file's inputs, one a line, read from start to end by one worker: for
    `--limit` (the list's first entries) and for UTF-16 lists."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as file:
        for line, entry in list_entries(file):
            yield _input_of(line, entry, path, f"line {line.number} of {path}")


def read_list_line(line: Line) -> Iterator[str | TaggedOutput]:
    """The input a line of a UTF-8 list names, when the list is read in ranges."""
    raw = line.data.removeprefix(codecs.BOM_UTF8) if line.offset == 0 else line.data
    decoded = decode_line(line.number or 0, raw)
    if entry := list_entry(decoded):
        yield _input_of(decoded, entry, line.path, line.where())


def _whole_if_utf16(path: str) -> Iterator[str | TaggedOutput]:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as file:
        head = file.read(2)
    yield TaggedOutput(UTF16, path) if is_utf16(head) else path


def checked_path(path: str) -> Iterator[str | TaggedOutput]:
    """A listed file as its normalised path, or as an error record when it cannot be read by
    name: a name that is not UTF-8 (on Linux, Latin-1 archives: it comes back from listing with
    lone surrogates, which no JSON line or Beam coder can carry), or a symbolic link that
    reaches no file."""
    path = normalise(path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        printable = os.fsencode(path).decode("utf-8", "backslashreplace")
        message = (
            f"the file name is not valid UTF-8: '{printable}'; rename it, e.g. with convmv "
            "(`convmv -f latin1 -t utf8 --notest FILE`)"
        )
        yield error_output(ErrorRecord(printable, "read", UNDECODABLE, message))
        return
    if not is_remote(path) and (problem := link_problem(path)):
        yield error_output(ErrorRecord(path, "read", *problem))
        return
    yield path


Found = tuple[tuple[PCollection[str], ...], PCollection[ErrorRecord]]


class ReadOutputs(NamedTuple):
    """What `ReadImagePaths(...).with_errors()` returns."""

    paths: PCollection[str]
    errors: PCollection[ErrorRecord]


class ReadImagePaths(beam.PTransform):
    """Distinct image URIs, spread across workers.

    `source` is a `dataset.txt`-style list (`.txt`/`.lst`), a glob, a single image, or a folder
    (searched recursively for image files). `limit` keeps a list's first N entries (read no
    further), or a folder's or glob's first N paths in sorted order: a reproducible sample for
    trial runs (a local or `gs://` tree is walked in that order and listed no further).

    Inputs that fail before any image is read (a list line or file name that is not text, a
    symbolic link to no file) are `ErrorRecord`s (stage `read`), one per input and sampled by
    `limit` like the paths: `ReadImagePaths(...).with_errors()` returns
    `ReadOutputs(paths, errors)` to route them to `errors.jsonl`; without it they are logged.

    Duplicates are dropped by the runner's shuffle or, with `spill_dir`, through files there
    (`GroupStrings`: for local runners, whose shuffles the launcher holds in memory).
    """

    def __init__(
        self, source: str, *, limit: int | None = None, spill_dir: str | None = None
    ) -> None:
        super().__init__()
        self.source = absolute(source)
        self.limit = limit
        self.spill_dir = spill_dir
        self.errors_output = False

    def with_errors(self) -> ReadImagePaths:
        """This transform, returning `ReadOutputs(paths, errors)` instead of the paths only."""
        transform = ReadImagePaths(self.source, limit=self.limit, spill_dir=self.spill_dir)
        transform.errors_output = True
        return transform

    def expand(self, pbegin: PBegin) -> PCollection[str] | ReadOutputs:
        paths, errors = pbegin | "Find" >> _FindPaths(self.source, self.limit)
        paths = paths | "Distinct" >> DistinctStrings(self.spill_dir)
        errors = errors | "DistinctErrors" >> _DistinctErrors()
        if self.limit is not None and input_kind(self.source) != InputKind.LIST:
            paths, errors = (paths, errors) | "FirstN" >> _FirstN(self.limit)
        if self.errors_output:
            return ReadOutputs(paths, errors)
        _ = errors | "LogErrors" >> beam.Map(_log_error)
        return paths


class DistinctStrings(beam.PTransform):
    """Each string once, spread over workers: grouped (`GroupStrings`: by the runner, or
    through files in `spill_dir`), not `beam.Distinct`, whose combiner a worker pre-applies
    in a table of up to 100,000 keys per bundle (memory that grows with the input, for
    duplicates that are rare here)."""

    def __init__(self, spill_dir: str | None = None) -> None:
        super().__init__()
        self.spill_dir = spill_dir

    def expand(self, strings: Strings) -> PCollection[str]:
        return (
            {"strings": strings}
            | "Group" >> GroupStrings(self.spill_dir)
            | "Strings" >> beam.Keys()
        )


def _log_error(error: ErrorRecord) -> None:
    logger.warning("not captioned: %s: %s: %s", error.image_uri, error.error_type, error.message)


class _ReadList(beam.PTransform):
    """`(paths, errors)` of a list file: in parallel byte ranges; with a `limit`, its first
    `limit` entries only, read by one worker that stops there."""

    def __init__(self, source: str, limit: int | None) -> None:
        super().__init__()
        self.source = source
        self.limit = limit

    def expand(self, pbegin: PBegin) -> Found:
        listing = pbegin | "ListFile" >> beam.Create([self.source])
        if self.limit is not None:
            limit = self.limit
            first = listing | "FirstEntries" >> beam.FlatMap(
                lambda path: itertools.islice(read_list(path), limit)
            ).with_outputs(ERRORS, main=PATHS)
            return (first[PATHS],), first[ERRORS]
        kinds = listing | "Kind" >> beam.FlatMap(_whole_if_utf16).with_outputs(UTF16, main=PATHS)
        whole = kinds[UTF16] | "Whole" >> beam.FlatMap(read_list).with_outputs(ERRORS, main=PATHS)
        ranged = (
            kinds[PATHS]
            | "Literal" >> beam.Map(literal)
            | "Ranges" >> ReadLines()
            | "Entries" >> beam.FlatMap(read_list_line).with_outputs(ERRORS, main=PATHS)
        )
        return (
            (whole[PATHS], ranged[PATHS]),
            (whole[ERRORS], ranged[ERRORS]) | "Errors" >> beam.Flatten(),
        )


class _FindPaths(beam.PTransform):
    """`(paths, errors)` as found, with duplicates; a list file's first `limit` entries. The
    paths come as the collections of the steps that found them, not flattened: a Flatten
    there would be held whole by a local runner."""

    def __init__(self, source: str, limit: int | None = None) -> None:
        super().__init__()
        self.source = source
        self.limit = limit

    def expand(self, pbegin: PBegin) -> Found:
        source, kind = self.source, input_kind(self.source)
        if kind == InputKind.LIST:
            return pbegin | "List" >> _ReadList(source, self.limit)
        # Listed and checked in one step: a name that is not UTF-8 cannot cross to another.
        images_only = kind == InputKind.FOLDER
        if kind == InputKind.IMAGE:
            listed = pbegin | "Image" >> beam.Create([source])
            check = beam.FlatMap(checked_path)
        elif images_only and _listed_in_parallel(source):
            return pbegin | "Folder" >> _ListTree(source, limit=self.limit)
        elif not images_only and _listed_in_parallel((glob := Glob(source)).root):
            return pbegin | "Glob" >> _ListTree(glob.root, glob, self.limit)
        else:
            pattern = join(source.rstrip("/"), "**") if images_only else source
            listed = (
                pbegin
                | "Patterns" >> beam.Create(pattern_variants(pattern))
                | "Match" >> MatchAll(EmptyMatchTreatment.ALLOW)
            )
            check = beam.FlatMap(lambda file: _checked(file.path, images_only))
        found = listed | "List" >> check.with_outputs(ERRORS, main=PATHS)
        return (found[PATHS],), found[ERRORS]


class _Tree:
    """What to take from a listed tree: a folder's image files, or a glob's matches (`Glob`:
    from its root, only the subfolders that can hold matches, only as deep as they lie)."""

    def __init__(self, glob: Glob | None = None) -> None:
        self.glob = glob

    def files(self, paths: Iterable[str]) -> Iterator[str | TaggedOutput]:
        for path in paths:
            FILES_LISTED.inc()
            if self.glob is None:
                yield from _checked(path, True)
            elif self.glob.matches(path):
                yield from _checked(path, False)

    def wants(self, subfolder: str) -> bool:
        return self.glob is None or self.glob.may_hold_matches(subfolder)

    def top_level(self, root: str) -> Iterator[str | TaggedOutput]:
        """The root's own files (checked), and its subfolders to be listed by other workers:
        as bytes, so that a local name that is not UTF-8 crosses too. As in `walk_files`,
        local symbolic links to folders are not followed."""
        if is_remote(root):
            files, subfolders = gcs_top_level(root)
            yield from self.files(files)
            for folder in filter(self.wants, subfolders):
                yield TaggedOutput(SUBFOLDERS, folder.encode("utf-8"))
            return
        for _, names, files in itertools.islice(os.walk(root), 1):
            yield from self.files(os.path.join(root, name) for name in files)
            for name in names:
                path = os.path.join(root, name)
                marked = os.path.exists(os.path.join(path, SKIP_MARKER))
                if not os.path.islink(path) and not marked and self.wants(path):
                    yield TaggedOutput(SUBFOLDERS, os.fsencode(path))

    def in_order(self, root: str) -> Iterator[str | TaggedOutput]:
        """The whole tree's inputs in sorted order, listed lazily: for `--limit`, which takes
        the first N and lists no further."""
        if is_remote(root):
            yield from self.files(gcs_in_order(root))
            return
        depth = None if self.glob is None else self.glob.depth
        yield from self.files(walk_in_order(root, depth, self.wants))

    def walk(self, folder: str) -> Iterator[str | TaggedOutput]:
        """Every file under one of the root's subfolders that is taken, at any depth a
        match can lie."""
        if not is_remote(folder):
            depth = None if self.glob is None else self.glob.depth_below()
            yield from self.files(walk_files(folder, depth))
            return
        # By its literal prefix: a folder named `set[1]` is no pattern (Beam's have no escape).
        yield from self.files(gcs_in_order(folder))


class _ListTree(beam.PTransform):
    """`(paths, errors)` of a local or `gs://` folder, or of a glob there: the top level
    here, each subfolder's whole tree by whichever worker it lands on, so that a tree of
    millions of files is listed in parallel. With a `limit`, the first `limit` inputs in
    sorted order, walked in that order by one worker that stops there."""

    def __init__(self, root: str, glob: Glob | None = None, limit: int | None = None) -> None:
        super().__init__()
        self.root = root
        self.tree = _Tree(glob)
        self.limit = limit

    def expand(self, pbegin: PBegin) -> Found:
        listed = Metrics.counter("captionflow", "subfolders_listed")
        tree, limit = self.tree, self.limit
        root = pbegin | "Root" >> beam.Create([self.root])
        if limit is not None:
            first = root | "FirstInOrder" >> beam.FlatMap(
                lambda root: itertools.islice(tree.in_order(root), limit)
            ).with_outputs(ERRORS, main=PATHS)
            return (first[PATHS],), first[ERRORS]

        def walk(folder: bytes) -> Iterator[str | TaggedOutput]:
            listed.inc()
            yield from tree.walk(os.fsdecode(folder))

        top_level = beam.FlatMap(tree.top_level).with_outputs(ERRORS, SUBFOLDERS, main=PATHS)
        top = root | "TopLevel" >> top_level
        deeper = (
            top[SUBFOLDERS]
            | "Spread" >> beam.Reshuffle()
            | "Walk" >> beam.FlatMap(walk).with_outputs(ERRORS, main=PATHS)
        )
        return (
            (top[PATHS], deeper[PATHS]),
            (top[ERRORS], deeper[ERRORS]) | "Errors" >> beam.Flatten(),
        )


def _listed_in_parallel(folder: str) -> bool:
    """Local folders (listed here: Beam's local listing drops broken links) and `gs://`
    folders (a delimited listing of the top level) are; other object stores are paged
    through by Beam's matching, one worker per pattern."""
    return not is_remote(folder) or (folder.startswith("gs://") and folder[5:].strip("/") != "")


def _checked(path: str, images_only: bool) -> Iterator[str | TaggedOutput]:
    """Of a folder, only what looks like an image; of a glob, all it matches but a report's
    thumbnails (a folder's listing never enters a report)."""
    if images_only and not looks_like_image(path):
        return
    if not images_only and is_marked_thumbnail(path):
        return
    yield from checked_path(path)


def _first_error(errors: Iterable[ErrorRecord]) -> ErrorRecord:
    return min(errors, key=lambda error: error.message)  # any one, the same on every run


class _DistinctErrors(beam.PTransform):
    """One error record per `image_uri` (a bad line listed twice is one input), so that the
    summary counts inputs, as `Distinct` does for paths."""

    def expand(self, errors: PCollection[ErrorRecord]) -> PCollection[ErrorRecord]:
        return (
            errors
            | "ByUri" >> beam.Map(lambda error: (error.image_uri, error))
            | "One" >> beam.CombinePerKey(_first_error)
            | "Records" >> beam.Values()
        )


def _split_first(entry: tuple[str, ErrorRecord | None]) -> Iterator[str | TaggedOutput]:
    uri, error = entry
    yield uri if error is None else TaggedOutput(ERRORS, error)


class _FirstN(beam.PTransform):
    """The first `n` inputs in sorted order, good paths and error records alike: a sample of
    the inputs, each of which still ends in the output or in the errors."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def expand(
        self, inputs: tuple[PCollection[str], PCollection[ErrorRecord]]
    ) -> tuple[PCollection[str], PCollection[ErrorRecord]]:
        paths, errors = inputs
        first = (
            (
                paths | "KeyPaths" >> beam.Map(lambda uri: (uri, None)),
                errors | "KeyErrors" >> beam.Map(lambda error: (error.image_uri, error)),
            )
            | "All" >> beam.Flatten()
            | "Smallest" >> beam.combiners.Top.Smallest(self.n, key=lambda entry: entry[0])
            | "Each" >> beam.FlatMap(lambda smallest: smallest)
            | "Split" >> beam.FlatMap(_split_first).with_outputs(ERRORS, main=PATHS)
        )
        return first[PATHS] | "Spread" >> beam.Reshuffle(), first[ERRORS]
