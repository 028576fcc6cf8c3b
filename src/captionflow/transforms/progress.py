"""Throughput in the logs while the job runs, so a slow or CPU-bound run shows at once."""

from __future__ import annotations

import logging
import time
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
