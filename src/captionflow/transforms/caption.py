"""The whole captioning step as one transform, for use inside any Beam pipeline."""

from __future__ import annotations

import copy
from typing import NamedTuple

import apache_beam as beam
from apache_beam.pvalue import PCollection

from captionflow.engine import EngineMode
from captionflow.handlers.base import CaptionModelHandler, RankModelHandler
from captionflow.handlers.captionrank import CaptionRankHandler
from captionflow.handlers.registry import captioner_handler, ranker_handler
from captionflow.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE
from captionflow.records import CaptionRecord
from captionflow.transforms.errors import ERRORS, ErrorRecords
from captionflow.transforms.inference import CAPTIONS, CaptionAndRank
from captionflow.transforms.load import IMAGES, LoadImages


class CaptionOutputs(NamedTuple):
    """What `CaptionImages` returns: one `CaptionRecord` or one `ErrorRecord` per input URI
    (`errors`: one collection; with `with_errors_apart()`, the decode step's and the
    inference step's)."""

    captions: PCollection[CaptionRecord]
    errors: ErrorRecords


class CaptionImages(beam.PTransform):
    """Image URIs in; the best caption of each image, with its scored candidates, out.

        captions, errors = uris | CaptionImages(captioner_handler("blip"), ranker_handler("clip"))

    Each image is read and decoded once into the views its models take (when they say which:
    `view_spec`), captioned in batches, ranked in batches, and never shuffled. A failing image
    becomes an `ErrorRecord` with its stage and reason.

    `.with_errors_apart()` returns each step's error records as they are made, not
    flattened into one collection: for writers that take them so (`WriteErrors`), since a
    local runner holds a Flatten's whole output.
    """

    def __init__(
        self,
        captioner: CaptionModelHandler | None = None,
        ranker: RankModelHandler | None = None,
        *,
        max_side: int = DEFAULT_MAX_SIDE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        engine: EngineMode = "auto",
        engine_batch_size: int = 256,
        engines: int | None = None,
    ) -> None:
        super().__init__()
        self.captioner = captioner or captioner_handler()
        self.ranker = ranker or ranker_handler()
        self.engine = CaptionRankHandler(
            self.captioner,
            self.ranker,
            engine_batch_size=engine_batch_size,
            engine=engine,
            engines=engines,
        )
        self.max_side = max_side
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.errors_apart = False

    def with_errors_apart(self) -> CaptionImages:
        """This transform, returning the decode and inference steps' errors as a tuple."""
        transform = copy.copy(self)
        transform.errors_apart = True
        return transform

    def expand(self, uris: PCollection[str]) -> CaptionOutputs:
        loaded = uris | "Load" >> LoadImages(
            max_side=self.max_side,
            max_pixels=self.max_pixels,
            max_bytes=self.max_bytes,
            views=tuple(
                handler.view_spec
                for handler in (self.captioner, self.ranker)
                if handler.takes_images
            ),
        )
        ranked = loaded[IMAGES] | "CaptionAndRank" >> CaptionAndRank(self.engine)
        errors = loaded[ERRORS], ranked[ERRORS]
        if self.errors_apart:
            return CaptionOutputs(ranked[CAPTIONS], errors)
        return CaptionOutputs(ranked[CAPTIONS], errors | "Errors" >> beam.Flatten())
