"""fedrad's on-disk cache of things rebuilt from public material (foundation models, the
dequantized copy of a GGUF base): one root, and publishing that concurrent builders cannot tear."""

from __future__ import annotations

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
def publish_once(directory: Path) -> Iterator[Path]:
    """A temporary sibling published as `directory` once fully written; when a concurrent
    builder published first, theirs is kept and ours dropped."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, directory)
