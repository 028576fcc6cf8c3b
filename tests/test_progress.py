"""A live progress line on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
from collections import Counter
from pathlib import Path

from captionflow.progress import render
from tests.conftest import write_images


def test_the_line_says_done_of_total_rate_errors_and_time_left() -> None:
    counts = Counter(inputs=10, captioned=2, errors=1)
    assert render(counts, seconds=2.0) == "3/10 images  1.5/s  1 errors  0:04 left"
    assert render(Counter(inputs=5, captioned=5), seconds=1.0) == "5/5 images  5.0/s  0 errors"


def run_on_a_terminal(argv: list[str]) -> tuple[int, str]:
    """The CLI with its stdout and stderr on a pseudo-terminal: what it printed there."""
    primary, secondary = os.openpty()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "captionflow", *argv]
    process = subprocess.Popen(command, stdout=secondary, stderr=secondary, env=env)
    os.close(secondary)
    printed = b""
    while True:
        ready, _, _ = select.select([primary], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the terminal closed: the program ended
                break
            if not chunk:
                break
            printed += chunk
        elif process.poll() is not None:
            break
    os.close(primary)
    return process.wait(timeout=300), printed.decode("utf-8", "replace")


def test_a_local_run_on_a_terminal_shows_a_live_progress_line(
    tmp_path: Path, tiny_blip: str, tiny_clip: str
) -> None:
    write_images(tmp_path / "images", 4)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not an image")
    argv = ["run", "--input", str(tmp_path / "images"), "--output", str(tmp_path / "out")]
    argv += ["--captioner", f"blip:{tiny_blip}", "--ranker", f"clip:{tiny_clip}"]
    _, printed = run_on_a_terminal(argv)
    lines = re.findall(r"\r\x1b\[K(\d+)/(\d+) images  [\d.]+/s  (\d+) errors", printed)
    assert lines, printed[-3000:]
    assert lines[-1] == ("5", "5", "1")  # every input accounted for, the broken one an error


def test_without_a_terminal_there_is_no_progress_line(
    tmp_path: Path, tiny_blip: str, tiny_clip: str
) -> None:
    write_images(tmp_path / "images", 2)
    argv = ["run", "--input", str(tmp_path / "images"), "--output", str(tmp_path / "out")]
    argv += ["--captioner", f"blip:{tiny_blip}", "--ranker", f"clip:{tiny_clip}"]
    done = subprocess.run(
        [sys.executable, "-m", "captionflow", *argv],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stderr and " images  " not in done.stderr
