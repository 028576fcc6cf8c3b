"""The captioning job: paths in; `metadata.jsonl`, `errors.jsonl` and `summary.json` out."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection

import apache_beam as beam
from apache_beam.pvalue import AsSingleton

from captionflow import progress as counted
from captionflow.config import RunConfig
from captionflow.formats import extension
from captionflow.handlers.base import CaptionModelHandler, RankModelHandler
from captionflow.handlers.registry import captioner_handler, ranker_handler
from captionflow.paths import join
from captionflow.records import CaptionRecord
from captionflow.transforms import CaptionImages, LogProgress, ReadImagePaths, WriteErrors
from captionflow.transforms.grouping import each
from captionflow.transforms.progress import CountInto
from captionflow.transforms.resume import ReadDone, SkipDone, metadata_key
from captionflow.transforms.scores import SplitByScore
from captionflow.transforms.shards import (
    SHARD_FORMATS,
    MetadataRows,
    WriteShardFormats,
    earlier_shards_warnings,
)
from captionflow.transforms.sidecars import (
    RUN_FILES,
    CaptionFileWarnings,
    NoCaptionFileWarnings,
    WriteSidecars,
)
from captionflow.transforms.splits import ForSplits
from captionflow.transforms.summary import (
    CAPTIONED,
    KEPT,
    REJECTED,
    SUMMARY_FILE,
    CountOutcomes,
    WriteSummary,
    outcome_of_error,
)
from captionflow.transforms.write import (
    REJECTED_FILE,
    ToImageFolderRows,
    WriteJsonLines,
    file_name_in,
)


def model_handlers(config: RunConfig) -> tuple[CaptionModelHandler, RankModelHandler]:
    """The job's captioner and ranker, each in its own dtype (`--caption-dtype`,
    `--rank-dtype`) or else in `--dtype`."""
    options = {"device": config.device, "trust_remote_code": config.trust_remote_code}
    captioner = captioner_handler(
        config.captioner,
        decoding=config.decoding,
        rules=config.rules,
        max_batch_size=config.caption_batch_size,
        dtype=config.caption_dtype or config.dtype,
        **options,
    )
    ranker = ranker_handler(
        config.ranker,
        max_batch_size=config.rank_batch_size,
        dtype=config.rank_dtype or config.dtype,
        **options,
    )
    return captioner, ranker


def record_files(config: RunConfig) -> list[str]:
    """The files whose records `--resume` keeps: the metadata file and `rejected.jsonl`."""
    return [
        join(config.output_dir, config.metadata_filename),
        join(config.output_dir, REJECTED_FILE),
    ]


def build_caption_pipeline(
    pipeline: beam.Pipeline,
    config: RunConfig,
    *,
    started: float | None = None,
    progress: str | None = None,
    spill_dir: str | None = None,
    replaced: Collection[str] = (),
) -> None:
    """Add the whole job to `pipeline`. With `config.resume`, images already in the output
    (finished file or parts of a killed run) are kept and not captioned again; of the
    `record_files` in `replaced` (an earlier run's, which this one replaces: the retry of a
    run without `--resume`), only the parts are kept. With
    `progress` (a local folder), inputs, captions and errors are counted there as they pass
    (`captionflow.progress`). With `spill_dir` (for local runners, which hold shuffles in
    memory; removed by the caller after the run), paths are grouped through files there
    (`GroupStrings`), and shards are made where the rows are read (`WriteShards`)."""
    captioner, ranker = model_handlers(config)
    metadata_path, rejected_path = record_files(config)

    reserved = RUN_FILES | {config.metadata_filename}  # the run's files; no caption file's
    read = ReadImagePaths(config.input, limit=config.limit, spill_dir=spill_dir).with_errors()
    uris, read_errors = pipeline | "ReadImagePaths" >> read
    own = own_files(config.output_dir, reserved)
    uris = uris | "NotOwnFiles" >> beam.Filter(lambda uri: not own(uri))
    if progress:
        read_errors = read_errors | "CountReadErrors" >> CountInto(progress, counted.INPUTS)
    kept = pipeline | "NoneKept" >> beam.Create([])
    if config.resume:
        done = pipeline | "ReadDone" >> ReadDone(
            metadata_path, config.output_dir, also=[rejected_path], replaced=replaced
        )
        uris, kept = (uris, done) | "SkipDone" >> SkipDone(spill_dir)
    if progress:
        uris = uris | "CountInputs" >> CountInto(progress, counted.INPUTS)

    caption_images = CaptionImages(
        captioner,
        ranker,
        max_side=config.max_side,
        max_pixels=config.max_pixels,
        max_bytes=config.max_bytes,
        engine=config.engine,
        engine_batch_size=config.engine_batch_size,
        engines=config.model_copies,
    ).with_errors_apart()
    if config.accelerator_hint:  # decoding stays fused with inference: images never shuffle
        caption_images = caption_images.with_resource_hints(accelerator=config.accelerator_hint)
    captions, caption_errors = uris | "CaptionImages" >> caption_images
    if config.prefix or config.suffix:
        captions = captions | "PrefixAndSuffix" >> beam.Map(
            CaptionRecord.with_text_around, config.prefix, config.suffix
        )
    # Nothing between the ranker and the part files but element-wise steps: a Flatten or a
    # shuffle there would make local runners hold every record until captioning ends. The
    # same for failures: each step's are counted and written where they are made.
    errors = (read_errors, *caption_errors)
    captions = captions | "Progress" >> LogProgress()
    if progress:
        captions = captions | "CountCaptioned" >> CountInto(progress, counted.CAPTIONED)
        errors = each(errors, "CountErrors", lambda: CountInto(progress, counted.ERRORS))
    rejected = pipeline | "NoneRejected" >> beam.Create([])
    if config.min_score is not None:
        captions, rejected = captions | "MinScore" >> SplitByScore(config.min_score)
    # Always written, if empty, as `errors.jsonl` is: an earlier run's never stays beside
    # this run's records.
    written = [
        errors | "WriteErrors" >> WriteErrors(config.output_dir),
        rejected
        | "WriteRejected"
        >> _WriteRecords(rejected_path, config, spill_dir, rejected_path in replaced),
    ]
    sidecars = "sidecar" in config.formats
    if sidecars:  # before the metadata: a record there has its file
        captions = captions | "WriteSidecars" >> WriteSidecars(
            extension=config.sidecar_extension,
            overwrite=config.overwrite_captions,
            reserved=reserved,
        )
    metadata_written = captions | "WriteMetadata" >> _WriteRecords(
        metadata_path, config, spill_dir, metadata_path in replaced
    )
    written.append(metadata_written)
    captioned_uris = captions | "CaptionedUris" >> beam.Map(lambda record: record.image_uri)
    split_files, warnings = (metadata_written, captioned_uris, kept) | "ForSplits" >> ForSplits(
        config.output_dir
    )
    written.append(split_files)
    shard_formats = [name for name in config.formats if name in SHARD_FORMATS]
    kept_sidecars = sidecars and config.resume
    if shard_formats or kept_sidecars:  # from the finished file: every image, kept ones too
        rows = metadata_written | "MetadataRows" >> MetadataRows()
    named = captioned_uris  # the images given caption files
    if kept_sidecars:  # the earlier run may have written none: the missing ones, from its rows
        under_output = rows | "UnderOutput" >> beam.Filter(
            lambda row: row["file_name"] != row["image_uri"]
        )
        kept_files = (
            under_output
            | "WriteKeptSidecars"
            >> WriteSidecars(extension=config.sidecar_extension, overwrite=False, reserved=reserved)
            | "KeptSidecars" >> beam.combiners.Count.Globally()
        )
        written.append(kept_files)
        # Every row's, not only this run's: a new `a.png` shares `a.txt` with a kept `a.jpg`.
        named = under_output | "NamedUris" >> beam.Map(lambda row: row["image_uri"])
    if sidecars:
        caption_files = named | "CaptionFileWarnings" >> CaptionFileWarnings(
            config.output_dir,
            extension=config.sidecar_extension,
            reserved=reserved,
            spill_dir=spill_dir,
        )
        warnings = warnings | "AndCaptionFiles" >> beam.Map(_joined, AsSingleton(caption_files))
        captionless = (rejected, *errors) | "NoCaptionFiles" >> NoCaptionFileWarnings()
        warnings = warnings | "AndNoCaptionFiles" >> beam.Map(_joined, AsSingleton(captionless))
    if shard_formats:
        shard_warnings = rows | "WriteShards" >> WriteShardFormats(
            config.output_dir,
            shard_formats,
            rows_per_shard=config.rows_per_shard,
            spread=spill_dir is None,  # a local runner would hold the rows
            max_bytes=config.max_bytes,
        )
        written.append(shard_warnings)
        warnings = warnings | "AndShards" >> beam.Map(_joined, AsSingleton(shard_warnings))

    if earlier := [kind for kind in SHARD_FORMATS if kind not in config.formats]:
        warnings = warnings | "AndEarlierShards" >> beam.Map(
            lambda lines: lines + earlier_shards_warnings(config.output_dir, earlier)
        )

    # Each counted where it is made: a Flatten of per-image labels is held by local runners.
    outcome_counts = (
        captions | "Captioned" >> CountOutcomes(CAPTIONED),
        rejected | "Rejected" >> CountOutcomes(REJECTED),
        kept | "Kept" >> CountOutcomes(KEPT),
        *each(errors, "Failed", lambda: CountOutcomes(outcome_of_error)),
    ) | "Outcomes" >> beam.Flatten()
    outcome_counts | "WriteSummary" >> WriteSummary(
        join(config.output_dir, SUMMARY_FILE),
        started=time.time() if started is None else started,
        settings=config.model_dump(mode="json"),
        after=tuple(written),
        warnings=warnings,
    )


def own_files(output_dir: str, reserved: frozenset[str]) -> Callable[[str], bool]:
    """Whether a listed path is one of the run's own files, as a glob over the output lists
    them (`OUT/**`): its records, summary and lock (`reserved` names, and their temp copies
    that a killed run left: `metadata.jsonl.tmp-...`), checkpoint parts, staged and finished
    shards."""
    relative = file_name_in(output_dir)
    shards = {(f.folder, f.suffix) for f in SHARD_FORMATS.values()}

    def own(uri: str) -> bool:
        if (name := relative(uri)) == uri:
            return False  # not under the output
        *folders, file = name.split("/")
        return (
            re.sub(r"\.tmp(-[0-9a-f]+)?$", "", file) in reserved
            or any(folder.endswith(".parts") or ".tmp-" in folder for folder in folders)
            or (len(folders) == 1 and (folders[0], extension(file)) in shards)
        )

    return own


def _joined(lines: list[str], more: list[str]) -> list[str]:
    return lines + more


class _WriteRecords(beam.PTransform):
    """Records as ImageFolder rows into one JSON-lines file of the output, checkpointed in
    parts, resumable (from the parts alone when the finished file is `replaced`)."""

    def __init__(
        self, destination: str, config: RunConfig, spill_dir: str | None, replaced: bool
    ) -> None:
        super().__init__()
        self.destination = destination
        self.config = config
        self.spill_dir = spill_dir
        self.replaced = replaced

    def expand(self, records: beam.PCollection[CaptionRecord]) -> beam.PCollection[str]:
        output_dir = self.config.output_dir
        return (
            records
            | "ToRows" >> ToImageFolderRows(output_dir)
            | "Write"
            >> WriteJsonLines(
                self.destination,
                key=metadata_key(output_dir),
                lines_per_part=self.config.checkpoint_every,
                resume=self.config.resume,
                keep_finished=not self.replaced,
                spill_dir=self.spill_dir,
            )
        )
