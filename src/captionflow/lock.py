"""One run at a time into an output folder, on local disks and object stores alike.

Two runs writing one output would share and delete each other's part files. The launcher
holds a small lock file while its job runs and refreshes it; a later run refuses to start
while the holder lives. A holder that was killed is recognised (its process is gone, or its
heartbeat is old) and replaced, so `--resume` after a crash needs nothing by hand.
Object stores have no atomic create-if-absent through Beam's filesystems, so the lock is
written, left to settle, and read back: of two runs starting together, one sees the other's
name and stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace

from apache_beam.io.filesystems import FileSystems

from captionflow.fatal import FatalError
from captionflow.listing import delete_files
from captionflow.paths import dirname, join

LOCK_FILE = ".captionflow.lock"
HEARTBEAT_SECS = 20.0
STALE_AFTER_SECS = 90.0  # a holder silent this long is dead, whichever machine it ran on
SETTLE_SECS = 0.5
_HELD: set[str] = set()  # the run ids of the locks this process holds


class OutputUnwritableError(FatalError):
    """The output folder cannot be made or written (a name too long, a read-only place)."""


class OutputBusyError(FatalError):
    """Another run is writing into the same output."""


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    started: float
    heartbeat: float

    def alive(self, now: float) -> bool:
        if now - self.heartbeat > STALE_AFTER_SECS:
            return False
        if self.host != socket.gethostname():
            return True
        if self.pid == os.getpid():  # ours, or a killed run's whose process id we reuse
            return self.run_id in _HELD  # (a restarted container's first process, say)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class OutputLock:
    """`with OutputLock(output_dir): ...` runs the body as the only run writing there."""

    def __init__(self, output_dir: str) -> None:
        self.path = join(output_dir, LOCK_FILE)
        self.holder = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), time.time(), 0)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        if (other := self._read()) is not None and other.alive(time.time()):
            raise OutputBusyError(self._busy(other))
        try:
            self._write()  # the run's first write: where an output that cannot be made shows
        except OSError as error:
            raise OutputUnwritableError(
                f"--output: cannot write in {dirname(self.path)}: {error.strerror or error}"
            ) from None
        try:
            time.sleep(SETTLE_SECS)
            now = self._read()
        except BaseException:  # stopped while settling: leave no lock behind
            self.release()
            raise
        if now is None or now.run_id != self.holder.run_id:
            raise OutputBusyError(self._busy(now) if now else f"{self.path} changed under us")
        _HELD.add(self.holder.run_id)
        self._beat = threading.Thread(target=self._heartbeat, name="captionflow-lock", daemon=True)
        self._beat.start()

    def release(self) -> None:
        _HELD.discard(self.holder.run_id)
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if (now := self._read()) is not None and now.run_id == self.holder.run_id:
            with contextlib.suppress(OSError):
                delete_files([self.path])

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECS):
            with contextlib.suppress(Exception):  # a missed beat only ages the lock
                self._write()

    def _write(self) -> None:
        holder = asdict(self.holder) | {"heartbeat": time.time()}
        with FileSystems.create(self.path) as file:
            file.write(json.dumps(holder).encode("utf-8"))

    def _read(self) -> Holder | None:
        """The holder, last seen when the storage last saw its lock written: the writer's
        own clock may be minutes off ours, the storage's (or this host's) is not."""
        try:
            with FileSystems.open(self.path, compression_type="uncompressed") as file:
                holder = Holder(**json.loads(file.read()))
        except Exception:  # absent, or torn by a crash: either way nobody holds it
            return None
        with contextlib.suppress(Exception):  # a filesystem that keeps no time: its clock
            holder = replace(holder, heartbeat=FileSystems.last_updated(self.path))
        return holder

    def _busy(self, other: Holder) -> str:
        age = time.time() - other.heartbeat
        return (
            f"another run is writing into {os.path.dirname(self.path) or self.path} (process "
            f"{other.pid} on {other.host}, started {time.ctime(other.started)}, last seen "
            f"{age:.0f} s ago); wait for it to finish. If it was stopped, its lock expires "
            f"{max(0.0, STALE_AFTER_SECS - age):.0f} s after its last sign of life, or delete "
            f"{self.path}"
        )
