"""A live progress line for a local run on a terminal: images done of the total, images/s,
errors, time left. The pipeline's steps count into files (`transforms.progress.CountInto`);
this sums them twice a second."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import Counter
from typing import TextIO

INPUTS, CAPTIONED, ERRORS = "inputs", "captioned", "errors"


def read_counts(folder: str) -> Counter[str]:
    """The counts in `folder`, summed by kind (a file is `KIND-...`, holding one number)."""
    counts: Counter[str] = Counter()
    try:
        names = os.listdir(folder)
    except OSError:
        return counts
    for name in names:
        if name.endswith(".tmp"):
            continue
        try:
            with open(os.path.join(folder, name)) as file:
                counts[name.split("-", 1)[0]] += int(file.read() or 0)
        except (OSError, ValueError):
            continue  # replaced while being read: the next look gets it
    return counts


def render(counts: Counter[str], seconds: float) -> str:
    """`1,234/10,000 images  12.5/s  3 errors  11:42 left` (the total once it is known)."""
    errors = counts[ERRORS]
    done = counts[CAPTIONED] + errors
    total = counts[INPUTS]
    rate = done / seconds if seconds > 0 else 0.0
    line = f"{done:,}/{total:,} images  {rate:.1f}/s  {errors:,} errors"
    if rate > 0 and total > done:
        line += f"  {_clock((total - done) / rate)} left"
    return line


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class ProgressLine:
    """Redraws one line of `stream` every `every_secs` from the counts in `folder`, while
    the run goes; the rate counts from the last look that saw nothing done (the models
    loaded by then), not from start-up. The folder is removed at the end."""

    def __init__(self, folder: str, stream: TextIO, every_secs: float = 0.5) -> None:
        self.folder = folder
        self.stream = stream
        self.every_secs = every_secs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._nothing_done = time.monotonic()  # the last look that saw nothing done
        self._first_done: float | None = None

    def __enter__(self) -> ProgressLine:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._draw()
        self.stream.write("\n")
        self.stream.flush()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_secs):
            self._draw()

    def _draw(self) -> None:
        counts = read_counts(self.folder)
        now = time.monotonic()
        if not counts[CAPTIONED] + counts[ERRORS]:
            self._nothing_done = now
        elif self._first_done is None:
            self._first_done = self._nothing_done
        seconds = now - self._first_done if self._first_done is not None else 0.0
        self.stream.write("\r\033[K" + render(counts, seconds))
        self.stream.flush()
