"""fedrad's on-disk cache of things rebuilt from public material (foundation models, the
dequantized copy of a GGUF base): one root, and directories written aside and published whole,
which checkpoints use too."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """$FEDRAD_CACHE, else ~/.cache/fedrad."""
    return Path(os.environ.get("FEDRAD_CACHE", Path.home() / ".cache" / "fedrad"))


@contextmanager
def staged_directory(directory: Path, *, replace: bool) -> Iterator[Path]:
    """A temporary sibling that becomes `directory` only once fully written, so a crash never
    leaves half of one. An existing `directory` is replaced (`replace`), or kept and ours
    dropped: when concurrent builders fill a cache, the first to publish wins."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        yield tmp
        if directory.exists() and not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_once(directory: Path) -> contextlib.AbstractContextManager[Path]:
    """A cache entry written aside and published whole; a concurrent builder's entry is kept."""
    return staged_directory(directory, replace=False)
