"""captionflow as a library: its transforms composed inside someone else's pipeline."""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from captionflow import CaptionImages, captioner_handler, ranker_handler


def test_caption_images_inside_another_pipeline(
    image_dir: Path, tiny_blip: str, tiny_clip: str
) -> None:
    """A user's own pipeline: rows with ids and paths in, captions joined back by path."""
    rows = [{"id": i, "path": str(p)} for i, p in enumerate(sorted(image_dir.iterdir()))]
    rows.append({"id": 99, "path": str(image_dir / "missing.jpg")})

    with TestPipeline(runner="FnApiRunner") as p:
        keyed = p | "Rows" >> beam.Create(rows) | beam.Map(lambda r: (r["path"], r["id"]))
        captions, errors = (
            keyed
            | beam.Keys()
            | CaptionImages(
                captioner_handler(f"blip:{tiny_blip}", max_batch_size=4),
                ranker_handler(f"clip:{tiny_clip}"),
            )
        )
        texts = captions | beam.Map(lambda r: (r.image_uri, r.text))
        joined = (
            {"id": keyed, "text": texts}
            | beam.CoGroupByKey()
            | beam.MapTuple(lambda path, g: (g["id"][0], bool(g["text"] and g["text"][0])))
        )
        assert_that(joined, equal_to([(r["id"], r["id"] != 99) for r in rows]))
        assert_that(
            errors | beam.Map(lambda e: (e.image_uri, e.stage)),
            equal_to([(str(image_dir / "missing.jpg"), "read")]),
            label="errors",
        )
