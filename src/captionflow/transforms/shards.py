"""Self-contained dataset shards, images embedded: Parquet as the Hugging Face Hub serves it,
and WebDataset tar files as img2dataset writes them.

Shards are made from the finished `metadata.jsonl` rows (so a resumed run's shards hold every
image, and `captionflow export` makes the same from any output), each image's file read once
more for its bytes. Shards are written under a staging name by any number of workers, then
moved into place together (`data/train-00000-of-00012.parquet`, `shards/00000.tar`, ...); the
shards of an earlier export are replaced.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import PCollection

from captionflow.images import as_jpeg
from captionflow.jsonl import dumps
from captionflow.paths import dirname, is_remote, join
from captionflow.transforms.lines import ReadLines
from captionflow.transforms.write import remove_folder

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
HF_METADATA = {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}})}


class MetadataRows(beam.PTransform):
    """Paths of finished metadata files in; their records out, read in parallel ranges."""

    def expand(self, paths: PCollection[str]) -> PCollection[dict[str, Any]]:
        return (
            paths
            | "Read" >> ReadLines()
            | "Rows"
            >> beam.FlatMap(lambda line: [json.loads(line.data)] if line.data.strip() else [])
        )


def image_bytes(row: dict[str, Any]) -> bytes:
    with FileSystems.open(row["image_uri"], compression_type="uncompressed") as file:
        return file.read()


def parquet_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows with their image bytes (`image`: {bytes, path}) first, then every record field."""
    images = [
        {"bytes": image_bytes(row), "path": row["file_name"].rsplit("/", 1)[-1]} for row in rows
    ]
    table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
    table = table.add_column(0, pa.field("image", IMAGE_TYPE), pa.array(images, IMAGE_TYPE))
    return table.replace_schema_metadata(HF_METADATA)


def write_parquet(rows: list[dict[str, Any]], file: IO[bytes]) -> None:
    pq.write_table(parquet_table(rows), file)


def sample_key(row: dict[str, Any]) -> str:
    """A sample's name in a tar: from its image URI, stable, and free of dots (WebDataset
    splits a member's name at its first dot)."""
    return hashlib.sha1(row["image_uri"].encode("utf-8")).hexdigest()[:20]


def write_webdataset(rows: list[dict[str, Any]], file: IO[bytes]) -> None:
    """Per image `KEY.jpg` (the source's bytes; other formats re-encoded), `KEY.txt` (the
    caption) and `KEY.json` (the record), in that order."""
    with tarfile.open(fileobj=file, mode="w|") as tar:
        for row in rows:
            key = sample_key(row)
            members = {
                "jpg": as_jpeg(image_bytes(row)),
                "txt": row["text"].encode("utf-8"),
                "json": dumps(row).encode("utf-8"),
            }
            for extension, data in members.items():
                member = tarfile.TarInfo(f"{key}.{extension}")
                member.size = len(data)
                member.mode = 0o644
                tar.addfile(member, io.BytesIO(data))


@dataclass(frozen=True)
class ShardFormat:
    folder: str  # under the output
    suffix: str
    write: Callable[[list[dict[str, Any]], IO[bytes]], None]
    name: Callable[[int, int], str]  # (index, count) to the shard's file name


PARQUET = ShardFormat(
    "data", ".parquet", write_parquet, lambda i, n: f"train-{i:05d}-of-{n:05d}.parquet"
)
WEBDATASET = ShardFormat("shards", ".tar", write_webdataset, lambda i, n: f"{i:05d}.tar")
SHARD_FORMATS = {"parquet": PARQUET, "webdataset": WEBDATASET}


class _WriteShard(beam.DoFn):
    def __init__(self, staging: str, shard_format: ShardFormat) -> None:
        self.staging = staging
        self.format = shard_format

    def process(self, rows: list[dict[str, Any]]) -> Iterator[str]:
        path = join(self.staging, f"{uuid.uuid4().hex}{self.format.suffix}")
        with FileSystems.create(path) as file:
            self.format.write(rows, file)
        yield path


def publish_shards(staged: list[str], shard_format: ShardFormat, output_dir: str) -> list[str]:
    """Move the staged shards into their folder under their final names, in place of
    whatever an earlier export left there; remove the staging areas (a killed run's too)."""
    folder = join(output_dir, shard_format.folder)
    old = FileSystems.match([join(folder, f"*{shard_format.suffix}")])[0].metadata_list
    if old:
        FileSystems.delete([file.path for file in old])
    count = len(staged)
    final = [join(folder, shard_format.name(i, count)) for i in range(count)]
    if staged:
        with contextlib.suppress(OSError):  # it exists; object stores have no folders at all
            FileSystems.mkdirs(folder)
        FileSystems.rename(sorted(staged), final)
    stagings = join(output_dir, f".{shard_format.folder}.tmp-*")
    files = FileSystems.match([join(stagings, "*")])[0].metadata_list
    folders = {dirname(file.path) for file in files}
    if not is_remote(output_dir):
        folders.update(glob.glob(stagings))
    for staging in folders:
        remove_folder(staging)
    return final


class WriteShards(beam.PTransform):
    """Metadata rows (dicts, as in `metadata.jsonl`) to shards of one `kind` (`parquet`:
    `<output_dir>/data/*.parquet`, loads with `datasets.load_dataset("parquet", ...)`;
    `webdataset`: `<output_dir>/shards/*.tar`), at most `rows_per_shard` images a shard.
    Returns the shard paths.

    With `spread` (the default), the rows are reshuffled first, so that every worker reads
    images for its shards. Without it, each worker makes shards of the rows it holds: for
    local runners, which would hold every reshuffled row in the launcher's memory."""

    def __init__(
        self, output_dir: str, kind: str, *, rows_per_shard: int = 1000, spread: bool = True
    ) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.format = SHARD_FORMATS[kind]
        self.rows_per_shard = rows_per_shard
        self.spread = spread

    def expand(self, rows: PCollection[dict[str, Any]]) -> PCollection[list[str]]:
        staging = join(self.output_dir, f".{self.format.folder}.tmp-{uuid.uuid4().hex}")
        size = self.rows_per_shard
        if self.spread:
            rows = rows | "Spread" >> beam.Reshuffle()
        return (
            rows
            | "Shards" >> beam.BatchElements(min_batch_size=size, max_batch_size=size)
            | "WriteShard" >> beam.ParDo(_WriteShard(staging, self.format))
            | "Staged" >> beam.combiners.ToList()
            | "Publish" >> beam.Map(publish_shards, self.format, self.output_dir)
        )
