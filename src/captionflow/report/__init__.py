"""A static HTML report of a captioning output, finished or partial: thumbnails with their
chosen captions, every candidate with its scores, the rejected and failed images, and the
run's summary. It opens from disk (file://) or from a bucket: no server, no network."""

from captionflow.report.build import REPORT_DIR, REPORT_MARKER, Report, build_report, write_report

__all__ = ["REPORT_DIR", "REPORT_MARKER", "Report", "build_report", "write_report"]
