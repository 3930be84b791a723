"""Write whole chunks of a Zarr array kept in a local folder straight to their files, off the computing thread.

Why: on the 2-core Xeon of ``bench/RESULTS.md``, zarr's own write of one 2,048² float32 chunk (its async
codec round trip, then ``LocalStore``'s temporary file and rename) cost 30-50 ms of CPU, most of it the
kernel copying the 13 MB file into the page cache (~20 ms per buffered file, measured like ``dd``), and the
full 70k Gram writes 1,225 such chunks. Here a chunk is encoded in the calling thread with the array's own
codec settings (the numcodecs classes that zarr's Blosc and Zstd codecs call, so the bytes are the ones
zarr writes: ``tests/test_chunk_writer.py`` compares them), and an I/O thread writes it with ``O_DIRECT``
where the file system allows it (~1 ms of CPU per chunk; the wait for the disk overlaps the next tile's
compute), through a temporary file and a rename, as ``LocalStore`` does. Arrays this cannot write exactly
(another store, codec chain or memory order) are written through zarr, in the calling thread, unchanged.

Memory: at most ``max_pending`` batches of encoded chunks wait for the disk at once.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

_ALIGN = 4096  # O_DIRECT wants the buffer, the length and the offset aligned to the logical block size
_DIRECT_MIN = 1 << 20  # smaller files go through the page cache (no bounce copy, little to copy)


def _encoder(array: Any) -> Callable[[np.ndarray], bytes] | None:
    """``chunk (chunk_shape) -> file bytes`` as zarr encodes it, or None where not reproduced exactly here:
    Zarr v3, no filters, the bytes serializer in this machine's byte order, C order, and no compressor,
    one Blosc or one Zstd."""
    from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec

    try:
        if array.metadata.zarr_format != 3 or array.filters or array.order != "C":
            return None
        serializer = array.serializer
        compressors = array.compressors
    except (AttributeError, TypeError, ValueError):
        return None
    if not isinstance(serializer, BytesCodec):
        return None
    dtype = np.dtype(array.dtype)
    if dtype.itemsize > 1 and getattr(serializer.endian, "value", serializer.endian) != sys.byteorder:
        return None
    if not compressors:
        return lambda chunk: np.ascontiguousarray(chunk, dtype=dtype).tobytes()
    if len(compressors) != 1:
        return None
    codec = compressors[0]
    if isinstance(codec, BloscCodec):
        from numcodecs import Blosc

        shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
        config = {"cname": codec.cname.value, "clevel": codec.clevel,
                  "shuffle": shuffle[codec.shuffle.value], "blocksize": codec.blocksize}
        # as zarr's BloscCodec builds it: numcodecs takes the typesize from 0.16 on
        try:
            numcodec = Blosc.from_config({**config, "typesize": codec.typesize})
        except TypeError:
            numcodec = Blosc.from_config(config)
    elif isinstance(codec, ZstdCodec):
        from numcodecs import Zstd

        numcodec = Zstd(level=codec.level, checksum=codec.checksum)
    else:
        return None
    return lambda chunk: bytes(numcodec.encode(np.ascontiguousarray(chunk, dtype=dtype)))


def _chunk_folder(array: Any) -> Path | None:
    """The folder of ``array``'s chunk files when it lives in a writable ``LocalStore``, else None."""
    from zarr.storage import LocalStore

    store = getattr(array, "store", None)
    if not isinstance(store, LocalStore) or store.read_only:
        return None
    return Path(store.root) / array.path if array.path else Path(store.root)


class _AlignedBuffer(threading.local):
    """One page-aligned scratch buffer per I/O thread, grown as needed (reused: fresh pages cost faults)."""

    buf: mmap.mmap | None = None

    def get(self, size: int) -> mmap.mmap:
        if self.buf is None or len(self.buf) < size:
            self.buf = mmap.mmap(-1, max(size, 1 << 24))
        return self.buf


class ChunkWriter:
    """Writes tiles into a zarr ``array``, each tile one or more whole chunks (the Gram's tiles are its
    chunks).

    ``submit(pieces, then)``: ``pieces`` is a list of ``(row0, col0, block)`` with ``block`` a 2-D numpy
    array whose region ``[row0:row0+h, col0:col0+w]`` is one chunk (a partial one at the array's edge); they
    are encoded now and written by an I/O thread, after which ``then()`` runs in that thread (a tile's
    "done" marker: it must never claim a chunk that is not on disk). Arrays the direct path does not cover
    are written through zarr before ``submit`` returns, and ``then()`` runs there. ``close()`` waits for
    every write and raises the first error; a write error is also raised by the next ``submit``.
    """

    def __init__(self, array: Any, *, threads: int = 2, max_pending: int = 4, direct_io: bool = True) -> None:
        self.array = array
        self._encode = _encoder(array)
        self._folder = _chunk_folder(array) if self._encode is not None else None
        self.direct = self._folder is not None
        self._o_direct = direct_io and hasattr(os, "O_DIRECT")
        self._chunks = tuple(int(c) for c in array.chunks)
        self._shape = tuple(int(s) for s in array.shape)
        self._fill = array.metadata.fill_value
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None  # started by the first submit
        self._slots = threading.BoundedSemaphore(max_pending)
        self._futures: list[Future] = []
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._made: set[Path] = set()
        self._aligned = _AlignedBuffer()
        self.io_seconds = 0.0

    # ------------------------------------------------------------------------------------------ public

    def submit(self, pieces: list[tuple[int, int, np.ndarray]], then: Callable[[], None] | None = None) -> None:
        self._raise_error()
        if not self.direct:
            for r0, c0, block in pieces:
                self.write_now(r0, c0, block)
            if then is not None:
                then()
            return
        files = [(self._chunk_path(r0, c0, block.shape), self._encode(self._chunk_of(block)))
                 for r0, c0, block in pieces]
        self._slots.acquire()
        try:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="chunk-writer")
            future = self._pool.submit(self._write_all, files, then)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(self._finished)
        with self._lock:
            self._futures.append(future)

    def write_now(self, r0: int, c0: int, block: np.ndarray) -> None:
        """Write one chunk in the calling thread (small ones: a tile's 1-byte "done" marker costs 0.1 ms
        here against 1.5 ms through zarr)."""
        if not self.direct:
            self.array[r0 : r0 + block.shape[0], c0 : c0 + block.shape[1]] = block
            return
        self._write_file(self._chunk_path(r0, c0, block.shape), self._encode(self._chunk_of(block)))

    def close(self) -> None:
        """Wait for every submitted write (and its ``then``); raise the first error."""
        if self._pool is not None:
            with self._lock:
                futures, self._futures = self._futures, []
            for future in futures:
                future.exception()
            self._pool.shutdown(wait=True)
            self._pool = None
        self._raise_error()

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:  # keep the original error; still wait, so no write outlives the caller
            try:
                self.close()
            except Exception:  # noqa: BLE001
                pass

    # ------------------------------------------------------------------------------------------ inside

    def _raise_error(self) -> None:
        with self._lock:
            error = self._error
        if error is not None:
            raise error

    def _finished(self, future: Future) -> None:
        self._slots.release()
        error = future.exception()
        if error is not None:
            with self._lock:
                self._error = self._error or error

    def _chunk_path(self, r0: int, c0: int, shape: tuple[int, ...]) -> Path:
        ch, cw = self._chunks
        if r0 % ch or c0 % cw:
            raise ValueError(f"tile at ({r0}, {c0}) is not aligned to the chunks {self._chunks}")
        full = (min(ch, self._shape[0] - r0), min(cw, self._shape[1] - c0))
        if tuple(shape) != full:
            raise ValueError(f"tile at ({r0}, {c0}) has shape {tuple(shape)}, its chunk holds {full}")
        return self._folder / self.array.metadata.encode_chunk_key((r0 // ch, c0 // cw))

    def _chunk_of(self, block: np.ndarray) -> np.ndarray:
        """``block`` as its full chunk: a partial edge chunk is padded with the fill value, as zarr does."""
        if block.shape == self._chunks:
            return block
        chunk = np.full(self._chunks, self._fill, dtype=np.dtype(self.array.dtype))
        chunk[: block.shape[0], : block.shape[1]] = block
        return chunk

    def _write_all(self, files: list[tuple[Path, bytes]], then: Callable[[], None] | None) -> None:
        t0 = time.perf_counter()
        for path, data in files:
            self._write_file(path, data)
        if then is not None:
            then()
        with self._lock:
            self.io_seconds += time.perf_counter() - t0

    def _write_file(self, path: Path, data: bytes) -> None:
        parent = path.parent
        if parent not in self._made:
            parent.mkdir(parents=True, exist_ok=True)
            self._made.add(parent)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")  # LocalStore's own temporary name
        try:
            if not (self._o_direct and len(data) >= _DIRECT_MIN and self._write_direct(tmp, data)):
                with open(tmp, "wb") as f:
                    f.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _write_direct(self, tmp: Path, data: bytes) -> bool:
        """Write ``data`` to the new file ``tmp`` bypassing the page cache; False where the file system
        refuses ``O_DIRECT`` (``tmp`` is then absent or overwritten by the buffered write that follows), which
        then stays off for this writer."""
        size = len(data)
        padded = -(-size // _ALIGN) * _ALIGN
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o666)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # tmpfs, some network mounts refuse it
                raise
            self._o_direct = False
            return False
        try:
            buf = self._aligned.get(padded)
            dest = np.frombuffer(buf, dtype=np.uint8, count=padded)
            dest[:size] = np.frombuffer(data, dtype=np.uint8)  # numpy copies without holding the GIL
            dest[size:] = 0
            del dest
            with memoryview(buf)[:padded] as view:
                written = 0
                while written < padded:
                    written += os.write(fd, view[written:])
            os.ftruncate(fd, size)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # opened, but the write itself refused (alignment rules)
                raise
            self._o_direct = False
            return False
        finally:
            os.close(fd)
        return True
