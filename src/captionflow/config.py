"""The validated settings of one captioning run: every bad value is caught before any work."""

from __future__ import annotations

import os
import re
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from captionflow.handlers.candidates import CandidateRules
from captionflow.handlers.decoding import DecodingOptions
from captionflow.handlers.registry import DEFAULT_RANKER, captioners, parse_reference, rankers
from captionflow.images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    looks_like_image,
)
from captionflow.jsonl import read_json_lines
from captionflow.listing import list_local, walk_files
from captionflow.paths import absolute, dirname, is_remote, join, unreadable_uri
from captionflow.transforms.read import GLOB_CHARACTERS, InputKind, input_kind, list_entries
from captionflow.transforms.write import ERRORS_FILE, METADATA_FILE, REJECTED_FILE

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def _check_model_reference(reference: str, registered: dict[str, object], role: str) -> str:
    """`NAME`, `NAME:MODEL`, or a MODEL that is plainly a path, URI or hub id (`org/name`)."""
    name, sep, rest = reference.partition(":")
    known = ", ".join(sorted(registered))
    if name in registered or os.path.exists(reference):
        return reference
    if sep and "/" not in name and not rest.startswith("//"):  # NAME:MODEL, not gs://...
        raise ValueError(f"unknown {role} {name!r} in {reference!r}: use one of {known}")
    if "/" in reference:
        return reference
    raise ValueError(
        f"unknown {role} {reference!r}: use one of {known}, NAME:MODEL, a hub id or a directory"
    )


def _check_local_input(value: str) -> None:
    """The input is what `ReadImagePaths` reads, it can be read, and it names at least one
    input (each check stops at the first one found): a job with nothing to do is a mistake."""
    path = absolute(value)
    kind = input_kind(path)
    if kind == InputKind.GLOB:
        if next(list_local(path), None) is None:
            raise ValueError(f"no images found: no file matches {value!r}")
        return
    if not os.path.exists(path):
        raise ValueError(f"{value!r} does not exist")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{value!r} is not readable")
    if kind == InputKind.IMAGE and not looks_like_image(path):
        raise ValueError(
            f"{value!r} is not a list file (.txt or .lst, one path a line), an image, "
            "a folder or a glob"
        )
    if kind == InputKind.FOLDER and not any(map(looks_like_image, walk_files(path))):
        raise ValueError(f"no images found in {value!r}: no file in it looks like an image")
    if kind == InputKind.LIST:
        with open(path, "rb") as file:
            if next(list_entries(file), None) is None:
                raise ValueError(f"no images found in {value!r}: it lists no path")


def input_root(source: str) -> str | None:
    """The folder every input lies under: a folder itself, a glob's folder before its first
    wildcard, an image's folder; None for a list file (its lines may name any path)."""
    path = absolute(source).replace(os.sep, "/") if not is_remote(source) else source
    kind = input_kind(absolute(source))
    if kind == InputKind.LIST:
        return None
    if kind == InputKind.FOLDER:
        return path.rstrip("/")
    if kind == InputKind.GLOB:
        fixed = path[: min(path.index(c) for c in GLOB_CHARACTERS if c in path)]
        return fixed.rpartition("/")[0]
    return path.rpartition("/")[0]


def _metadata_filename(output: str) -> str:
    return os.path.basename(output) if output.endswith(".jsonl") else METADATA_FILE


def _output_dir(output: str) -> str:
    output = absolute(output)
    return dirname(output) if output.endswith(".jsonl") else output


Dtype = Literal["auto", "float32", "float16", "bfloat16"]
# What the run writes besides `metadata.jsonl` (always written: it is the run's record, and
# what `--resume` reads): `imagefolder` is that file itself.
Format = Literal["imagefolder", "sidecar", "parquet", "webdataset"]


ExportFormat = Literal["sidecar", "parquet", "webdataset"]


def _known_formats(value: object, allowed: type, what: str) -> object:
    """The first unknown name, quoted, with the names allowed: pydantic's own errors come in
    pairs for a tuple (the item, then the tuple's length) and leave out the bad value."""
    if isinstance(value, (tuple, list)):
        names = get_args(allowed)
        for name in value:
            if name not in names:
                raise ValueError(
                    f"{name!r} is not a {what}: use {', '.join(names[:-1])} or {names[-1]}"
                )
    return value


class FormatOptions(BaseModel):
    """The output formats' own settings (`run` and `export`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rows_per_shard: int = Field(1000, ge=1)  # parquet and webdataset
    sidecar_extension: str = ".txt"
    overwrite_captions: bool = False

    @field_validator("sidecar_extension")
    @classmethod
    def _not_an_image_extension(cls, value: str) -> str:
        """An extension alone (a path would write elsewhere), in words, not as a pattern; and
        not an image's: caption files named like images would overwrite them
        (`--overwrite-captions`), or be taken for images by the next run."""
        if not re.fullmatch(r"\.[^./\\]+", value):
            raise ValueError(
                f"{value!r} is not a file extension: a dot, then no dot, / or \\ "
                "(e.g. .txt or .caption)"
            )
        if looks_like_image(f"caption{value}"):
            raise ValueError(
                f"{value} is an image extension: caption files would overwrite the images or "
                "be read as images; use .txt or .caption"
            )
        return value


class RunConfig(FormatOptions):
    """What `captionflow run` does, validated as one unit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: str = Field(min_length=1)
    output: str = Field(min_length=1)
    captioner: str = "blip"
    ranker: str = "clip"
    decoding: DecodingOptions = DecodingOptions()
    rules: CandidateRules = CandidateRules()  # on the candidates, before ranking
    prefix: str = ""  # around every final caption, after ranking
    suffix: str = ""
    # Lower-scoring images go to rejected.jsonl; NaN would reject every image, inf too.
    min_score: float | None = Field(None, allow_inf_nan=False)
    caption_batch_size: int | None = Field(None, ge=1, le=4096)  # None: the captioner's own
    rank_batch_size: int | None = Field(None, ge=1, le=4096)  # None: the ranker's own
    engine_batch_size: int = Field(256, ge=1, le=65536)
    engine: Literal["auto", "local", "shared"] = "auto"
    device: str = "auto"
    dtype: Dtype = "auto"
    caption_dtype: Dtype | None = None  # the captioner's, when not `dtype`
    rank_dtype: Dtype | None = None  # the ranker's, when not `dtype`
    limit: int | None = Field(None, ge=1)
    max_side: int = Field(DEFAULT_MAX_SIDE, ge=32)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1)
    trust_remote_code: bool = False
    model_copies: int | None = Field(None, ge=1, le=64)
    accelerator_hint: str | None = None
    resume: bool = False
    report: bool = False  # the HTML report at the end (`captionflow report`)
    attempts: int = Field(3, ge=1, le=100)
    checkpoint_every: int = Field(100, ge=1)
    max_failure_rate: float = Field(0.1, ge=0, le=1)
    formats: tuple[Format, ...] = Field(("imagefolder",), min_length=1)

    @field_validator("captioner")
    @classmethod
    def _known_captioner(cls, value: str) -> str:
        return _check_model_reference(value, captioners(), "captioner")

    @field_validator("ranker")
    @classmethod
    def _known_ranker(cls, value: str) -> str:
        return _check_model_reference(value, rankers(), "ranker")

    @field_validator("min_score")
    @classmethod
    def _ranker_scores(cls, value: float | None, info: ValidationInfo) -> float | None:
        ranker = info.data.get("ranker")
        if value is not None and ranker is not None:
            name, _ = parse_reference(ranker, rankers(), DEFAULT_RANKER)
            if not rankers()[name].scores:
                raise ValueError(
                    f"--ranker {ranker} scores nothing: choose a ranker that scores, or drop it"
                )
        return value

    @field_validator("model_copies")
    @classmethod
    def _copies_are_shared_engines(cls, value: int | None, info: ValidationInfo) -> int | None:
        """`--engine local` runs no shared engine: the copies asked for would be ignored."""
        if value is not None and info.data.get("engine") == "local":
            raise ValueError(
                "counts shared engine processes, so it cannot be used with --engine local"
            )
        return value

    @field_validator("report")
    @classmethod
    def _report_written_here(cls, value: bool, info: ValidationInfo) -> bool:
        output = info.data.get("output")
        if value and output is not None and is_remote(output):
            raise ValueError(
                "the page is written on this machine: for a remote output, run `captionflow "
                "report OUTPUT --report-dir DIR` after the job"
            )
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError(f"{value!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("input", mode="before")
    @classmethod
    def _input_is_text(cls, value: object) -> object:
        """A name that is not UTF-8 reaches Python with lone surrogates: say so plainly."""
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                printable = os.fsencode(value).decode("utf-8", "backslashreplace")
                raise ValueError(
                    f"'{printable}' is not valid UTF-8: rename it, e.g. with convmv"
                ) from None
        return value

    @field_validator("input")
    @classmethod
    def _input_exists(cls, value: str) -> str:
        if problem := unreadable_uri(value):
            raise ValueError(f"{value!r}: {problem}")
        if not is_remote(value):  # remote inputs are only listed when the job runs
            _check_local_input(value)
        return value

    @field_validator("output")
    @classmethod
    def _output_writable(cls, value: str) -> str:
        listed = {ERRORS_FILE: "failed", REJECTED_FILE: "rejected"}.get(os.path.basename(value))
        if listed:
            raise ValueError(
                f"{os.path.basename(value)} is where {listed} images are listed; name the "
                f"metadata file otherwise (e.g. {METADATA_FILE}) or give a folder"
            )
        if problem := unreadable_uri(value):
            raise ValueError(f"{value!r}: {problem}")
        output_dir = _output_dir(value)
        if is_remote(output_dir):
            return value
        existing = output_dir
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
            raise ValueError(f"cannot write under {existing!r}")
        return value

    @field_validator("formats", mode="before")
    @classmethod
    def _known_run_formats(cls, value: object) -> object:
        return _known_formats(value, Format, "format")

    @field_validator("formats")
    @classmethod
    def _sidecars_beside_images_under_output(
        cls, value: tuple[str, ...], info: ValidationInfo
    ) -> tuple[str, ...]:
        """Caption files go beside the images: only where the images lie under `--output`,
        as with `--input DIR --output DIR` (a list file may name images anywhere)."""
        source, output = info.data.get("input"), info.data.get("output")
        if "sidecar" not in value or source is None or output is None:
            return value
        root = input_root(source)
        output_dir = _output_dir(output).rstrip("/")
        if root is None or not (root == output_dir or root.startswith(output_dir + "/")):
            raise ValueError(
                "sidecar writes a caption file beside each image, so --input must be a folder, "
                "glob or image inside --output (e.g. --input DIR --output DIR); for images "
                "elsewhere, or a list file, use --format imagefolder, parquet or webdataset"
            )
        return value

    @property
    def output_dir(self) -> str:
        """`--output` names a folder; a `.jsonl` path (the original tool's form) names the file."""
        return _output_dir(self.output)

    @property
    def metadata_filename(self) -> str:
        return _metadata_filename(self.output)


class ExportConfig(FormatOptions):
    """What `captionflow export` does: other formats from a finished output's metadata."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    output: str = Field(min_length=1)
    formats: tuple[ExportFormat, ...] = Field(min_length=1)
    max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1)  # the largest image file read for shards

    @field_validator("output")
    @classmethod
    def _finished_output(cls, value: str) -> str:
        path = join(_output_dir(value), _metadata_filename(value))
        if not is_remote(path) and not os.path.isfile(path):
            raise ValueError(f"{path} does not exist: export reads a finished run's metadata")
        return value

    @field_validator("formats", mode="before")
    @classmethod
    def _known_export_formats(cls, value: object) -> object:
        return _known_formats(
            value, ExportFormat, "format export writes (metadata.jsonl is the run's own)"
        )

    @field_validator("formats")
    @classmethod
    def _sidecars_need_images_under_output(
        cls, value: tuple[str, ...], info: ValidationInfo
    ) -> tuple[str, ...]:
        output = info.data.get("output")
        if "sidecar" not in value or output is None or is_remote(output):
            return value
        path = join(_output_dir(output), _metadata_filename(output))
        for number, row in read_json_lines(path):
            name = str(row.get("file_name", "")) if isinstance(row, dict) else ""
            if not name or is_remote(name) or os.path.isabs(name):
                raise ValueError(
                    f"sidecar writes a caption file beside each image, but line {number} of "
                    f"{path} names an image outside the output ({name or 'no file_name'}); "
                    "use parquet or webdataset"
                )
        return value

    @property
    def output_dir(self) -> str:
        return _output_dir(self.output)

    @property
    def metadata_path(self) -> str:
        return join(self.output_dir, _metadata_filename(self.output))
