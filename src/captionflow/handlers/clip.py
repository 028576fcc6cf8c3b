"""CLIP ranking (openai/clip-vit-*), through Hugging Face transformers 4.4x and 5.x."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import CLIPModel, CLIPProcessor

from captionflow.handlers.base import ModelImages, RankModelHandler
from captionflow.handlers.loading import load_pretrained
from captionflow.handlers.pixels import PixelValues, view_spec_of
from captionflow.handlers.registry import register_ranker
from captionflow.records import ScoredCaption
from captionflow.views import ViewSpec


class ClipRanker:
    """A loaded CLIP: each image embedded once, all its candidates in the same text batch."""

    def __init__(self, model: CLIPModel, processor: CLIPProcessor) -> None:
        self.model = model.eval()
        self.processor = processor
        self.pixel_values = PixelValues(processor.image_processor)
        self.max_text_tokens = model.config.text_config.max_position_embeddings

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ) -> ClipRanker:
        model, processor = load_pretrained(
            path,
            CLIPModel,
            CLIPProcessor,
            flag="ranker",
            kind="clip",
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
        return cls(model, processor)

    @torch.inference_mode()
    def rank(
        self, images: ModelImages, candidates: Sequence[Sequence[str]]
    ) -> list[list[ScoredCaption]]:
        device, dtype = self.model.device, self.model.dtype
        texts = [text for group in candidates for text in group]
        tokens = self.processor.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        ).to(device)
        pixels = self.pixel_values(images, device, dtype)
        image_embeds = _embedding(self.model.get_image_features(pixel_values=pixels))
        text_embeds = _embedding(self.model.get_text_features(**tokens))
        image_embeds = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
        text_embeds = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
        scale = self.model.logit_scale.exp().float()

        ranked, start = [], 0
        for image_embed, group in zip(image_embeds, candidates, strict=True):
            cosine = text_embeds[start : start + len(group)] @ image_embed
            probability = (cosine * scale).softmax(dim=0)
            start += len(group)
            scored = [
                ScoredCaption(text, float(c), float(p))
                for text, c, p in zip(group, cosine.tolist(), probability.tolist(), strict=True)
            ]
            ranked.append(sorted(scored, key=lambda s: s.score, reverse=True))
        return ranked


def _embedding(output: torch.Tensor | object) -> torch.Tensor:
    """transformers 4.x returns the projected embedding; 5.x wraps it in `.pooler_output`."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@register_ranker("clip")
class ClipRankHandler(RankModelHandler):
    """RunInference handler for CLIP; `model` is a hub id, a local directory or a gs:// URI."""

    kind = "clip"
    default_model = "openai/clip-vit-base-patch32"

    def view_spec(self) -> ViewSpec | None:
        return view_spec_of(self.model_id, CLIPProcessor, trust_remote_code=self.trust_remote_code)

    def load_model(self) -> ClipRanker:
        return ClipRanker.from_pretrained(
            self.model_id,
            device=self.device,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
        )
