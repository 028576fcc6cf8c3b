"""`--resume` on outputs as users leave them: odd characters in paths, metadata trimmed for
training, a damaged line, and a run narrowed with `--limit`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captionflow.cli import main
from tests.conftest import random_image, write_images


def models(tiny_models: tuple[str, str]) -> list[str]:
    return ["--captioner", f"blip:{tiny_models[0]}", "--ranker", f"clip:{tiny_models[1]}"]


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def caption(folder: Path, tiny_models: tuple[str, str], *flags: str) -> int:
    argv = ["run", "--input", str(folder), "--output", str(folder), *flags]
    return main([*argv, *models(tiny_models)])


def test_resume_reads_back_paths_with_unicode_line_separators(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    names = ["cp1252 misread\u0085.jpg", "line\u2028sep.jpg", "para\u2029sep.jpg"]
    for seed, name in enumerate(names):
        random_image(seed=seed).save(tmp_path / name)
    assert caption(tmp_path, tiny_models) == 0
    before = lines(tmp_path / "metadata.jsonl")
    assert sorted(json.loads(line)["file_name"] for line in before) == sorted(names)

    assert caption(tmp_path, tiny_models, "--resume") == 0
    assert sorted(lines(tmp_path / "metadata.jsonl")) == sorted(before)
    assert summary(tmp_path)["kept_from_earlier_run"] == 3


def test_resume_matches_metadata_trimmed_to_file_name_and_text(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    write_images(tmp_path / "photos", 3)
    assert caption(tmp_path, tiny_models) == 0
    trimmed = [
        json.dumps({"file_name": row["file_name"], "text": row["text"]})
        for row in map(json.loads, lines(tmp_path / "metadata.jsonl"))
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(trimmed) + "\n", encoding="utf-8")
    random_image(seed=7).save(tmp_path / "photos" / "new.jpg")

    assert caption(tmp_path, tiny_models, "--resume") == 0
    rows = [json.loads(line) for line in lines(tmp_path / "metadata.jsonl")]
    assert sorted(r["file_name"] for r in rows) == sorted(
        [*(json.loads(t)["file_name"] for t in trimmed), "photos/new.jpg"]
    )
    assert summary(tmp_path)["kept_from_earlier_run"] == 3
    assert summary(tmp_path)["captioned"] == 1


def test_resume_stops_at_a_malformed_line_with_its_number(
    tmp_path: Path, tiny_models: tuple[str, str], capsys: pytest.CaptureFixture
) -> None:
    write_images(tmp_path / "photos", 2)
    assert caption(tmp_path, tiny_models) == 0
    good = lines(tmp_path / "metadata.jsonl")
    (tmp_path / "metadata.jsonl").write_text(f"{good[0]}\n{{not json\n", encoding="utf-8")
    capsys.readouterr()

    assert caption(tmp_path, tiny_models, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("captionflow: error: cannot resume from ")
    assert "line 2 of " in err[0] and "metadata.jsonl" in err[0]
    assert "fix or delete that line" in err[0]


def test_resume_with_limit_counts_only_this_runs_images(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    write_images(tmp_path / "photos", 4)
    assert caption(tmp_path, tiny_models) == 0
    assert caption(tmp_path, tiny_models, "--resume", "--limit", "2") == 0
    counts = summary(tmp_path)
    assert counts["images"] == 2 == counts["kept_from_earlier_run"]
    assert (
        counts["images"] == counts["captioned"] + counts["kept_from_earlier_run"] + counts["failed"]
    )
    assert len(lines(tmp_path / "metadata.jsonl")) == 4  # earlier records outside --limit stay


def test_resume_of_trimmed_metadata_puts_every_image_in_the_shards(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    write_images(tmp_path / "photos", 3)
    assert caption(tmp_path, tiny_models) == 0
    rows = [json.loads(line) for line in lines(tmp_path / "metadata.jsonl")]
    trimmed = [json.dumps({"file_name": r["file_name"], "text": r["text"]}) for r in rows[:2]]
    (tmp_path / "metadata.jsonl").write_text("\n".join(trimmed) + "\n", encoding="utf-8")

    assert caption(tmp_path, tiny_models, "--resume", "--format", "parquet,webdataset") == 0
    # Nothing left out (the only warning: parquet shards beside the images they caption).
    assert not [w for w in summary(tmp_path)["warnings"] if "left out" in w]
    assert lines(tmp_path / "shard-errors.jsonl") == []
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "data")
    assert sorted(table.column("file_name").to_pylist()) == sorted(r["file_name"] for r in rows)
    assert sorted(table.column("image_uri").to_pylist()) == sorted(r["image_uri"] for r in rows)


def test_resume_with_sidecar_writes_the_caption_files_of_the_images_it_keeps(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    """The earlier run wrote no caption files (or was killed before some): every image of the
    metadata gets one, with its caption; one that exists is kept."""
    write_images(tmp_path / "photos", 3)
    assert caption(tmp_path, tiny_models) == 0
    (tmp_path / "metadata.jsonl").write_text(
        "\n".join(lines(tmp_path / "metadata.jsonl")[:2]) + "\n", encoding="utf-8"
    )
    (tmp_path / "photos" / "image_000.txt").write_text("my own caption\n")

    assert caption(tmp_path, tiny_models, "--resume", "--format", "sidecar") == 0
    rows = {r["file_name"]: r["text"] for r in map(json.loads, lines(tmp_path / "metadata.jsonl"))}
    assert len(rows) == 3
    for name, text in rows.items():
        written = (tmp_path / name).with_suffix(".txt").read_text()
        assert written == ("my own caption" if "image_000" in name else text) + "\n"


def test_resume_with_sidecar_warns_of_a_new_image_sharing_a_kept_ones_caption_file(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    """`a.png`, added after `a.jpg` was captioned, finds `a.txt` there and keeps it: trainers
    would give it `a.jpg`'s caption, so the resumed run's summary says so, as a first run's
    would."""
    random_image(seed=1).save(tmp_path / "a.jpg")
    assert caption(tmp_path, tiny_models, "--format", "sidecar") == 0
    random_image(seed=2).save(tmp_path / "a.png")
    assert caption(tmp_path, tiny_models, "--resume", "--format", "sidecar") == 0
    warnings = json.loads((tmp_path / "summary.json").read_text())["warnings"]
    assert any("a.txt (a.jpg, a.png)" in warning for warning in warnings), warnings


def test_resume_after_a_join_was_killed_drops_its_temp_copy_and_never_reads_it_as_an_image(
    tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    """A job killed while joining its parts leaves a partial `metadata.jsonl.tmp-...`; a glob
    over the output (`DIR/**`) must not take it for an input, and the resumed run removes it."""
    write_images(tmp_path / "photos", 2)
    argv = ["run", "--input", str(tmp_path / "**"), "--output", str(tmp_path)]
    argv += models(tiny_models)
    assert main(argv) == 0
    for name in ("metadata.jsonl.tmp-0123456789abcdef", "summary.json.tmp"):
        (tmp_path / name).write_text((tmp_path / "metadata.jsonl").read_text()[:100])

    assert main([*argv, "--resume"]) == 0
    assert summary(tmp_path)["images"] == 2 == summary(tmp_path)["kept_from_earlier_run"]
    assert lines(tmp_path / "errors.jsonl") == []
    assert not (tmp_path / "metadata.jsonl.tmp-0123456789abcdef").exists()
