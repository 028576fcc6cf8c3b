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
from captionflow.handlers.blip_itm import BlipItmRanker, BlipItmRankHandler
from captionflow.handlers.captionrank import CaptionRankHandler
from captionflow.handlers.clip import ClipRanker, ClipRankHandler
from captionflow.handlers.decoding import DecodingOptions
from captionflow.handlers.first import NoRankHandler
from captionflow.handlers.lavis import LavisBlipCaptionHandler, LavisClipRankHandler
from captionflow.handlers.registry import (
    CAPTIONERS,
    RANKERS,
    captioner_handler,
    captioners,
    ranker_handler,
    rankers,
    register_captioner,
    register_ranker,
    unavailable,
)

# Handlers whose transformers classes are newer than some environments captionflow runs in
# (LAVIS's pins transformers<4.27): there they are left out, and asking for one says why.
try:
    from captionflow.handlers.blip2 import Blip2Captioner, Blip2CaptionHandler
except ImportError as error:  # transformers < 4.27
    unavailable("captioner", "blip2", error)
try:
    from captionflow.handlers.florence2 import Florence2Captioner, Florence2CaptionHandler
except ImportError as error:  # Florence-2: native in recent transformers only
    unavailable("captioner", "florence2", error)
try:
    from captionflow.handlers.siglip import SiglipRanker, SiglipRankHandler
except ImportError as error:  # transformers < 4.37
    unavailable("ranker", "siglip", error)
try:
    from captionflow.handlers.vlm import VlmCaptioner, VlmCaptionHandler
except ImportError as error:  # AutoModelForImageTextToText: recent transformers only
    unavailable("captioner", "vlm", error)

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
    "CaptionRankHandler",
    "Captioner",
    "ClipRankHandler",
    "ClipRanker",
    "DecodingOptions",
    "Florence2CaptionHandler",
    "Florence2Captioner",
    "InferenceFailure",
    "IsolatingModelHandler",
    "LavisBlipCaptionHandler",
    "LavisClipRankHandler",
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
__all__ = [name for name in __all__ if name in globals()]  # less any left out
