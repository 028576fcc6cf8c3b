"""Paths that may be local files or URIs of any Beam filesystem (`gs://`, `s3://`, ...)."""

from __future__ import annotations

import os
import posixpath


def is_remote(path: str) -> bool:
    return "://" in path


def normalise(path: str) -> str:
    """One spelling per local file (`/a/./b`, `/a//b` and `//a/b` are all `/a/b`), so that
    duplicates collapse; URIs are left exactly as they are."""
    if is_remote(path):
        return path
    path = os.path.normpath(path)
    return "/" + path.lstrip("/") if path.startswith("//") else path  # POSIX keeps a leading //


def absolute(path: str) -> str:
    """Local paths made absolute and normalised (so that they compare and relativise); URIs
    left as they are."""
    return path if is_remote(path) else normalise(os.path.abspath(os.path.expanduser(path)))


def join(base: str, name: str) -> str:
    return posixpath.join(base, name) if is_remote(base) else os.path.join(base, name)


def dirname(path: str) -> str:
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def split(path: str) -> tuple[str, str]:
    return (posixpath if is_remote(path) else os.path).split(path)
