"""BLIP image-text matching (Salesforce/blip-itm-*): the ranker LAVIS-era pipelines used."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from transformers import BlipForImageTextRetrieval, BlipProcessor

from captionflow.handlers.base import ModelImages, RankModelHandler
from captionflow.handlers.pixels import view_spec_of
from captionflow.handlers.ranking import PairRanker, best_first
from captionflow.handlers.registry import register_ranker
from captionflow.records import ScoredCaption
from captionflow.views import ViewSpec


class BlipItmRanker(PairRanker):
    """A loaded BLIP matching model. Each image is encoded once; each candidate reads it
    through the text encoder's cross-attention, and the matching head says match or not.
    `score` is the head's probability of a match (comparable across images); `probability`
    the softmax of its log-odds among one image's candidates."""

    kind: ClassVar[str] = "blip-itm"
    model_class: ClassVar[Any] = BlipForImageTextRetrieval
    processor_class: ClassVar[Any] = BlipProcessor

    @torch.inference_mode()
    def rank(
        self, images: ModelImages, candidates: Sequence[Sequence[str]]
    ) -> list[list[ScoredCaption]]:
        tokens = self.text_inputs(candidates)
        image_embeds = self.model.vision_model(**self.image_inputs(images)).last_hidden_state
        per_text = self.per_text(image_embeds, candidates)
        hidden = self.model.text_encoder(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=per_text,
            encoder_attention_mask=torch.ones(
                per_text.shape[:-1], dtype=torch.long, device=per_text.device
            ),
        ).last_hidden_state
        itm = self.model.itm_head(hidden[:, 0, :]).float()  # (no match, match) per text
        return best_first(candidates, itm.softmax(dim=-1)[:, 1], itm[:, 1] - itm[:, 0])


@register_ranker("blip-itm")
class BlipItmRankHandler(RankModelHandler):
    """RunInference handler for BLIP's matching head; `model` is a hub id, a local directory
    or a gs:// URI."""

    kind = "blip-itm"
    batch_size = 16  # its text encoder runs once per candidate
    default_model = "Salesforce/blip-itm-base-coco"

    def view_spec(self) -> ViewSpec | None:
        return view_spec_of(self.model_id, BlipProcessor, trust_remote_code=self.trust_remote_code)

    def load_model(self) -> BlipItmRanker:
        return self.load(BlipItmRanker)
