"""Writing a file so that a reader sees either the old file or the whole new one, never a part: the project's
one atomic writer (results parts, subset caches, predictions and downloads all go through it).

A temporary file is created in the destination's folder (so the final rename never crosses a filesystem),
written, flushed to disk, made world-readable like a normal file, and renamed over the destination; on any
failure the temporary file is removed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def temp_beside(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """An open descriptor and the path of a new, empty, private temporary file next to ``path``
    (``.<name>.<random><suffix>``), its folder created if needed. Pair with :func:`commit`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    return fd, Path(tmp)


def commit(tmp: Path, path: Path) -> None:
    """Make the finished temporary file ``tmp`` (from :func:`temp_beside`) readable by all and rename it
    over ``path`` in one step."""
    tmp.chmod(0o644)  # mkstemp made it private
    os.replace(tmp, path)


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_file(path) as fh: ...``: ``fh`` writes a temporary file that replaces ``path`` when the
    block ends without an exception (after flush and fsync); otherwise it is removed and ``path`` is as it was."""
    path = Path(path)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path) as fh:
        fh.write(data)
