"""``ntk-sweep data fetch``: download the official dataset archives, verify their MD5s, write them atomically.

Files land where :mod:`pipeline.data` looks for them: ``<root>/mnist/``, ``<root>/fashion_mnist/`` and
``<root>/cifar10/`` (``cifar-10-python.tar.gz`` plus its extracted ``cifar-10-batches-py/``).

Every file is downloaded into a temporary file beside its destination and checked against its published MD5;
only when all files of the dataset have passed are they renamed into place, so a failed fetch leaves nothing
half-written (and a later fetch never resumes a partial file: it starts over). Files already present with the
right MD5 are not downloaded again.

A stalled transfer fails: each read waits at most ``stall_s`` seconds, and every ``stall_s`` seconds at least
:data:`MIN_BYTES_PER_STALL` bytes must have arrived (a server that trickles one byte every few seconds
never trips a per-read timeout, but fails this), so a fetch that makes no real progress ends with one line
after about ``stall_s`` to ``2 stall_s`` seconds. A download holds an exclusive ``flock`` on its ``.part``
file; the next fetch deletes the ``.part`` files (and ``.extract-*`` folders) that no live fetch holds, i.e.
those left by a killed one.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from tqdm import tqdm

from pipeline.atomic import commit, temp_beside
from pipeline.errors import UserError

DEFAULT_MIRRORS: dict[str, list[str]] = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "fashion_mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
}

#: Published MD5 of every file of each dataset (the values torchvision checks).
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar10": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
}

CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_FOLDER = "cifar-10-batches-py"
_CHUNK = 1 << 20
STALL_S = 60.0  # default of --stall-timeout
MIN_BYTES_PER_STALL = 64 * 1024  # at least ~1 KB/s on average, over every stall window

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: leftovers cannot be told from live downloads
    fcntl = None


class FetchError(UserError):
    """A download failed, or a file did not match its published checksum, or an archive was unsafe."""


class _MirrorFailed(Exception):
    """One URL did not give the right file; the next mirror may."""


def md5sum(path: str | Path) -> str:
    """Hex MD5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _checksum_table(name: str, overrides: Mapping[str, str] | None) -> dict[str, str]:
    if name not in CHECKSUMS:
        raise UserError(f"cannot fetch dataset {name!r} (expected one of: {', '.join(CHECKSUMS)})")
    table = dict(CHECKSUMS[name])
    unknown = set(overrides or {}) - set(table)
    if unknown:
        raise ValueError(f"checksums for files that {name} does not have: {sorted(unknown)}")
    table.update({k: v.lower() for k, v in (overrides or {}).items()})
    return table


def _mirror_list(name: str, mirror: str | None) -> list[str]:
    if mirror is None:
        return DEFAULT_MIRRORS[name]
    if not mirror.startswith(("http://", "https://", "file://")):
        raise UserError(f"--mirror {mirror!r}: expected an http://, https:// or file:// URL")
    return [mirror]


def remove_leftovers(folder: Path) -> list[str]:
    """Delete the ``.part`` files and ``.extract-*`` folders in ``folder`` that no live fetch holds (a
    download keeps an exclusive ``flock`` on its ``.part``; the kernel drops it when the process dies).
    Returns the names removed."""
    removed = []
    for path in sorted(folder.glob(".*.part")):
        try:
            with open(path, "rb") as fh:
                if fcntl is not None:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: in use
                path.unlink()
            removed.append(path.name)
        except OSError:  # held by a running fetch, or already gone
            continue
    for path in sorted(folder.glob(".extract-*")):
        if path.is_dir() and time.time() - path.stat().st_mtime > 3600:  # extraction takes seconds
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def _copy_with_stall_limit(response, out, digest, bar, url: str, stall_s: float) -> None:
    """Copy ``response`` into ``out``; fail when fewer than :data:`MIN_BYTES_PER_STALL` bytes arrive in any
    ``stall_s`` window. Reads with ``read1`` (whatever one socket read returns), so a trickle cannot keep one
    call waiting for a whole chunk."""
    read = getattr(response, "read1", None) or response.read
    window_start, window_bytes = time.monotonic(), 0
    while chunk := read(_CHUNK):
        out.write(chunk)
        digest.update(chunk)
        bar.update(len(chunk))
        window_bytes += len(chunk)
        now = time.monotonic()
        if now - window_start >= stall_s:
            if window_bytes < MIN_BYTES_PER_STALL:
                raise _MirrorFailed(f"{url}: transfer stalled ({window_bytes} bytes in {now - window_start:.0f} s; "
                                    f"--stall-timeout {stall_s:g} s)")
            window_start, window_bytes = now, 0


def _download(url: str, expected_md5: str, folder: Path, label: str, no_bar: bool | None,
              stall_s: float = STALL_S) -> tuple[Path, int]:
    """Download ``url`` into a temporary file in ``folder`` and check its MD5; returns the temp path and the
    descriptor that holds its ``flock`` (the caller closes it once the file is renamed into place).

    ``no_bar`` is tqdm's ``disable`` (None: no bar unless stderr is a terminal). ``stall_s``: the longest
    wait for one read, and the window over which :data:`MIN_BYTES_PER_STALL` bytes must arrive.
    """
    lock_fd, tmp = temp_beside(folder / label, suffix=".part")
    if fcntl is not None:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # held while lock_fd is open: a live download is never cleaned up
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(os.dup(lock_fd), "wb") as out, urllib.request.urlopen(url, timeout=stall_s) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, disable=no_bar)
            with bar:
                _copy_with_stall_limit(response, out, digest, bar, url, stall_s)
            out.flush()
            os.fsync(out.fileno())
        size = tmp.stat().st_size
        if total is not None and size != total:
            raise _MirrorFailed(f"{url}: incomplete download ({size} of {total} bytes)")
        if digest.hexdigest() != expected_md5:
            raise _MirrorFailed(
                f"{url}: md5 {digest.hexdigest()} does not match the expected {expected_md5}; file discarded"
            )
        return tmp, lock_fd
    except TimeoutError:
        tmp.unlink(missing_ok=True)
        os.close(lock_fd)
        raise _MirrorFailed(f"{url}: no data for {stall_s:g} s (--stall-timeout)") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        os.close(lock_fd)
        reason = getattr(exc, "reason", None)
        if isinstance(reason, TimeoutError):
            raise _MirrorFailed(f"{url}: no answer in {stall_s:g} s (--stall-timeout)") from None
        raise _MirrorFailed(f"{url}: {' '.join(str(exc).split())}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        os.close(lock_fd)
        raise


def _download_verified(fname: str, md5: str, mirrors: list[str], folder: Path, no_bar: bool | None,
                       stall_s: float = STALL_S) -> tuple[Path, int]:
    """Try each mirror in turn; the temp path (and lock descriptor) of the first download whose MD5 matches."""
    reasons = []
    for base in mirrors:
        try:
            return _download(f"{base.rstrip('/')}/{fname}", md5, folder, fname, no_bar, stall_s)
        except _MirrorFailed as exc:
            reasons.append(str(exc))
    raise FetchError(f"{fname}: no verified download ({'; '.join(reasons)})")


def _stage_all(table: Mapping[str, str], mirrors: list[str], folder: Path, no_bar: bool | None,
               stall_s: float = STALL_S) -> list[str]:
    """Download every file not already present with the right MD5, then rename them all into place."""
    todo = {f: md5 for f, md5 in table.items() if not ((folder / f).is_file() and md5sum(folder / f) == md5)}
    staged: dict[str, tuple[Path, int]] = {}
    try:
        for fname, md5 in todo.items():
            staged[fname] = _download_verified(fname, md5, mirrors, folder, no_bar, stall_s)
        for fname, (tmp, _) in staged.items():
            commit(tmp, folder / fname)
        for _, lock_fd in staged.values():
            os.close(lock_fd)
        staged.clear()
    finally:
        for tmp, lock_fd in staged.values():
            tmp.unlink(missing_ok=True)
            os.close(lock_fd)
    return list(todo)


def extract_cifar(archive: Path, folder: Path) -> Path:
    """Extract ``cifar-10-batches-py/`` from the archive into ``folder``, safely and atomically.

    Uses tarfile's ``"data"`` filter (no absolute paths, ``..``, links out of the tree or device files);
    extracts into a temporary folder first and swaps the result into place.
    """
    if not hasattr(tarfile, "data_filter"):
        raise FetchError(f"{archive}: safe extraction needs Python >= 3.10.12 / 3.11.4 (tarfile filters)")
    target = folder / CIFAR_FOLDER
    scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=folder))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(scratch, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise FetchError(f"{archive}: unsafe or corrupt archive, not extracted ({exc})") from None
        extracted = scratch / CIFAR_FOLDER
        if not extracted.is_dir():
            raise FetchError(f"{archive}: archive has no {CIFAR_FOLDER}/ folder")
        if target.exists():
            target.rename(scratch / "previous")
        extracted.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def fetch_dataset(
    name: str,
    root: str | Path,
    mirror: str | None = None,
    *,
    checksums: Mapping[str, str] | None = None,
    progress: bool | None = None,
    stall_s: float = STALL_S,
) -> Path:
    """Download ``name`` (``mnist``, ``fashion_mnist`` or ``cifar10``) into ``root/<name>/`` and verify it.

    ``mirror``: base URL that replaces the default mirrors (files are fetched from ``<mirror>/<file name>``).
    ``checksums``: ``{file name: md5}`` overriding entries of :data:`CHECKSUMS` (tests, private mirrors).
    ``progress``: show tqdm bars (None: only on a terminal). ``stall_s``: a transfer that waits this long for
    one read, or gets fewer than :data:`MIN_BYTES_PER_STALL` bytes in this many seconds, fails (that mirror;
    the next is tried). Leftovers of a killed fetch (:func:`remove_leftovers`) are deleted first.
    Returns the dataset folder.
    Raises :class:`UserError` (a :class:`FetchError` for download/verification problems), naming the file,
    with no file written.
    """
    table = _checksum_table(name, checksums)
    mirrors = _mirror_list(name, mirror)
    if not (isinstance(stall_s, (int, float)) and 0 < stall_s < float("inf")):
        raise UserError(f"--stall-timeout {stall_s}: must be a positive number of seconds")
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"--root {root}: not a folder")
    folder = root / name
    made = [p for p in (root, folder) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder)
    try:
        downloaded = _stage_all(table, mirrors, folder, None if progress is None else not progress, stall_s)
    except BaseException:
        for path in reversed(made):  # leave no empty folders behind
            if not any(path.iterdir()):
                path.rmdir()
        raise
    if name == "cifar10" and (downloaded or not (folder / CIFAR_FOLDER).is_dir()):
        extract_cifar(folder / CIFAR_ARCHIVE, folder)
    return folder
