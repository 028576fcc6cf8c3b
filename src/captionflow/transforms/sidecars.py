"""Caption files beside the images (`photo.jpg` -> `photo.txt`): what kohya sd-scripts,
OneTrainer, EveryDream2, SimpleTuner (text-file mode) and ai-toolkit read."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.pvalue import PCollection

from captionflow.records import CaptionRecord
from captionflow.transforms.errors import NAMESPACE

# A `CaptionRecord`, or a row of `metadata.jsonl` (`captionflow export`).
Record = CaptionRecord | dict[str, Any]


def sidecar_path(image_uri: str, extension: str) -> str:
    """The image's path with `extension` for its own (`a/b.c.jpg`, `.txt` -> `a/b.c.txt`)."""
    folder, _, name = image_uri.rpartition("/")
    stem = name.rpartition(".")[0] or name
    return f"{folder}/{stem}{extension}" if folder else f"{stem}{extension}"


class _WriteSidecar(beam.DoFn):
    def __init__(self, extension: str, overwrite: bool) -> None:
        self.extension = extension
        self.overwrite = overwrite
        self.written = Metrics.counter(NAMESPACE, "caption_files_written")
        self.kept = Metrics.counter(NAMESPACE, "caption_files_kept")

    def process(self, record: Record) -> Iterator[Record]:
        uri, text = (
            (record["image_uri"], record["text"])
            if isinstance(record, dict)
            else (record.image_uri, record.text)
        )
        path = sidecar_path(uri, self.extension)
        if self.overwrite or not FileSystems.exists(path):
            staging = f"{path}.tmp-{uuid.uuid4().hex}"
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
    final name only; an existing one is kept unless `overwrite`."""

    def __init__(self, *, extension: str = ".txt", overwrite: bool = False) -> None:
        super().__init__()
        self.extension = extension
        self.overwrite = overwrite

    def expand(self, records: PCollection[Record]) -> PCollection[Record]:
        return records | "WriteSidecar" >> beam.ParDo(_WriteSidecar(self.extension, self.overwrite))
