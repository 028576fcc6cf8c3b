"""gs:// input and output through Beam's own GCS filesystem, against a local emulator."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from captionflow.cli import main
from tests.conftest import random_image
from tests.gcs import BUCKET, gcs_emulator, storage_client, use_emulator


@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    with gcs_emulator() as address:
        use_emulator(monkeypatch, address)
        yield storage_client().bucket(BUCKET)


def upload_image(bucket: object, name: str, seed: int) -> None:
    buffer = io.BytesIO()
    random_image(48, 40, seed=seed).save(buffer, "JPEG")
    bucket.blob(name).upload_from_string(buffer.getvalue(), content_type="image/jpeg")


def test_caption_a_gcs_folder_into_a_single_gcs_metadata_file(
    gcs: object, tiny_models: tuple[str, str]
) -> None:
    for i in range(3):
        upload_image(gcs, f"photos/sub/img {i}.jpg", seed=i)
    gcs.blob("photos/broken.jpg").upload_from_string(b"nope")
    gcs.blob("photos/notes.txt").upload_from_string(b"not an image")
    root = f"gs://{BUCKET}/photos"
    argv = [
        "run",
        "--input",
        root,
        "--output",
        root,
        "--checkpoint-every",
        "1",
        "--captioner",
        f"blip:{tiny_models[0]}",
        "--ranker",
        f"clip:{tiny_models[1]}",
    ]
    assert main(argv) == 0

    names = sorted(blob.name for blob in gcs.list_blobs(prefix="photos/"))
    assert names == [
        "photos/broken.jpg",
        "photos/errors.jsonl",
        "photos/metadata.jsonl",
        "photos/notes.txt",
        "photos/rejected.jsonl",
        "photos/sub/img 0.jpg",
        "photos/sub/img 1.jpg",
        "photos/sub/img 2.jpg",
        "photos/summary.json",
    ]
    rows = [
        json.loads(x) for x in gcs.blob("photos/metadata.jsonl").download_as_text().splitlines()
    ]
    assert sorted(r["file_name"] for r in rows) == [f"sub/img {i}.jpg" for i in range(3)]
    assert all(r["image_uri"].startswith(f"gs://{BUCKET}/photos/sub/") for r in rows)
    (error,) = [
        json.loads(x) for x in gcs.blob("photos/errors.jsonl").download_as_text().splitlines()
    ]
    assert error["image_uri"] == f"{root}/broken.jpg" and error["stage"] == "decode"


@pytest.mark.parametrize(("folder", "output"), [("in", "out"), ("in[1]", "out[1]")])
def test_a_gcs_list_file_and_resume(
    gcs: object, tiny_models: tuple[str, str], folder: str, output: str
) -> None:
    """A list in `in[1]/` and an output `out[1]` name themselves, not `in1/` and `out1`
    (Beam's patterns have no escape): the list is read, a resumed run keeps what the first
    wrote, and the parts and the lock are removed at the end."""
    for i in range(2):
        upload_image(gcs, f"{folder}/{i}.jpg", seed=i)
    gcs.blob(f"{folder}/dataset.txt").upload_from_string("0.jpg\n1.jpg\n")
    models = ["--captioner", f"blip:{tiny_models[0]}", "--ranker", f"clip:{tiny_models[1]}"]
    out = f"gs://{BUCKET}/{output}"
    argv = ["run", "--input", f"gs://{BUCKET}/{folder}/dataset.txt", "--output", out, *models]
    assert main([*argv, "--limit", "1"]) == 0
    assert main([*argv, "--resume"]) == 0
    text = gcs.blob(f"{output}/metadata.jsonl").download_as_text()
    rows = [json.loads(x) for x in text.splitlines()]
    assert sorted(r["image_uri"] for r in rows) == [
        f"gs://{BUCKET}/{folder}/{i}.jpg" for i in range(2)
    ]
    summary = json.loads(gcs.blob(f"{output}/summary.json").download_as_text())
    assert summary["kept_from_earlier_run"] == 1 and summary["captioned"] == 1
    names = sorted(b.name.removeprefix(f"{output}/") for b in gcs.list_blobs(prefix=f"{output}/"))
    assert names == ["errors.jsonl", "metadata.jsonl", "rejected.jsonl", "summary.json"]


def test_models_load_from_a_gcs_folder(gcs: object, tiny_blip: str, tmp_path: Path) -> None:
    """A model folder on gs:// is copied once to a local cache and loaded from there."""
    from captionflow.handlers import BlipCaptioner, DecodingOptions

    prefix = f"models/{tmp_path.name}/blip"
    for file in Path(tiny_blip).iterdir():
        gcs.blob(f"{prefix}/{file.name}").upload_from_filename(str(file))
    captioner = BlipCaptioner.from_pretrained(
        f"gs://{BUCKET}/{prefix}", decoding=DecodingOptions(num_captions=2)
    )
    (texts,) = captioner.caption([random_image(32, 32)])
    assert 1 <= len(texts) <= 2


def test_the_output_lock_works_on_gcs(gcs: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live holder on another machine is refused; a silent one is replaced, whatever its
    clock said (the object's own update time tells its age); ours is removed at the end."""
    import time

    import captionflow.lock
    from captionflow.lock import LOCK_FILE, OutputBusyError, OutputLock

    blob = gcs.blob(f"out/{LOCK_FILE}")
    now = time.time()
    other = {"run_id": "x", "host": "another-machine", "pid": 1, "started": now, "heartbeat": now}
    blob.upload_from_string(json.dumps(other))
    with pytest.raises(OutputBusyError, match=r"process 1 on another-machine.*last seen 0 s ago"):
        OutputLock(f"gs://{BUCKET}/out").acquire()

    monkeypatch.setattr(captionflow.lock, "STALE_AFTER_SECS", 2.0)
    blob.upload_from_string(json.dumps(other | {"heartbeat": now + 3600}))  # a clock ahead
    blob.reload()
    while time.time() - blob.updated.timestamp() <= 2.0:
        time.sleep(0.1)
    with OutputLock(f"gs://{BUCKET}/out") as lock:
        assert json.loads(blob.download_as_bytes())["run_id"] == lock.holder.run_id
        with pytest.raises(OutputBusyError):
            OutputLock(f"gs://{BUCKET}/out").acquire()
    assert not blob.exists()


def test_gcs_objects_over_max_bytes_are_refused_from_their_size(gcs: object) -> None:
    """Beam's GCS reader can seek: the size is known before any byte is read."""
    from captionflow.files import FileTooLargeError, open_image_file
    from captionflow.images import decode_image

    upload_image(gcs, "sized/small.jpg", seed=0)
    size = gcs.get_blob("sized/small.jpg").size
    with pytest.raises(FileTooLargeError, match=f"^{size} bytes exceeds --max-bytes {size - 1}$"):
        open_image_file(f"gs://{BUCKET}/sized/small.jpg", size - 1)
    with open_image_file(f"gs://{BUCKET}/sized/small.jpg", size) as file:
        assert decode_image(file).size == (48, 40)


def test_every_format_on_gcs(gcs: object, tiny_models: tuple[str, str]) -> None:
    """Sidecars, Parquet and WebDataset shards through Beam's GCS filesystem: complete, no
    staging objects left, readable."""
    import tarfile

    import pyarrow.parquet as pq

    for i in range(3):
        upload_image(gcs, f"photos/img{i}.jpg", seed=i)
    root = f"gs://{BUCKET}/photos"
    argv = ["run", "--input", root, "--output", root, "--format", "sidecar,parquet,webdataset"]
    argv += ["--captioner", f"blip:{tiny_models[0]}", "--ranker", f"clip:{tiny_models[1]}"]
    assert main(argv) == 0
    names = {blob.name for blob in gcs.list_blobs(prefix="photos/")}
    assert {f"photos/img{i}.txt" for i in range(3)} <= names
    assert {"photos/data/train-00000-of-00001.parquet", "photos/shards/00000.tar"} <= names
    assert not [name for name in names if ".tmp-" in name]
    rows = {
        row["image_uri"]: row["text"]
        for row in map(
            json.loads, gcs.blob("photos/metadata.jsonl").download_as_text().splitlines()
        )
    }
    assert gcs.blob("photos/img1.txt").download_as_text() == rows[f"{root}/img1.jpg"] + "\n"
    parquet = io.BytesIO(gcs.blob("photos/data/train-00000-of-00001.parquet").download_as_bytes())
    table = pq.read_table(parquet)
    assert sorted(table["image_uri"].to_pylist()) == sorted(rows)
    shard = io.BytesIO(gcs.blob("photos/shards/00000.tar").download_as_bytes())
    with tarfile.open(fileobj=shard) as tar:
        assert len([name for name in tar.getnames() if name.endswith(".jpg")]) == 3


def test_a_gcs_folders_subfolders_are_listed_by_parallel_steps(gcs: object) -> None:
    """A bucket folder of millions of objects is not paged through by one worker: its top
    level is listed with a delimiter, each subfolder by whichever worker it lands on."""
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from captionflow import ReadImagePaths

    names = ["top.jpg", "a/x.jpg", "a/deeper/y.png", "b/z.jpg", "c d/w.jpg"]
    for seed, name in enumerate(names):
        upload_image(gcs, f"tree/{name}", seed=seed)
    gcs.blob("tree/a/notes.txt").upload_from_string(b"not an image")
    gcs.blob("treetop.jpg").upload_from_string(b"beside the folder, not in it")
    pipeline = TestPipeline(runner="FnApiRunner")
    paths = pipeline | ReadImagePaths(f"gs://{BUCKET}/tree")
    assert_that(paths, equal_to([f"gs://{BUCKET}/tree/{name}" for name in names]))
    result = pipeline.run()
    result.wait_until_finish()
    found = result.metrics().query(MetricsFilter().with_name("subfolders_listed"))["counters"]
    assert sum(counter.committed for counter in found) == 3


def test_a_gcs_globs_subfolders_are_listed_by_parallel_steps(gcs: object) -> None:
    """A glob is listed like a folder, from the folder above its first wildcard: the top
    level with a delimiter, then each subfolder that can hold matches by its own step."""
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from captionflow import ReadImagePaths

    names = ["top.jpg", "a1/x.jpg", "a1/deeper/y.jpg", "a2/z.png", "b/w.jpg"]
    for seed, name in enumerate(names):
        upload_image(gcs, f"globbed/{name}", seed=seed)
    for pattern, matched, subfolders in (
        ("globbed/a*/**", names[1:4], 2),
        ("globbed/**.jpg", ["top.jpg", "a1/x.jpg", "a1/deeper/y.jpg", "b/w.jpg"], 3),
    ):
        pipeline = TestPipeline(runner="FnApiRunner")
        paths = pipeline | ReadImagePaths(f"gs://{BUCKET}/{pattern}")
        assert_that(paths, equal_to([f"gs://{BUCKET}/globbed/{name}" for name in matched]))
        result = pipeline.run()
        result.wait_until_finish()
        found = result.metrics().query(MetricsFilter().with_name("subfolders_listed"))
        assert sum(counter.committed for counter in found["counters"]) == subfolders, pattern


def test_a_reports_thumbnails_in_a_bucket_are_never_inputs(gcs: object) -> None:
    """A report uploaded beside the images (`OUTPUT/report/`, marked): neither the folder's
    listing nor a glob that reaches into it takes its thumbnails for images."""
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from captionflow import ReadImagePaths
    from captionflow.listing import SKIP_MARKER

    names = ["a.jpg", "sub/b.jpg"]
    for seed, name in enumerate(names):
        upload_image(gcs, f"out/{name}", seed=seed)
    for report in ("out/report", "out/sub/report"):
        upload_image(gcs, f"{report}/thumbs/0123.jpg", seed=9)
        gcs.blob(f"{report}/{SKIP_MARKER}").upload_from_string(b"")
    expected = [f"gs://{BUCKET}/out/{name}" for name in names]
    for source in (f"gs://{BUCKET}/out", f"gs://{BUCKET}/out/**.jpg"):
        with TestPipeline(runner="FnApiRunner") as pipeline:
            assert_that(pipeline | ReadImagePaths(source), equal_to(expected))


def test_limit_on_a_gcs_folder_or_glob_pages_no_further_than_its_first_paths(
    gcs: object,
) -> None:
    """`--limit N` on a bucket folder of millions (a trial run) reads the listing in its
    sorted order and stops at the N-th input; a report's thumbnails are still skipped."""
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from captionflow import ReadImagePaths
    from captionflow.listing import SKIP_MARKER

    names = ["a-b.jpg", "a/notes.txt", "a/z.jpg", "a0.png", "b.jpg", "c/d.jpg"]
    for seed, name in enumerate(names):
        upload_image(gcs, f"many/{name}", seed=seed)
    gcs.blob(f"many/a/report/{SKIP_MARKER}").upload_from_string(b"")
    upload_image(gcs, "many/a/report/thumbs/t.jpg", seed=9)
    root = f"gs://{BUCKET}/many"
    for source, limit, first, looked_at in (
        (root, 2, ["a-b.jpg", "a/z.jpg"], 3),
        (f"{root}/**.jpg", 3, ["a-b.jpg", "a/z.jpg", "b.jpg"], 5),
    ):
        pipeline = TestPipeline(runner="FnApiRunner")
        paths = pipeline | ReadImagePaths(source, limit=limit)
        assert_that(paths, equal_to([f"{root}/{name}" for name in first]))
        result = pipeline.run()
        result.wait_until_finish()
        found = result.metrics().query(MetricsFilter().with_name("files_listed"))["counters"]
        assert sum(counter.committed for counter in found) == looked_at, source


def test_gcs_subfolders_named_like_patterns_are_listed_as_they_are(gcs: object) -> None:
    """A subfolder named `set[1]` or `[ab]` is a folder, not a pattern (which would match
    `set1/` and `a/`, and lose its own images): each is listed by its literal prefix."""
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from captionflow import ReadImagePaths

    names = ["set[1]/x.jpg", "[ab]/y.jpg", "q?/z.jpg", "st*r/w.jpg", "set1/v.jpg", "a/u.jpg"]
    for seed, name in enumerate(names):
        upload_image(gcs, f"patterned/{name}", seed=seed)
    for limit in (None, len(names)):
        with TestPipeline(runner="FnApiRunner") as pipeline:
            paths = pipeline | ReadImagePaths(f"gs://{BUCKET}/patterned", limit=limit)
            assert_that(paths, equal_to([f"gs://{BUCKET}/patterned/{name}" for name in names]))


def test_object_names_that_urls_and_patterns_treat_specially_are_captioned(
    gcs: object, tiny_models: tuple[str, str]
) -> None:
    """`?`, `#`, `%`, `*`, `[`, spaces, leading dots, unicode in both normal forms, very long
    names and folder placeholders: every image is read by its exact name, captioned, given
    its caption file and put in the shards; nothing else is taken for an image."""
    import unicodedata

    import pyarrow.parquet as pq

    names = ["q?.jpg", "a#b.jpg", "50%25.jpg", "st*r.jpg", "b[1].jpg", "sp ace.jpg", ".dot.jpg"]
    names += [unicodedata.normalize(form, "café.jpg") for form in ("NFC", "NFD")]
    names += ["x" * 300 + ".jpg", "in/x.jpg"]
    for seed, name in enumerate(names):
        upload_image(gcs, f"odd/{name}", seed=seed)
    gcs.blob("odd/in/").upload_from_string(b"")  # a "folder" made in the console
    root = f"gs://{BUCKET}/odd"
    argv = ["run", "--input", root, "--output", root, "--format", "sidecar,parquet"]
    argv += ["--captioner", f"blip:{tiny_models[0]}", "--ranker", f"clip:{tiny_models[1]}"]
    assert main(argv) == 0
    rows = [
        json.loads(x) for x in gcs.blob("odd/metadata.jsonl").download_as_text().split("\n")[:-1]
    ]
    assert sorted(row["file_name"] for row in rows) == sorted(names)
    assert all(row["image_uri"] == f"{root}/{row['file_name']}" for row in rows)
    assert gcs.blob("odd/errors.jsonl").download_as_bytes() == b""
    for name in names:
        caption = gcs.blob(f"odd/{name.rpartition('.')[0]}.txt").download_as_text()
        assert caption == next(r["text"] for r in rows if r["file_name"] == name) + "\n"
    shard = io.BytesIO(gcs.blob("odd/data/train-00000-of-00001.parquet").download_as_bytes())
    assert sorted(pq.read_table(shard)["file_name"].to_pylist()) == sorted(names)


def test_literal_patterns_match_and_delete_only_the_path_itself(
    gcs: object, tmp_path: Path
) -> None:
    """Beam's local and GCS filesystems match (and delete by matching) `a[1].jsonl` as a
    pattern, which names `a1.jsonl`; `literal` and `delete_files` name the file itself."""
    from apache_beam.io.filesystems import FileSystems

    from captionflow.listing import delete_files, literal

    for folder in (str(tmp_path / "x[1]*?"), f"gs://{BUCKET}/x[1]*?"):
        names = ["a[1].jsonl", "a1.jsonl", "a?.jsonl", "ab.jsonl", "a*.jsonl"]
        for name in names:
            with FileSystems.create(f"{folder}/{name}") as file:
                file.write(b"x")
        for name in names:
            (found,) = FileSystems.match([literal(f"{folder}/{name}")])
            assert [file.path for file in found.metadata_list] == [f"{folder}/{name}"]
        delete_files([f"{folder}/a[1].jsonl", f"{folder}/a?.jsonl", f"{folder}/a*.jsonl"])
        left = FileSystems.match([f"{literal(folder)}/*"])[0].metadata_list
        assert sorted(file.path for file in left) == [f"{folder}/a1.jsonl", f"{folder}/ab.jsonl"]
