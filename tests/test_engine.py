"""The model engine: requests of many callers merged into model batches, failures kept to
their own caller, a device failure failing everything, and one engine process per machine
serving every process, fed through shared memory."""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
from apache_beam.utils.multi_process_shared import AUTH_KEY

from captionflow.engine import Engine, EngineClient, EngineSpec
from captionflow.handlers import BlipCaptionHandler, ClipRankHandler, DecodingOptions
from captionflow.handlers.base import DeviceFailedError, ModelImages
from captionflow.views import ImageViews, ViewBatch, ViewSpec, make_views
from tests.conftest import random_image
from tests.killer import Misbehaving, image_sizes

DECODING = DecodingOptions(strategy="beam", num_captions=3)


def batch_of(specs: list, sizes: list[tuple[int, int]], seed: int = 0) -> ViewBatch:
    images: list[ImageViews] = [
        make_views(random_image(w, h, seed=seed + i), specs) for i, (w, h) in enumerate(sizes)
    ]
    return ViewBatch.stack(images)


@pytest.fixture(scope="module")
def spec(tiny_blip: str, tiny_clip: str) -> EngineSpec:
    return EngineSpec(
        BlipCaptionHandler(tiny_blip, decoding=DECODING),
        ClipRankHandler(tiny_clip),
        max_batch_size=64,
        rank_batch_size=5,
        mode="local",
    )


@pytest.fixture(scope="module")
def specs(spec: EngineSpec) -> list:
    return [spec.captioner.view_spec(), spec.ranker.view_spec()]


def engine_with(spec: EngineSpec, before: Callable[[ModelImages], None]) -> Engine:
    engine = spec.load()
    engine.captioner = Misbehaving(engine.captioner, before)
    return engine


def assert_same_results(results: list, expected: list) -> None:
    """Each image's candidates the same, with the same scores but for float rounding, best
    first. Another batch size or thread count may round a score differently in its last
    places (BLAS kernels vary with them on some CPUs), which reorders candidates whose scores
    tie, as a tiny random CLIP's all but do."""
    assert len(results) == len(expected)
    for got, want in zip(results, expected, strict=True):
        scores = {c.text: (c.score, c.probability) for c in got}
        assert scores.keys() == {c.text for c in want}
        for candidate in want:
            assert scores[candidate.text] == pytest.approx(
                (candidate.score, candidate.probability), rel=1e-5, abs=1e-6
            )
        assert all(a.score >= b.score - 1e-5 for a, b in itertools.pairwise(got))


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def call_in_threads(engine: Engine, batches: list[ViewBatch]) -> list[object]:
    """Each batch sent from a thread of its own; the first is held inside the model until
    every request has been taken in, so that the others queue behind it."""
    release = threading.Event()
    first_size = batches[0].sizes

    def hold_the_first(images: ModelImages) -> None:
        if tuple(image_sizes(images)) == first_size:
            release.wait(timeout=60)

    engine.captioner = Misbehaving(engine.captioner, hold_the_first)
    results: list[object] = [None] * len(batches)

    def call(i: int) -> None:
        try:
            results[i] = engine.caption_and_rank(batches[i])
        except Exception as error:
            results[i] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(batches))]
    threads[0].start()
    wait_for(lambda: engine.stats()["batches"] == 1, "the first batch to start")
    for thread in threads[1:]:
        thread.start()
    wait_for(lambda: engine.stats()["received"] == len(batches), "every request")
    release.set()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_requests_of_many_callers_are_merged_into_fewer_larger_model_batches(
    spec: EngineSpec, specs: list
) -> None:
    batches = [batch_of(specs, [(40 + i, 30), (30, 40 + i)], seed=10 * i) for i in range(6)]
    alone = spec.load()
    expected = [alone.caption_and_rank(batch) for batch in batches]
    assert alone.stats()["largest_batch"] == 2

    engine = spec.load()
    results = call_in_threads(engine, batches)
    stats = engine.stats()
    assert stats["requests"] == 6
    assert stats["batches"] <= 3  # the first, then the five queued behind it in one or two
    assert stats["largest_batch"] >= 6
    for got, want in zip(results, expected, strict=True):
        assert_same_results(got, want)  # each caller gets its own images' results, in order
    assert all(len(ranked) == 3 and ranked[0].score >= ranked[-1].score for ranked in results[1])


def test_a_request_failing_in_a_merged_batch_fails_only_its_caller(
    spec: EngineSpec, specs: list
) -> None:
    def refuse(images: ModelImages) -> None:
        if (13, 13) in image_sizes(images):
            raise ValueError("refusing 13x13 images")

    engine = engine_with(spec, refuse)
    batches = [batch_of(specs, [(40, 30)], seed=i) for i in range(4)]
    batches[2] = batch_of(specs, [(40, 30), (13, 13)])
    results = call_in_threads(engine, batches)
    error = results[2]
    assert isinstance(error, ValueError) and "13x13" in str(error)
    assert error.stage == "caption"  # type: ignore[attr-defined]
    assert all(isinstance(results[i], list) and len(results[i]) == 1 for i in (0, 1, 3))


def test_a_sticky_device_error_fails_every_waiting_request_and_every_later_one(
    spec: EngineSpec, specs: list
) -> None:
    calls = []

    def assert_fails(images: ModelImages) -> None:  # from the second model call on
        calls.append(len(images))
        if len(calls) > 1:
            raise torch.AcceleratorError("CUDA error: device-side assert triggered")

    engine = engine_with(spec, assert_fails)
    batches = [batch_of(specs, [(40, 30)], seed=i) for i in range(4)]
    results = call_in_threads(engine, batches)
    # The first was captioned before the error; its ranking, which overlaps the second
    # batch's captioning, may run before the error or be failed by it.
    assert isinstance(results[0], list | DeviceFailedError)
    assert all(isinstance(r, DeviceFailedError) for r in results[1:])
    assert len(calls) == 2  # the requests queued behind the failure never reached the device
    with pytest.raises(DeviceFailedError, match="device-side assert"):
        engine.caption_and_rank(batches[0])
    assert len(calls) == 2  # nor does any later one


def test_stacked_views_cross_processes_through_shared_memory_not_pickled() -> None:
    blip = ViewSpec((384, 384), "squash", squash_size=(384, 384))
    clip = ViewSpec((224, 224), "shortest_edge", shortest_edge=224, center_crop=True)
    batch = batch_of([blip, clip], [(640, 480)] * 16)
    pixels = sum(view.nbytes for view in batch.views.values())
    assert pixels > 9_000_000
    # Pickled as Beam's shared-object connection pickles (which sets this process's key for
    # the server that hands over shared-memory descriptors; a listener started with another
    # key would refuse the engine later).
    multiprocessing.current_process().authkey = AUTH_KEY
    assert len(ForkingPickler.dumps(batch)) < 2_000  # handles to shared memory, not pixels


def _call_shared_engine(spec: EngineSpec, batch: ViewBatch, answers: multiprocessing.Queue):
    client = EngineClient(spec)
    answers.put((client.caption_and_rank(batch), client.stats()["pid"]))


def test_one_shared_engine_process_serves_every_process_of_the_machine(
    spec: EngineSpec, specs: list
) -> None:
    shared = EngineSpec(spec.captioner, spec.ranker, mode="shared", rank_batch_size=5)
    batch = batch_of(specs, [(50, 40), (40, 50)])
    expected = spec.load().caption_and_rank(batch)

    client = EngineClient(shared)
    try:
        assert client.is_shared
        stacked = client.stack([make_views(random_image(50, 40), specs)])
        assert all(view.is_shared() for view in stacked.views.values())  # crosses as a handle
        here = client.caption_and_rank(batch)
        engine_pid = client.stats()["pid"]
        context = multiprocessing.get_context("spawn")
        answers = context.Queue()
        other = context.Process(target=_call_shared_engine, args=(shared, batch, answers))
        other.start()
        there, pid_seen_there = answers.get(timeout=120)
        other.join(timeout=60)
        assert_same_results(here, expected)
        assert_same_results(there, expected)
        assert pid_seen_there == engine_pid
        assert engine_pid not in (multiprocessing.current_process().pid, other.pid)
        assert client.stats()["requests"] == 2  # one engine answered both processes
    finally:
        client.close()


def test_requests_with_other_views_are_not_merged_and_the_engine_goes_on(
    spec: EngineSpec, specs: list
) -> None:
    engine = spec.load()
    whole = [batch_of(specs, [(40, 30)], seed=i) for i in range(4)]
    blip_only = batch_of(specs[:1], [(40, 30)])  # views of one model only: not mergeable
    results = call_in_threads(engine, [*whole[:2], blip_only, *whole[2:]])
    assert isinstance(results[2], ValueError) and "no view" in str(results[2])
    assert all(isinstance(results[i], list) for i in (0, 1, 3, 4))
    later: list[object] = []
    thread = threading.Thread(target=lambda: later.append(engine.caption_and_rank(whole[0])))
    thread.start()
    thread.join(timeout=60)
    assert later and later[0] == results[0]  # the engine still serves


class RankingFirst:
    """A loaded ranker that calls `before()` ahead of each batch."""

    def __init__(self, model: object, before: Callable[[], None]) -> None:
        self.model = model
        self.before = before

    def rank(self, images: ModelImages, candidates: list) -> list:
        self.before()
        return self.model.rank(images, candidates)  # type: ignore[attr-defined]


def test_the_next_batch_is_captioned_while_this_one_is_ranked(
    spec: EngineSpec, specs: list
) -> None:
    engine = spec.load()
    captioned: list[int] = []
    second_captioned = threading.Event()
    overlapped: list[bool] = []

    def note_caption(images: ModelImages) -> None:
        captioned.append(len(images))
        if len(captioned) == 2:
            second_captioned.set()

    def wait_for_the_next_caption() -> None:
        if not overlapped:  # the first batch's ranking waits for the second's captioning
            overlapped.append(second_captioned.wait(timeout=30))

    engine.captioner = Misbehaving(engine.captioner, note_caption)
    engine.ranker = RankingFirst(engine.ranker, wait_for_the_next_caption)
    batches = [batch_of(specs, [(40, 30)], seed=i) for i in range(2)]
    results: list[object] = [None, None]
    threads = [
        threading.Thread(
            target=lambda i=i: results.__setitem__(i, engine.caption_and_rank(batches[i]))
        )
        for i in range(2)
    ]
    threads[0].start()
    wait_for(lambda: engine.stats()["batches"] == 1, "the first batch")
    threads[1].start()
    for thread in threads:
        thread.join(timeout=120)
    assert overlapped == [True]
    assert all(isinstance(r, list) and len(r) == 1 for r in results)


def test_each_thread_stacks_its_requests_into_memory_of_its_own_reused_request_after_request(
    spec: EngineSpec, specs: list
) -> None:
    client = EngineClient(spec)
    images = [make_views(random_image(50, 40, seed=i), specs) for i in range(4)]
    first = client.stack(images).views[specs[0]]
    again = client.stack(images[:2]).views[specs[0]]
    assert again.data_ptr() == first.data_ptr()  # reused: the previous request was answered
    assert not first.is_shared()  # this engine lives in this process: nothing to share
    elsewhere: list[int] = []
    thread = threading.Thread(
        target=lambda: elsewhere.append(client.stack(images).views[specs[0]].data_ptr())
    )
    thread.start()
    thread.join()
    assert elsewhere and elsewhere[0] != first.data_ptr()  # another thread's own memory
    expected = spec.load().caption_and_rank(ViewBatch.stack(images))
    assert_same_results(client.caption_and_rank(client.stack(images)), expected)
