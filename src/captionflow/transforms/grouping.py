"""Grouping strings (image paths) by value, through the runner's shuffle or through files.

Distributed runners (Dataflow) shuffle in a service: a GroupByKey of 100 million paths costs
the workers nothing. Beam's local runners hold every shuffled element, and each stage's
output, in the launcher's memory, and hand each worker its whole share of the next stage at
once: memory that grows with the input. With `spill_dir`, the strings go instead into bucket
files (by a hash of the string, flushed every few MB), only the files' names cross the runner,
and each bucket is grouped by the worker that reads it, in a set of its own strings only:
memory set by the bucket count, not the input.
"""

from __future__ import annotations

import json
import uuid
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence

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


def bucket_of(string: str, buckets: int) -> int:
    return zlib.crc32(string.encode("utf-8", "surrogatepass")) % buckets


class GroupStrings(beam.PTransform):
    """`{tag: strings, ...} | GroupStrings(spill_dir)`: each distinct string once, with the tags
    of the inputs it is in (`(string, frozenset(tags))`), spread over workers. A tag's strings
    may come as several collections: each is spilled where it is made, since a Flatten of
    them would be held whole by a local runner.

    Without `spill_dir`, a CoGroupByKey (the runner's shuffle: for distributed runners). With
    it, through bucket files in `spill_dir` (any Beam filesystem the workers share; the caller
    removes it after the job): for local runners, whose shuffles grow the launcher's memory
    with the input. Only files that successful bundles report are read, and a retried
    bundle's strings are grouped away with their first copies."""

    def __init__(self, spill_dir: str | None = None, *, buckets: int = BUCKETS) -> None:
        super().__init__()
        self.spill_dir = spill_dir
        self.buckets = buckets

    def expand(self, tagged: Mapping[str, Strings]) -> PCollection[Grouped]:
        inputs = {
            tag: strings if isinstance(strings, Sequence) else (strings,)
            for tag, strings in tagged.items()
        }
        if self.spill_dir is None:
            keyed = {
                tag: collections
                | f"All {tag}" >> beam.Flatten()
                | f"Key {tag}" >> beam.Map(lambda string: (string, None))
                for tag, collections in inputs.items()
            }
            return keyed | "Group" >> beam.CoGroupByKey() | "Tags" >> beam.Map(_tags_present)
        run = uuid.uuid4().hex[:8]  # two groupings may share a folder
        spilled = [
            strings
            | f"Spill {tag} {index}"
            >> beam.ParDo(_SpillBuckets(self.spill_dir, f"{run}-{tag}", tag, self.buckets))
            for tag, collections in inputs.items()
            for index, strings in enumerate(collections)
        ]
        return (
            spilled
            | "Files" >> beam.Flatten()
            | "ByBucket" >> beam.GroupByKey()
            | "Group" >> beam.FlatMap(_group_bucket)
        )


def _tags_present(grouped: tuple[str, Mapping[str, Iterable[None]]]) -> Grouped:
    string, found = grouped
    return string, frozenset(tag for tag, values in found.items() if list(values))


class _SpillBuckets(beam.DoFn):
    """A bundle's strings, by bucket, into files (a JSON string a line: any character of a
    file name survives); `(bucket, (tag, file))` out for each file written."""

    def __init__(self, directory: str, prefix: str, tag: str, buckets: int) -> None:
        self.directory = directory
        self.prefix = prefix
        self.tag = tag
        self.buckets = buckets
        self.spilled = Metrics.counter("captionflow", "strings_spilled")

    def start_bundle(self) -> None:
        self._pending: defaultdict[int, list[str]] = defaultdict(list)
        self._bytes = 0

    def process(self, string: str) -> Iterator[tuple[int, tuple[str, str]]]:
        self._pending[bucket_of(string, self.buckets)].append(string)
        self.spilled.inc()
        self._bytes += len(string) + 3
        if self._bytes >= FLUSH_BYTES:
            yield from self._flush()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for written in self._flush():
            yield GlobalWindows.windowed_value(written)

    def _flush(self) -> Iterator[tuple[int, tuple[str, str]]]:
        for bucket, strings in sorted(self._pending.items()):
            path = join(self.directory, f"{self.prefix}-{bucket:05d}-{uuid.uuid4().hex}.jsonl")
            with FileSystems.create(path) as file:
                file.write("".join(json.dumps(s) + "\n" for s in strings).encode("ascii"))
            yield bucket, (self.tag, path)
        self._pending.clear()
        self._bytes = 0


def _group_bucket(bucket: tuple[int, Iterable[tuple[str, str]]]) -> Iterator[Grouped]:
    """One bucket's strings, each once, with the tags of the files it was in."""
    tags: dict[str, set[str]] = {}
    for tag, path in sorted(set(bucket[1])):
        with FileSystems.open(path, compression_type="uncompressed") as file:
            for line in file.read().splitlines():
                tags.setdefault(json.loads(line), set()).add(tag)
    for string, found in tags.items():
        yield string, frozenset(found)
