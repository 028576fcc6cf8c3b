"""Big line files read by many workers at once: a 100-million-line `dataset.txt`, the
`metadata.jsonl` of a run that wrote millions of records.

Each file is cut into byte ranges, the ranges are spread over workers, and each range is
read where it lands: a line belongs to the range its first byte lies in, so every line is read
exactly once, and nothing holds more than one line in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import apache_beam as beam
from apache_beam.io.fileio import EmptyMatchTreatment, MatchAll
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import PCollection

RANGE_BYTES = 64 << 20  # a range per worker thread is a few seconds of reading


@dataclass(frozen=True)
class Line:
    """One line of `path`, without its `\\n`. `number` (from 1) is known for the lines of a
    file's first range only; `offset` is the byte it starts at."""

    path: str
    data: bytes
    offset: int
    number: int | None

    def where(self) -> str:
        """The line, as a person finds it: `line 3 of f`, or `the line at byte 9000000 of f`."""
        if self.number is not None:
            return f"line {self.number} of {self.path}"
        return f"the line at byte {self.offset} of {self.path}"


def byte_ranges(size: int, range_bytes: int = RANGE_BYTES) -> list[tuple[int, int]]:
    """`[start, end)` ranges covering `size` bytes, each at most `range_bytes` long."""
    return [(start, min(start + range_bytes, size)) for start in range(0, size, range_bytes)]


def lines_between(file: BinaryIO, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """`(offset, line)` for each line of a seekable binary `file` whose first byte lies in
    `[start, end)`; a line that began before `start` is left to the range before."""
    position = start
    if start > 0:
        file.seek(start - 1)
        position += len(file.readline()) - 1  # the rest of the line that started before
    else:
        file.seek(0)
    while position < end:
        line = file.readline()
        if not line:
            break
        yield position, line.removesuffix(b"\n")
        position += len(line)


def read_range(path: str, start: int, end: int) -> Iterator[Line]:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as file:
        for number, (offset, data) in enumerate(lines_between(file, start, end), start=1):
            yield Line(path, data, offset, number if start == 0 else None)


class ReadLines(beam.PTransform):
    """File patterns in (a missing file matches nothing), `Line`s out, read in parallel: each
    file cut into ranges of `range_bytes`, spread over workers. Files whose path starts with
    `exclude` are left out."""

    def __init__(self, *, range_bytes: int | None = None, exclude: str | None = None) -> None:
        super().__init__()
        self.range_bytes = range_bytes
        self.exclude = exclude

    def expand(self, patterns: PCollection[str]) -> PCollection[Line]:
        size = self.range_bytes or RANGE_BYTES
        exclude = self.exclude
        return (
            patterns
            | "Match" >> MatchAll(EmptyMatchTreatment.ALLOW)
            | "Keep" >> beam.Filter(lambda file: not (exclude and file.path.startswith(exclude)))
            | "Ranges"
            >> beam.FlatMap(
                lambda file: [(file.path, *span) for span in byte_ranges(file.size_in_bytes, size)]
            )
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.FlatMapTuple(read_range)
        )
