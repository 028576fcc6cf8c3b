"""Model handlers: BLIP and CLIP first, any other captioner or ranker behind the same interface."""

from captionflow.handlers.base import (
    Captioner,
    CaptionModelHandler,
    InferenceFailure,
    IsolatingModelHandler,
    Ranker,
    RankModelHandler,
)
from captionflow.handlers.blip import BlipCaptioner, BlipCaptionHandler
from captionflow.handlers.clip import ClipRanker, ClipRankHandler
from captionflow.handlers.decoding import DecodingOptions
from captionflow.handlers.registry import (
    CAPTIONERS,
    RANKERS,
    captioner_handler,
    ranker_handler,
    register_captioner,
    register_ranker,
)

__all__ = [
    "CAPTIONERS",
    "RANKERS",
    "BlipCaptionHandler",
    "BlipCaptioner",
    "CaptionModelHandler",
    "Captioner",
    "ClipRankHandler",
    "ClipRanker",
    "DecodingOptions",
    "InferenceFailure",
    "IsolatingModelHandler",
    "RankModelHandler",
    "Ranker",
    "captioner_handler",
    "ranker_handler",
    "register_captioner",
    "register_ranker",
]
