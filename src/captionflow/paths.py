"""Paths that may be local files or URIs of any Beam filesystem (`gs://`, `s3://`, ...)."""

from __future__ import annotations

import os
import posixpath


def is_remote(path: str) -> bool:
    return "://" in path


def unreadable_uri(path: str) -> str | None:
    """Why no Beam filesystem here reads the URI `path` (`https://`, `file://`, a scheme whose
    package is not installed), or None: Beam's own message would advise installing its `gcp`
    extra, whatever the scheme."""
    if not is_remote(path):
        return None
    from apache_beam.io.filesystems import FileSystems

    try:
        FileSystems.get_filesystem(path)
    except Exception as error:  # ValueError for an unknown scheme, BeamIOError for hdfs://
        scheme = path.split("://", 1)[0].lower()
        if scheme in ("http", "https"):
            return (
                f"no Beam filesystem reads {scheme}:// URLs: download the images first (e.g. "
                "with img2dataset) and list their local or gs:// paths"
            )
        if scheme == "file":
            return "no Beam filesystem reads file:// URIs: write local paths without file://"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"no installed Beam filesystem reads {scheme}:// URIs ({reason})"
    return None


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
