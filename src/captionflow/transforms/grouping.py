"""Grouping strings (image paths, an earlier run's records) by key, through the runner's
shuffle or through files.

Distributed runners (Dataflow) shuffle in a service: a GroupByKey of 100 million paths costs
the workers nothing. Beam's local runners hold every shuffled element, and each stage's
output, in the launcher's memory, and hand each worker its whole share of the next stage at
once: memory that grows with the input. With `spill_dir`, the pairs go instead into bucket
files (by a hash of the key, flushed every few MB), only the files' names cross the runner,
and each bucket is grouped by the worker that reads it: memory set by the bucket count, not
the input.
"""

from __future__ import annotations

import json
import uuid
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.pvalue import PCollection
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.windowed_value import WindowedValue

from captionflow.paths import join

# Runners that keep shuffles in the launcher's memory.
LOCAL_RUNNERS = frozenset(
    {"FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner"}
)
BUCKETS = 256  # a bucket of a 100-million-path input: 400,000 paths, some 60 MB in a set
FLUSH_BYTES = 4 << 20  # what a bundle buffers before writing its buckets' files

Grouped = tuple[str, frozenset[str]]  # a string, and the tags of the inputs it came in
Strings = PCollection[str] | Sequence[PCollection[str]]
Pairs = PCollection[tuple[str, str]] | Sequence[PCollection[tuple[str, str]]]


def each(
    collections: PCollection | Sequence[PCollection],
    label: str,
    transform: Callable[[], beam.PTransform],
) -> tuple[PCollection, ...]:
    """A new `transform()` applied to each of `collections` (or to the one) where it is made,
    labelled `label`, `label 1`, `label 2`, ...: what stands in for a Flatten first, which a
    local runner would hold whole."""
    collections = tuple(collections) if isinstance(collections, Sequence) else (collections,)
    return tuple(
        collection | (f"{label} {index}" if index else label) >> transform()
        for index, collection in enumerate(collections)
    )


def bucket_of(string: str, buckets: int) -> int:
    return zlib.crc32(string.encode("utf-8", "surrogatepass")) % buckets


class GroupPairs(beam.PTransform):
    """A GroupByKey of `(key, value)` string pairs: `(key, [values])` once per key, spread over
    workers. Takes one collection or several: each is spilled where it is made, since a
    Flatten of them would be held whole by a local runner.

    Without `spill_dir`, the runner's shuffle (for distributed runners). With it, bucket files
    in `spill_dir` (any Beam filesystem the workers share; the caller removes it after the
    job): for local runners, whose shuffles grow the launcher's memory with the input. Only
    files that successful bundles report are read."""

    def __init__(self, spill_dir: str | None = None, *, buckets: int = BUCKETS) -> None:
        super().__init__()
        self.spill_dir = spill_dir
        self.buckets = buckets

    def expand(self, pairs: Pairs) -> PCollection[tuple[str, list[str]]]:
        collections = tuple(pairs) if isinstance(pairs, Sequence) else (pairs,)
        if self.spill_dir is None:
            return (
                collections
                | "All" >> beam.Flatten()
                | "Group" >> beam.GroupByKey()
                | "Lists" >> beam.MapTuple(lambda key, values: (key, list(values)))
            )
        run = uuid.uuid4().hex[:8]  # two groupings may share a folder
        spilled = tuple(
            collection
            | f"Spill {index}"
            >> beam.ParDo(_SpillBuckets(self.spill_dir, f"{run}-{index}", self.buckets))
            for index, collection in enumerate(collections)
        )
        return (
            spilled
            | "Files" >> beam.Flatten()
            | "ByBucket" >> beam.GroupByKey()
            | "Group" >> beam.FlatMap(_group_bucket)
        )


class GroupStrings(beam.PTransform):
    """`{tag: strings, ...} | GroupStrings(spill_dir)`: each distinct string once, with the tags
    of the inputs it is in (`(string, frozenset(tags))`), spread over workers; grouped by
    `GroupPairs` (the runner's shuffle, or bucket files in `spill_dir`). A tag's strings may
    come as several collections."""

    def __init__(self, spill_dir: str | None = None, *, buckets: int = BUCKETS) -> None:
        super().__init__()
        self.spill_dir = spill_dir
        self.buckets = buckets

    def expand(self, tagged: Mapping[str, Strings]) -> PCollection[Grouped]:
        pairs = tuple(  # a tuple: Beam takes a list piped into a transform for data
            strings | f"Tag {tag} {index}" >> beam.Map(lambda string, tag: (string, tag), tag)
            for tag, collections in tagged.items()
            for index, strings in enumerate(
                collections if isinstance(collections, Sequence) else (collections,)
            )
        )
        return (
            pairs
            | "Group" >> GroupPairs(self.spill_dir, buckets=self.buckets)
            | "Tags" >> beam.MapTuple(lambda string, tags: (string, frozenset(tags)))
        )


class _SpillBuckets(beam.DoFn):
    """A bundle's pairs, by the bucket of their key, into files (a JSON pair a line: any
    character of a file name survives); `(bucket, file)` out for each file written."""

    def __init__(self, directory: str, prefix: str, buckets: int) -> None:
        self.directory = directory
        self.prefix = prefix
        self.buckets = buckets
        self.spilled = Metrics.counter("captionflow", "pairs_spilled")

    def start_bundle(self) -> None:
        self._pending: defaultdict[int, list[str]] = defaultdict(list)
        self._bytes = 0

    def process(self, pair: tuple[str, str]) -> Iterator[tuple[int, str]]:
        line = json.dumps(pair) + "\n"
        self._pending[bucket_of(pair[0], self.buckets)].append(line)
        self._bytes += len(line)
        self.spilled.inc()
        if self._bytes >= FLUSH_BYTES:
            yield from self._flush()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for written in self._flush():
            yield GlobalWindows.windowed_value(written)

    def _flush(self) -> Iterator[tuple[int, str]]:
        for bucket, lines in sorted(self._pending.items()):
            path = join(self.directory, f"{self.prefix}-{bucket:05d}-{uuid.uuid4().hex}.jsonl")
            with FileSystems.create(path) as file:
                file.write("".join(lines).encode("ascii"))
            yield bucket, path
        self._pending.clear()
        self._bytes = 0


def _group_bucket(bucket: tuple[int, Iterable[str]]) -> Iterator[tuple[str, list[str]]]:
    """One bucket's pairs, grouped by key: the memory of one bucket, not of the input."""
    grouped: dict[str, list[str]] = {}
    for path in sorted(set(bucket[1])):
        with FileSystems.open(path, compression_type="uncompressed") as file:
            for line in file.read().splitlines():
                key, value = json.loads(line)
                grouped.setdefault(key, []).append(value)
    yield from grouped.items()
