"""How a captioner decodes: sampling or beam search, and how many candidates per image."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, computed_field, field_validator

# Settings that only one strategy uses: given with the other, they are a mistake.
STRATEGY_OF = {"top_p": "sample", "temperature": "sample", "num_beams": "beam"}


class DecodingOptions(BaseModel):
    """Generation settings shared by every `generate`-based captioner.

    Defaults follow the common BLIP recipe: nucleus sampling for diverse candidates that the
    ranker then chooses from.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_captions: int = Field(5, ge=1, le=64, description="candidates per image")
    strategy: Literal["sample", "beam"] = "sample"
    top_p: float = Field(0.9, gt=0, le=1)
    # Finite: an infinite temperature leaves every image without a caption.
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.1, gt=0, allow_inf_nan=False)
    num_beams: int = Field(3, ge=1, description="beam width (beam search only)")
    min_new_tokens: int = Field(5, ge=0)
    max_new_tokens: int = Field(30, ge=1)
    # Text the captioner continues (BLIP), or the instruction it follows (a VLM); None: the
    # captioner's own default (`prompt_or`).
    prompt: str | None = None
    # `fast`: the captioner's own decode loop where it has one (same token ids as `generate`);
    # `compiled`: that loop's steps compiled (CUDA graphs on a GPU); `reference`: `generate`.
    decoder: Literal["fast", "compiled", "reference"] = "fast"
    bad_words: tuple[str, ...] = ()  # words the captioner must never write
    # Sampling from a generator per image, seeded by this and the image's pixels: the same
    # captions for an image whatever batch it is in (the fast decoders; `reference` only
    # seeds torch once).
    seed: int | None = Field(None, ge=0)

    @field_validator("bad_words")
    @classmethod
    def _words(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not word.strip() for word in value):
            raise ValueError("a bad word cannot be empty")
        return tuple(word.strip() for word in value)

    # Cross-field checks are field validators (reading the fields declared before them), not a
    # model validator, so that one bad value never hides another: all are reported at once.
    @field_validator(*STRATEGY_OF)
    @classmethod
    def _for_its_strategy(cls, value: float, info: ValidationInfo) -> float:
        strategy = info.data.get("strategy")
        if strategy is not None and strategy != STRATEGY_OF[info.field_name]:
            raise ValueError(f"cannot be used with {strategy} decoding")
        return value

    @field_validator("max_new_tokens")
    @classmethod
    def _at_least_min(cls, value: int, info: ValidationInfo) -> int:
        minimum = info.data.get("min_new_tokens", 0)
        if minimum > value:
            raise ValueError(f"must be at least min_new_tokens ({minimum})")
        return value

    @computed_field  # recorded beside num_beams in the run's summary
    @property
    def beam_width(self) -> int:
        """The beams searched: `num_beams`, raised to `num_captions` (a beam search returns
        at most one candidate per beam); 1 when sampling."""
        return max(self.num_beams, self.num_captions) if self.strategy == "beam" else 1

    def prompt_or(self, default: str) -> str:
        """The prompt given, else the captioner's `default`."""
        return default if self.prompt is None else self.prompt

    def bad_word_ids(self, tokenizer: Any) -> tuple[tuple[int, ...], ...]:
        """`bad_words` as `tokenizer` writes them (each word or phrase a token sequence)."""
        return tuple(
            tuple(ids)
            for word in self.bad_words
            if (ids := tokenizer(word, add_special_tokens=False).input_ids)
        )

    def generate_kwargs(self, tokenizer: Any = None) -> dict[str, Any]:
        """Keyword arguments for `model.generate` that yield `num_captions` sequences per image
        (with `tokenizer`, the bad words barred too)."""
        kwargs = self._generate_kwargs()
        if tokenizer is not None and (bad := self.bad_word_ids(tokenizer)):
            kwargs["bad_words_ids"] = [list(ids) for ids in bad]
        return kwargs

    def _generate_kwargs(self) -> dict[str, Any]:
        common = {
            "num_return_sequences": self.num_captions,
            "min_new_tokens": self.min_new_tokens,
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.strategy == "sample":
            return common | {
                "do_sample": True,
                "num_beams": 1,
                "top_p": self.top_p,
                "temperature": self.temperature,
            }
        return common | {"do_sample": False, "num_beams": self.beam_width}
