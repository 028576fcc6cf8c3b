"""Complete pipelines, wired from validated settings."""

from captionflow.pipelines.caption import build_caption_pipeline

__all__ = ["build_caption_pipeline"]
