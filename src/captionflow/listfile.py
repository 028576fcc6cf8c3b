"""The lines of a list file (`dataset.txt`), in whichever encoding it was saved.

Lists come from many tools: UTF-8 with or without a BOM (Notepad), UTF-16 with a BOM
(PowerShell's `>`), Latin-1 from old archives. Strict text reading fails the whole job on the
first odd byte, and a BOM read as text turns the first path into a false "not found". So the
file is read as bytes, split on `\n` only (U+0085, U+2028 and U+2029 are legal inside paths),
and each line decoded on its own: a line that cannot be decoded is reported, not fatal.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

CHUNK_SIZE = 1 << 20
# (byte order mark, encoding of what follows it, bytes of one "\n"); no BOM: UTF-8.
BOMS = (
    (codecs.BOM_UTF8, "UTF-8", b"\n"),
    (codecs.BOM_UTF16_LE, "UTF-16-LE", b"\n\x00"),
    (codecs.BOM_UTF16_BE, "UTF-16-BE", b"\x00\n"),
)


@dataclass(frozen=True)
class ListLine:
    """One line, without its line break. When not `valid`, `text` shows the bytes that are not
    text as `\\xNN` escapes (`backslashreplace`): printable, and enough to find the line."""

    number: int
    text: str
    valid: bool
    encoding: str


def list_lines(file: BinaryIO, *, chunk_size: int = CHUNK_SIZE) -> Iterator[ListLine]:
    """Every line of `file`, streamed `chunk_size` bytes at a time, decoded as its BOM says
    (stripped), else as UTF-8; a trailing `\r` (CRLF files) is removed."""
    head = b""
    while len(head) < 3 and (chunk := file.read(chunk_size)):
        head += chunk
    encoding, newline = "UTF-8", b"\n"
    for bom, bom_encoding, bom_newline in BOMS:
        if head.startswith(bom):
            encoding, newline, head = bom_encoding, bom_newline, head[len(bom) :]
            break
    for number, raw in enumerate(_split(file, head, newline, chunk_size), start=1):
        yield decode_line(number, raw, encoding)


def decode_line(number: int, raw: bytes, encoding: str = "UTF-8") -> ListLine:
    """One line's bytes, without `\n`, as a `ListLine`; a trailing `\r` is removed."""
    try:
        text, valid = raw.decode(encoding), True
    except UnicodeDecodeError:
        text, valid = raw.decode(encoding, "backslashreplace"), False
    return ListLine(number, text.removesuffix("\r"), valid, encoding)


def is_utf16(head: bytes) -> bool:
    """Whether a file starting with `head` is UTF-16 (by its BOM): its lines cannot be cut
    apart at `\n` bytes."""
    return head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))


def _split(file: BinaryIO, buffer: bytes, newline: bytes, chunk_size: int) -> Iterator[bytes]:
    """Raw lines between `newline`s, holding at most one chunk and one line in memory."""
    start = 0
    while True:
        end = _find(buffer, newline, start)
        if end >= 0:
            yield buffer[start:end]
            start = end + len(newline)
            continue
        chunk = file.read(chunk_size)
        if not chunk:
            break
        buffer, start = buffer[start:] + chunk, 0
    if start < len(buffer):
        yield buffer[start:]


def _find(buffer: bytes, newline: bytes, start: int) -> int:
    """The next `newline` that starts on a whole code unit: in UTF-16 the bytes `\n\0` may also
    straddle two characters (U+0A05 then U+0100 is `05 0A 00 01`)."""
    at = buffer.find(newline, start)
    while at >= 0 and (at - start) % len(newline):
        at = buffer.find(newline, at + 1)
    return at
