"""JSON lines on any Beam filesystem, split on `\n` only.

Records are written with `ensure_ascii=False`, so U+0085, U+2028 and U+2029 (legal in file
names) appear raw inside strings: `str.splitlines()` would cut a record in two.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from apache_beam.io.filesystems import FileSystems


class MalformedLineError(ValueError):
    """A line that is not one JSON value; names the file and the line number."""


def read_json_lines(path: str) -> Iterator[tuple[int, Any]]:
    """`(line number, value)` for each non-blank line, streamed (never the whole file)."""
    with FileSystems.open(path, compression_type="uncompressed") as file:
        for number, line in enumerate(file, start=1):  # binary files split on b"\n" only
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except ValueError as error:
                raise MalformedLineError(f"{path}, line {number}: {error}") from None


def dumps(value: Any) -> str:
    """One JSON line: readable Unicode, no raw newline (json escapes `\n` and `\r`)."""
    return json.dumps(value, ensure_ascii=False)
