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


def test_errors_taken_apart_are_written_each_where_it_is_made(
    image_dir: Path, tiny_blip: str, tiny_clip: str, tmp_path: Path
) -> None:
    """`with_errors_apart()`: the decode and inference steps' error records as a tuple, which
    `WriteErrors` writes without flattening them (a local runner would hold the Flatten)."""
    import json

    from captionflow.transforms import WriteErrors

    uris = [str(path) for path in sorted(image_dir.iterdir())] + [str(image_dir / "gone.jpg")]
    with TestPipeline(runner="FnApiRunner") as p:
        captions, errors = (
            p
            | beam.Create(uris)
            | CaptionImages(
                captioner_handler(f"blip:{tiny_blip}", max_batch_size=4),
                ranker_handler(f"clip:{tiny_clip}"),
            ).with_errors_apart()
        )
        assert isinstance(errors, tuple) and len(errors) == 2
        _ = errors | WriteErrors(str(tmp_path))
        assert_that(captions | beam.combiners.Count.Globally(), equal_to([len(uris) - 1]))
    (line,) = (tmp_path / "errors.jsonl").read_text().splitlines()
    assert json.loads(line)["image_uri"] == uris[-1]
