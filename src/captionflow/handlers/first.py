"""`--ranker none`: keep the captioner's own order, for captioners that write one caption or
already put their best first. Nothing is scored and no image is sent to it."""

from __future__ import annotations

from collections.abc import Sequence

from captionflow.handlers.base import ModelImages, RankModelHandler
from captionflow.handlers.registry import register_ranker
from captionflow.records import ScoredCaption


class FirstCandidate:
    """Each image's candidates as the captioner gave them, with no score (null in records)."""

    def rank(
        self, images: ModelImages, candidates: Sequence[Sequence[str]]
    ) -> list[list[ScoredCaption]]:
        return [[ScoredCaption(text, None, None) for text in group] for group in candidates]


@register_ranker("none")
class NoRankHandler(RankModelHandler):
    """The ranker that ranks nothing: the first candidate is the caption."""

    kind = "none"
    scores = False
    takes_images = False

    def load_model(self) -> FirstCandidate:
        return FirstCandidate()
