"""SigLIP ranking (google/siglip-*, and SigLIP 2: google/siglip2-*, fixed-resolution or NaFlex)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor, SiglipModel

try:
    from transformers import Siglip2Model
except ImportError:  # transformers < 4.49: SigLIP 1 only
    Siglip2Model = None

from captionflow.handlers.base import ModelImages
from captionflow.handlers.clip import ClipRanker, ClipRankHandler
from captionflow.handlers.loading import localize
from captionflow.handlers.registry import register_ranker
from captionflow.views import ImageViews, ViewBatch, ViewSpec


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


class Siglip2Ranker(SiglipRanker):
    """A loaded SigLIP 2 NaFlex (`Siglip2Model`): scored as SigLIP; its images are cut into
    patches at their own aspect by its processor (a patch count, not a size), so they arrive
    decoded and go through it: no fixed-size view exists for them."""

    kind: ClassVar[str] = "siglip"
    model_class: ClassVar[Any] = Siglip2Model

    def image_inputs(self, images: ModelImages) -> dict[str, torch.Tensor]:
        inputs = self.processor.image_processor(images=_pictures(images), return_tensors="pt")
        inputs = inputs.to(self.model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return dict(inputs)


def _pictures(images: ModelImages) -> list[Image.Image]:
    if isinstance(images, ViewBatch) or any(isinstance(i, ImageViews) for i in images):
        raise ValueError("SigLIP 2 NaFlex takes decoded images: its processor patches them")
    return [image if image.mode == "RGB" else image.convert("RGB") for image in images]


@register_ranker("siglip")
class SiglipRankHandler(ClipRankHandler):
    """RunInference handler for SigLIP and SigLIP 2; `model` is a hub id, a local directory or
    a gs:// URI. The checkpoint's config says which (`siglip2`: NaFlex)."""

    kind = "siglip"
    default_model = "google/siglip-base-patch16-224"
    ranker_class = SiglipRanker

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._naflex: bool | None = None

    def naflex(self) -> bool:
        """Whether the checkpoint is a SigLIP 2 NaFlex one (read from its config, once)."""
        if self._naflex is None:
            try:
                config = AutoConfig.from_pretrained(
                    localize(self.model_id), trust_remote_code=self.trust_remote_code
                )
                self._naflex = config.model_type == "siglip2" and Siglip2Model is not None
            except Exception:  # unreadable here: loading says why, with its own advice
                return False
        return self._naflex

    def view_spec(self) -> ViewSpec | None:
        return None if self.naflex() else super().view_spec()

    def load_model(self) -> SiglipRanker:
        return self.load(Siglip2Ranker if self.naflex() else SiglipRanker)
