"""The values that flow between the transforms: plain, picklable, and free of model code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from captionflow.views import ImageViews

STAGES = ("read", "decode", "caption", "rank")


@dataclass(frozen=True)
class ScoredCaption:
    """One candidate caption with its ranker scores.

    `score` is how well the text matches the image, comparable across images, so good for
    filtering a dataset: the cosine of their embeddings for CLIP, a match probability for
    SigLIP and BLIP's matching head. `probability` is the softmax of the ranker's logits within
    one image: how sure the ranker is of this candidate against its siblings. Both are None
    when nothing ranked the candidates (`--ranker none`).
    """

    text: str
    score: float | None
    probability: float | None


@dataclass(frozen=True)
class CaptionCandidates:
    """An image with the captions its captioner proposed, on its way to the ranker."""

    image_uri: str
    image: Image.Image | ImageViews
    texts: tuple[str, ...]
    captioner: str


@dataclass(frozen=True)
class CaptionRecord:
    """The result for one image: the best caption, then every scored candidate, best first."""

    image_uri: str
    text: str
    score: float | None  # None when nothing ranked the candidates
    candidates: tuple[ScoredCaption, ...]
    captioner: str
    ranker: str
    width: int | None = None  # the image as shown at full size
    height: int | None = None

    def with_text_around(self, prefix: str, suffix: str) -> CaptionRecord:
        """The record with `prefix` and `suffix` around the caption and every candidate (a
        trigger word, say); scores stay those of the texts the ranker saw."""
        if not prefix and not suffix:
            return self
        candidates = tuple(replace(c, text=f"{prefix}{c.text}{suffix}") for c in self.candidates)
        return replace(self, text=f"{prefix}{self.text}{suffix}", candidates=candidates)

    @property
    def captions(self) -> list[str]:
        """The candidates' texts, best first."""
        return [candidate.text for candidate in self.candidates]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "candidates": [asdict(c) for c in self.candidates],
            "captions": self.captions,
        }


@dataclass(frozen=True)
class ErrorRecord:
    """Why one image is not in the output, and at which stage (one of STAGES) it failed; in
    `shard-errors.jsonl`, why it is not in the shards of the format named by `stage`."""

    image_uri: str
    stage: str
    error_type: str
    message: str

    @classmethod
    def from_exception(cls, image_uri: str, stage: str, error: BaseException) -> ErrorRecord:
        return cls(image_uri, stage, type(error).__name__, str(error) or repr(error))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
