"""The run summary: how many images ended where, how fast, with which models and versions."""

from __future__ import annotations

import json
import logging
import platform
import time
from collections import Counter
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsSingleton, PCollection

from captionflow.records import ErrorRecord

logger = logging.getLogger("captionflow")

CAPTIONED, KEPT, REJECTED = "captioned", "kept", "rejected"
SUMMARY_FILE = "summary.json"
PACKAGES = ("captionflow", "apache-beam", "torch", "transformers", "pillow")


def outcome_of_error(error: ErrorRecord) -> str:
    return f"failed/{error.stage}/{error.error_type}"


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "unknown"
    return found


def summarize(counts: dict[str, int], seconds: float, settings: dict[str, Any]) -> dict[str, Any]:
    """Counts by outcome (`captioned`, `rejected` under `--min-score`, `kept` from an earlier
    run, `failed/<stage>/<type>`)."""
    stages: Counter[str] = Counter()
    types: Counter[str] = Counter()
    for outcome, count in counts.items():
        if outcome.startswith("failed/"):
            _, stage, error_type = outcome.split("/", 2)
            stages[stage] += count
            types[error_type] += count
    captioned, kept, failed = counts.get(CAPTIONED, 0), counts.get(KEPT, 0), stages.total()
    rejected = counts.get(REJECTED, 0)
    return {
        "images": captioned + rejected + kept + failed,
        "captioned": captioned,
        "rejected": rejected,
        "kept_from_earlier_run": kept,
        "failed": failed,
        "errors_by_stage": dict(sorted(stages.items())),
        "errors_by_type": dict(sorted(types.items())),
        "seconds": round(seconds, 3),
        "images_per_second": round((captioned + rejected) / seconds, 4) if seconds > 0 else None,
        "settings": settings,
        "versions": _versions(),
    }


def _write(
    counts: dict[str, int],
    warnings: list[str],
    *written: str,
    path: str,
    started: float,
    settings: dict[str, Any],
) -> str:
    summary = summarize(counts, time.time() - started, settings)
    summary["warnings"] = warnings
    staging = f"{path}.tmp"
    with FileSystems.create(staging) as file:
        file.write(json.dumps(summary, indent=2).encode("utf-8") + b"\n")
    FileSystems.rename([staging], [path])
    logger.info(
        "summary: %d images: %d captioned, %d rejected, %d kept from an earlier run, %d failed "
        "%s in %.1f s (%s images/s); %s",
        summary["images"],
        summary["captioned"],
        summary["rejected"],  # every outcome, so that the counts add up to the images
        summary["kept_from_earlier_run"],
        summary["failed"],
        summary["errors_by_stage"],
        summary["seconds"],
        summary["images_per_second"],
        path,
    )
    return path


class CountOutcomes(beam.PTransform):
    """Records in; `(outcome, count)` pairs out, the outcome a label or a function of the
    record. Count each collection where it is made, before any Flatten: the runner lifts the
    combiner into the producing step, so only counts cross it (a Flatten of per-image labels
    makes local runners hold them all)."""

    def __init__(self, outcome: str | Callable[[Any], str]) -> None:
        super().__init__()
        self.outcome = outcome

    def expand(self, records: PCollection[Any]) -> PCollection[tuple[str, int]]:
        outcome = self.outcome
        label = outcome if callable(outcome) else lambda _: outcome
        return records | "Label" >> beam.Map(label) | "Count" >> beam.combiners.Count.PerElement()


class WriteSummary(beam.PTransform):
    """`(outcome, count)` pairs in (`CountOutcomes`); `summary.json` out, written after the
    `after` outputs are complete, with `warnings` (a one-element collection of lines) for the
    user.

    `started` is the wall-clock time the job was launched, so the rate covers the whole job.
    """

    def __init__(
        self,
        path: str,
        *,
        started: float,
        settings: dict[str, Any],
        after: tuple[PCollection[str], ...] = (),
        warnings: PCollection[list[str]] | None = None,
    ) -> None:
        super().__init__()
        self.path = path
        self.started = started
        self.settings = settings
        self.after = after
        self.warnings = warnings

    def expand(self, counted: PCollection[tuple[str, int]]) -> PCollection[str]:
        counts = counted | "Sum" >> beam.CombinePerKey(sum) | "ToDict" >> beam.combiners.ToDict()
        warnings = self.warnings
        if warnings is None:
            warnings = counted.pipeline | "NoWarnings" >> beam.Create([[]])
        return counts | "Write" >> beam.Map(
            _write,
            AsSingleton(warnings),
            *(AsSingleton(done) for done in self.after),
            path=self.path,
            started=self.started,
            settings=self.settings,
        )
