"""SigLIP ranking (google/siglip-*, and SigLIP 2's fixed-resolution google/siglip2-*)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers import AutoProcessor, SiglipModel

from captionflow.handlers.clip import ClipRanker, ClipRankHandler
from captionflow.handlers.registry import register_ranker


class SiglipRanker(ClipRanker):
    """A loaded SigLIP. It was trained on texts padded to its full length and a sigmoid per
    pair, so `score` is the sigmoid of `scale * cosine + bias`: the model's probability that
    this text matches this image, on its own, comparable across images. `probability` is the
    softmax of those logits among one image's candidates."""

    kind: ClassVar[str] = "siglip"
    model_class: ClassVar[Any] = SiglipModel
    processor_class: ClassVar[Any] = AutoProcessor
    padding: ClassVar[bool | str] = "max_length"

    def logits(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine * self.model.logit_scale.exp().float() + self.model.logit_bias.float()

    def scores(self, cosine: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)


@register_ranker("siglip")
class SiglipRankHandler(ClipRankHandler):
    """RunInference handler for SigLIP; `model` is a hub id, a local directory or a gs:// URI."""

    kind = "siglip"
    default_model = "google/siglip-base-patch16-224"
    ranker_class = SiglipRanker
