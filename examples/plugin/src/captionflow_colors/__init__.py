"""An example captionflow plug-in, and a template for real ones.

`ColorCaptionHandler` names an image's main colours; `ShortestFirstHandler` ranks the shortest
caption first. No model, no download. A real handler loads its model in `load_model` and does
its batched work in the loaded object's `caption` or `rank`, exactly as these do.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from PIL import Image

from captionflow.handlers import CaptionModelHandler, RankModelHandler
from captionflow.records import ScoredCaption

COLOURS = {
    "black": (20, 20, 20),
    "white": (235, 235, 235),
    "grey": (128, 128, 128),
    "red": (200, 30, 30),
    "orange": (230, 130, 30),
    "yellow": (230, 210, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 200),
    "purple": (120, 50, 160),
    "brown": (120, 80, 40),
}


class ColorCaptioner:
    """The loaded "model": up to `num_captions` captions naming each image's main colours."""

    def __init__(self, num_captions: int) -> None:
        self.num_captions = num_captions

    def caption(self, images: Sequence[Image.Image]) -> list[list[str]]:
        return [self._captions(image) for image in images]

    def _captions(self, image: Image.Image) -> list[str]:
        pixels = image.convert("RGB").resize((16, 16)).getdata()
        counts = Counter(_nearest(pixel) for pixel in pixels)
        names = [name for name, _ in counts.most_common(3)]
        captions = [f"a mostly {names[0]} picture"]
        if len(names) > 1:
            captions.append(f"a picture in {names[0]} and {names[1]}")
        if len(names) > 2:
            captions.append(f"a {names[0]}, {names[1]} and {names[2]} picture")
        return captions[: self.num_captions]


def _nearest(pixel: tuple[int, int, int]) -> str:
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(pixel, COLOURS[name], strict=True)))


class ColorCaptionHandler(CaptionModelHandler):
    """`--captioner colors`: takes decoded images (it declares no `view_spec`)."""

    kind = "colors"

    def load_model(self) -> ColorCaptioner:
        return ColorCaptioner(self.decoding.num_captions)


class ShortestFirst:
    """The loaded "model": the fewest words first; `score` is 1 / words."""

    def rank(
        self, images: object, candidates: Sequence[Sequence[str]]
    ) -> list[list[ScoredCaption]]:
        ranked = []
        for texts in candidates:
            scores = [1 / max(len(text.split()), 1) for text in texts]
            total = sum(scores)
            scored = [ScoredCaption(t, s, s / total) for t, s in zip(texts, scores, strict=True)]
            ranked.append(sorted(scored, key=lambda s: s.score, reverse=True))
        return ranked


class ShortestFirstHandler(RankModelHandler):
    """`--ranker shortest`: looks only at the texts, so no image view is made for it."""

    kind = "shortest"
    takes_images = False

    def load_model(self) -> ShortestFirst:
        return ShortestFirst()
