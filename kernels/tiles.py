"""The one tiling of kernel matrices: row ranges, the tile grid, upper-triangle enumeration for symmetric
kernels, and the tile size chosen from ``N`` and the worker count.

:mod:`kernels.gram` (Zarr Grams) uses all of it; :mod:`kernels.empirical` can use :func:`ranges` for its
row panels and column chunks and :func:`tile_pairs` for its symmetric loop.

    ranges(10, 4)                       -> [(0, 4), (4, 8), (8, 10)]
    tile_grid(10, 7, 4)                 -> (3, 2)
    tile_pairs(3, 3, symmetric=True)    -> [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    tile_bounds(1, 2, 4, 10, 10)        -> (4, 8, 8, 10)
    choose_block(4000, workers=2)       -> 1472  (6 upper tiles for 2 workers, not 3 of 2048)

**Tile size.** With few tiles a worker idles: N = 4,000 with 2,048-row tiles gives 3 upper tiles for 2
workers, so one worker computes two of them while the other waits. :func:`choose_block` models each tile's
cost as its entries (off-diagonal tiles of a symmetric kernel weighted for their mirrored write) plus a fixed
per-tile overhead, schedules the costs longest-first on ``workers`` and picks the block (a multiple of
``align``, at most ``max_block``) with the shortest makespan; ties go to the larger block (fewer chunks). When
the largest block already gives many tiles per worker, it is kept without search.
"""

from __future__ import annotations

import heapq

MAX_BLOCK = 2048
ALIGN = 64
# Per-tile fixed cost, in entries: task dispatch, the chunk and marker writes' file operations (~6 % of a
# 2048 x 2048 tile; calibrated on N = 4,000 erf, 2 workers, interleaved runs: blocks 1,344-1,472 took
# 0.34-0.35 s against 0.37-0.39 s at 1,024 and 0.41 s at 2,048).
TILE_OVERHEAD_ENTRIES = 1 << 18
# An off-diagonal tile of a symmetric kernel also writes its transpose (the write is ~1/3 of a tile).
MIRROR_WEIGHT = 1.35
# At least this many tiles per worker at ``max_block``: keep it (the imbalance is then at most ~1/8 tile).
ENOUGH_TILES_PER_WORKER = 8


def ranges(n: int, size: int) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]`` covering ``range(n)`` in steps of ``size`` (the last one shorter)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def tile_grid(n1: int, n2: int, block: int) -> tuple[int, int]:
    """Tiles per side: ``(ceil(n1 / block), ceil(n2 / block))``."""
    return -(-n1 // block), -(-n2 // block)


def tile_pairs(nt1: int, nt2: int, *, symmetric: bool) -> list[tuple[int, int]]:
    """Tile indices ``(i, j)`` in row-major order; only ``i <= j`` when ``symmetric``."""
    return [(i, j) for i in range(nt1) for j in range(nt2) if not symmetric or i <= j]


def tile_bounds(i: int, j: int, block: int, n1: int, n2: int) -> tuple[int, int, int, int]:
    """Row and column bounds ``(r0, r1, c0, c1)`` of tile ``(i, j)``."""
    return i * block, min(n1, (i + 1) * block), j * block, min(n2, (j + 1) * block)


def tile_entries(i: int, j: int, block: int, n1: int, n2: int) -> int:
    r0, r1, c0, c1 = tile_bounds(i, j, block, n1, n2)
    return (r1 - r0) * (c1 - c0)


def tile_costs(n1: int, n2: int, block: int, *, symmetric: bool) -> list[float]:
    """The model cost of every tile (see the module docstring), in entries."""
    nt1, nt2 = tile_grid(n1, n2, block)
    return [tile_entries(i, j, block, n1, n2) * (MIRROR_WEIGHT if symmetric and i != j else 1.0)
            + TILE_OVERHEAD_ENTRIES for i, j in tile_pairs(nt1, nt2, symmetric=symmetric)]


def makespan(costs: list[float], workers: int) -> float:
    """Longest-first list scheduling of ``costs`` on ``workers``: the largest load."""
    loads = [0.0] * max(1, workers)
    for c in sorted(costs, reverse=True):
        heapq.heapreplace(loads, loads[0] + c)
    return max(loads)


def choose_block(n1: int, n2: int | None = None, workers: int = 1, *, max_block: int = MAX_BLOCK,
                 align: int = ALIGN) -> int:
    """The tile edge for an ``n1 x n2`` kernel (``n2=None``: symmetric ``n1 x n1``) on ``workers`` workers.

    Returns ``max_block`` when that already gives :data:`ENOUGH_TILES_PER_WORKER` tiles per worker,
    otherwise the multiple of ``align`` (or ``max_block``) with the shortest modelled makespan.
    """
    symmetric = n2 is None
    n2 = n1 if symmetric else n2
    workers = max(1, int(workers))
    if n1 < 1 or n2 < 1:
        raise ValueError(f"sizes must be >= 1, got {n1}, {n2}")
    nt1, nt2 = tile_grid(n1, n2, max_block)
    count = nt1 * (nt1 + 1) // 2 if symmetric else nt1 * nt2
    if workers == 1 or count >= ENOUGH_TILES_PER_WORKER * workers:
        return max_block
    candidates = sorted({max_block} | set(range(align, max_block, align)), reverse=True)
    best, best_span = max_block, float("inf")
    for block in candidates:
        if block < max(n1, n2) // 16:  # more than 16 tiles per side would have been enough already
            break
        span = makespan(tile_costs(n1, n2, block, symmetric=symmetric), workers)
        if span < best_span * (1 - 1e-9):
            best, best_span = block, span
    return best
