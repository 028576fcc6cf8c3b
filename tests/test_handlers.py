"""Handlers on real (tiny, random) BLIP and CLIP models loaded through `from_pretrained`."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from PIL import Image

from captionflow.handlers import (
    CAPTIONERS,
    RANKERS,
    BlipCaptioner,
    BlipCaptionHandler,
    ClipRanker,
    ClipRankHandler,
    DecodingOptions,
    InferenceFailure,
    captioner_handler,
    ranker_handler,
)
from captionflow.handlers.blip import PROMPT
from captionflow.handlers.loading import ModelLoadError
from captionflow.handlers.registry import parse_reference
from tests.conftest import random_image


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [random_image(64, 48, seed=i) for i in range(3)]


def test_blip_gives_up_to_k_distinct_captions_per_image(tiny_blip: str, images: list) -> None:
    captioner = BlipCaptioner.from_pretrained(tiny_blip, decoding=DecodingOptions(num_captions=4))
    captions = captioner.caption(images)
    assert len(captions) == len(images)
    for texts in captions:
        assert 1 <= len(texts) <= 4
        assert len(set(texts)) == len(texts)
        assert all(text and text == text.strip() for text in texts)


def test_blip_removes_the_prompt(tiny_blip: str, images: list) -> None:
    decoding = DecodingOptions(num_captions=3, strategy="beam", prompt="a picture of ")
    captioner = BlipCaptioner.from_pretrained(tiny_blip, decoding=decoding)
    raw = captioner.processor.batch_decode(
        captioner.model.generate(
            **captioner.processor(images=images[:1], text=["a picture of "], return_tensors="pt"),
            **decoding.generate_kwargs(),
        ),
        skip_special_tokens=True,
    )
    assert all(text.startswith("a picture of") for text in raw)
    for text in captioner.caption(images[:1])[0]:
        assert any(r.endswith(text) and r != text for r in raw)


def test_blip_beam_search_is_deterministic(tiny_blip: str, images: list) -> None:
    decoding = DecodingOptions(num_captions=3, strategy="beam", num_beams=3)
    captioner = BlipCaptioner.from_pretrained(tiny_blip, decoding=decoding)
    assert captioner.caption(images) == captioner.caption(images)


def test_clip_ranks_best_first_with_cosine_and_softmax(tiny_clip: str, images: list) -> None:
    ranker = ClipRanker.from_pretrained(tiny_clip)
    candidates = [["a dog", "a cat on a mat", "sky"], ["one"], ["red car", "blue car"]]
    ranked = ranker.rank(images, candidates)
    for scored, texts in zip(ranked, candidates, strict=True):
        assert sorted(s.text for s in scored) == sorted(texts)
        assert [s.score for s in scored] == sorted((s.score for s in scored), reverse=True)
        assert all(-1.0 <= s.score <= 1.0 for s in scored)
        assert sum(s.probability for s in scored) == pytest.approx(1.0, abs=1e-5)


def test_clip_scores_do_not_depend_on_the_batch(tiny_clip: str, images: list) -> None:
    ranker = ClipRanker.from_pretrained(tiny_clip)
    together = ranker.rank(images[:2], [["a dog", "sky"], ["a cat"]])
    alone = ranker.rank(images[1:2], [["a cat"]])
    assert together[1][0].score == pytest.approx(alone[0][0].score, abs=1e-5)


def test_clip_truncates_text_longer_than_the_model_accepts(tiny_clip: str, images: list) -> None:
    ranker = ClipRanker.from_pretrained(tiny_clip)
    long_text = "a very long caption " * 50
    (scored,) = ranker.rank(images[:1], [[long_text, "short"]])
    assert {s.text for s in scored} == {long_text, "short"}


class FailOnTinyImages(BlipCaptionHandler):
    """A BLIP handler whose model refuses any batch holding a 13x13 image."""

    def predict(self, model: BlipCaptioner, batch: Sequence[Image.Image]) -> list[list[str]]:
        if any(image.size == (13, 13) for image in batch):
            raise ValueError("refusing 13x13 images")
        return super().predict(model, batch)


def test_one_bad_example_fails_alone_not_its_batch(tiny_blip: str, images: list) -> None:
    handler = FailOnTinyImages(tiny_blip, decoding=DecodingOptions(num_captions=2))
    batch = [images[0], random_image(13, 13), images[1]]
    results = list(handler.run_inference(batch, handler.load_model()))
    assert [r.example for r in results] == batch
    assert isinstance(results[1].inference, InferenceFailure)
    assert results[1].inference.error_type == "ValueError"
    assert "13x13" in results[1].inference.message
    assert all(isinstance(results[i].inference, list) for i in (0, 2))
    assert all(r.model_id == f"blip:{tiny_blip}" for r in results)


def test_a_model_that_cannot_load_says_how_to_fix_it(tmp_path: str) -> None:
    with pytest.raises(
        ModelLoadError, match=r"hf download nobody/no-model .* --captioner blip:DIR"
    ):
        BlipCaptionHandler("nobody/no-model").load_model()
    with pytest.raises(ModelLoadError, match=r"must hold a model saved with save_pretrained"):
        ClipRankHandler(str(tmp_path)).load_model()


def test_handlers_carry_beam_batching_and_sharing_options(tiny_clip: str) -> None:
    handler = ClipRankHandler(tiny_clip, max_batch_size=7, min_batch_size=2, large_model=True)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 2, "max_batch_size": 7}
    assert handler.share_model_across_processes()
    assert handler.name == f"clip:{tiny_clip}"


def test_registry_resolves_names_and_model_references() -> None:
    assert parse_reference("blip", CAPTIONERS, "blip") == ("blip", None)
    assert parse_reference("blip:/m/b", CAPTIONERS, "blip") == ("blip", "/m/b")
    assert parse_reference("clip:gs://bucket/clip", RANKERS, "clip") == ("clip", "gs://bucket/clip")
    assert parse_reference("org/model", CAPTIONERS, "blip") == ("blip", "org/model")
    assert captioner_handler("blip").model_id == "Salesforce/blip-image-captioning-base"
    assert ranker_handler("clip:/m/c").model_id == "/m/c"


def test_decoding_options_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        DecodingOptions(num_captions=0)
    with pytest.raises(ValueError, match="must be at least min_new_tokens"):
        DecodingOptions(min_new_tokens=10, max_new_tokens=5)
    beam = DecodingOptions(strategy="beam", num_captions=5, num_beams=3).generate_kwargs()
    assert beam["num_beams"] == 5 and beam["num_return_sequences"] == 5 and not beam["do_sample"]


def test_successive_copies_of_a_model_take_successive_indexes(tmp_path: str) -> None:
    from captionflow.handlers.torch_setup import next_copy_index

    model = f"copies-test-{tmp_path}"
    assert [next_copy_index(model) for _ in range(3)] == [0, 1, 2]
    assert next_copy_index(model + "-other") == 0


def test_batches_are_fixed_size_unless_asked_otherwise() -> None:
    handler = BlipCaptionHandler("m", max_batch_size=4)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 4, "max_batch_size": 4}


@pytest.mark.parametrize("kind", ["blip", "clip"])
def test_pixel_values_are_the_processors_own(tiny_models: tuple[str, str], kind: str) -> None:
    """The handlers' views-then-normalise path gives the processor's numbers, within the views'
    bound (torch's uint8 resize: a value one level off now and then, two rarely)."""
    import torch
    from transformers import BlipProcessor, CLIPProcessor

    from captionflow.handlers.pixels import PixelValues
    from tests.test_views import assert_close

    path, processor_class = {
        "blip": (tiny_models[0], BlipProcessor),
        "clip": (tiny_models[1], CLIPProcessor),
    }[kind]
    processor = processor_class.from_pretrained(path)
    pixel_values = PixelValues(processor.image_processor)
    assert pixel_values.spec is not None  # the fast path, not the processor
    images = [random_image(w, h, seed=w) for w, h in [(64, 48), (31, 97), (1, 1), (500, 20)]]
    images += [Image.new("L", (40, 30), 7), random_image(33, 33).convert("RGBA")]
    expected = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    actual = pixel_values(images, torch.device("cpu"), torch.float32)
    assert actual.dtype == torch.float32
    assert_close(actual, expected, pixel_values.spec)


def test_blip_prompts_are_tokenised_as_its_processor_does(tiny_blip: str) -> None:
    import torch
    from transformers import BlipProcessor

    processor = BlipProcessor.from_pretrained(tiny_blip)
    prompts = [PROMPT] * 2
    expected = processor(images=[random_image()] * 2, text=prompts, return_tensors="pt")
    tokens = processor.tokenizer(prompts, return_tensors="pt")
    assert torch.equal(tokens["input_ids"], expected["input_ids"])
    assert torch.equal(tokens["attention_mask"], expected["attention_mask"])


def test_float32_on_a_gpu_uses_tf32_and_nothing_else_does() -> None:
    import torch

    from captionflow.handlers.torch_setup import allow_tf32

    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert not allow_tf32(torch.device("cpu"), torch.float32)
        assert not allow_tf32(torch.device("cuda"), torch.float16)
        assert not torch.backends.cuda.matmul.allow_tf32
        assert allow_tf32(torch.device("cuda"), torch.float32)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_candidate_rules_clean_drop_short_and_deduplicate(tiny_blip: str, images: list) -> None:
    from captionflow.handlers.candidates import CandidateRules

    rules = CandidateRules(remove_pattern=r"\s*\(.*?\)", min_words=2)
    texts = ["a dog (blurry) on grass", "a dog on grass", "dog", "(only this)", "two  cats"]
    assert rules.clean(texts) == ["a dog on grass", "two cats"]
    assert not CandidateRules().active and rules.active

    handler = BlipCaptionHandler(
        tiny_blip, decoding=DecodingOptions(num_captions=3), rules=CandidateRules(min_words=99)
    )
    assert handler.predict(handler.load_model(), images) == [[], [], []]
