"""Nothing lost: broken inputs, failing models, killed workers and interrupted runs."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from captionflow import CaptionImages, LoadImages
from captionflow.cli import main
from captionflow.handlers import ClipRankHandler
from captionflow.handlers.base import DeviceFailedError, ModelImages
from captionflow.lock import LOCK_FILE, STALE_AFTER_SECS, OutputBusyError, OutputLock
from tests.conftest import random_image, write_images
from tests.killer import (
    MARKER_ENV,
    STALL_AFTER_ENV,
    STALL_GLOB_ENV,
    STALLED_MARKER_ENV,
    TRIGGER_SIZE,
    MisbehavingHandler,
    image_sizes,
)

REPO = Path(__file__).resolve().parent.parent
# The checkout's code in the CLI's own processes, not the one installed (another checkout's).
PYTHONPATH = os.pathsep.join([str(REPO / "src"), str(REPO)])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def jpeg_bytes(image: Image.Image, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


def make_zoo(folder: Path) -> tuple[list[str], dict[str, str]]:
    """Unusual and broken inputs. Returns (list-file lines, expected failure stage by name)."""
    folder.mkdir()
    good = {
        "plain.jpg": lambda p: random_image(64, 48).save(p),
        "with space é ü.jpg": lambda p: random_image(40, 40, seed=1).save(p),
        "$(touch pwned); rm -rf x.jpg": lambda p: random_image(30, 30, seed=2).save(p),
        "cmyk.jpg": lambda p: Image.new("CMYK", (32, 32), (0, 50, 100, 0)).save(p),
        "grey16.png": lambda p: Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(p),
        "palette.png": lambda p: random_image(20, 20).convert("P").save(p),
        "alpha.png": lambda p: Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(p),
        "animated.gif": lambda p: Image.new("RGB", (16, 16), "red").save(
            p, save_all=True, append_images=[Image.new("RGB", (16, 16), "blue")]
        ),
        "rotated.jpg": lambda p: p.write_bytes(
            jpeg_bytes(random_image(40, 20), exif=_orientation(6))
        ),
        "one_pixel.png": lambda p: Image.new("RGB", (1, 1), "white").save(p),
        "strip.png": lambda p: Image.new("RGB", (2, 2000), "green").save(p),
    }
    broken = {
        "missing.jpg": ("read", lambda p: None),
        "zero.jpg": ("decode", lambda p: p.write_bytes(b"")),
        "text.jpg": ("decode", lambda p: p.write_text("I am not a picture")),
        "truncated.jpg": (
            "decode",
            lambda p: p.write_bytes(jpeg_bytes(random_image(64, 64))[:300]),
        ),
        "bomb.png": ("decode", lambda p: Image.new("1", (3000, 3000)).save(p)),
        "folder.jpg": ("read", lambda p: p.mkdir()),
        "huge.png": ("read", lambda p: random_image(600, 400, seed=3).save(p)),  # > --max-bytes
    }
    for name, make in good.items():
        make(folder / name)
    for name, (_, make) in broken.items():
        make(folder / name)
    names = [*good, *broken]
    lines = [str(folder / n) for n in names] + [str(folder / "plain.jpg"), "# comment", ""]
    return lines, {name: stage for name, (stage, _) in broken.items()}


def _orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def models(tiny_models: tuple[str, str]) -> list[str]:
    return ["--captioner", f"blip:{tiny_models[0]}", "--ranker", f"clip:{tiny_models[1]}"]


def test_zoo_of_broken_and_unusual_images_is_fully_accounted_for(
    tmp_path: Path, tiny_models: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    lines, expected_errors = make_zoo(tmp_path / "zoo")
    listing = tmp_path / "dataset.txt"
    listing.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["run", "--input", str(listing), "--output", str(out), "--max-pixels", "4000000"]
    argv += ["--max-bytes", "300000"]
    assert main([*argv, "--caption-batch-size", "4", *models(tiny_models)]) == 0

    rows, errors = read_jsonl(out / "metadata.jsonl"), read_jsonl(out / "errors.jsonl")
    distinct_inputs = {line for line in lines if line and not line.startswith("#")}
    assert len(rows) + len(errors) == len(distinct_inputs) == 18
    assert {Path(r["image_uri"]).name for r in rows} == {
        Path(p).name for p in distinct_inputs
    } - set(expected_errors)
    assert all(row["text"] for row in rows)
    assert {Path(e["image_uri"]).name: e["stage"] for e in errors} == expected_errors
    for error in errors:
        assert error["error_type"] and error["message"] and " at 0x" not in error["message"]
    bomb = next(e for e in errors if e["image_uri"].endswith("bomb.png"))
    assert "9000000 pixels exceeds the limit of 4000000" in bomb["message"]
    huge = next(e for e in errors if e["image_uri"].endswith("huge.png"))
    assert huge["message"].endswith("bytes exceeds --max-bytes 300000")
    assert not (tmp_path / "pwned").exists()
    assert sorted(p.name for p in out.iterdir()) == [
        "errors.jsonl",
        "metadata.jsonl",
        "rejected.jsonl",
        "summary.json",
    ]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 18 and summary["captioned"] == 11 and summary["failed"] == 7
    assert summary["errors_by_stage"] == {"decode": 4, "read": 3}
    assert summary["errors_by_type"]["ImageTooLargeError"] == 1
    assert summary["versions"]["apache-beam"] and summary["settings"]["max_pixels"] == 4000000
    assert summary["settings"]["max_bytes"] == 300000


def run_within(seconds: float, build: Callable[[beam.Pipeline], object], fifo: Path) -> None:
    """Run a pipeline in a thread and fail, rather than hang the test run, if it outlives
    `seconds`: a reader stuck opening `fifo` is released by opening its other end."""
    failures: list[BaseException] = []

    def target() -> None:
        try:
            with TestPipeline(runner="FnApiRunner") as pipeline:
                build(pipeline)
        except BaseException as error:
            failures.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    stuck = thread.is_alive()
    if stuck:
        with contextlib.suppress(OSError):  # no reader yet: nothing to release
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(60)
    assert not stuck, f"the pipeline was still running after {seconds} s: stuck on {fifo.name}?"
    if failures:
        raise failures[0]


def load_outcomes(loaded: beam.pvalue.DoOutputsTuple) -> tuple[object, object]:
    """`(names decoded, (name, stage, error type, message) of each error)` of a `LoadImages`."""
    names = loaded.images | "Names" >> beam.Map(lambda kv: Path(kv[0]).name)
    errors = loaded.errors | "Errors" >> beam.Map(
        lambda e: (Path(e.image_uri).name, e.stage, e.error_type, e.message)
    )
    return names, errors


def test_a_fifo_or_folder_named_like_an_image_is_a_read_error_not_a_hang(tmp_path: Path) -> None:
    random_image(32, 32).save(tmp_path / "ok.png")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    (tmp_path / "folder.jpg").mkdir()
    uris = [str(tmp_path / name) for name in ("ok.png", "pipe.jpg", "folder.jpg")]

    def build(p: beam.Pipeline) -> None:
        names, errors = load_outcomes(p | beam.Create(uris) | LoadImages())
        assert_that(names, equal_to(["ok.png"]), label="images")
        expected = [
            ("pipe.jpg", "read", "NotRegularFileError", "not a regular file (a FIFO)"),
            ("folder.jpg", "read", "NotRegularFileError", "not a regular file (a directory)"),
        ]
        assert_that(errors, equal_to(expected), label="errors")

    run_within(60, build, fifo)


def test_files_larger_than_max_bytes_are_read_errors(tmp_path: Path) -> None:
    random_image(16, 16).save(tmp_path / "small.png")
    random_image(400, 300).save(tmp_path / "big.jpg")
    size = (tmp_path / "big.jpg").stat().st_size
    assert (tmp_path / "small.png").stat().st_size < 5000 < size
    uris = [str(tmp_path / "small.png"), str(tmp_path / "big.jpg")]

    def build(p: beam.Pipeline) -> None:
        names, errors = load_outcomes(p | beam.Create(uris) | LoadImages(max_bytes=5000))
        assert_that(names, equal_to(["small.png"]), label="images")
        message = f"{size} bytes exceeds --max-bytes 5000"
        assert_that(
            errors, equal_to([("big.jpg", "read", "FileTooLargeError", message)]), label="errors"
        )

    with TestPipeline(runner="FnApiRunner") as pipeline:
        build(pipeline)


def test_a_stream_is_never_read_past_max_bytes_plus_one() -> None:
    from captionflow.files import FileTooLargeError, cap_file

    read_end, write_end = os.pipe()
    os.write(write_end, b"x" * 3000)
    os.close(write_end)
    spare = os.dup(read_end)  # cap_file closes the stream it refuses; this end stays open
    with (
        open(read_end, "rb", buffering=0) as stream,  # a pipe: it cannot seek
        pytest.raises(FileTooLargeError, match="more than 1000 bytes exceeds --max-bytes 1000"),
    ):
        cap_file(stream, 1000)
    with open(spare, "rb") as rest:
        assert len(rest.read()) == 3000 - 1001


def test_a_file_that_grows_after_its_size_was_checked_is_still_capped(tmp_path: Path) -> None:
    from captionflow.files import FileTooLargeError, cap_file

    path = tmp_path / "growing.jpg"
    path.write_bytes(b"x" * 500)
    with cap_file(open(path, "rb"), 1000) as file:
        assert file.read(100) == b"x" * 100
        with open(path, "ab") as writer:
            writer.write(b"y" * 5000)
        with pytest.raises(FileTooLargeError, match="more than 1000 bytes"):
            file.read()
        assert file.tell() <= 1001


def png_file(path: Path, image: Image.Image) -> str:
    image.save(path)
    return str(path)


def test_max_pixels_above_pillows_own_limit_lets_huge_images_through_without_warnings(
    tmp_path: Path,
) -> None:
    """Pillow alone refuses over ~179 MP and warns, naming no file, over ~89 MP."""
    uris = [
        png_file(tmp_path / "200mp.png", Image.new("1", (20000, 10000))),
        png_file(tmp_path / "100mp.png", Image.new("1", (10000, 10000))),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with TestPipeline(runner="FnApiRunner") as p:
            names, errors = load_outcomes(
                p | beam.Create(uris) | LoadImages(max_pixels=300_000_000)
            )
            assert_that(names, equal_to(["200mp.png", "100mp.png"]), label="images")
            assert_that(errors, equal_to([]), label="errors")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_images_over_max_pixels_are_refused_with_their_size_and_no_pillow_warning(
    tmp_path: Path,
) -> None:
    uris = [  # over twice the limit (Pillow's error), and between once and twice (its warning)
        png_file(tmp_path / "twice.png", Image.new("RGB", (300, 300))),
        png_file(tmp_path / "once.png", Image.new("RGB", (40, 40))),
        png_file(tmp_path / "fits.png", Image.new("RGB", (30, 30))),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with TestPipeline(runner="FnApiRunner") as p:
            names, errors = load_outcomes(p | beam.Create(uris) | LoadImages(max_pixels=1000))
            assert_that(names, equal_to(["fits.png"]), label="images")
            expected = [
                ("twice.png", "decode", "ImageTooLargeError", "300x300 = 90000 pixels exceeds "),
                ("once.png", "decode", "ImageTooLargeError", "40x40 = 1600 pixels exceeds "),
            ]
            assert_that(
                errors | beam.Map(lambda e: (*e[:3], e[3].removesuffix("the limit of 1000"))),
                equal_to(expected),
                label="errors",
            )
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_formats_we_do_not_decode_are_decode_errors_that_say_why(tmp_path: Path) -> None:
    files = {
        "drawing.eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        "photo.heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),
        "logo.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
        "raw.nef": b"MM\x00*" + bytes(64),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    uris = [str(tmp_path / name) for name in files]

    def build(p: beam.Pipeline) -> None:
        names, errors = load_outcomes(p | beam.Create(uris) | LoadImages())
        assert_that(names, equal_to([]), label="images")
        assert_that(
            errors | beam.Map(lambda e: (e[0], e[1], e[2], e[3].split(" ")[0])),
            equal_to(
                [
                    ("drawing.eps", "decode", "UnsupportedFormatError", "EPS/PostScript"),
                    ("photo.heic", "decode", "UnsupportedFormatError", "HEIC/HEIF"),
                    ("logo.svg", "decode", "UnsupportedFormatError", "SVG"),
                    ("raw.nef", "decode", "UnsupportedFormatError", "raw"),
                ]
            ),
            label="errors",
        )

    with TestPipeline(runner="FnApiRunner") as pipeline:
        build(pipeline)


class FailOnTinyImages(MisbehavingHandler):
    """A BLIP handler whose model refuses any batch holding a 13x13 image."""

    def before(self, images: ModelImages) -> None:
        if (13, 13) in image_sizes(images):
            raise ValueError("refusing 13x13 images")


def test_a_model_failing_on_one_image_fails_only_that_image(
    tmp_path: Path, tiny_blip: str, tiny_clip: str
) -> None:
    paths = [str(p) for p in write_images(tmp_path, 5)]
    random_image(13, 13).save(tmp_path / "bad.png")
    captioner = FailOnTinyImages(tiny_blip, max_batch_size=8, min_batch_size=8)
    with TestPipeline(runner="FnApiRunner") as p:
        captions, errors = (
            p
            | beam.Create([*paths, str(tmp_path / "bad.png")])
            | CaptionImages(captioner, ClipRankHandler(tiny_clip))
        )
        assert_that(captions | beam.Map(lambda r: r.image_uri), equal_to(paths))
        assert_that(
            errors | beam.Map(lambda e: (e.stage, e.error_type, e.message)),
            equal_to([("caption", "ValueError", "refusing 13x13 images")]),
            label="errors",
        )


@pytest.mark.parametrize("problem", ["empty folder", "wrong kind"])
def test_a_model_that_cannot_load_stops_the_job_at_once_in_one_line(
    image_dir: Path,
    tmp_path: Path,
    tiny_clip: str,
    problem: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> None:
    not_a_blip = tmp_path / "empty-model" if problem == "empty folder" else Path(tiny_clip)
    not_a_blip.mkdir(exist_ok=True)
    argv = ["run", "--input", str(image_dir), "--output", str(tmp_path / "out")]
    with caplog.at_level(logging.WARNING):
        code = main([*argv, "--captioner", f"blip:{not_a_blip}", "--ranker", f"clip:{tiny_clip}"])
    assert code == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("captionflow: error")]
    assert "Traceback" not in err
    assert line.startswith(f"captionflow: error: could not load the blip model '{not_a_blip}'")
    expected = "must hold a model saved" if problem == "empty folder" else "holds a 'clip' model"
    assert expected in line
    assert "attempt 1 of 3 failed" not in caplog.text
    assert not (tmp_path / "out" / "errors.jsonl").exists()


@pytest.mark.parametrize("decoder", ["fast", "reference"])
def test_captions_longer_than_the_captioner_can_write_stop_the_job_in_one_line(
    image_dir: Path,
    tmp_path: Path,
    tiny_models: tuple[str, str],
    decoder: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> None:
    """The tiny BLIP has 64 positions, 4 of them its prompt's: every batch would fail and be
    retried in halves, and every image become an error record, for one setting."""
    argv = ["run", "--input", str(image_dir), "--output", str(tmp_path / "out")]
    flags = ["--max-new-tokens", "61", "--decoder", decoder]
    with caplog.at_level(logging.WARNING):
        assert main([*argv, *models(tiny_models), *flags]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("captionflow: error")]
    assert line == (
        "captionflow: error: --max-new-tokens 61 is more than the blip model "
        f"'{tiny_models[0]}' can write: its prompt takes 4 of its 64 positions; "
        "use --max-new-tokens 60 or less"
    )
    assert "Traceback" not in err
    assert "trying its halves apart" not in caplog.text
    assert not (tmp_path / "out" / "errors.jsonl").exists()


def test_a_run_where_every_image_failed_exits_3(
    tmp_path: Path, tiny_models: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "in").mkdir()
    for name in ("a.jpg", "b.png"):
        (tmp_path / "in" / name).write_text("not a picture")
    argv = ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    with caplog.at_level(logging.WARNING):
        assert main([*argv, *models(tiny_models)]) == 3
    assert "no image was captioned (2 images, 2 failed" in caplog.text
    assert len(read_jsonl(tmp_path / "out" / "errors.jsonl")) == 2


def test_a_failure_rate_above_the_threshold_warns(
    tmp_path: Path, tiny_models: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    write_images(tmp_path / "in", 3)
    (tmp_path / "in" / "bad.jpg").write_text("not a picture")
    argv = ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--max-failure-rate", "0.2", *models(tiny_models)]) == 0
    assert "1 of 4 images failed (25.0%, above --max-failure-rate 0.2)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--max-failure-rate", "0.3", *models(tiny_models)]) == 0
    assert "images failed" not in caplog.text


def run_cli(argv: list[str], marker: Path) -> subprocess.CompletedProcess:
    """The CLI in its own process, with the kill-once handler registered."""
    code = (
        "import sys, tests.killer; from captionflow.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = os.environ | {MARKER_ENV: str(marker), "PYTHONPATH": PYTHONPATH}
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def kill_inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    write_images(folder, 7)
    random_image(*TRIGGER_SIZE, seed=9).save(folder / "trigger.jpg")
    return folder


def deterministic(tiny_models: tuple[str, str], captioner: str = "blip") -> list[str]:
    return [
        "--captioner",
        f"{captioner}:{tiny_models[0]}",
        "--ranker",
        f"clip:{tiny_models[1]}",
        "--decoding",
        "beam",
        "--caption-batch-size",
        "1",
        "--rank-batch-size",
        "1",
        "--checkpoint-every",
        "1",
    ]


def comparable(rows: list[dict]) -> list[tuple]:
    """Each image's candidates and best score. Not their order, nor which of the candidates
    that tie is shown first: a tiny random CLIP scores them all but equally, and on some CPUs
    another batch composition rounds their scores differently in the last places."""
    for row in rows:
        best = max(candidate["score"] for candidate in row["candidates"])
        chosen = next(c for c in row["candidates"] if c["text"] == row["text"])
        assert chosen["score"] == pytest.approx(best, abs=1e-5)  # the best, or tied with it
    return sorted(
        (r["image_uri"], tuple(sorted(c["text"] for c in r["candidates"])), round(r["score"], 4))
        for r in rows
    )


def test_a_killed_worker_process_is_recovered_without_loss_or_duplicates(
    kill_inputs: Path, tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    out = tmp_path / "out"
    argv = ["run", "--input", str(kill_inputs), "--output", str(out)]
    beam_flags = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    done = run_cli([*argv, *deterministic(tiny_models, "killer"), *beam_flags], tmp_path / "killed")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "killed").exists(), "the worker was never killed"
    assert "attempt 1 of 3 failed" in done.stderr
    rows = read_jsonl(out / "metadata.jsonl")
    assert sorted(Path(r["image_uri"]).name for r in rows) == sorted(
        p.name for p in kill_inputs.iterdir()
    )
    assert read_jsonl(out / "errors.jsonl") == []


def test_a_retried_run_without_resume_keeps_no_record_of_the_run_it_replaces(
    kill_inputs: Path, tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    """A run without --resume starts over: when its first attempt fails, the retry keeps
    what that attempt wrote, never the finished files of an earlier run of the output."""
    out = tmp_path / "out"
    out.mkdir()
    uris = sorted(str(p) for p in kill_inputs.iterdir())
    old = {"text": "an earlier run's caption", "candidates": [], "captions": []}
    (out / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": uri, "image_uri": uri, **old}) + "\n" for uri in uris[1:])
    )
    (out / "rejected.jsonl").write_text(json.dumps({"image_uri": uris[0], **old}) + "\n")
    argv = ["run", "--input", str(kill_inputs), "--output", str(out)]
    beam_flags = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    done = run_cli([*argv, *deterministic(tiny_models, "killer"), *beam_flags], tmp_path / "killed")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "attempt 1 of 3 failed" in done.stderr
    rows = read_jsonl(out / "metadata.jsonl")
    assert sorted(r["image_uri"] for r in rows) == uris
    assert not [r for r in rows if r["text"] == old["text"]]
    assert read_jsonl(out / "rejected.jsonl") == []


def start_cli(argv: list[str], **env: str) -> subprocess.Popen:
    """The CLI in its own process group (so a test can kill it and its workers at once)."""
    code = (
        "import sys, tests.killer; from captionflow.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        cwd=REPO,
        env=os.environ | env | {"PYTHONPATH": PYTHONPATH},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str) -> None:
    """Poll until `condition` holds; fail at once if the process ends first."""
    deadline = time.monotonic() + 240
    while not condition():
        if process.poll() is not None:
            pytest.fail(
                f"the job ended ({process.returncode}) before {what}: "
                f"{process.stdout.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def stalled_run(argv: list[str], parts: Path, after: int) -> subprocess.Popen:
    """A job caught while captioning, once `after` checkpoints exist in `parts`: its captioner
    hangs from then on, until the test stops the job."""
    marker = parts.parent / f"stalled-{after}"
    env = {
        STALL_GLOB_ENV: str(parts / "part-*.jsonl"),
        STALL_AFTER_ENV: str(after),
        STALLED_MARKER_ENV: str(marker),
    }
    process = start_cli(argv, **env)
    wait_for(marker.exists, process, f"{after} checkpoints were written while captioning")
    return process


def checkpointed_images(parts: Path) -> set[str]:
    return {
        json.loads(line)["image_uri"]
        for part in parts.glob("part-*.jsonl")
        for line in part.read_text(encoding="utf-8").splitlines()
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_job_keeps_its_checkpoints_and_resume_captions_only_the_rest(
    tmp_path: Path, tiny_models: tuple[str, str], workers: int
) -> None:
    write_images(tmp_path / "images", 12)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    argv = ["run", "--input", str(tmp_path / "images"), "--attempts", "1"]
    if workers > 1:
        argv += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
    parts = resumed / ".metadata.jsonl.parts"
    stall = [*argv, "--output", str(resumed), *deterministic(tiny_models, captioner="stall")]
    job = stalled_run(stall, parts, after=3)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    first = checkpointed_images(parts)
    assert len(first) >= 3 and not (resumed / "metadata.jsonl").exists()

    checkpointed = first
    if workers == 1:  # killed again while resuming: a resumed run checkpoints as it goes too
        # It rewrites the earlier records, once each, as one part of its own, then adds 2.
        after = len(list(parts.glob("part-*.jsonl"))) + 1 + 2
        job = stalled_run([*stall, "--resume"], parts, after=after)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        checkpointed = checkpointed_images(parts)
        assert len(checkpointed) >= len(first) + 2 and first < checkpointed

    blip = deterministic(tiny_models, captioner="blip")
    assert main([*argv, "--output", str(resumed), "--resume", *blip]) == 0
    assert main([*argv[:5], "--output", str(whole), *blip]) == 0  # in one process

    assert comparable(read_jsonl(resumed / "metadata.jsonl")) == comparable(
        read_jsonl(whole / "metadata.jsonl")
    )
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["kept_from_earlier_run"] == len(checkpointed)
    assert summary["captioned"] == 12 - len(checkpointed)
    assert not parts.exists()


RUNNERS = {
    "one process": [],
    "two processes": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    "job service": [
        "--runner=PortableRunner",
        "--job_endpoint=embed",
        "--environment_type=LOOPBACK",
    ],
}


@pytest.mark.parametrize(
    ("signum", "code", "runner"),
    [
        (signal.SIGINT, 130, "one process"),
        (signal.SIGTERM, 143, "one process"),
        (signal.SIGINT, 130, "two processes"),
        (signal.SIGTERM, 143, "job service"),
    ],
)
def test_a_stop_signal_stops_the_job_at_once_and_keeps_its_checkpoints(
    tmp_path: Path, tiny_models: tuple[str, str], signum: int, code: int, runner: str
) -> None:
    write_images(tmp_path / "images", 6)
    out = tmp_path / "out"
    argv = ["run", "--input", str(tmp_path / "images"), "--output", str(out)]
    parts = out / ".metadata.jsonl.parts"
    stall = [*argv, *RUNNERS[runner], *deterministic(tiny_models, "stall")]
    job = stalled_run(stall, parts, after=2)
    try:
        job.send_signal(signum)
        assert job.wait(timeout=60) == code
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)  # stalled worker processes, if any
    log = job.stdout.read()
    assert log.rstrip().endswith(
        f"captionflow: stopped by {signal.Signals(signum).name}; what was written is kept: run "
        "the same command with --resume to finish"
    )
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    assert "attempt 1 of 3 failed" not in log
    if runner == "job service":  # the job runs apart from its launcher: cancelled, not left
        assert "cancelled the job" in log
    kept = checkpointed_images(parts)
    assert len(kept) >= 2 and not (out / ".captionflow.lock").exists()

    assert main([*argv, "--resume", *deterministic(tiny_models)]) == 0
    assert json.loads((out / "summary.json").read_text())["kept_from_earlier_run"] == len(kept)
    assert len(read_jsonl(out / "metadata.jsonl")) == 6


def test_a_stop_signal_stops_an_export_at_once_and_the_export_runs_again(
    tmp_path: Path,
) -> None:
    """An export caught writing its shards (40 big PNGs, re-encoded as JPEGs for webdataset,
    one a shard): stopped in one line, its lock gone; run again, it writes every shard."""
    gradient = np.linspace(0, 255, 3000, dtype=np.uint8)
    blue = np.full_like(gradient, 128)
    picture = np.stack(np.broadcast_arrays(gradient[:, None], gradient[None, :], blue), axis=-1)
    (tmp_path / "photos").mkdir()
    source = tmp_path / "photos" / "big-0.png"
    Image.fromarray(picture).save(source)
    rows = []
    for i in range(40):
        link = source.with_name(f"big-{i}.png")
        if i:
            os.link(source, link)  # 40 images, one file on disk
        rows.append({"file_name": f"photos/{link.name}", "image_uri": str(link), "text": "x"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["export", str(tmp_path), "--format", "webdataset", "--rows-per-shard", "1"]

    job = start_cli(argv)
    try:
        wait_for(lambda: any(tmp_path.glob(".shards.tmp-*/*.tar")), job, "a shard was staged")
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=60) == 143
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    log = job.stdout.read()
    assert log.rstrip().endswith(
        "captionflow: stopped by SIGTERM; run the same export again to write every shard"
    )
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    assert not (tmp_path / ".captionflow.lock").exists()

    assert main(argv) == 0
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 40
    assert not list(tmp_path.glob(".shards.tmp-*"))


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_while_the_lock_is_taken_stops_in_one_line_and_leaves_no_lock(
    tmp_path: Path, tiny_models: tuple[str, str], signum: int, code: int
) -> None:
    """The signal arrives as the lock settles (its file written, not yet read back)."""
    write_images(tmp_path / "images", 1)
    out = tmp_path / "out"
    argv = ["run", "--input", str(tmp_path / "images"), "--output", str(out), *models(tiny_models)]
    settling = (
        "import os, sys, time, types, captionflow.lock as lock\n"
        "def sleep(seconds):\n"
        f"    os.kill(os.getpid(), {int(signum)}); time.sleep(seconds)\n"
        "lock.time = types.SimpleNamespace(time=time.time, sleep=sleep)\n"
        "from captionflow.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", settling, *argv],
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": PYTHONPATH},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == code, done.stderr[-3000:]
    assert done.stderr.rstrip().endswith(
        f"captionflow: stopped by {signal.Signals(signum).name}; what was written is kept: run "
        "the same command with --resume to finish"
    )
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not (out / ".captionflow.lock").exists()


def test_the_stop_line_is_the_last_even_while_other_threads_log() -> None:
    """Beam's threads log on as a cancelled job winds down ("Job state changed to
    CANCELLED"): nothing of theirs may come after the line that says what happened."""
    noisy = (
        "import logging, signal, sys, threading, captionflow.cli as cli\n"
        "from captionflow.signals import Interrupted\n"
        "def noise():\n"
        "    while True: logging.getLogger('apache_beam').info('Job state changed')\n"
        "def run(argv):\n"
        "    threading.Thread(target=noise, daemon=True).start()\n"
        "    raise Interrupted(signal.SIGTERM)\n"
        "cli.run = run\n"
        "sys.exit(cli.main(['run']))"
    )
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", noisy],
            cwd=REPO,
            env=os.environ | {"PYTHONPATH": PYTHONPATH},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 143
        assert done.stderr.endswith(
            "captionflow: stopped by SIGTERM; what was written is kept: run the same command "
            "with --resume to finish\n"
        ), done.stderr[-300:]


def test_a_second_run_into_the_same_output_is_refused_while_the_first_runs(
    tmp_path: Path, tiny_models: tuple[str, str], capsys: pytest.CaptureFixture
) -> None:
    write_images(tmp_path / "images", 4)
    out = tmp_path / "out"
    argv = ["run", "--input", str(tmp_path / "images"), "--output", str(out)]
    first = stalled_run(
        [*argv, *deterministic(tiny_models, "stall")], out / ".metadata.jsonl.parts", 1
    )
    try:
        assert main([*argv, "--resume", *deterministic(tiny_models)]) == 2
        err = capsys.readouterr().err
        assert f"captionflow: error: another run is writing into {out} (process {first.pid}" in err
        assert first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # The holder is dead now: its lock is replaced at once, and its checkpoints kept.
    assert main([*argv, "--resume", *deterministic(tiny_models)]) == 0
    assert len(read_jsonl(out / "metadata.jsonl")) == 4
    assert json.loads((out / "summary.json").read_text())["kept_from_earlier_run"] >= 1


def test_a_killed_runs_lock_is_taken_over_at_once_by_a_process_that_reuses_its_id(
    tmp_path: Path,
) -> None:
    """A restarted container's first process has the id its killed run had, on the same
    host: that run is gone all the same. A lock this process holds is still respected."""
    earlier = {"run_id": "killed", "host": socket.gethostname(), "pid": os.getpid()}
    now = time.time()
    (tmp_path / LOCK_FILE).write_text(json.dumps(earlier | {"started": now, "heartbeat": now}))
    with OutputLock(str(tmp_path)) as lock:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["run_id"] == lock.holder.run_id
        with pytest.raises(OutputBusyError, match=f"process {os.getpid()} on"):
            OutputLock(str(tmp_path)).acquire()
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize(
    ("clock", "busy"),
    [(+3600.0, False), (-3600.0, True)],
    ids=["holder-clock-ahead-and-silent", "holder-clock-behind-and-alive"],
)
def test_a_holders_age_is_the_lock_files_own_time_not_its_clock(
    tmp_path: Path, clock: float, busy: bool
) -> None:
    """The heartbeat a holder on another machine writes is its clock's time; the file's
    modification time is the storage's. A clock an hour ahead must not keep a dead run's
    lock for an hour, nor one an hour behind let a second run in beside a live one."""
    now = time.time()
    holder = {"run_id": "other", "host": "another-machine", "pid": 1, "started": now}
    lock_file = tmp_path / LOCK_FILE
    lock_file.write_text(json.dumps(holder | {"heartbeat": now + clock}))
    written = now if busy else now - STALE_AFTER_SECS - 5
    os.utime(lock_file, (written, written))
    if busy:
        with pytest.raises(OutputBusyError, match=r"another-machine, started .*last seen 0 s ago"):
            OutputLock(str(tmp_path)).acquire()
    else:
        with OutputLock(str(tmp_path)) as lock:
            assert json.loads(lock_file.read_text())["run_id"] == lock.holder.run_id


@pytest.mark.parametrize("records", ["metadata.jsonl", "rejected.jsonl"])
def test_checkpoints_of_an_interrupted_run_are_not_dropped_without_resume(
    tmp_path: Path, tiny_models: tuple[str, str], capsys: pytest.CaptureFixture, records: str
) -> None:
    """Either file's: a run with --min-score may have checkpointed only rejects so far."""
    write_images(tmp_path / "images", 2)
    parts = tmp_path / "out" / f".{records}.parts"
    parts.mkdir(parents=True)
    (parts / "part-1.jsonl").write_text('{"image_uri": "/x.jpg", "text": "a cat"}\n')
    argv = ["run", "--input", str(tmp_path / "images"), "--output", str(tmp_path / "out")]
    assert main([*argv, *models(tiny_models)]) == 2
    assert (
        "holds 1 checkpoint file(s) of an interrupted run: pass --resume" in capsys.readouterr().err
    )
    assert (parts / "part-1.jsonl").exists()


class FailsAboveTwo(MisbehavingHandler):
    """A BLIP whose device refuses batches of more than two images with `error`, and which
    notes the size of every batch it is given."""

    def __init__(self, *args: object, error: Exception, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.error = error
        self.sizes: list[int] = []

    def before(self, images: ModelImages) -> None:
        self.sizes.append(len(images))
        if len(images) > 2:
            raise self.error


def test_out_of_device_memory_splits_the_batch_in_halves(tiny_blip: str) -> None:
    handler = FailsAboveTwo(tiny_blip, error=torch.OutOfMemoryError("CUDA out of memory."))
    images = [random_image(32, 32, seed=i) for i in range(8)]
    results = list(handler.run_inference(images, handler.load_model()))
    assert handler.sizes == [8, 4, 2, 2, 4, 2, 2]  # halves, never eight single-image calls
    assert [r.example for r in results] == images
    assert all(isinstance(r.inference, list) and r.inference for r in results)


def test_a_sticky_device_error_fails_the_bundle_not_every_image(
    tmp_path: Path, tiny_blip: str, tiny_clip: str
) -> None:
    error = torch.AcceleratorError("CUDA error: device-side assert triggered")
    handler = FailsAboveTwo(tiny_blip, error=error)
    with pytest.raises(DeviceFailedError, match="device-side assert triggered"):
        handler.run_inference([random_image(seed=i) for i in range(4)], handler.load_model())
    assert handler.sizes == [4]  # not retried image by image in a broken process

    paths = [str(p) for p in write_images(tmp_path, 4)]
    captioner = FailsAboveTwo(tiny_blip, error=error, max_batch_size=4)
    with (
        pytest.raises(DeviceFailedError, match="device-side assert triggered"),
        TestPipeline(runner="FnApiRunner") as p,
    ):
        _ = p | beam.Create(paths) | CaptionImages(captioner, ClipRankHandler(tiny_clip))
