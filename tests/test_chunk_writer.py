"""The direct chunk writer (kernels.chunk_writer): the files it writes are byte for byte the ones zarr
writes (every Gram codec, full and edge chunks, the 1-byte tile markers), writes through zarr where it
cannot write directly, runs `then` only after the data is on disk, and reports write errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from kernels.chunk_writer import ChunkWriter
from kernels.gram import _compressor


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "zarr.json"}


def _array(root: Path, compressor: str, dtype: str = "float32", fill=float("nan")) -> zarr.Array:
    return zarr.create_array(str(root), shape=(70, 45), chunks=(32, 32), dtype=dtype, fill_value=fill,
                             compressors=_compressor(compressor, np.dtype(dtype).itemsize), overwrite=True)


@pytest.mark.parametrize("compressor", ["blosc-lz4", "blosc-zstd", "zstd", "none"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_chunk_files_are_the_ones_zarr_writes(tmp_path, compressor, dtype):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((70, 45)).astype(dtype)
    ours, theirs = _array(tmp_path / "ours", compressor, dtype), _array(tmp_path / "theirs", compressor, dtype)
    done = []
    with ChunkWriter(ours) as writer:
        assert writer.direct
        for r0 in range(0, 70, 32):
            for c0 in range(0, 45, 32):  # edge chunks are partial: padded with the fill value as zarr does
                block = data[r0 : r0 + 32, c0 : c0 + 32]
                writer.submit([(r0, c0, block)], then=lambda r0=r0, c0=c0: done.append((r0, c0)))
                theirs[r0 : r0 + 32, c0 : c0 + 32] = block
    assert len(done) == 6
    assert _files(tmp_path / "ours") == _files(tmp_path / "theirs")
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ours"), mode="r")[:], data)
    assert not list((tmp_path / "ours").rglob("*.partial"))


def test_markers_match_zarr_and_small_files_are_written_in_place(tmp_path):
    def markers(root):
        return zarr.create_array(str(root), shape=(3, 3), chunks=(1, 1), dtype="uint8", fill_value=0,
                                 compressors=None, overwrite=True)

    ours, theirs = markers(tmp_path / "ours"), markers(tmp_path / "theirs")
    ChunkWriter(ours).write_now(1, 2, np.ones((1, 1), np.uint8))
    theirs[1, 2] = 1
    assert _files(tmp_path / "ours") == _files(tmp_path / "theirs") == {"c/1/2": b"\x01"}


def test_a_store_it_cannot_write_directly_goes_through_zarr():
    arr = zarr.create_array(zarr.storage.MemoryStore(), shape=(8, 8), chunks=(4, 4), dtype="float32")
    called = []
    with ChunkWriter(arr) as writer:
        assert not writer.direct
        writer.submit([(4, 0, np.full((4, 4), 2.0, np.float32))], then=lambda: called.append(1))
        assert called == [1]  # synchronously, after the write
    assert arr[4:, :4].tolist() == [[2.0] * 4] * 4


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no tmpfs at /dev/shm")
def test_a_file_system_without_o_direct_falls_back_to_buffered_writes(tmp_path):
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:  # tmpfs refuses O_DIRECT
        arr = _array(Path(shm) / "a", "blosc-lz4")
        ref = _array(tmp_path / "ref", "blosc-lz4")
        big = np.random.default_rng(1).standard_normal((32, 32)).astype(np.float32)
        with ChunkWriter(arr) as writer:
            writer._o_direct = True
            from kernels import chunk_writer

            old, chunk_writer._DIRECT_MIN = chunk_writer._DIRECT_MIN, 0  # this small chunk tries O_DIRECT too
            try:
                writer.submit([(0, 0, big)])
                writer.close()
            finally:
                chunk_writer._DIRECT_MIN = old
        ref[:32, :32] = big
        assert _files(Path(shm) / "a") == _files(tmp_path / "ref")


def test_large_chunks_take_o_direct_and_match_zarr(tmp_path):
    """A 1,024² float32 chunk (4 MB, over the O_DIRECT threshold) written directly equals zarr's file."""
    data = np.random.default_rng(2).standard_normal((1024, 1024)).astype(np.float32)
    make = lambda root: zarr.create_array(str(root), shape=(1024, 1024), chunks=(1024, 1024), dtype="float32",  # noqa: E731
                                          compressors=_compressor("blosc-lz4", 4), overwrite=True)
    ours, theirs = make(tmp_path / "ours"), make(tmp_path / "theirs")
    with ChunkWriter(ours) as writer:
        writer.submit([(0, 0, data)])
    theirs[:] = data
    assert _files(tmp_path / "ours") == _files(tmp_path / "theirs")


def test_write_errors_are_raised_and_then_is_not_called(tmp_path):
    arr = _array(tmp_path / "a", "blosc-lz4")
    (tmp_path / "a" / "c").write_text("not a folder")  # the chunk folder cannot be created
    called = []
    writer = ChunkWriter(arr)
    writer.submit([(0, 0, np.zeros((32, 32), np.float32))], then=lambda: called.append(1))
    with pytest.raises(OSError):
        writer.close()
    assert called == []


def test_misaligned_or_wrongly_sized_tiles_are_refused(tmp_path):
    arr = _array(tmp_path / "a", "none")
    with ChunkWriter(arr) as writer:
        with pytest.raises(ValueError, match="not aligned"):
            writer.submit([(3, 0, np.zeros((32, 32), np.float32))])
        with pytest.raises(ValueError, match="its chunk holds"):
            writer.submit([(64, 0, np.zeros((32, 32), np.float32))])  # the edge chunk holds 6 rows
