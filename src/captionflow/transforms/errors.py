"""The side output that carries failed images, and the counters that count them."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import PCollection, TaggedOutput

from captionflow.records import ErrorRecord

ERRORS = "errors"
NAMESPACE = "captionflow"
# Failed images' records: one collection, or those of the steps that made them, unflattened
# (a local runner holds a Flatten's whole output).
ErrorRecords = PCollection[ErrorRecord] | tuple[PCollection[ErrorRecord], ...]


def error_output(record: ErrorRecord) -> TaggedOutput:
    """Tag a failure for the `errors` output and count it by stage and by type."""
    Metrics.counter(NAMESPACE, f"errors_{record.stage}").inc()
    Metrics.counter(NAMESPACE, f"errors_{record.error_type}").inc()
    return beam.pvalue.TaggedOutput(ERRORS, record)
