"""BLIP-2 captioning (Salesforce/blip2-opt-*, blip2-flan-t5-*), through transformers."""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import Blip2ForConditionalGeneration, Blip2Processor

from captionflow.handlers.generating import GeneratingCaptioner, GeneratingCaptionHandler
from captionflow.handlers.registry import register_captioner


class Blip2Captioner(GeneratingCaptioner):
    """A loaded BLIP-2: its vision tower and Q-Former run once per image, and the language
    model (OPT or Flan-T5) writes the K candidates from the image's query tokens. With no
    `--prompt` it captions freely; a prompt such as "a photo of" is continued."""

    kind: ClassVar[str] = "blip2"
    model_class: ClassVar[Any] = Blip2ForConditionalGeneration
    processor_class: ClassVar[Any] = Blip2Processor
    default_prompt: ClassVar[str] = ""

    @property
    def continues_prompt(self) -> bool:
        return not self.model.config.text_config.is_encoder_decoder


@register_captioner("blip2")
class Blip2CaptionHandler(GeneratingCaptionHandler):
    kind = "blip2"
    batch_size = 4  # billions of parameters: small requests, merged by the engine
    default_model = "Salesforce/blip2-opt-2.7b"
    captioner_class = Blip2Captioner
