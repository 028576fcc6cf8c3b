"""`captionflow export`: other formats from a finished output, without captioning again."""

from __future__ import annotations

import logging

import apache_beam as beam

from captionflow.config import ExportConfig
from captionflow.transforms.shards import (
    PARQUET,
    SHARD_FORMATS,
    HiddenImagesWarnings,
    MetadataRows,
    WriteShardFormats,
)
from captionflow.transforms.sidecars import WriteSidecars


def build_export_pipeline(
    pipeline: beam.Pipeline, config: ExportConfig, *, spread: bool = True
) -> None:
    """Read the output's metadata rows once; write each asked-for format from them. Without
    `spread` (local runners), shards are made where the rows are read (`WriteShards`); the
    images left out of them are listed in `shard-errors.jsonl` (`WriteShardFormats`); parquet
    shards beside the output's images are warned about (`HiddenImagesWarnings`)."""
    rows = pipeline | "Metadata" >> beam.Create([config.metadata_path]) | "Rows" >> MetadataRows()
    if "sidecar" in config.formats:
        rows | "WriteSidecars" >> WriteSidecars(
            extension=config.sidecar_extension, overwrite=config.overwrite_captions
        )
    if kinds := [name for name in config.formats if name in SHARD_FORMATS]:
        rows | "WriteShards" >> WriteShardFormats(
            config.output_dir,
            kinds,
            rows_per_shard=config.rows_per_shard,
            spread=spread,
            max_bytes=config.max_bytes,
        )
    if PARQUET.kind in config.formats:
        output_dir = config.output_dir
        rows | "HiddenImages" >> HiddenImagesWarnings() | "Warn" >> beam.Map(_warn, output_dir)


def _warn(lines: list[str], output_dir: str) -> None:
    for line in lines:
        logging.getLogger("captionflow").warning("%s", line.replace("OUTPUT", output_dir))
