"""Which files a glob or a folder names: Python's recursive glob, on every Beam filesystem.

Two gaps in Beam's own matching are closed here. Its `**/` needs at least one folder, where
Python's (and the shell's) also matches none. And its local listing skips every file it cannot
`stat`: broken symbolic links and link loops vanish without a trace. Local files are therefore
listed here, with Beam's pattern syntax, so that each one can be reported.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import warnings
from collections.abc import Callable, Iterator

from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems

from captionflow.paths import is_remote

RECURSIVE_COMPONENT = re.compile(r"(?:(?<=/)|^)\*\*/")  # a `**/` that is a whole path component
BEFORE_WILDCARD = re.compile(r"[^[*?]*")
WILDCARD = re.compile(r"[*?[]")
# `[[]` is how a pattern matches a `[` (`literal`); `re` warns of it as a possible nested set.
warnings.filterwarnings(
    "ignore", "Possible nested set", FutureWarning, r"apache_beam\.io\.filesystem"
)


def literal(path: str) -> str:
    """`path` as a Beam file pattern that matches it alone. Beam's patterns have no escape
    (`out[1]/x` matches `out1/x`, never itself), but a one-character class does it: `[[]`.
    Beam lists such a pattern from the prefix before it: slower, never wrong."""
    return WILDCARD.sub(lambda wildcard: f"[{wildcard.group()}]", path)


def delete_files(paths: list[str]) -> None:
    """`FileSystems.delete`, each path taken as it is: Beam's local and GCS filesystems match
    each one as a pattern (`a[1].jsonl` deletes `a1.jsonl`, not itself); S3's and Azure's
    do not."""
    FileSystems.delete(
        [literal(p) if not is_remote(p) or p.startswith("gs://") else p for p in paths]
    )


def pattern_variants(pattern: str) -> list[str]:
    """The patterns Beam must match to give what Python's `glob(recursive=True)` gives.

    `DIR/**/*.jpg` also matches `DIR/a.jpg` in Python: `**/` stands for zero or more folders.
    Beam's `**` is `.*`, so its `**/` needs at least one. Matching each variant with every
    `**/` kept or removed, then taking distinct paths, gives Python's set.
    """
    pieces = RECURSIVE_COMPONENT.split(pattern)
    variants = [pieces[0]]
    for piece in pieces[1:]:
        variants = [variant + middle + piece for variant in variants for middle in ("**/", "")]
    return sorted(set(variants))


# A file that marks a folder as captionflow's own (a report's thumbnails): listing an input
# skips such folders, so that captioning in place (`--input X --output X`) never takes
# X/report/thumbs/*.jpg for images of the dataset.
SKIP_MARKER = ".captionflow-report"


MARKED_THUMBNAILS = "thumbs"  # the subfolder of a marked folder that holds images


def is_marked_thumbnail(path: str) -> bool:
    """Whether `path` is a report's thumbnail (`REPORT/thumbs/NAME`, REPORT marked with
    `SKIP_MARKER`), as a glob may list it. Only files in a folder named `thumbs` cost a
    look for the mark."""
    folder = posixpath.dirname(path) if "://" in path else os.path.dirname(path)
    if os.path.basename(folder.rstrip("/")) != MARKED_THUMBNAILS:
        return False
    report = posixpath.dirname(folder) if "://" in path else os.path.dirname(folder)
    marker = f"{report}/{SKIP_MARKER}" if "://" in path else os.path.join(report, SKIP_MARKER)
    return FileSystems.exists(marker)


def walk_files(root: str, max_depth: int | None = None) -> Iterator[str]:
    """Every file under `root`, or only those at most `max_depth` folders down, less folders
    marked with `SKIP_MARKER`. Symbolic links to folders are not followed (as in Beam's
    listing: no cycles); broken links and link loops are listed like files."""
    for folder, subfolders, files in os.walk(root):
        if SKIP_MARKER in files:
            subfolders.clear()
            continue
        if max_depth is not None and _depth(root, folder) >= max_depth:
            subfolders.clear()
        for name in files:
            yield os.path.join(folder, name)


def walk_in_order(
    root: str, max_depth: int | None = None, enter: Callable[[str], bool] = lambda _: True
) -> Iterator[str]:
    """`walk_files`'s files in sorted order of their paths, listed lazily (a folder at a time,
    depth first): what lets `--limit` stop at the first N. A subfolder sorts as its name and
    `/`, so `a-b.jpg` < `a/z.jpg` < `a0.jpg`, as whole paths do. `enter` says which of the
    root's subfolders to walk; folders below the root that are marked are skipped."""

    def walk(folder: str, depth: int) -> Iterator[str]:
        try:
            with os.scandir(folder) as scan:
                entries = list(scan)
        except OSError:
            return  # as `os.walk`: an unreadable folder lists nothing
        if depth > 0 and any(entry.name == SKIP_MARKER for entry in entries):
            return
        named = ((_sort_name(entry), entry.path) for entry in entries)
        for name, path in sorted((name, path) for name, path in named if name is not None):
            if not name.endswith("/"):
                yield path
            elif (max_depth is None or depth < max_depth) and (depth > 0 or enter(path)):
                yield from walk(path, depth + 1)

    return walk(root, 0)


def _sort_name(entry: os.DirEntry) -> str | None:
    """A folder's name and `/`; a file's name; None for a link to a folder (not followed,
    not listed: as in `os.walk`)."""
    try:
        is_folder = entry.is_dir()
    except OSError:
        is_folder = False  # a link loop: listed like a file
    if not is_folder:
        return entry.name
    return None if entry.is_symlink() else entry.name + "/"


def _depth(root: str, folder: str) -> int:
    relative = os.path.relpath(folder, root)
    return 0 if relative == "." else relative.count(os.sep) + 1


def list_local(pattern: str) -> Iterator[str]:
    """The local files `pattern` matches, with Beam's syntax (`*`, `?`, `[...]`, `**`) and
    Python's `**/`; a pattern without wildcards names one file."""
    prefix = BEFORE_WILDCARD.match(pattern).group(0)
    if prefix == pattern:
        if os.path.lexists(pattern) and not os.path.isdir(pattern):
            yield pattern
        return
    glob = Glob(pattern)
    for path in walk_files(glob.root, glob.depth):
        if glob.matches(path):
            yield path


class Glob:
    """A pattern (Beam's syntax, Python's `**/`) split for listing in parallel: the folder
    above its first wildcard (`root`), which of the root's subfolders can hold matches, and
    how deep under the root a match can lie."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.root = posixpath.dirname(BEFORE_WILDCARD.match(pattern).group(0))
        rest = pattern[len(self.root) :].lstrip("/")
        first, _, deeper = rest.partition("/")
        # Without `**`, a pattern spans a fixed number of folders: no need to walk deeper.
        self.depth = None if "**" in rest else rest.count("/")
        self._first = None if "**" in first else re.compile(FileSystem.translate_pattern(first))
        self._deeper = bool(deeper) or "**" in first
        variants = pattern_variants(pattern)
        self._matchers = [re.compile(FileSystem.translate_pattern(v)).match for v in variants]

    def matches(self, path: str) -> bool:
        return any(match(path) for match in self._matchers)

    def may_hold_matches(self, subfolder: str) -> bool:
        """Whether a subfolder of the root can hold files the pattern matches."""
        if not self._deeper:
            return False
        name = posixpath.basename(subfolder.rstrip("/"))
        return self._first is None or self._first.fullmatch(name) is not None

    def depth_below(self) -> int | None:
        """How deep under one of the root's subfolders a match can lie (None: any depth)."""
        return None if self.depth is None else self.depth - 1


def link_problem(path: str) -> tuple[str, str] | None:
    """`(error type, message)` when `path` is a symbolic link that reaches no file."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except FileNotFoundError:
        return "BrokenSymlink", f"broken symbolic link to {_target(path)}: no such file"
    except OSError as error:
        if error.errno != errno.ELOOP:
            return None  # anything else is for the read step to report
        return "SymlinkLoop", f"symbolic link loop: {path} -> {_target(path)} never reaches a file"
    return None


def _target(path: str) -> str:
    return os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))


def gcs_top_level(folder: str) -> tuple[list[str], list[str]]:
    """A `gs://` folder's own objects and its immediate subfolders (`gs://b/f/sub/`), from one
    listing with a `/` delimiter: what lets each subfolder be listed by another worker."""
    from apache_beam.io.gcp.gcsio import GcsIO, parse_gcs_path

    bucket, prefix = parse_gcs_path(folder.rstrip("/") + "/", object_optional=True)
    page = GcsIO().client.list_blobs(bucket, prefix=prefix, delimiter="/")
    files = [f"gs://{bucket}/{blob.name}" for blob in page]  # prefixes come after the pages
    return files, [f"gs://{bucket}/{sub}" for sub in sorted(page.prefixes)]


def gcs_in_order(folder: str) -> Iterator[str]:
    """Every object under a `gs://` folder, in the sorted order the listing pages through
    them, less those in marked folders (the mark sorts before a report's `thumbs/`): lazily,
    so that `--limit` stops at the first N. Listed by its literal prefix, never as a pattern:
    a folder named `set[1]` would match `set1/` instead."""
    from apache_beam.io.gcp.gcsio import GcsIO, parse_gcs_path

    bucket, prefix = parse_gcs_path(folder.rstrip("/") + "/", object_optional=True)
    marked: tuple[str, ...] = ()
    for blob in GcsIO().client.list_blobs(bucket, prefix=prefix):
        path = f"gs://{bucket}/{blob.name}"
        if path.endswith("/" + SKIP_MARKER):
            marked += (path[: -len(SKIP_MARKER)],)
        elif not path.startswith(marked):
            yield path
