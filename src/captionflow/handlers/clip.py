"""CLIP ranking (openai/clip-vit-*), through Hugging Face transformers 4.4x and 5.x."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from transformers import CLIPModel, CLIPProcessor

from captionflow.handlers.base import ModelImages, RankModelHandler
from captionflow.handlers.pixels import view_spec_of
from captionflow.handlers.ranking import PairRanker, best_first
from captionflow.handlers.registry import register_ranker
from captionflow.records import ScoredCaption
from captionflow.views import ViewSpec


class ClipRanker(PairRanker):
    """A loaded CLIP: each image embedded once, all its candidates in the same text batch.
    `score` is the cosine of image and text; `probability` the softmax of the scaled cosines
    among one image's candidates (CLIP's own zero-shot probabilities)."""

    kind: ClassVar[str] = "clip"
    model_class: ClassVar[Any] = CLIPModel
    processor_class: ClassVar[Any] = CLIPProcessor

    @torch.inference_mode()
    def rank(
        self, images: ModelImages, candidates: Sequence[Sequence[str]]
    ) -> list[list[ScoredCaption]]:
        image_embeds = _embedding(self.model.get_image_features(**self.image_inputs(images)))
        text_embeds = _embedding(self.model.get_text_features(**self.text_inputs(candidates)))
        image_embeds = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
        text_embeds = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
        cosine = (text_embeds * self.per_text(image_embeds, candidates)).sum(dim=-1)
        logits = self.logits(cosine)
        return best_first(candidates, self.scores(cosine, logits), logits)

    def logits(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine * self.model.logit_scale.exp().float()

    def scores(self, cosine: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return cosine


def _embedding(output: torch.Tensor | object) -> torch.Tensor:
    """transformers 4.x returns the projected embedding; 5.x wraps it in `.pooler_output`."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@register_ranker("clip")
class ClipRankHandler(RankModelHandler):
    """RunInference handler for CLIP; `model` is a hub id, a local directory or a gs:// URI."""

    kind = "clip"
    default_model = "openai/clip-vit-base-patch32"
    ranker_class: type[ClipRanker] = ClipRanker

    def view_spec(self) -> ViewSpec | None:
        return view_spec_of(
            self.model_id,
            self.ranker_class.processor_class,
            trust_remote_code=self.trust_remote_code,
        )

    def load_model(self) -> ClipRanker:
        return self.load(self.ranker_class)
