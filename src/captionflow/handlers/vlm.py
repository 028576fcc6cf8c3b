"""Any instruction-following vision-language model as a captioner: `AutoModelForImageTextToText`
and its chat template (LLaVA, Qwen2.5-VL / Qwen3-VL, SmolVLM, ...), or its plain prompt where
the processor has no template (PaliGemma: `--prompt "caption en"`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from captionflow.handlers.base import CaptionModelHandler, ModelImages
from captionflow.handlers.candidates import per_image
from captionflow.handlers.decoding import DecodingOptions
from captionflow.handlers.loading import Pretrained
from captionflow.handlers.registry import register_captioner
from captionflow.views import ImageViews, ViewBatch

INSTRUCTION = "Describe this image."  # when no --prompt is given


class VlmCaptioner(Pretrained):
    """A loaded VLM: `--prompt` is the user's instruction, put in the model's own chat template
    with the image; the images of a batch go through its processor together (its own resizing
    to the model's limits), prompts padded on the left, and `generate` answers K times.

    A VLM's prompt is long (hundreds of image tokens), and `generate` would run it through the
    language model once per candidate. When sampling, it runs once per image instead: the
    prompt's cache is made for N rows and repeated for the K candidates of each
    (`shares_prompt`). Models with per-batch position state (Qwen2-VL's multimodal rotary
    deltas) or per-token inputs beyond ids and mask (PaliGemma's prefix attention), and beam
    search, take `generate`'s own path.
    """

    kind: ClassVar[str] = "vlm"
    flag: ClassVar[str] = "captioner"
    model_class: ClassVar[Any] = AutoModelForImageTextToText
    processor_class: ClassVar[Any] = AutoProcessor

    def __init__(self, model: Any, processor: Any, decoding: DecodingOptions) -> None:
        self.model = model.eval()
        self.processor = processor
        processor.tokenizer.padding_side = "left"  # answers start where the prompts end
        instruction = decoding.prompt_or(INSTRUCTION)
        content = [{"type": "image"}, {"type": "text", "text": instruction}]
        self.text = (
            processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
            if getattr(processor, "chat_template", None)
            else instruction  # the processor puts the image tokens in itself (PaliGemma)
        )
        self.generate_kwargs = decoding.generate_kwargs(processor.tokenizer)
        if decoding.seed is not None:
            torch.manual_seed(decoding.seed)
        self.k = decoding.num_captions
        self.shares_prompt = (
            decoding.strategy == "sample"
            and self.k > 1
            and not hasattr(getattr(model, "model", None), "rope_deltas")
        )

    @torch.inference_mode()
    def caption(self, images: ModelImages) -> list[list[str]]:
        pictures = _pictures(images)
        inputs = self.processor(
            images=pictures, text=[self.text] * len(pictures), padding=True, return_tensors="pt"
        ).to(self.model.device)
        inputs.pop("labels", None)  # PaliGemma's processor makes them for training
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        if self.shares_prompt and not _per_token_state(inputs):
            ids = self._generate_from_shared_prompt(dict(inputs))
        else:
            ids = self.model.generate(**inputs, **self.generate_kwargs)
        answers = ids[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(answers, skip_special_tokens=True)
        return per_image([" ".join(text.split()) for text in texts], len(pictures))

    def _generate_from_shared_prompt(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """`generate`'s K samples per image, with the prompt (all but its last token) run
        through the model once per image and its cache repeated K times."""
        ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        head_mask = mask[:, :-1]
        positions = (head_mask.long().cumsum(-1) - 1).masked_fill(head_mask == 0, 0)
        prefix = self.model(
            input_ids=ids[:, :-1],
            attention_mask=head_mask,
            position_ids=positions,
            use_cache=True,
            **inputs,  # the image inputs: only this pass reads them
        )
        cache = prefix.past_key_values
        cache.batch_repeat_interleave(self.k)
        with (
            warnings.catch_warnings()
        ):  # transformers 5.2x renames it `cache`; older know only this
            warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
            return self.model.generate(
                input_ids=ids.repeat_interleave(self.k, dim=0),
                attention_mask=mask.repeat_interleave(self.k, dim=0),
                past_key_values=cache,
                **(self.generate_kwargs | {"num_return_sequences": 1}),
            )


def _per_token_state(inputs: Any) -> bool:
    """Whether the inputs hold more than ids and mask per prompt token (PaliGemma's
    `token_type_ids`, its prefix attention): the prompt's cache cannot be cut and shared then."""
    ids = inputs["input_ids"]
    return any(
        isinstance(value, torch.Tensor) and value.shape[:2] == ids.shape
        for name, value in inputs.items()
        if name not in ("input_ids", "attention_mask")
    )


def _pictures(images: ModelImages) -> Sequence[Image.Image]:
    if isinstance(images, ViewBatch) or any(isinstance(i, ImageViews) for i in images):
        raise ValueError("a VLM takes decoded images: its processor sizes them itself")
    return [image if image.mode == "RGB" else image.convert("RGB") for image in images]


@register_captioner("vlm")
class VlmCaptionHandler(CaptionModelHandler):
    """RunInference handler for a VLM; `model` is a hub id, a local directory or a gs:// URI.
    It declares no view: images arrive decoded (at most `--max-side` pixels a side)."""

    kind = "vlm"
    batch_size = 4  # long prompts and answers: small requests, merged by the engine
    default_model = "Qwen/Qwen2.5-VL-3B-Instruct"

    def load_model(self) -> VlmCaptioner:
        return self.load(VlmCaptioner, decoding=self.decoding)
