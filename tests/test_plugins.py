"""Third-party handlers: the example package, installed for real, works by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

EXAMPLE = Path(__file__).parents[1] / "examples" / "plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package pip-installed into a folder of its own (a site for PYTHONPATH)."""
    site = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(site), str(EXAMPLE)], check=True)
    return site


def run_cli(args: list[str], site: Path | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "captionflow", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_an_installed_plugin_captions_and_ranks_by_name(installed: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(images / "red.png")
    half = Image.new("RGB", (40, 30), (40, 80, 200))
    half.paste((235, 235, 235), (0, 0, 40, 10))
    half.save(images / "blue.png")
    out = tmp_path / "out"
    argv = ["run", "--input", str(images), "--output", str(out), "--num-captions", "3"]
    argv += ["--captioner", "colors", "--ranker", "shortest"]

    done = run_cli(argv, installed)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {
        Path(row["file_name"]).name: row
        for row in map(json.loads, (out / "metadata.jsonl").read_text().splitlines())
    }
    assert rows["red.png"]["text"] == "a mostly red picture"
    blue = rows["blue.png"]
    assert blue["text"] == "a mostly blue picture"  # the shortest of its candidates
    assert blue["captions"][1:] == ["a picture in blue and white"]
    assert (blue["captioner"], blue["ranker"]) == ("colors", "shortest")
    assert blue["score"] == pytest.approx(1 / 4)


def test_the_same_names_are_unknown_without_the_plugin(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "a.png")
    argv = ["run", "--input", str(tmp_path / "images"), "--output", str(tmp_path / "out")]
    done = run_cli([*argv, "--captioner", "colors", "--ranker", "none"], None)
    assert done.returncode == 2
    assert "unknown captioner 'colors'" in done.stderr
