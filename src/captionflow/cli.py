"""`captionflow run`: parse flags, validate them, wire the pipeline. Nothing else."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import NoReturn

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
    PipelineOptions,
    StandardOptions,
    TestOptions,
)
from apache_beam.runners.runner import PipelineResult, create_runner
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from captionflow import __version__
from captionflow.config import ExportConfig, FormatOptions, RunConfig
from captionflow.fatal import FatalError, QuietFatalTracebacks, fatal_message
from captionflow.handlers.decoding import DecodingOptions
from captionflow.handlers.registry import captioners, parse_reference, rankers
from captionflow.handlers.torch_setup import DeviceUnavailableError, check_device
from captionflow.images import DEFAULT_MAX_BYTES
from captionflow.jsonl import read_json_lines
from captionflow.listing import literal
from captionflow.lock import OutputLock
from captionflow.paths import join
from captionflow.pipelines import build_caption_pipeline, build_export_pipeline
from captionflow.pipelines.caption import SUMMARY_FILE, record_files
from captionflow.progress import ProgressLine
from captionflow.report import build_report, write_report
from captionflow.signals import Interrupted, QuietStops, StopSignals
from captionflow.transforms.grouping import LOCAL_RUNNERS
from captionflow.transforms.shards import (
    SHARD_ERRORS_FILE,
    SHARD_FORMATS,
    left_out_warnings,
    published_shards,
)
from captionflow.transforms.write import ERRORS_FILE, parts_dir

logger = logging.getLogger("captionflow")

DEFAULT_RUNNER = "FnApiRunner"  # Beam's DirectRunner first tries to download Prism at run time


def add_format_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The formats' own settings, the same for `run` and `export`."""
    defaults = FormatOptions.model_fields
    parser.add_argument(
        "--rows-per-shard",
        type=int,
        default=defaults["rows_per_shard"].default,
        help="images per parquet or webdataset shard (default: %(default)s)",
    )
    parser.add_argument(
        "--sidecar-extension",
        default=defaults["sidecar_extension"].default,
        help="the caption files' extension, e.g. .caption for sd-scripts (default: %(default)s)",
    )
    parser.add_argument(
        "--overwrite-captions",
        action="store_true",
        help="replace caption files that exist (they are kept otherwise)",
    )


def add_max_bytes(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--max-bytes`: no image file larger is read, to caption it or to put it in a shard."""
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help="refuse image files larger than this many bytes (default: %(default)s)",
    )


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(","))


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split(","))


def _at_least_one(text: str) -> int:
    """A count or a size of at least 1, checked here so that the error names the flag
    (`build_report`'s own check names its argument)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


# (DecodingOptions field, flag, type, help): the one list of decoding flags.
DECODING_OPTIONS = (
    ("num_captions", "--num-captions", int, "candidate captions per image"),
    ("strategy", "--decoding", str, "sample (nucleus sampling) or beam (beam search)"),
    ("top_p", "--top-p", float, "sampling only"),
    ("temperature", "--temperature", float, "sampling only"),
    ("repetition_penalty", "--repetition-penalty", float, "above 1 discourages repeated words"),
    ("num_beams", "--num-beams", int, "beam search only"),
    ("min_new_tokens", "--min-new-tokens", int, "fewest tokens a caption has, after the prompt"),
    ("max_new_tokens", "--max-new-tokens", int, "most tokens a caption has, after the prompt"),
    (
        "prompt",
        "--prompt",
        str,
        "text the captioner continues, removed from the captions, or the instruction a VLM "
        "follows (default: the captioner's own; BLIP's 'a picture of ')",
    ),
    ("seed", "--seed", int, "the same captions for an image in any run and batch (sampling)"),
    ("bad_words", "--bad-words", _words, "comma-separated words the captioner must never write"),
    (
        "decoder",
        "--decoder",
        str,
        "fast (BLIP's own loop), compiled (its steps compiled), or reference (generate)",
    ),
)
DECODING_FLAGS = {field: flag for field, flag, _, _ in DECODING_OPTIONS}
RULE_FIELDS = ("remove_pattern", "min_words")  # CandidateRules, flags of their own name


def _shown(default: object) -> str:
    """A default as it is typed on the command line: `sample`, `none`, `a,b`."""
    if default is None or default == ():
        return "none"
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return str(default)


class UsageError(Exception):
    """A bad flag or value: reported as one line each, before any work."""


class Parser(argparse.ArgumentParser):
    """argparse's own errors (a value of the wrong type, an unknown choice, a missing
    argument) as one line, like every other usage error, not after the whole usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(re.sub(r"^argument ([^:]+): ", r"\1: ", message))


# Exit codes (README, "Exit codes"); a stop signal exits with 128 + its number (130, 143).
USAGE = 2
NOTHING_CAPTIONED = 3
NOTHING_EXPORTED = 3  # export: no image of a shard format could be read
EXPORT_AGAIN = "run the same export again to write every shard"  # after a stop


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="captionflow", description="Caption images with BLIP, ranked by CLIP, on Beam."
    )
    parser.add_argument("--version", action="version", version=f"captionflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        allow_abbrev=False,
        help="caption images and write metadata.jsonl",
        epilog="Every other flag goes to Beam's PipelineOptions: --runner, "
        "--direct_running_mode, --direct_num_workers, --project, --region, ...",
    )
    io = run.add_argument_group("input and output")
    io.add_argument(
        "--input",
        help="a list file (.txt: one path a line), a glob, an image or a folder; required",
    )
    io.add_argument(
        "--output", help="output folder, or a .jsonl path naming the metadata file; required"
    )
    io.add_argument("--dataset-filename", help="the original tool's name for --input")
    io.add_argument("--output-filename", help="the original tool's name for --output")
    io.add_argument(
        "--limit",
        type=int,
        help="caption only N inputs: a list file's first N entries, a folder's or glob's first "
        "N paths in sorted order (default: all)",
    )
    io.add_argument(
        "--format",
        dest="formats",
        type=_names,
        default=RunConfig.model_fields["formats"].default,
        help="what to write, comma-separated: imagefolder (metadata.jsonl, always written), "
        "sidecar (a caption file beside each image), parquet (shards with the images in "
        "them, under data/), webdataset (tar shards under shards/) (default: imagefolder)",
    )
    add_format_options(io)

    run.add_argument(
        "--report",
        action="store_true",
        help="write OUTPUT/report/index.html at the end (as `captionflow report OUTPUT` does)",
    )
    recovery = run.add_argument_group("recovery")
    recovery.add_argument(
        "--resume",
        action="store_true",
        help="keep what an earlier run of this output wrote; caption the rest",
    )
    recovery.add_argument(
        "--attempts",
        type=int,
        default=3,
        help="if the job fails, resume it until this many attempts in all (default: %(default)s)",
    )
    recovery.add_argument(
        "--max-failure-rate",
        type=float,
        default=RunConfig.model_fields["max_failure_rate"].default,
        help="warn when more than this fraction of the images fail (default: %(default)s)",
    )
    recovery.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        help="records per part file: the most a killed job loses per worker (default: %(default)s)",
    )

    models = run.add_argument_group("models")
    models.add_argument(
        "--captioner",
        default="blip",
        help=f"NAME, NAME:MODEL or MODEL; names: {', '.join(captioners())} (default: %(default)s)",
    )
    models.add_argument(
        "--ranker",
        default="clip",
        help=f"NAME, NAME:MODEL or MODEL; names: {', '.join(rankers())} (default: %(default)s)",
    )
    models.add_argument(
        "--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)"
    )
    models.add_argument(
        "--dtype",
        default="auto",
        help="both models' dtype: auto (float16 on GPU, float32 on CPU), float32, float16, "
        "bfloat16 (default: %(default)s)",
    )
    models.add_argument(
        "--caption-dtype", help="the captioner's dtype, if not --dtype's (e.g. bfloat16)"
    )
    models.add_argument(
        "--rank-dtype", help="the ranker's dtype, if not --dtype's (e.g. float32 scores)"
    )
    models.add_argument(
        "--caption-batch-size",
        type=int,
        help="images each worker thread sends the models at once (default: the captioner's "
        "own: 8, or 4 for blip2 and vlm)",
    )
    models.add_argument(
        "--engine-batch-size",
        type=int,
        default=256,
        help="most images per model call, once the requests of all threads and processes "
        "are merged: the GPU batch (default: %(default)s)",
    )
    models.add_argument(
        "--rank-batch-size",
        type=int,
        help="most images per ranking call (default: the ranker's own: 32, or 16 for blip-itm)",
    )
    models.add_argument(
        "--engine",
        choices=("auto", "local", "shared"),
        default="auto",
        help="where the models run: local (in each worker process), shared (one engine "
        "process per GPU serving every process of the machine), auto (shared where there is "
        "a GPU or --model-copies is set) (default: %(default)s)",
    )
    models.add_argument(
        "--model-copies",
        type=int,
        help="shared engines per machine, spread over its GPUs; default: one per GPU",
    )
    models.add_argument(
        "--accelerator-hint",
        help="Beam resource hint for the decode, caption and rank steps only, e.g. "
        "'type:nvidia-l4;count:1;install-nvidia-driver'",
    )
    models.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let transformers run code from the model's repository",
    )

    export = commands.add_parser(
        "export",
        allow_abbrev=False,
        help="write other formats from a finished output, without captioning again",
        epilog="Every other flag goes to Beam's PipelineOptions.",
    )
    export.add_argument("output", help="the output folder of a run (or its .jsonl path)")
    export.add_argument(
        "--format",
        dest="formats",
        type=_names,
        required=True,
        help="comma-separated: sidecar, parquet, webdataset",
    )
    add_format_options(export)
    add_max_bytes(export)

    report = commands.add_parser(
        "report",
        allow_abbrev=False,
        help="write a static HTML page of an output, finished or partial: OUTPUT/report/",
    )
    report.add_argument("output", help="the output folder of a run (or its .jsonl path)")
    report.add_argument(
        "--page-size",
        type=_at_least_one,
        default=200,
        help="cards per page (default: %(default)s)",
    )
    report.add_argument(
        "--thumbnail-side",
        type=_at_least_one,
        default=192,
        help="thumbnails' longer side, in pixels (default: %(default)s)",
    )
    report.add_argument(
        "--workers", type=_at_least_one, help="threads making thumbnails (default: CPUs)"
    )
    report.add_argument(
        "--report-dir", help="where to write it (required for a gs:// output): a local folder"
    )

    decoding = run.add_argument_group("decoding")
    default = DecodingOptions()
    for field, flag, kind, text in DECODING_OPTIONS:
        decoding.add_argument(
            flag,
            dest=field,
            type=kind,
            help=text
            if "(default" in text
            else f"{text} (default: {_shown(getattr(default, field))})",
        )

    captions = run.add_argument_group("captions")
    captions.add_argument(
        "--remove-pattern",
        help="a regular expression removed from every candidate before ranking",
    )
    captions.add_argument(
        "--min-words",
        type=int,
        help="candidates with fewer words are dropped before ranking (default: 0)",
    )
    captions.add_argument(
        "--prefix", default="", help="text put before every final caption (a trigger word)"
    )
    captions.add_argument("--suffix", default="", help="text put after every final caption")
    captions.add_argument(
        "--min-score",
        type=float,
        help="images whose best caption scores lower go to rejected.jsonl, not the dataset",
    )

    images = run.add_argument_group("images")
    images.add_argument(
        "--max-side",
        type=int,
        default=RunConfig.model_fields["max_side"].default,
        help="shrink images to this many pixels on the longer side when decoding, for models "
        "that take whole pictures (BLIP's and CLIP's views decode JPEGs at the smallest scale "
        "that covers them) (default: %(default)s)",
    )
    images.add_argument(
        "--max-pixels",
        type=int,
        default=RunConfig.model_fields["max_pixels"].default,
        help="refuse images with more pixels than this (decompression bombs) "
        "(default: %(default)s)",
    )
    add_max_bytes(images)
    return parser


# Config fields whose flag is not the field's name.
RENAMED_FLAGS = {"formats": "--format"}


def _flag_of(field: str) -> str:
    flag = DECODING_FLAGS.get(field) or RENAMED_FLAGS.get(field)
    return flag or "--" + field.replace("_", "-")


def _in_flags(message: str) -> str:
    """A validation message as a user of the CLI reads it: fields named by their flags."""
    known = set(DECODING_FLAGS) | set(RunConfig.model_fields)
    return re.sub(
        r"\b[a-z]+(?:_[a-z]+)+\b",
        lambda m: _flag_of(m.group()) if m.group() in known else m.group(),
        message,
    )


def _line(error: ErrorDetails) -> str:
    message = _in_flags(error["msg"].removeprefix("Value error, "))
    field = next((str(part) for part in reversed(error["loc"]) if isinstance(part, str)), "")
    return f"{_flag_of(field)}: {message}" if field else message


def _one_of(values: dict, name: str, alias: str) -> str:
    given, aliased = values.pop(name), values.pop(alias)
    flag, alias_flag = "--" + name, "--" + alias.replace("_", "-")
    if given is not None and aliased is not None:
        raise UsageError(f"{flag} and {alias_flag} name the same thing: give one")
    if given is None and aliased is None:
        raise UsageError(f"{flag} is required")
    return given if given is not None else aliased


def to_config(args: argparse.Namespace) -> RunConfig:
    """The flags as a `RunConfig`, or a `UsageError` listing every bad value, one a line."""
    values = vars(args).copy()
    values.pop("command")
    values["input"] = _one_of(values, "input", "dataset_filename")
    values["output"] = _one_of(values, "output", "output_filename")
    decoding = {name: values.pop(name) for name in DECODING_FLAGS}
    given = {name: value for name, value in decoding.items() if value is not None}
    rules = {name: values.pop(name) for name in RULE_FIELDS}
    rules = {name: value for name, value in rules.items() if value is not None}
    try:
        return RunConfig(**values, decoding=given, rules=rules)
    except ValidationError as error:
        raise UsageError("\n".join(_line(e) for e in error.errors())) from None


def unknown_beam_flags(beam_args: Sequence[str]) -> list[str]:
    """Flags that neither captionflow nor any Beam options class knows: typos, mostly."""
    parser = Parser(allow_abbrev=False, add_help=False)
    pending = [PipelineOptions]
    while pending:
        cls = pending.pop()
        cls._add_argparse_args(parser)
        pending.extend(cls.__subclasses__())
    _, unknown = parser.parse_known_args(list(beam_args))
    return [arg for arg in unknown if arg.startswith("--")]


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    if unknown := unknown_beam_flags(beam_args):
        raise UsageError(f"unknown flag(s): {' '.join(unknown)}")
    options = PipelineOptions(list(beam_args))
    standard = options.view_as(StandardOptions)
    standard.runner = standard.runner or DEFAULT_RUNNER
    check_runner(standard.runner)
    return options


def check_runner(name: str) -> None:
    """Beam only resolves the runner's name when the pipeline is built: too late for a clear
    message (and the CLI would retry it), so resolve it here."""
    try:
        create_runner(name)
    except ValueError:
        known = ", ".join(StandardOptions.KNOWN_RUNNER_NAMES)
        raise UsageError(
            f"--runner: unknown runner {name!r}: use one of {known}, "
            "or the full name of a PipelineRunner subclass (package.module.Class)"
        ) from None
    except (ImportError, AttributeError) as error:  # a dotted name, or a missing Beam extra
        raise UsageError(f"--runner: cannot load runner {name!r}: {error}") from None


def check_models(config: RunConfig) -> None:
    """On a local runner, fail in a second when a model cannot be had, saying what to do."""
    problems = []
    for flag, reference, table, default in (
        ("captioner", config.captioner, captioners(), "blip"),
        ("ranker", config.ranker, rankers(), "clip"),
    ):
        name, model = parse_reference(reference, table, default)
        model = model or table[name].default_model
        if not model:  # a handler with no model to load (`--ranker none`)
            continue
        if problem := table[name].check_model(model, flag):
            problems.append(f"--{flag}: cannot load {model}: {problem}")
    if problems:
        raise UsageError("\n".join(problems))


def prepare(argv: Sequence[str]) -> tuple[RunConfig, PipelineOptions]:
    """Parse and validate everything, before any work: the job's settings and Beam's options."""
    args, beam_args = build_parser().parse_known_args(argv)
    config = to_config(args)
    options = pipeline_options(beam_args)
    if options.view_as(StandardOptions).runner in LOCAL_RUNNERS:
        try:
            check_device(config.device)
        except DeviceUnavailableError as error:
            raise UsageError(f"--device: {error}") from None
        check_models(config)
    return config, options


def check_no_orphaned_checkpoints(config: RunConfig) -> None:
    """Parts left by an interrupted run (of the metadata, or of `rejected.jsonl`: the files
    `--resume` keeps) are either kept (`--resume`) or removed by the user, never silently
    dropped by a run that starts over."""
    if config.resume:
        return
    folders = [parts_dir(path) for path in record_files(config)]
    found = FileSystems.match([join(literal(parts), "part-*.jsonl") for parts in folders])
    left = {parts: len(match.metadata_list) for parts, match in zip(folders, found, strict=True)}
    if count := sum(left.values()):
        where = " and ".join(parts for parts, number in left.items() if number)
        raise UsageError(
            f"{config.output_dir} holds {count} checkpoint file(s) of an interrupted run: "
            f"pass --resume to keep them, or delete {where} to start over"
        )


def progress_folder(options: PipelineOptions) -> str | None:
    """Where a local run on a terminal counts its progress for the live line; None elsewhere
    (not a terminal: the log lines; a distributed runner: its counters and logs)."""
    if options.view_as(StandardOptions).runner not in LOCAL_RUNNERS or not sys.stderr.isatty():
        return None
    return tempfile.mkdtemp(prefix="captionflow-progress-")


@contextlib.contextmanager
def spill_folder(options: PipelineOptions) -> Iterator[str | None]:
    """For a local runner, which holds every shuffle in memory, a temporary folder through
    which the job groups its paths instead (`GroupStrings`), removed when the run ends."""
    if options.view_as(StandardOptions).runner not in LOCAL_RUNNERS:
        yield None
        return
    folder = tempfile.mkdtemp(prefix="captionflow-spill-")
    logger.info("grouping paths through files in %s (a local runner)", folder)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def file_states(paths: Sequence[str]) -> dict[str, tuple[int, float] | None]:
    """Each file's size and time of last change; None where it does not exist."""
    states: dict[str, tuple[int, float] | None] = {}
    for path in paths:
        found = FileSystems.match([literal(path)])[0].metadata_list
        states[path] = (found[0].size_in_bytes, found[0].last_updated_in_seconds) if found else None
    return states


def caption(config: RunConfig, options: PipelineOptions, stop: StopSignals) -> None:
    """Run the job, resuming it after a failure until `config.attempts`; never after a
    fatal error or a stop signal. A run without `--resume` starts over: its retries keep
    what its failed attempts wrote, never the records an earlier run finished (the
    `record_files` that are still as they were when it began)."""
    started = time.time()
    before = {} if config.resume else file_states(record_files(config))
    for attempt in range(1, config.attempts + 1):
        resume = config.resume or attempt > 1
        now = file_states(list(before)) if attempt > 1 else {}
        replaced = [path for path, state in now.items() if state and state == before[path]]
        with spill_folder(options) as spill:
            pipeline = beam.Pipeline(options=options)
            progress = progress_folder(options)
            build_caption_pipeline(
                pipeline,
                config.model_copy(update={"resume": resume}),
                started=started,
                progress=progress,
                spill_dir=spill,
                replaced=replaced,
            )
            try:
                with ProgressLine(progress, sys.stderr) if progress else contextlib.nullcontext():
                    run_to_end(pipeline, stop)
                return
            except Interrupted:
                raise
            except BaseException as error:
                if message := fatal_message(error):
                    raise UsageError(message) from None
                if attempt == config.attempts or not isinstance(error, Exception):
                    raise
                logger.warning(
                    "attempt %d of %d failed (%s: %s); resuming from what it wrote",
                    attempt,
                    config.attempts,
                    type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "",
                )


def run_to_end(pipeline: beam.Pipeline, stop: StopSignals) -> None:
    """Run the job and wait for its end; on a stop signal, `stop.interrupted()`, the job
    cancelled first where its runner runs it apart from this process."""
    result = None
    try:
        result = pipeline.run()  # local runners work here; remote ones return
        result.wait_until_finish()
    except BaseException:
        if stop.received:
            if result is not None:  # a remote job would run on without its launcher
                cancel(result)
            raise stop.interrupted() from None
        raise


def cancel(result: PipelineResult) -> None:
    """Cancel a job that its runner runs apart from this process (Dataflow, a job service)."""
    try:
        result.cancel()
        logger.warning("cancelled the job, so that it does not run on without its launcher")
    except Exception as error:  # nothing more can be done from here: say so
        logger.error("could not cancel the job: %s; cancel it by hand", error)


def outcome(config: RunConfig) -> int:
    """The exit code the run's summary calls for: NOTHING_CAPTIONED when the output holds no
    caption at all; a warning when more images failed than `--max-failure-rate` allows."""
    path = join(config.output_dir, SUMMARY_FILE)
    if not FileSystems.exists(path):  # a runner that returns before the job ends
        return 0
    with FileSystems.open(path, compression_type="uncompressed") as file:
        summary = json.loads(file.read())
    images, failed = summary["images"], summary["failed"]
    for warning in summary.get("warnings", []):
        logger.warning("%s", warning.replace("OUTPUT", config.output_dir))
    if summary["captioned"] + summary.get("rejected", 0) + summary["kept_from_earlier_run"] == 0:
        logger.error(
            "no image was captioned (%d images, %d failed: %s); see %s",
            images,
            failed,
            summary["errors_by_type"],
            join(config.output_dir, ERRORS_FILE),
        )
        return NOTHING_CAPTIONED
    if images and failed / images > config.max_failure_rate:
        logger.warning(
            "%d of %d images failed (%.1f%%, above --max-failure-rate %g): %s; see %s",
            failed,
            images,
            100 * failed / images,
            config.max_failure_rate,
            summary["errors_by_type"],
            join(config.output_dir, ERRORS_FILE),
        )
    return 0


def export(argv: Sequence[str]) -> int:
    """`captionflow export`: one Beam job that reads the metadata once and writes each format."""
    args, beam_args = build_parser().parse_known_args(argv)
    values = vars(args).copy()
    values.pop("command")
    try:
        config = ExportConfig(**values)
    except ValidationError as error:
        raise UsageError("\n".join(_line(e) for e in error.errors())) from None
    options = pipeline_options(beam_args)
    logger.info("exporting %s as %s", config.metadata_path, ", ".join(config.formats))
    local = options.view_as(StandardOptions).runner in LOCAL_RUNNERS
    with StopSignals(then=EXPORT_AGAIN) as stop:  # from the lock's first write to the end
        with OutputLock(config.output_dir):
            pipeline = beam.Pipeline(options=options)
            build_export_pipeline(pipeline, config, spread=not local)
            run_to_end(pipeline, stop)
        logger.info("done: %s", config.output_dir)
        return export_outcome(config)


def export_outcome(config: ExportConfig) -> int:
    """From what the export wrote (any runner): a warning for each shard format that left
    images out (`shard-errors.jsonl`); NOTHING_EXPORTED when one of them has no image at all
    but left some out."""
    path = join(config.output_dir, SHARD_ERRORS_FILE)
    kinds = [kind for kind in config.formats if kind in SHARD_FORMATS]
    if not kinds or not FileSystems.exists(path):
        return 0
    left_out = Counter(str(row["stage"]) for _, row in read_json_lines(path))
    code = 0
    for kind in kinds:
        shards = len(published_shards(config.output_dir, SHARD_FORMATS[kind]))
        for line in left_out_warnings(kind, left_out[kind], shards):
            log = logger.warning if shards else logger.error
            log("%s", line.replace("OUTPUT", config.output_dir))
        if left_out[kind] and not shards:
            code = NOTHING_EXPORTED
    return code


def report(argv: Sequence[str]) -> int:
    """`captionflow report`: the page of an output, finished or partial (a run may be writing
    into it: no lock is taken). Prints the page's path."""
    args = build_parser().parse_args(argv)
    try:
        built = build_report(
            args.output,
            page_size=args.page_size,
            thumbnail_side=args.thumbnail_side,
            workers=args.workers,
            report_dir=args.report_dir,
        )
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error).replace("report_dir", "--report-dir")) from None
    logger.info(
        "report of %d captioned, %d rejected, %d failed images%s in %.1f s",
        built.captions,
        built.rejected,
        built.failures,
        " (a partial output)" if built.partial else "",
        built.seconds,
    )
    print(f"report: {built.path}")
    return 0


def run(argv: Sequence[str]) -> int:
    command = build_parser().parse_known_args(argv)[0].command
    if command == "export":
        return export(argv)
    if command == "report":
        return report(argv)
    config, options = prepare(argv)
    runner = options.view_as(StandardOptions).runner
    logger.info(
        "captioning %s -> %s with captioner %s, ranker %s, %d candidates (%s), device %s, "
        "dtype %s (captioner %s, ranker %s), runner %s",
        config.input,
        config.output_dir,
        config.captioner,
        config.ranker,
        config.decoding.num_captions,
        config.decoding.strategy,
        config.device,
        config.dtype,
        config.caption_dtype or config.dtype,
        config.rank_dtype or config.dtype,
        runner,
    )
    if options.view_as(TestOptions).dry_run:  # builds the job, touches no output
        with beam.Pipeline(options=options) as pipeline:
            build_caption_pipeline(pipeline, config)
        return 0
    with StopSignals() as stop:  # from the lock's first write to the report's last
        with OutputLock(config.output_dir):
            check_no_orphaned_checkpoints(config)
            caption(config, options, stop)
        logger.info("done: %s", config.output_dir)
        code = outcome(config)
        if config.report:
            print(f"report: {write_report(config.output)}")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(QuietFatalTracebacks())
        handler.addFilter(QuietStops())
    logging.getLogger("apache_beam.typehints").setLevel(logging.WARNING)
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except (UsageError, FatalError) as error:
        for line in str(error).splitlines():
            print(f"captionflow: error: {line}", file=sys.stderr)
        return USAGE
    except Interrupted as stopped:
        logging.disable()  # Beam's threads log on as the job winds down: nothing of theirs
        for handler in logging.getLogger().handlers:  # after this line (one being written
            handler.acquire()  # is out first; the process ends holding the locks)
        print(
            f"captionflow: stopped by {stopped.name}; {stopped.then}",
            file=sys.stderr,
        )
        sys.stderr.flush()
        os._exit(stopped.exit_code)  # Beam's worker threads would hold a normal exit
