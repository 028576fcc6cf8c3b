"""Failures that no retry can mend: the job stops at once and says why in one line."""

from __future__ import annotations

import logging
import re


class FatalError(RuntimeError):
    """A model that cannot load, an output that cannot be resumed, ...: retrying the job (or
    Beam retrying its bundles) would fail the same way, so the CLI stops with one line."""


def fatal_message(error: BaseException) -> str | None:
    """The message of the `FatalError` behind `error`, or None when there is none.

    In process, Beam re-raises our exception or chains it; from worker processes only its text
    survives, as `ClassName: message` somewhere in a long traceback.
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, FatalError):
            return _without_step(str(seen))
        seen = seen.__cause__ or seen.__context__
    names = "|".join(sorted(_names(FatalError)))
    found = re.search(rf"\b(?:{names}): (.+)", str(error))
    return _without_step(found.group(1)) if found else None


class QuietFatalTracebacks(logging.Filter):
    """Log a `FatalError` that Beam reports as one line, without its traceback: the message
    says all there is to say, and the CLI repeats it last."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] and fatal_message(record.exc_info[1]):
            record.exc_info = None
            record.exc_text = None
        return True


def _without_step(message: str) -> str:
    """Beam appends the step that failed (`[while running 'X']`) to the message."""
    return re.sub(r"\s*\[while running '[^']*'\]", "", message).strip()


def _names(cls: type) -> set[str]:
    return {cls.__name__}.union(*(_names(sub) for sub in cls.__subclasses__()))
