"""Each transform on its own, in a real Beam pipeline on the FnApiRunner."""

from __future__ import annotations

import codecs
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from captionflow import CaptionImages, LoadImages, ReadImagePaths, WriteMetadata
from captionflow.handlers import BlipCaptionHandler, ClipRankHandler, DecodingOptions
from captionflow.listfile import list_lines
from captionflow.records import CaptionRecord, ErrorRecord, ScoredCaption
from captionflow.transforms.write import WriteJsonLines, parts_dir
from captionflow.views import ViewSpec
from tests.conftest import image_like_zoo, write_images


def run_pipeline(build: Callable[[beam.Pipeline], object]) -> None:
    with TestPipeline(runner="FnApiRunner") as pipeline:
        build(pipeline)


def test_read_paths_from_a_list_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    listing = tmp_path / "dataset.txt"
    listing.write_text(
        "# my images\n\n/abs/one.jpg\nsub/two.png\n  sub/two.png  \ngs://bucket/three.jpg\n"
    )
    expected = ["/abs/one.jpg", str(tmp_path / "sub" / "two.png"), "gs://bucket/three.jpg"]
    run_pipeline(lambda p: assert_that(p | ReadImagePaths(str(listing)), equal_to(expected)))


@pytest.mark.parametrize(
    ("encoding", "bom"),
    [
        ("utf-8", b""),
        ("utf-8", codecs.BOM_UTF8),
        ("utf-16-le", codecs.BOM_UTF16_LE),
        ("utf-16-be", codecs.BOM_UTF16_BE),
    ],
)
def test_list_files_in_utf8_with_or_without_bom_and_in_utf16(
    tmp_path: Path, encoding: str, bom: bytes
) -> None:
    """PowerShell's `>` writes UTF-16 LE with a BOM and CRLF; Notepad may add a UTF-8 BOM."""
    names = ["été.jpg", "猫.png", "a\u2028b\u0085c\u2029.jpg", "x\x1cy.jpg"]  # no line breaks
    listing = tmp_path / "dataset.txt"
    listing.write_bytes(bom + "".join(f"{name}\r\n" for name in names).encode(encoding))
    expected = [str(tmp_path / name) for name in names]
    run_pipeline(lambda p: assert_that(p | ReadImagePaths(str(listing)), equal_to(expected)))


def test_an_undecodable_list_line_is_an_error_record_not_a_failed_job(tmp_path: Path) -> None:
    listing = tmp_path / "dataset.txt"
    listing.write_bytes(b"good.jpg\ncaf\xe9.jpg\n# caf\xe9 comments are fine\nother.jpg\n")

    def build(p: beam.Pipeline) -> None:
        paths, errors = p | ReadImagePaths(str(listing)).with_errors()
        assert_that(paths, equal_to([str(tmp_path / "good.jpg"), str(tmp_path / "other.jpg")]))
        expected = ErrorRecord(
            str(tmp_path / "caf\\xe9.jpg"),
            "read",
            "UndecodablePath",
            f"line 2 of {listing} is not valid UTF-8: 'caf\\xe9.jpg'; "
            "fix the list's encoding (save it as UTF-8)",
        )
        assert_that(errors, equal_to([expected]), label="errors")

    run_pipeline(build)


def test_list_lines_are_streamed_and_split_on_whole_utf16_code_units() -> None:
    """A `\\n\\0` pair across two characters (U+0A05 U+0100) is not a line break."""
    text = "\u0a05\u0100.jpg\r\nb.jpg\n\ud800.jpg\nlast.jpg"
    data = b"\xff\xfe" + text.encode("utf-16-le", "surrogatepass")
    lines = list(list_lines(io.BytesIO(data), chunk_size=3))
    assert [(line.number, line.text, line.valid) for line in lines] == [
        (1, "\u0a05\u0100.jpg", True),
        (2, "b.jpg", True),
        (3, "\\x00\\xd8.jpg", False),
        (4, "last.jpg", True),
    ]
    assert {line.encoding for line in lines} == {"UTF-16-LE"}


def test_local_paths_are_normalised_so_that_duplicates_collapse(tmp_path: Path) -> None:
    listing = tmp_path / "dataset.txt"
    listing.write_text(
        "/a/./b.jpg\n/a//b.jpg\n/a/b.jpg\n//a/b.jpg\n./c.jpg\nsub/../c.jpg\ngs://bucket/x/./y.jpg\n"
    )
    expected = ["/a/b.jpg", str(tmp_path / "c.jpg"), "gs://bucket/x/./y.jpg"]
    run_pipeline(lambda p: assert_that(p | ReadImagePaths(str(listing)), equal_to(expected)))


def test_folder_listings_are_normalised_too(tmp_path: Path) -> None:
    images = write_images(tmp_path / "pics", 2)
    pattern = f"/{tmp_path}/./pics//*.jpg"  # a leading //, a ./ and a //
    expected = [str(p) for p in images]
    run_pipeline(lambda p: assert_that(p | ReadImagePaths(pattern), equal_to(expected)))


def test_read_paths_from_a_folder_recursively_images_only(tmp_path: Path) -> None:
    top = write_images(tmp_path, 2)
    nested = write_images(tmp_path / "a" / "b", 1, suffix=".PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "metadata.jsonl").write_text("{}")
    expected = [str(p) for p in top + nested]
    run_pipeline(lambda p: assert_that(p | ReadImagePaths(str(tmp_path)), equal_to(expected)))


def test_every_file_in_a_folder_that_looks_like_an_image_gets_a_path_or_an_error(
    tmp_path: Path,
) -> None:
    paths, errors = image_like_zoo(tmp_path / "zoo")

    def build(p: beam.Pipeline) -> None:
        found, failed = p | ReadImagePaths(str(tmp_path / "zoo")).with_errors()
        assert_that(found, equal_to(paths))
        as_pairs = failed | beam.Map(lambda e: (e.image_uri, e.error_type, e.stage))
        expected = [(uri, kind, "read") for uri, kind in errors.items()]
        assert_that(as_pairs, equal_to(expected), label="errors")

    run_pipeline(build)


def test_names_that_are_not_utf8_are_error_records_in_folders_and_globs(tmp_path: Path) -> None:
    (good,) = write_images(tmp_path, 1)
    os.makedirs(os.fsencode(tmp_path) + b"/d\xe9")
    for name in [b"/caf\xe9.jpg", b"/d\xe9/x.jpg"]:
        with open(os.fsencode(tmp_path) + name, "wb") as file:
            file.write(good.read_bytes())
    bad = [f"{tmp_path}/caf\\xe9.jpg", f"{tmp_path}/d\\xe9/x.jpg"]

    def build(p: beam.Pipeline) -> None:
        for label, source in [("folder", tmp_path), ("glob", tmp_path / "**" / "*.jpg")]:
            found, failed = p | label >> ReadImagePaths(str(source)).with_errors()
            assert_that(found, equal_to([str(good)]), label=f"{label} paths")
            uris = failed | f"{label} uris" >> beam.Map(lambda e: (e.image_uri, e.error_type))
            expected = [(uri, "UndecodablePath") for uri in bad]
            assert_that(uris, equal_to(expected), label=f"{label} errors")

    run_pipeline(build)


def test_a_glob_keeps_broken_links_too(tmp_path: Path) -> None:
    (good,) = write_images(tmp_path, 1)
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")

    def build(p: beam.Pipeline) -> None:
        found, failed = p | ReadImagePaths(str(tmp_path / "*.jpg")).with_errors()
        assert_that(found, equal_to([str(good)]))
        messages = failed | beam.Map(lambda e: (e.image_uri, e.message.split(":")[0]))
        expected = (str(tmp_path / "gone.jpg"), f"broken symbolic link to {tmp_path}/nowhere.jpg")
        assert_that(messages, equal_to([expected]), label="errors")

    run_pipeline(build)


def test_a_path_is_taken_for_what_it_is_on_disk_not_for_its_name(tmp_path: Path) -> None:
    """A folder named like a list file, a folder and an image with glob characters in their
    names: what they are decides, as the user means it."""
    in_txt = write_images(tmp_path / "x.txt", 1)
    in_brackets = write_images(tmp_path / "photos[1]", 1)
    (tmp_path / "photos1").mkdir()  # what `photos[1]` would match as a glob
    image = tmp_path / "photo[1].jpg"
    image.write_bytes(in_txt[0].read_bytes())

    def build(p: beam.Pipeline) -> None:
        for label, source, expected in [
            ("txt", tmp_path / "x.txt", in_txt),
            ("brackets", tmp_path / "photos[1]", in_brackets),
            ("image", image, [image]),
        ]:
            found = p | label >> ReadImagePaths(str(source))
            assert_that(found, equal_to([str(x) for x in expected]), label=f"{label} paths")

    run_pipeline(build)


def test_read_paths_from_a_glob(tmp_path: Path) -> None:
    jpgs = write_images(tmp_path, 2)
    write_images(tmp_path / "x", 1, suffix=".png")
    pattern = str(tmp_path / "*.jpg")
    run_pipeline(
        lambda p: assert_that(p | ReadImagePaths(pattern), equal_to([str(j) for j in jpgs]))
    )


def test_limit_takes_the_first_paths_in_sorted_order(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 5)
    run_pipeline(
        lambda p: assert_that(
            p | ReadImagePaths(str(tmp_path), limit=2), equal_to([str(x) for x in paths[:2]])
        )
    )


def test_load_images_routes_failures_with_their_stage(tmp_path: Path) -> None:
    good = write_images(tmp_path, 2)
    (tmp_path / "bad.jpg").write_text("text, not a picture")
    uris = [str(g) for g in good] + [str(tmp_path / "bad.jpg"), str(tmp_path / "gone.jpg")]

    def build(p: beam.Pipeline) -> None:
        loaded = p | beam.Create(uris) | LoadImages(max_side=32)
        assert_that(
            loaded.images | beam.Map(lambda kv: (kv[0], kv[1].mode, max(kv[1].size))),
            equal_to([(str(g), "RGB", 32) for g in good]),
            label="images",
        )
        assert_that(
            loaded.errors | beam.Map(lambda e: (e.image_uri.rsplit("/", 1)[1], e.stage)),
            equal_to([("bad.jpg", "decode"), ("gone.jpg", "read")]),
            label="errors",
        )

    run_pipeline(build)


def test_caption_images_gives_one_ranked_record_per_image(
    image_dir: Path, tiny_blip: str, tiny_clip: str
) -> None:
    uris = sorted(str(p) for p in image_dir.iterdir())
    captioner = BlipCaptionHandler(tiny_blip, decoding=DecodingOptions(num_captions=3))
    ranker = ClipRankHandler(tiny_clip, max_batch_size=2)

    def check(records: list[CaptionRecord]) -> None:
        assert sorted(r.image_uri for r in records) == uris
        for record in records:
            assert record.text == record.candidates[0].text
            assert record.score == record.candidates[0].score
            scores = [c.score for c in record.candidates]
            assert scores == sorted(scores, reverse=True) and 1 <= len(scores) <= 3
            assert record.captioner == f"blip:{tiny_blip}"
            assert record.ranker == f"clip:{tiny_clip}"

    def build(p: beam.Pipeline) -> None:
        captions, errors = p | beam.Create(uris) | CaptionImages(captioner, ranker)
        assert_that(captions | beam.combiners.ToList(), lambda lists: check(lists[0]))
        assert_that(errors, equal_to([]), label="no errors")

    run_pipeline(build)


def record(uri: str, text: str = "a cat") -> CaptionRecord:
    return CaptionRecord(uri, text, 0.3, (ScoredCaption(text, 0.3, 1.0),), "blip:m", "clip:m")


def test_write_metadata_names_files_relative_to_the_output(tmp_path: Path) -> None:
    records = [record(str(tmp_path / "a" / "x.jpg")), record("gs://bucket/elsewhere.jpg")]
    run_pipeline(lambda p: p | beam.Create(records) | WriteMetadata(str(tmp_path)))
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["file_name"] for r in rows) == ["a/x.jpg", "gs://bucket/elsewhere.jpg"]
    assert rows[0]["candidates"] == [{"text": "a cat", "score": 0.3, "probability": 1.0}]
    assert {"text", "score", "image_uri", "captioner", "ranker"} <= set(rows[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.jsonl"]


def test_write_json_lines_makes_one_file_even_with_no_input(tmp_path: Path) -> None:
    destination = tmp_path / "out.jsonl"
    run_pipeline(lambda p: p | beam.Create([]) | WriteJsonLines(str(destination), key="k"))
    assert destination.read_text() == ""
    assert not Path(parts_dir(str(destination))).exists()


@pytest.mark.parametrize("count", [1, 25])
def test_write_json_lines_keeps_every_line(tmp_path: Path, count: int) -> None:
    rows = [{"k": str(i), "text": "ünïcode ✓"} for i in range(count)]
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    destination = tmp_path / "out.jsonl"
    run_pipeline(lambda p: p | beam.Create(lines) | WriteJsonLines(str(destination), key="k"))
    assert sorted(destination.read_text(encoding="utf-8").splitlines()) == sorted(lines)


def test_counters_and_progress_log_count_the_images(
    image_dir: Path, tiny_blip: str, tiny_clip: str, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from apache_beam.metrics.metric import MetricsFilter

    from captionflow.transforms import LogProgress

    uris = [*sorted(str(p) for p in image_dir.iterdir()), str(image_dir / "missing.jpg")]
    pipeline = TestPipeline(runner="FnApiRunner")
    captions, _ = (
        pipeline
        | beam.Create(uris)
        | CaptionImages(BlipCaptionHandler(tiny_blip), ClipRankHandler(tiny_clip))
    )
    _ = captions | LogProgress(every_secs=0)
    with caplog.at_level(logging.INFO, logger="captionflow"):
        result = pipeline.run()
        result.wait_until_finish()
    counters = {
        c.key.metric.name: c.committed
        for c in result.metrics().query(MetricsFilter().with_namespace("captionflow"))["counters"]
    }
    assert counters["images_decoded"] == 4 and counters["images_captioned"] == 4
    assert counters["errors_read"] == 1 and counters["errors_FileNotFoundError"] == 1
    assert "captioned 4 images on this worker" in caplog.text


def test_a_double_star_glob_matches_zero_or_more_folders_like_pythons_glob(tmp_path: Path) -> None:
    (top,) = write_images(tmp_path, 1)
    (nested,) = write_images(tmp_path / "sub", 1)
    (deep,) = write_images(tmp_path / "sub" / "deeper", 1)
    pattern = str(tmp_path / "**" / "*.jpg")
    expected = [str(top), str(nested), str(deep)]
    run_pipeline(lambda p: assert_that(p | ReadImagePaths(pattern), equal_to(expected)))


def test_load_images_makes_each_models_view_once_where_it_decodes(
    image_dir: Path, tiny_blip: str, tiny_clip: str
) -> None:
    from captionflow.views import ImageViews

    captioner, ranker = BlipCaptionHandler(tiny_blip), ClipRankHandler(tiny_clip)
    specs = {captioner.view_spec(), ranker.view_spec()}
    assert None not in specs and len(specs) == 2  # squash vs shortest edge + crop
    uris = sorted(str(p) for p in image_dir.iterdir())

    def check(loaded: list[tuple[str, ImageViews]]) -> None:
        assert sorted(uri for uri, _ in loaded) == uris
        for _, views in loaded:
            assert isinstance(views, ImageViews) and set(views.views) == specs
            assert all(
                v.shape == (*s.size, 3) and v.dtype == "uint8" for s, v in views.views.items()
            )

    def build(p: beam.Pipeline) -> None:
        loaded = p | beam.Create(uris) | LoadImages(views=(captioner.view_spec, ranker.view_spec))
        assert_that(loaded.images | beam.combiners.ToList(), lambda lists: check(lists[0]))

    run_pipeline(build)


def blip_view() -> ViewSpec:
    return ViewSpec((384, 384), "squash", squash_size=(384, 384))


def clip_view() -> ViewSpec:
    return ViewSpec((224, 224), "shortest_edge", shortest_edge=224, center_crop=True)


def test_load_images_decodes_a_big_jpeg_no_larger_than_its_views_need(tmp_path: Path) -> None:
    """4000x3000 at 1/4 covers BLIP's 384x384 (1/8, 500x375, would not); a picture is
    shrunk to `max_side` as before."""
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (90, 120, 150)).save(path)

    def build(p: beam.Pipeline) -> None:
        uris = p | beam.Create([str(path)])
        views = uris | "Views" >> LoadImages(views=(blip_view, clip_view))
        pictures = uris | "Pictures" >> LoadImages()
        sizes = views.images | "ViewsSize" >> beam.Map(lambda kv: kv[1].size)
        assert_that(sizes, equal_to([(1000, 750)]), label="views")
        sizes = pictures.images | "PicturesSize" >> beam.Map(lambda kv: kv[1].size)
        assert_that(sizes, equal_to([(768, 576)]), label="pictures")

    run_pipeline(build)


@pytest.mark.parametrize("engine", ["local", "shared"])
def test_views_and_pictures_give_the_same_records(
    image_dir: Path, tiny_blip: str, tiny_clip: str, engine: str
) -> None:
    """`CaptionImages` ships views made at decode time to a model engine (in this process, or
    in one of its own) that captions and ranks in one call; the steps composed by hand on
    decoded pictures (the library route, any handler) must caption and rank identically."""
    from captionflow import GenerateCaptions, RankCaptions

    uris = sorted(str(p) for p in image_dir.iterdir())
    decoding = DecodingOptions(strategy="beam", num_captions=3)
    captioner = BlipCaptionHandler(tiny_blip, decoding=decoding, max_batch_size=2)
    ranker = ClipRankHandler(tiny_clip, max_batch_size=3)

    def as_tuples(record: CaptionRecord) -> tuple:  # tied scores in either order
        scored = sorted((-round(c.score, 5), c.text) for c in record.candidates)
        return (record.image_uri, tuple((text, -score) for score, text in scored))

    with TestPipeline(runner="FnApiRunner") as p:
        via_views, _ = (
            p | "Uris" >> beam.Create(uris) | CaptionImages(captioner, ranker, engine=engine)
        )
        loaded = p | "Again" >> beam.Create(uris) | "Pictures" >> LoadImages()
        candidates = loaded.images | GenerateCaptions(captioner)
        via_pictures = candidates.candidates | RankCaptions(ranker)
        tagged = (
            via_views | "V" >> beam.Map(lambda r: ("views", as_tuples(r))),
            via_pictures.captions | "P" >> beam.Map(lambda r: ("pictures", as_tuples(r))),
        )
        assert_that(
            tagged | beam.Flatten() | beam.combiners.ToList(),
            lambda lists: _same_records(lists[0]),
        )


def _all_labels(pipeline: beam.Pipeline) -> list[str]:
    labels: list[str] = []

    class Visitor(beam.pipeline.PipelineVisitor):
        def enter_composite_transform(self, node: beam.pipeline.AppliedPTransform) -> None:
            labels.append(node.full_label)

        def visit_transform(self, node: beam.pipeline.AppliedPTransform) -> None:
            labels.append(node.full_label)

    pipeline.visit(Visitor())
    return labels


def _same_records(tagged: list[tuple[str, tuple]]) -> None:
    routes: dict[str, list] = {"views": [], "pictures": []}
    for route, record in tagged:
        routes[route].append(record)
    assert len(routes["views"]) == 4 and sorted(routes["views"]) == sorted(routes["pictures"])


def test_sidecar_paths_replace_only_the_images_extension() -> None:
    from captionflow.transforms.sidecars import sidecar_path

    assert sidecar_path("/d/a.b.jpg", ".txt") == "/d/a.b.txt"
    assert sidecar_path("gs://bucket/x/photo.PNG", ".caption") == "gs://bucket/x/photo.caption"
    assert sidecar_path("/d/no_extension", ".txt") == "/d/no_extension.txt"


def test_write_sidecars_composes_in_a_pipeline_and_passes_records_on(tmp_path: Path) -> None:
    from captionflow.transforms import WriteSidecars

    (tmp_path / "kept.txt").write_text("theirs\n")
    candidate = ScoredCaption("a dog", 0.3, 1.0)
    records = [
        CaptionRecord(str(tmp_path / name), "a dog", 0.3, (candidate,), "c", "r")
        for name in ("new.jpg", "kept.png")
    ]
    with TestPipeline(runner="FnApiRunner") as pipeline:
        passed = (
            pipeline
            | beam.Create(records)
            | WriteSidecars()
            | beam.Map(lambda record: record.image_uri)
        )
        assert_that(passed, equal_to([record.image_uri for record in records]))
    assert (tmp_path / "new.txt").read_text() == "a dog\n"
    assert (tmp_path / "kept.txt").read_text() == "theirs\n"


@pytest.mark.parametrize("spread", [True, False])
@pytest.mark.parametrize("kind", ["parquet", "webdataset"])
def test_write_shards_composes_in_a_pipeline(tmp_path: Path, kind: str, spread: bool) -> None:
    import tarfile

    import pyarrow.parquet as pq

    from captionflow.transforms.shards import WriteShards

    images = write_images(tmp_path / "photos", 3)
    stale = tmp_path / (".data.tmp-killed" if kind == "parquet" else ".shards.tmp-killed")
    stale.mkdir()
    (stale / "half-written").write_bytes(b"left by a killed run")
    rows = [
        {"file_name": f"photos/{p.name}", "image_uri": str(p), "text": f"caption {i}"}
        for i, p in enumerate(images)
    ]
    with TestPipeline(runner="FnApiRunner") as pipeline:
        write = WriteShards(str(tmp_path), kind, rows_per_shard=2, spread=spread)
        shards = pipeline | beam.Create(rows) | write
        assert_that(shards | beam.Map(len), equal_to([2]))
        # Not spread, the rows never cross a shuffle (a local runner would hold them all).
        assert any("Spread" in label for label in _all_labels(pipeline)) == spread
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # a killed run's too
    if kind == "parquet":
        table = pq.read_table(tmp_path / "data")
        assert sorted(table["text"].to_pylist()) == [f"caption {i}" for i in range(3)]
        assert table["width"].to_pylist() == [None] * 3  # fields a row lacks are null
    else:
        texts = []
        for shard in sorted((tmp_path / "shards").glob("*.tar")):
            with tarfile.open(shard) as tar:
                texts += [
                    tar.extractfile(member).read().decode()
                    for member in tar.getmembers()
                    if member.name.endswith(".txt")
                ]
        assert sorted(texts) == [f"caption {i}" for i in range(3)]


def _read_shards(output: Path, kind: str) -> list[dict]:
    """Every row of the shards of `kind` under `output`, read back with the real readers:
    pyarrow for parquet, webdataset for tars (each sample's record, its `jpg` bytes added)."""
    import pyarrow.parquet as pq
    import webdataset

    if kind == "parquet":
        folder = output / "data"
        return pq.read_table(folder).to_pylist() if list(folder.glob("*.parquet")) else []
    shards = [str(p) for p in sorted((output / "shards").glob("*.tar"))]
    samples = webdataset.WebDataset(shards, shardshuffle=False) if shards else []
    return [{**json.loads(s["json"]), "jpg": s["jpg"]} for s in samples]


def _write_shards_expecting(
    rows: list[dict],
    output: Path,
    kind: str,
    spread: bool,
    left_out: dict[str, str],
    **options: int,
) -> int:
    """Runs `WriteShards(...).with_errors()`, asserting that the images left out are
    `left_out` (URI: error type), at stage `kind`, with a message; returns their counter."""
    from apache_beam.metrics.metric import MetricsFilter

    from captionflow.transforms.shards import WriteShards

    pipeline = TestPipeline(runner="FnApiRunner")
    write = WriteShards(str(output), kind, rows_per_shard=2, spread=spread, **options)
    write = write.with_errors()
    _, errors = pipeline | beam.Create(rows) | write
    found = errors | beam.Map(lambda e: (e.image_uri, e.stage, e.error_type, bool(e.message)))
    assert_that(found, equal_to([(uri, kind, kind_, True) for uri, kind_ in left_out.items()]))
    result = pipeline.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_name(f"{kind}_images_left_out"))
    return sum(counter.committed for counter in counters["counters"])


@pytest.mark.parametrize("spread", [True, False])
@pytest.mark.parametrize("kind", ["parquet", "webdataset"])
def test_write_shards_leaves_out_images_that_cannot_be_read_and_writes_the_rest(
    tmp_path: Path, kind: str, spread: bool
) -> None:
    """A deleted image, a folder where it was, and (for webdataset, which decodes to make
    JPEGs) text named `.png`: each left out of its shard, reported, counted; the rest written."""
    images = write_images(tmp_path / "photos", 5)
    images[1].unlink()
    images[2].unlink()
    images[2].mkdir()
    text = tmp_path / "photos" / "note.png"
    text.write_bytes(b"not an image at all")
    uris = [*map(str, images), str(text)]
    rows = [{"file_name": Path(u).name, "image_uri": u, "text": f"caption {u}"} for u in uris]

    bad = {str(images[1]): "FileNotFoundError", str(images[2]): "NotRegularFileError"}
    if kind == "webdataset":
        bad[str(text)] = "UnidentifiedImageError"

    assert _write_shards_expecting(rows, tmp_path, kind, spread, bad) == len(bad)
    written = _read_shards(tmp_path, kind)
    assert sorted(r["image_uri"] for r in written) == sorted(set(uris) - set(bad))
    for row in written:
        data = row["image"]["bytes"] if kind == "parquet" else row["jpg"]
        assert data == Path(row["image_uri"]).read_bytes()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("kind", ["parquet", "webdataset"])
def test_write_shards_reads_no_image_past_max_bytes(tmp_path: Path, kind: str) -> None:
    """The run's `--max-bytes` (not a cap of its own): a bigger file is left out, unread."""
    small, big = write_images(tmp_path / "photos", 2)
    big.write_bytes(big.read_bytes() + bytes(4096))  # a JPEG with trailing bytes
    rows = [{"file_name": p.name, "image_uri": str(p), "text": "x"} for p in (small, big)]
    options = {"max_bytes": small.stat().st_size + 1}
    too_large = {str(big): "FileTooLargeError"}
    assert _write_shards_expecting(rows, tmp_path, kind, False, too_large, **options) == 1
    assert [r["image_uri"] for r in _read_shards(tmp_path, kind)] == [str(small)]


@pytest.mark.parametrize("kind", ["parquet", "webdataset"])
def test_write_shards_of_images_that_all_fail_writes_no_empty_shard(
    tmp_path: Path, kind: str
) -> None:
    """No shard of zero rows, and an earlier export's shards replaced by none."""
    folder = tmp_path / ("data" if kind == "parquet" else "shards")
    folder.mkdir()
    (folder / ("train-00000-of-00001.parquet" if kind == "parquet" else "00000.tar")).touch()
    rows = [
        {"file_name": f"gone_{i}.jpg", "image_uri": str(tmp_path / f"gone_{i}.jpg"), "text": "x"}
        for i in range(3)
    ]
    gone = {row["image_uri"]: "FileNotFoundError" for row in rows}
    assert _write_shards_expecting(rows, tmp_path, kind, False, gone) == 3
    assert list(folder.iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
