"""RunInference steps: candidates from a captioner, then their order from a ranker.

These transforms see only the handler interface (`CaptionModelHandler`, `RankModelHandler`),
so any registered captioner or ranker plugs in unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference
from apache_beam.pvalue import PCollection

from captionflow.handlers.base import (
    CaptionModelHandler,
    InferenceFailure,
    ModelImage,
    RankModelHandler,
    image_of,
)
from captionflow.handlers.captionrank import CaptionRankHandler
from captionflow.images import shown_size
from captionflow.records import CaptionCandidates, CaptionRecord, ErrorRecord
from captionflow.transforms.errors import ERRORS, NAMESPACE, error_output
from captionflow.views import ImageViews

CANDIDATES = "candidates"
NO_CAPTION = (
    "no caption left: the captioner wrote none, or the candidate rules "
    "(--remove-pattern, --min-words) dropped them all"
)
CAPTIONS = "captions"


def _failed(uri: str, stage: str, inference: Any) -> ErrorRecord | None:
    if isinstance(inference, InferenceFailure):
        return ErrorRecord(uri, inference.stage or stage, inference.error_type, inference.message)
    if not inference:
        return ErrorRecord(uri, stage, "NoCaption", NO_CAPTION)
    return None


def _to_candidates(
    keyed: tuple[str, PredictionResult], captioner: str
) -> Iterator[CaptionCandidates | beam.pvalue.TaggedOutput]:
    uri, result = keyed
    if failure := _failed(uri, "caption", result.inference):
        yield error_output(failure)
    else:
        yield CaptionCandidates(uri, result.example, tuple(result.inference), captioner)


def original_size(image: ModelImage) -> tuple[int, int]:
    """(width, height) of the image as shown at full size, whether views or a picture."""
    return image.original_size if isinstance(image, ImageViews) else shown_size(image)


class GenerateCaptions(beam.PTransform):
    """`(uri, image)` (a picture, or its `ImageViews`) to `CaptionCandidates` on `candidates`;
    failed images on `errors`."""

    def __init__(self, handler: CaptionModelHandler) -> None:
        super().__init__()
        self.handler = handler

    def expand(self, images: PCollection[tuple[str, ModelImage]]) -> beam.pvalue.DoOutputsTuple:
        return (
            images
            | "Caption" >> RunInference(KeyedModelHandler(self.handler))
            | "Candidates"
            >> beam.ParDo(_to_candidates, self.handler.name).with_outputs(ERRORS, main=CANDIDATES)
        )


class _ToRecord(beam.DoFn):
    """A ranked prediction to its `CaptionRecord`; with `captioner` set, the prediction is an
    engine's (captioned and ranked in one call), where no candidate is a caption failure."""

    def __init__(self, ranker: str, captioner: str | None = None) -> None:
        self.ranker = ranker
        self.captioner = captioner
        self.captioned = Metrics.counter(NAMESPACE, "images_captioned")

    def process(
        self, keyed: tuple[tuple[str, str] | str, PredictionResult]
    ) -> Iterator[CaptionRecord | beam.pvalue.TaggedOutput]:
        key, result = keyed
        uri, captioner = (key, self.captioner) if isinstance(key, str) else key
        stage = "caption" if self.captioner and not result.inference else "rank"
        if failure := _failed(uri, stage, result.inference):
            yield error_output(failure)
            return
        best = result.inference[0]
        self.captioned.inc()
        width, height = original_size(image_of(result.example))
        yield CaptionRecord(
            uri,
            best.text,
            best.score,
            tuple(result.inference),
            captioner,
            self.ranker,
            width,
            height,
        )


class RankCaptions(beam.PTransform):
    """`CaptionCandidates` to `CaptionRecord` (best caption first) on `captions`; failures on
    `errors`."""

    def __init__(self, handler: RankModelHandler) -> None:
        super().__init__()
        self.handler = handler

    def expand(self, candidates: PCollection[CaptionCandidates]) -> beam.pvalue.DoOutputsTuple:
        return (
            candidates
            | "Key" >> beam.Map(lambda c: ((c.image_uri, c.captioner), (c.image, c.texts)))
            | "Rank" >> RunInference(KeyedModelHandler(self.handler))
            | "Records"
            >> beam.ParDo(_ToRecord(self.handler.name)).with_outputs(ERRORS, main=CAPTIONS)
        )


class CaptionAndRank(beam.PTransform):
    """`(uri, image)` to `CaptionRecord` on `captions`, captioned and ranked in one call to
    the machine's model engine (`CaptionRankHandler`); failures on `errors`, with the stage
    that failed. The same records as `GenerateCaptions` then `RankCaptions`, in one batching
    pass and one crossing to the engine per batch."""

    def __init__(self, handler: CaptionRankHandler) -> None:
        super().__init__()
        self.handler = handler

    def expand(self, images: PCollection[tuple[str, ModelImage]]) -> beam.pvalue.DoOutputsTuple:
        spec = self.handler.spec
        return (
            images
            | "CaptionAndRank" >> RunInference(KeyedModelHandler(self.handler))
            | "Records"
            >> beam.ParDo(_ToRecord(spec.ranker.name, spec.captioner.name)).with_outputs(
                ERRORS, main=CAPTIONS
            )
        )
