"""A captioner and a ranker that cost nothing, for measuring the pipeline alone.

They are BLIP's and CLIP's handlers, so the decode step makes the same views (read from the
checkpoints' processor configs) and the engine receives the same batches, but their loaded
models answer at once: every CPU second of such a run is spent outside the models. Importing
this module registers them as `no-captioner` and `no-ranker` (in the launcher; worker and
engine processes import it when they unpickle the handlers).
"""

from __future__ import annotations

from collections.abc import Sequence

from captionflow.handlers import BlipCaptionHandler, ClipRankHandler
from captionflow.handlers.base import ModelImages
from captionflow.handlers.registry import register_captioner, register_ranker
from captionflow.records import ScoredCaption

# The CLI with these registered: `python -c LAUNCHER run ...`.
LAUNCHER = "import sys, benchmarks.nomodels; from captionflow.cli import main; sys.exit(main())"


class _Captions:
    def __init__(self, count: int) -> None:
        self.count = count

    def caption(self, images: ModelImages) -> list[list[str]]:
        return [[f"caption {k} of this image" for k in range(self.count)]] * len(images)


class _Scores:
    def rank(
        self, images: ModelImages, candidates: Sequence[Sequence[str]]
    ) -> list[list[ScoredCaption]]:
        return [
            [ScoredCaption(text, 0.3 - 0.01 * k, 1 / len(texts)) for k, text in enumerate(texts)]
            for texts in candidates
        ]


@register_captioner("no-captioner")
class NoCaptioner(BlipCaptionHandler):
    kind = "no-captioner"

    def load_model(self) -> _Captions:  # type: ignore[override]
        return _Captions(self.decoding.num_captions)


@register_ranker("no-ranker")
class NoRanker(ClipRankHandler):
    kind = "no-ranker"

    def load_model(self) -> _Scores:  # type: ignore[override]
        return _Scores()
