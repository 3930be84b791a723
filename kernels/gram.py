"""Kernel Grams of any size, computed tile by tile with Dask and written into a chunked Zarr v3 array.

    from kernels.gram import AnalyticKernel, gram_to_zarr, open_gram

    kernel = AnalyticKernel(kind="ntk", depth=3, activation="relu")
    gram_to_zarr(kernel, x, store="grams.zarr", path="ntk", attrs={"dataset": "mnist"})
    theta = open_gram("grams.zarr", "ntk")          # lazy dask array, chunks = tiles

**Block functions.** ``kernel`` is any callable ``(x1_block, x2_block) -> (b1, b2)`` array (numpy or torch);
the blocks are numpy arrays of rows read from the inputs (on a diagonal tile of a symmetric Gram both
arguments are the *same object*, so a block function may test ``x2 is x1``). Ready-made ones:
:class:`AnalyticKernel` (the NNGP/NTK of :mod:`kernels.analytic`, with fused float32 paths, see below)
and :class:`ModelNTK` (the empirical NTK of a torch model, :func:`kernels.empirical.empirical_ntk`). A block
function may have a ``spec()`` method returning a JSON-able description; it is stored in the array's
attributes and must match when a run is resumed (plain functions are described by their qualified name).

**Store layout.** In ``store`` (a folder path, a URL zarr understands, or a zarr ``Store``):

* ``<path>``: the Gram, a Zarr v3 array ``(N1, N2)`` of ``dtype`` (float32 by default), chunks
  ``(block, block)`` equal to the tiles, ``fill_value`` NaN (a tile never written reads as NaN), compressed
  with blosc-lz4 + byte shuffle by default (``compressor=``: ``"blosc-lz4"``, ``"blosc-zstd"``, ``"zstd"``,
  ``"none"`` or any zarr bytes-to-bytes codec), ``dimension_names=("row", "col")``. Its attributes hold one
  key, :data:`ATTR_KEY`, with ``gram`` (shape, block, tile grid, dtype, symmetric, compressor,
  ``complete``), ``kernel`` (the block function's spec), ``inputs`` (shape, dtype and a blake2b fingerprint
  of ``x1``/``x2``), ``data`` (the caller's ``attrs``: dataset, split, subset key, preprocessing, ...) and
  ``software``.
* ``<path>_tiles``: the record of finished tiles, a ``uint8`` array ``(tiles_1, tiles_2)`` with one 1-byte
  chunk per tile (so concurrent workers never write the same object). A tile's entry is set to 1 only after
  its chunk write(s) have returned, so a chunk that was being written when the run died is never taken for
  done; each entry is its own store object, written atomically (temp file + rename), and an unreadable
  entry counts as not done.

**Writes.** In a local folder the Gram's chunks and the tile record are written by
:class:`kernels.chunk_writer.ChunkWriter`: encoded in the worker with the array's own codec (the bytes zarr
would write), then written by two I/O threads (one for the sync scheduler) with ``O_DIRECT`` (no copy into
the page cache, which cost as much CPU as the compression here) while the worker computes its next tile; a
tile's record entry is written only after both of its chunks are on disk. Other stores go through zarr as
before. ``ntk-sweep gram`` also lets its process keep freed tile-sized buffers for reuse
(:func:`keep_freed_pages`; ``predict`` does not, so that its measured memory figures stay as they were).

**Symmetric case** (``x2 is None``): only tiles ``i <= j`` are computed; an off-diagonal tile is written at
``(i, j)`` and its transpose at ``(j, i)``, a diagonal tile is symmetrised (``(K + K.T) / 2``), so the stored
Gram is exactly symmetric.

**Resume.** Calling :func:`gram_to_zarr` again with the same kernel, inputs, block and dtype computes only the
tiles whose record is missing (the array's identity attributes are checked first; a different Gram at that
path is an error unless ``overwrite=True``). Tiles are computed deterministically (fixed thread count per
tile, aligned copies of the inputs), so the result equals an uninterrupted run bit for bit.

**Memory bound.** Tiles are streamed: each task reads its rows of the inputs, computes one ``(b, b)`` tile,
writes it and returns only a few timings. With ``W`` tiles in flight (the Dask workers), peak resident memory
is about ``R0 + S + W * c * b^2 * 4`` bytes, independent of ``N`` except through ``S``: ``R0`` the interpreter
with torch/dask/zarr and the compiled kernel (0.36 GiB measured), ``S`` the inputs held in memory (``N d * 4``
bytes, 0.22 GB for 70,000 MNIST images; pass zarr arrays or memmaps to read them per tile instead, though a
memmap's pages still count as resident once touched), and ``c b^2 * 4`` the per-worker working set: input
rows, matmul, kernel output, transpose, chunk and compressed buffers, with ``c`` about 15 (0.25 GiB per
worker at the default ``b = 2048``), plus up to ``2 W`` tiles' compressed chunks waiting for the disk and one
16 MiB aligned buffer per I/O thread (the chunk writer), and whatever freed buffers glibc keeps when
:func:`keep_freed_pages` is on. Measured peaks (two workers, memmapped MNIST, ``bench/gram.py``): 0.60 GiB
at N = 5,000 and 0.86 GiB at 20,000 (before the chunk writer), 1.1-1.6 GiB at 70,000 (with it and
``keep_freed_pages``; 1.1 GiB before), read inside the benchmark's subprocess; ``ntk-sweep gram --n all``
peaked at 1.35 GiB measured from outside (``/usr/bin/time``).

**Schedulers** (``scheduler=``): ``None``/``"threads"``: Dask's local threaded scheduler with ``workers``
threads (default: the usable cores) and ``torch_threads`` intra-op threads per tile (default
``cores // workers``, i.e. 1). Each tile task sets the torch thread count *in its own thread*: OpenMP keeps
it per thread, so a count set only in the main thread never reaches Dask's workers, whose matmuls would each
start a team of all cores (two workers on two cores then ran no faster than one). One thread per tile and
one tile per core beats one tile at a time on all cores: the Zarr write (transpose, compression) is serial
and a third of a tile's time, and a second tile computes while the first one writes (``bench/RESULTS.md``).
``"sync"``: one thread, for debugging. ``"ray"``: the same graph run by :func:`ray.util.dask.ray_dask_get` on
the Ray cluster that ``ray.init`` connects to (``RAY_ADDRESS``, or a local one), one CPU and one torch thread
per tile task, inputs put once into Ray's object store, progress from ``ray.wait`` on the tiles' object
refs; the store must then be reachable from every node (a shared file system or an object-store URL). Any
Dask ``get`` callable also works. ``ray.util.dask`` (Ray 2.60) refuses Dask older than 2024.11.0 at import;
tested here with Dask 2026.8.0 (its dataframe shuffle optimisation only supports Dask < 2025.1, unused here).

**Readers.** :func:`open_gram` returns a lazy ``dask.array`` (chunks = tiles) after checking the Gram is
complete. Without this package: ``zarr.open_array("grams.zarr", path="ntk", mode="r")[i0:i1, j0:j1]`` reads
any window (decompressing only the chunks it touches), ``dask.array.from_zarr("grams.zarr", component="ntk")``
gives the lazy array, and xarray (with Zarr v3 support) reads it as a variable with dimensions
``("row", "col")``: ``xarray.open_zarr("grams.zarr", consolidated=False)["ntk"]``; the tile record appears
beside it as ``ntk_tiles``.

**Fused paths** (:mod:`kernels.fused`; this module only tiles and stores). For float32 Grams
:class:`AnalyticKernel` does not go through the generic ``mlp_kernels_from_dots`` recursion (a dozen
full-tile passes per layer) but computes everything after the input-Gram matmul as one elementwise
expression per tile, ``torch.compile``'d into a single pass (``impl="compiled"``) or run eagerly
(``"fused"``): ReLU in NTK parameterisation in its cosine form, every other closed-form activation (leaky
ReLU/abrelu, abs, erf, GELU, identity) through its own ``Activation.dual``, activations without a closed
form through an interpolation table (``"table"``, :mod:`kernels.dual_table`). Diagonal entries of diagonal
tiles are pinned (ReLU: ``c = 1``; the others: the float64 diagonal). ReLU's error in float32 against the
float64 :func:`kernels.analytic.mlp_kernels` (MNIST standardised with the train statistics, depth 3,
2048-row tiles): at most 4e-7 of the largest entry and 1.4e-6 relative to each entry, diagonal included (up
to 1.5e-6 of the largest entry and 3.4e-6 relative on standardised subsets whose test rows have extreme
norms); the generic float32 recursion loses 5e-4 on the diagonal, where ``atan2(sqrt(k11 k22 - k12^2),
k12)`` cancels. The other activations' errors are stated in :mod:`kernels.fused` and ``bench/RESULTS.md``.

**Tile size.** ``block=None`` (the default) takes a resumed Gram's own block, else
:func:`kernels.tiles.choose_block`: :data:`DEFAULT_BLOCK` when that gives every worker enough tiles, a
smaller multiple of 64 when it would leave a worker idle (N = 4,000 on 2 workers: 1,472, six upper tiles,
instead of three tiles of 2,048). The tiling itself (tile grid, upper-triangle enumeration, bounds) is
:mod:`kernels.tiles`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels import fused
from kernels.chunk_writer import ChunkWriter
from kernels.tiles import choose_block, tile_bounds, tile_grid, tile_pairs

Tensor = torch.Tensor
BlockFn = Callable[[Any, Any], Any]

DEFAULT_BLOCK = 2048
ATTR_KEY = "ntk_sweep_gram"
FORMAT_VERSION = 1
TILES_SUFFIX = "_tiles"
DTYPES = ("float16", "float32", "float64")
COMPRESSORS = ("blosc-lz4", "blosc-zstd", "zstd", "none")
IMPLS = ("auto", "compiled", "fused", "generic", "series", "table")
# "auto" compiles the fused ReLU kernel when the Gram has at least this many entries to compute (below it
# the one-off compile, ~5-15 s, costs more than it saves).
AUTO_COMPILE_ENTRIES = 1 << 29
# ... and the other closed forms from this many: their eager recursion is 4-14x slower than the compiled
# one (erf: 365 against 65 ms per 2048^2 tile and depth 3; GELU 841 against 64), against ReLU's ~3x.
AUTO_COMPILE_ENTRIES_DUAL = 1 << 27


class GramError(ValueError):
    """A bad argument, or a store/path that is missing, corrupt or holds a different Gram."""


# --------------------------------------------------------------------------------------------- fused ReLU


def relu_ntk_tile(
    x1: Tensor, x2: Tensor | None = None, *, depth: int, w_std: float = 2**0.5, b_std: float = 0.0,
    kind: str = "ntk", compiled: bool = False,
) -> Tensor:
    """The fused ReLU NNGP/NTK (NTK parameterisation) of one tile; ``x2=None`` for a diagonal tile.

    Same convention and result as ``kernels.analytic.mlp_kernels(x1, x2, activation="relu")[kind]``, in
    ``x1``'s dtype; ``compiled=True`` uses the torch.compile'd single-pass kernel.
    """
    b = x1 if x2 is None else x2
    w2, b2 = float(w_std) ** 2, float(b_std) ** 2
    return fused.relu_tile(x1, b, depth, w2, b2, kind == "ntk", bool(compiled))


# ------------------------------------------------------------------------------------------- block functions


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


@dataclass(frozen=True)
class AnalyticKernel:
    """Block function for the infinite-width NNGP/NTK of :mod:`kernels.analytic` (same arguments).

    ``kind``: ``"ntk"`` or ``"nngp"``. ``dtype``: compute dtype, ``"float32"`` (default) or ``"float64"``.
    ``impl`` (the code paths live in :mod:`kernels.fused`):

    * ``"generic"``: ``mlp_kernels_from_dots``, any activation (the float64 reference recursion);
    * ``"fused"``: the fused recursion of an activation with a closed-form dual, eager torch;
    * ``"compiled"``: the same, torch.compile'd into one pass per tile;
    * ``"series"``: ReLU in NTK parameterisation with ``b_std = 0`` only: the whole recursion as one
      series in the input cosine (:mod:`kernels.relu_series`), compiled; its elementwise pass is 6 ms per
      2,048² depth-3 tile against 34-38 ms for ``"compiled"``;
    * ``"table"``: the fused recursion with the dual read from an interpolation table
      (:mod:`kernels.dual_table`), for activations without a closed form (eager);
    * ``"auto"``: for float32, compiled when the Gram has at least :data:`AUTO_COMPILE_ENTRIES` entries
      (:data:`AUTO_COMPILE_ENTRIES_DUAL` for closed forms other than ReLU, whose eager path is slower), as
      the series where it applies, fused when it is smaller, table without a closed form
      (``Activation.closed_form``); generic for float64.

    :func:`gram_to_zarr` resolves ``"auto"`` before it starts (see :meth:`resolved`; a resumed Gram keeps
    the path it was started with), and the resolved choice is part of the Gram's identity.
    """

    kind: str = "ntk"
    depth: int = 3
    activation: str = "relu"
    w_std: float = 2**0.5
    b_std: float = 0.0
    parameterization: str = "ntk"
    width: int | None = None
    dtype: str = "float32"
    impl: str = "auto"

    def __post_init__(self) -> None:
        from kernels.activations import get_activation

        if self.kind not in ("ntk", "nngp"):
            raise ValueError(f"kind must be 'ntk' or 'nngp', got {self.kind!r}")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 0:
            raise ValueError(f"depth must be an integer >= 0, got {self.depth!r}")
        for name in ("w_std", "b_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.activation, str):
            raise ValueError("activation must be a name (see kernels.activations.get_activation)")
        get_activation(self.activation)  # raises ValueError naming the known activations
        if self.parameterization not in ("ntk", "standard"):
            raise ValueError(f"parameterization must be 'ntk' or 'standard', got {self.parameterization!r}")
        if self.parameterization == "standard" and self.kind == "ntk" and not self.width:
            raise ValueError("the standard-parameterisation NTK depends on the width: pass width=")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.impl in ("fused", "compiled") and not self.fusable:
            raise ValueError(f"impl={self.impl!r} needs an activation with a closed-form dual "
                             f"(kernels.activations.CLOSED_FORM); {self.activation!r} has none: use 'table'")
        if self.impl == "series" and not self.series_applies:
            raise ValueError("impl='series' needs ReLU in NTK parameterisation with b_std = 0 (its kernel is "
                             "then one function of the cosine); use 'compiled'")

    @property
    def fusable(self) -> bool:
        """The activation has a closed-form dual (``Activation.closed_form``): the fused paths apply."""
        return fused.fusable(self.activation, self.parameterization)

    @property
    def series_applies(self) -> bool:
        """ReLU in NTK parameterisation without bias: ``impl="series"`` applies (:mod:`kernels.relu_series`)."""
        return fused.series_applies(self.activation, self.parameterization, self.b_std)

    def resolved(self, entries: int) -> AnalyticKernel:
        """This kernel with ``impl="auto"`` replaced by the concrete path for a Gram of ``entries``."""
        if self.impl != "auto":
            return self
        if self.dtype == "float64":
            return replace(self, impl="generic")
        if not self.fusable:
            return replace(self, impl="table")
        relu = fused.is_relu(self.activation, self.parameterization)
        threshold = AUTO_COMPILE_ENTRIES if relu else AUTO_COMPILE_ENTRIES_DUAL
        if entries < threshold:
            return replace(self, impl="fused")
        return replace(self, impl="series" if self.series_applies else "compiled")

    def spec(self) -> dict:
        return {
            "type": "analytic", "module": "kernels.analytic", "network": "mlp", "kind": self.kind,
            "depth": self.depth, "activation": self.activation, "w_std": float(self.w_std),
            "b_std": float(self.b_std), "parameterization": self.parameterization, "width": self.width,
            "compute_dtype": self.dtype, "impl": self.impl,
        }

    def _fused_args(self) -> dict:
        return dict(depth=self.depth, activation=self.activation, w_std=self.w_std, b_std=self.b_std,
                    kind=self.kind, parameterization=self.parameterization, width=self.width)

    def row_squares(self, x: Any, rows_per_step: int = 8192) -> np.ndarray | None:
        """The float64 squared norms of ``x``'s rows as this kernel's tiles see them (after the cast to the
        compute dtype), for :meth:`tile`'s ``row_sq``; None where the path does not use them. One pass over
        the inputs, so a Gram does not redo it for every tile (two per tile were ~5 % of the 70k Gram)."""
        if self.impl != "series":
            return None
        n = int(x.shape[0])
        out = np.empty(n, dtype=np.float64)
        for lo in range(0, n, rows_per_step):
            block = _to_tensor(x[lo : lo + rows_per_step], _torch_dtype(self.dtype)).reshape(
                min(rows_per_step, n - lo), -1)
            out[lo : lo + block.shape[0]] = fused.row_squares(block).numpy()
        return out

    def tile(self, x1: Any, x2: Any, stats: dict | None = None, row_sq: tuple | None = None) -> Tensor:
        """One tile; ``x2 is x1`` marks a diagonal tile. ``stats`` collects matmul/elementwise seconds;
        ``row_sq``: the rows' squared norms from :meth:`row_squares`, ``(for x1, for x2)``, when known."""
        dtype = _torch_dtype(self.dtype)
        a = _to_tensor(x1, dtype)
        b = a if x2 is x1 else _to_tensor(x2, dtype)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
            raise ValueError(f"analytic kernels need (N, d) inputs, got {tuple(a.shape)}, {tuple(b.shape)}")
        impl = self.resolved(a.shape[0] * b.shape[0]).impl
        if impl in ("fused", "compiled", "series"):
            sq = None if row_sq is None else tuple(torch.from_numpy(np.asarray(v)) for v in row_sq)
            return fused.fused_tile(a, b, compiled=impl != "fused", series=impl == "series", stats=stats,
                                    row_sq=sq if impl == "series" else None, **self._fused_args())
        if impl == "table":
            from kernels.dual_table import get_table

            return fused.fused_tile(a, b, stats=stats, dual=get_table(self.activation), **self._fused_args())
        from kernels.analytic import mlp_kernels_from_dots

        t0 = time.perf_counter()
        dot = a @ b.T
        t1 = time.perf_counter()
        sq1 = (a * a).sum(dim=1)
        sq2 = sq1 if b is a else (b * b).sum(dim=1)
        out = mlp_kernels_from_dots(
            dot, sq1, sq2, a.shape[1], depth=self.depth, activation=self.activation, w_std=self.w_std,
            b_std=self.b_std, parameterization=self.parameterization, width=self.width, get=(self.kind,),
        )[self.kind]
        if stats is not None:
            stats["matmul_s"] = stats.get("matmul_s", 0.0) + (t1 - t0)
            stats["matmul_flop"] = stats.get("matmul_flop", 0.0) + 2.0 * a.shape[0] * b.shape[0] * a.shape[1]
            stats["elementwise_s"] = stats.get("elementwise_s", 0.0) + (time.perf_counter() - t1)
        return out

    def __call__(self, x1: Any, x2: Any) -> Tensor:
        return self.tile(x1, x2)

    def warm_up(self) -> None:
        """Compile the fused kernel now (in this thread) if this kernel uses it."""
        if self.impl in ("compiled", "series"):
            fused.warm_up(dtype=_torch_dtype(self.dtype), series=self.impl == "series", **self._fused_args())


@dataclass(frozen=True, eq=False)
class ModelNTK:
    """Block function for the empirical NTK of a torch model (:func:`kernels.empirical.empirical_ntk`,
    ``trace=True``: the mean over the output diagonal). Its spec records the model's class, its
    ``config`` when it has one (:class:`kernels.mlp.MLP`), the parameter count and a hash of the weights."""

    model: torch.nn.Module
    method: str = "auto"
    _spec: dict = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not isinstance(self.model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        digest = hashlib.sha256()
        n_params = 0
        for name, p in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
            n_params += p.numel()
        cls = type(self.model)
        spec = {
            "type": "empirical", "module": "kernels.empirical", "method": self.method, "trace": True,
            "model_class": f"{cls.__module__}.{cls.__qualname__}", "n_params": int(n_params),
            "state_sha256": digest.hexdigest(),
        }
        config = getattr(self.model, "config", None)
        if isinstance(config, Mapping):
            spec["model_config"] = _jsonable(dict(config))
        object.__setattr__(self, "_spec", spec)

    def spec(self) -> dict:
        return dict(self._spec)

    def __call__(self, x1: Any, x2: Any) -> Any:
        from kernels.empirical import empirical_ntk

        return empirical_ntk(self.model, x1, None if x2 is x1 else x2, method=self.method, trace=True)


def kernel_spec(kernel: BlockFn) -> dict:
    """The JSON description of a block function stored with the Gram (see the module docstring)."""
    spec_fn = getattr(kernel, "spec", None)
    if callable(spec_fn):
        return _jsonable(spec_fn())
    if isinstance(kernel, functools.partial):
        inner = kernel_spec(kernel.func)
        return {"type": "partial", "func": inner, "args": _jsonable(list(kernel.args)),
                "keywords": _jsonable(dict(kernel.keywords))}
    name = getattr(kernel, "__qualname__", type(kernel).__qualname__)
    return {"type": "callable", "name": f"{getattr(kernel, '__module__', '?')}.{name}"}


# --------------------------------------------------------------------------------------------- helpers


def _to_tensor(x: Any, dtype: torch.dtype) -> Tensor:
    """A fresh, contiguous, 64-byte aligned copy (torch's CPU allocator), so tiles compute identically."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", dtype).clone(memory_format=torch.contiguous_format)
    x = np.asarray(x)
    out = torch.empty(x.shape, dtype=dtype)
    out.numpy()[...] = x  # copies (and casts) without touching a possibly read-only source
    return out


def _jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (tuples become lists; anything else not JSON-able becomes its str)."""
    return json.loads(json.dumps(obj, default=str))


def _as_rows(x: Any, name: str) -> Any:
    """Inputs as something row-sliceable: numpy arrays, zarr arrays and memmaps are kept (read per tile);
    torch tensors become numpy; lists become numpy."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__")):
        x = np.asarray(x)
    if len(x.shape) < 1 or x.shape[0] == 0:
        raise GramError(f"{name} must have at least one row, got shape {tuple(x.shape)}")
    if not np.issubdtype(np.dtype(x.dtype), np.number):
        raise GramError(f"{name} must be numeric, got dtype {x.dtype}")
    return x


def input_fingerprint(x: Any, rows_per_step: int = 8192) -> str:
    """blake2b-128 of the shape, dtype and bytes of ``x``, read in row blocks (memory independent of N)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps({"shape": list(x.shape), "dtype": str(np.dtype(x.dtype))}).encode())
    for lo in range(0, x.shape[0], rows_per_step):
        digest.update(np.ascontiguousarray(np.asarray(x[lo : lo + rows_per_step])).tobytes())
    return digest.hexdigest()


def _compressor(spec: Any, itemsize: int) -> list:
    from zarr.codecs import BloscCodec, ZstdCodec

    if spec is None or spec == "none":
        return []
    if spec == "blosc-lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=itemsize)]
    if spec == "blosc-zstd":
        return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=itemsize)]
    if spec == "zstd":
        return [ZstdCodec(level=3)]
    if isinstance(spec, str):
        raise GramError(f"compressor must be one of {COMPRESSORS} or a zarr codec, got {spec!r}")
    return [spec]


def _compressor_name(spec: Any) -> str:
    return spec if isinstance(spec, str) or spec is None else type(spec).__name__


def _open_store(store: Any, *, create: bool) -> Any:
    """A zarr store: folder paths become a ``LocalStore`` (created when ``create``); URLs and ``Store``
    objects pass through."""
    from zarr.storage import LocalStore

    if isinstance(store, (str, os.PathLike)) and "://" not in str(store):
        folder = Path(store).expanduser()
        if folder.exists() and not folder.is_dir():
            raise GramError(f"store {folder}: exists and is not a folder (a Zarr store is a directory)")
        if not folder.exists():
            if not create:
                raise GramError(f"store {folder}: no such Zarr store")
            folder.mkdir(parents=True, exist_ok=True)
        return LocalStore(str(folder), read_only=not create)
    return store


def _where(store: Any, path: str) -> str:
    root = getattr(store, "root", store)
    return f"store {root} path {path!r}"


def _check_path(path: str) -> str:
    if not isinstance(path, str) or not path.strip("/"):
        raise GramError(f"path must be a non-empty array name inside the store, got {path!r}")
    parts = path.strip("/").split("/")
    if any(p in ("", ".", "..") or p.startswith("__") for p in parts):
        raise GramError(f"path {path!r}: invalid Zarr node name")
    return "/".join(parts)


def _open_existing(zstore: Any, path: str, where: str, *, mode: str = "r") -> Any | None:
    """The array at ``path``, None when nothing is there; GramError when the node is unreadable."""
    import zarr

    try:
        return zarr.open_array(zstore, path=path, mode=mode, zarr_format=3)
    except FileNotFoundError:
        return None
    except Exception as exc:  # zarr raises many types for corrupt metadata: json, KeyError, ValueError, ...
        if type(exc).__name__ in ("ArrayNotFoundError", "NodeNotFoundError", "GroupNotFoundError"):
            return None
        if type(exc).__name__ == "ContainsGroupError":
            raise GramError(f"{where}: holds a Zarr group, not a Gram array") from None
        raise GramError(f"{where}: unreadable Zarr array ({type(exc).__name__}: {exc})") from None


def _gram_attrs(arr: Any, where: str) -> dict:
    try:
        attrs = dict(arr.attrs)
    except Exception as exc:
        raise GramError(f"{where}: unreadable attributes ({type(exc).__name__}: {exc})") from None
    meta = attrs.get(ATTR_KEY)
    if not isinstance(meta, dict) or not isinstance(meta.get("gram"), dict):
        raise GramError(f"{where}: not an ntk-sweep Gram (no '{ATTR_KEY}' attributes)")
    return meta


def _first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
            if diff:
                return diff
        return None
    return None if old == new else f"{prefix} (stored {old!r}, requested {new!r})"


def _peek_gram(store: Any, path: str) -> dict | None:
    """The attributes of a Gram already at ``store``/``path``, or None (nothing there, unreadable, or not a
    Gram: :func:`gram_to_zarr` then reports it as before). Creates nothing."""
    try:
        zstore = _open_store(store, create=False)
        arr = _open_existing(zstore, _check_path(path), _where(zstore, path))
        return None if arr is None else _gram_attrs(arr, "")
    except Exception:
        return None


def _read_done(markers: Any, shape: tuple[int, int]) -> np.ndarray:
    """The tile record as a bool array; a marker that cannot be read counts as not done."""
    try:
        return np.asarray(markers[...]) == 1
    except Exception:
        done = np.zeros(shape, dtype=bool)
        for i in range(shape[0]):
            for j in range(shape[1]):
                try:
                    done[i, j] = int(np.asarray(markers[i, j])) == 1
                except Exception:
                    done[i, j] = False
        return done


# --------------------------------------------------------------------------------------------- tiles


@dataclass(frozen=True, eq=False)
class _TileJob:
    """Everything a tile task needs except the inputs (small, picklable for Ray)."""

    kernel: BlockFn
    gram: Any  # zarr.Array
    markers: Any  # zarr.Array
    n1: int
    n2: int
    block: int
    symmetric: bool
    dtype: str
    torch_threads: int | None
    writer_key: str | None = None  # this process's shared ChunkWriter (threads/sync); None: one per task
    row_sq: tuple | None = None  # (x1's, x2's) row squared norms when the kernel uses them (AnalyticKernel)


# The ChunkWriter of each running gram_to_zarr call in this process, by key (a writer holds threads and
# cannot travel with a Ray task; tasks in another process open their own).
_WRITERS: dict[str, tuple[ChunkWriter, ChunkWriter]] = {}  # (Gram, tile record)
_SCRATCH = threading.local()


def _call_kernel(kernel: BlockFn, a: Any, b: Any, stats: dict, row_sq: tuple | None = None) -> Any:
    if row_sq is not None:  # an AnalyticKernel on its series path
        return kernel.tile(a, b, stats, row_sq)
    tile_fn = getattr(kernel, "tile", None)
    if callable(tile_fn):
        return tile_fn(a, b, stats)
    return kernel(a, b)


def _as_array(out: Any, dtype: str) -> np.ndarray:
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().numpy()
    return np.asarray(out, dtype=dtype)


def _transposed(out: np.ndarray, strip: int = 32) -> np.ndarray:
    """``out.T`` as a C-contiguous array in this thread's reused scratch buffer (valid until the thread's
    next call; the chunk writer encodes it before returning). Copied in strips of ``strip`` rows, which
    keeps both sides in cache: 6 ms per 2,048² float32 tile against 11 ms for torch's ``.T.contiguous()``
    and 24 ms for numpy's (one core of the 2-core Xeon), and a reused buffer skips a fresh one's page
    faults."""
    rows, cols = out.shape
    buf = getattr(_SCRATCH, "transpose", None)
    if buf is None or buf.dtype != out.dtype or buf.size < out.size:
        buf = np.empty(out.size, dtype=out.dtype)
        _SCRATCH.transpose = buf
    dest = buf[: out.size].reshape(cols, rows)
    src, dst = torch.from_numpy(out), torch.from_numpy(dest)
    for r in range(0, rows, strip):
        dst[:, r : r + strip].copy_(src[r : r + strip].T)
    return dest


_DONE = np.ones((1, 1), dtype=np.uint8)


def _run_tile(job: _TileJob, x1: Any, x2: Any, i: int, j: int) -> dict:
    """Compute tile ``(i, j)``, write it (and its transpose), then record it as done (after the writes)."""
    if job.torch_threads:
        # In this thread: OpenMP's thread count is per-thread state, so the main thread's setting does not
        # reach Dask's worker threads, whose matmuls would each start a team of all cores (oversubscribed).
        torch.set_num_threads(job.torch_threads)
    t0 = time.perf_counter()
    r0, r1, c0, c1 = tile_bounds(i, j, job.block, job.n1, job.n2)
    a = np.asarray(x1[r0:r1])
    b = a if job.symmetric and i == j else np.asarray((x1 if job.symmetric else x2)[c0:c1])
    stats: dict = {}
    row_sq = None
    if job.row_sq is not None:
        sq1, sq2 = job.row_sq
        row_sq = (sq1[r0:r1], sq1[c0:c1] if job.symmetric else sq2[c0:c1])
    mirror = job.symmetric and i != j
    t1 = time.perf_counter()
    out = _as_array(_call_kernel(job.kernel, a, b, stats, row_sq), job.dtype)
    if out.shape != (r1 - r0, c1 - c0):
        raise GramError(f"the kernel returned shape {out.shape} for a {(r1 - r0, c1 - c0)} tile")
    if job.symmetric and i == j:  # exactly symmetric; the same bits as (out + out.T) / 2, ~2.5x faster
        out = (torch.from_numpy(out) + torch.from_numpy(_transposed(out))).mul_(0.5).numpy()
    t2 = time.perf_counter()
    pieces = [(r0, c0, out)] + ([(c0, r0, _transposed(out))] if mirror else [])
    shared = _WRITERS.get(job.writer_key) if job.writer_key else None
    writer, marker = shared or (ChunkWriter(job.gram, threads=1, max_pending=1), ChunkWriter(job.markers))
    try:
        writer.submit(pieces, then=functools.partial(marker.write_now, i, j, _DONE))
    finally:
        if shared is None:
            writer.close()
    t3 = time.perf_counter()
    entries = (r1 - r0) * (c1 - c0)
    stats.update(read_s=t1 - t0, kernel_s=t2 - t1, write_s=t3 - t2, tile_s=t3 - t0, entries=entries,
                 written=entries * (2 if mirror else 1))
    return stats


# --------------------------------------------------------------------------------------------- driver


@dataclass
class GramResult:
    """What :func:`gram_to_zarr` did. ``entries_per_s``: Gram entries written (tiles and their mirrors)
    per wall second of this call; ``stats``: per-stage seconds summed over tiles (read, kernel, matmul,
    elementwise, write)."""

    store: str
    path: str
    shape: tuple[int, int]
    block: int
    tiles_total: int
    tiles_skipped: int
    tiles_computed: int
    seconds: float
    entries_written: int
    entries_computed: int
    stats: dict

    @property
    def entries_per_s(self) -> float:
        return self.entries_written / self.seconds if self.seconds > 0 else float("nan")


_PAGES_KEPT = False


def keep_freed_pages() -> None:
    """Let glibc keep freed tile-sized buffers (up to 32 MiB) for reuse instead of unmapping each one: call
    it once in a process that computes large Grams (``ntk-sweep gram`` does).

    Every tile allocates several 16 MB buffers (inputs, matmul, kernel output, compressed chunks); by
    default glibc maps each one fresh and unmaps it on free, so every tile paid ~4,000 page faults per
    buffer again (on the 2-core Xeon VM: a first touch of 16 MB costs ~10 ms, against ~1 ms warm; the 70k
    Gram went from 64.4 to 56.4 s with only this). Process-wide and permanent (freed memory then stays with
    the process, so RSS stays near its peak), which is why :func:`gram_to_zarr` does not do it by itself:
    a sweep's long-lived Ray workers keep glibc's defaults. A no-op off glibc.
    """
    global _PAGES_KEPT
    if _PAGES_KEPT:
        return
    _PAGES_KEPT = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        pass


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _resolve_scheduler(scheduler: Any) -> tuple[str, Any]:
    import dask.local
    import dask.threaded

    if scheduler in (None, "threads", "threaded"):
        return "threads", dask.threaded.get
    if scheduler in ("sync", "synchronous", "single-threaded"):
        return "sync", dask.local.get_sync
    if scheduler == "ray":
        import ray
        from ray.util.dask import ray_dask_get

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)
        return "ray", ray_dask_get
    if callable(scheduler):
        return "custom", scheduler
    raise GramError(f"scheduler must be 'threads', 'sync', 'ray' or a Dask get function, got {scheduler!r}")


def gram_to_zarr(
    kernel: BlockFn,
    x1: Any,
    x2: Any = None,
    *,
    store: Any,
    path: str = "gram",
    block: int | None = None,
    dtype: str = "float32",
    compressor: Any = "blosc-lz4",
    scheduler: Any = None,
    attrs: Mapping | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    torch_threads: int | None = None,
    progress: bool = True,
    max_tiles: int | None = None,
) -> GramResult:
    """Compute the Gram ``kernel(x1, x2)`` (``x2=None``: ``kernel(x1, x1)``, symmetric) tile by tile into
    the Zarr array ``path`` of ``store``; resumes an interrupted run. See the module docstring.

    Args:
        kernel: block function ``(x1_block, x2_block) -> (b1, b2)`` (:class:`AnalyticKernel`,
            :class:`ModelNTK`, or any callable).
        x1, x2: ``(N, ...)`` inputs (numpy, torch, zarr arrays or memmaps; the last two are read per tile).
        store: folder path (created), URL, or zarr ``Store``. ``path``: the array's name in it.
        block: tile edge ``b`` (also the chunk edge); default: a resumed Gram's own, else
            :func:`kernels.tiles.choose_block` from ``N`` and the workers (at most :data:`DEFAULT_BLOCK`,
            smaller only when the Gram has too few tiles to keep every worker busy).
            ``dtype``: stored dtype (float16/32/64).
        compressor: ``"blosc-lz4"`` (default), ``"blosc-zstd"``, ``"zstd"``, ``"none"`` or a zarr codec.
        scheduler: ``None``/``"threads"``, ``"sync"``, ``"ray"`` or a Dask get function.
        attrs: JSON-able description of the data (dataset, split, subset key, preprocessing), stored as-is.
        overwrite: replace a different Gram found at ``path`` (default: refuse, and resume an identical one).
        workers: tiles computed at once (threads scheduler; default: the usable cores).
        torch_threads: torch intra-op threads per tile (default: cores // workers, at least 1).
        progress: show a tqdm bar over tiles (on stderr).
        max_tiles: compute at most this many pending tiles, then return (for tests and chunked runs).
    Returns:
        A :class:`GramResult`. Raises :class:`GramError` for bad arguments and bad/mismatching stores.
    """
    import dask
    import zarr

    if block is not None and (isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1):
        raise GramError(f"block must be a positive integer, got {block!r}")
    if dtype not in DTYPES:
        raise GramError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not callable(kernel):
        raise GramError(f"kernel must be a block function (x1_block, x2_block) -> (b1, b2), got {kernel!r}")
    path = _check_path(path)
    symmetric = x2 is None
    x1 = _as_rows(x1, "x1")
    x2 = None if symmetric else _as_rows(x2, "x2")
    if x2 is not None and tuple(x2.shape[1:]) != tuple(x1.shape[1:]):
        raise GramError(f"x1 and x2 rows differ in shape: {tuple(x1.shape[1:])} vs {tuple(x2.shape[1:])}")
    n1 = int(x1.shape[0])
    n2 = n1 if symmetric else int(x2.shape[0])
    try:
        data_attrs = _jsonable(dict(attrs or {}))
    except (TypeError, ValueError) as exc:
        raise GramError(f"attrs must be a JSON-able mapping ({exc})") from None
    mode, get = _resolve_scheduler(scheduler)
    cores = _usable_cores()
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise GramError(f"workers must be a positive integer, got {workers!r}")
    workers = workers or cores
    # A resumed Gram keeps its own tile size and code path (they are part of its identity).
    stored = None if overwrite else _peek_gram(store, path)
    stored_gram = (stored or {}).get("gram") or {}
    if block is None:
        stored_block = stored_gram.get("block")
        if isinstance(stored_block, int) and stored_gram.get("shape") == [n1, n2]:
            block = stored_block
        else:
            block = choose_block(n1, None if symmetric else n2, 1 if mode == "sync" else workers,
                                 max_block=DEFAULT_BLOCK)
    block = int(block)
    nt1, nt2 = tile_grid(n1, n2, block)
    all_tiles = tile_pairs(nt1, nt2, symmetric=symmetric)
    if isinstance(kernel, AnalyticKernel):
        stored_impl = ((stored or {}).get("kernel") or {}).get("impl")
        if kernel.impl == "auto" and stored_impl in IMPLS and stored_impl != "auto":
            try:
                candidate = replace(kernel, impl=stored_impl)
            except ValueError:
                candidate = None
            if candidate is not None and kernel_spec(candidate) == stored.get("kernel"):
                kernel = candidate
        total_entries = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in
                            (tile_bounds(i, j, block, n1, n2) for i, j in all_tiles))
        kernel = kernel.resolved(total_entries)
    if torch_threads is None:
        torch_threads = 1 if mode == "ray" else max(1, cores // workers)

    inputs = {name: {"shape": list(v.shape), "dtype": str(np.dtype(v.dtype)), "blake2b": input_fingerprint(v)}
              for name, v in (("x1", x1), ("x2", x2)) if v is not None}
    identity = _jsonable({
        "gram": {"format": FORMAT_VERSION, "shape": [n1, n2], "block": block, "tiles": [nt1, nt2],
                 "dtype": dtype, "symmetric": symmetric},
        "kernel": kernel_spec(kernel),
        "inputs": inputs,
    })

    zstore = _open_store(store, create=True)
    where = _where(zstore, path)
    tiles_path = path + TILES_SUFFIX
    gram = _open_existing(zstore, path, where, mode="r+")
    markers = None
    if gram is not None and not overwrite:
        meta = _gram_attrs(gram, where)
        stored = {k: meta.get(k) for k in ("kernel", "inputs")}
        stored["gram"] = {k: meta["gram"].get(k) for k in identity["gram"]}
        diff = _first_difference(stored, identity)
        if diff:
            raise GramError(f"{where}: holds a different Gram, {diff}; use another path or overwrite")
        markers = _open_existing(zstore, tiles_path, _where(zstore, tiles_path), mode="r+")
        if markers is not None and tuple(markers.shape) != (nt1, nt2):
            markers = None
    if gram is None or overwrite:
        meta = dict(identity)
        meta["gram"] = dict(identity["gram"], compressor=_compressor_name(compressor), complete=False,
                            tiles_path=tiles_path)
        meta["data"] = data_attrs
        meta["software"] = {"torch": torch.__version__, "zarr": zarr.__version__, "dask": dask.__version__}
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        markers = zarr.create_array(
            zstore, name=tiles_path, shape=(nt1, nt2), chunks=(1, 1), dtype="uint8", fill_value=0,
            compressors=None, dimension_names=("tile_row", "tile_col"), overwrite=True,
            attributes={"gram_path": path, "meaning": "1 = tile (i, j) written (and mirrored)"},
        )
        gram = zarr.create_array(
            zstore, name=path, shape=(n1, n2), chunks=(block, block), dtype=dtype, fill_value=float("nan"),
            compressors=_compressor(compressor, np.dtype(dtype).itemsize), dimension_names=("row", "col"),
            attributes={ATTR_KEY: meta}, overwrite=True,
        )
    elif markers is None:
        markers = zarr.create_array(
            zstore, name=tiles_path, shape=(nt1, nt2), chunks=(1, 1), dtype="uint8", fill_value=0,
            compressors=None, dimension_names=("tile_row", "tile_col"), overwrite=True,
        )

    # Every tile is written whole: skip zarr's "is this chunk all fill value?" scan (a third of a write).
    gram = gram.with_config({"write_empty_chunks": True})
    markers = markers.with_config({"write_empty_chunks": True})
    done = _read_done(markers, (nt1, nt2))
    pending = [(i, j) for i, j in all_tiles if not done[i, j]]
    skipped = len(all_tiles) - len(pending)
    if max_tiles is not None:
        pending = pending[: max(0, int(max_tiles))]

    writer_key = None if mode == "ray" else uuid.uuid4().hex
    row_sq = None
    if pending and isinstance(kernel, AnalyticKernel) and (sq1 := kernel.row_squares(x1)) is not None:
        row_sq = (sq1, None if symmetric else kernel.row_squares(x2))
    job = _TileJob(kernel, gram, markers, n1, n2, block, symmetric, dtype, torch_threads, writer_key, row_sq)
    t_start = time.perf_counter()
    results: list[dict] = []
    io_seconds = 0.0
    if pending:
        token = identity["inputs"]["x1"]["blake2b"][:12]
        if writer_key is not None:
            # threads: two I/O threads, at most two tiles per worker waiting for the disk; sync (a sweep's
            # training task, whose memory the planner budgets): one I/O thread and one tile
            threaded = mode == "threads"
            _WRITERS[writer_key] = (ChunkWriter(gram, threads=2 if threaded else 1,
                                                max_pending=2 * workers if threaded else 1), ChunkWriter(markers))
        try:
            with (_WRITERS[writer_key][0] if writer_key else contextlib.nullcontext()) as writer:
                results = _execute(job, x1, x2, pending, mode, get, workers, torch_threads, progress,
                                   initial=skipped, total=len(all_tiles), token=token)
            io_seconds = writer.io_seconds if writer is not None else 0.0
        finally:
            _WRITERS.pop(writer_key, None)
    seconds = time.perf_counter() - t_start

    if skipped + len(pending) == len(all_tiles):
        if _read_done(markers, (nt1, nt2))[tuple(np.array(all_tiles).T)].all():
            meta = _gram_attrs(gram, where)
            if not meta["gram"].get("complete"):
                meta["gram"]["complete"] = True
                gram.update_attributes({ATTR_KEY: meta})
    stats: dict = {}
    for r in results:
        for k, v in r.items():
            stats[k] = stats.get(k, 0) + v
    stats.update(workers=workers if mode == "threads" else None, torch_threads=torch_threads, scheduler=mode,
                 io_s=io_seconds)
    return GramResult(
        store=str(getattr(zstore, "root", store)), path=path, shape=(n1, n2), block=block,
        tiles_total=len(all_tiles), tiles_skipped=skipped, tiles_computed=len(results), seconds=seconds,
        entries_written=int(stats.get("written", 0)), entries_computed=int(stats.get("entries", 0)),
        stats=stats,
    )


def _execute(
    job: _TileJob, x1: Any, x2: Any, pending: list, mode: str, get: Any, workers: int, torch_threads: int,
    progress: bool, *, initial: int, total: int, token: str,
) -> list[dict]:
    import dask
    from dask.callbacks import Callback
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, unit="tile", desc=f"gram {job.gram.path}", disable=not progress,
               smoothing=0.05)
    prefix = f"gram-tile-{token}-"
    try:
        if mode == "ray":
            import ray

            job_arg, x1_arg = ray.put(job), ray.put(x1) if isinstance(x1, np.ndarray) else x1
            x2_arg = ray.put(x2) if isinstance(x2, np.ndarray) else x2
        else:
            job_arg, x1_arg, x2_arg = job, x1, x2
        if mode in ("threads", "sync") and isinstance(job.kernel, AnalyticKernel):
            previous = torch.get_num_threads()
            torch.set_num_threads(torch_threads)
            job.kernel.warm_up()  # compile once here, with the worker thread count, not in a worker
        else:
            previous = None
        run = dask.delayed(_run_tile, pure=False)
        tasks = [run(job_arg, x1_arg, x2_arg, i, j, dask_key_name=f"{prefix}{i}-{j}") for i, j in pending]
        try:
            if mode == "ray":
                import ray

                refs = list(dask.compute(*tasks, scheduler=get, ray_persist=True))
                results = []
                while refs:
                    ready, refs = ray.wait(refs, num_returns=1)
                    results.extend(ray.get(ready))
                    bar.update(len(ready))
                return results

            class _Progress(Callback):
                def _posttask(self, key, result, dsk, state, worker_id):  # noqa: ARG002
                    if str(key).startswith(prefix):
                        bar.update(1)

            kwargs = {"num_workers": workers} if mode == "threads" else {}
            with _Progress():
                return list(dask.compute(*tasks, scheduler=get, **kwargs))
        finally:
            if previous is not None:
                torch.set_num_threads(previous)
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------- readers


def gram_status(store: Any, path: str = "gram") -> dict:
    """The Gram's attributes (:data:`ATTR_KEY`) plus ``tiles_done``/``tiles_total`` from the tile record."""
    path = _check_path(path)
    zstore = _open_store(store, create=False)
    where = _where(zstore, path)
    arr = _open_existing(zstore, path, where)
    if arr is None:
        raise GramError(f"{where}: no Gram there")
    meta = _gram_attrs(arr, where)
    nt1, nt2 = meta["gram"]["tiles"]
    markers = _open_existing(zstore, path + TILES_SUFFIX, _where(zstore, path + TILES_SUFFIX))
    done = np.zeros((nt1, nt2), dtype=bool) if markers is None else _read_done(markers, (nt1, nt2))
    if meta["gram"].get("symmetric"):
        done = np.triu(done)
        total = nt1 * (nt1 + 1) // 2
    else:
        total = nt1 * nt2
    return dict(meta, tiles_done=int(done.sum()), tiles_total=int(total))


def open_gram(store: Any, path: str = "gram", *, allow_incomplete: bool = False) -> Any:
    """The Gram at ``store``/``path`` as a lazy ``dask.array`` (chunks = tiles).

    Raises :class:`GramError` when the store or path is missing, unreadable or not a Gram, or when the Gram
    is incomplete (unless ``allow_incomplete``: then unwritten tiles read as NaN).
    """
    import dask.array as da

    path = _check_path(path)
    zstore = _open_store(store, create=False)
    where = _where(zstore, path)
    arr = _open_existing(zstore, path, where)
    if arr is None:
        raise GramError(f"{where}: no Gram there")
    meta = _gram_attrs(arr, where)
    if not meta["gram"].get("complete") and not allow_incomplete:
        status = gram_status(store, path)
        raise GramError(
            f"{where}: incomplete Gram ({status['tiles_done']}/{status['tiles_total']} tiles); "
            "re-run gram_to_zarr to finish it, or pass allow_incomplete=True"
        )
    if tuple(arr.shape) != tuple(meta["gram"]["shape"]):
        stated = meta["gram"]["shape"]
        raise GramError(f"{where}: array shape {arr.shape} differs from its attributes {stated}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return da.from_zarr(arr)
