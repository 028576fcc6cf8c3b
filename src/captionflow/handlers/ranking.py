"""What rankers share: their inputs (each image once, all candidates in one text batch), and
from one score per (image, candidate) pair to each image's candidates, best first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from captionflow.handlers.base import ModelImages
from captionflow.handlers.loading import Pretrained
from captionflow.handlers.pixels import PixelValues
from captionflow.records import ScoredCaption


class PairRanker(Pretrained):
    """A loaded model that scores (image, text) pairs: every image's candidates tokenized
    in one batch, cut to what the model reads (the record keeps the whole text), and each
    image's inputs made once, from the decode step's views."""

    flag: ClassVar[str] = "ranker"
    padding: ClassVar[bool | str] = True  # to the longest text of the batch

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model.eval()
        self.processor = processor
        self.pixel_values = PixelValues(processor.image_processor)
        self.max_text_tokens = model.config.text_config.max_position_embeddings

    def text_inputs(self, candidates: Sequence[Sequence[str]]) -> Any:
        """All images' candidates, in order, as one tokenized batch on the model's device."""
        return self.processor.tokenizer(
            [text for group in candidates for text in group],
            padding=self.padding,
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        ).to(self.model.device)

    def image_inputs(self, images: ModelImages) -> dict[str, torch.Tensor]:
        """The vision tower's inputs for a batch: its `pixel_values`, from the views."""
        return {"pixel_values": self.pixel_values(images, self.model.device, self.model.dtype)}

    def per_text(self, per_image: torch.Tensor, candidates: Sequence[Sequence[str]]) -> Any:
        """Each image's row repeated for its candidates, in the order of `text_inputs`."""
        counts = torch.tensor([len(group) for group in candidates], device=per_image.device)
        return per_image.repeat_interleave(counts, dim=0)


def best_first(
    candidates: Sequence[Sequence[str]], scores: torch.Tensor, logits: torch.Tensor
) -> list[list[ScoredCaption]]:
    """`scores` and `logits` hold one value per candidate, all images' candidates in a row.
    Each candidate keeps its score; its probability is the softmax of the logits among its
    image's candidates."""
    ranked, start = [], 0
    for group in candidates:
        end = start + len(group)
        probabilities = logits[start:end].float().softmax(dim=0).tolist()
        scored = [
            ScoredCaption(text, float(score), float(probability))
            for text, score, probability in zip(
                group, scores[start:end].tolist(), probabilities, strict=True
            )
        ]
        ranked.append(sorted(scored, key=lambda s: s.score, reverse=True))
        start = end
    return ranked
