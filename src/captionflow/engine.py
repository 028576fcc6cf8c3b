"""One engine per device: both models of a job, fed batches merged from every caller.

Beam runs many SDK processes on a machine (one per core on Dataflow), each with several
threads, and each thread sends its own small batch. A GPU wants hundreds of images per call
and one owner. An `Engine` holds the captioner and the ranker on one device and takes requests
from every caller: threads of its own process (`local`), or every process of the machine
(`shared`: the engine runs in a process of its own, spawned with Beam's `MultiProcessShared`,
and stacked uint8 views reach it through shared memory, not pickled). Requests waiting when
the device frees up are merged into one batch of up to `max_batch_size` images; while that
batch is captioned, the next is merged and copied to the device, and the one before is ranked.

The engine owns models, devices and tensors; it knows nothing of files or of Beam's IO.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from apache_beam.utils.multi_process_shared import MultiProcessShared

from captionflow.handlers.base import (
    Captioner,
    CaptionModelHandler,
    DeviceFailedError,
    ModelImage,
    ModelImages,
    Ranker,
    RankModelHandler,
    is_sticky_device_error,
    model_batch,
)
from captionflow.handlers.candidates import RuledCaptioner
from captionflow.handlers.torch_setup import next_copy_index
from captionflow.records import ScoredCaption
from captionflow.views import StackSpace, ViewBatch

logger = logging.getLogger(__name__)

EngineMode = Literal["auto", "local", "shared"]
ENGINE_MODES: tuple[str, ...] = get_args(EngineMode)
Ranked = list[ScoredCaption]  # one image's candidates, best first; empty: no caption
LOG_EVERY_S = float(os.environ.get("CAPTIONFLOW_ENGINE_LOG_EVERY_S", 60))


@dataclass
class _Request:
    """One caller's batch, and where its answer goes."""

    images: ModelImages
    done: threading.Event = field(default_factory=threading.Event)
    result: list[Ranked] | None = None
    error: BaseException | None = None

    def finish(self, result: list[Ranked] | None = None, error: BaseException | None = None):
        self.result, self.error = result, error
        self.done.set()


class Engine:
    """A captioner and a ranker on one device, behind one queue of requests.

    `caption_and_rank` may be called from any number of threads; each call waits for its own
    results. A request that fails inside a merged batch is run again alone, so that it fails
    only its own caller (who then splits it further). An error that leaves the device
    unusable fails every request with `DeviceFailedError`, and every later one.
    """

    def __init__(
        self,
        captioner: Captioner,
        ranker: Ranker,
        *,
        device: torch.device | str = "cpu",
        max_batch_size: int = 256,
        rank_batch_size: int = 256,
    ) -> None:
        self.captioner = captioner
        self.ranker = ranker
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.rank_batch_size = rank_batch_size
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        # One batch is made ready ahead of the one computing, and only when that one starts:
        # requests arriving meanwhile wait in the queue and merge into the next batch.
        self._ready: queue.SimpleQueue[tuple[list[_Request], ModelImages, Any]] = (
            queue.SimpleQueue()
        )
        self._slot = threading.Semaphore(1)
        # Captioned batches wait here for the ranking thread (one at most: no running ahead).
        self._captioned: queue.Queue[tuple[list[_Request], ModelImages, list[list[str]]]] = (
            queue.Queue(1)
        )
        self._working = 0
        self._busy_since = 0.0
        self._broken: DeviceFailedError | None = None
        self._lock = threading.Lock()
        self._stats = {
            "received": 0,  # requests taken in
            "requests": 0,  # requests answered
            "batches": 0,  # model calls (merged requests)
            "images": 0,
            "largest_batch": 0,
            "busy_s": 0.0,  # time spent in model calls
            "pid": os.getpid(),
        }
        self._started = self._logged = time.monotonic()
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        for target in (self._gather, self._compute, self._finish):
            threading.Thread(target=target, name=f"engine-{target.__name__}", daemon=True).start()

    def caption_and_rank(self, images: ModelImages) -> list[Ranked]:
        """For each image, its candidate captions scored by the ranker, best first (empty
        when the captioner produced none). An exception names its stage in `.stage`."""
        if self._broken:
            raise self._broken
        request = _Request(images)
        with self._lock:
            self._stats["received"] += 1
        self._requests.put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def stats(self) -> dict[str, float]:
        """Requests, model batches, images, the largest batch, the busy fraction, the pid."""
        with self._lock:
            elapsed = time.monotonic() - self._started
            return {**self._stats, "busy_fraction": self._stats["busy_s"] / max(elapsed, 1e-9)}

    # The gathering thread: merge the requests waiting, copy the batch to the device.
    def _gather(self) -> None:
        held: _Request | None = None
        while True:
            self._slot.acquire()
            group = [held or self._requests.get()]
            held = None
            size = len(group[0].images)
            while isinstance(group[0].images, ViewBatch) and size < self.max_batch_size:
                try:
                    request = self._requests.get_nowait()
                except queue.Empty:
                    break
                if (
                    not _same_views(group[0].images, request.images)
                    or size + len(request.images) > self.max_batch_size
                ):
                    held = request
                    break
                group.append(request)
                size += len(request.images)
            try:
                images, copied = self._to_device(group)
            except Exception as error:
                for request in group:
                    request.finish(error=error)
                self._slot.release()  # nothing was made ready
                continue
            self._ready.put((group, images, copied))

    def _to_device(self, group: list[_Request]) -> tuple[ModelImages, Any]:
        """The group's images as one batch, on the device when they are views; on a GPU the
        copy runs on a stream of its own, overlapping the batch being computed."""
        if not isinstance(group[0].images, ViewBatch):
            return group[0].images, None
        batch = ViewBatch.concat([request.images for request in group])  # type: ignore[misc]
        if self._copy_stream is None:
            return batch, None
        with torch.cuda.stream(self._copy_stream):
            moved = batch.to(self.device)
            copied = torch.cuda.Event()
            copied.record()
        return moved, copied

    # The captioning thread: caption each merged batch, then hand it to the ranking thread, so
    # that the next batch is captioned while this one's texts are tokenised and ranked.
    def _compute(self) -> None:
        while True:
            group, images, copied = self._ready.get()
            self._slot.release()
            if copied is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(copied)
                for view in images.views.values():  # type: ignore[union-attr]
                    view.record_stream(stream)
            if self._broken:
                self._answer(group, error=self._broken)
                continue
            with self._busy():
                try:
                    candidates = self._caption(images)
                except Exception as error:
                    self._fail_or_split(group, images, error, self._run_alone)
                    continue
            self._captioned.put((group, images, candidates))

    # The ranking thread: score each captioned batch and answer its callers.
    def _finish(self) -> None:
        while True:
            group, images, candidates = self._captioned.get()
            if self._broken:
                self._answer(group, error=self._broken)
                continue
            with self._busy():
                try:
                    ranked = self._rank(images, candidates)
                except Exception as error:
                    alone = functools.partial(self._rank_alone, candidates)
                    self._fail_or_split(group, images, error, alone)
                    continue
            self._answer(group, ranked)
            self._log_stats()

    def _answer(
        self, group: list[_Request], results: list[Ranked] | None = None, error: Any = None
    ) -> None:
        start = 0
        for request in group:
            end = start + len(request.images)
            request.finish(None if results is None else results[start:end], error)
            start = end
        with self._lock:
            self._stats["requests"] += len(group)

    def _fail_or_split(
        self, group: list[_Request], images: ModelImages, error: Exception, alone: Any
    ) -> None:
        """After `error`: everything fails if the device is gone; a lone request fails; else
        each request is run `alone(request, its images, its start)`, so only failing ones fail."""
        if is_sticky_device_error(error):
            self._broken = DeviceFailedError(f"the model engine's device failed: {error}")
            self._answer(group, error=self._broken)
        elif len(group) == 1:
            self._answer(group, error=error)
        else:
            start = 0
            for request in group:
                end = start + len(request.images)
                alone(request, _part(images, start, end), start)
                start = end

    def _run_alone(self, request: _Request, images: ModelImages, start: int) -> None:
        """Both models for one request, answered here."""
        self._answer_alone(request, images, self._run)

    def _rank_alone(
        self, candidates: list[list[str]], request: _Request, images: ModelImages, start: int
    ) -> None:
        """The ranker for one request of a captioned batch, answered here."""
        texts = candidates[start : start + len(images)]
        self._answer_alone(request, images, functools.partial(self._rank, candidates=texts))

    def _answer_alone(self, request: _Request, images: ModelImages, run: Any) -> None:
        if self._broken:
            self._answer([request], error=self._broken)
            return
        try:
            results = run(images)
        except Exception as error:
            self._fail_or_split([request], images, error, self._run_alone)
            return
        self._answer([request], results)

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        """Count the time when either model is working (they overlap)."""
        with self._lock:
            self._working += 1
            if self._working == 1:
                self._busy_since = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._working -= 1
                if self._working == 0:
                    self._stats["busy_s"] += time.monotonic() - self._busy_since

    def _log_stats(self) -> None:
        """Every minute, the engine's work so far: how full its batches are, how busy it is."""
        now = time.monotonic()
        if now - self._logged < LOG_EVERY_S:
            return
        self._logged = now
        stats = self.stats()
        logger.info(
            "engine on %s: %d images in %d batches (mean %.1f, largest %d) from %d requests; "
            "busy %.0f%% of the time",
            self.device,
            stats["images"],
            stats["batches"],
            stats["images"] / max(stats["batches"], 1),
            stats["largest_batch"],
            stats["requests"],
            100 * stats["busy_fraction"],
        )

    def _run(self, images: ModelImages) -> list[Ranked]:
        return self._rank(images, self._caption(images))

    def _caption(self, images: ModelImages) -> list[list[str]]:
        with self._lock:
            self._stats["batches"] += 1
            self._stats["images"] += len(images)
            self._stats["largest_batch"] = max(self._stats["largest_batch"], len(images))
        return _in_stage("caption", self.captioner.caption, images)

    def _rank(self, images: ModelImages, candidates: list[list[str]]) -> list[Ranked]:
        """The candidates of the images that have some, scored, in rank-sized chunks."""
        ranked: list[Ranked] = [[] for _ in candidates]
        having = [i for i, texts in enumerate(candidates) if texts]
        for start in range(0, len(having), self.rank_batch_size):
            chunk = having[start : start + self.rank_batch_size]
            scored = _in_stage(
                "rank", self.ranker.rank, _select(images, chunk), [candidates[i] for i in chunk]
            )
            for i, image_ranked in zip(chunk, scored, strict=True):
                ranked[i] = image_ranked
        return ranked


def _same_views(first: ModelImages, other: ModelImages) -> bool:
    """Whether `other` can join a batch that starts with `first`: views of the same inputs."""
    return (
        isinstance(first, ViewBatch)
        and isinstance(other, ViewBatch)
        and first.views.keys() == other.views.keys()
    )


def _in_stage(stage: str, call: Any, *args: Any) -> Any:
    """`call(*args)`, its exception marked with the stage that raised it."""
    try:
        return call(*args)
    except Exception as error:
        error.stage = stage  # type: ignore[attr-defined]
        raise


def _part(images: ModelImages, start: int, end: int) -> ModelImages:
    return _select(images, range(start, end))


def _select(images: ModelImages, indexes: Sequence[int]) -> ModelImages:
    if isinstance(images, ViewBatch):
        return images.select(indexes)
    return [images[i] for i in indexes]


@dataclass(frozen=True)
class EngineSpec:
    """What an engine loads and how it batches: picklable, so that a spawned process can
    load it. `key` names one job's engines on a machine."""

    captioner: CaptionModelHandler
    ranker: RankModelHandler
    max_batch_size: int = 256
    rank_batch_size: int = 256
    mode: EngineMode = "auto"
    copies: int | None = None  # shared engines per machine; default one per GPU
    key: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        if self.mode not in ENGINE_MODES:  # else taken for `local`
            raise ValueError(f"engine: {self.mode!r} is not one of {', '.join(ENGINE_MODES)}")

    def load(self, device: str | None = None) -> Engine:
        """Load both models (on `device`, else where their handlers say) into an engine."""
        captioner, ranker = (_on_device(h, device) for h in (self.captioner, self.ranker))
        captioner_model = captioner.load_model()
        ruled = RuledCaptioner(captioner_model, captioner.rules)
        return Engine(
            ruled if captioner.rules.active else captioner_model,
            ranker.load_model(),
            device=_device_of(captioner_model),
            max_batch_size=self.max_batch_size,
            rank_batch_size=self.rank_batch_size,
        )

    def shared(self) -> bool:
        """Whether callers share engines in processes of their own: asked for, or `auto` on
        a machine with a GPU or with `copies` set."""
        if self.mode != "auto":
            return self.mode == "shared"
        return self.copies is not None or torch.cuda.is_available()

    def engine_count(self) -> int:
        if self.copies:
            return self.copies
        return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1


def _on_device(handler: Any, device: str | None) -> Any:
    if device is None:
        return handler
    moved = copy.copy(handler)
    moved.device = device
    return moved


def _device_of(model: Any) -> torch.device:
    inner = getattr(model, "model", None)
    return getattr(inner, "device", None) or torch.device("cpu")


def _load_shared_engine(spec: EngineSpec, index: int) -> Engine:
    """In the engine's own process: its models on the `index`-th GPU (round robin). With the
    arithmetic on a GPU, this process's CPU work is launching kernels: one thread does it, and
    idle OpenMP threads spinning beside the workers' decoding would only steal their cores."""
    device = None
    if torch.cuda.is_available() and spec.captioner.device in ("auto", "cuda"):
        device = f"cuda:{index % torch.cuda.device_count()}"
        torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    logger.info("engine %s-%d loading on %s", spec.key, index, device or "the handlers' device")
    return spec.load(device)


class EngineLostError(DeviceFailedError):
    """The engine's process went away (it failed, or its parent ended): the bundle is
    retried, and the next call starts or finds a new engine."""


class EngineClient:
    """A caller's handle on its engine: in this process, or in the machine's engine process
    for this job (the `index`-th of `spec.engine_count()`, chosen round robin per process).

    Returned by the handler's `load_model`; a lost engine is replaced on the next call.
    """

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.is_shared = spec.shared()
        self._engine: Any = None
        self._shared: MultiProcessShared | None = None
        self._spaces = threading.local()
        self._index = 0
        if self.is_shared:
            self._index = next_copy_index(f"engine-{spec.key}") % spec.engine_count()
            # This process only feeds the engine: its torch work (views, stacking) is per image
            # and small, where intra-op threads cost CPU (spinning) and gain nothing.
            torch.set_num_threads(1)
        self._connect()

    def _connect(self) -> Any:
        if not self.is_shared:
            self._engine = self._engine or self.spec.load()
            return self._engine
        self._shared = MultiProcessShared(
            functools.partial(_load_shared_engine, self.spec, self._index),
            tag=f"captionflow-engine-{self.spec.key}-{self._index}",
            spawn_process=True,
        )
        self._engine = self._shared.acquire()
        return self._engine

    def stack(self, images: Sequence[ModelImage]) -> ModelImages:
        """The images as one request: their views stacked into this thread's `StackSpace`
        (shared memory when the engine is another process's), reused request after request,
        since each is answered before its thread sends the next."""
        space = getattr(self._spaces, "space", None)
        if space is None:
            space = self._spaces.space = StackSpace(shared=self.is_shared)
        return model_batch(images, space)

    def caption_and_rank(self, images: ModelImages) -> list[Ranked]:
        engine = self._engine or self._connect()
        try:
            return engine.caption_and_rank(images)
        except DeviceFailedError:
            self._drop(stop=True)
            raise
        except (EOFError, ConnectionError, BrokenPipeError) as error:
            self._drop()
            raise EngineLostError(f"the model engine process went away: {error!r}") from error

    def stats(self) -> dict[str, float]:
        return (self._engine or self._connect()).stats()

    def close(self) -> None:
        """End a shared engine's process now (it also ends with the process that started
        it); a later call starts a new one."""
        self._drop(stop=True)

    def _drop(self, *, stop: bool = False) -> None:
        """Forget a failed engine; with `stop`, end its process so that a new one starts."""
        if self._shared is not None and stop:
            try:
                self._shared.unsafe_hard_delete()
            except Exception as error:  # already gone
                logger.info("engine already gone: %r", error)
        if self.is_shared:
            self._engine, self._shared = None, None
