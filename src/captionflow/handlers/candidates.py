"""Rules on a captioner's candidates, applied before the ranker sees them: a cleanup pattern
and a minimum length. Any captioner, any ranker."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from captionflow.handlers.base import Captioner, ModelImages


class CandidateRules(BaseModel):
    """`remove_pattern`: a regular expression removed from every candidate (spaces then
    tidied); `min_words`: shorter candidates are dropped. What is left is deduplicated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    remove_pattern: str | None = None
    min_words: int = Field(0, ge=0)

    @field_validator("remove_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"{value!r} is not a regular expression: {error}") from None
        return value

    @property
    def active(self) -> bool:
        return self.remove_pattern is not None or self.min_words > 0

    def clean(self, texts: Sequence[str]) -> list[str]:
        kept: dict[str, None] = {}
        for text in texts:
            if self.remove_pattern is not None:
                text = " ".join(re.sub(self.remove_pattern, " ", text).split())
            if text and len(text.split()) >= self.min_words:
                kept.setdefault(text)
        return list(kept)


def distinct(texts: Sequence[str], prefix: str = "") -> list[str]:
    """A captioner's texts with `prefix` (its prompt) removed, blanks and repeats dropped,
    first-seen order kept."""
    seen: dict[str, None] = {}
    for text in texts:
        text = text.strip().removeprefix(prefix).strip()
        if text:
            seen.setdefault(text)
    return list(seen)


def per_image(texts: Sequence[str], images: int, prefix: str = "") -> list[list[str]]:
    """`generate`'s rows, K consecutive ones per image, as each image's distinct texts."""
    k = len(texts) // images if images else 0
    return [distinct(texts[i * k : (i + 1) * k], prefix) for i in range(images)]


class RuledCaptioner:
    """A loaded captioner whose candidates pass through `rules`."""

    def __init__(self, captioner: Captioner, rules: CandidateRules) -> None:
        self.captioner = captioner
        self.rules = rules

    def caption(self, images: ModelImages) -> list[list[str]]:
        return [self.rules.clean(texts) for texts in self.captioner.caption(images)]
