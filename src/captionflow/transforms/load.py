"""Reading and decoding each image exactly once, right where it will be captioned."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import PCollection
from PIL import Image

from captionflow.files import ReadError, open_image_file
from captionflow.images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    decode_image,
    limit_pillow_pixels,
)
from captionflow.records import ErrorRecord
from captionflow.transforms.errors import ERRORS, NAMESPACE, error_output
from captionflow.views import ImageViews, ViewSpec, covering_size, make_views

IMAGES = "images"


ViewSource = Callable[[], ViewSpec | None]


class _LoadImage(beam.DoFn):
    def __init__(
        self, max_side: int, max_pixels: int, max_bytes: int, views: Sequence[ViewSource]
    ) -> None:
        self.max_side = max_side
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.views = tuple(views)
        self.decoded = Metrics.counter(NAMESPACE, "images_decoded")

    def setup(self) -> None:
        limit_pillow_pixels(self.max_pixels)
        specs = [view() for view in self.views]
        self.specs = specs if specs and None not in specs else None
        # With views, JPEGs are decoded no larger than the views need; else as pictures.
        self.cover = covering_size(self.specs) if self.specs else None

    def process(
        self, uri: str
    ) -> Iterator[tuple[str, Image.Image | ImageViews] | beam.pvalue.TaggedOutput]:
        try:
            file = open_image_file(uri, self.max_bytes)
        except Exception as error:
            yield error_output(ErrorRecord.from_exception(uri, "read", error))
            return
        # The file is streamed into the decoder: reading can still fail (or grow past the cap)
        # while decoding, and is then reported as the read error that it is.
        with file:
            try:
                image = decode_image(
                    file,
                    max_side=self.max_side,
                    max_pixels=self.max_pixels,
                    cover=self.cover,
                    name=uri,
                )
            except Exception as error:
                stage = "read" if isinstance(error, ReadError) else "decode"
                yield error_output(ErrorRecord.from_exception(uri, stage, error))
                return
        self.decoded.inc()
        yield uri, make_views(image, self.specs) if self.specs else image


class LoadImages(beam.PTransform):
    """Image URIs to `(uri, image)` on the `images` output; failures on `errors`.

    Images are never shuffled: they flow straight into the captioner on the same worker. Only
    regular files of at most `max_bytes` are read; images announcing more than `max_pixels`
    are refused from their header.

    `views` names, for each model downstream, where to get the view it takes (a handler's
    `view_spec`, asked on the worker). When every model has one, each image leaves as its
    `ImageViews`, made here once and shared by the models, from a JPEG decoded at the smallest
    scale that covers them all (`covering_size`); else as the decoded RGB picture, shrunk to
    `max_side` (as are the pixels for views that crop without resizing).
    """

    def __init__(
        self,
        *,
        max_side: int = DEFAULT_MAX_SIDE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        views: Sequence[ViewSource] = (),
    ) -> None:
        super().__init__()
        self.max_side = max_side
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.views = views

    def expand(self, uris: PCollection[str]) -> beam.pvalue.DoOutputsTuple:
        return uris | "Decode" >> beam.ParDo(
            _LoadImage(self.max_side, self.max_pixels, self.max_bytes, self.views)
        ).with_outputs(ERRORS, main=IMAGES)
