"""Reading and decoding each image exactly once, right where it will be captioned."""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.pvalue import PCollection
from PIL import Image

from captionflow.images import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, decode_image
from captionflow.records import ErrorRecord
from captionflow.transforms.errors import ERRORS, NAMESPACE, error_output

IMAGES = "images"


class _LoadImage(beam.DoFn):
    def __init__(self, max_side: int, max_pixels: int) -> None:
        self.max_side = max_side
        self.max_pixels = max_pixels
        self.decoded = Metrics.counter(NAMESPACE, "images_decoded")

    def process(self, uri: str) -> Iterator[tuple[str, Image.Image] | beam.pvalue.TaggedOutput]:
        try:
            with FileSystems.open(uri, compression_type="uncompressed") as file:
                data = file.read()
        except Exception as error:
            yield error_output(ErrorRecord.from_exception(uri, "read", error))
            return
        try:
            image = decode_image(data, max_side=self.max_side, max_pixels=self.max_pixels)
        except Exception as error:
            yield error_output(ErrorRecord.from_exception(uri, "decode", error))
            return
        self.decoded.inc()
        yield uri, image


class LoadImages(beam.PTransform):
    """Image URIs to `(uri, RGB image)` on the `images` output; failures on `errors`.

    Images are shrunk to `max_side` as they are decoded and are never shuffled: they flow
    straight into the captioner on the same worker.
    """

    def __init__(
        self, *, max_side: int = DEFAULT_MAX_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        super().__init__()
        self.max_side = max_side
        self.max_pixels = max_pixels

    def expand(self, uris: PCollection[str]) -> beam.pvalue.DoOutputsTuple:
        return uris | "Decode" >> beam.ParDo(
            _LoadImage(self.max_side, self.max_pixels)
        ).with_outputs(ERRORS, main=IMAGES)
