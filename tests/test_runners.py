"""The same job on other Beam runners that run here: the portable job API (the path Flink and
Spark job servers take) and several local worker processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captionflow.cli import main
from tests.conftest import write_images

RUNNERS = {
    "portable job service": [
        "--runner",
        "PortableRunner",
        "--job_endpoint",
        "embed",
        "--environment_type",
        "LOOPBACK",
    ],
    "multi-process local": [
        "--direct_running_mode",
        "multi_processing",
        "--direct_num_workers",
        "2",
    ],
}


@pytest.mark.parametrize("runner", RUNNERS)
def test_the_job_runs_on_other_runners(
    runner: str, tmp_path: Path, tiny_models: tuple[str, str]
) -> None:
    write_images(tmp_path / "pics", 3)
    (tmp_path / "pics" / "bad.jpg").write_text("no")
    argv = [
        "run",
        "--input",
        str(tmp_path / "pics"),
        "--output",
        str(tmp_path / "pics"),
        "--captioner",
        f"blip:{tiny_models[0]}",
        "--ranker",
        f"clip:{tiny_models[1]}",
    ]
    assert main([*argv, *RUNNERS[runner]]) == 0
    rows = (tmp_path / "pics" / "metadata.jsonl").read_text().splitlines()
    assert sorted(json.loads(r)["file_name"] for r in rows) == [
        f"image_{i:03d}.jpg" for i in range(3)
    ]
    assert len((tmp_path / "pics" / "errors.jsonl").read_text().splitlines()) == 1
