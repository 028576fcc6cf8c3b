"""Self-contained dataset shards, images embedded: Parquet as the Hugging Face Hub serves it.

Shards are made from the finished `metadata.jsonl` rows (so a resumed run's shards hold every
image, and `captionflow export` makes the same from any output), each image's file read once
more for its bytes. Shards are written under a staging name by any number of workers, then
moved into place together: `data/train-00000-of-00012.parquet`, ...; the shards of an earlier
export are replaced.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import PCollection

from captionflow.jsonl import read_json_lines
from captionflow.paths import join

DATA_DIR = "data"
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


def metadata_rows(path: str) -> Iterator[dict[str, Any]]:
    """The records of a finished metadata file."""
    for _, row in read_json_lines(path):
        yield row


def parquet_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows with their image bytes (`image`: {bytes, path}) first, then every record field."""
    images = []
    for row in rows:
        with FileSystems.open(row["image_uri"], compression_type="uncompressed") as file:
            images.append({"bytes": file.read(), "path": row["file_name"].rsplit("/", 1)[-1]})
    table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
    table = table.add_column(0, pa.field("image", IMAGE_TYPE), pa.array(images, IMAGE_TYPE))
    return table.replace_schema_metadata(HF_METADATA)


class _WriteShard(beam.DoFn):
    def __init__(self, staging: str) -> None:
        self.staging = staging

    def process(self, rows: list[dict[str, Any]]) -> Iterator[str]:
        path = join(self.staging, f"{uuid.uuid4().hex}.parquet")
        with FileSystems.create(path) as file:
            pq.write_table(parquet_table(rows), file)
        yield path


def publish_shards(staged: list[str], data_dir: str, staging: str) -> list[str]:
    """Move the staged shards into `data_dir` as `train-IIIII-of-NNNNN.parquet`, in place of
    whatever an earlier export left there."""
    old = FileSystems.match([join(data_dir, "train-*.parquet")])[0].metadata_list
    if old:
        FileSystems.delete([file.path for file in old])
    count = len(staged)
    final = [join(data_dir, f"train-{i:05d}-of-{count:05d}.parquet") for i in range(count)]
    if staged:
        with contextlib.suppress(OSError):  # it exists; object stores have no folders at all
            FileSystems.mkdirs(data_dir)
        FileSystems.rename(sorted(staged), final)
    leftovers = FileSystems.match([join(staging, "*")])[0].metadata_list
    if leftovers:
        FileSystems.delete([file.path for file in leftovers])
    if FileSystems.exists(staging):
        FileSystems.delete([staging])
    return final


class WriteParquet(beam.PTransform):
    """Metadata rows (dicts, as in `metadata.jsonl`) to `<output_dir>/data/*.parquet`, at
    most `rows_per_shard` rows a shard, images embedded; loads with
    `datasets.load_dataset("parquet", data_dir=<output_dir>/data)`. Returns the shard paths."""

    def __init__(self, output_dir: str, *, rows_per_shard: int = 1000) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.rows_per_shard = rows_per_shard

    def expand(self, rows: PCollection[dict[str, Any]]) -> PCollection[list[str]]:
        staging = join(self.output_dir, f".{DATA_DIR}.tmp-{uuid.uuid4().hex}")
        size = self.rows_per_shard
        return (
            rows
            | "Spread" >> beam.Reshuffle()
            | "Shards" >> beam.BatchElements(min_batch_size=size, max_batch_size=size)
            | "WriteShard" >> beam.ParDo(_WriteShard(staging))
            | "Staged" >> beam.combiners.ToList()
            | "Publish" >> beam.Map(publish_shards, join(self.output_dir, DATA_DIR), staging)
        )
