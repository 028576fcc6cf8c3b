"""BLIP captioning (Salesforce/blip-image-captioning-*), through Hugging Face transformers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import BlipForConditionalGeneration, BlipProcessor

from captionflow.handlers.base import CaptionModelHandler, ModelImages
from captionflow.handlers.decoding import DecodingOptions
from captionflow.handlers.loading import load_pretrained
from captionflow.handlers.pixels import PixelValues, view_spec_of
from captionflow.handlers.registry import register_captioner
from captionflow.views import ViewSpec


class BlipCaptioner:
    """A loaded BLIP: each image is encoded once and K captions decoded from it in one call."""

    def __init__(
        self,
        model: BlipForConditionalGeneration,
        processor: BlipProcessor,
        decoding: DecodingOptions,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.pixel_values = PixelValues(processor.image_processor)
        self.decoding = decoding
        tokenizer = processor.tokenizer
        prompt_ids = tokenizer(decoding.prompt, add_special_tokens=False).input_ids
        self._prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True).strip()
        self._generate_kwargs = decoding.generate_kwargs()
        rows_per_image = max(self._generate_kwargs["num_beams"], decoding.num_captions)
        share_cross_attention_projections(self.model, rows_per_image)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        decoding: DecodingOptions,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ) -> BlipCaptioner:
        model, processor = load_pretrained(
            path,
            BlipForConditionalGeneration,
            BlipProcessor,
            flag="captioner",
            kind="blip",
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
        return cls(model, processor, decoding)

    @torch.inference_mode()
    def caption(self, images: ModelImages) -> list[list[str]]:
        device = self.model.device
        prompts = self.processor.tokenizer(
            [self.decoding.prompt] * len(images), return_tensors="pt"
        )
        generated = self.model.generate(
            pixel_values=self.pixel_values(images, device, self.model.dtype),
            input_ids=prompts["input_ids"].to(device),
            attention_mask=prompts["attention_mask"].to(device),
            **self._generate_kwargs,
        )
        texts = self.processor.batch_decode(generated, skip_special_tokens=True)
        k = self.decoding.num_captions
        return [self._distinct(texts[i * k : (i + 1) * k]) for i in range(len(images))]

    def _distinct(self, texts: Sequence[str]) -> list[str]:
        """The prompt removed, blanks and repeats dropped, first-seen order kept."""
        seen: dict[str, None] = {}
        for text in texts:
            text = text.strip().removeprefix(self._prompt_text).strip()
            if text:
                seen.setdefault(text)
        return list(seen)


class SharedRowsLinear(torch.nn.Module):
    """A cross-attention key or value projection, computed once per image, not once per caption.

    `generate` repeats each image's embeddings for its K sequences (`repeat_interleave`, so a
    batch holds K identical rows per image); projecting them K times is most of the first
    decoding step. This projects one row of each group and repeats the result: same values,
    1/K of the work.
    """

    def __init__(self, linear: torch.nn.Linear, rows_per_image: int) -> None:
        super().__init__()
        self.linear = linear
        self.rows_per_image = rows_per_image

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        k = self.rows_per_image
        if k > 1 and states.shape[0] % k == 0:
            return self.linear(states[::k]).repeat_interleave(k, dim=0)
        return self.linear(states)


def share_cross_attention_projections(
    model: BlipForConditionalGeneration, rows_per_image: int
) -> None:
    for name, module in model.text_decoder.named_modules():
        if name.endswith("crossattention.self"):
            for projection in ("key", "value"):
                linear = getattr(module, projection)
                if isinstance(linear, SharedRowsLinear):
                    linear.rows_per_image = rows_per_image
                else:
                    setattr(module, projection, SharedRowsLinear(linear, rows_per_image))


@register_captioner("blip")
class BlipCaptionHandler(CaptionModelHandler):
    """RunInference handler for BLIP; `model` is a hub id, a local directory or a gs:// URI."""

    kind = "blip"
    default_model = "Salesforce/blip-image-captioning-base"

    def view_spec(self) -> ViewSpec | None:
        return view_spec_of(self.model_id, BlipProcessor, trust_remote_code=self.trust_remote_code)

    def load_model(self) -> BlipCaptioner:
        return BlipCaptioner.from_pretrained(
            self.model_id,
            decoding=self.decoding,
            device=self.device,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
        )
