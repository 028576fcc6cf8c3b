"""`captionflow run`: parse flags, validate them, wire the pipeline. Nothing else."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from pydantic import ValidationError

from captionflow import __version__
from captionflow.config import RunConfig
from captionflow.handlers.decoding import DecodingOptions
from captionflow.handlers.loading import check_available
from captionflow.handlers.registry import CAPTIONERS, RANKERS, parse_reference
from captionflow.pipelines import build_caption_pipeline

logger = logging.getLogger("captionflow")

LOCAL_RUNNERS = {"FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner"}
DEFAULT_RUNNER = "FnApiRunner"  # Beam's DirectRunner first tries to download Prism at run time
DECODING_FLAGS = {
    "num_captions": "--num-captions",
    "strategy": "--decoding",
    "top_p": "--top-p",
    "temperature": "--temperature",
    "repetition_penalty": "--repetition-penalty",
    "num_beams": "--num-beams",
    "min_new_tokens": "--min-new-tokens",
    "max_new_tokens": "--max-new-tokens",
    "prompt": "--prompt",
}


class UsageError(Exception):
    """A bad flag or value: reported as one line each, before any work."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
        "--dataset-filename",
        dest="input",
        required=True,
        help="a list file (.txt: one path a line), a glob, an image or a folder",
    )
    io.add_argument(
        "--output",
        "--output-filename",
        dest="output",
        required=True,
        help="output folder (or a .jsonl path for the metadata file)",
    )
    io.add_argument("--limit", type=int, help="caption only the first N paths (sorted)")

    models = run.add_argument_group("models")
    models.add_argument(
        "--captioner",
        default="blip",
        help=f"NAME, NAME:MODEL or MODEL; names: {', '.join(CAPTIONERS)}",
    )
    models.add_argument(
        "--ranker", default="clip", help=f"NAME, NAME:MODEL or MODEL; names: {', '.join(RANKERS)}"
    )
    models.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    models.add_argument(
        "--dtype",
        default="auto",
        help="auto (float16 on GPU, float32 on CPU), float32, float16, bfloat16",
    )
    models.add_argument("--caption-batch-size", type=int, default=8)
    models.add_argument("--rank-batch-size", type=int, default=32)
    models.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the model's repository (off by default)",
    )

    decoding = run.add_argument_group("decoding")
    defaults = DecodingOptions()
    decoding.add_argument(
        "--num-captions",
        type=int,
        default=defaults.num_captions,
        help="candidate captions per image",
    )
    decoding.add_argument(
        "--decoding",
        dest="strategy",
        default=defaults.strategy,
        help="sample (nucleus sampling) or beam (beam search)",
    )
    decoding.add_argument("--top-p", type=float, default=defaults.top_p)
    decoding.add_argument("--temperature", type=float, default=defaults.temperature)
    decoding.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    decoding.add_argument("--num-beams", type=int, default=defaults.num_beams)
    decoding.add_argument("--min-new-tokens", type=int, default=defaults.min_new_tokens)
    decoding.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    decoding.add_argument("--prompt", default=defaults.prompt)

    images = run.add_argument_group("images")
    images.add_argument(
        "--max-side",
        type=int,
        default=RunConfig.model_fields["max_side"].default,
        help="shrink images to this many pixels on the longer side when decoding",
    )
    images.add_argument(
        "--max-pixels",
        type=int,
        default=RunConfig.model_fields["max_pixels"].default,
        help="refuse images with more pixels than this (decompression bombs)",
    )
    return parser


def _flag(location: tuple[int | str, ...]) -> str:
    field = str(location[-1]) if location else ""
    if not field:
        return ""
    return DECODING_FLAGS.get(field, "--" + field.replace("_", "-")) + ": "


def to_config(args: argparse.Namespace) -> RunConfig:
    """The flags as a `RunConfig`, or a `UsageError` listing every bad value, one a line."""
    values = vars(args).copy()
    values.pop("command")
    decoding = {name: values.pop(name) for name in DECODING_FLAGS}
    try:
        return RunConfig(**values, decoding=DecodingOptions(**decoding))
    except ValidationError as error:
        lines = [_flag(e["loc"]) + e["msg"].removeprefix("Value error, ") for e in error.errors()]
        raise UsageError("\n".join(lines)) from None


def unknown_beam_flags(beam_args: Sequence[str]) -> list[str]:
    """Flags that neither captionflow nor any Beam options class knows: typos, mostly."""
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
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
    return options


def check_models(config: RunConfig) -> None:
    """On a local runner, fail in a second when a model cannot be had, saying what to do."""
    for flag, reference, table, default in (
        ("captioner", config.captioner, CAPTIONERS, "blip"),
        ("ranker", config.ranker, RANKERS, "clip"),
    ):
        name, model = parse_reference(reference, table, default)
        model = model or table[name].default_model
        if problem := check_available(model):
            raise UsageError(
                f"--{flag}: cannot load {model}: {problem}. Download it where the Hub can be "
                f"reached (`hf download {model} --local-dir DIR`) and pass --{flag} {name}:DIR"
            )


def run(argv: Sequence[str]) -> None:
    args, beam_args = build_parser().parse_known_args(argv)
    config = to_config(args)
    options = pipeline_options(beam_args)
    runner = options.view_as(StandardOptions).runner
    if runner in LOCAL_RUNNERS:
        check_models(config)
    logger.info(
        "captioning %s -> %s with captioner %s, ranker %s, %d candidates (%s), device %s, "
        "dtype %s, runner %s",
        config.input,
        config.output_dir,
        config.captioner,
        config.ranker,
        config.decoding.num_captions,
        config.decoding.strategy,
        config.device,
        config.dtype,
        runner,
    )
    with beam.Pipeline(options=options) as pipeline:
        build_caption_pipeline(pipeline, config)
    logger.info("done: %s", config.output_dir)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("apache_beam.typehints").setLevel(logging.WARNING)
    try:
        run(sys.argv[1:] if argv is None else argv)
    except UsageError as error:
        for line in str(error).splitlines():
            print(f"captionflow: error: {line}", file=sys.stderr)
        return 2
    return 0
