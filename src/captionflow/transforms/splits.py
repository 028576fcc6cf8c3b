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
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.pvalue import PCollection
from apache_beam.utils.windowed_value import WindowedValue

from captionflow.jsonl import dumps
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
SPLIT_WORDS = ("train", "training", "validation", "valid", "dev", "val", "test", "testing")
SPLIT_WORDS += ("eval", "evaluation")
_SPLIT_NAME = re.compile(rf"(?:.*[-._ 0-9])?(?:{'|'.join(SPLIT_WORDS)})(?:[-._ 0-9].*)?", re.S)


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


def _in_split(line: Line) -> Iterator[tuple[str, str]]:
    if not line.data.strip():
        return
    row: dict[str, Any] = json.loads(line.data)
    if folder := split_folder(row.get("file_name", "")):
        yield folder, dumps({**row, "file_name": row["file_name"][len(folder) + 1 :]})


class CountInSplitFolders(beam.PTransform):
    """Image URIs in; how many lie in split folders of `output_dir` out (one count, combined
    where the URIs are made)."""

    def __init__(self, output_dir: str) -> None:
        super().__init__()
        self.output_dir = output_dir

    def expand(self, uris: PCollection[str]) -> PCollection[int]:
        file_name = file_name_in(self.output_dir)
        return (
            uris
            | "InSplitFolder" >> beam.Filter(lambda uri: split_folder(file_name(uri)) is not None)
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
