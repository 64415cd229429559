"""Which files under a site's data directory may be read: regular files that lie inside it.

A hospital export is written by many devices and may be tampered with, so a symbolic link that
points at the site's keys, a named pipe that blocks a reader forever or a device file that
never ends is refused with a reason instead of being followed. Entries are judged by `lstat`
when the directory is walked and again, by the open descriptor, when a file is read, so a file
swapped for a link in between is refused too. Reasons never quote file contents.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

CACHE_DIRNAME: Final[str] = ".fedrad-cache"

_KINDS: Final[tuple[tuple[object, str], ...]] = (
    (stat.S_ISLNK, "symbolic link (links are not followed: copy the file into the directory)"),
    (stat.S_ISFIFO, "named pipe (not a regular file)"),
    (stat.S_ISCHR, "character device (not a regular file)"),
    (stat.S_ISBLK, "block device (not a regular file)"),
    (stat.S_ISSOCK, "socket (not a regular file)"),
    (stat.S_ISDIR, "directory where a file was expected"),
)


class RefusedFileError(Exception):
    """A file that is not read, with the one-line reason shown to the site."""


@dataclass(frozen=True)
class SiteFile:
    """A regular file inside the data directory, as `lstat` saw it when the walk listed it."""

    path: Path
    rel_path: str
    device: int
    inode: int
    size: int
    mtime: float


@dataclass(frozen=True)
class SiteListing:
    """The files a walk may read, and every entry it refused with its reason."""

    files: list[SiteFile]
    refused: list[tuple[str, str]]  # (path relative to the data directory, reason)


def _kind_problem(mode: int) -> str | None:
    for test, reason in _KINDS:
        if test(mode):  # type: ignore[operator]
            return reason
    return None if stat.S_ISREG(mode) else "not a regular file"


def site_file(path: Path, root: Path) -> SiteFile:
    """The entry at `path` if it is a regular file resolving inside `root` (already resolved);
    RefusedFileError with the reason otherwise."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise RefusedFileError(f"cannot be read ({exc.strerror})") from exc
    problem = _kind_problem(info.st_mode)
    if problem is not None:
        raise RefusedFileError(problem)
    if not path.resolve().is_relative_to(root):
        raise RefusedFileError("resolves outside the data directory (a linked folder on its path)")
    return SiteFile(
        path=path,
        rel_path=path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name,
        device=info.st_dev,
        inode=info.st_ino,
        size=info.st_size,
        mtime=info.st_mtime,
    )


def walk_site(data_dir: Path, *, skip_names: frozenset[str] = frozenset()) -> SiteListing:
    """Every regular file under `data_dir` except hidden entries, fedrad's cache and the
    top-level names in `skip_names`; links, pipes and devices are listed as refused. Linked
    folders are never entered."""
    root = data_dir.resolve()
    files: list[SiteFile] = []
    refused: list[tuple[str, str]] = []

    def unreadable(error: OSError) -> None:
        where = Path(error.filename or root)
        rel = where.relative_to(root).as_posix() if where.is_relative_to(root) else where.name
        refused.append((rel or ".", f"folder cannot be read ({error.strerror})"))

    for here, dirs, names in os.walk(root, onerror=unreadable, followlinks=False):
        base = Path(here)
        kept = []
        for name in sorted(dirs):
            if name == CACHE_DIRNAME or name.startswith("."):
                continue
            if (base / name).is_symlink():
                rel = (base / name).relative_to(root).as_posix()
                refused.append((rel, "symbolic link to a folder (links are not followed)"))
                continue
            kept.append(name)
        dirs[:] = kept
        for name in sorted(names):
            if name.startswith(".") or (base == root and name in skip_names):
                continue
            path = base / name
            try:
                files.append(site_file(path, root))
            except RefusedFileError as exc:
                refused.append((path.relative_to(root).as_posix(), str(exc)))
    return SiteListing(files, refused)


def _open_regular(path: Path, flags: int, same_as: SiteFile | None) -> tuple[BinaryIO, int]:
    """`path` opened with `flags` (never blocking on a pipe), refused unless the descriptor is a
    regular file (and, with `same_as`, that very file); with its size."""
    try:
        fd = os.open(path, flags | os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise RefusedFileError(f"cannot be opened ({exc.strerror})") from exc
    try:
        info = os.fstat(fd)
        problem = _kind_problem(info.st_mode)
        if problem is not None:
            raise RefusedFileError(problem)
        if same_as is not None and (info.st_dev, info.st_ino) != (same_as.device, same_as.inode):
            raise RefusedFileError("replaced while the directory was being read")
        return os.fdopen(fd, "rb"), info.st_size
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def open_site_file(entry: SiteFile) -> Iterator[BinaryIO]:
    """The file the walk listed, opened without following a link and without blocking on a
    pipe; refused if what is there now is not that same regular file."""
    handle, _ = _open_regular(entry.path, os.O_NOFOLLOW, entry)
    with handle:
        yield handle


@contextmanager
def open_regular_file(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    """A file a person named on the command line (a link they chose is followed), opened only
    if it is a regular file, so a pipe or a device cannot hang or flood the reader; with its
    size."""
    handle, size = _open_regular(path, 0, None)
    with handle:
        yield handle, size
