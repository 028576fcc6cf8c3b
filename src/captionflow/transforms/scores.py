"""Keeping a dataset's captions above a score: the rest are set apart, not lost."""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
from apache_beam.pvalue import PCollection, TaggedOutput

from captionflow.records import CaptionRecord

REJECTED = "rejected"


class SplitByScore(beam.PTransform):
    """Records whose best `score` is at least `min_score` on the main output; the others on
    `rejected`. Element-wise: nothing waits for the rest of the run."""

    def __init__(self, min_score: float) -> None:
        super().__init__()
        self.min_score = min_score

    def expand(self, records: PCollection[CaptionRecord]) -> beam.pvalue.DoOutputsTuple:
        def split(record: CaptionRecord) -> Iterator[CaptionRecord | TaggedOutput]:
            if record.score is None:  # the ranker `none`: the CLI refuses --min-score with it
                raise ValueError(
                    f"SplitByScore needs scores: {record.image_uri} has none (ranker "
                    f"{record.ranker!r} scores nothing)"
                )
            yield record if record.score >= self.min_score else TaggedOutput(REJECTED, record)

        return records | "Split" >> beam.FlatMap(split).with_outputs(REJECTED, main="kept")
