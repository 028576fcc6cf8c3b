"""Writing results: one JSON-lines file, complete or absent, on any Beam filesystem.

Each bundle writes its own part files (temp name, then rename) as records arrive: the job's
checkpoints. At the end the parts are joined in groups, in parallel, then the groups into the
destination through a temp file and a rename, so no reader ever sees a partial file. Joining
copies bytes: nothing holds the records, or one of their keys, in memory.

Only the parts that successful bundles report are joined, so a retried bundle's first attempt
adds nothing. With `resume`, an earlier run's lines (its file and the parts it left, which may
repeat a record) are read in parallel, kept once per key (by the runner, or through spill
files: `GroupPairs`), and rewritten as parts of this run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton, PCollection
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.windowed_value import WindowedValue

from captionflow.fatal import FatalError
from captionflow.jsonl import dumps
from captionflow.listing import delete_files, literal
from captionflow.paths import absolute, is_remote, join, split
from captionflow.records import CaptionRecord, ErrorRecord
from captionflow.transforms.errors import ErrorRecords
from captionflow.transforms.grouping import GroupPairs, each
from captionflow.transforms.lines import Line, ReadLines

METADATA_FILE = "metadata.jsonl"
ERRORS_FILE = "errors.jsonl"
REJECTED_FILE = "rejected.jsonl"
PARTS_PER_GROUP = 1000  # parts one worker joins: opening many small objects is what costs
COPY_CHUNK = 8 << 20
STAGING = ".tmp-"  # a file being joined: `metadata.jsonl.tmp-<hex>`, renamed once complete


def parts_dir(destination: str) -> str:
    """Where the bundles of a run park their parts: hidden, beside the destination."""
    head, tail = split(destination)
    return join(head, f".{tail}.parts")


def earlier_files(destination: str, *, finished: bool = True) -> list[str]:
    """Patterns of what a run of `destination` leaves: the finished file (unless not
    `finished`), and the parts of a run that was stopped before joining them."""
    parts = join(literal(parts_dir(destination)), "part-*.jsonl")
    return [literal(destination), parts] if finished else [parts]


class WriteParts(beam.DoFn):
    """Part files of at most `lines_per_part` lines, each visible under its final name only
    once complete. Small parts are checkpoints: a killed job keeps what they hold."""

    def __init__(self, directory: str, lines_per_part: int, prefix: str) -> None:
        self.directory = directory
        self.lines_per_part = lines_per_part
        self.prefix = prefix

    def start_bundle(self) -> None:
        self._file: Any = None
        self._lines = 0

    def process(self, line: str) -> Iterator[str]:
        if self._file is None:
            self._name = f"{self.prefix}{uuid.uuid4().hex}"
            self._file = FileSystems.create(join(self.directory, f".tmp-{self._name}"))
        self._file.write(line.encode("utf-8") + b"\n")
        self._lines += 1
        if self._lines >= self.lines_per_part:
            yield self._close()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        if self._file is not None:
            yield GlobalWindows.windowed_value(self._close())

    def _close(self) -> str:
        self._file.close()
        part = join(self.directory, f"part-{self._name}.jsonl")
        FileSystems.rename([join(self.directory, f".tmp-{self._name}")], [part])
        self._file, self._lines = None, 0
        return part


Key = Callable[[dict[str, Any]], str]
Lines = PCollection[str] | tuple[PCollection[str], ...]


def concatenate(sources: Iterable[str], destination: str) -> str:
    """The bytes of `sources`, in order, into `destination` (temp name, then rename)."""
    staging = f"{destination}{STAGING}{uuid.uuid4().hex}"
    with FileSystems.create(staging) as out:
        for source in sources:
            with FileSystems.open(source, compression_type="uncompressed") as file:
                shutil.copyfileobj(file, out, COPY_CHUNK)
    FileSystems.rename([staging], [destination])
    return destination


def remove_folder(directory: str) -> None:
    """Delete a folder of files (a parts or staging folder): its files by listing (object
    stores have no folders), then the local folder itself."""
    leftovers = FileSystems.match([join(literal(directory), "*")])[0].metadata_list
    if leftovers:
        delete_files([file.path for file in leftovers])
    if not is_remote(directory) and os.path.isdir(directory):
        os.rmdir(directory)


class _JoinGroup(beam.DoFn):
    """One group of parts into one file of the parts folder."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.joined = Metrics.counter("captionflow", "part_groups_joined")

    def process(self, group: tuple[int, Iterable[str]]) -> Iterator[str]:
        index, parts = group
        name = join(self.directory, f"group-{index:06d}-{uuid.uuid4().hex}.jsonl")
        yield concatenate(sorted(set(parts)), name)
        self.joined.inc()


def _finish(groups: list[str], destination: str) -> str:
    concatenate(sorted(groups), destination)
    remove_folder(parts_dir(destination))
    # The partial temp copies of a run that was killed while joining (one run at a time).
    if left := FileSystems.match([f"{literal(destination)}{STAGING}*"])[0].metadata_list:
        delete_files([file.path for file in left])
    return destination


class JoinParts(beam.PTransform):
    """Part paths in; the destination, complete, out: the parts hashed into groups of about
    `parts_per_group` (the sizes vary with the hash), each joined by a parallel step, then the
    groups into the destination (temp name, then rename).
    The parts' folder (`parts_dir(destination)`) is removed at the end."""

    def __init__(self, destination: str, parts_per_group: int = PARTS_PER_GROUP) -> None:
        super().__init__()
        self.destination = destination
        self.parts_per_group = parts_per_group

    def expand(self, parts: PCollection[str]) -> PCollection[str]:
        per_group = self.parts_per_group

        def group_of(part: str, count: int) -> tuple[int, str]:
            return zlib.crc32(part.encode("utf-8")) % math.ceil(count / per_group), part

        count = parts | "Count" >> beam.combiners.Count.Globally()
        return (
            parts
            | "ToGroups" >> beam.Map(group_of, AsSingleton(count))
            | "Groups" >> beam.GroupByKey()
            | "JoinGroups" >> beam.ParDo(_JoinGroup(parts_dir(self.destination)))
            | "AllGroups" >> beam.combiners.ToList()
            | "Finish" >> beam.Map(_finish, self.destination)
        )


class ResumeError(FatalError):
    """An earlier output that cannot be read back: resuming would redo or lose work."""


def earlier_record(line: Line) -> Any:
    """A line an earlier run wrote, as its JSON value."""
    try:
        return json.loads(line.data)
    except ValueError:
        raise ResumeError(
            f"cannot resume from {line.where()}: not a JSON record; fix or delete that line"
        ) from None


def _keyed(line: Line, key: Key) -> tuple[str, str]:
    return key(earlier_record(line)), line.data.decode("utf-8")


class _ReadEarlier(beam.PTransform):
    """An earlier run's lines of `destination`, once per key; this run's parts (named with
    `run`) excluded, as they may already exist when the earlier ones are listed; the finished
    file too unless `finished` (it is an earlier run's, which this run replaces). Grouped
    (`GroupPairs`: by the runner, or through files in `spill_dir`) without a combiner, which
    workers would pre-apply in tables of up to a million lines."""

    def __init__(
        self, destination: str, key: Key, run: str, spill_dir: str | None, *, finished: bool
    ) -> None:
        super().__init__()
        self.destination = destination
        self.finished = finished
        self.key = key
        self.mine = join(parts_dir(destination), f"part-{run}-")
        self.spill_dir = spill_dir

    def expand(self, pbegin: beam.pvalue.PBegin) -> PCollection[str]:
        return (
            pbegin
            | "Files" >> beam.Create(earlier_files(self.destination, finished=self.finished))
            | "Read" >> ReadLines(exclude=self.mine)
            | "NotBlank" >> beam.Filter(lambda line: line.data.strip())
            | "Keyed" >> beam.Map(_keyed, self.key)
            | "ByKey" >> GroupPairs(self.spill_dir)
            | "OnePerKey" >> beam.MapTuple(lambda _, lines: min(lines))
        )


class WriteJsonLines(beam.PTransform):
    """JSON lines to exactly one file at `destination`, written atomically.

    Parts appear while the job runs, every `lines_per_part` lines per worker: they are its
    checkpoints. `lines` may be a tuple of collections, each written where it is made (a
    local runner holds a Flatten's whole output; only the parts' names are flattened). With
    `resume`, the lines an earlier run of the same destination wrote (its
    file and its parts) are kept too, one per `key` (a field's name, or a function of the
    record), grouped by the runner or, with `spill_dir`, through files there (`GroupPairs`);
    without `keep_finished`, only the parts (a retry of a run that replaces the finished file
    keeps what its failed attempts wrote, not that file). Parts are joined in groups of about
    `parts_per_group`, in parallel, then into the file.
    Returns a one-element PCollection with the destination path once it is complete.
    """

    def __init__(
        self,
        destination: str,
        *,
        key: str | Key,
        lines_per_part: int = 1000,
        resume: bool = False,
        keep_finished: bool = True,
        parts_per_group: int = PARTS_PER_GROUP,
        spill_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.destination = absolute(destination)
        self.keep_finished = keep_finished
        self.spill_dir = spill_dir
        self.key: Key = (lambda record: record[key]) if isinstance(key, str) else key
        self.lines_per_part = lines_per_part
        self.resume = resume
        self.parts_per_group = parts_per_group
        self.run = uuid.uuid4().hex[:12]  # names this run's parts

    def expand(self, lines: Lines) -> PCollection[str]:
        directory = parts_dir(self.destination)
        prefix = f"{self.run}-"
        parts = each(
            lines,
            "WriteParts",
            lambda: beam.ParDo(WriteParts(directory, self.lines_per_part, prefix)),
        )
        if self.resume:
            earlier = (
                parts[0].pipeline
                | "ReadEarlier"
                >> _ReadEarlier(
                    self.destination,
                    self.key,
                    self.run,
                    self.spill_dir,
                    finished=self.keep_finished,
                )
                # Bigger parts: these hold finished work, not checkpoints of new work.
                | "WriteEarlier"
                >> beam.ParDo(WriteParts(directory, self.lines_per_part * 10, prefix))
            )
            parts += (earlier,)
        joined = parts[0] if len(parts) == 1 else parts | "AllParts" >> beam.Flatten()
        return joined | "Join" >> JoinParts(self.destination, self.parts_per_group)


def file_name_in(output_dir: str) -> Callable[[str], str]:
    """An image URI as ImageFolder's `file_name`: relative to the output folder (with `/`)
    when the image lies under it, else the full URI."""
    prefix = absolute(output_dir).rstrip("/" if is_remote(output_dir) else os.sep)
    prefix += "/" if is_remote(output_dir) else os.sep

    def file_name(uri: str) -> str:
        name = uri[len(prefix) :] if uri.startswith(prefix) else uri
        return name if is_remote(uri) else name.replace(os.sep, "/")

    return file_name


def imagefolder_row(output_dir: str) -> Callable[[CaptionRecord], str]:
    """A record as a Hugging Face ImageFolder metadata line (`file_name` from `file_name_in`)."""
    file_name = file_name_in(output_dir)

    def row(record: CaptionRecord) -> str:
        return dumps({"file_name": file_name(record.image_uri), **record.to_dict()})

    return row


class ToImageFolderRows(beam.PTransform):
    """`CaptionRecord`s to ImageFolder metadata lines for `output_dir` (see `imagefolder_row`)."""

    def __init__(self, output_dir: str) -> None:
        super().__init__()
        self.output_dir = output_dir

    def expand(self, records: PCollection[CaptionRecord]) -> PCollection[str]:
        return records | "ToRow" >> beam.Map(imagefolder_row(self.output_dir))


class WriteMetadata(beam.PTransform):
    """`CaptionRecord`s to `<output_dir>/metadata.jsonl`, loadable with
    `datasets.load_dataset("imagefolder", data_dir=output_dir)` when the images lie under it."""

    def __init__(
        self, output_dir: str, *, filename: str = METADATA_FILE, lines_per_part: int = 1000
    ) -> None:
        super().__init__()
        self.output_dir = absolute(output_dir)
        self.filename = filename
        self.lines_per_part = lines_per_part

    def expand(self, records: PCollection[CaptionRecord]) -> PCollection[str]:
        destination = join(self.output_dir, self.filename)
        return (
            records
            | "ToRows" >> ToImageFolderRows(self.output_dir)
            | "Write"
            >> WriteJsonLines(destination, key="image_uri", lines_per_part=self.lines_per_part)
        )


class WriteErrors(beam.PTransform):
    """`ErrorRecord`s to `<output_dir>/errors.jsonl`, one line per failed image: one
    collection, or a tuple of them (`CaptionImages(...).with_errors_apart()`), each written
    where it is made."""

    def __init__(self, output_dir: str, *, filename: str = ERRORS_FILE) -> None:
        super().__init__()
        self.output_dir = absolute(output_dir)
        self.filename = filename

    def expand(self, errors: ErrorRecords) -> PCollection[str]:
        rows = each(errors, "ToRow", lambda: beam.Map(_error_row))
        return rows | "Write" >> WriteJsonLines(
            join(self.output_dir, self.filename), key="image_uri"
        )


def _error_row(error: ErrorRecord) -> str:
    return dumps(error.to_dict())
