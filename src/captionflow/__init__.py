"""captionflow: caption millions of images with BLIP, ranked by CLIP, on Apache Beam."""

from captionflow.handlers import captioner_handler, ranker_handler
from captionflow.records import CaptionRecord, ErrorRecord, ScoredCaption
from captionflow.transforms import (
    CaptionImages,
    GenerateCaptions,
    LoadImages,
    RankCaptions,
    ReadImagePaths,
    WriteErrors,
    WriteMetadata,
)

__version__ = "0.1.0"

__all__ = [
    "CaptionImages",
    "CaptionRecord",
    "ErrorRecord",
    "GenerateCaptions",
    "LoadImages",
    "RankCaptions",
    "ReadImagePaths",
    "ScoredCaption",
    "WriteErrors",
    "WriteMetadata",
    "captioner_handler",
    "ranker_handler",
]
