"""Every ranker behind the same interface: SigLIP, BLIP's matching head, and none."""

from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from captionflow import CaptionImages, captioner_handler, ranker_handler
from captionflow.cli import main
from captionflow.handlers.blip import BlipCaptioner
from captionflow.handlers.blip_itm import BlipItmRanker
from captionflow.handlers.decoding import DecodingOptions
from captionflow.handlers.siglip import SiglipRanker
from captionflow.tiny_models import build_tiny_blip_itm, build_tiny_siglip, build_tiny_siglip2
from tests.conftest import Calls, random_image, write_images


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(1)
    return build_tiny_siglip(str(tmp_path_factory.mktemp("models") / "tiny-siglip"))


@pytest.fixture(scope="module")
def tiny_siglip2(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(5)
    return build_tiny_siglip2(str(tmp_path_factory.mktemp("models") / "tiny-siglip2"))


@pytest.fixture(scope="module")
def tiny_blip_itm(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(2)
    return build_tiny_blip_itm(str(tmp_path_factory.mktemp("models") / "tiny-blip-itm"))


@pytest.fixture(scope="module")
def images() -> list:
    return [random_image(64, 48, seed=i) for i in range(3)]


CANDIDATES = [["a dog", "a cat on a mat", "sky"], ["one"], ["red car", "blue car"]]


def check_best_first(ranked: list, candidates: list) -> None:
    for scored, texts in zip(ranked, candidates, strict=True):
        assert sorted(s.text for s in scored) == sorted(texts)
        assert [s.score for s in scored] == sorted((s.score for s in scored), reverse=True)
        assert sum(s.probability for s in scored) == pytest.approx(1.0, abs=1e-5)


def test_siglip_scores_are_the_models_sigmoid_match_probabilities(
    tiny_siglip: str, images: list
) -> None:
    ranker = SiglipRanker.from_pretrained(tiny_siglip)
    encoded = Calls(ranker.model.vision_model)
    ranked = ranker.rank(images, CANDIDATES)
    assert encoded.images == len(images)  # each image once, whatever its candidates
    check_best_first(ranked, CANDIDATES)

    processor, model = ranker.processor, ranker.model
    for image, scored in zip(images, ranked, strict=True):
        texts = [s.text for s in scored]
        inputs = processor(
            text=texts, images=[image], padding="max_length", max_length=16, return_tensors="pt"
        )
        with torch.inference_mode():
            logits = model(**inputs).logits_per_image[0]
        expected = torch.sigmoid(logits).tolist()  # pixels within 2 uint8 levels: close, not equal
        assert [s.score for s in scored] == pytest.approx(expected, abs=2e-3)


def test_siglip2_naflex_checkpoints_rank_under_the_same_name(
    tiny_siglip2: str, images: list
) -> None:
    """SigLIP 2's variable-resolution checkpoints (`Siglip2Model`): `--ranker siglip:MODEL`
    picks them by their config; their images go through their own processor (patches at the
    image's aspect), and the scores are the model's own sigmoid, exactly."""
    handler = ranker_handler(f"siglip:{tiny_siglip2}")
    assert handler.view_spec() is None  # no fixed-size view: pictures reach it
    ranker = handler.load_model()
    encoded = Calls(ranker.model.vision_model)
    ranked = ranker.rank(images, CANDIDATES)
    assert encoded.images == len(images)
    check_best_first(ranked, CANDIDATES)
    processor, model = ranker.processor, ranker.model
    for image, scored in zip(images, ranked, strict=True):
        texts = [s.text for s in scored]
        # the image processor's own settings (Siglip2Processor's call has defaults of its own)
        pixels = processor.image_processor(images=[image], return_tensors="pt")
        tokens = processor.tokenizer(
            texts, padding="max_length", max_length=16, return_tensors="pt"
        )
        with torch.inference_mode():
            logits = model(**pixels, **tokens).logits_per_image[0]
        assert [s.score for s in scored] == pytest.approx(torch.sigmoid(logits).tolist(), abs=1e-5)


def test_blip_itm_scores_are_the_matching_heads_probability(
    tiny_blip_itm: str, images: list
) -> None:
    ranker = BlipItmRanker.from_pretrained(tiny_blip_itm)
    encoded = Calls(ranker.model.vision_model)
    ranked = ranker.rank(images, CANDIDATES)
    assert encoded.images == len(images)  # each image once, whatever its candidates
    check_best_first(ranked, CANDIDATES)

    processor, model = ranker.processor, ranker.model
    for image, scored in zip(images, ranked, strict=True):
        for candidate in scored:
            inputs = processor(images=image, text=candidate.text, return_tensors="pt")
            with torch.inference_mode():
                logits = model(**inputs, use_itm_head=True).itm_score[0]
            assert candidate.score == pytest.approx(logits.softmax(-1)[1].item(), abs=2e-3)


@pytest.mark.parametrize("case", ["siglip", "siglip2", "blip-itm", "none"])
def test_each_ranker_runs_in_caption_images(
    case: str,
    tmp_path: Path,
    tiny_blip: str,
    tiny_siglip: str,
    tiny_siglip2: str,
    tiny_blip_itm: str,
) -> None:
    paths = [str(p) for p in write_images(tmp_path / "images", 3)]
    model = {
        "siglip": f"siglip:{tiny_siglip}",
        "siglip2": f"siglip:{tiny_siglip2}",
        "blip-itm": f"blip-itm:{tiny_blip_itm}",
    }
    kind = case.removesuffix("2")
    ranker = ranker_handler(model.get(case, case))
    decoding = DecodingOptions(num_captions=3)
    with TestPipeline(runner="FnApiRunner") as p:
        captions, errors = (
            p
            | beam.Create(paths)
            | CaptionImages(captioner_handler(f"blip:{tiny_blip}", decoding=decoding), ranker)
        )
        rows = captions | beam.Map(lambda r: (r.image_uri, r.ranker, r.text, r.score, r.candidates))
        assert_that(rows | beam.Map(lambda row: row[0]), equal_to(paths))
        assert_that(rows | beam.Map(checked, kind), equal_to([True] * 3), label="scores")
        assert_that(errors, equal_to([]), label="errors")


def checked(row: tuple, kind: str) -> bool:
    _, ranker, text, score, candidates = row
    assert ranker.startswith(f"{kind}:") if kind != "none" else ranker == "none"
    assert text == candidates[0].text
    if kind == "none":  # the captioner's own order, nothing scored
        assert score is None and all(c.score is None for c in candidates)
    else:
        assert 0.0 <= score <= 1.0
    return True


def test_ranker_none_keeps_the_captioners_first_candidate(tiny_blip: str, images: list) -> None:
    decoding = DecodingOptions(num_captions=3, strategy="beam")
    handler = ranker_handler("none")
    candidates = BlipCaptioner.from_pretrained(tiny_blip, decoding=decoding).caption(images)
    ranked = handler.predict(handler.load_model(), list(zip(images, candidates, strict=True)))
    assert [[s.text for s in scored] for scored in ranked] == candidates
    assert not handler.takes_images


def test_cli_with_ranker_none_writes_null_scores(tmp_path: Path, tiny_blip: str) -> None:
    write_images(tmp_path / "images", 2)
    out = tmp_path / "out"
    argv = ["run", "--input", str(tmp_path / "images"), "--output", str(out)]
    assert main([*argv, "--captioner", f"blip:{tiny_blip}", "--ranker", "none"]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(row["score"] is None and row["text"] for row in rows)


def test_min_score_without_a_ranker_is_refused(
    tmp_path: Path, tiny_blip: str, capsys: pytest.CaptureFixture
) -> None:
    write_images(tmp_path / "images", 1)
    argv = ["run", "--input", str(tmp_path / "images"), "--output", str(tmp_path / "out")]
    assert main([*argv, "--ranker", "none", "--min-score", "0.2"]) == 2
    assert "--min-score" in capsys.readouterr().err
