"""Composable Beam transforms: read paths, load images, caption, rank, write."""

from captionflow.transforms.caption import CaptionImages, CaptionOutputs
from captionflow.transforms.inference import CaptionAndRank, GenerateCaptions, RankCaptions
from captionflow.transforms.load import LoadImages
from captionflow.transforms.progress import LogProgress
from captionflow.transforms.read import ReadImagePaths
from captionflow.transforms.sidecars import WriteSidecars
from captionflow.transforms.write import WriteErrors, WriteJsonLines, WriteMetadata

__all__ = [
    "CaptionAndRank",
    "CaptionImages",
    "CaptionOutputs",
    "GenerateCaptions",
    "LoadImages",
    "LogProgress",
    "RankCaptions",
    "ReadImagePaths",
    "WriteErrors",
    "WriteJsonLines",
    "WriteMetadata",
    "WriteSidecars",
]
