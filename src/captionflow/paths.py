"""Paths that may be local files or URIs of any Beam filesystem (`gs://`, `s3://`, ...)."""

from __future__ import annotations

import os
import posixpath


def is_remote(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """Local paths made absolute (so that they compare and relativise); URIs left as they are."""
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str, name: str) -> str:
    return posixpath.join(base, name) if is_remote(base) else os.path.join(base, name)


def dirname(path: str) -> str:
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def split(path: str) -> tuple[str, str]:
    return (posixpath if is_remote(path) else os.path).split(path)
