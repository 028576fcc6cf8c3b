"""The handler interface: what any captioner or ranker provides, and what Beam needs of it.

A handler is a Beam `ModelHandler` whose `load_model()` returns a loaded model object with one
method (`caption` or `rank`). All work happens in that method, so that with `large_model=True`
or `model_copies=N` one copy serves every process of a worker through Beam's shared-model proxy.
Handlers know nothing of files: they take decoded images and return text and scores.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from apache_beam.ml.inference.base import ModelHandler, PredictionResult
from PIL import Image

from captionflow.handlers.candidates import CandidateRules
from captionflow.handlers.decoding import DecodingOptions
from captionflow.records import ScoredCaption
from captionflow.views import ImageViews, StackSpace, ViewBatch, ViewSpec

logger = logging.getLogger(__name__)

ExampleT = TypeVar("ExampleT")
PredictionT = TypeVar("PredictionT")
ModelT = TypeVar("ModelT")

# What a model is given for one image: the decoded picture, or the views the decode step made
# for it (when the handler declares one with `view_spec`).
ModelImage = Image.Image | ImageViews
# What a model call is given for a batch: the images, or their views stacked per model input.
ModelImages = Sequence[ModelImage] | ViewBatch
RankExample = tuple[ModelImage, Sequence[str]]


def model_batch(images: Sequence[ModelImage], space: StackSpace | None = None) -> ModelImages:
    """Views stacked into one tensor per model input (made once, for both models), in
    `space` when given; pictures as they are."""
    if images and all(isinstance(image, ImageViews) for image in images):
        return ViewBatch.stack(images, space)  # type: ignore[arg-type]
    return list(images)


class Captioner(Protocol):
    """A loaded captioning model."""

    def caption(self, images: ModelImages) -> list[list[str]]:
        """Distinct candidate captions for each image, in one batched call."""
        ...


class Ranker(Protocol):
    """A loaded image-text scoring model."""

    def rank(
        self, images: ModelImages, candidates: Sequence[Sequence[str]]
    ) -> list[list[ScoredCaption]]:
        """Each image's candidates scored against it, best first."""
        ...


class DeviceFailedError(RuntimeError):
    """The accelerator is in an error state that no later call in this process recovers from
    (a device-side assert, an illegal memory access): the bundle fails, so that Beam retries
    it, instead of every later image of this process becoming an error record."""


@dataclass(frozen=True)
class InferenceFailure:
    """Stands in for the prediction of an example that its model could not process."""

    error_type: str
    message: str
    stage: str | None = None  # where a multi-stage model failed (an engine: caption or rank)


class IsolatingModelHandler(ModelHandler[ExampleT, PredictionT, ModelT]):
    """Beam's side of a model: where it loads from, how it batches, and failure isolation.

    When a batch fails, its examples are run one by one, so one bad image costs only its own
    prediction (an `InferenceFailure`), never its batch or the job. Loading errors propagate:
    a model that cannot load must stop the job, not turn every image into an error.
    """

    default_model: str = ""
    kind: str = ""
    batch_size: int = 16  # the model's requests when none is asked for: its batch limit
    takes_images: bool = True  # False: the model never looks at the images (no view is made)

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int | None = None,
        min_batch_size: int | None = None,
        large_model: bool = False,
        model_copies: int | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        max_batch_size = max_batch_size or self.batch_size
        super().__init__(
            # Fixed-size batches by default: Beam's adaptive sizing shrinks batches that take
            # longer than ~10 s (any batch on a CPU), which costs throughput for nothing.
            min_batch_size=max_batch_size if min_batch_size is None else min_batch_size,
            max_batch_size=max_batch_size,
            large_model=large_model,
            model_copies=model_copies,
        )
        self.model_id = model or self.default_model
        self.device = device
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code

    @property
    def name(self) -> str:
        """How records name this model: `<kind>:<model id or path>`, or `<kind>` when it loads
        no model."""
        return f"{self.kind}:{self.model_id}" if self.model_id else self.kind

    def load(self, loaded: Any, **options: Any) -> Any:
        """`loaded.from_pretrained` of this handler's model, device, dtype and trust, with
        `options` (a captioner's `decoding`): what most `load_model`s are."""
        return loaded.from_pretrained(
            self.model_id,
            device=self.device,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
            **options,
        )

    @abstractmethod
    def predict(self, model: ModelT, batch: Sequence[ExampleT]) -> list[PredictionT]:
        """One prediction per example, for the whole batch at once."""

    def run_inference(
        self,
        batch: Sequence[ExampleT],
        model: ModelT,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        predictions = self._predict_isolating(model, list(batch))
        return [
            PredictionResult(example, prediction, self.name)
            for example, prediction in zip(batch, predictions, strict=True)
        ]

    def _predict_isolating(
        self, model: ModelT, batch: list[ExampleT]
    ) -> list[PredictionT | InferenceFailure]:
        """Predictions for `batch`; when it fails, its halves are tried apart, down to single
        examples: one bad image costs about 2 log2(n) calls and only its own prediction, and a
        batch too large for the device's memory is processed in halves."""
        try:
            return list(self.predict(model, batch))
        except Exception as error:
            if is_sticky_device_error(error):
                raise DeviceFailedError(f"{self.name}: {error}") from error
            if len(batch) == 1:
                return [_failure(error)]
            logger.warning(
                "%s failed a batch of %d (%s: %s); trying its halves apart",
                self.name,
                len(batch),
                type(error).__name__,
                error,
            )
            if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(batch) // 2
            first = self._predict_isolating(model, batch[:half])
            return first + self._predict_isolating(model, batch[half:])

    @classmethod
    def check_model(cls, model: str, flag: str) -> str | None:
        """Why `model` cannot be loaded from here, with what to do (`flag`: `captioner` or
        `ranker`), or None when it can: asked before a local run starts. This default knows
        Hugging Face references (hub id, local folder, remote URI); a handler whose models are
        referenced otherwise overrides it."""
        from captionflow.handlers.loading import (
            NO_SUCH_DIRECTORY,
            NOT_A_REFERENCE,
            check_available,
        )

        problem = check_available(model)
        if problem in (NOT_A_REFERENCE, NO_SUCH_DIRECTORY):  # no hub id to download
            return problem
        if problem:
            return (
                f"{problem}. Download it where the Hub can be reached (`hf download {model} "
                f"--local-dir DIR`) and pass --{flag} {cls.kind}:DIR"
            )
        return None

    def view_spec(self) -> ViewSpec | None:
        """The fixed-size view this model's images become, so that the decode step can make it
        once (`LoadImages(views=...)`); None (the default) when the model takes decoded images.
        Called on the workers: it may read the model's processor config."""
        return None

    def get_num_bytes(self, batch: Sequence[ExampleT]) -> int:
        """Pixel bytes, counted rather than pickled (Beam's default pickles every batch)."""
        return sum(_pixel_bytes(image_of(example)) for example in batch)

    def get_metrics_namespace(self) -> str:
        return f"captionflow_{self.kind}"


STICKY_DEVICE_ERRORS = (
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
)


def is_sticky_device_error(error: BaseException) -> bool:
    """A CUDA error after which the process's device context is unusable (torch raises
    `AcceleratorError` for these since 2.8; older versions a `RuntimeError` saying so)."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(error, accelerator_error) or any(
        text in str(error) for text in STICKY_DEVICE_ERRORS
    )


def _failure(error: Exception) -> InferenceFailure:
    return InferenceFailure(
        type(error).__name__, str(error) or repr(error), getattr(error, "stage", None)
    )


def image_of(example: Any) -> ModelImage:
    """The image of an example: a captioner's is one, a ranker's is `(image, candidates)`."""
    return example[0] if isinstance(example, tuple) else example


def _pixel_bytes(image: ModelImage) -> int:
    return image.nbytes if isinstance(image, ImageViews) else image.width * image.height * 3


class CaptionModelHandler(IsolatingModelHandler[ModelImage, list[str], Captioner]):
    """Base for captioners: images in, a list of distinct candidate captions per image out."""

    batch_size = 8

    def __init__(
        self,
        model: str | None = None,
        *,
        decoding: DecodingOptions | None = None,
        rules: CandidateRules | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.decoding = decoding or DecodingOptions()
        self.rules = rules or CandidateRules()  # applied to the candidates before ranking

    @abstractmethod
    def load_model(self) -> Captioner: ...

    def predict(self, model: Captioner, batch: Sequence[ModelImage]) -> list[list[str]]:
        return [self.rules.clean(texts) for texts in model.caption(model_batch(batch))]


class RankModelHandler(IsolatingModelHandler[RankExample, list[ScoredCaption], Ranker]):
    """Base for rankers: (image, candidates) in, scored candidates best first out."""

    scores: bool = True  # False: it keeps the captioner's order and scores nothing
    batch_size = 32

    @abstractmethod
    def load_model(self) -> Ranker: ...

    def predict(self, model: Ranker, batch: Sequence[RankExample]) -> list[list[ScoredCaption]]:
        images, candidates = zip(*batch, strict=True)
        return model.rank(model_batch(images), [list(texts) for texts in candidates])
