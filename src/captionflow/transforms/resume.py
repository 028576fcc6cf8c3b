"""Finishing a job that stopped half way: what an earlier run wrote is kept, not redone."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.pvalue import PBegin, PCollection, TaggedOutput

from captionflow.paths import absolute, is_remote, join
from captionflow.transforms.grouping import Grouped, GroupStrings
from captionflow.transforms.lines import Line, ReadLines
from captionflow.transforms.write import ResumeError, earlier_files, earlier_record

__all__ = ["KEPT", "ReadDone", "ResumeError", "SkipDone", "metadata_key"]

KEPT = "kept"


def metadata_key(output_dir: str) -> Callable[[dict[str, Any]], str]:
    """The image a metadata record is about: its `image_uri`, or, for files trimmed to
    `{file_name, text}` before training, its `file_name` resolved against `output_dir`."""

    def key(record: dict[str, Any]) -> str:
        if "image_uri" in record:
            return record["image_uri"]
        name = record["file_name"]
        if is_remote(name) or os.path.isabs(name):
            return name
        return absolute(join(output_dir, name))

    return key


def _done_image(line: Line, key: Callable[[dict[str, Any]], str]) -> Iterator[str]:
    if not line.data.strip():
        return
    record = earlier_record(line)
    if not isinstance(record, dict) or not {"image_uri", "file_name"} & set(record):
        raise ResumeError(
            f"cannot resume from {line.where()}: a record needs an image_uri or a file_name; "
            "fix or delete that line"
        )
    yield key(record)


class ReadDone(beam.PTransform):
    """The images an earlier run already captioned into `metadata_path` (and into `also`, the
    run's other record files, such as `rejected.jsonl`): those of the finished files, and of
    the parts a run that was stopped before joining them left; of the files in `replaced`
    (an earlier run's, which this run replaces), only the parts. Read in parallel, in ranges."""

    def __init__(
        self,
        metadata_path: str,
        output_dir: str,
        *,
        also: Sequence[str] = (),
        replaced: Collection[str] = (),
    ) -> None:
        super().__init__()
        self.patterns = [
            pattern
            for path in (metadata_path, *also)
            for pattern in earlier_files(path, finished=path not in replaced)
        ]
        self.key = metadata_key(output_dir)

    def expand(self, pbegin: PBegin) -> PCollection[str]:
        return (
            pbegin
            | "Files" >> beam.Create(self.patterns)
            | "Read" >> ReadLines()
            | "Images" >> beam.FlatMap(_done_image, self.key)
        )


def _still_to_do(grouped: Grouped) -> Iterator[str | TaggedOutput]:
    uri, found = grouped
    if "todo" in found:
        yield TaggedOutput(KEPT, uri) if "done" in found else uri


class SkipDone(beam.PTransform):
    """`(uris, done_uris) | SkipDone()`: the URIs still to caption (main output), and on `kept`
    the input URIs an earlier run already captioned. Done images that are not among the
    inputs are neither: their records stay in the output, but this run does not count them.
    Joined by the runner's shuffle, or through files in `spill_dir` (`GroupStrings`)."""

    def __init__(self, spill_dir: str | None = None) -> None:
        super().__init__()
        self.spill_dir = spill_dir

    def expand(
        self, inputs: tuple[PCollection[str], PCollection[str]]
    ) -> beam.pvalue.DoOutputsTuple:
        uris, done = inputs
        return (
            {"todo": uris, "done": done}
            | "Join" >> GroupStrings(self.spill_dir)
            | "Todo" >> beam.FlatMap(_still_to_do).with_outputs(KEPT, main="todo")
        )
