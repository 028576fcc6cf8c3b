"""Self-contained dataset shards, images embedded: Parquet as the Hugging Face Hub serves it,
and WebDataset tar files as img2dataset writes them.

Shards are made from the finished `metadata.jsonl` rows (so a resumed run's shards hold every
image, and `captionflow export` makes the same from any output), each image's file read once
more for its bytes. An image that can no longer be read (deleted or changed since it was
captioned; for webdataset, one that cannot be decoded to make its JPEG) is left out of its
shard, logged, counted and returned as an `ErrorRecord` (stage: the format), and the rest is
written. Shards are written under a staging name by any number of workers, then moved into
place together (`data/train-00000-of-00012.parquet`, `shards/00000.tar`, ...); the shards of an
earlier export are replaced.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import logging
import tarfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton, PCollection, TaggedOutput

from captionflow.files import open_image_file
from captionflow.images import DEFAULT_MAX_BYTES, as_jpeg
from captionflow.jsonl import dumps
from captionflow.listing import delete_files, literal
from captionflow.paths import dirname, is_remote, join
from captionflow.records import ErrorRecord
from captionflow.transforms.errors import ERRORS, NAMESPACE
from captionflow.transforms.lines import Line, ReadLines
from captionflow.transforms.resume import metadata_key
from captionflow.transforms.splits import split_name
from captionflow.transforms.write import WriteErrors, remove_folder

logger = logging.getLogger("captionflow")

# The Hugging Face `Image` feature's Arrow layout, declared in the schema's metadata so that
# `datasets` decodes the column as images; the other columns' types are inferred.
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
CANDIDATE_TYPE = pa.struct(
    [("text", pa.string()), ("score", pa.float64()), ("probability", pa.float64())]
)
# Every shard has the same columns and types, whatever its rows hold (a missing field is null).
RECORD_SCHEMA = pa.schema(
    [
        ("file_name", pa.string()),
        ("image_uri", pa.string()),
        ("text", pa.string()),
        ("score", pa.float64()),
        ("candidates", pa.list_(CANDIDATE_TYPE)),
        ("captioner", pa.string()),
        ("ranker", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("captions", pa.list_(pa.string())),
    ]
)
SHARD_ERRORS_FILE = "shard-errors.jsonl"  # the images left out of the shards, and why
HF_METADATA = {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}})}


class MetadataRows(beam.PTransform):
    """Paths of finished metadata files in; their records out, read in parallel ranges. A row
    trimmed to `{file_name, text}` (which `--resume` keeps as it is) gets its `image_uri`
    back, from its `file_name` and the metadata file's folder (`metadata_key`)."""

    def expand(self, paths: PCollection[str]) -> PCollection[dict[str, Any]]:
        return (
            paths
            | "Literal" >> beam.Map(literal)
            | "Read" >> ReadLines()
            | "Rows" >> beam.FlatMap(_row)
        )


def _row(line: Line) -> Iterator[dict[str, Any]]:
    if line.data.strip():
        row = json.loads(line.data)
        yield (
            row
            if "image_uri" in row
            else {**row, "image_uri": metadata_key(dirname(line.path))(row)}
        )


# A metadata row with its image's bytes, as its shard holds them.
Sample = tuple[dict[str, Any], bytes]


def image_bytes(row: dict[str, Any], max_bytes: int) -> bytes:
    """The image file's bytes: regular files only (a FIFO put in its place would block the
    worker forever), at most `max_bytes` (the run's `--max-bytes`)."""
    with open_image_file(row["image_uri"], max_bytes) as file:
        return file.read()


def parquet_table(samples: list[Sample]) -> pa.Table:
    """Rows with their image bytes (`image`: {bytes, path}) first, then every record field."""
    rows = [row for row, _ in samples]
    images = [{"bytes": data, "path": row["file_name"].rsplit("/", 1)[-1]} for row, data in samples]
    table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
    table = table.add_column(0, pa.field("image", IMAGE_TYPE), pa.array(images, IMAGE_TYPE))
    return table.replace_schema_metadata(HF_METADATA)


def write_parquet(samples: Iterable[Sample], file: IO[bytes]) -> int:
    """The samples as one table (a shard's images are held together); how many."""
    table = parquet_table(list(samples))
    if table.num_rows:
        pq.write_table(table, file)
    return table.num_rows


def sample_key(row: dict[str, Any]) -> str:
    """A sample's name in a tar: from its image URI, stable, and free of dots (WebDataset
    splits a member's name at its first dot)."""
    return hashlib.sha1(row["image_uri"].encode("utf-8")).hexdigest()[:20]


def write_webdataset(samples: Iterable[Sample], file: IO[bytes]) -> int:
    """Per image `KEY.jpg` (the source's bytes; other formats re-encoded), `KEY.txt` (the
    caption) and `KEY.json` (the record), in that order, one image in memory at a time; how
    many images."""
    count = 0
    with tarfile.open(fileobj=file, mode="w|") as tar:
        for row, jpeg in samples:
            key = sample_key(row)
            count += 1
            members = {
                "jpg": jpeg,
                "txt": row["text"].encode("utf-8"),
                "json": dumps(row).encode("utf-8"),
            }
            for extension, data in members.items():
                member = tarfile.TarInfo(f"{key}.{extension}")
                member.size = len(data)
                member.mode = 0o644
                tar.addfile(member, io.BytesIO(data))
    return count


@dataclass(frozen=True)
class ShardFormat:
    kind: str  # its `--format` name
    folder: str  # under the output
    suffix: str
    image: Callable[[bytes], bytes]  # an image file's bytes as the shard holds them
    write: Callable[[Iterable[Sample], IO[bytes]], int]  # returns the samples written
    name: Callable[[str, int, int], str]  # (split, index, count) to the shard's file name
    by_split: bool  # whether each shard holds one split's images (`split_name`), named for it


PARQUET = ShardFormat(
    "parquet",
    "data",
    ".parquet",
    bytes,
    write_parquet,
    lambda split, i, n: f"{split}-{i:05d}-of-{n:05d}.parquet",  # as the Hub names them
    True,
)
WEBDATASET = ShardFormat(
    "webdataset",
    "shards",
    ".tar",
    as_jpeg,
    write_webdataset,
    lambda split, i, n: f"{i:05d}.tar",
    False,
)
SHARD_FORMATS = {shard_format.kind: shard_format for shard_format in (PARQUET, WEBDATASET)}


class _WriteShard(beam.DoFn):
    """A batch of rows into one staged shard (none if no image could be read), or one per
    split for a format `by_split` (staged as `SPLIT-UUID.SUFFIX`); out: their paths, and an
    `ERRORS` output for each image left out."""

    def __init__(self, staging: str, shard_format: ShardFormat, max_bytes: int) -> None:
        self.staging = staging
        self.format = shard_format
        self.max_bytes = max_bytes
        self.written = Metrics.counter(NAMESPACE, f"{shard_format.kind}_images_written")
        self.left_out = Metrics.counter(NAMESPACE, f"{shard_format.kind}_images_left_out")

    def process(self, rows: list[dict[str, Any]]) -> Iterator[str | TaggedOutput]:
        splits: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            split = split_name(str(row.get("file_name") or "")) if self.format.by_split else ""
            splits.setdefault(split, []).append(row)
        for split, batch in splits.items():
            errors: list[ErrorRecord] = []
            name = f"{split}-{uuid.uuid4().hex}" if split else uuid.uuid4().hex
            path = join(self.staging, f"{name}{self.format.suffix}")
            with FileSystems.create(path) as file:
                count = self.format.write(self._samples(batch, errors), file)
            for error in errors:
                yield TaggedOutput(ERRORS, error)
            if not count:
                delete_files([path])
                continue
            self.written.inc(count)
            yield path

    def _samples(self, rows: list[dict[str, Any]], errors: list[ErrorRecord]) -> Iterator[Sample]:
        """Each row with its image, read once as the writer takes it; one that fails is
        logged, counted and put in `errors` instead: one bad image never fails the batch."""
        for row in rows:
            try:
                data = self.format.image(image_bytes(row, self.max_bytes))
            except Exception as error:
                uri = str(row.get("image_uri", row.get("file_name")))
                errors.append(ErrorRecord.from_exception(uri, self.format.kind, error))
                self.left_out.inc()
                logger.warning(
                    "%s left out of the %s shards: %s: %s",
                    uri,
                    self.format.kind,
                    type(error).__name__,
                    error,
                )
                continue
            yield row, data


def published_shards(output_dir: str, shard_format: ShardFormat) -> list[str]:
    folder = join(output_dir, shard_format.folder)
    pattern = join(literal(folder), f"*{shard_format.suffix}")
    found = FileSystems.match([pattern])[0].metadata_list
    return [file.path for file in found]


def earlier_shards_warnings(output_dir: str, kinds: Iterable[str]) -> list[str]:
    """Lines for the shards of `kinds` that an earlier run or export left and this run does
    not remake: they hold that run's records, not this one's."""
    lines = []
    for kind in kinds:
        shard_format = SHARD_FORMATS[kind]
        if found := published_shards(output_dir, shard_format):
            lines.append(
                f"{len(found)} {shard_format.folder}/*{shard_format.suffix} shard(s) are an "
                f"earlier run's, not made from this run's records: remake them with "
                f"`captionflow export OUTPUT --format {kind}` (or --format {kind} here), or "
                "remove them"
            )
    return lines


def left_out_warnings(kind: str, left_out: int, shards: int) -> list[str]:
    """The line for the user when images were left out of the `kind` shards (`OUTPUT` stands
    for the output folder); none when none was."""
    if not left_out:
        return []
    where = f"see OUTPUT/{SHARD_ERRORS_FILE}"
    if not shards:
        return [f"no image could be read for the {kind} shards ({left_out} left out): {where}"]
    return [f"{left_out} image(s) left out of the {kind} shards (could not be read): {where}"]


def under_output(row: dict[str, Any]) -> bool:
    """Whether a metadata row's image lies under the output (its `file_name` is relative)."""
    name = str(row.get("file_name") or "")
    return bool(name) and not is_remote(name) and not name.startswith("/")


# The line for the user when parquet shards lie beside images of the output: `datasets` takes
# `data/{split}-NNNNN-of-NNNNN.*` files, when there are any, for the whole dataset, so
# `load_dataset("imagefolder", data_dir=OUTPUT)` no longer sees the images.
HIDDEN_IMAGES = (
    f"the parquet shards in OUTPUT/{PARQUET.folder}/ hide the output's images from "
    'datasets.load_dataset("imagefolder", data_dir=OUTPUT), which then loads no image '
    "(datasets takes data/SPLIT-NNNNN-of-NNNNN files for the whole dataset): load them "
    'with data_files={"train": "OUTPUT/**"}, as diffusers\' --train_data_dir does'
)


def hidden_images_warnings(images_under_output: bool) -> list[str]:
    """`HIDDEN_IMAGES` when parquet shards lie beside images of the output."""
    return [HIDDEN_IMAGES] if images_under_output else []


class HiddenImagesWarnings(beam.PTransform):
    """Metadata rows in; out, one list: `hidden_images_warnings` when any row's image lies
    under the output."""

    def expand(self, rows: PCollection[dict[str, Any]]) -> PCollection[list[str]]:
        return (
            rows
            | "UnderOutput" >> beam.Map(under_output)
            | "Any" >> beam.CombineGlobally(any)
            | "Lines" >> beam.Map(hidden_images_warnings)
        )


def publish_shards(staged: list[str], shard_format: ShardFormat, output_dir: str) -> list[str]:
    """Move the staged shards into their folder under their final names, in place of
    whatever an earlier export left there; remove the staging areas (a killed run's too)."""
    folder = join(output_dir, shard_format.folder)
    if old := published_shards(output_dir, shard_format):
        delete_files(old)
    splits: dict[str, list[str]] = {}
    for path in sorted(staged):  # `SPLIT-UUID.SUFFIX` for a format by split
        name = path.rstrip("/").rpartition("/")[2]
        splits.setdefault(name.rpartition("-")[0] if shard_format.by_split else "", []).append(path)
    sources, final = [], []
    for split, paths in sorted(splits.items()):
        sources += paths
        final += [join(folder, shard_format.name(split, i, len(paths))) for i in range(len(paths))]
    if staged:
        with contextlib.suppress(OSError):  # it exists; object stores have no folders at all
            FileSystems.mkdirs(folder)
        FileSystems.rename(sources, final)
    stagings = join(literal(output_dir), f".{shard_format.folder}.tmp-*")
    files = FileSystems.match([join(stagings, "*")])[0].metadata_list
    folders = {dirname(file.path) for file in files}
    if not is_remote(output_dir):
        folders.update(glob.glob(join(glob.escape(output_dir), f".{shard_format.folder}.tmp-*")))
    for staging in folders:
        remove_folder(staging)
    return final


class WriteShards(beam.PTransform):
    """Metadata rows (dicts, as in `metadata.jsonl`) to shards of one `kind` (`parquet`:
    `<output_dir>/data/*.parquet`, loads with `datasets.load_dataset("parquet", ...)`;
    `webdataset`: `<output_dir>/shards/*.tar`), at most `rows_per_shard` images a shard.
    Returns the shard paths; `with_errors()`, also the `ErrorRecord`s of the images left out
    because they could not be read (stage: `kind`), files over `max_bytes` included.

    With `spread` (the default), the rows are reshuffled first, so that every worker reads
    images for its shards. Without it, each worker makes shards of the rows it holds: for
    local runners, which would hold every reshuffled row in the launcher's memory."""

    def __init__(
        self,
        output_dir: str,
        kind: str,
        *,
        rows_per_shard: int = 1000,
        spread: bool = True,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.format = SHARD_FORMATS[kind]
        self.rows_per_shard = rows_per_shard
        self.spread = spread
        self.max_bytes = max_bytes
        self.errors_output = False

    def with_errors(self) -> WriteShards:
        """This transform, returning `(shard paths, left-out images' ErrorRecords)`."""
        transform = WriteShards(
            self.output_dir,
            self.format.kind,
            rows_per_shard=self.rows_per_shard,
            spread=self.spread,
            max_bytes=self.max_bytes,
        )
        transform.errors_output = True
        return transform

    def expand(
        self, rows: PCollection[dict[str, Any]]
    ) -> PCollection[list[str]] | tuple[PCollection[list[str]], PCollection[ErrorRecord]]:
        staging = join(self.output_dir, f".{self.format.folder}.tmp-{uuid.uuid4().hex}")
        size = self.rows_per_shard
        if self.spread:
            rows = rows | "Spread" >> beam.Reshuffle()
        staged, errors = (
            rows
            | "Shards" >> beam.BatchElements(min_batch_size=size, max_batch_size=size)
            | "WriteShard"
            >> beam.ParDo(_WriteShard(staging, self.format, self.max_bytes)).with_outputs(
                ERRORS, main="staged"
            )
        )
        shards = (
            staged
            | "Staged" >> beam.combiners.ToList()
            | "Publish" >> beam.Map(publish_shards, self.format, self.output_dir)
        )
        return (shards, errors) if self.errors_output else shards


class WriteShardFormats(beam.PTransform):
    """Metadata rows to the shards of each of `kinds` (`WriteShards`), and the images left
    out of any to `<output_dir>/shard-errors.jsonl` (one line per image and format, as in
    `errors.jsonl`, `stage` the format), always written (empty when none), so that no
    earlier list outlives its shards. Returns, once all is written, the lines to warn the
    user with (`left_out_warnings`; `hidden_images_warnings` when parquet shards were
    written beside the output's images), one list."""

    def __init__(
        self,
        output_dir: str,
        kinds: Iterable[str],
        *,
        rows_per_shard: int,
        spread: bool,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.kinds = tuple(kinds)
        self.rows_per_shard = rows_per_shard
        self.spread = spread
        self.max_bytes = max_bytes

    def expand(self, rows: PCollection[dict[str, Any]]) -> PCollection[list[str]]:
        shards, counts, left_out = [], [], []
        for kind in self.kinds:
            write = WriteShards(
                self.output_dir,
                kind,
                rows_per_shard=self.rows_per_shard,
                spread=self.spread,
                max_bytes=self.max_bytes,
            )
            paths, errors = rows | f"Write {kind}" >> write.with_errors()
            shards.append(AsSingleton(paths))
            counts.append(AsSingleton(errors | f"Count {kind}" >> beam.combiners.Count.Globally()))
            left_out.append(errors)
        errors_file = tuple(left_out) | "WriteErrors" >> WriteErrors(
            self.output_dir, filename=SHARD_ERRORS_FILE
        )
        kinds = self.kinds
        hidden = (
            rows | "HiddenImages" >> HiddenImagesWarnings()
            if PARQUET.kind in kinds
            else rows.pipeline | "NoHiddenImages" >> beam.Create([[]])
        )

        def warnings(_: str, hidden: list[str], *counted: Any) -> list[str]:
            numbers, written = counted[: len(kinds)], counted[len(kinds) :]
            lines = [
                line
                for kind, number, paths in zip(kinds, numbers, written, strict=True)
                for line in left_out_warnings(kind, number, len(paths))
            ]
            parquet = dict(zip(kinds, written, strict=True)).get(PARQUET.kind)
            return lines + (hidden if parquet else [])

        return errors_file | "Warnings" >> beam.Map(warnings, AsSingleton(hidden), *counts, *shards)
