"""`captionflow export`: other formats from a finished output, without captioning again."""

from __future__ import annotations

import logging

import apache_beam as beam

from captionflow.config import ExportConfig
from captionflow.transforms.shards import (
    HIDDEN_IMAGES,
    SHARD_FORMATS,
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
    shards beside the output's images are warned about (`HIDDEN_IMAGES`)."""
    rows = pipeline | "Metadata" >> beam.Create([config.metadata_path]) | "Rows" >> MetadataRows()
    if "sidecar" in config.formats:
        rows | "WriteSidecars" >> WriteSidecars(
            extension=config.sidecar_extension, overwrite=config.overwrite_captions
        )
    if kinds := [name for name in config.formats if name in SHARD_FORMATS]:
        warnings = rows | "WriteShards" >> WriteShardFormats(
            config.output_dir,
            kinds,
            rows_per_shard=config.rows_per_shard,
            spread=spread,
            max_bytes=config.max_bytes,
        )
        warnings | "WarnHiddenImages" >> beam.Map(_warn_hidden_images, config.output_dir)


def _warn_hidden_images(lines: list[str], output_dir: str) -> None:
    """The parquet shards' warning of images they hide, from `WriteShardFormats`' lines (the
    others, of images left out, come from `shard-errors.jsonl` after the job:
    `cli.export_outcome`)."""
    if HIDDEN_IMAGES in lines:
        logging.getLogger("captionflow").warning("%s", HIDDEN_IMAGES.replace("OUTPUT", output_dir))
