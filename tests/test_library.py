"""captionflow as a library: its transforms composed inside someone else's pipeline."""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import pytest
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


def test_the_readmes_library_names_import_from_where_it_says() -> None:
    import importlib

    documented = {
        "captionflow": ["CaptionImages", "ReadImagePaths", "WriteMetadata", "captioner_handler"],
        "captionflow.transforms": [
            "ReadImagePaths", "LoadImages", "GenerateCaptions", "RankCaptions",
            "CaptionAndRank", "CaptionImages", "WriteMetadata", "WriteErrors",
            "WriteJsonLines", "WriteSidecars",
        ],
        "captionflow.handlers": ["CaptionRankHandler", "DecodingOptions", "register_captioner"],
        "captionflow.engine": ["Engine", "EngineSpec", "EngineClient"],
    }  # fmt: skip
    for module, names in documented.items():
        missing = [n for n in names if not hasattr(importlib.import_module(module), n)]
        assert missing == [], module


def test_split_by_score_refuses_records_without_scores_by_name() -> None:
    """A ranker that scores nothing (`none`) leaves `score` None: nothing to split by."""
    from captionflow.records import CaptionRecord
    from captionflow.transforms.scores import SplitByScore

    record = CaptionRecord("a.jpg", "a cat", None, (), "blip", "none")
    needs = r"SplitByScore needs scores: a\.jpg has none"
    with pytest.raises(Exception, match=needs), TestPipeline(runner="FnApiRunner") as p:
        _ = p | beam.Create([record]) | SplitByScore(0.1)


def test_an_unknown_engine_mode_is_refused_when_the_transform_is_made(
    tiny_blip: str, tiny_clip: str
) -> None:
    with pytest.raises(ValueError, match="engine: 'off' is not one of auto, local, shared"):
        CaptionImages(
            captioner_handler(f"blip:{tiny_blip}"),
            ranker_handler(f"clip:{tiny_clip}"),
            engine="off",
        )
