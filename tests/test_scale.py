"""Scale: big files read in ranges by many workers, parts joined in parallel groups, an
earlier run's records kept once each, all without per-image state in one process."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tempfile
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from captionflow import ReadImagePaths
from captionflow.cli import main
from captionflow.transforms import lines as lines_module
from captionflow.transforms.grouping import GroupStrings
from captionflow.transforms.lines import ReadLines, byte_ranges, lines_between
from captionflow.transforms.resume import SkipDone
from captionflow.transforms.write import WriteJsonLines, parts_dir
from tests.conftest import write_images


def counters(result: beam.runners.runner.PipelineResult) -> dict[str, int]:
    found = result.metrics().query(MetricsFilter().with_namespace("captionflow"))["counters"]
    totals: dict[str, int] = {}
    for counter in found:  # summed over the steps that count under one name
        name = counter.key.metric.name
        totals[name] = totals.get(name, 0) + counter.committed
    return totals


@pytest.mark.parametrize("seed", range(5))
def test_byte_ranges_read_every_line_exactly_once(seed: int) -> None:
    rng = random.Random(seed)
    lines = [bytes(rng.choice(b"ab\r") for _ in range(rng.randrange(0, 9))) for _ in range(40)]
    data = b"\n".join(lines) + (b"\n" if seed % 2 else b"")  # with and without a last "\n"
    starts, at = [], 0
    for line in lines:
        starts.append(at)
        at += len(line) + 1
    for range_bytes in (1, 2, 3, 7, 50, len(data) + 5):
        read = [
            item
            for start, end in byte_ranges(len(data), range_bytes)
            for item in lines_between(io.BytesIO(data), start, end)
        ]
        expected = list(zip(starts, lines, strict=True))
        if not data.endswith(b"\n") and lines[-1] == b"":  # no last line at all
            expected = expected[:-1]
        assert read == expected, range_bytes


def test_read_lines_spreads_one_file_over_many_ranges(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    path.write_bytes(b"".join(f"line {i}\n".encode() for i in range(200)))

    def check(lines: list) -> None:
        assert sorted(line.data for line in lines) == sorted(
            f"line {i}".encode() for i in range(200)
        )
        assert {line.offset for line in lines} == {
            path.read_bytes().index(line.data + b"\n") for line in lines
        }
        first = [line for line in lines if line.number is not None]
        assert 0 < len(first) < 200  # only the first range knows its line numbers
        assert all(line.where().startswith("line ") for line in first)
        assert any(line.where().startswith("the line at byte ") for line in lines)

    with TestPipeline(runner="FnApiRunner") as pipeline:
        read = pipeline | beam.Create([str(path)]) | ReadLines(range_bytes=100)
        assert_that(read, check)


def test_a_big_list_file_is_read_in_ranges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lines_module, "RANGE_BYTES", 64)
    names = [f"image-{i:04d}.jpg" for i in range(100)]
    listing = tmp_path / "dataset.txt"
    listing.write_bytes(
        ("\n".join(names[:60]) + "\ncaf\xe9.jpg\n").encode("latin-1")
        + "\n".join(names[60:]).encode()
    )
    offset = listing.read_bytes().index(b"caf\xe9")

    with TestPipeline(runner="FnApiRunner") as pipeline:
        paths, errors = pipeline | ReadImagePaths(str(listing)).with_errors()
        assert_that(paths, equal_to([str(tmp_path / name) for name in names]))
        messages = errors | beam.Map(lambda error: error.message)
        expected = f"the line at byte {offset} of {listing} is not valid UTF-8: 'caf\\xe9.jpg'; "
        assert_that(
            messages,
            equal_to([expected + "fix the list's encoding (save it as UTF-8)"]),
            label="errors",
        )


def test_limit_takes_a_lists_first_entries_without_sorting_everything(tmp_path: Path) -> None:
    listing = tmp_path / "dataset.txt"
    listing.write_bytes(b"z.jpg\nb\xe9.jpg\na.jpg\nb\xe9.jpg\n")

    with TestPipeline(runner="FnApiRunner") as pipeline:
        paths, errors = pipeline | ReadImagePaths(str(listing), limit=2).with_errors()
        assert_that(paths, equal_to([str(tmp_path / "z.jpg")]))
        uris = errors | beam.Map(lambda error: error.image_uri)
        assert_that(uris, equal_to([str(tmp_path / "b\\xe9.jpg")]), label="errors")


def rows(count: int, start: int = 0) -> list[str]:
    return [json.dumps({"k": f"image-{i:03d}", "v": i}) for i in range(start, start + count)]


def test_parts_are_joined_in_parallel_groups_then_into_one_file(tmp_path: Path) -> None:
    destination = tmp_path / "out.jsonl"
    pipeline = TestPipeline(runner="FnApiRunner")
    _ = (
        pipeline
        | beam.Create(rows(23))
        | WriteJsonLines(str(destination), key="k", lines_per_part=1, parts_per_group=4)
    )
    result = pipeline.run()
    result.wait_until_finish()
    assert sorted(destination.read_text().splitlines()) == sorted(rows(23))
    # 23 parts hashed into 6 groups of about 4: more than one (in parallel), never more than 6
    assert 2 <= counters(result)["part_groups_joined"] <= 6
    assert not Path(parts_dir(str(destination))).exists()


@pytest.mark.parametrize("spilled", [False, True])
def test_resume_keeps_each_earlier_record_once_and_adds_the_new_ones(
    tmp_path: Path, spilled: bool
) -> None:
    destination = tmp_path / "out.jsonl"
    spill = tmp_path / "spill" if spilled else None
    destination.write_text("\n".join(rows(3)) + "\n")  # a finished file...
    parts = Path(parts_dir(str(destination)))
    parts.mkdir()
    (parts / "part-a.jsonl").write_text("\n".join(rows(4, start=2)) + "\n")  # ...parts after it
    (parts / "part-b.jsonl").write_text("\n".join(rows(2, start=4)) + "\n")  # a retried bundle's
    pipeline = TestPipeline(runner="FnApiRunner")
    _ = (
        pipeline
        | beam.Create(rows(2, start=6))
        | WriteJsonLines(
            str(destination), key="k", lines_per_part=1, resume=True, spill_dir=spill and str(spill)
        )
    )
    result = pipeline.run()
    result.wait_until_finish()
    keys = [json.loads(line)["k"] for line in destination.read_text().splitlines()]
    assert sorted(keys) == [f"image-{i:03d}" for i in range(8)]
    assert not parts.exists()
    # Through files, the earlier lines' keys only crossed the runner as file names.
    assert counters(result).get("pairs_spilled", 0) == (3 + 4 + 2 if spilled else 0)


def test_resume_never_reads_this_runs_own_parts_as_an_earlier_runs(tmp_path: Path) -> None:
    """This run's parts may exist before its earlier records are read (Beam orders neither): a
    part of this run that no bundle reported (a failed attempt's) must not be kept."""
    destination = tmp_path / "out.jsonl"
    write = WriteJsonLines(str(destination), key="k", resume=True)
    parts = Path(parts_dir(str(destination)))
    parts.mkdir()
    (parts / f"part-{write.run}-failed-attempt.jsonl").write_text(rows(1, start=9)[0] + "\n")
    (parts / "part-earlier.jsonl").write_text(rows(1)[0] + "\n")
    with TestPipeline(runner="FnApiRunner") as pipeline:
        _ = pipeline | beam.Create(rows(1, start=1)) | write
    keys = sorted(json.loads(line)["k"] for line in destination.read_text().splitlines())
    assert keys == ["image-000", "image-001"]


def test_a_folders_subfolders_are_listed_by_parallel_steps(tmp_path: Path) -> None:
    from PIL import Image

    expected = []
    latin1 = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9")  # a subfolder name not UTF-8
    for folder in ("", "a", "b/deeper", "c", latin1):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        path = tmp_path / folder / "x.jpg"
        Image.new("RGB", (4, 4)).save(path)
        expected.append(str(path))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    pipeline = TestPipeline(runner="FnApiRunner")
    paths, errors = pipeline | ReadImagePaths(str(tmp_path)).with_errors()
    assert_that(paths, equal_to(expected[:-1]))
    messages = errors | beam.Map(lambda error: error.error_type)
    assert_that(messages, equal_to(["UndecodablePath"]), label="errors")
    result = pipeline.run()
    result.wait_until_finish()
    assert counters(result)["subfolders_listed"] == 4


@pytest.mark.parametrize(
    ("pattern", "matched", "subfolders"),
    [
        ("**/*.jpg", ["top.jpg", "a1/x/p.jpg", "a1/x/deeper/t.jpg", "a1/y/q.jpg", "b/x/s.jpg"], 3),
        ("a*/x/*", ["a1/x/p.jpg", "a2/x/r.png"], 2),  # b cannot match: not listed
        ("*.jpg", ["top.jpg"], 0),
    ],
)
def test_a_globs_subfolders_that_can_match_are_listed_by_parallel_steps(
    tmp_path: Path, pattern: str, matched: list[str], subfolders: int
) -> None:
    from PIL import Image

    for name in ("top.jpg", "a1/x/p.jpg", "a1/x/deeper/t.jpg", "a1/y/q.jpg", "a2/x/r.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "b" / "x").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "b" / "x" / "s.jpg")
    pipeline = TestPipeline(runner="FnApiRunner")
    paths = pipeline | ReadImagePaths(str(tmp_path / pattern))
    assert_that(paths, equal_to([str(tmp_path / name) for name in matched]))
    result = pipeline.run()
    result.wait_until_finish()
    assert counters(result).get("subfolders_listed", 0) == subfolders


STRINGS = ["a", "a\nb", "ü/ß.jpg", "line\u2028sep", " spaced ", "gs://b/x.jpg"] + [
    f"/images/{i:05d}.jpg" for i in range(3000)
]


def expected_groups() -> list[tuple[str, frozenset[str]]]:
    done = set(STRINGS[5:20]) | {"/not/an/input.jpg"}
    return [(s, frozenset({"todo"} | ({"done"} if s in done else set()))) for s in STRINGS] + [
        ("/not/an/input.jpg", frozenset({"done"}))
    ]


def group(spill_dir: str | None) -> dict[str, int]:
    pipeline = TestPipeline(runner="FnApiRunner")
    todo = pipeline | "Todo" >> beam.Create(STRINGS + STRINGS[:10])  # duplicates within
    done = pipeline | "Done" >> beam.Create([*STRINGS[5:20], "/not/an/input.jpg"])
    grouped = {"todo": todo, "done": done} | GroupStrings(spill_dir, buckets=16)
    assert_that(grouped, equal_to(expected_groups()))  # each once, whatever its characters
    result = pipeline.run()
    result.wait_until_finish()
    return counters(result)


def test_strings_group_through_files_as_through_the_runner(tmp_path: Path) -> None:
    group(None)
    spill = tmp_path / "spill"
    counted = group(str(spill))
    # The strings went into bucket files (only the files' names crossed the runner): each
    # string as often as it came, in at most 16 buckets.
    assert counted["pairs_spilled"] == len(STRINGS) + 10 + 16
    files = list(spill.iterdir())
    written = [json.loads(line)[0] for file in files for line in file.read_text().splitlines()]
    assert sorted(written) == sorted([*STRINGS, *STRINGS[:10], *STRINGS[5:20], "/not/an/input.jpg"])
    assert {file.name.split("-")[2] for file in files} <= {f"{b:05d}" for b in range(16)}


def test_distinct_paths_and_skip_done_group_through_files_when_asked(tmp_path: Path) -> None:
    listing = tmp_path / "dataset.txt"
    listing.write_text("".join(f"/images/{i}.jpg\n" for i in range(50)) + "/images/3.jpg\n")
    spill = tmp_path / "spill"
    pipeline = TestPipeline(runner="FnApiRunner")
    paths = pipeline | ReadImagePaths(str(listing), spill_dir=str(spill))
    done = pipeline | beam.Create(["/images/1.jpg", "/images/2.jpg"])
    todo, kept = (paths, done) | SkipDone(str(spill))
    assert_that(todo, equal_to([f"/images/{i}.jpg" for i in range(50) if i not in (1, 2)]))
    assert_that(kept, equal_to(["/images/1.jpg", "/images/2.jpg"]), label="Kept")
    result = pipeline.run()
    result.wait_until_finish()
    assert counters(result)["pairs_spilled"] == 51 + 50 + 2  # read, then joined with done


def test_a_local_run_groups_its_paths_through_a_folder_it_removes_at_the_end(
    tmp_path: Path,
    tiny_models: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    images = write_images(tmp_path / "in", 3)
    listing = tmp_path / "dataset.txt"
    listing.write_text("".join(f"{path}\n" for path in [*images, images[0]]))
    argv = ["run", "--input", str(listing), "--output", str(tmp_path / "out")]
    models = ["--captioner", f"blip:{tiny_models[0]}", "--ranker", f"clip:{tiny_models[1]}"]
    with caplog.at_level(logging.INFO, logger="captionflow"):
        assert main([*argv, *models]) == 0

    assert f"grouping paths through files in {temporary}" in caplog.text
    assert not list(temporary.glob("captionflow-spill-*"))
    rows = (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()
    assert sorted(json.loads(row)["image_uri"] for row in rows) == sorted(map(str, images))


# Names whose sorted order a walk that lists a folder's files before its subfolders gets wrong
# (`a/z.jpg` < `b.jpg`, `a-b.jpg` < `a/z.jpg` < `a0.jpg`).
ORDER_TREE = ["b.jpg", "a/z.jpg", "a-b.jpg", "a.jpg", "a0.jpg", "a/b/c.png", "c d/e.jpg"]


def order_tree(root: Path) -> list[str]:
    """`ORDER_TREE` under `root` with things no listing takes: a text file, a report's marked
    folder, a link to a folder; returns the images' paths, sorted."""
    for i, name in enumerate(ORDER_TREE):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(bytes([i]))
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "report" / "thumbs").mkdir(parents=True)
    (root / "report" / ".captionflow-report").write_text("")
    (root / "report" / "thumbs" / "t.jpg").write_bytes(b"")
    (root / "link").symlink_to(root / "a")
    return sorted(str(root / name) for name in ORDER_TREE)


def test_a_tree_walked_in_order_gives_its_files_sorted_lazily(tmp_path: Path) -> None:
    from captionflow.listing import walk_files, walk_in_order

    order_tree(tmp_path)
    root = str(tmp_path)
    everything = sorted(walk_files(root))
    assert len(everything) == len(ORDER_TREE) + 1  # and notes.txt; no link followed
    assert list(walk_in_order(root)) == everything
    relative = {path: os.path.relpath(path, root) for path in everything}
    shallow = [p for p in everything if relative[p].count(os.sep) <= 1]
    assert list(walk_in_order(root, max_depth=1)) == shallow
    only_a = [p for p in everything if relative[p].startswith("a/") or "/" not in relative[p]]
    assert list(walk_in_order(root, enter=lambda folder: folder.endswith("/a"))) == only_a


@pytest.mark.parametrize("pattern", ["", "**/*.jpg"])
def test_limit_on_a_folder_or_glob_lists_no_further_than_its_first_paths(
    tmp_path: Path, pattern: str
) -> None:
    """`--limit N` on a folder or glob (a trial run on a bucket of millions) walks the tree in
    sorted order and stops at the N-th input, instead of listing it all to sort it."""
    from captionflow.listing import walk_files

    images = order_tree(tmp_path)
    everything = sorted(walk_files(str(tmp_path)))
    source = str(tmp_path / pattern) if pattern else str(tmp_path)
    expected = [p for p in images if p.endswith(".jpg")] if pattern else images
    for limit in (1, 3):
        pipeline = TestPipeline(runner="FnApiRunner")
        paths = pipeline | ReadImagePaths(source, limit=limit)
        assert_that(paths, equal_to(expected[:limit]))
        result = pipeline.run()
        result.wait_until_finish()
        looked_at = everything.index(expected[limit - 1]) + 1  # the files up to the N-th
        assert counters(result)["files_listed"] == looked_at, (pattern, limit)


FLATTEN = "beam:transform:flatten:v1"


def test_failed_images_records_are_written_where_they_are_made(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    """A local runner holds a Flatten's whole output: a run in which most of a million images
    fail would hold their error records. Each step's failures (decode, inference) are
    written and counted where they are made; no Flatten takes them."""
    from captionflow.cli import prepare
    from captionflow.pipelines import build_caption_pipeline

    write_images(tmp_path / "in", 1)
    config, options = prepare(
        ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
         "--captioner", f"blip:{tiny_models[0]}", "--ranker", f"clip:{tiny_models[1]}",
         "--format", "metadata", "--format", "parquet", "--min-score", "0.1"]
    )  # fmt: skip
    pipeline = beam.Pipeline(options=options)
    build_caption_pipeline(
        pipeline, config, progress=str(tmp_path / "progress"), spill_dir=str(tmp_path / "spill")
    )
    transforms = pipeline.to_runner_api().components.transforms
    made_by = {
        collection: transform.unique_name
        for transform in transforms.values()
        if not transform.subtransforms
        for collection in transform.outputs.values()
    }
    flattened = {
        made_by[collection]
        for transform in transforms.values()
        if transform.spec.urn == FLATTEN
        for collection in transform.inputs.values()
    }
    assert flattened  # the counts and the part files' names are
    assert [name for name in flattened if name.startswith("CaptionImages/")] == []
