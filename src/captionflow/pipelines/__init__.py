"""Complete pipelines, wired from validated settings."""

from captionflow.pipelines.caption import build_caption_pipeline
from captionflow.pipelines.export import build_export_pipeline

__all__ = ["build_caption_pipeline", "build_export_pipeline"]
