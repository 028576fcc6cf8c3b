"""Throughput in the logs while the job runs, so a slow or CPU-bound run shows at once."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from typing import TypeVar

import apache_beam as beam

logger = logging.getLogger("captionflow")
T = TypeVar("T")


class _LogProgress(beam.DoFn):
    def __init__(self, every_secs: float) -> None:
        self.every_secs = every_secs

    def setup(self) -> None:
        self.count = 0
        self.started = self.last = time.monotonic()

    def process(self, element: T) -> Iterator[T]:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.every_secs:
            self.last = now
            rate = self.count / (now - self.started)
            logger.info("captioned %d images on this worker (%.2f images/s)", self.count, rate)
        yield element


class LogProgress(beam.PTransform):
    """Pass elements through, logging this worker's count and rate every `every_secs`."""

    def __init__(self, every_secs: float = 30.0) -> None:
        super().__init__()
        self.every_secs = every_secs

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        return pcoll | beam.ParDo(_LogProgress(self.every_secs))


class _CountInto(beam.DoFn):
    """Pass elements through, keeping this instance's count in a file of its own."""

    def __init__(self, folder: str, kind: str, every_secs: float) -> None:
        self.folder = folder
        self.kind = kind
        self.every_secs = every_secs

    def setup(self) -> None:
        name = f"{self.kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = os.path.join(self.folder, name)
        self.count = 0
        self.written = -1
        self.last = time.monotonic()

    def process(self, element: T) -> Iterator[T]:
        self.count += 1
        if time.monotonic() - self.last >= self.every_secs:
            self._write()
        yield element

    def finish_bundle(self) -> None:
        self._write()

    def teardown(self) -> None:
        self._write()

    def _write(self) -> None:
        self.last = time.monotonic()
        if self.count == self.written:
            return
        with contextlib.suppress(OSError):  # progress is a courtesy: it never fails the job
            temporary = f"{self.path}.tmp"
            with open(temporary, "w") as file:
                file.write(str(self.count))
            os.replace(temporary, self.path)
            self.written = self.count


class CountInto(beam.PTransform):
    """Pass elements through, counting them as `kind` in files under `folder` (one per DoFn
    instance, rewritten at most every `every_secs`), for a progress line on a local machine
    (`captionflow.progress.ProgressLine` sums them)."""

    def __init__(self, folder: str, kind: str, every_secs: float = 0.5) -> None:
        super().__init__()
        self.folder = folder
        self.kind = kind
        self.every_secs = every_secs

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        return pcoll | beam.ParDo(_CountInto(self.folder, self.kind, self.every_secs))
