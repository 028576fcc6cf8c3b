"""The captioning job: paths in, `metadata.jsonl` and `errors.jsonl` out."""

from __future__ import annotations

import apache_beam as beam

from captionflow.config import RunConfig
from captionflow.handlers.registry import captioner_handler, ranker_handler
from captionflow.transforms import (
    CaptionImages,
    LogProgress,
    ReadImagePaths,
    WriteErrors,
    WriteMetadata,
)


def build_caption_pipeline(pipeline: beam.Pipeline, config: RunConfig) -> None:
    """Add the whole job to `pipeline`."""
    model_options = {
        "device": config.device,
        "dtype": config.dtype,
        "trust_remote_code": config.trust_remote_code,
    }
    captioner = captioner_handler(
        config.captioner,
        decoding=config.decoding,
        max_batch_size=config.caption_batch_size,
        **model_options,
    )
    ranker = ranker_handler(config.ranker, max_batch_size=config.rank_batch_size, **model_options)
    uris = pipeline | "ReadImagePaths" >> ReadImagePaths(config.input, limit=config.limit)
    captions, errors = uris | "CaptionImages" >> CaptionImages(
        captioner, ranker, max_side=config.max_side, max_pixels=config.max_pixels
    )
    (
        captions
        | "Progress" >> LogProgress()
        | "WriteMetadata" >> WriteMetadata(config.output_dir, filename=config.metadata_filename)
    )
    errors | "WriteErrors" >> WriteErrors(config.output_dir)
