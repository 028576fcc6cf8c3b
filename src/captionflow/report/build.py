"""`write_report`: a static HTML page of an output folder, finished or partial.

    OUTPUT/report/index.html     the page: summary, score histogram, tabs, controls
    OUTPUT/report/report.css     its style and script, beside it
    OUTPUT/report/report.js
    OUTPUT/report/data/*.js      the records, CHUNK_RECORDS a file, as compact arrays
    OUTPUT/report/thumbs/*.jpg   one small JPEG per image, named by a hash of its URI

The page needs no server and fetches nothing from the network: it opens from disk (file://),
where a page may not fetch() the files beside it, so the data files are scripts, loaded with
<script src> as the page needs them; every path in it is relative, so the folder works where
it is copied or uploaded (a bucket). The browser pages, sorts and filters the records itself,
and loads a chunk's candidates only when one of its cards is opened: 100,000 images are a few
tens of MB of data and one page of lazily loaded thumbnails at a time.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2

from captionflow.listing import SKIP_MARKER
from captionflow.paths import absolute, is_remote, join
from captionflow.report.data import (
    CHUNK_RECORDS,
    REGISTER,
    Output,
    Record,
    js_value,
    read_output,
    uri_prefix,
    write_chunks,
)
from captionflow.report.thumbs import THUMBS_DIR, ThumbnailCounts, make_thumbnails, thumb_key
from captionflow.transforms.write import METADATA_FILE

logger = logging.getLogger("captionflow")

REPORT_DIR = "report"
DATA_DIR = "data"
PAGE = "index.html"
# Marks a report folder, so that listing an input folder skips it: captioning in place
# (`--input X --output X`) would otherwise take X/report/thumbs/*.jpg for images.
REPORT_MARKER = SKIP_MARKER
TEMPLATES = Path(__file__).parent / "templates"
ASSETS = ("report.css", "report.js")  # copied beside the page
HISTOGRAM_BINS = 24
SUMMARY_COUNTS = (
    ("images", "images"),
    ("captioned", "captioned"),
    ("rejected", "rejected (--min-score)"),
    ("kept_from_earlier_run", "kept from an earlier run"),
    ("failed", "failed"),
)


@dataclass
class Report:
    """What `build_report` wrote."""

    path: str  # the page: REPORT/index.html
    captions: int
    rejected: int
    failures: int
    partial: bool
    thumbnails: ThumbnailCounts
    seconds: float


def write_report(
    output_dir: str,
    *,
    page_size: int = 200,
    thumbnail_side: int = 192,
    workers: int | None = None,
    report_dir: str | None = None,
    chunk_records: int = CHUNK_RECORDS,
) -> str:
    """Write the report of `output_dir` (finished, still running, or killed) and return the
    path of its page, `output_dir/report/index.html`.

    `output_dir` may also be the path of a metadata file (`out/captions.jsonl`), as `--output`
    takes it. `page_size` cards are shown per page; thumbnails are at most `thumbnail_side`
    pixels a side, made by `workers` threads (default: one per CPU), and kept for the next
    report. An output in a bucket (`gs://...`) is read where it is, but its report is written
    to a local `report_dir` (upload that folder beside the output to publish it).
    """
    return build_report(
        output_dir,
        page_size=page_size,
        thumbnail_side=thumbnail_side,
        workers=workers,
        report_dir=report_dir,
        chunk_records=chunk_records,
    ).path


def build_report(
    output_dir: str,
    *,
    page_size: int = 200,
    thumbnail_side: int = 192,
    workers: int | None = None,
    report_dir: str | None = None,
    chunk_records: int = CHUNK_RECORDS,
) -> Report:
    """`write_report`, returning what was written and how long it took."""
    started = time.perf_counter()
    for name, value in (
        ("page_size", page_size),
        ("thumbnail_side", thumbnail_side),
        ("chunk_records", chunk_records),
    ):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    output_dir, metadata_filename = _split_output(output_dir)
    if not is_remote(output_dir) and not os.path.isdir(output_dir):
        raise FileNotFoundError(f"{output_dir} is not a folder: no output to report on")
    if report_dir is None:
        if is_remote(output_dir):
            raise ValueError(
                f"{output_dir} is not a local folder: give report_dir, a local folder to "
                "write the report in (then upload it beside the output)"
            )
        report_dir = join(output_dir, REPORT_DIR)
    elif is_remote(report_dir):
        raise ValueError(f"report_dir must be a local folder, not {report_dir}")
    report_dir = absolute(report_dir)

    output = read_output(output_dir, metadata_filename)
    if not output.found:  # a folder of images, say: no report is written into it
        raise FileNotFoundError(
            f"{output_dir} is not a captionflow output: it holds no {metadata_filename} (nor its "
            "checkpoints) and no summary.json"
        )
    records = output.captions + output.rejected
    have, counts = make_thumbnails(
        {thumb_key(record.uri): _places(record, output_dir) for record in records},
        os.path.join(report_dir, THUMBS_DIR),
        side=thumbnail_side,
        workers=workers,
    )
    for record in records:
        key = thumb_key(record.uri)
        record.thumb = key if key in have else ""

    prefix = uri_prefix(output_dir)
    data_dir = os.path.join(report_dir, DATA_DIR)
    os.makedirs(data_dir, exist_ok=True)
    written: list[str] = []
    for kind, kind_records in (("captions", output.captions), ("rejected", output.rejected)):
        rows = (js_value(record.row(prefix)) for record in kind_records)
        written += write_chunks(data_dir, kind, rows, chunk_records)
        written += write_chunks(
            data_dir,
            f"{kind}-candidates",
            (record.candidates for record in kind_records),
            chunk_records,
        )
    written += write_chunks(
        data_dir, "errors", (js_value(f.row()) for f in output.failures), chunk_records
    )
    _remove_others(data_dir, set(written))
    for asset in ASSETS:
        _copy(TEMPLATES / asset, os.path.join(report_dir, asset))
    _write_text(
        os.path.join(report_dir, REPORT_MARKER),
        "A captionflow report: its thumbs/ are thumbnails, not images to caption.\n",
    )

    context = _context(
        output,
        output_dir=output_dir,
        metadata_filename=metadata_filename,
        page_size=page_size,
        thumbnail_side=thumbnail_side,
        chunk_records=chunk_records,
    )
    page = os.path.join(report_dir, PAGE)
    _write_text(page, _environment().get_template("index.html.j2").render(**context))
    report = Report(
        path=page,
        captions=len(output.captions),
        rejected=len(output.rejected),
        failures=len(output.failures),
        partial=output.partial,
        thumbnails=counts,
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "report of %s%s: %d captioned, %d rejected, %d failed; thumbnails: %d made, %d kept, "
        "%d unreadable; %.1f s: %s",
        output_dir,
        " (partial)" if report.partial else "",
        report.captions,
        report.rejected,
        report.failures,
        counts.made,
        counts.kept,
        counts.unreadable,
        report.seconds,
        page,
    )
    return report


def _split_output(output: str) -> tuple[str, str]:
    """(folder, metadata file name) of an `--output`, which may name the metadata file."""
    output = absolute(output).rstrip("/") if is_remote(output) else absolute(output)
    if output.endswith(".jsonl"):
        head, _, tail = output.rpartition("/" if is_remote(output) else os.sep)
        return head, tail
    return output, METADATA_FILE


def _places(record: Record, output_dir: str) -> list[str]:
    """Where a record's image may be read: its URI, then its `file_name` under the output
    (for an output folder that was moved or copied with its images)."""
    places = [record.uri]
    name = record.name
    if name != record.uri and not is_remote(name) and not os.path.isabs(name):
        moved = join(output_dir, name if is_remote(output_dir) else name.replace("/", os.sep))
        if moved != record.uri:
            places.append(moved)
    return places


def _remove_others(directory: str, keep: set[str]) -> None:
    """Data files of an earlier, larger report: gone, so no stale chunk is ever loaded."""
    for name in os.listdir(directory):
        if name not in keep:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                os.remove(path)


def _write_text(path: str, text: str) -> None:
    staging = f"{path}.tmp-{os.getpid()}"
    with open(staging, "w", encoding="utf-8", errors="backslashreplace") as file:
        file.write(text)
    os.replace(staging, path)


def _copy(source: Path, destination: str) -> None:
    staging = f"{destination}.tmp-{os.getpid()}"
    shutil.copyfile(source, staging)
    os.replace(staging, destination)


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,  # every value in the page is escaped unless marked otherwise
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _format_number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested settings as (dotted key, value as text) rows."""
    if isinstance(value, dict):
        rows: list[tuple[str, str]] = []
        for key, inner in value.items():
            rows += _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
        return rows
    if isinstance(value, (list, tuple)):
        return [(prefix, ", ".join(str(item) for item in value) or "(none)")]
    if value is None:
        return [(prefix, "(none)")]
    return [(prefix, _format_number(value) if isinstance(value, float) else str(value))]


def _histogram(output: Output, min_score: Any) -> dict[str, Any] | None:
    """The best scores of the captioned and rejected images, in bins: an SVG's geometry."""
    captioned = sorted(r.score for r in output.captions if r.score is not None)
    rejected = sorted(r.score for r in output.rejected if r.score is not None)
    everything = sorted(captioned + rejected)
    if not everything:
        return None
    low, high = everything[0], everything[-1]
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    width, height, left, top, plot_width, plot_height = 480, 150, 44, 12, 424, 104
    step = (high - low) / HISTOGRAM_BINS
    edges = [low + step * i for i in range(HISTOGRAM_BINS + 1)]

    def counts(scores: list[float]) -> list[int]:
        found = [0] * HISTOGRAM_BINS
        for score in scores:
            found[min(HISTOGRAM_BINS - 1, int((score - low) / step))] += 1
        return found

    kept, dropped = counts(captioned), counts(rejected)
    tallest = max(k + d for k, d in zip(kept, dropped, strict=True)) or 1
    bar = plot_width / HISTOGRAM_BINS
    bars = []
    for i, (k, d) in enumerate(zip(kept, dropped, strict=True)):
        kept_height = plot_height * k / tallest
        dropped_height = plot_height * d / tallest
        base = top + plot_height
        bars.append(
            {
                "x": round(left + i * bar + 0.5, 2),
                "width": round(max(bar - 1, 0.5), 2),
                "kept_y": round(base - kept_height, 2),
                "kept_height": round(kept_height, 2),
                "rejected_y": round(base - kept_height - dropped_height, 2),
                "rejected_height": round(dropped_height, 2),
                "title": f"{edges[i]:.4g} to {edges[i + 1]:.4g}: {k:,} captioned"
                + (f", {d:,} rejected" if d else ""),
            }
        )
    threshold = None
    if isinstance(min_score, (int, float)) and low <= min_score <= high:
        threshold = round(left + plot_width * (min_score - low) / (high - low), 2)

    def quantile(q: float) -> float:
        return everything[min(len(everything) - 1, int(q * len(everything)))]

    return {
        "width": width,
        "height": height,
        "left": left,
        "top": top,
        "plot_width": plot_width,
        "plot_height": plot_height,
        "bottom": top + plot_height,
        "bars": bars,
        "tallest": tallest,
        "low": f"{low:.4g}",
        "middle": f"{(low + high) / 2:.4g}",
        "high": f"{high:.4g}",
        "threshold": threshold,
        "min_score": min_score,
        "scores": len(everything),
        "median": f"{quantile(0.5):.4g}",
        "p10": f"{quantile(0.1):.4g}",
        "p90": f"{quantile(0.9):.4g}",
    }


def _context(
    output: Output,
    *,
    output_dir: str,
    metadata_filename: str,
    page_size: int,
    thumbnail_side: int,
    chunk_records: int,
) -> dict[str, Any]:
    summary = output.summary or {}
    settings = summary.get("settings") if isinstance(summary.get("settings"), dict) else {}
    versions = summary.get("versions") if isinstance(summary.get("versions"), dict) else {}
    counts = [
        (label, _format_number(summary.get(key)))
        for key, label in SUMMARY_COUNTS
        if output.summary is not None and key in summary
    ]
    by_stage = summary.get("errors_by_stage") or {}
    by_type = summary.get("errors_by_type") or {}
    decoding = settings.get("decoding") if isinstance(settings.get("decoding"), dict) else {}
    run = [
        (label, _format_number(value))
        for label, value in (
            ("seconds", summary.get("seconds")),
            ("images per second", summary.get("images_per_second")),
            ("captioner", settings.get("captioner")),
            ("ranker", settings.get("ranker")),
            ("candidates per image", decoding.get("num_captions")),
            ("decoding", decoding.get("strategy")),
            ("device", settings.get("device")),
            ("dtype", settings.get("dtype")),
            ("engine", settings.get("engine")),
            ("input", settings.get("input")),
            ("min score", settings.get("min_score")),
        )
        if value is not None
    ]
    if not any(label == "captioner" for label, _ in run):  # no summary: from the records
        for i, label in ((0, "captioner"), (1, "ranker")):
            names = sorted({pair[i] for pair in output.models if pair[i]})
            if names:
                run.append((label, " | ".join(names)))
    sources = [
        {
            "kind": kind,
            "files": len(source.files),
            "parts": source.parts,
            "duplicates": source.duplicates,
            "bad_lines": source.bad_lines,
        }
        for kind, source in output.sources.items()
    ]
    config = {
        "register": REGISTER,
        "pageSize": page_size,
        "chunkRecords": chunk_records,
        "counts": {
            "captions": len(output.captions),
            "rejected": len(output.rejected),
            "errors": len(output.failures),
        },
        "models": [list(pair) for pair in output.models],
        "scoreRange": output.score_range,
        "thumbSide": thumbnail_side,
        "uriPrefix": uri_prefix(output_dir),
        "dataDir": DATA_DIR,
        "thumbsDir": THUMBS_DIR,
    }
    return {
        "title": f"captionflow report: {os.path.basename(output_dir.rstrip('/')) or output_dir}",
        "output_dir": output_dir,
        "metadata_filename": metadata_filename,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "partial": output.partial,
        "running": output.running,
        "has_summary": output.summary is not None,
        "summary_problem": output.summary_problem,
        "counts": counts,
        "errors_by_stage": [(k, _format_number(v)) for k, v in by_stage.items()],
        "errors_by_type": [(k, _format_number(v)) for k, v in by_type.items()],
        "run": run,
        "versions": [(k, str(v)) for k, v in versions.items()],
        "settings": _flatten(settings),
        "shown": {
            "captions": _format_number(len(output.captions)),
            "rejected": _format_number(len(output.rejected)),
            "errors": _format_number(len(output.failures)),
        },
        "sources": sources,
        "histogram": _histogram(output, settings.get("min_score")),
        "page_size": page_size,
        "config": config,
    }
