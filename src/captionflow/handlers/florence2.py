"""Florence-2 captioning (florence-community/Florence-2-*, native in transformers 5)."""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import AutoProcessor, Florence2ForConditionalGeneration

from captionflow.handlers.generating import GeneratingCaptioner, GeneratingCaptionHandler
from captionflow.handlers.registry import register_captioner

CAPTION_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")


class Florence2Captioner(GeneratingCaptioner):
    """A loaded Florence-2: the image is encoded once, and its BART decoder writes the K
    candidates. The prompt is the task: `<CAPTION>` (the default, one sentence),
    `<DETAILED_CAPTION>` or `<MORE_DETAILED_CAPTION>` (a paragraph)."""

    kind: ClassVar[str] = "florence2"
    model_class: ClassVar[Any] = Florence2ForConditionalGeneration
    processor_class: ClassVar[Any] = AutoProcessor
    default_prompt: ClassVar[str] = "<CAPTION>"


@register_captioner("florence2")
class Florence2CaptionHandler(GeneratingCaptionHandler):
    kind = "florence2"
    default_model = "florence-community/Florence-2-base"
    captioner_class = Florence2Captioner
