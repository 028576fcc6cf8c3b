"""`captionflow run` end to end, as a user runs it, and its output loaded by `datasets`."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captionflow.cli import main, prepare
from captionflow.pipelines.caption import model_handlers
from tests.conftest import image_like_zoo, random_image, write_images


def models(tiny_blip: str, tiny_clip: str) -> list[str]:
    return ["--captioner", f"blip:{tiny_blip}", "--ranker", f"clip:{tiny_clip}"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def captioned_folder(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: tuple[str, str]
) -> Path:
    """A folder of images (one of them broken) captioned in place by the CLI."""
    folder = tmp_path_factory.mktemp("dataset")
    write_images(folder / "photos", 5)
    (folder / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    argv = ["run", "--input", str(folder), "--output", str(folder), "--num-captions", "3"]
    assert main(argv + models(*tiny_models)) == 0
    return folder


def test_cli_writes_one_caption_per_good_image(captioned_folder: Path) -> None:
    rows = read_jsonl(captioned_folder / "metadata.jsonl")
    assert sorted(r["file_name"] for r in rows) == [f"photos/image_{i:03d}.jpg" for i in range(5)]
    for row in rows:
        assert row["text"] == row["candidates"][0]["text"] and row["text"]
        assert 1 <= len(row["candidates"]) <= 3


def test_cli_reports_the_broken_image_as_an_error(captioned_folder: Path) -> None:
    (error,) = read_jsonl(captioned_folder / "errors.jsonl")
    assert error["image_uri"].endswith("photos/broken.jpg")
    assert error["stage"] == "decode" and error["error_type"] == "UnidentifiedImageError"


def test_output_loads_as_a_hugging_face_imagefolder(captioned_folder: Path) -> None:
    import datasets

    dataset = datasets.load_dataset("imagefolder", data_dir=str(captioned_folder), split="train")
    assert len(dataset) == 5
    assert {"image", "text", "score", "candidates"} <= set(dataset.column_names)
    rows = {r["file_name"]: r["text"] for r in read_jsonl(captioned_folder / "metadata.jsonl")}
    assert sorted(dataset["text"]) == sorted(rows.values())
    assert dataset[0]["image"].size[1] == 48


def test_original_tool_flags_and_a_jsonl_output_path_still_work(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    images = write_images(tmp_path / "imgs", 2)
    listing = tmp_path / "dataset.txt"
    listing.write_text("\n".join(str(p) for p in images) + "\n")
    out = tmp_path / "out" / "captions.jsonl"
    argv = ["run", "--dataset-filename", str(listing), "--output-filename", str(out)]
    assert main([*argv, "--limit", "1", *models(*tiny_models)]) == 0
    (row,) = read_jsonl(out)
    assert row["file_name"] == str(images[0])


def test_a_list_line_in_another_encoding_is_an_error_record_and_the_rest_is_captioned(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    images = write_images(tmp_path / "imgs", 2)
    listing = tmp_path / "dataset.txt"
    lines = [str(images[0]).encode(), b"imgs/caf\xe9.jpg", str(images[1]).encode()]
    listing.write_bytes(b"\n".join(lines) + b"\n")  # one Latin-1 line among UTF-8 ones
    out = tmp_path / "out"
    assert main(["run", "--input", str(listing), "--output", str(out), *models(*tiny_models)]) == 0
    assert sorted(r["image_uri"] for r in read_jsonl(out / "metadata.jsonl")) == [
        str(p) for p in images
    ]
    (error,) = read_jsonl(out / "errors.jsonl")
    assert error["image_uri"] == str(tmp_path / "imgs" / "caf\\xe9.jpg")
    assert (error["stage"], error["error_type"]) == ("read", "UndecodablePath")
    assert "line 2 of" in error["message"] and "fix the list's encoding" in error["message"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["images"], summary["captioned"], summary["failed"]) == (3, 2, 1)


@pytest.mark.parametrize(
    ("flag", "uri", "message"),
    [
        ("--input", "https://example.com/photos.txt", "no Beam filesystem reads https:// URLs"),
        ("--input", "file:///data/photos", "no Beam filesystem reads file:// URIs: write local"),
        ("--output", "https://example.com/out", "no Beam filesystem reads https:// URLs"),
    ],
)
def test_a_uri_that_no_beam_filesystem_reads_is_a_usage_error(
    image_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    tiny_models: tuple[str, str],
    flag: str,
    uri: str,
    message: str,
) -> None:
    """Not three attempts that each fail with a traceback telling to install apache-beam[gcp]."""
    paths = {"--input": str(image_dir), "--output": str(tmp_path / "out")} | {flag: uri}
    argv = ["run", "--input", paths["--input"], "--output", paths["--output"]]
    assert main([*argv, *models(*tiny_models)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"captionflow: error: {flag}: {uri!r}: {message}")


def test_a_list_line_that_no_beam_filesystem_reads_is_an_error_record_saying_why(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    (image,) = write_images(tmp_path / "imgs", 1)
    listing = tmp_path / "dataset.txt"
    listing.write_text(f"{image}\nhttps://example.com/a.jpg\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["run", "--input", str(listing), "--output", str(out), *models(*tiny_models)]) == 0
    assert [r["image_uri"] for r in read_jsonl(out / "metadata.jsonl")] == [str(image)]
    (error,) = read_jsonl(out / "errors.jsonl")
    assert (error["image_uri"], error["stage"]) == ("https://example.com/a.jpg", "read")
    assert error["error_type"] == "UnreadableURIError"
    assert error["message"].startswith("no Beam filesystem reads https:// URLs: download")


def test_a_file_name_that_is_not_utf8_is_an_error_record_and_the_rest_is_captioned(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    folder = tmp_path / "photos"
    images = write_images(folder, 2)
    with open(os.fsencode(folder) + b"/caf\xe9.jpg", "wb") as latin1:  # a Latin-1 file name
        latin1.write(images[0].read_bytes())
    out = tmp_path / "out"
    assert main(["run", "--input", str(folder), "--output", str(out), *models(*tiny_models)]) == 0
    assert sorted(r["image_uri"] for r in read_jsonl(out / "metadata.jsonl")) == [
        str(p) for p in images
    ]
    (error,) = read_jsonl(out / "errors.jsonl")
    assert error["image_uri"] == f"{folder}/caf\\xe9.jpg"
    assert (error["stage"], error["error_type"]) == ("read", "UndecodablePath")
    assert "caf\\xe9.jpg" in error["message"] and "convmv" in error["message"]


def test_every_file_that_looks_like_an_image_gets_a_record(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    paths, link_errors = image_like_zoo(tmp_path / "zoo")
    out = tmp_path / "out"
    argv = ["run", "--input", str(tmp_path / "zoo"), "--output", str(out)]
    assert main([*argv, *models(*tiny_models)]) == 0
    captioned = {r["image_uri"] for r in read_jsonl(out / "metadata.jsonl")}
    errors = {e["image_uri"]: e for e in read_jsonl(out / "errors.jsonl")}
    assert captioned == {str(tmp_path / "zoo" / n) for n in ["image_000.jpg", "alias.jpg"]}
    assert sorted(captioned | set(errors)) == sorted(paths + list(link_errors))
    assert {uri: errors[uri]["stage"] for uri in link_errors} == dict.fromkeys(link_errors, "read")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-captions", "0"], "--num-captions: Input should be greater than or equal to 1"),
        (["--caption-batch-size", "-3"], "--caption-batch-size: Input should be greater"),
        (["--captioner", "nosuch"], "--captioner: unknown captioner 'nosuch'"),
        (
            ["--device", "gpu"],
            "--device: 'gpu' is not a device: use auto, cpu, cuda, cuda:N or mps",
        ),
        (["--decoding", "greedy"], "--decoding: Input should be 'sample' or 'beam'"),
        (
            ["--min-new-tokens", "9", "--max-new-tokens", "3"],
            "--max-new-tokens: must be at least --min-new-tokens (9)",
        ),
        (["--num_captions", "3"], "unknown flag(s): --num_captions"),
        (["--limit", "0"], "--limit: Input should be greater than or equal to 1"),
        (["--attempts", "0"], "--attempts: Input should be greater than or equal to 1"),
        (["--checkpoint-every", "-1"], "--checkpoint-every: Input should be greater than"),
        (["--dataset-filename", "x.txt"], "--input and --dataset-filename name the same thing"),
        (["--decoding", "beam", "--top-p", "0.5"], "--top-p: cannot be used with beam decoding"),
        (["--num-beams", "4"], "--num-beams: cannot be used with sample decoding"),
        (["--device", "cuda"], "--device: cuda was asked for, but this machine has no usable"),
        (["--device", "mps"], "--device: mps was asked for, but MPS is not available here"),
        (["--max-failure-rate", "2"], "--max-failure-rate: Input should be less than or equal"),
        (["--max-side", "8"], "--max-side: Input should be greater than or equal to 32"),
        (["--runner", "NoSuchRunner"], "--runner: unknown runner 'NoSuchRunner': use one of"),
        (["--runner", "no.such.Runner"], "--runner: cannot load runner 'no.such.Runner': No mod"),
        (["--max-bytes", "0"], "--max-bytes: Input should be greater than or equal to 1"),
        (
            ["--engine", "local", "--model-copies", "2"],
            "--model-copies: counts shared engine processes, so it cannot be used with --engine "
            "local",
        ),
        (
            ["--sidecar-extension", "txt"],
            "--sidecar-extension: 'txt' is not a file extension: a dot, then no dot, / or \\ "
            "(e.g. .txt or .caption)",
        ),
        (["--min-score", "nan"], "--min-score: Input should be a finite number"),
        (["--min-score", "inf"], "--min-score: Input should be a finite number"),
        (["--temperature", "inf"], "--temperature: Input should be a finite number"),
        (["--repetition-penalty", "inf"], "--repetition-penalty: Input should be a finite"),
        (["--rank-dtype", "int8"], "--rank-dtype: Input should be 'auto', 'float32', 'float16'"),
        (["--captioner", "clip:/models/clip"], "--captioner: unknown captioner 'clip' in"),
        (["--captioner", "blp:org/name"], "--captioner: unknown captioner 'blp' in"),
        (["--ranker", "blip:/models/blip"], "--ranker: unknown ranker 'blip' in"),
        (  # a path, not a hub id: no advice to download it from the Hub
            ["--captioner", "blip:/no/such/model"],
            "--captioner: cannot load /no/such/model: no such directory\n",
        ),
        (  # and no advice to download what is no model's name
            ["--captioner", "a/b/c"],
            "--captioner: cannot load a/b/c: neither a folder here nor a Hugging Face hub id "
            "(org/name)\n",
        ),
    ],
)
def test_bad_options_stop_before_any_work_with_one_clear_line(
    image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, flags: list, message: str
) -> None:
    argv = ["run", "--input", str(image_dir), "--output", str(tmp_path / "out"), *flags]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"captionflow: error: {message}" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("output", ["a" * 300, "/proc/captionflow-out"])
def test_an_output_folder_that_cannot_be_made_is_one_clear_line(
    image_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    tiny_models: tuple[str, str],
    output: str,
) -> None:
    """Past the checks that can be made without writing (a too long name, a folder where
    nothing can be made): the first write, the run's lock, says why in one line."""
    out = str(tmp_path / output) if not output.startswith("/") else output
    argv = ["run", "--input", str(image_dir), "--output", out, *models(*tiny_models)]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("captionflow: error: --output: cannot write in ")
    assert line.endswith(("File name too long", "No such file or directory"))


@pytest.mark.parametrize("name", ["x.csv", "x.list", "notes"])
def test_an_input_file_that_is_neither_a_list_nor_an_image_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    (tmp_path / name).write_text("a.jpg\n")
    assert main(["run", "--input", str(tmp_path / name), "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"captionflow: error: --input: {str(tmp_path / name)!r} is not a list file" in error
    assert "(.txt or .lst" in error and "an image" in error and "a folder" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda d: d / "empty", "no images found in '{}': no file in it looks like an image"),
        (lambda d: d / "notes", "no images found in '{}': no file in it looks like an image"),
        (lambda d: d / "notes" / "*.jpg", "no images found: no file matches '{}'"),
        (lambda d: d / "empty.txt", "no images found in '{}': it lists no path"),
        (lambda d: d / "comments.txt", "no images found in '{}': it lists no path"),
    ],
    ids=["empty folder", "folder without images", "glob", "empty list", "list of comments"],
)
def test_no_images_found_is_a_usage_error_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture, make_input: object, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.md").write_text("no images here")
    (tmp_path / "notes" / "deeper").mkdir()
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "comments.txt").write_bytes(b"\xef\xbb\xbf# nothing yet\r\n\r\n   \r\n")
    source = str(make_input(tmp_path))
    assert main(["run", "--input", source, "--output", str(tmp_path / "out")]) == 2
    assert f"captionflow: error: --input: {message.format(source)}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_input_path_that_is_not_utf8_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = os.fsencode(tmp_path) + b"/caf\xe9"
    os.makedirs(folder)
    assert main(["run", "--input", os.fsdecode(folder), "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"captionflow: error: --input: '{tmp_path}/caf\\xe9' is not valid UTF-8" in error
    assert "convmv" in error


def test_every_bad_value_is_reported_at_once(
    image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    flags = ["--num-captions", "0", "--decoding", "beam", "--top-p", "0.5"]
    flags += ["--min-new-tokens", "9", "--max-new-tokens", "3", "--caption-batch-size", "0"]
    argv = ["run", "--input", str(image_dir), "--output", str(tmp_path / "out"), *flags]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert sorted(line.split(": ")[2] for line in lines) == [
        "--caption-batch-size",
        "--max-new-tokens",
        "--num-captions",
        "--top-p",
    ]
    assert not any("_" in line.split(": ", 3)[3] for line in lines), lines


def test_an_errors_file_named_as_the_output_is_refused(
    image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["run", "--input", str(image_dir), "--output", str(tmp_path / "errors.jsonl")]
    assert main(argv) == 2
    assert "--output: errors.jsonl is where failed images are listed" in capsys.readouterr().err


def test_missing_input_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "--input", str(tmp_path / "nope"), "--output", str(tmp_path)]) == 2
    assert "--input: " in capsys.readouterr().err


def test_unreachable_hub_model_fails_fast_with_a_hint(
    image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, tiny_clip: str
) -> None:
    argv = ["run", "--input", str(image_dir), "--output", str(tmp_path), "--ranker", tiny_clip]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "--captioner: cannot load Salesforce/blip-image-captioning-base" in error
    assert "--captioner blip:DIR" in error


def test_python_dash_m_entry_point_runs(image_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "captionflow", "run", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert "--num-captions" in done.stdout and "--dataset-filename" in done.stdout


def test_relative_input_and_output_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_models: tuple[str, str]
) -> None:
    write_images(tmp_path / "pics", 1)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--input", "pics", "--output", "out/run", *models(*tiny_models)]) == 0
    (row,) = read_jsonl(tmp_path / "out" / "run" / "metadata.jsonl")
    assert row["file_name"] == str(tmp_path / "pics" / "image_000.jpg")


def test_output_that_cannot_be_written_is_reported(
    image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["run", "--input", str(image_dir), "--output", str(blocker / "out")]) == 2
    assert "output: cannot write under" in capsys.readouterr().err


def test_missing_required_flags_are_named(capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "--output", "x"]) == 2
    assert "captionflow: error: --input is required" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--seed", "abc"], "--seed: invalid int value: 'abc'"),
        (["run", "--min-score", "abc"], "--min-score: invalid float value: 'abc'"),
        (["run", "--limit", "x"], "--limit: invalid int value: 'x'"),
        (["run", "--engine", "gpu"], "--engine: invalid choice: 'gpu' (choose from 'auto', "),
        (["run", "--direct_num_workers", "two"], "--direct_num_workers: invalid int value: 'two'"),
        (["export", "out", "--rows-per-shard", "x"], "--rows-per-shard: invalid int value: 'x'"),
        (["export", "out"], "the following arguments are required: --format"),
        (["report", "out", "--workers", "x"], "--workers: invalid int value: 'x'"),
        (["report"], "the following arguments are required: output"),
        (["report", "out", "--nope"], "unrecognized arguments: --nope"),
        (["caption"], "command: invalid choice: 'caption' (choose from 'run', 'export', "),
        ([], "the following arguments are required: command"),
    ],
)
def test_values_argparse_refuses_are_one_line_too_not_the_usage(
    image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, argv: list, message: str
) -> None:
    if argv[:1] == ["run"]:
        argv = [*argv, "--input", str(image_dir), "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"captionflow: error: {message}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [[], ["run"], ["export"], ["report"]])
def test_help_still_prints_the_usage_and_exits_0(
    command: list, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: captionflow")


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            "run",
            {
                "--device": "auto, cpu, cuda, cuda:N or mps (default: auto)",
                "--dtype": "(default: auto)",
                "--max-side": "(default: 768)",
                "--max-pixels": "(default: 100000000)",
                "--limit": "a list file's first N entries, a folder's or glob's first N paths in "
                "sorted order",
            },
        ),
        ("report", {"--page-size": "(default: 200)", "--thumbnail-side": "(default: 192)"}),
    ],
)
def test_help_names_every_device_every_default_and_what_limit_takes(
    capsys: pytest.CaptureFixture, command: str, expected: dict
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    blocks = re.split(r"\n  (?=--)", capsys.readouterr().out)  # one a flag, then its help
    helps = {block.split()[0]: " ".join(block.split()) for block in blocks}
    for flag, text in expected.items():
        assert text in helps[flag], helps[flag]


def test_models_shared_across_processes_through_beams_proxy(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    """`--model-copies`: the loaded models live in a separate process and are called by proxy."""
    write_images(tmp_path / "pics", 3)
    argv = ["run", "--input", str(tmp_path / "pics"), "--output", str(tmp_path / "out")]
    assert main([*argv, "--model-copies", "1", *models(*tiny_models)]) == 0
    assert len(read_jsonl(tmp_path / "out" / "metadata.jsonl")) == 3


def test_each_model_runs_in_its_own_dtype_else_in_dtype(
    image_dir: Path, tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    blip, clip = tiny_models
    argv = ["run", "--input", str(image_dir), "--output", str(tmp_path / "out"), "--device", "cpu"]
    argv += ["--captioner", f"blip:{blip}", "--ranker", f"clip:{clip}"]
    config, _ = prepare([*argv, "--dtype", "float16", "--caption-dtype", "bfloat16"])
    captioner, ranker = model_handlers(config)
    assert (captioner.dtype, ranker.dtype) == ("bfloat16", "float16")
    captioner, ranker = model_handlers(prepare([*argv, "--rank-dtype", "float32"])[0])
    assert (captioner.dtype, ranker.dtype) == ("auto", "float32")
    captioner, ranker = model_handlers(prepare([*argv, "--caption-dtype", "bfloat16"])[0])
    assert captioner.load_model().model.dtype == torch.bfloat16
    assert ranker.load_model().model.dtype == torch.float32  # auto, on a CPU


def test_decoder_chooses_blips_decode_loop(
    image_dir: Path, tmp_path: Path, tiny_models: tuple[str, str], capsys: pytest.CaptureFixture
) -> None:
    blip, clip = tiny_models
    argv = ["run", "--input", str(image_dir), "--output", str(tmp_path / "out"), "--device", "cpu"]
    argv += ["--captioner", f"blip:{blip}", "--ranker", f"clip:{clip}"]
    captioner, _ = model_handlers(prepare(argv)[0])
    assert captioner.load_model().fast is not None  # the default
    captioner, _ = model_handlers(prepare([*argv, "--decoder", "reference"])[0])
    assert captioner.load_model().fast is None
    assert main([*argv, "--decoder", "slow"]) == 2
    assert "--decoder" in capsys.readouterr().err


def test_every_record_has_its_candidates_and_the_images_upright_size(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    """`captions` (best first: diffusers picks one per step when pointed at it), and `width` and
    `height` of the image as shown, not of the smaller copy decoded for the models."""
    import datasets
    from PIL import Image

    from tests.conftest import random_image

    folder = tmp_path / "data"
    folder.mkdir()
    random_image(640, 480, seed=1).save(folder / "large.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: 200 wide, 400 high
    random_image(400, 200, seed=2).save(folder / "turned.jpg", exif=exif)
    random_image(64, 48, seed=3).save(folder / "small.png")
    argv = ["run", "--input", str(folder), "--output", str(folder), "--num-captions", "3"]
    assert main(argv + models(*tiny_models)) == 0
    rows = {row["file_name"]: row for row in read_jsonl(folder / "metadata.jsonl")}
    sizes = {name: (row["width"], row["height"]) for name, row in rows.items()}
    assert sizes == {"large.jpg": (640, 480), "turned.jpg": (200, 400), "small.png": (64, 48)}
    for row in rows.values():
        assert row["captions"] == [candidate["text"] for candidate in row["candidates"]]
        assert row["captions"][0] == row["text"]
    dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert {"captions", "width", "height"} <= set(dataset.column_names)
    loaded = {(row["width"], row["height"], tuple(row["captions"])) for row in dataset}
    expected = {(*sizes[name], tuple(row["captions"])) for name, row in rows.items()}
    assert loaded == expected


def test_sidecar_caption_files_beside_the_images_kept_unless_overwritten(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    folder = tmp_path / "data"
    write_images(folder / "photos", 3)
    (folder / "photos" / "broken.jpg").write_bytes(b"not a picture")
    (folder / "photos" / "image_001.txt").write_text("my own caption\n")
    argv = ["run", "--input", str(folder), "--output", str(folder), *models(*tiny_models)]
    assert main([*argv, "--format", "imagefolder,sidecar"]) == 0
    rows = {row["file_name"]: row["text"] for row in read_jsonl(folder / "metadata.jsonl")}
    assert len(rows) == 3
    for name, text in rows.items():
        caption = (folder / name).with_suffix(".txt").read_text()
        expected = "my own caption" if name.endswith("image_001.jpg") else text
        assert caption == expected + "\n"
    assert not (folder / "photos" / "broken.txt").exists()
    assert not list(folder.rglob("*.tmp-*"))
    # The broken image stays in the folder, captionless: a kohya-style trainer would take it.
    (warning,) = json.loads((folder / "summary.json").read_text())["warnings"]
    assert warning.startswith("1 failed or rejected image(s) got no caption file")

    assert main([*argv, "--format", "sidecar", "--overwrite-captions"]) == 0
    rows = {row["file_name"]: row["text"] for row in read_jsonl(folder / "metadata.jsonl")}
    assert (folder / "photos" / "image_001.txt").read_text() == rows["photos/image_001.jpg"] + "\n"

    assert main([*argv, "--format", "sidecar", "--sidecar-extension", ".caption"]) == 0
    assert sorted(p.name for p in (folder / "photos").glob("*.caption")) == [
        f"image_{i:03d}.caption" for i in range(3)
    ]


def test_a_glob_over_the_output_never_takes_the_runs_own_files_for_images(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    """`--input 'DIR/**' --output DIR`: the running job's lock, and an earlier run's records,
    summary and shards, lie where the glob looks; none of them is an input."""
    write_images(tmp_path / "sub", 2)
    glob = str(tmp_path / "**")
    argv = ["run", "--input", glob, "--output", str(tmp_path), *models(*tiny_models)]
    for more in (["--format", "imagefolder,parquet"], ["--resume", "--format", "webdataset"]):
        assert main([*argv, *more]) == 0
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["images"] == 2 and summary["failed"] == 0, summary
    assert (tmp_path / "errors.jsonl").read_text() == ""
    assert len(read_jsonl(tmp_path / "metadata.jsonl")) == 2


@pytest.mark.parametrize("extension", [".jpg", ".PNG", ".webp", ".heic"])
def test_a_sidecar_extension_that_names_images_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, extension: str
) -> None:
    """Caption files named like images would overwrite the images (`--overwrite-captions`)
    or be read as images by the next run."""
    images = write_images(tmp_path, 2)
    argv = ["run", "--input", str(tmp_path), "--output", str(tmp_path), "--format", "sidecar"]
    assert main([*argv, "--sidecar-extension", extension, "--overwrite-captions"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("captionflow: error: --sidecar-extension: ")
    assert f"{extension} is an image extension" in line
    assert all(image.read_bytes()[:2] == b"\xff\xd8" for image in images)  # still JPEGs


def test_caption_files_never_take_the_runs_own_names_nor_are_shared(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    """`metadata.png`'s caption file would be the run's `metadata.jsonl` (and a `metadata.jsonl`
    in any folder is read by `datasets`); `a.jpg` and `a.png` would share `a.jsonl`, which
    trainers pair with both. The first is not written, and both are warned about."""
    for name in ("metadata.png", "a.jpg", "a.png", "sub/metadata.jpg", "b.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        random_image(40, 32, seed=len(name)).save(tmp_path / name)
    argv = ["run", "--input", str(tmp_path), "--output", str(tmp_path), *models(*tiny_models)]
    assert main([*argv, "--format", "imagefolder,sidecar", "--sidecar-extension", ".jsonl"]) == 0
    rows = read_jsonl(tmp_path / "metadata.jsonl")  # the run's own, whole
    assert len(rows) == 5
    assert not (tmp_path / "sub" / "metadata.jsonl").exists()
    assert (tmp_path / "b.jsonl").read_text() == next(
        r["text"] for r in rows if r["file_name"] == "b.jpg"
    ) + "\n"
    assert (tmp_path / "a.jsonl").exists()
    warnings = json.loads((tmp_path / "summary.json").read_text())["warnings"]
    assert any("metadata.png" in w and "sub/metadata.jpg" in w for w in warnings), warnings
    assert any("a.jpg" in w and "a.png" in w and "a.jsonl" in w for w in warnings), warnings


def test_caption_files_of_images_with_names_near_the_file_name_limit(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    """A file name may be 255 bytes: `fits`' caption file is 255 bytes long, written under a
    short temporary name (a suffix on its own name would be too long); `over`'s would be 259,
    so it gets none, and a warning; neither fails the run."""
    fits, over = "f" * 247 + ".jpg", "o" * 251 + ".jpg"
    for seed, name in enumerate((fits, over, "short.jpg")):
        random_image(40, 32, seed=seed).save(tmp_path / name)
    argv = ["run", "--input", str(tmp_path), "--output", str(tmp_path), *models(*tiny_models)]
    argv += ["--format", "imagefolder,sidecar", "--sidecar-extension", ".caption"]
    assert main([*argv, "--attempts", "1"]) == 0
    rows = {row["file_name"]: row["text"] for row in read_jsonl(tmp_path / "metadata.jsonl")}
    assert len(rows) == 3
    assert (tmp_path / ("f" * 247 + ".caption")).read_text() == rows[fits] + "\n"
    assert (tmp_path / "short.caption").read_text() == rows["short.jpg"] + "\n"
    assert sorted(p.name for p in tmp_path.glob("*.caption")) == [
        "f" * 247 + ".caption",
        "short.caption",
    ]
    assert not list(tmp_path.glob(".*tmp-*"))
    warnings = json.loads((tmp_path / "summary.json").read_text())["warnings"]
    assert any("1 image(s) got no caption file" in w and over in w for w in warnings), warnings


@pytest.mark.parametrize("where", ["list file", "folder elsewhere"])
def test_sidecar_is_refused_before_any_work_for_images_outside_the_output(
    tmp_path: Path, capsys: pytest.CaptureFixture, where: str
) -> None:
    images = write_images(tmp_path / "photos", 2)
    source = tmp_path / "photos"
    if where == "list file":
        source = tmp_path / "photos" / "dataset.txt"
        source.write_text("\n".join(map(str, images)) + "\n")
    argv = ["run", "--input", str(source), "--output", str(tmp_path / "out"), "--format", "sidecar"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "--format: sidecar writes a caption file beside each image" in error
    assert "--format imagefolder" in error
    assert not (tmp_path / "out").exists()


RUN_FORMATS = "use imagefolder, sidecar, parquet or webdataset"


@pytest.mark.parametrize(
    ("command", "value", "message"),
    [
        ("run", "zip", f"--format: 'zip' is not a format: {RUN_FORMATS}"),
        ("run", "PARQUET", f"--format: 'PARQUET' is not a format: {RUN_FORMATS}"),
        ("run", "", f"--format: '' is not a format: {RUN_FORMATS}"),
        ("run", "parquet,,sidecar", f"--format: '' is not a format: {RUN_FORMATS}"),
        (
            "export",
            "imagefolder",
            "--format: 'imagefolder' is not a format export writes (metadata.jsonl is the run's "
            "own): use sidecar, parquet or webdataset",
        ),
        ("export", "bogus", "--format: 'bogus' is not a format export writes"),
    ],
    ids=["unknown", "upper case", "empty", "empty item", "export imagefolder", "export unknown"],
)
def test_an_unknown_format_is_refused_in_one_line_naming_it(
    image_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    command: str,
    value: str,
    message: str,
) -> None:
    out = tmp_path / "o"
    if command == "run":
        argv = ["run", "--input", str(image_dir), "--output", str(out), "--format", value]
    else:
        out.mkdir()
        (out / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": "a cat"}\n')
        argv = ["export", str(out), "--format", value]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"captionflow: error: {message}")
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert written == (["metadata.jsonl"] if command == "export" else [])


def test_the_readmes_recipe_loads_images_kept_apart_from_the_output(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    import datasets

    write_images(tmp_path / "photos", 2)
    out = tmp_path / "out"
    argv = ["run", "--input", str(tmp_path / "photos"), "--output", str(out)]
    assert main([*argv, *models(*tiny_models)]) == 0
    ds = datasets.load_dataset("json", data_files=str(out / "metadata.jsonl"), split="train")
    ds = ds.add_column("image", ds["image_uri"]).cast_column("image", datasets.Image())
    assert sorted(row["image"].size for row in ds) == [(64, 48), (72, 48)]
    assert all(row["text"] for row in ds)


def test_caption_controls_shape_the_candidates_and_the_final_caption(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    """`--remove-pattern` and `--min-words` act on the candidates before ranking (an image left
    with none is an error record saying why); `--prefix` and `--suffix` go around the final
    caption and every candidate, not into what the ranker scored."""
    folder = tmp_path / "data"
    write_images(folder, 4)
    out = tmp_path / "out"
    argv = ["run", "--input", str(folder), "--output", str(out), "--num-captions", "4"]
    argv += models(*tiny_models)
    assert main(argv) == 0
    plain = {row["file_name"]: row for row in read_jsonl(out / "metadata.jsonl")}
    word = plain[sorted(plain)[0]]["text"].split()[0]  # a word the captioner writes

    controls = ["--remove-pattern", rf"\b{word}\b", "--prefix", "sks, ", "--suffix", "."]
    assert main([*argv, "--output", str(tmp_path / "ruled"), *controls]) == 0
    rows = read_jsonl(tmp_path / "ruled" / "metadata.jsonl")
    errors = (
        read_jsonl(tmp_path / "ruled" / "errors.jsonl")
        if (tmp_path / "ruled" / "errors.jsonl").exists()
        else []
    )
    assert len(rows) + len(errors) == 4 and rows
    for row in rows:
        assert row["text"].startswith("sks, ") and row["text"].endswith(".")
        assert row["captions"][0] == row["text"]
        for candidate in row["captions"]:
            assert candidate.startswith("sks, ") and candidate.endswith(".")
            assert word not in candidate[5:-1].split()

    assert main([*argv, "--output", str(tmp_path / "long"), "--min-words", "1000"]) == 3
    assert not read_jsonl(tmp_path / "long" / "metadata.jsonl")
    errors = read_jsonl(tmp_path / "long" / "errors.jsonl")
    assert len(errors) == 4
    assert {e["error_type"] for e in errors} == {"NoCaption"}
    assert "--min-words" in errors[0]["message"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--remove-pattern", "(unclosed"], "--remove-pattern: '(unclosed' is not a regular"),
        (["--min-words", "-1"], "--min-words: Input should be greater than or equal to 0"),
        (["--bad-words", "dog,,cat"], "--bad-words: a bad word cannot be empty"),
    ],
)
def test_bad_caption_controls_are_refused_by_flag(
    image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, flags: list, message: str
) -> None:
    argv = ["run", "--input", str(image_dir), "--output", str(tmp_path / "o"), *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_min_score_sends_low_scoring_images_to_rejected_and_counts_them(
    tmp_path: Path, tiny_models: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "data"
    write_images(folder / "photos", 6)
    (folder / "photos" / "broken.jpg").write_bytes(b"not a picture")
    argv = ["run", "--input", str(folder), "--output", str(folder), *models(*tiny_models)]
    argv += ["--decoding", "beam", "--num-beams", "2", "--num-captions", "3"]  # repeatable
    assert main(argv) == 0
    decoding = json.loads((folder / "summary.json").read_text())["settings"]["decoding"]
    assert (decoding["num_beams"], decoding["beam_width"]) == (2, 3)  # what was asked, and used
    scores = sorted(row["score"] for row in read_jsonl(folder / "metadata.jsonl"))
    threshold = (scores[2] + scores[3]) / 2  # three below, three above

    out = tmp_path / "filtered"
    with caplog.at_level(logging.INFO, logger="captionflow"):
        assert main([*argv, "--output", str(out), "--min-score", str(threshold)]) == 0
    kept, rejected = read_jsonl(out / "metadata.jsonl"), read_jsonl(out / "rejected.jsonl")
    assert sorted(r["score"] for r in kept) == pytest.approx(scores[3:], rel=1e-5)
    assert sorted(r["score"] for r in rejected) == pytest.approx(scores[:3], rel=1e-5)
    assert all(r["candidates"] and r["file_name"] for r in rejected)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["captioned"], summary["rejected"], summary["failed"]) == (3, 3, 1)
    assert summary["images"] == 7
    assert "summary: 7 images: 3 captioned, 3 rejected, 0 kept from an earlier run, 1 failed" in (
        caplog.text
    )

    assert main([*argv, "--output", str(out), "--min-score", str(threshold), "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["captioned"], summary["rejected"], summary["kept_from_earlier_run"]) == (
        0,
        0,
        6,
    )
    assert (
        len(read_jsonl(out / "rejected.jsonl")) == 3
        and len(read_jsonl(out / "metadata.jsonl")) == 3
    )

    # A fresh run without --min-score starts over: no earlier run's rejects stay beside its
    # records (they would break the accounting, and a later --resume would skip them).
    assert main([*argv, "--output", str(out)]) == 0
    assert len(read_jsonl(out / "metadata.jsonl")) == 6
    assert (out / "rejected.jsonl").read_text() == ""


def test_parquet_shards_embed_the_images_and_load_with_datasets(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    import datasets
    import pyarrow.parquet as pq

    write_images(tmp_path / "photos", 5)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a picture")
    out = tmp_path / "out"
    argv = ["run", "--input", str(tmp_path / "photos"), "--output", str(out), *models(*tiny_models)]
    argv += ["--format", "imagefolder,parquet", "--rows-per-shard", "2"]
    assert main(argv) == 0
    shards = sorted(p.name for p in (out / "data").iterdir())
    assert shards == [f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    assert not [p for p in out.iterdir() if p.name.startswith(".data")]
    rows = {row["image_uri"]: row for row in read_jsonl(out / "metadata.jsonl")}
    table = pq.read_table(out / "data")
    assert table.num_rows == 5 and table.column_names[0] == "image"
    for record in table.to_pylist():
        assert record["image"]["bytes"] == Path(record["image_uri"]).read_bytes()
        assert record["text"] == rows[record["image_uri"]]["text"]

    for loaded in (
        datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train"),
        datasets.load_dataset(str(out), split="train"),
    ):
        assert len(loaded) == 5
        assert sorted(r["image"].size for r in loaded) == sorted(
            (r["width"], r["height"]) for r in rows.values()
        )
        assert sorted(loaded["text"]) == sorted(r["text"] for r in rows.values())

    assert main([*argv, "--resume"]) == 0  # the shards are made again, from the whole file
    assert pq.read_table(out / "data").num_rows == 5
    assert json.loads((out / "summary.json").read_text())["warnings"] == []  # images elsewhere

    # A later run without parquet leaves the shards (they are not its own), and says that they
    # no longer match the records.
    argv[argv.index("imagefolder,parquet")] = "imagefolder"
    assert main(argv) == 0
    warnings = json.loads((out / "summary.json").read_text())["warnings"]
    assert any("3 data/*.parquet" in line and "captionflow export" in line for line in warnings)


def test_parquet_shards_beside_the_images_are_warned_about_and_the_images_still_load(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    """Captioning in place with parquet: `datasets` takes `data/train-*-of-*.parquet` for the
    whole dataset, so `load_dataset("imagefolder", data_dir=...)` no longer sees the images;
    the run says so, and the way it names loads them."""
    import datasets

    write_images(tmp_path / "photos", 3)
    argv = ["run", "--input", str(tmp_path), "--output", str(tmp_path), *models(*tiny_models)]
    assert main([*argv, "--format", "imagefolder,parquet"]) == 0
    texts = sorted(row["text"] for row in read_jsonl(tmp_path / "metadata.jsonl"))
    with pytest.raises(ValueError, match="corresponds to no data"):
        datasets.load_dataset("imagefolder", data_dir=str(tmp_path), split="train")
    (warning,) = json.loads((tmp_path / "summary.json").read_text())["warnings"]
    assert warning.startswith("the parquet shards in OUTPUT/data/ hide the output's images")
    files = {"train": f"{tmp_path}/**"}
    loaded = datasets.load_dataset("imagefolder", data_files=files, split="train")
    assert sorted(loaded["text"]) == texts and loaded[0]["image"].size[1] == 48
    parquet = datasets.load_dataset("parquet", data_dir=str(tmp_path / "data"), split="train")
    assert sorted(parquet["text"]) == texts


def test_parquet_shards_keep_the_split_folders_splits(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    """Images in `train/`, `val-2024/` and `my_test/`: the parquet shards are named for
    `datasets`' splits (`data/validation-00000-of-00001.parquet`), so the Hub and
    `load_dataset` give the splits ImageFolder gives, and no test image is trained on."""
    import datasets

    out = tmp_path / "photos"
    for seed, folder in enumerate(("train", "train/sub", "val-2024", "my_test", "my_test")):
        (out / folder).mkdir(parents=True, exist_ok=True)
        random_image(40 + seed, 32, seed=seed).save(out / folder / f"{seed}.jpg")
    argv = ["run", "--input", str(out), "--output", str(out), *models(*tiny_models)]
    assert main([*argv, "--format", "imagefolder,parquet", "--rows-per-shard", "1"]) == 0
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        *(f"test-{i:05d}-of-00002.parquet" for i in range(2)),
        *(f"train-{i:05d}-of-00002.parquet" for i in range(2)),
        "validation-00000-of-00001.parquet",
    ]
    by_split = {"train": ["train/0.jpg", "train/sub/1.jpg"], "validation": ["val-2024/2.jpg"]}
    by_split["test"] = ["my_test/3.jpg", "my_test/4.jpg"]
    loaded = datasets.load_dataset("parquet", data_dir=str(out / "data"))
    assert {split: sorted(ds["file_name"]) for split, ds in loaded.items()} == by_split
    images = datasets.load_dataset("imagefolder", data_files={"train": f"{out}/train/**"})
    assert len(images["train"]) == 2


def test_webdataset_shards_hold_image_caption_and_record_and_load_with_both_readers(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    import datasets
    import webdataset

    write_images(tmp_path / "photos", 4)
    write_images(tmp_path / "photos" / "png", 1, suffix=".png")
    out = tmp_path / "out"
    argv = ["run", "--input", str(tmp_path / "photos"), "--output", str(out), *models(*tiny_models)]
    assert main([*argv, "--format", "webdataset", "--rows-per-shard", "2"]) == 0
    shards = sorted((out / "shards").iterdir())
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    rows = {row["image_uri"]: row for row in read_jsonl(out / "metadata.jsonl")}

    samples = list(webdataset.WebDataset([str(p) for p in shards], shardshuffle=False))
    assert len(samples) == 5
    for sample in samples:
        record = json.loads(sample["json"])
        assert sample["txt"].decode() == rows[record["image_uri"]]["text"] == record["text"]
        assert sample["jpg"][:2] == b"\xff\xd8"  # a JPEG, the PNG too
        if record["image_uri"].endswith(".jpg"):
            assert sample["jpg"] == Path(record["image_uri"]).read_bytes()
    decoded = next(iter(webdataset.WebDataset(str(shards[0]), shardshuffle=False).decode("pil")))
    assert decoded["jpg"].size[1] == 48

    files = {"train": str(out / "shards" / "*.tar")}
    loaded = datasets.load_dataset("webdataset", data_files=files, split="train")
    assert len(loaded) == 5 and loaded[0]["jpg"].size[1] == 48
    assert sorted(r["txt"] for r in loaded) == sorted(r["text"] for r in rows.values())


def test_export_writes_every_format_from_a_finished_output_without_captioning(
    tmp_path: Path, tiny_models: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    write_images(folder, 3)
    argv = ["run", "--input", str(folder), "--output", str(folder), *models(*tiny_models)]
    assert main(argv) == 0
    rows = {row["image_uri"]: row["text"] for row in read_jsonl(folder / "metadata.jsonl")}
    exported = ["export", str(folder), "--format", "parquet,webdataset,sidecar"]
    assert main([*exported, "--rows-per-shard", "2", "--captioner", "none"]) == 2  # run's flag
    with caplog.at_level(logging.WARNING, logger="captionflow"):
        assert main([*exported, "--rows-per-shard", "2"]) == 0
    assert f"the parquet shards in {folder}/data/ hide the output's images" in caplog.text
    table = pq.read_table(folder / "data")
    assert dict(zip(table["image_uri"].to_pylist(), table["text"].to_pylist(), strict=True)) == rows
    assert len(list((folder / "shards").glob("*.tar"))) == 2
    for uri, text in rows.items():
        assert Path(uri).with_suffix(".txt").read_text() == text + "\n"
    assert json.loads((folder / "summary.json").read_text())["captioned"] == 3  # untouched


def test_export_refuses_a_folder_without_metadata_and_sidecars_for_images_elsewhere(
    tmp_path: Path, tiny_models: tuple[str, str], capsys: pytest.CaptureFixture
) -> None:
    assert main(["export", str(tmp_path), "--format", "parquet"]) == 2
    assert "export reads a finished run's metadata" in capsys.readouterr().err
    write_images(tmp_path / "photos", 1)
    out = tmp_path / "out"
    argv = ["run", "--input", str(tmp_path / "photos"), "--output", str(out)]
    assert main([*argv, *models(*tiny_models)]) == 0
    assert main(["export", str(out), "--format", "sidecar"]) == 2
    assert "names an image outside the output" in capsys.readouterr().err


def _finished_output(folder: Path, count: int) -> list[Path]:
    """`count` images in `folder/photos` and a `metadata.jsonl` of them, as a run writes it."""
    images = write_images(folder / "photos", count)
    rows = [
        {"file_name": f"photos/{p.name}", "image_uri": str(p), "text": f"caption {i}"}
        for i, p in enumerate(images)
    ]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return images


def test_export_leaves_out_images_that_cannot_be_read_writes_the_rest_and_lists_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One image deleted since it was captioned, one replaced by text (webdataset decodes
    to make JPEGs; parquet embeds the file's bytes as they are): exit 0, the rest written."""
    import logging

    import pyarrow.parquet as pq
    import webdataset

    images = _finished_output(tmp_path, 4)
    images[1].unlink()
    images[2].write_bytes(b"no longer an image")
    exported = ["export", str(tmp_path), "--format", "parquet,webdataset", "--rows-per-shard", "2"]
    with caplog.at_level(logging.WARNING, logger="captionflow"):
        assert main(exported) == 0

    table = pq.read_table(tmp_path / "data")
    assert sorted(table["image_uri"].to_pylist()) == [str(images[i]) for i in (0, 2, 3)]
    shards = [str(p) for p in sorted((tmp_path / "shards").glob("*.tar"))]
    samples = list(webdataset.WebDataset(shards, shardshuffle=False))
    assert sorted(json.loads(s["json"])["image_uri"] for s in samples) == [
        str(images[i]) for i in (0, 3)
    ]
    left_out = read_jsonl(tmp_path / "shard-errors.jsonl")
    assert sorted((e["image_uri"], e["stage"], e["error_type"]) for e in left_out) == sorted(
        [
            (str(images[1]), "parquet", "FileNotFoundError"),
            (str(images[1]), "webdataset", "FileNotFoundError"),
            (str(images[2]), "webdataset", "UnidentifiedImageError"),
        ]
    )
    assert str(images[1]) in caplog.text and str(images[2]) in caplog.text
    assert "1 image(s) left out of the parquet shards" in caplog.text
    assert "2 image(s) left out of the webdataset shards" in caplog.text

    images[1].write_bytes(images[0].read_bytes())  # back: a new export, nothing left out
    images[2].write_bytes(images[0].read_bytes())
    assert main(exported) == 0
    assert pq.read_table(tmp_path / "data").num_rows == 4
    assert (tmp_path / "shard-errors.jsonl").read_text() == ""


def test_export_of_images_that_all_fail_exits_3_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    for image in _finished_output(tmp_path, 2):
        image.unlink()
    with caplog.at_level(logging.ERROR, logger="captionflow"):
        assert main(["export", str(tmp_path), "--format", "parquet"]) == 3
    assert "no image could be read for the parquet shards (2 left out)" in caplog.text
    assert not list((tmp_path / "data").glob("*.parquet"))
    assert len(read_jsonl(tmp_path / "shard-errors.jsonl")) == 2


def test_shards_read_images_up_to_the_runs_max_bytes_and_export_takes_its_own(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    """An image over the default cap that the run was told to take (`--max-bytes`) is in its
    shards too; `export --max-bytes` caps what the export reads."""
    import pyarrow.parquet as pq

    from captionflow.images import DEFAULT_MAX_BYTES

    small, big = write_images(tmp_path / "photos", 2)
    with big.open("r+b") as file:  # a JPEG with trailing zeros, sparse: no disk used
        file.truncate(DEFAULT_MAX_BYTES + 1)
    out = tmp_path / "out"
    argv = ["run", "--input", str(tmp_path / "photos"), "--output", str(out), *models(*tiny_models)]
    argv += ["--format", "imagefolder,parquet", "--max-bytes", str(DEFAULT_MAX_BYTES + 1)]
    assert main(argv) == 0
    assert sorted(pq.read_table(out / "data", columns=["image_uri"])["image_uri"].to_pylist()) == [
        str(small),
        str(big),
    ]
    assert (out / "shard-errors.jsonl").read_text() == ""

    exported = ["export", str(out), "--format", "parquet"]
    assert main([*exported, "--max-bytes", str(small.stat().st_size)]) == 0
    assert pq.read_table(out / "data", columns=["image_uri"])["image_uri"].to_pylist() == [
        str(small)
    ]
    (left_out,) = read_jsonl(out / "shard-errors.jsonl")
    assert (left_out["image_uri"], left_out["error_type"]) == (str(big), "FileTooLargeError")
    assert main([*exported, "--max-bytes", "0"]) == 2


def test_a_resumed_run_leaves_an_image_deleted_since_out_of_its_shards_and_warns(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    """The shards of a run are made from the finished file: an earlier run's rows too."""
    import datasets

    images = write_images(tmp_path / "photos", 3)
    out = tmp_path / "out"
    argv = ["run", "--input", str(tmp_path / "photos"), "--output", str(out), *models(*tiny_models)]
    assert main(argv) == 0
    images[0].unlink()
    assert main([*argv, "--resume", "--format", "parquet"]) == 0

    loaded = datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train")
    assert sorted(loaded["image_uri"]) == [str(p) for p in images[1:]]
    (error,) = read_jsonl(out / "shard-errors.jsonl")
    assert error["image_uri"] == str(images[0]) and error["stage"] == "parquet"
    (warning,) = json.loads((out / "summary.json").read_text())["warnings"]
    assert warning.startswith("1 image(s) left out of the parquet shards")
    assert len(read_jsonl(out / "metadata.jsonl")) == 3  # the captions are all kept


def test_the_same_command_with_a_seed_gives_the_same_captions(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    write_images(tmp_path / "photos", 4)
    argv = ["run", "--input", str(tmp_path / "photos"), *models(*tiny_models), "--seed", "7"]
    outputs = []
    for name in ("first", "second"):
        assert main([*argv, "--output", str(tmp_path / name)]) == 0
        rows = read_jsonl(tmp_path / name / "metadata.jsonl")
        outputs.append({row["file_name"]: row["captions"] for row in rows})
    assert outputs[0] == outputs[1] and len(outputs[0]) == 4


@pytest.mark.parametrize(
    ("file_name", "folder"),
    [
        ("train/x.jpg", "train"),
        ("a/val-2024/b/x.jpg", "a/val-2024"),
        ("my_test/x.jpg", "my_test"),
        ("2024validation/x.jpg", "2024validation"),
        ("train/test/x.jpg", "train"),  # the shallowest
        ("trainer/x.jpg", None),
        ("latest/x.jpg", None),
        ("train.jpg", None),  # a file name, not a folder
        ("gs://b/train/x.jpg", None),  # outside the output
    ],
)
def test_split_folders_are_those_datasets_takes_for_splits(
    file_name: str, folder: str | None
) -> None:
    from captionflow.transforms.splits import split_folder

    assert split_folder(file_name) == folder


def test_images_in_split_folders_get_metadata_files_that_datasets_reads_as_splits(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    import datasets

    write_images(tmp_path / "train" / "cats", 2)
    write_images(tmp_path / "validation", 1)
    write_images(tmp_path / "extra", 1)  # outside any split: in the root file only
    argv = ["run", "--input", str(tmp_path), "--output", str(tmp_path), *models(*tiny_models)]
    assert main(argv) == 0

    root = {row["file_name"]: row for row in read_jsonl(tmp_path / "metadata.jsonl")}
    assert len(root) == 4
    train = read_jsonl(tmp_path / "train" / "metadata.jsonl")
    assert sorted(row["file_name"] for row in train) == ["cats/image_000.jpg", "cats/image_001.jpg"]
    assert all(row == {**root[f"train/{row['file_name']}"], **row} for row in train)
    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path))
    assert sorted(loaded) == ["train", "validation"]
    assert sorted(loaded["train"]["text"]) == sorted(
        root[f"train/{r['file_name']}"]["text"] for r in train
    )
    assert loaded["validation"]["text"] == [root["validation/image_000.jpg"]["text"]]
    assert not list(tmp_path.glob("**/.metadata.jsonl.parts"))
    assert json.loads((tmp_path / "summary.json").read_text())["warnings"] == []


def test_no_split_folders_no_split_metadata(tmp_path: Path, tiny_models: tuple[str, str]) -> None:
    write_images(tmp_path / "photos", 2)
    argv = ["run", "--input", str(tmp_path), "--output", str(tmp_path), *models(*tiny_models)]
    assert main(argv) == 0
    assert [p.relative_to(tmp_path) for p in tmp_path.glob("**/metadata.jsonl")] == [
        Path("metadata.jsonl")
    ]


@pytest.mark.parametrize(
    ("file_name", "like_split"),
    [
        ("test.jpg", True),
        ("photo_val_2.png", True),
        ("a/b/train-01.jpg", True),
        ("latest.jpg", False),
        ("contest.jpg", False),
        ("testimony.jpg", False),
        ("gs://b/test.jpg", False),  # outside the output
    ],
)
def test_file_names_that_datasets_takes_for_splits(file_name: str, like_split: bool) -> None:
    from captionflow.transforms.splits import named_like_split

    assert named_like_split(file_name) == like_split


def test_file_names_like_splits_warn_with_the_way_to_load_them(
    tmp_path: Path, tiny_models: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import datasets

    write_images(tmp_path, 2)
    random_image().save(tmp_path / "photo_test.jpg")
    argv = ["run", "--input", str(tmp_path), "--output", str(tmp_path), *models(*tiny_models)]
    with caplog.at_level(logging.WARNING, logger="captionflow"):
        assert main(argv) == 0

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["warnings"]) == 1 and "1 image file name(s)" in summary["warnings"][0]
    assert f"data_files={{'train': '{tmp_path}/**'}}" in caplog.text
    # The warning is true, and its way works: by file names, `datasets` drops the captions.
    by_names = datasets.load_dataset("imagefolder", data_dir=str(tmp_path))
    assert "text" not in by_names[next(iter(by_names))].column_names
    loaded = datasets.load_dataset(
        "imagefolder", data_files={"train": f"{tmp_path}/**"}, split="train"
    )
    assert loaded.num_rows == 3 and "text" in loaded.column_names


def test_a_backslash_in_an_image_name_is_warned_about_as_datasets_misreads_it(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    """`a\\b.jpg` is a legal name here, written as it is; `datasets` reads it as `a/b.jpg`."""
    import datasets

    write_images(tmp_path, 1)
    random_image().save(tmp_path / "before\\after.jpg")
    argv = ["run", "--input", str(tmp_path), "--output", str(tmp_path), *models(*tiny_models)]
    assert main(argv) == 0
    assert {row["file_name"] for row in read_jsonl(tmp_path / "metadata.jsonl")} == {
        "image_000.jpg",
        "before\\after.jpg",
    }
    (warning,) = json.loads((tmp_path / "summary.json").read_text())["warnings"]
    assert warning.startswith("1 image file name(s) hold a backslash")
    with pytest.raises(FileNotFoundError):  # the warning is true
        list(datasets.load_dataset("imagefolder", data_dir=str(tmp_path), split="train"))
