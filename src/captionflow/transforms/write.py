"""Writing results: one JSON-lines file, complete or absent, on any Beam filesystem.

Each bundle writes its own part file (temp name, then rename); a last step joins the parts into
the destination through a temp file and a rename, so no reader ever sees a partial file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import PCollection
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.windowed_value import WindowedValue

from captionflow.jsonl import dumps, read_json_lines
from captionflow.paths import absolute, is_remote, join, split
from captionflow.records import CaptionRecord, ErrorRecord

METADATA_FILE = "metadata.jsonl"
ERRORS_FILE = "errors.jsonl"
REJECTED_FILE = "rejected.jsonl"


def parts_dir(destination: str) -> str:
    """Where the bundles of a run park their parts: hidden, beside the destination."""
    head, tail = split(destination)
    return join(head, f".{tail}.parts")


class _WriteParts(beam.DoFn):
    """Part files of at most `lines_per_part` lines, each visible under its final name only
    once complete. Small parts are checkpoints: a killed job keeps what they hold."""

    def __init__(self, directory: str, lines_per_part: int) -> None:
        self.directory = directory
        self.lines_per_part = lines_per_part

    def start_bundle(self) -> None:
        self._file: Any = None
        self._lines = 0

    def process(self, line: str) -> Iterator[str]:
        if self._file is None:
            self._name = uuid.uuid4().hex
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


def merge_parts(
    parts: Iterable[str], destination: str, key: str | Key, *, resume: bool = False
) -> str:
    """Join part files into `destination` atomically, keeping the first line for each `key`
    (a retried bundle may have written a part twice).

    With `resume`, what an earlier run left is joined first: its finished `destination` and
    the parts it checkpointed before it was stopped.
    """
    key_of = (lambda record: record[key]) if isinstance(key, str) else key
    sources = sorted(set(parts))
    if resume:
        earlier = FileSystems.match([join(parts_dir(destination), "part-*.jsonl")])[0]
        sources = sorted(set(sources) | {file.path for file in earlier.metadata_list})
        if FileSystems.exists(destination):
            sources.insert(0, destination)
    staging = f"{destination}.tmp-{uuid.uuid4().hex}"
    seen: set[str] = set()
    with FileSystems.create(staging) as out:
        for source in sources:
            for _, record in read_json_lines(source):
                if (record_key := key_of(record)) not in seen:
                    seen.add(record_key)
                    out.write(dumps(record).encode("utf-8") + b"\n")
    FileSystems.rename([staging], [destination])
    remove_folder(parts_dir(destination))
    return destination


def remove_folder(directory: str) -> None:
    """Delete a folder of files (a parts or staging folder): its files by listing (object
    stores have no folders), then the local folder itself."""
    leftovers = FileSystems.match([join(directory, "*")])[0].metadata_list
    if leftovers:
        FileSystems.delete([file.path for file in leftovers])
    if not is_remote(directory) and os.path.isdir(directory):
        os.rmdir(directory)


class WriteJsonLines(beam.PTransform):
    """JSON lines to exactly one file at `destination`, unique by `key`, written atomically.

    Parts appear while the job runs, every `lines_per_part` lines per worker: they are its
    checkpoints. With `resume`, the lines an earlier run of the same destination wrote (its
    file and its parts) are kept too. `key` names a field, or computes a line's key.
    Returns a one-element PCollection with the destination path once it is complete.
    """

    def __init__(
        self,
        destination: str,
        *,
        key: str | Key,
        lines_per_part: int = 1000,
        resume: bool = False,
    ) -> None:
        super().__init__()
        self.destination = absolute(destination)
        self.key = key
        self.lines_per_part = lines_per_part
        self.resume = resume

    def expand(self, lines: PCollection[str]) -> PCollection[str]:
        return (
            lines
            | "WriteParts"
            >> beam.ParDo(_WriteParts(parts_dir(self.destination), self.lines_per_part))
            | "CollectParts" >> beam.combiners.ToList()
            | "Merge" >> beam.Map(merge_parts, self.destination, self.key, resume=self.resume)
        )


def imagefolder_row(output_dir: str) -> Callable[[CaptionRecord], str]:
    """A record as a Hugging Face ImageFolder metadata line: `file_name` relative to the
    output folder when the image lies under it, else its full URI."""
    prefix = absolute(output_dir).rstrip("/" if is_remote(output_dir) else os.sep)
    prefix += "/" if is_remote(output_dir) else os.sep

    def row(record: CaptionRecord) -> str:
        uri = record.image_uri
        file_name = uri[len(prefix) :] if uri.startswith(prefix) else uri
        if not is_remote(uri):
            file_name = file_name.replace(os.sep, "/")
        return dumps({"file_name": file_name, **record.to_dict()})

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
    """`ErrorRecord`s to `<output_dir>/errors.jsonl`, one line per failed image."""

    def __init__(self, output_dir: str, *, filename: str = ERRORS_FILE) -> None:
        super().__init__()
        self.output_dir = absolute(output_dir)
        self.filename = filename

    def expand(self, errors: PCollection[ErrorRecord]) -> PCollection[str]:
        return (
            errors
            | "ToRow" >> beam.Map(lambda e: dumps(e.to_dict()))
            | "Write" >> WriteJsonLines(join(self.output_dir, self.filename), key="image_uri")
        )
