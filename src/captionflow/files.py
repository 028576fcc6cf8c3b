"""Opening one input file for decoding: regular files only, never more than `max_bytes` read.

A FIFO named `x.jpg` would block the worker forever, a device could be endless, and a huge
file would be read whole into memory: each becomes a clear `read` error instead.
"""

from __future__ import annotations

import io
import os
import stat
from typing import BinaryIO

from apache_beam.io.filesystems import FileSystems

from captionflow.paths import is_remote, unreadable_uri

CHUNK = 1 << 20
BUFFER = 1 << 16  # what a decoder reads ahead of what it asked for
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class ReadError(OSError):
    """The file could not be read, or was refused: the image fails at stage `read`."""


class NotRegularFileError(ReadError):
    """A directory, FIFO, device or socket where an image file was expected."""


class UnreadableURIError(ReadError):
    """A URI that no Beam filesystem here reads (`https://`, `file://`, ...)."""


class FileTooLargeError(ReadError):
    """More bytes than `--max-bytes`."""


def _too_large(size: int | None, max_bytes: int) -> FileTooLargeError:
    amount = f"{size} bytes" if size is not None else f"more than {max_bytes} bytes"
    return FileTooLargeError(f"{amount} exceeds --max-bytes {max_bytes}")


def _check(status: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(status.st_mode):
        kind = next((name for test, name in _KINDS if test(status.st_mode)), "a special file")
        raise NotRegularFileError(f"not a regular file ({kind})")
    if status.st_size > max_bytes:
        raise _too_large(status.st_size, max_bytes)


def open_image_file(uri: str, max_bytes: int) -> BinaryIO:
    """A local path or any Beam filesystem URI, opened for reading at most `max_bytes`.

    Local files are checked with `stat` before they are opened, so a FIFO or device is never
    opened at all; the open itself does not block either, should the path change in between.
    """
    if is_remote(uri):
        try:
            opened = FileSystems.open(uri, compression_type="uncompressed")
        except Exception:  # asked only then: every image's open would pay for the lookup
            if problem := unreadable_uri(uri):
                raise UnreadableURIError(problem) from None
            raise
        return cap_file(opened, max_bytes)
    _check(os.stat(uri), max_bytes)
    descriptor = os.open(uri, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        _check(os.fstat(descriptor), max_bytes)  # the file opened, in case the path changed
    except BaseException:
        os.close(descriptor)
        raise
    return cap_file(open(descriptor, "rb"), max_bytes)


def cap_file(file: BinaryIO, max_bytes: int) -> BinaryIO:
    """`file` as a seekable file that can never be read past `max_bytes`.

    A seekable file (local, Beam's GCS reader) is measured by seeking to its end and refused
    before any byte is read; one that cannot seek is read into memory, at most `max_bytes + 1`
    bytes. Takes ownership of `file`: closed here when refused, else with the result.
    """
    try:
        if file.seekable():
            size = file.seek(0, io.SEEK_END)
            if size > max_bytes:
                raise _too_large(size, max_bytes)
            file.seek(0)
            # Buffered: Pillow reads a header in many small reads, each a Python call here.
            return io.BufferedReader(CappedReader(file, max_bytes), BUFFER)
        with file:
            return io.BytesIO(_read_at_most(file, max_bytes))
    except BaseException:
        file.close()
        raise


def _read_at_most(file: BinaryIO, max_bytes: int) -> bytes:
    chunks, total = [], 0
    while total <= max_bytes:
        chunk = file.read(min(CHUNK, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
    raise _too_large(None, max_bytes)


class CappedReader(io.RawIOBase):
    """A seekable file that refuses to read past `max_bytes`: a file that grows after it was
    measured cannot make the decoder read more than `max_bytes + 1` bytes of it. Failures of
    the underlying stream (a network error half way) become `ReadError`s."""

    def __init__(self, file: BinaryIO, max_bytes: int) -> None:
        super().__init__()
        self._file = file
        self._max_bytes = max_bytes
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._position = self._file.seek(offset, whence)
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        wanted = max(0, min(len(buffer), self._max_bytes + 1 - self._position))
        try:
            read = self._read_into(memoryview(buffer)[:wanted])
        except OSError as error:
            raise ReadError(f"reading failed after {self._position} bytes: {error}") from error
        if self._position + read > self._max_bytes:
            raise _too_large(None, self._max_bytes)
        self._position += read
        return read

    def _read_into(self, buffer: memoryview) -> int:
        """Straight into `buffer` where the stream can, else through a copy."""
        if hasattr(self._file, "readinto"):
            return self._file.readinto(buffer) or 0
        data = self._file.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()
