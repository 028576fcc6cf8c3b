"""Every captioner behind the same interface: K candidates from one encoding of each image,
run through `CaptionImages` in a real pipeline."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import apache_beam as beam
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from captionflow import CaptionImages, captioner_handler, ranker_handler
from captionflow.handlers.blip2 import Blip2Captioner
from captionflow.handlers.decoding import DecodingOptions
from captionflow.handlers.florence2 import Florence2Captioner
from captionflow.handlers.vlm import VlmCaptioner
from captionflow.tiny_models import (
    build_tiny_blip2,
    build_tiny_florence2,
    build_tiny_llava,
    build_tiny_paligemma,
)
from tests.conftest import Calls, random_image, write_images


class Case(NamedTuple):
    build: Callable[[str], str]
    vision_tower: Callable[[torch.nn.Module], torch.nn.Module]
    handler: str  # its name on the command line
    captioner: type
    prompt: str | None = None


BUILDERS = {
    "blip2-opt": Case(build_tiny_blip2, lambda m: m.vision_model, "blip2", Blip2Captioner),
    "blip2-t5": Case(
        functools.partial(build_tiny_blip2, language="t5"),
        lambda m: m.vision_model,
        "blip2",
        Blip2Captioner,
    ),
    "florence2": Case(
        build_tiny_florence2, lambda m: m.model.vision_tower, "florence2", Florence2Captioner
    ),
    "vlm-llava": Case(build_tiny_llava, lambda m: m.model.vision_tower, "vlm", VlmCaptioner),
    "vlm-paligemma": Case(
        build_tiny_paligemma, lambda m: m.model.vision_tower, "vlm", VlmCaptioner, "caption en"
    ),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("captioners")
    torch.manual_seed(3)
    return {name: case.build(str(folder / name)) for name, case in BUILDERS.items()}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_k_candidates_come_from_one_encoding_of_each_image(name: str, tiny: dict) -> None:
    case = BUILDERS[name]
    decoding = DecodingOptions(
        num_captions=4, max_new_tokens=8, min_new_tokens=2, seed=0, prompt=case.prompt
    )
    captioner = case.captioner.from_pretrained(tiny[name], decoding=decoding)
    encoded = Calls(case.vision_tower(captioner.model))
    images = [random_image(64, 48, seed=i) for i in range(3)]
    candidates = captioner.caption(images)
    assert encoded.images == len(images)  # K candidates, one pass of the vision tower each
    assert len(candidates) == len(images)
    for texts in candidates:
        assert 1 <= len(texts) <= 4
        assert len(set(texts)) == len(texts) and all(text.strip() == text for text in texts)
    assert any(len(texts) > 1 for texts in candidates)  # sampled: distinct candidates


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_each_captioner_runs_in_caption_images(
    name: str, tiny: dict, tiny_clip: str, tmp_path: Path
) -> None:
    paths = [str(p) for p in write_images(tmp_path / "images", 3)]
    case = BUILDERS[name]
    decoding = DecodingOptions(
        num_captions=3, max_new_tokens=8, min_new_tokens=2, prompt=case.prompt
    )
    reference = f"{case.handler}:{tiny[name]}"
    captioner = captioner_handler(reference, decoding=decoding, max_batch_size=2)
    with TestPipeline(runner="FnApiRunner") as p:
        captions, errors = (
            p | beam.Create(paths) | CaptionImages(captioner, ranker_handler(f"clip:{tiny_clip}"))
        )
        rows = captions | beam.Map(lambda r: (r.image_uri, r.captioner, bool(r.text)))
        assert_that(rows, equal_to([(path, reference, True) for path in paths]))
        assert_that(errors, equal_to([]), label="errors")


class Rows:
    """Counts the rows of the prompt passes (more than one token) a language model is given."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.rows = 0
        module.register_forward_hook(self._count, with_kwargs=True)

    def _count(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[1] > 1:
            self.rows += embeds.shape[0]


def test_a_vlm_reads_its_long_prompt_once_per_image_not_per_candidate(tiny: dict) -> None:
    images = [random_image(64, 48 + 16 * i, seed=i) for i in range(3)]
    # top_p that keeps one token: sampling that is greedy, so both paths must agree exactly
    near_greedy = DecodingOptions(num_captions=4, max_new_tokens=6, min_new_tokens=2, top_p=1e-6)
    shared = VlmCaptioner.from_pretrained(tiny["vlm-llava"], decoding=near_greedy)
    prompt_rows = Rows(shared.model.model.language_model)
    assert shared.shares_prompt
    candidates = shared.caption(images)
    assert prompt_rows.rows == len(images)

    plain = VlmCaptioner.from_pretrained(tiny["vlm-llava"], decoding=near_greedy)
    plain.shares_prompt = False
    prompt_rows = Rows(plain.model.model.language_model)
    assert plain.caption(images) == candidates
    assert prompt_rows.rows == 4 * len(images)  # what generate alone does


def test_each_handler_declares_its_batch_limit_and_the_flags_override_it(tmp_path: Path) -> None:
    """Big generative models take smaller requests by default; `--caption-batch-size` and
    `--rank-batch-size` (or `max_batch_size=`) still decide when given."""
    from captionflow.config import RunConfig
    from captionflow.pipelines.caption import model_handlers

    def largest(handler: object) -> int:
        return handler.batch_elements_kwargs()["max_batch_size"]  # type: ignore[attr-defined]

    assert largest(captioner_handler("blip")) == 8
    assert largest(captioner_handler("vlm")) == largest(captioner_handler("blip2")) == 4
    assert largest(ranker_handler("clip")) == 32 and largest(ranker_handler("blip-itm")) == 16
    assert largest(captioner_handler("vlm", max_batch_size=2)) == 2
    write_images(tmp_path / "images", 1)
    settings = {"input": str(tmp_path / "images"), "output": str(tmp_path / "out")}
    captioner, ranker = model_handlers(RunConfig(**settings, captioner="vlm", ranker="blip-itm"))
    assert (largest(captioner), largest(ranker)) == (4, 16)
    given = RunConfig(**settings, captioner="vlm", caption_batch_size=3, rank_batch_size=5)
    assert tuple(map(largest, model_handlers(given))) == (3, 5)
