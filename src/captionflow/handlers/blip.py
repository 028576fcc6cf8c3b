"""BLIP captioning (Salesforce/blip-image-captioning-*), through Hugging Face transformers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from transformers import BlipForConditionalGeneration, BlipProcessor

from captionflow.handlers.base import CaptionModelHandler, ModelImages
from captionflow.handlers.blip_fast import FastBlip
from captionflow.handlers.candidates import per_image
from captionflow.handlers.decoding import DecodingOptions
from captionflow.handlers.loading import ModelLoadError, Pretrained
from captionflow.handlers.pixels import PixelValues, view_spec_of
from captionflow.handlers.registry import register_captioner
from captionflow.handlers.search import (
    SearchSettings,
    image_generators,
    not_implemented,
    not_read,
    search,
)
from captionflow.views import ViewSpec

logger = logging.getLogger(__name__)

PROMPT = "a picture of "  # BLIP's usual prompt, when none is given


class BlipCaptioner(Pretrained):
    """A loaded BLIP: each image is encoded once and K captions decoded from it in one call,
    by `FastBlip` and `search` (same token ids as `generate`, at a fraction of its overhead),
    or by transformers' `generate` (`decoder="reference"`, or settings only it implements)."""

    kind: ClassVar[str] = "blip"
    flag: ClassVar[str] = "captioner"
    model_class: ClassVar[Any] = BlipForConditionalGeneration
    processor_class: ClassVar[Any] = BlipProcessor

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
        self.prompt = decoding.prompt_or(PROMPT)
        prompt_ids = tokenizer(self.prompt, add_special_tokens=False).input_ids
        self._prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True).strip()
        self._generate_kwargs = decoding.generate_kwargs(tokenizer)
        bad_words = decoding.bad_word_ids(tokenizer)
        text = model.config.text_config
        self._prompt_ids = prompt_ids_for_generate(tokenizer(self.prompt).input_ids, text)
        _check_length(len(self._prompt_ids), decoding.max_new_tokens, text, model.name_or_path)
        self._search = SearchSettings.of(
            decoding,
            model.text_decoder.generation_config,
            eos=text.sep_token_id,
            pad=text.pad_token_id,
            bad_words=bad_words,
        )
        if ignored := not_read(model.generation_config, model.text_decoder.generation_config):
            # BLIP's generate decodes with its text decoder's config, never the checkpoint's.
            logger.warning(
                "the checkpoint's generation config sets %s, which BLIP's generate never reads "
                "(it decodes with its text decoder's own config): no decoder applies them",
                ", ".join(ignored),
            )
        self.fast: FastBlip | None = None
        if decoding.decoder != "reference":
            if missing := not_implemented(model.text_decoder.generation_config):
                logger.warning(
                    "BLIP's generation config sets %s, which only generate implements: "
                    "decoding with generate",
                    ", ".join(missing),
                )
            else:
                self.fast = FastBlip(self.model, compiled=decoding.decoder == "compiled")
        if decoding.seed is not None and self.fast is None:
            torch.manual_seed(decoding.seed)  # generate has no generator of its own to give

    @torch.inference_mode()
    def caption(self, images: ModelImages) -> list[list[str]]:
        pixel_values = self.pixel_values(images, self.model.device, self.model.dtype)
        texts = self.processor.batch_decode(self.token_ids(pixel_values), skip_special_tokens=True)
        return per_image(texts, len(images), self._prompt_text)

    @torch.inference_mode()
    def token_ids(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The candidates' token ids, K rows per image, as `generate` lays them out."""
        device = pixel_values.device
        images = pixel_values.shape[0]
        if self.fast is None:
            prompts = self.processor.tokenizer([self.prompt] * images, return_tensors="pt")
            return self.model.generate(
                pixel_values=pixel_values,
                input_ids=prompts["input_ids"].to(device),
                attention_mask=prompts["attention_mask"].to(device),
                **self._generate_kwargs,
            )
        settings = self._search
        prompt = torch.tensor(self._prompt_ids, device=device)
        steps = self.fast.steps(
            self.fast.encode(pixel_values),
            settings.rows_per_image,
            max_length=len(self._prompt_ids) + settings.max_new_tokens,
        )
        generators = None
        if settings.seed is not None and settings.strategy == "sample":
            generators = image_generators(pixel_values, settings.seed)
        return search(steps, prompt, images, settings, generators)


def _check_length(prompt: int, max_new_tokens: int, text_config: object, path: str) -> None:
    """Captions that cannot fit the decoder's positions would fail every batch, then every
    image alone: a setting no retry mends, so the job stops at once."""
    positions = text_config.max_position_embeddings  # type: ignore[attr-defined]
    if prompt + max_new_tokens <= positions:
        return
    room = positions - prompt
    advice = f"use --max-new-tokens {room} or less" if room >= 1 else "use a shorter --prompt"
    raise ModelLoadError(
        f"--max-new-tokens {max_new_tokens} is more than the blip model {path!r} can write: "
        f"its prompt takes {prompt} of its {positions} positions; {advice}"
    )


def prompt_ids_for_generate(ids: Sequence[int], text_config: object) -> list[int]:
    """The decoder's prompt as BLIP's `generate` makes it from the tokenized prompt: the
    first token becomes the decoder's BOS and the last (the tokenizer's SEP) is dropped."""
    return [text_config.bos_token_id, *ids[1:-1]]  # type: ignore[attr-defined]


@register_captioner("blip")
class BlipCaptionHandler(CaptionModelHandler):
    """RunInference handler for BLIP; `model` is a hub id, a local directory or a gs:// URI."""

    kind = "blip"
    default_model = "Salesforce/blip-image-captioning-base"

    def view_spec(self) -> ViewSpec | None:
        return view_spec_of(self.model_id, BlipProcessor, trust_remote_code=self.trust_remote_code)

    def load_model(self) -> BlipCaptioner:
        return self.load(BlipCaptioner, decoding=self.decoding)
