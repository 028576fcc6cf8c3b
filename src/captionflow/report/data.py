"""An output read back for the report, and written out as the page's compact data files.

A run writes its records as part files while it goes (`transforms.write.parts_dir`) and joins
them into one file at the end, so an output that is still being written, or whose run was
killed, holds its records in the final file, in parts, or in both (a resumed run rewrites an
earlier run's records as parts of its own). Everything is read, and each image is kept once,
by its URI. A line that is not a JSON record is counted and skipped: a report never fails on
one damaged line.

The data files are JavaScript, not JSON: a page opened from disk (file://) may not fetch() or
XHR the files beside it, but it may run them with <script src>. Each file is one call of the
page's global `captionflowReport(kind, index, rows)`, the rows compact arrays.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from apache_beam.io.filesystems import FileSystems

from captionflow.listing import literal
from captionflow.lock import LOCK_FILE, Holder
from captionflow.paths import is_remote, join
from captionflow.transforms.write import ERRORS_FILE, REJECTED_FILE, parts_dir

CHUNK_RECORDS = 5000  # records per data file
REGISTER = "captionflowReport"  # the page's global function that each data file calls
# The positions in a record's row (report.js reads them by the same numbers): the URI or the
# name may be null (see `Record.row`).
URI, NAME, TEXT, SCORE, THUMB, WIDTH, HEIGHT, MODELS = range(8)


@dataclass
class Record:
    """One captioned (or rejected) image, as the page needs it."""

    uri: str
    name: str  # `file_name`: relative to the output when the image lies under it
    text: str
    score: float | None
    width: int | None
    height: int | None
    models: int  # index into `Output.models`: (captioner, ranker)
    candidates: str  # [[text, score, probability], ...] already encoded for a data file
    thumb: str = ""  # the thumbnail's key once it exists; "" shows a placeholder

    def row(self, uri_prefix: str) -> list[Any]:
        """[uri, name, ...]: the URI null when it is `uri_prefix` + the name (an image under
        the output, the usual case), the name null when it is the URI."""
        uri: str | None = self.uri
        name: str | None = self.name
        if name == uri:
            name = None
        elif uri == uri_prefix + (name or ""):
            uri = None
        return [
            uri,
            name,
            self.text,
            self.score,
            self.thumb,
            self.width,
            self.height,
            self.models,
        ]


@dataclass
class Failure:
    """One line of `errors.jsonl`."""

    uri: str
    stage: str
    error_type: str
    message: str

    def row(self) -> list[Any]:
        return [self.uri, self.stage, self.error_type, self.message]


@dataclass
class Source:
    """What was read for one kind of record: which files, and what was skipped."""

    files: list[str] = field(default_factory=list)
    parts: int = 0  # how many of `files` are part files of a run not joined (yet)
    lines: int = 0
    duplicates: int = 0  # the same image again (parts of a resumed or retried run)
    bad_lines: int = 0  # not a JSON record: skipped


@dataclass
class Output:
    """Everything the report shows, read from one output folder."""

    captions: list[Record]
    rejected: list[Record]
    failures: list[Failure]
    models: list[tuple[str, str]]
    sources: dict[str, Source]
    summary: dict[str, Any] | None
    summary_problem: str = ""  # why summary.json could not be read, if it exists
    score_range: list[float] | None = None  # the lowest and highest score of any candidate
    running: str = ""  # the run writing into the output now, if one is

    @property
    def found(self) -> bool:
        """Anything a run writes is there: records or their parts, a summary (even one that
        cannot be read), or a run writing now."""
        return (
            self.summary is not None
            or bool(self.summary_problem or self.running)
            or any(source.files for source in self.sources.values())
        )

    @property
    def partial(self) -> bool:
        """Records still in part files, no summary, or a run writing: not the final word."""
        return (
            self.summary is None
            or bool(self.running)
            or any(source.parts for source in self.sources.values())
        )


def js_value(value: Any) -> str:
    """`value` as compact JSON that is also safe JavaScript inside any page: no `<` at all
    (so no `</script>` or `<!--`), and no raw line or paragraph separators. Lone surrogates
    (file names that were not UTF-8) become `\\udcXX` escapes when the text is written out
    with `errors="backslashreplace"`: they only ever occur inside strings."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def number(value: Any) -> float | None:
    """A score or probability to 4 significant digits; None for anything not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return float(f"{value:.4g}") if math.isfinite(value) else None


def size(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def record_files(destination: str) -> tuple[list[str], int]:
    """The finished file if it exists, then the part files beside it: (paths, parts)."""
    files = [destination] if FileSystems.exists(destination) else []
    pattern = join(literal(parts_dir(destination)), "part-*.jsonl")
    try:
        parts = sorted(meta.path for meta in FileSystems.match([pattern])[0].metadata_list)
    except Exception:  # no parts folder: nothing matches
        parts = []
    return files + parts, len(parts)


def json_lines(path: str, source: Source) -> Iterator[dict[str, Any]]:
    """The JSON objects of one file, streamed; other lines counted as bad and skipped."""
    with FileSystems.open(path, compression_type="uncompressed") as file:
        for line in file:  # binary: split on b"\n" only
            if not line.strip():
                continue
            source.lines += 1
            try:
                value = json.loads(line)
            except ValueError:
                value = None
            if isinstance(value, dict):
                yield value
            else:
                source.bad_lines += 1


def uri_prefix(output_dir: str) -> str:
    """What the URI of an image under the output starts with: its `file_name` follows (with
    `/` for the local separator, which is `/` wherever a browser reads the report)."""
    return (
        output_dir.rstrip("/") + "/"
        if is_remote(output_dir)
        else output_dir.rstrip(os.sep) + os.sep
    )


def _uri_of(row: dict[str, Any], output_dir: str) -> str:
    """The image's URI; from `file_name` for a metadata file trimmed to {file_name, text}."""
    uri = row.get("image_uri")
    if isinstance(uri, str) and uri:
        return uri
    name = row.get("file_name")
    if not isinstance(name, str) or not name:
        return ""
    if is_remote(name) or os.path.isabs(name):
        return name
    return join(output_dir, name if is_remote(output_dir) else name.replace("/", os.sep))


def _candidates(row: dict[str, Any], text: str) -> list[list[Any]]:
    found = row.get("candidates")
    if isinstance(found, list):
        candidates = [
            [str(c.get("text", "")), number(c.get("score")), number(c.get("probability"))]
            for c in found
            if isinstance(c, dict)
        ]
        if candidates:
            return candidates
    captions = row.get("captions")
    if isinstance(captions, list) and captions:
        return [[str(caption), None, None] for caption in captions]
    return [[text, number(row.get("score")), None]]


class _Range:
    """The lowest and highest of the numbers seen."""

    def __init__(self) -> None:
        self.low, self.high = math.inf, -math.inf

    def add(self, value: float | None) -> None:
        if value is not None:
            self.low, self.high = min(self.low, value), max(self.high, value)

    def get(self) -> list[float] | None:
        return [self.low, self.high] if self.low <= self.high else None


class _Models:
    """(captioner, ranker) pairs, each stored once: records refer to them by index."""

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []
        self._index: dict[tuple[str, str], int] = {}

    def of(self, row: dict[str, Any]) -> int:
        pair = (str(row.get("captioner") or ""), str(row.get("ranker") or ""))
        if pair not in self._index:
            self._index[pair] = len(self.pairs)
            self.pairs.append(pair)
        return self._index[pair]


def read_records(
    destination: str, output_dir: str, models: _Models, source: Source, scores: _Range
) -> list[Record]:
    """The records of one metadata-style file and its parts, each image once, by name."""
    files, source.parts = record_files(destination)
    source.files = files
    records: dict[str, Record] = {}
    for path in files:
        for row in json_lines(path, source):
            uri = _uri_of(row, output_dir)
            if not uri:
                source.bad_lines += 1
                continue
            if uri in records:
                source.duplicates += 1
                continue
            text = str(row.get("text", ""))
            name = row.get("file_name")
            candidates = _candidates(row, text)
            for candidate in candidates:
                scores.add(candidate[1])
            records[uri] = Record(
                uri=uri,
                name=name if isinstance(name, str) and name else uri,
                text=text,
                score=number(row.get("score")),
                width=size(row.get("width")),
                height=size(row.get("height")),
                models=models.of(row),
                candidates=js_value(candidates),
            )
    return sorted(records.values(), key=lambda record: (record.name, record.uri))


def read_failures(destination: str, source: Source, done: set[str]) -> list[Failure]:
    """`errors.jsonl` and its parts, each image once; images that a later run captioned
    (in `done`) are not failures any more."""
    files, source.parts = record_files(destination)
    source.files = files
    failures: dict[str, Failure] = {}
    for path in files:
        for row in json_lines(path, source):
            uri = str(row.get("image_uri", ""))
            if uri in failures:
                source.duplicates += 1
                continue
            if uri in done:
                continue
            failures[uri] = Failure(
                uri=uri,
                stage=str(row.get("stage", "")),
                error_type=str(row.get("error_type", "") or "Error"),
                message=str(row.get("message", "")),
            )
    return sorted(failures.values(), key=lambda failure: (failure.error_type, failure.uri))


def read_summary(path: str) -> tuple[dict[str, Any] | None, str]:
    """summary.json as a dict, or None and why not (empty when it does not exist yet)."""
    if not FileSystems.exists(path):
        return None, ""
    try:
        with FileSystems.open(path, compression_type="uncompressed") as file:
            value = json.loads(file.read())
    except (OSError, ValueError) as error:
        return None, f"{path} could not be read: {error}"
    if not isinstance(value, dict):
        return None, f"{path} is not a JSON object"
    return value, ""


def running_run(output_dir: str) -> str:
    """Who is writing into the output now (its lock's holder, if alive), else ""."""
    try:
        with FileSystems.open(join(output_dir, LOCK_FILE), compression_type="uncompressed") as file:
            holder = Holder(**json.loads(file.read()))
    except Exception:  # no lock, or a torn one: nobody holds it
        return ""
    if not holder.alive(time.time()):
        return ""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.started))
    return f"process {holder.pid} on {holder.host}, started {started}"


def read_output(output_dir: str, metadata_filename: str) -> Output:
    """The records of an output folder, finished or partial."""
    models, scores = _Models(), _Range()
    sources = {kind: Source() for kind in ("captions", "rejected", "errors")}
    captions = read_records(
        join(output_dir, metadata_filename), output_dir, models, sources["captions"], scores
    )
    rejected = read_records(
        join(output_dir, REJECTED_FILE), output_dir, models, sources["rejected"], scores
    )
    done = {record.uri for record in captions} | {record.uri for record in rejected}
    failures = read_failures(join(output_dir, ERRORS_FILE), sources["errors"], done)
    summary, problem = read_summary(join(output_dir, "summary.json"))
    return Output(
        captions,
        rejected,
        failures,
        models.pairs,
        sources,
        summary,
        problem,
        scores.get(),
        running_run(output_dir),
    )


def chunk_name(kind: str, index: int) -> str:
    return f"{kind}-{index:05d}.js"


def write_chunks(
    directory: str, kind: str, rows: Iterable[str], chunk_records: int = CHUNK_RECORDS
) -> list[str]:
    """Rows already encoded with `js_value`, `chunk_records` per file, as
    `captionflowReport(kind, index, [...])` calls: the names of the files written."""
    names: list[str] = []
    batch: list[str] = []

    def flush() -> None:
        name = chunk_name(kind, len(names))
        path = os.path.join(directory, name)
        staging = f"{path}.tmp-{os.getpid()}"
        with open(staging, "w", encoding="utf-8", errors="backslashreplace") as file:
            file.write(f"{REGISTER}({js_value(kind)},{len(names)},[\n")
            file.write(",\n".join(batch))
            file.write("\n]);\n")
        os.replace(staging, path)
        names.append(name)
        batch.clear()

    for row in rows:
        batch.append(row)
        if len(batch) >= chunk_records:
            flush()
    if batch:
        flush()
    return names
