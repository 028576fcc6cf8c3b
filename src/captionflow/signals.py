"""Ctrl-C and SIGTERM stop the job, once and for good: no retry, the checkpoints kept."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

RESUME = "what was written is kept: run the same command with --resume to finish"


class Interrupted(Exception):
    """The run was stopped by a signal; exits with 128 + its number, like a shell. `then`
    tells the user how to finish what was stopped."""

    def __init__(self, signum: int, then: str = RESUME) -> None:
        super().__init__(signum)
        self.signum = signum
        self.then = then

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class QuietStops(logging.Filter):
    """Drop what Beam logs of the KeyboardInterrupt that a stop raises in the step it breaks
    (an ERROR and a traceback of some 40 lines): the CLI's last line says what happened."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))


def _stopped_thread(args: threading.ExceptHookArgs) -> None:
    """A thread that fails once a stop was received (Beam's, whose worker process went away):
    a consequence of the stop, which the CLI's last line reports."""


class StopSignals:
    """`with StopSignals() as stop:` the first SIGINT or SIGTERM is recorded in
    `stop.received` and breaks whatever the main thread waits on (Beam wraps the
    KeyboardInterrupt in its own errors; the record says what happened), and quiets the
    threads that fail because of it. A second one acts as it would without us."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, then: str = RESUME) -> None:
        self.received: int | None = None
        self.then = then  # for the user, once stopped (`Interrupted.then`)
        self._previous: dict[int, object] = {}
        self._excepthook = threading.excepthook

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self._restore()
        threading.excepthook = self._excepthook
        if self.received is not None and kind is not None:
            raise self.interrupted()

    def interrupted(self) -> Interrupted:
        """What to raise once a stop was received."""
        assert self.received is not None
        return Interrupted(self.received, self.then)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        self._restore()
        threading.excepthook = _stopped_thread
        raise KeyboardInterrupt

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous = {}
