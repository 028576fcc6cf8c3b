"""How a captioner decodes: sampling or beam search, and how many candidates per image."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SAMPLING_ONLY = frozenset({"top_p", "temperature"})
BEAM_ONLY = frozenset({"num_beams"})


class DecodingOptions(BaseModel):
    """Generation settings shared by every `generate`-based captioner.

    Defaults follow the common BLIP recipe: nucleus sampling for diverse candidates that the
    ranker then chooses from.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_captions: int = Field(5, ge=1, le=64, description="candidates per image")
    strategy: Literal["sample", "beam"] = "sample"
    top_p: float = Field(0.9, gt=0, le=1)
    temperature: float = Field(1.0, gt=0)
    repetition_penalty: float = Field(1.1, gt=0)
    num_beams: int = Field(3, ge=1, description="beam width (beam search only)")
    min_new_tokens: int = Field(5, ge=0)
    max_new_tokens: int = Field(30, ge=1)
    prompt: str = "a picture of "

    @model_validator(mode="after")
    def _check_consistent(self) -> DecodingOptions:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) exceeds "
                f"max_new_tokens ({self.max_new_tokens})"
            )
        unused = SAMPLING_ONLY if self.strategy == "beam" else BEAM_ONLY
        if conflicting := sorted(unused & self.model_fields_set):
            raise ValueError(
                f"{', '.join(conflicting)} cannot be used with {self.strategy} decoding"
            )
        return self

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate` that yield `num_captions` sequences per image."""
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
        return common | {"do_sample": False, "num_beams": max(self.num_beams, self.num_captions)}
