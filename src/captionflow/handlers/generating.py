"""Captioners that are a transformers `generate` over one fixed prompt (BLIP-2, Florence-2).

The prompt's token ids are the same for every image, image tokens included, since the model's
image input has a fixed size: they are made once, by the model's own processor from a blank
image, and each batch only brings its pixel values (from the decode step's views). `generate`
makes the K candidates of an image after its vision tower has run once.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from PIL import Image

from captionflow.handlers.base import CaptionModelHandler, ModelImages
from captionflow.handlers.candidates import per_image
from captionflow.handlers.decoding import DecodingOptions
from captionflow.handlers.loading import Pretrained
from captionflow.handlers.pixels import PixelValues, view_spec_of
from captionflow.views import ViewSpec


class GeneratingCaptioner(Pretrained):
    """A loaded model whose `generate(pixel_values, input_ids, ...)` writes the captions."""

    flag: ClassVar[str] = "captioner"
    default_prompt: ClassVar[str] = ""

    def __init__(self, model: Any, processor: Any, decoding: DecodingOptions) -> None:
        self.model = model.eval()
        self.processor = processor
        self.decoding = decoding
        self.pixel_values = PixelValues(processor.image_processor)
        self.prompt = decoding.prompt_or(self.default_prompt)
        height, width = self.pixel_values.spec.size if self.pixel_values.spec else (224, 224)
        blank = Image.new("RGB", (width, height))
        encoded = processor(images=[blank], text=[self.prompt], return_tensors="pt")
        self.prompt_ids = encoded["input_ids"][0]
        self.prompt_mask = encoded["attention_mask"][0]
        self.generate_kwargs = decoding.generate_kwargs(processor.tokenizer)
        if decoding.seed is not None:
            torch.manual_seed(decoding.seed)  # generate has no generator of its own to give

    @property
    def continues_prompt(self) -> bool:
        """Whether `generate` returns the prompt before the new tokens (decoder-only models)."""
        return False

    @torch.inference_mode()
    def caption(self, images: ModelImages) -> list[list[str]]:
        device = self.model.device
        pixel_values = self.pixel_values(images, device, self.model.dtype)
        count = pixel_values.shape[0]
        input_ids = self.prompt_ids.to(device).expand(count, -1)
        ids = self.model.generate(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=self.prompt_mask.to(device).expand(count, -1),
            **self.generate_kwargs,
        )
        if self.continues_prompt:
            ids = ids[:, input_ids.shape[1] :]
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return per_image(texts, count)


class GeneratingCaptionHandler(CaptionModelHandler):
    """RunInference handler for a `GeneratingCaptioner`; `model` is a hub id, a local
    directory or a gs:// URI."""

    captioner_class: ClassVar[type[GeneratingCaptioner]]

    def view_spec(self) -> ViewSpec | None:
        return view_spec_of(
            self.model_id,
            self.captioner_class.processor_class,
            trust_remote_code=self.trust_remote_code,
        )

    def load_model(self) -> GeneratingCaptioner:
        return self.load(self.captioner_class, decoding=self.decoding)
