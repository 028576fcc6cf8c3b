"""BLIP's fast decode loop gives `generate`'s token ids, with less work (tiny random BLIP)."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from dataclasses import replace

import pytest
import torch

from captionflow.handlers import BlipCaptioner, DecodingOptions
from captionflow.handlers.blip_fast import StaticBuffers, Steps
from captionflow.tiny_models import build_tiny_blip
from tests.conftest import random_image

IMAGES = 6

STRATEGIES = {
    "sample": DecodingOptions(num_captions=5, temperature=0.7, min_new_tokens=3),
    "sample-no-penalty": DecodingOptions(num_captions=3, top_p=0.5, repetition_penalty=1.0),
    "greedy": DecodingOptions(num_captions=1, strategy="beam", num_beams=1),
    "beam": DecodingOptions(num_captions=5, strategy="beam", num_beams=5, min_new_tokens=2),
    "beam-3-return-2": DecodingOptions(
        num_captions=2, strategy="beam", num_beams=3, min_new_tokens=0, max_new_tokens=12
    ),
}


def captioners(path: str, decoding: DecodingOptions) -> tuple[BlipCaptioner, BlipCaptioner]:
    """The fast and the reference decoder on one model whose captions end at varied lengths
    (random weights never end one: a bias on the end token makes them)."""
    fast = BlipCaptioner.from_pretrained(path, decoding=decoding, device="cpu")
    text = fast.model.config.text_config
    with torch.no_grad():
        fast.model.text_decoder.cls.predictions.decoder.bias[text.sep_token_id] += 2.0
    reference_options = decoding.model_copy(update={"decoder": "reference"})
    reference = BlipCaptioner(fast.model, fast.processor, reference_options)
    assert fast.fast is not None and reference.fast is None
    return fast, reference


def pixels(seed: int) -> torch.Tensor:
    return torch.randn(IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fast_loop_gives_generates_token_ids(tiny_blip: str, strategy: str, seed: int) -> None:
    fast, reference = captioners(tiny_blip, STRATEGIES[strategy])
    torch.manual_seed(seed)
    expected = reference.token_ids(pixels(seed))
    torch.manual_seed(seed)
    actual = fast.token_ids(pixels(seed))
    assert actual.shape == expected.shape
    assert torch.equal(actual, expected)
    ended = (expected == fast.model.config.text_config.sep_token_id).any(dim=1)
    assert ended.any()  # the end-of-caption paths ran


@pytest.mark.parametrize("strategy", ["sample", "beam"])
def test_blip_large_shaped_models_decode_fast_too(tmp_path, strategy: str) -> None:
    """BLIP-large's vision tower is wider than its text decoder (1024 to 768): the fast loop
    projects each image's keys and values from the wider width as `generate` does."""
    torch.manual_seed(4)
    large = build_tiny_blip(str(tmp_path / "tiny-blip-large"), vision_width=48)
    fast, reference = captioners(large, STRATEGIES[strategy])
    assert fast.model.config.vision_config.hidden_size != fast.model.config.text_config.hidden_size
    torch.manual_seed(0)
    expected = reference.token_ids(pixels(0))
    torch.manual_seed(0)
    assert torch.equal(fast.token_ids(pixels(0)), expected)


def test_without_a_top_k_cut_the_whole_vocabulary_is_sorted_as_generate_does(
    tiny_blip: str,
) -> None:
    fast, reference = captioners(tiny_blip, DecodingOptions(num_captions=4, top_p=0.8))
    fast.model.text_decoder.generation_config.top_k = 0
    fast = BlipCaptioner(fast.model, fast.processor, fast.decoding)
    assert fast._search.top_k == 0
    torch.manual_seed(5)
    expected = reference.token_ids(pixels(5))
    torch.manual_seed(5)
    assert torch.equal(fast.token_ids(pixels(5)), expected)


def test_tokens_tied_with_the_kth_are_kept_by_the_top_k_cut_as_generate_does() -> None:
    """Half-precision logits tie often: `generate`'s top-k keeps every token whose score is
    not below the k-th's, and so does the nucleus sampler."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from captionflow.handlers.search import SearchSettings, sample_nucleus

    scores = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0, 3.0, 1.0, 0.5]]).repeat(4, 1)
    settings = SearchSettings("sample", 4, 4, 10, eos_token_id=7, pad_token_id=7, top_k=3)
    noise = torch.ones(4, 8)
    for row, tied in enumerate((2, 3, 4, 5)):
        noise[row, tied] = 1e-3  # each tied token wins if it is in the nucleus
    for top_p in (1.0, 0.99):
        cut = TopKLogitsWarper(3)(None, scores.clone())
        if top_p < 1.0:
            cut = TopPLogitsWarper(top_p)(None, cut)
        expected = (cut.softmax(dim=-1) / noise).argmax(dim=-1)
        assert expected.tolist() == [2, 3, 4, 5]
        chosen = sample_nucleus(scores, noise, replace(settings, top_p=top_p))
        assert chosen.tolist() == expected.tolist()


def test_finished_images_leave_the_models_batch(tiny_blip: str, monkeypatch) -> None:
    rows_stepped: list[int] = []
    step = Steps.step

    def counting_step(self: Steps, tokens: torch.Tensor) -> torch.Tensor:
        rows_stepped.append(len(tokens))
        return step(self, tokens)

    monkeypatch.setattr(Steps, "step", counting_step)
    fast, reference = captioners(tiny_blip, STRATEGIES["sample"])
    torch.manual_seed(1)
    expected = reference.token_ids(pixels(1))
    torch.manual_seed(1)
    assert torch.equal(fast.token_ids(pixels(1)), expected)
    assert rows_stepped[0] == IMAGES * 5
    assert rows_stepped[-1] < IMAGES * 5  # the last steps ran on fewer rows than the first


def test_each_images_cross_attention_keys_are_held_once(tiny_blip: str) -> None:
    fast, _ = captioners(tiny_blip, STRATEGIES["beam"])
    assert fast.fast is not None
    steps = fast.fast.steps(fast.fast.encode(pixels(0)), rows_per_image=5, max_length=20)
    keys, values = steps.cross[0]
    assert keys.shape[0] == IMAGES and values.shape[0] == IMAGES  # not IMAGES * 5
    assert steps.cache[0][0].shape[0] == IMAGES * 5


def test_the_model_itself_is_left_unchanged(tiny_blip: str) -> None:
    """`generate` on the same model object gives what it gave before the fast loop ran."""
    fast, reference = captioners(tiny_blip, STRATEGIES["beam"])
    before = reference.token_ids(pixels(3))
    fast.token_ids(pixels(3))
    assert torch.equal(reference.token_ids(pixels(3)), before)
    cross = fast.model.text_decoder.bert.encoder.layer[0].crossattention.self
    assert type(cross.key) is torch.nn.Linear and type(cross.value) is torch.nn.Linear


def test_the_vision_tower_with_sdpa_gives_the_models_embeddings(tiny_blip: str) -> None:
    fast, _ = captioners(tiny_blip, STRATEGIES["sample"])
    assert fast.fast is not None
    with torch.inference_mode():
        expected = fast.model.vision_model(pixel_values=pixels(4))[0]
        torch.testing.assert_close(fast.fast.encode(pixels(4)), expected)


def test_settings_only_generate_implements_fall_back_to_it(tiny_blip: str, caplog) -> None:
    fast, _ = captioners(tiny_blip, STRATEGIES["sample"])
    fast.model.text_decoder.generation_config.no_repeat_ngram_size = 2
    fallback = BlipCaptioner(fast.model, fast.processor, STRATEGIES["sample"])
    assert fallback.fast is None
    assert "no_repeat_ngram_size" in caplog.text
    assert len(fallback.caption([random_image(), random_image(seed=1)])) == 2


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("stop_strings", ["dog"]),
        ("force_words_ids", [[10]]),
        ("penalty_alpha", 0.6),
        ("dola_layers", "low"),
        ("token_healing", True),
        ("prompt_lookup_num_tokens", 3),
        ("max_time", 1.0),
    ],
)
def test_other_settings_that_change_generates_tokens_fall_back_to_it_too(
    tiny_blip: str, name: str, value: object, caplog: pytest.LogCaptureFixture
) -> None:
    """Each of these makes `generate` write other tokens (stop strings, constrained or
    contrastive search, DoLa, token healing, assisted decoding, a time limit) or refuse the
    call: the loop implements none of them, so it must not decode as though they were unset."""
    fast, _ = captioners(tiny_blip, STRATEGIES["greedy"])
    setattr(fast.model.text_decoder.generation_config, name, value)
    fallback = BlipCaptioner(fast.model, fast.processor, STRATEGIES["greedy"])
    assert fallback.fast is None
    assert name in caplog.text


@pytest.mark.parametrize("top_k", [7, 0])  # 0: no top-k cut, a setting too
def test_a_checkpoints_saved_generation_settings_are_said_to_be_ignored(
    tiny_blip: str, tmp_path, caplog: pytest.LogCaptureFixture, top_k: int
) -> None:
    """BLIP's `generate` decodes with its text decoder's generation config, never with the
    one a checkpoint saves (`generation_config.json`, or generation keys in `config.json`):
    neither decoder applies those settings, so the user is told which, not left to think
    they hold. The tokens stay `generate`'s."""
    path = shutil.copytree(tiny_blip, tmp_path / "blip")
    saved = json.loads((path / "generation_config.json").read_text())
    saved |= {"no_repeat_ngram_size": 2, "top_k": top_k, "bos_token_id": saved["bos_token_id"]}
    (path / "generation_config.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING, logger="captionflow"):
        fast, reference = captioners(str(path), STRATEGIES["sample"])
    warned = [r.getMessage() for r in caplog.records if "generation config" in r.getMessage()]
    assert warned and "no_repeat_ngram_size" in warned[0] and "top_k" in warned[0]
    assert "bos_token_id" not in warned[0]
    torch.manual_seed(0)
    expected = reference.token_ids(pixels(0))
    torch.manual_seed(0)
    assert torch.equal(fast.token_ids(pixels(0)), expected)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="captionflow"):
        captioners(tiny_blip, STRATEGIES["sample"])
    assert "generation config" not in caplog.text


@pytest.mark.parametrize("strategy", ["sample", "beam"])
def test_compiled_steps_give_generates_token_ids(tiny_blip: str, strategy: str) -> None:
    """`--decoder compiled`: static-shape steps through torch.compile (CUDA graphs on a GPU),
    6 images padded to 8, compacted to powers of two as they finish."""
    decoding = STRATEGIES[strategy].model_copy(update={"decoder": "compiled"})
    compiled, reference = captioners(tiny_blip, decoding)
    assert compiled.fast is not None and compiled.fast.compiled_step is not None
    torch.manual_seed(2)
    expected = reference.token_ids(pixels(2))
    torch.manual_seed(2)
    assert torch.equal(compiled.token_ids(pixels(2)), expected)
    assert compiled.fast.compiled_step is not None  # it compiled: no fallback was taken


def test_compiled_steps_read_and_write_the_same_static_buffers_batch_after_batch(
    tiny_blip: str,
) -> None:
    """A CUDA graph holds its tensors' addresses: torch records it again for a cache or image
    key at a new address, and records none for a step that writes into one unmarked. Each
    shape's buffers are kept, marked static, and reused by the next batch, which still gets
    `generate`'s token ids (nothing of the last batch left in them)."""
    decoding = STRATEGIES["sample"].model_copy(update={"decoder": "compiled"})
    compiled, reference = captioners(tiny_blip, decoding)
    assert compiled.fast is not None and compiled.fast.compiled_step is not None
    step = compiled.fast.compiled_step
    addresses: dict[tuple, set[tuple[int, ...]]] = {}

    def recorded(tokens, position, cache, cross, per_image) -> torch.Tensor:
        tensors = [tensor for pairs in (cache, cross) for pair in pairs for tensor in pair]
        assert all(getattr(t, "_dynamo_static_input_type", None) for t in tensors)
        shape = tuple(tuple(t.shape) for t in tensors)
        addresses.setdefault(shape, set()).add(tuple(t.data_ptr() for t in tensors))
        return step(tokens, position, cache, cross, per_image)

    compiled.fast.compiled_step = recorded
    for seed in (2, 4):
        torch.manual_seed(seed)
        expected = reference.token_ids(pixels(seed))
        torch.manual_seed(seed)
        assert torch.equal(compiled.token_ids(pixels(seed)), expected)
    assert compiled.fast.compiled_step is recorded  # no fallback was taken
    assert len(addresses) >= 2  # compacted: more than one shape
    assert all(len(seen) == 1 for seen in addresses.values()), addresses


def test_static_buffers_are_kept_per_shape_and_never_shared_between_threads() -> None:
    """Two batches decoding at once, in two threads, must not write into one cache."""
    buffers, like = StaticBuffers(), torch.zeros(1)
    here = buffers.pairs(2, (4, 3), like)
    assert buffers.pairs(2, (4, 3), like) is here and buffers.pairs(2, (8, 3), like) is not here
    elsewhere: list = []
    thread = threading.Thread(target=lambda: elsewhere.append(buffers.pairs(2, (4, 3), like)))
    thread.start()
    thread.join()
    assert elsewhere[0][0][0].data_ptr() not in {t.data_ptr() for pair in here for t in pair}


def test_a_compiled_step_that_fails_falls_back_to_the_eager_step(
    tiny_blip: str, caplog: pytest.LogCaptureFixture
) -> None:
    decoding = STRATEGIES["sample"].model_copy(update={"decoder": "compiled"})
    compiled, reference = captioners(tiny_blip, decoding)
    assert compiled.fast is not None

    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("no compiler here")

    compiled.fast.compiled_step = broken
    torch.manual_seed(3)
    expected = reference.token_ids(pixels(3))
    torch.manual_seed(3)
    assert torch.equal(compiled.token_ids(pixels(3)), expected)
    assert compiled.fast.compiled_step is None
    assert "no compiler here" in caplog.text


@pytest.mark.parametrize("strategy", ["sample", "beam"])
def test_bad_words_are_never_written_and_both_decoders_agree(tiny_blip: str, strategy: str) -> None:
    """`--bad-words`: a word is barred at every step; a phrase's last word is barred after the
    rest of it. Both decoders bar the same (`generate`'s `bad_words_ids`)."""
    plain, _ = captioners(tiny_blip, STRATEGIES[strategy])
    torch.manual_seed(4)
    start = len(plain._prompt_ids)
    written = plain.token_ids(pixels(4))[:, start:]
    tokens, counts = written.flatten().unique(return_counts=True)
    common = [int(t) for t in tokens[counts.argsort(descending=True)] if t > 6][:3]
    vocabulary = plain.processor.tokenizer.convert_ids_to_tokens(common)
    bad = (vocabulary[0], f"{vocabulary[1]} {vocabulary[2]}")
    decoding = STRATEGIES[strategy].model_copy(update={"bad_words": bad})
    fast, reference = captioners(tiny_blip, decoding)
    torch.manual_seed(4)
    expected = reference.token_ids(pixels(4))
    torch.manual_seed(4)
    actual = fast.token_ids(pixels(4))
    assert torch.equal(actual, expected)
    assert not (actual[:, start:] == common[0]).any()
    pairs = torch.stack([actual[:, start:-1], actual[:, start + 1 :]], dim=-1)
    assert not (pairs == torch.tensor(common[1:])).all(dim=-1).any()


@pytest.mark.parametrize("strategy", ["sample", "beam"])
def test_a_bad_word_that_is_the_end_token_is_not_barred_as_generate_does(
    tiny_blip: str, strategy: str
) -> None:
    """`--bad-words "[SEP]"` tokenizes to BLIP's end token: `generate` leaves that one out of
    `bad_words_ids` (captions must still end), and so must the loop."""
    decoding = STRATEGIES[strategy].model_copy(update={"bad_words": ("[SEP]",)})
    fast, reference = captioners(tiny_blip, decoding)
    torch.manual_seed(6)
    expected = reference.token_ids(pixels(6))
    torch.manual_seed(6)
    assert torch.equal(fast.token_ids(pixels(6)), expected)
    assert (expected == fast.model.config.text_config.sep_token_id).any()


@pytest.mark.parametrize("strategy", ["sample", "beam"])
def test_a_checkpoint_without_a_pad_token_pads_with_the_end_token_as_generate_does(
    tiny_blip: str, tmp_path, strategy: str
) -> None:
    """A text config with `pad_token_id: null`: `generate` pads finished rows with the end
    token; the loop must too, not fail every batch."""
    path = shutil.copytree(tiny_blip, tmp_path / "blip")
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["pad_token_id"] = None
    (path / "config.json").write_text(json.dumps(config))
    fast, reference = captioners(str(path), STRATEGIES[strategy])
    assert fast.model.config.text_config.pad_token_id is None
    torch.manual_seed(7)
    expected = reference.token_ids(pixels(7))
    torch.manual_seed(7)
    assert torch.equal(fast.token_ids(pixels(7)), expected)


def test_the_static_step_sees_only_zeros_past_the_current_position(tiny_blip: str) -> None:
    """The compiled step attends over the whole cache length, the unwritten positions masked:
    they must hold zeros, as a masked NaN (from uninitialised memory) still poisons the
    softmax. With torch on one thread such garbage made the compiled loop diverge."""
    fast, _ = captioners(tiny_blip, STRATEGIES["sample"])
    assert fast.fast is not None
    steps = fast.fast.steps(fast.fast.encode(pixels(5)), rows_per_image=5, max_length=20)
    prompt = torch.tensor(fast._prompt_ids)
    steps.prefill(prompt)
    for keys, values in steps.cache:
        assert not keys[:, :, steps.length :].any() and not values[:, :, steps.length :].any()
    tokens = torch.full((IMAGES * 5,), 9)
    with torch.inference_mode():
        position = torch.tensor(steps.length)
        static = fast.fast.static_step(tokens, position, steps.cache, steps.cross, 5)
        steps.length = int(position)
        for keys, values in steps.cache:  # undo the static step's write at `position`
            keys[:, :, steps.length :] = 0
            values[:, :, steps.length :] = 0
        eager = steps.step(tokens)
    torch.testing.assert_close(static, eager)


@pytest.mark.parametrize("decoder", ["fast", "compiled"])
def test_with_a_seed_an_image_gets_the_same_captions_in_any_batch(
    tiny_blip: str, decoder: str
) -> None:
    decoding = STRATEGIES["sample"].model_copy(update={"seed": 3, "decoder": decoder})
    seeded, _ = captioners(tiny_blip, decoding)
    batch = pixels(6)
    k = decoding.num_captions
    alone = seeded.token_ids(batch[2:3])
    torch.manual_seed(0)  # the global generator plays no part
    together = seeded.token_ids(batch)
    torch.manual_seed(1)
    reordered = seeded.token_ids(batch[[4, 2, 0]])

    def rows(ids: torch.Tensor, image: int) -> list[list[int]]:
        trimmed = ids[image * k : (image + 1) * k].tolist()
        return [[t for t in row if t != 0] for row in trimmed]  # padding depends on the batch

    assert rows(alone, 0) == rows(together, 2) == rows(reordered, 1)
    assert rows(together, 0) == rows(reordered, 2)
    other = BlipCaptioner(seeded.model, seeded.processor, decoding.model_copy(update={"seed": 4}))
    assert rows(other.token_ids(batch), 2) != rows(together, 2)
