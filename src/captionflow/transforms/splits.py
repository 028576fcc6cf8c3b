"""Per-split metadata files, for images that lie in split folders (`train/`, `val/`, ...).

`datasets`' ImageFolder takes folders named after a split (`train`, `validation`, `test`
and their variants, alone or joined to other words by `-._ ` or digits) for splits, and then
reads only the metadata files inside them: the root `metadata.jsonl` is ignored, and the
captions with it. So a run whose images lie in split folders also writes
`<split folder>/metadata.jsonl`, its `file_name`s relative to that folder, from the finished
root file (which stays the run's record), read in ranges; the parts of each split folder are
joined by a step of its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.pvalue import AsSingleton, PCollection
from apache_beam.utils.windowed_value import WindowedValue

from captionflow.jsonl import dumps
from captionflow.listing import literal
from captionflow.paths import join
from captionflow.transforms.lines import Line, ReadLines
from captionflow.transforms.write import (
    METADATA_FILE,
    WriteParts,
    concatenate,
    file_name_in,
    parts_dir,
    remove_folder,
)

# `datasets.data_files.SPLIT_KEYWORDS` and the separators of its folder patterns.
SPLIT_WORDS = (
    "train",
    "training",
    "validation",
    "valid",
    "dev",
    "val",
    "test",
    "testing",
    "eval",
    "evaluation",
)
_WORDS = "|".join(SPLIT_WORDS)
# `datasets`' split of each word (`datasets.data_files.SPLIT_KEYWORDS`), in its order.
_SPLITS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SPLIT_NAME = re.compile(rf"(?:.*[-._ 0-9])?(?:{_WORDS})(?:[-._ 0-9].*)?", re.S)
_SPLIT_FILE_NAME = re.compile(rf"(?:.*[-._ 0-9])?(?:{_WORDS})[-._ 0-9].*", re.S)


def split_folder(file_name: str) -> str | None:
    """The folder of `file_name` (a metadata row's, relative, `/`-separated) that `datasets`
    takes for a split: the shallowest whose name is or holds a split word (`train`,
    `val-2024`, `my_test`, not `trainer` or `latest`); None outside split folders."""
    if "://" in file_name or file_name.startswith("/"):
        return None
    folders = file_name.split("/")[:-1]
    for depth, name in enumerate(folders):
        if _SPLIT_NAME.fullmatch(name):
            return "/".join(folders[: depth + 1])
    return None


def split_name(file_name: str) -> str:
    """The split `datasets` puts a metadata row's image in: its split folder's (`val-2024/`
    -> `validation`, `my_test/` -> `test`), `train` outside split folders."""
    folder = split_folder(file_name)
    name = folder.rpartition("/")[2] if folder else ""
    for split, words in _SPLITS.items():
        for word in words:
            if re.fullmatch(rf"(?:.*[-._ 0-9])?{word}(?:[-._ 0-9].*)?", name, re.S):
                return split
    return "train"


def named_like_split(file_name: str) -> bool:
    """Whether `datasets` would take this file's name for a split's (`test.jpg`,
    `photo_val_2.png`): with no split folder, one such name makes it split the folder by file
    names and drop every metadata file."""
    local = "://" not in file_name and not file_name.startswith("/")
    return local and _SPLIT_FILE_NAME.fullmatch(file_name.rsplit("/", 1)[-1]) is not None


def split_names_warning(in_folders: int, named: int) -> list[str]:
    """The summary's warning when `datasets` would split the output by file names."""
    if in_folders or not named:
        return []
    return [
        f"{named} image file name(s) look like split names to `datasets` (e.g. `test.jpg`, "
        "`photo_val_2.png`): `load_dataset('imagefolder', data_dir=...)` would split by file "
        "names and drop the captions; load with data_files={'train': 'OUTPUT/**'} instead"
    ]


def backslashes_warning(count: int) -> list[str]:
    """The summary's warning when file names hold a backslash: legal on POSIX filesystems,
    but `datasets` takes it for a folder separator, and fails to open those images."""
    if not count:
        return []
    return [
        f"{count} image file name(s) hold a backslash, which `datasets` reads as a folder "
        "separator: `load_dataset('imagefolder', ...)` fails to open them; rename them"
    ]


def _in_split(line: Line) -> Iterator[tuple[str, str]]:
    if not line.data.strip():
        return
    row: dict[str, Any] = json.loads(line.data)
    if folder := split_folder(row.get("file_name", "")):
        yield folder, dumps({**row, "file_name": row["file_name"][len(folder) + 1 :]})


class CountFileNames(beam.PTransform):
    """Image URIs in; how many have a `file_name` in `output_dir` that passes `test` out (one
    count, combined where the URIs are made)."""

    def __init__(self, output_dir: str, test: Callable[[str], object]) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.test = test

    def expand(self, uris: PCollection[str]) -> PCollection[int]:
        file_name, test = file_name_in(self.output_dir), self.test
        return (
            uris
            | "Passing" >> beam.Filter(lambda uri: bool(test(file_name(uri))))
            | "Count" >> beam.combiners.Count.Globally()
        )


class _WriteSplitParts(beam.DoFn):
    """`(split folder, line)` pairs into part files of each folder's metadata; `(folder,
    part)` out for each part written."""

    def __init__(self, output_dir: str, lines_per_part: int) -> None:
        self.output_dir = output_dir
        self.lines_per_part = lines_per_part

    def start_bundle(self) -> None:
        self._writers: dict[str, WriteParts] = {}

    def process(self, pair: tuple[str, str]) -> Iterator[tuple[str, str]]:
        folder, line = pair
        if folder not in self._writers:
            destination = join(join(self.output_dir, folder), METADATA_FILE)
            self._writers[folder] = WriteParts(parts_dir(destination), self.lines_per_part, "")
            self._writers[folder].start_bundle()
        for part in self._writers[folder].process(line):
            yield folder, part

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for folder, writer in self._writers.items():
            for part in writer.finish_bundle():
                yield part.with_value((folder, part.value))


class WriteSplitMetadata(beam.PTransform):
    """Finished metadata files' paths in (`metadata.jsonl` of `output_dir`); for each split
    folder its rows are in, `<folder>/metadata.jsonl` out (`file_name` relative to it)."""

    def __init__(self, output_dir: str, *, lines_per_part: int = 10_000) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.lines_per_part = lines_per_part

    def expand(self, paths: PCollection[str]) -> PCollection[str]:
        return (
            paths
            | "Literal" >> beam.Map(literal)
            | "Read" >> ReadLines()
            | "InSplits" >> beam.FlatMap(_in_split)
            | "WriteParts" >> beam.ParDo(_WriteSplitParts(self.output_dir, self.lines_per_part))
            | "ByFolder" >> beam.GroupByKey()
            | "Join" >> beam.MapTuple(self._join)
        )

    def _join(self, folder: str, parts: Iterable[str]) -> str:
        destination = join(join(self.output_dir, folder), METADATA_FILE)
        concatenate(sorted(set(parts)), destination)
        remove_folder(parts_dir(destination))
        return destination


class ForSplits(beam.PTransform):
    """What `datasets` needs of an output whose images lie in split folders or have names
    like splits' (or names it misreads: a backslash): `(finished metadata path, captioned
    image URIs, kept image URIs)` in; `(split files, warnings)` out, one list each. The
    split folders' metadata files (`WriteSplitMetadata`) are written only if some image lies
    in one, and the file is read again only then."""

    def __init__(self, output_dir: str) -> None:
        super().__init__()
        self.output_dir = output_dir

    def expand(
        self, inputs: tuple[PCollection[str], PCollection[str], PCollection[str]]
    ) -> tuple[PCollection[list[str]], PCollection[list[str]]]:
        metadata, *uris = inputs

        def how_many(name: str, test: Callable[[str], object]) -> list[AsSingleton]:
            return [
                AsSingleton(each | f"{name} {i}" >> CountFileNames(self.output_dir, test))
                for i, each in enumerate(uris)
            ]

        in_folders = how_many("InSplitFolders", split_folder)
        named = how_many("NamedLikeSplits", named_like_split)
        backslashes = how_many("Backslashes", lambda name: "\\" in name)
        files = (
            metadata
            | "IfSplitFolders" >> beam.Filter(lambda _, *counts: sum(counts) > 0, *in_folders)
            | "Write" >> WriteSplitMetadata(self.output_dir)
            | "Files" >> beam.combiners.ToList()
        )

        def lines(_: str, *counts: int) -> list[str]:
            n = len(in_folders)  # as many counts of each kind
            return split_names_warning(
                sum(counts[:n]), sum(counts[n : 2 * n])
            ) + backslashes_warning(sum(counts[2 * n :]))

        warnings = metadata | "Warnings" >> beam.Map(lines, *in_folders, *named, *backslashes)
        return files, warnings
