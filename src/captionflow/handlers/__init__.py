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
from captionflow.handlers.blip2 import Blip2Captioner, Blip2CaptionHandler
from captionflow.handlers.blip_itm import BlipItmRanker, BlipItmRankHandler
from captionflow.handlers.clip import ClipRanker, ClipRankHandler
from captionflow.handlers.decoding import DecodingOptions
from captionflow.handlers.first import NoRankHandler
from captionflow.handlers.florence2 import Florence2Captioner, Florence2CaptionHandler
from captionflow.handlers.registry import (
    CAPTIONERS,
    RANKERS,
    captioner_handler,
    captioners,
    ranker_handler,
    rankers,
    register_captioner,
    register_ranker,
)
from captionflow.handlers.siglip import SiglipRanker, SiglipRankHandler
from captionflow.handlers.vlm import VlmCaptioner, VlmCaptionHandler

__all__ = [
    "CAPTIONERS",
    "RANKERS",
    "Blip2CaptionHandler",
    "Blip2Captioner",
    "BlipCaptionHandler",
    "BlipCaptioner",
    "BlipItmRankHandler",
    "BlipItmRanker",
    "CaptionModelHandler",
    "Captioner",
    "ClipRankHandler",
    "ClipRanker",
    "DecodingOptions",
    "Florence2CaptionHandler",
    "Florence2Captioner",
    "InferenceFailure",
    "IsolatingModelHandler",
    "NoRankHandler",
    "RankModelHandler",
    "Ranker",
    "SiglipRankHandler",
    "SiglipRanker",
    "VlmCaptionHandler",
    "VlmCaptioner",
    "captioner_handler",
    "captioners",
    "ranker_handler",
    "rankers",
    "register_captioner",
    "register_ranker",
]
