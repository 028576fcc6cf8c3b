"""Finishing a job that stopped half way: what an earlier run wrote is kept, not redone."""

from __future__ import annotations

import json

import apache_beam as beam
from apache_beam.io.fileio import EmptyMatchTreatment, MatchAll, ReadableFile, ReadMatches
from apache_beam.pvalue import PBegin, PCollection

from captionflow.paths import join
from captionflow.transforms.write import parts_dir


def _lines(file: ReadableFile) -> list[str]:
    return [line for line in file.read_utf8().splitlines() if line.strip()]


class ReadDone(beam.PTransform):
    """The metadata lines an earlier run left at `metadata_path`: the finished file, and the
    part files of a run that was killed before it could join them."""

    def __init__(self, metadata_path: str) -> None:
        super().__init__()
        self.patterns = [metadata_path, join(parts_dir(metadata_path), "part-*.jsonl")]

    def expand(self, pbegin: PBegin) -> PCollection[str]:
        return (
            pbegin
            | "Patterns" >> beam.Create(self.patterns)
            | "Match" >> MatchAll(EmptyMatchTreatment.ALLOW)
            | "Open" >> ReadMatches()
            | "Lines" >> beam.FlatMap(_lines)
        )


def _still_to_do(grouped: tuple[str, dict[str, list]]) -> list[str]:
    uri, found = grouped
    return [uri] if found["todo"] and not found["done"] else []


class SkipDone(beam.PTransform):
    """`(uris, done_lines) | SkipDone()`: the URIs that no done line names as its image."""

    def expand(self, inputs: tuple[PCollection[str], PCollection[str]]) -> PCollection[str]:
        uris, done = inputs
        todo = uris | "KeyTodo" >> beam.Map(lambda uri: (uri, None))
        done_uris = done | "KeyDone" >> beam.Map(lambda line: (json.loads(line)["image_uri"], None))
        return (
            {"todo": todo, "done": done_uris}
            | "Join" >> beam.CoGroupByKey()
            | "Todo" >> beam.FlatMap(_still_to_do)
        )
