"""The LAVIS backend, offline: a reduced random LAVIS BLIP saved as a .pth and loaded through
the handler, LAVIS's CLIP as the ranker, and both through `CaptionImages` in a real Beam
pipeline. Runs in the LAVIS environment only (`make test-lavis`, which builds it first).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("lavis", reason="salesforce-lavis is not installed (make test-lavis)")

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from captionflow import CaptionImages, captioner_handler, ranker_handler
from captionflow.handlers import lavis as backend
from captionflow.handlers.decoding import DecodingOptions
from captionflow.handlers.lavis import (
    LavisBlipCaptioner,
    LavisBlipCaptionHandler,
    LavisClipRanker,
    LavisClipRankHandler,
    LavisReference,
    parse_reference,
)
from captionflow.handlers.loading import ModelLoadError

K = 3
DECODING = DecodingOptions(num_captions=K, max_new_tokens=8, seed=0)
# A CLIP small enough for the tests, added to LAVIS's own table of architectures (the engine
# runs in this process under FnApiRunner, so the pipeline sees it too).
TINY_CLIP = "captionflow-test-tiny"
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def random_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [random_image(64 + 8 * i, 48, seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`CONFIG.yaml:WEIGHTS` of a reduced LAVIS BLIP caption model: LAVIS's own config keys
    (96 px images, a 2-layer 128-wide text decoder through `med_config_path`) and `vit_depth`
    (2 vision blocks); random weights saved with `torch.save` as a state dict."""
    from lavis.common.utils import get_abs_path

    folder = tmp_path_factory.mktemp("lavis-blip")
    med = json.loads(Path(get_abs_path("configs/models/med_config.json")).read_text())
    med |= {
        "num_hidden_layers": 2,
        "hidden_size": 128,
        "num_attention_heads": 2,
        "intermediate_size": 256,
    }
    (folder / "tiny_med.json").write_text(json.dumps(med))
    (folder / "tiny.yaml").write_text(
        "model:\n"
        "  arch: blip_caption\n"
        "  vit_type: base\n"
        "  vit_depth: 2\n"
        "  image_size: 96\n"
        "  med_config_path: tiny_med.json\n"
        '  prompt: "a picture of "\n'
        "preprocess:\n"
        "  vis_processor:\n"
        "    eval:\n"
        "      name: blip_image_eval\n"
        "      image_size: 96\n"
    )
    torch.manual_seed(0)
    config = backend.blip_config(parse_reference(str(folder / "tiny.yaml"), "base_coco"))
    torch.save(backend.build_blip(config).state_dict(), folder / "tiny.pth")
    return f"{folder / 'tiny.yaml'}:{folder / 'tiny.pth'}"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`TYPE:WEIGHTS` of a tiny random LAVIS CLIP, its state dict saved with `torch.save`."""
    from lavis.models.clip_models import model as clip_module

    clip_module._MODEL_CONFIGS.setdefault(TINY_CLIP, TINY_CLIP_CONFIG)
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("lavis-clip") / "tiny-clip.pt"
    torch.save(clip_module.create_model(TINY_CLIP, pretrained="").state_dict(), path)
    return f"{TINY_CLIP}:{path}"


@pytest.fixture(scope="module")
def captioner(tiny_blip: str) -> LavisBlipCaptioner:
    return LavisBlipCaptioner.load(tiny_blip, decoding=DECODING)


# --------------------------------------------------------------------------- references


BLIP_PTH = "/m/model_base_caption_capfilt_large.pth"
REFERENCES = [
    ("base_coco", LavisReference("base_coco", None)),
    ("large_coco:/m/large.pth", LavisReference("large_coco", "/m/large.pth")),
    ("base_coco:random", LavisReference("base_coco", "random")),
    (BLIP_PTH, LavisReference("base_coco", BLIP_PTH)),
    ("gs://bucket/blip.pth", LavisReference("base_coco", "gs://bucket/blip.pth")),
    ("/c/my.yaml:/w/my.pth", LavisReference("/c/my.yaml", "/w/my.pth")),
    ("configs/my.yml", LavisReference("configs/my.yml", None)),
    ("ViT-B-32-quickgelu:gs://b/c.pt", LavisReference("ViT-B-32-quickgelu", "gs://b/c.pt")),
]


@pytest.mark.parametrize(("reference", "expected"), REFERENCES)
def test_model_references(reference: str, expected: LavisReference) -> None:
    assert parse_reference(reference, "base_coco") == expected


def test_handlers_are_registered_and_check_their_reference(tiny_blip: str) -> None:
    handler = captioner_handler(f"lavis-blip:{tiny_blip}", decoding=DECODING)
    assert isinstance(handler, LavisBlipCaptionHandler)
    assert handler.name == f"lavis-blip:{tiny_blip}"
    assert handler.view_spec() is None  # decoded pictures, LAVIS's own processors
    assert isinstance(ranker_handler("lavis-clip"), LavisClipRankHandler)
    assert ranker_handler("lavis-clip").name == "lavis-clip:ViT-B-32"
    with pytest.raises(ValueError, match="no weights after"):
        captioner_handler("lavis-blip:base_coco:")


# ----------------------------------------------------------------------------- captioner


def test_checkpoint_loads_back_exactly(tiny_blip: str, captioner: LavisBlipCaptioner) -> None:
    saved = torch.load(tiny_blip.split(":")[1], weights_only=True)
    loaded = captioner.model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)


def test_checkpoint_layouts_and_strictness(tiny_blip: str, tmp_path: Path) -> None:
    config, weights = tiny_blip.split(":")
    state = torch.load(weights, weights_only=True)
    # A LAVIS/BLIP release wraps the weights in {"model": ...}, maybe with extra heads.
    wrapped = {"model": {f"module.{k}": v for k, v in state.items()}}
    wrapped["model"]["module.itm_head.weight"] = torch.zeros(2, 128)
    torch.save(wrapped, tmp_path / "wrapped.pth")
    reloaded = LavisBlipCaptioner.load(f"{config}:{tmp_path / 'wrapped.pth'}", decoding=DECODING)
    key = "visual_encoder.pos_embed"
    assert torch.equal(reloaded.model.state_dict()[key], state[key])
    # LAVIS itself would load this with strict=False and caption with random weights.
    partial = {k: v for k, v in state.items() if not k.startswith("text_decoder.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ModelLoadError, match=r"lacks .* weights"):
        LavisBlipCaptioner.load(f"{config}:{tmp_path / 'partial.pth'}", decoding=DECODING)
    # Arbitrary pickled objects are refused (weights_only=True).
    torch.save({"model": state, "evil": object()}, tmp_path / "pickle.pth")
    with pytest.raises(ModelLoadError, match="weights_only"):
        LavisBlipCaptioner.load(f"{config}:{tmp_path / 'pickle.pth'}", decoding=DECODING)


def test_k_distinct_candidates_per_image_from_one_encoding(
    captioner: LavisBlipCaptioner, images: list
) -> None:
    calls = []
    hook = captioner.model.visual_encoder.patch_embed.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0])
    )
    try:
        captions = captioner.caption(images)
    finally:
        hook.remove()
    assert calls == [len(images)]  # the vision tower ran once, one row per image
    assert len(captions) == len(images)
    for texts in captions:
        assert len(texts) == K == len(set(texts))
        assert all(text and not text.startswith("a picture of") for text in texts)


def test_sampling_gives_lavis_generates_token_ids(
    captioner: LavisBlipCaptioner, images: list
) -> None:
    """Same seed, same texts as LAVIS's own `BlipCaption.generate` (whose sampling fixes the
    repetition penalty at 1.1 and the temperature at 1: captionflow's defaults)."""
    model, prompt_tokens = captioner.model, len(captioner.prompt_ids)
    pixels = captioner.pixel_values(images)
    torch.manual_seed(7)
    with torch.inference_mode():
        ours = model.tokenizer.batch_decode(captioner.token_ids(pixels), skip_special_tokens=True)
    torch.manual_seed(7)
    with torch.inference_mode():
        theirs = model.generate(
            {"image": pixels},
            use_nucleus_sampling=True,
            num_captions=K,
            max_length=prompt_tokens + DECODING.max_new_tokens,
            min_length=prompt_tokens + DECODING.min_new_tokens,
            top_p=DECODING.top_p,
        )
    assert [t.removeprefix(captioner.prompt_text).strip() for t in ours] == [
        t.strip() for t in theirs
    ]


def test_decoder_cache_same_ids_fewer_tokens(captioner: LavisBlipCaptioner, images: list) -> None:
    """LAVIS 1.0.2 under transformers 4.26 drops the decoder's cache (`past` vs
    `past_key_values`): every step reruns the whole prefix. The captioner's fix keeps the ids."""
    decoder = captioner.model.text_decoder
    pixels = captioner.pixel_values(images[:2])
    lengths: list[int] = []
    hook = decoder.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
        with_kwargs=True,
    )
    runs = {}
    try:
        for cached in (True, False):
            if not cached:
                del decoder.prepare_inputs_for_generation  # LAVIS's own method again
            lengths.clear()
            torch.manual_seed(3)
            runs[cached] = (captioner.token_ids(pixels), list(lengths))
    finally:
        hook.remove()
        backend._enable_decoder_cache(decoder)
    (ids_cached, steps_cached), (ids_plain, steps_plain) = runs[True], runs[False]
    assert torch.equal(ids_cached, ids_plain)
    prompt = len(captioner.prompt_ids)
    assert steps_cached[0] == prompt and set(steps_cached[1:]) == {1}  # one new token a step
    assert steps_plain == list(range(prompt, prompt + len(steps_plain)))  # the whole prefix


def test_image_projected_once_per_call_same_ids(
    captioner: LavisBlipCaptioner, images: list
) -> None:
    """LAVIS's decoder projects the image into cross-attention keys and values at every step;
    the captioner does it once per call, with the same token ids."""
    layers = captioner.model.text_decoder.bert.encoder.layer
    pixels = captioner.pixel_values(images[:2])
    first = captioner.projections[0]  # layer 0's key projection
    assert first.project.__self__ is layers[0].crossattention.self.key
    calls: list[int] = []
    original = first.project
    first.project = lambda hidden: calls.append(1) or original(hidden)
    torch.manual_seed(5)
    ids_once = captioner.token_ids(pixels)
    calls_once = len(calls)
    # LAVIS's own decoder: every step projects the image again.
    for layer in layers:
        del layer.crossattention.self.key.forward, layer.crossattention.self.value.forward
    calls.clear()
    hook = layers[0].crossattention.self.key.register_forward_hook(lambda *args: calls.append(1))
    try:
        torch.manual_seed(5)
        ids_plain = captioner.token_ids(pixels)
    finally:
        hook.remove()
        captioner.projections = backend._project_image_once(captioner.model.text_decoder)
    assert torch.equal(ids_once, ids_plain)
    assert calls_once == 1
    assert len(calls) == ids_plain.shape[1] - len(captioner.prompt_ids)  # once a step


def test_beam_search_gives_k_distinct_beams(tiny_blip: str, images: list) -> None:
    beam = DecodingOptions(num_captions=K, strategy="beam", num_beams=K, max_new_tokens=8)
    captioner = LavisBlipCaptioner.load(tiny_blip, decoding=beam)
    for texts in captioner.caption(images):
        assert len(texts) == K == len(set(texts))
    # LAVIS's own generate repeats the image K times and runs K identical searches.
    with torch.inference_mode():
        theirs = captioner.model.generate(
            {"image": captioner.pixel_values(images[:1])}, num_beams=K, num_captions=K
        )
    assert len(theirs) == K and len(set(theirs)) == 1


def test_bad_words_are_never_written(tiny_blip: str, captioner: LavisBlipCaptioner, images: list):
    common = captioner.caption(images)[0][0].split()[0]  # a word this model writes
    options = DECODING.model_copy(update={"bad_words": (common,)})
    barred = LavisBlipCaptioner.load(tiny_blip, decoding=options)
    for texts in barred.caption(images):
        assert all(common not in text.split() for text in texts)


# -------------------------------------------------------------------------------- ranker


def test_clip_scores_are_lavis_cosines_best_first(tiny_clip: str, images: list) -> None:
    ranker = LavisClipRanker.load(tiny_clip)
    candidates = [["a dog", "a cat on a bed", "two people"], ["a red car"], ["x", "y y"]]
    ranked = ranker.rank(images, candidates)
    features = ranker.model.extract_features(
        {
            "image": torch.stack([ranker.vis_processor(i) for i in images]),
            "text_input": [text for group in candidates for text in group],
        }
    )
    cosine = features.image_embeds_proj @ features.text_embeds_proj.T
    scale = ranker.model.logit_scale.exp().item()
    start = 0
    for image, (group, scored) in enumerate(zip(candidates, ranked, strict=True)):
        expected = cosine[image, start : start + len(group)]
        start += len(group)
        assert sorted(s.text for s in scored) == sorted(group)
        assert [s.score for s in scored] == sorted((s.score for s in scored), reverse=True)
        probabilities = (expected * scale).softmax(0)
        for s in scored:
            i = group.index(s.text)
            assert s.score == pytest.approx(expected[i].item(), abs=1e-5)
            assert s.probability == pytest.approx(probabilities[i].item(), abs=1e-5)
    assert ranker.rank(images[:1], [[]]) == [[]]


def test_clip_long_text_keeps_its_end_token(tiny_clip: str) -> None:
    ranker = LavisClipRanker.load(tiny_clip)
    tokens = ranker.tokenize(["word " * 100, "short"])
    end = tokens[1].max().item()  # <end_of_text> has the largest id
    assert tokens[0, -1].item() == end  # LAVIS's tokenize leaves a word there
    assert tokens[1].argmax().item() == 2  # start, "short", end


def test_clip_checkpoint_of_another_type_is_refused(tiny_clip: str, tmp_path: Path) -> None:
    from lavis.models.clip_models import model as clip_module

    other = dict(TINY_CLIP_CONFIG, embed_dim=32)
    clip_module._MODEL_CONFIGS.setdefault(f"{TINY_CLIP}-32", other)
    path = tmp_path / "other.pt"
    torch.save(clip_module.create_model(f"{TINY_CLIP}-32", pretrained="").state_dict(), path)
    with pytest.raises(ModelLoadError, match="other shapes"):
        LavisClipRanker.load(f"{TINY_CLIP}:{path}")


def test_full_size_clip_builds_offline(images: list) -> None:
    """LAVIS's ViT-B-32 with pretrained="" (random weights): no download, real shapes."""
    ranker = LavisClipRanker.load("ViT-B-32:random")
    assert ranker.vis_processor.transform.transforms[1].size == (224, 224)
    ranked = ranker.rank(images[:1], [["a photo of a dog", "a cat"]])
    assert len(ranked[0]) == 2 and -1 <= ranked[0][0].score <= 1


# ------------------------------------------------------------------------------ pipeline


def test_caption_images_in_a_beam_pipeline(tiny_blip: str, tiny_clip: str, tmp_path: Path):
    paths = []
    for i in range(3):
        path = tmp_path / f"image_{i}.jpg"
        random_image(64 + 8 * i, 48, seed=i).save(path)
        paths.append(str(path))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    captioner = captioner_handler(f"lavis-blip:{tiny_blip}", decoding=DECODING, max_batch_size=2)
    ranker = ranker_handler(f"lavis-clip:{tiny_clip}")

    def check(record) -> str:
        assert record.captioner == f"lavis-blip:{tiny_blip}"
        assert record.ranker == f"lavis-clip:{tiny_clip}"
        texts = [c.text for c in record.candidates]
        assert len(texts) == K == len(set(texts)), texts
        scores = [c.score for c in record.candidates]
        assert scores == sorted(scores, reverse=True)  # best first
        assert record.text == texts[0] and record.score == scores[0]
        assert sum(c.probability for c in record.candidates) == pytest.approx(1, abs=1e-5)
        assert (record.width, record.height) == Image.open(record.image_uri).size
        return record.image_uri

    with TestPipeline(runner="FnApiRunner") as p:
        captions, errors = (
            p
            | beam.Create([*paths, str(tmp_path / "broken.jpg")])
            | CaptionImages(captioner, ranker)
        )
        assert_that(captions | beam.Map(check), equal_to(paths))
        assert_that(
            errors | beam.Map(lambda e: (e.image_uri, e.stage)),
            equal_to([(str(tmp_path / "broken.jpg"), "decode")]),
            label="errors",
        )


@pytest.mark.skipif(
    not hasattr(LavisBlipCaptionHandler.__mro__[1], "check_model"),
    reason="captionflow without handler-owned model checks (PROPOSED_CHANGES.md, change 2)",
)
def test_cli_runs_lavis_handlers_and_checks_their_files(
    tiny_blip: str, tiny_clip: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from captionflow.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        random_image(64, 48, seed=i).save(images / f"{i}.jpg")
    out = tmp_path / "out"
    common = ["run", "--input", str(images), "--output", str(out), "--num-captions", str(K)]
    assert main([*common, "--captioner", "lavis-blip:base_coco:/nowhere/x.pth"]) == 2
    assert "no such file: /nowhere/x.pth" in capsys.readouterr().err
    args = ["--captioner", f"lavis-blip:{tiny_blip}", "--ranker", f"lavis-clip:{tiny_clip}"]
    assert main([*common, *args, "--max-new-tokens", "8"]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(
        len(set(row["captions"])) == K and row["ranker"].startswith("lavis-clip:") for row in rows
    )
