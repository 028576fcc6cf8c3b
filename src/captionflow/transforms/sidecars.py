"""Caption files beside the images (`photo.jpg` -> `photo.txt`): what kohya sd-scripts,
OneTrainer, EveryDream2, SimpleTuner (text-file mode) and ai-toolkit read."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton, PCollection

from captionflow.lock import LOCK_FILE
from captionflow.paths import is_remote
from captionflow.records import CaptionRecord
from captionflow.transforms.errors import NAMESPACE
from captionflow.transforms.grouping import GroupPairs
from captionflow.transforms.shards import SHARD_ERRORS_FILE
from captionflow.transforms.summary import SUMMARY_FILE
from captionflow.transforms.write import ERRORS_FILE, METADATA_FILE, REJECTED_FILE, file_name_in

logger = logging.getLogger("captionflow")

# A `CaptionRecord`, or a row of `metadata.jsonl` (`captionflow export`).
Record = CaptionRecord | dict[str, Any]
# Never a caption file's name: the run's own files (and `datasets` reads a `metadata.jsonl`
# in any folder as metadata).
RUN_FILES = frozenset(
    {METADATA_FILE, ERRORS_FILE, REJECTED_FILE, SHARD_ERRORS_FILE, SUMMARY_FILE, LOCK_FILE}
)
EXAMPLES = 3  # named in a warning
NAME_MAX = 255  # bytes in one file name on local filesystems (ext4, XFS, Btrfs, APFS)


def sidecar_path(image_uri: str, extension: str) -> str:
    """The image's path with `extension` for its own (`a/b.c.jpg`, `.txt` -> `a/b.c.txt`)."""
    folder, _, name = image_uri.rpartition("/")
    stem = name.rpartition(".")[0] or name
    return f"{folder}/{stem}{extension}" if folder else f"{stem}{extension}"


def refused(image_uri: str, path: str, reserved: frozenset[str]) -> bool:
    """Whether a caption file at `path` would replace the image itself or a run's file."""
    return path == image_uri or path.rpartition("/")[2] in reserved


def too_long(path: str) -> bool:
    """Whether a local caption file's name is longer than a file name may be (an image named
    near the limit, given a longer extension: `x....jpg` -> `x....caption`)."""
    return not is_remote(path) and len(path.rpartition("/")[2].encode("utf-8")) > NAME_MAX


def staging_path(path: str) -> str:
    """A temporary name in the caption file's folder, as short whatever the image's name (a
    suffix on the final name would pass the file name limit for long names)."""
    folder, _, _ = path.rpartition("/")
    name = f".caption.tmp-{uuid.uuid4().hex}"
    return f"{folder}/{name}" if folder else name


class _WriteSidecar(beam.DoFn):
    def __init__(self, extension: str, overwrite: bool, reserved: frozenset[str]) -> None:
        self.extension = extension
        self.overwrite = overwrite
        self.reserved = reserved
        self.written = Metrics.counter(NAMESPACE, "caption_files_written")
        self.kept = Metrics.counter(NAMESPACE, "caption_files_kept")
        self.refused = Metrics.counter(NAMESPACE, "caption_files_refused")

    def process(self, record: Record) -> Iterator[Record]:
        uri, text = (
            (record["image_uri"], record["text"])
            if isinstance(record, dict)
            else (record.image_uri, record.text)
        )
        path = sidecar_path(uri, self.extension)
        if refused(uri, path, self.reserved):
            logger.warning("no caption file for %s: %s is a name the run's files take", uri, path)
            self.refused.inc()
        elif too_long(path):
            logger.warning("no caption file for %s: its name would be over %d bytes", uri, NAME_MAX)
            self.refused.inc()
        elif self.overwrite or not FileSystems.exists(path):
            staging = staging_path(path)
            with FileSystems.create(staging) as file:
                file.write(text.encode("utf-8") + b"\n")
            FileSystems.rename([staging], [path])
            self.written.inc()
        else:
            self.kept.inc()
        yield record


class WriteSidecars(beam.PTransform):
    """Writes each record's best caption (a `CaptionRecord`, or a metadata row as a dict)
    beside its image, then passes the record on (so a
    record written after this step has its caption file). Each file appears whole, under its
    final name only; an existing one is kept unless `overwrite`. None is written over the
    image itself or under a name in `reserved` (the run's own files: `RUN_FILES`)."""

    def __init__(
        self,
        *,
        extension: str = ".txt",
        overwrite: bool = False,
        reserved: frozenset[str] = RUN_FILES,
    ) -> None:
        super().__init__()
        self.extension = extension
        self.overwrite = overwrite
        self.reserved = reserved

    def expand(self, records: PCollection[Record]) -> PCollection[Record]:
        writer = _WriteSidecar(self.extension, self.overwrite, self.reserved)
        return records | "WriteSidecar" >> beam.ParDo(writer)


SHARED, RESERVED, TOO_LONG = "shared", "reserved", "too long"


class CaptionFileWarnings(beam.PTransform):
    """Captioned image URIs in; the summary's warnings about their caption files out (one
    list): files two images would share (`a.jpg`, `a.png` -> `a.txt`: trainers pair it with
    both, so one gets the other's caption) and files not written (`WriteSidecars`' `reserved`
    names). The URIs are grouped by caption file (`GroupPairs`: the runner, or `spill_dir`)."""

    def __init__(
        self,
        output_dir: str,
        *,
        extension: str,
        reserved: frozenset[str] = RUN_FILES,
        spill_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.extension = extension
        self.reserved = reserved
        self.spill_dir = spill_dir

    def expand(self, uris: PCollection[str]) -> PCollection[list[str]]:
        extension, reserved = self.extension, self.reserved
        name = file_name_in(self.output_dir)

        def problems_of(group: tuple[str, list[str]]) -> Iterator[tuple[str, str]]:
            path, images = group
            if len(images) > 1:
                yield SHARED, f"{name(path)} ({', '.join(sorted(map(name, images)))})"
            for image in images:
                if refused(image, path, reserved):
                    yield RESERVED, name(image)
                elif too_long(path):
                    yield TOO_LONG, name(image)

        problems = (
            uris
            | "ByCaptionFile" >> beam.Map(lambda uri: (sidecar_path(uri, extension), uri))
            | "Group" >> GroupPairs(self.spill_dir)
            | "Problems" >> beam.FlatMap(problems_of)
        )
        examples = (
            problems
            | "Examples" >> beam.combiners.Top.SmallestPerKey(EXAMPLES)
            | "ExamplesByKind" >> beam.combiners.ToDict()
        )
        return (
            problems
            | "Count" >> beam.combiners.Count.PerKey()
            | "CountsByKind" >> beam.combiners.ToDict()
            | "Lines" >> beam.Map(_caption_file_warnings, AsSingleton(examples))
        )


def _caption_file_warnings(counts: dict[str, int], examples: dict[str, list[str]]) -> list[str]:
    lines = []
    if SHARED in counts:
        lines.append(
            f"{counts[SHARED]} caption file(s) are each named for more than one image of its "
            f"folder ({'; '.join(examples[SHARED])}): trainers pair the file with each of "
            "them, so all but one get another image's caption; rename the images"
        )
    if RESERVED in counts:
        lines.append(
            f"{counts[RESERVED]} image(s) got no caption file, as it would take a name of the "
            f"run's own files ({', '.join(examples[RESERVED])}): rename them, or use another "
            "--sidecar-extension"
        )
    if TOO_LONG in counts:
        lines.append(
            f"{counts[TOO_LONG]} image(s) got no caption file, as its name would be longer than "
            f"a file name may be ({NAME_MAX} bytes; {', '.join(examples[TOO_LONG])}): rename "
            "them, or use a shorter --sidecar-extension"
        )
    return lines


class NoCaptionFileWarnings(beam.PTransform):
    """The run's rejected and failed images in (a tuple of collections, each counted where
    it is made); out, one list: a warning when there are any. They stay in their folders
    without a caption file, and trainers that take every image of a folder (kohya's
    sd-scripts, OneTrainer) would train on them with an empty caption."""

    def expand(self, collections: tuple[PCollection[Any], ...]) -> PCollection[list[str]]:
        counts = [
            AsSingleton(records | f"Count {i}" >> beam.combiners.Count.Globally())
            for i, records in enumerate(collections)
        ]
        return (
            collections[0].pipeline
            | "Once" >> beam.Create([None])
            | "Lines"
            >> beam.Map(lambda _, *numbers: _no_caption_file_warnings(sum(numbers)), *counts)
        )


def _no_caption_file_warnings(count: int) -> list[str]:
    if not count:
        return []
    return [
        f"{count} failed or rejected image(s) got no caption file (see OUTPUT/{ERRORS_FILE} "
        f"and OUTPUT/{REJECTED_FILE}): trainers that take every image of a folder (kohya's "
        "sd-scripts, OneTrainer) would train on those still there with an empty caption; move "
        "them out of the folder"
    ]
