"""The results directory: the one reader and the one writer of its Parquet parts, quarantine of parts
that do not read, and claims of the runs a sweep is running.

    RESULTS/
      sweeps/<sweep name>.yaml                       the resolved job of each sweep written here
      runs/dataset=<name>/part-<pack id>.parquet     one row per run (the commit record of a pack)
      curves/dataset=<name>/part-<pack id>.parquet   one row per (run, logged step)
      spectral/dataset=<name>/part-<pack id>.parquet one row per (run, logged step, eigen-band)
      outputs/dataset=<name>/part-<pack id>.parquet  one row per run: its outputs f(x; theta0) on the test points
      grams.zarr/empirical/<run_id>/{init,final}     empirical NTK over the run's train ++ test points
      quarantine/<table>/dataset=<name>/part-<pack id>[.<n>].parquet   parts that did not read, moved aside
      .claims/                                       which live sweep runs which run ids (see :class:`RunClaims`)

Writing. A pack's Grams, curves, spectral and outputs parts are written first and its ``runs`` part
last, each by temp file + rename, so a run is done exactly when a ``runs`` part holds its row. Side
parts whose pack has no ``runs`` part (a pack killed before its commit, or one being committed right
now) are not read; a re-run deletes them unless a live sweep has claimed their runs.

Reading (:meth:`ResultsStore.table`, :meth:`ResultsStore.scan`; every reader of the layout goes through
them: status, aggregates, queries, the report). A part that does not read is skipped with a one-line
warning on stderr naming it; the other parts and tables are served. Rows are de-duplicated by
``run_id``: a row whose ``status`` is not ``failed`` wins over a failed one, then the row of the
``runs`` part written last (mtime), then the larger part path; a side table keeps a run's rows from
the part of the pack whose ``runs`` row won. Duplicates arise only from a ``--retry-failed`` run
interrupted between committing the new rows and superseding the old ones (:meth:`supersede`).

Two sweeps can share a directory: part names are hashes of their run ids, job files are named by
sweep, and a sweep claims the runs it is about to run (:class:`RunClaims`), so two sweeps never run
the same run at once.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.atomic import write_bytes_atomic
from pipeline.errors import UserError

if TYPE_CHECKING:
    import pyarrow.dataset as ds

    from pipeline.results import RunResult
    from pipeline.run_config import RunConfig

RUNS, CURVES, SPECTRAL, OUTPUTS, SWEEPS, GRAMS = "runs", "curves", "spectral", "outputs", "sweeps", "grams.zarr"
AGGREGATES, QUARANTINE, REPORT, CLAIMS = "aggregates", "quarantine", "report", ".claims"
GP_SAMPLES = "gp_samples"  # gp_seeds: one row per (group, width), keyed by gp_id (pipeline.gp_sample)
PROBE = ".ntk-sweep-probe"
SIDE_TABLES = (CURVES, SPECTRAL, OUTPUTS)
TABLES = (RUNS, *SIDE_TABLES)
NOT_TABLES = (AGGREGATES, QUARANTINE, REPORT, SWEEPS)  # folders of RESULTS that hold no table of parts
FAILED = "failed"
READ_ERRORS = (OSError, pa.ArrowException, ValueError)  # what pyarrow raises for a part that does not read
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


# Columns that can be null in one part and typed in another: fix their types so parts always unify.
FIXED_TYPES = {
    "classes": pa.list_(pa.int64()), "data_dir": pa.string(), "batch_size": pa.int64(), "lr": pa.float64(),
    "lr_scale": pa.float64(), "error": pa.string(), "weight_rel_change_by_layer": pa.list_(pa.float64()),
    "f0_test": pa.list_(pa.float32()),
    "peak_rss_bytes": pa.int64(), "peak_gpu_bytes": pa.int64(), "analytic_peak_rss_bytes": pa.int64(),
}


def _table(rows: list[dict]) -> pa.Table:
    """Rows -> table, without the ``dataset`` column (the Hive partition folder carries it)."""
    rows = [{k: v for k, v in row.items() if k != "dataset"} for row in rows]
    inferred = pa.Table.from_pylist(rows).schema
    schema = pa.schema([pa.field(f.name, FIXED_TYPES.get(f.name, f.type)) for f in inferred])
    return pa.Table.from_pylist(rows, schema=schema)


def pack_id(run_ids: Iterable[str]) -> str:
    return hashlib.sha256(",".join(sorted(run_ids)).encode()).hexdigest()[:16]


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` through a temp file in the same folder and a rename."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes_atomic(path, sink.getvalue().to_pybytes())


def is_not_writable(exc: OSError) -> bool:
    """Whether ``exc`` says a place cannot be written (permission denied, read-only filesystem)."""
    return exc.errno in NOT_WRITABLE


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:300]


def _stat_key(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1, -1)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


# ----------------------------------------------------------------------------------------------
# Parts that do not read


@dataclass(frozen=True)
class BadPart:
    """A Parquet part that does not read: its table (``kind``), ``path``, why (``reason``, one line),
    and ``stat`` (inode, size, mtime) when it was found bad."""

    kind: str
    path: Path
    reason: str
    stat: tuple[int, int, int] = (-1, -1, -1)


def _bad(kind: str, path: Path, exc: BaseException) -> BadPart:
    return BadPart(kind, path, _one_line(exc), _stat_key(path))


_WARNED: set[tuple[str, tuple[int, int, int]]] = set()


def warn_bad_parts(bad: Iterable[BadPart]) -> None:
    """One line on stderr naming the parts of ``bad`` that this process has not named before."""
    new = []
    for b in bad:
        key = (str(b.path), b.stat)
        if key not in _WARNED:
            _WARNED.add(key)
            new.append(b)
    if not new:
        return
    many = len(new) > 1
    names = ", ".join(str(b.path) for b in new[:3]) + (f" and {len(new) - 3} more" if len(new) > 3 else "")
    print(f"warning: skipped {len(new)} unreadable Parquet part{'s' if many else ''}: {names} ({new[0].reason}); "
          f"re-running the sweep moves {'them' if many else 'it'} to quarantine/ and redoes "
          f"{'their' if many else 'its'} runs", file=sys.stderr, flush=True)


@dataclass
class RunsIndex:
    """What the ``runs`` parts hold. ``parts``: per readable part (its path relative to ``runs/``,
    e.g. ``dataset=digits/part-<pack>.parquet``) its path and run ids; ``winner``: per run id the part
    whose row wins (see the module docstring); ``status``: the winning row's status; ``bad``: the
    parts whose ``run_id`` column did not read."""

    parts: dict[str, tuple[Path, list[str]]] = field(default_factory=dict)
    winner: dict[str, str] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    bad: list[BadPart] = field(default_factory=list)

    def superseded(self, rel: str) -> bool:
        """Whether the part at ``rel`` holds a row that lost to another part's row."""
        return any(self.winner.get(i) != rel for i in self.parts[rel][1])

    def done(self, retry_failed: bool = False) -> set[str]:
        """The run ids with a row (``retry_failed``: but not those whose row says ``failed``)."""
        return {i for i, s in self.status.items() if not (retry_failed and s == FAILED)}

    def rels_of(self, run_ids: Iterable[str]) -> dict[str, set[str]]:
        """Per run id of ``run_ids`` that has rows: every part holding one of them."""
        ids = set(run_ids)
        out: dict[str, set[str]] = {}
        for rel, (_, held) in self.parts.items():
            for i in ids.intersection(held):
                out.setdefault(i, set()).add(rel)
        return out


class ResultsStore:
    """One results directory (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{self.root}: results path exists and is not a directory")
        self._index: tuple[tuple, RunsIndex] | None = None

    # -- layout
    def part_path(self, kind: str, dataset: str, pid: str) -> Path:
        return self.root / kind / f"dataset={dataset}" / f"part-{pid}.parquet"

    def parts(self, kind: str) -> list[Path]:
        """Every Parquet part of table ``kind`` on disk (``<kind>/<key>=<value>/*.parquet`` or
        ``<kind>/*.parquet``; temp files, which start with a dot, excluded)."""
        base = self.root / kind
        found = [*base.glob("*/*.parquet"), *base.glob("*.parquet")]
        return sorted(p for p in found if not p.name.startswith(".") and p.is_file())

    _parts = parts  # the former name

    def _rel(self, kind: str, path: Path) -> str:
        return path.relative_to(self.root / kind).as_posix()

    def kinds(self) -> list[str]:
        """The tables of this directory: ``runs``, ``curves``, ... and any other folder of parts."""
        if not self.root.is_dir():
            return []
        return [p.name for p in sorted(self.root.iterdir())
                if p.is_dir() and not p.name.startswith(".") and p.name not in NOT_TABLES
                and not p.name.endswith(".zarr") and self.parts(p.name)]

    # -- sweeps
    def _sweep_bytes(self, resolved: dict) -> bytes:
        return yaml.safe_dump(resolved, sort_keys=False).encode()

    def sweep_changed(self, name: str, resolved: dict) -> bool:
        """Whether ``sweeps/<name>.yaml`` is absent or differs from ``resolved``."""
        path = self.root / SWEEPS / f"{name}.yaml"
        try:
            return path.read_bytes() != self._sweep_bytes(resolved)
        except OSError:
            return True

    def write_sweep(self, name: str, resolved: dict) -> bool:
        """Write ``sweeps/<name>.yaml`` when it is absent or different. Returns whether it wrote."""
        if not self.sweep_changed(name, resolved):
            return False
        write_bytes_atomic(self.root / SWEEPS / f"{name}.yaml", self._sweep_bytes(resolved))
        return True

    def sweeps(self) -> dict[str, dict]:
        """Sweep name -> its resolved job. A job file that does not read is a one-line UserError."""
        out = {}
        for p in sorted((self.root / SWEEPS).glob("*.yaml")):
            try:
                out[p.stem] = yaml.safe_load(p.read_text())
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise UserError(f"{p}: unreadable sweep file ({_one_line(exc)}); delete it and re-run its "
                                "sweep to write it again") from None
        return out

    def check_writable(self) -> None:
        """Raise a one-line :class:`UserError` if the results directory (or, before it exists, the
        folder it would be made in) or one of its table folders cannot be written. Leaves nothing."""
        import tempfile

        target = self.root
        while not target.exists() and target.parent != target:
            target = target.parent
        folders = [target]
        if target == self.root:
            folders += [p for p in (self.root / k for k in (*TABLES, SWEEPS, CLAIMS, QUARANTINE)) if p.is_dir()]
        for folder in folders:
            try:
                fd, name = tempfile.mkstemp(prefix=".ntk-sweep-write-check-", dir=folder)
                os.close(fd)
                os.unlink(name)
            except OSError as exc:
                raise UserError(f"{self.root}: the results directory cannot be written ({folder}: "
                                f"{exc.strerror or exc}); give a writable --out") from None

    # -- reading
    def runs_index(self) -> RunsIndex:
        """Read the ``run_id`` and ``status`` columns of every ``runs`` part (see :class:`RunsIndex`);
        read again only when a part was added, removed or changed (name, size, mtime) since."""
        paths = self.parts(RUNS)
        key = tuple((str(p), *_stat_key(p)) for p in paths)
        if self._index is not None and self._index[0] == key:
            return self._index[1]
        index = RunsIndex()
        best: dict[str, tuple[tuple[bool, int, str], str]] = {}
        for path in paths:
            rel = self._rel(RUNS, path)
            try:
                names = pq.read_schema(path).names
                if "run_id" not in names:
                    raise ValueError("no run_id column")
                cols = ["run_id", "status"] if "status" in names else ["run_id"]
                table = pq.read_table(path, columns=cols)
                mtime = path.stat().st_mtime_ns
            except READ_ERRORS as exc:
                index.bad.append(_bad(RUNS, path, exc))
                continue
            ids = table.column("run_id").to_pylist()
            statuses = table.column("status").to_pylist() if "status" in cols else ["ok"] * len(ids)
            index.parts[rel] = (path, ids)
            for rid, status in zip(ids, statuses, strict=True):
                rank = (status != FAILED, mtime, rel)
                if rid not in best or rank > best[rid][0]:
                    best[rid] = (rank, status)
        index.winner = {rid: rank[2] for rid, (rank, _) in best.items()}
        index.status = {rid: status for rid, (_, status) in best.items()}
        self._index = (key, index)
        return index

    def done_run_ids(self, retry_failed: bool = False) -> set[str]:
        """Run ids with a row in a readable ``runs`` part (``retry_failed``: not counting failed ones)."""
        return self.runs_index().done(retry_failed)

    def _read_part(self, kind: str, path: Path) -> pa.Table:
        """One part, with its Hive partition columns (``dataset``) from its folder names, as strings."""
        table = pq.read_table(path)
        for folder in path.relative_to(self.root / kind).parts[:-1]:
            key, sep, value = folder.partition("=")
            if sep and key not in table.column_names:
                table = table.append_column(key, pa.array([value] * table.num_rows, pa.string()))
        return table

    def _selection(self, kind: str, index: RunsIndex | None) -> list[tuple[Path, str | None]]:
        """The parts of ``kind`` that a reader reads, each with the part (relative path) whose
        winning rows it keeps, or None to keep all its rows. A side part is read only when its
        pack's ``runs`` part reads (the pack is committed)."""
        if index is None:
            return [(p, None) for p in self.parts(kind)]
        if kind == RUNS:
            return [(p, rel if index.superseded(rel) else None) for rel, (p, _) in sorted(index.parts.items())]
        out = []
        for path in self.parts(kind):
            rel = self._rel(kind, path)
            if rel in index.parts:
                out.append((path, rel if index.superseded(rel) else None))
        return out

    def table(self, kind: str = RUNS, *, warn: bool = True, bad: list[BadPart] | None = None) -> pa.Table:
        """One table (``runs``, ``curves``, ``spectral``, ``outputs``, or any other folder of parts)
        from all its parts that read, ``dataset`` from the partition folders, rows de-duplicated by
        ``run_id`` (module docstring). Parts that do not read are skipped, named on stderr (``warn``)
        and appended to ``bad`` when given. An empty table (no columns) when there is no part."""
        index = self.runs_index() if kind in TABLES else None
        bad = bad if bad is not None else []
        bad.extend(index.bad if index else [])
        tables = []
        for path, keep in self._selection(kind, index):
            try:
                table = self._read_part(kind, path)
            except READ_ERRORS as exc:
                bad.append(_bad(kind, path, exc))
                continue
            if keep is not None and index is not None:
                ids = table.column("run_id").to_pylist()
                table = table.filter(pa.array([index.winner.get(i) == keep for i in ids], pa.bool_()))
            tables.append(table)
        if warn:
            warn_bad_parts(bad)
        if not tables:
            return pa.table({})
        return pa.concat_tables(tables, promote_options="permissive")

    def scan(self, kind: str, *, bad: list[BadPart] | None = None) -> pa.Table | ds.Dataset | None:
        """Table ``kind`` for a query engine: a lazy pyarrow dataset over its parts whose footers read
        (read when queried), or, when rows must be de-duplicated, the table itself. None: no part.
        Parts that do not read are appended to ``bad``, or, without it, named on stderr."""

        found: list[BadPart] = []
        source = self._scan(kind, found)
        if bad is None:
            warn_bad_parts(found)
        else:
            bad.extend(found)
        return source

    def _scan(self, kind: str, bad: list[BadPart]) -> pa.Table | ds.Dataset | None:
        import pyarrow.dataset as ds

        index = self.runs_index() if kind in TABLES else None
        selection = self._selection(kind, index)
        if any(keep is not None for _, keep in selection):
            table = self.table(kind, warn=False, bad=bad)
            return table if table.num_columns else None
        bad.extend(index.bad if index else [])
        paths, schemas, keys = [], [], []
        for path, _ in selection:
            try:
                schemas.append(pq.read_schema(path))
            except READ_ERRORS as exc:
                bad.append(_bad(kind, path, exc))
                continue
            paths.append(str(path))
            for folder in path.relative_to(self.root / kind).parts[:-1]:
                key, sep, _ = folder.partition("=")
                if sep and key not in keys:
                    keys.append(key)
        if not paths:
            return None
        schema = pa.unify_schemas(schemas, promote_options="permissive")
        keys = [k for k in keys if k not in schema.names]
        schema = pa.schema([*schema, *(pa.field(k, pa.string()) for k in keys)])
        partitioning = ds.partitioning(pa.schema([(k, pa.string()) for k in keys]), flavor="hive") if keys else None
        return ds.dataset(paths, format="parquet", schema=schema, partitioning=partitioning,
                          partition_base_dir=str(self.root / kind))

    def scan_file(self, path: Path, *, bad: list[BadPart] | None = None) -> ds.Dataset | None:
        """One Parquet file of this directory (e.g. a stored aggregate) as a lazy pyarrow dataset, or
        None when its footer does not read (appended to ``bad``, or without it named on stderr)."""
        import pyarrow.dataset as ds

        try:
            pq.read_schema(path)
        except READ_ERRORS as exc:
            found = [_bad(AGGREGATES, path, exc)]
            bad.extend(found) if bad is not None else warn_bad_parts(found)
            return None
        return ds.dataset(str(path), format="parquet")

    # -- parts that do not read: found, and moved aside by a re-run
    def unreadable_parts(self) -> list[BadPart]:
        """Every part of ``runs``, ``curves``, ``spectral``, ``outputs`` that does not read in full."""
        bad = []
        for kind in TABLES:
            for path in self.parts(kind):
                try:
                    pq.read_table(path)
                except READ_ERRORS as exc:
                    bad.append(_bad(kind, path, exc))
        return bad

    def redo_run_ids(self, bad: Iterable[BadPart], index: RunsIndex) -> set[str]:
        """The run ids of the packs with a bad side part whose ``runs`` part reads: quarantining the
        pack uncommits them, so they are run again."""
        ids: set[str] = set()
        for b in bad:
            rel = self._rel(b.kind, b.path)
            if b.kind != RUNS and rel in index.parts:
                ids.update(index.parts[rel][1])
        return ids

    def quarantine(self, bad: Iterable[BadPart]) -> list[Path]:
        """Move every part of each pack that has a part in ``bad`` to ``quarantine/<table>/<its path
        under the table>`` (``.1``, ``.2``, ... before ``.parquet`` if that is taken): the ``runs``
        part first, so the pack is uncommitted before its side parts go. A bad part that changed
        since it was found bad (rewritten meanwhile) is left, with its pack. Returns the new paths."""
        bad = list(bad)
        by_rel: dict[str, list[BadPart]] = {}
        for b in bad:
            by_rel.setdefault(self._rel(b.kind, b.path), []).append(b)
        moved = []
        for rel, parts in sorted(by_rel.items()):
            if any(_stat_key(b.path) != b.stat for b in parts):
                continue
            for kind in TABLES:
                src = self.root / kind / rel
                if not src.is_file():
                    continue
                dest = self.root / QUARANTINE / kind / rel
                n = 0
                while dest.exists():
                    n += 1
                    dest = dest.with_name(f"{Path(rel).stem}.{n}.parquet")
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.rename(src, dest)
                moved.append(dest)
        return moved

    def remove_orphans(self, claims: RunClaims | None = None) -> int:
        """Delete side parts whose pack has no ``runs`` part (killed before its commit), except those
        holding a run that a live sweep other than ``claims``' own has claimed: that sweep is
        committing the pack right now. Call inside ``claims.locked()``. Returns how many."""
        committed = {self._rel(RUNS, p) for p in self.parts(RUNS)}
        removed = 0
        for kind in SIDE_TABLES:
            for path in self.parts(kind):
                if self._rel(kind, path) in committed:
                    continue
                if claims is not None:
                    try:
                        ids = pq.read_table(path, columns=["run_id"]).column("run_id").to_pylist()
                    except READ_ERRORS:
                        ids = []
                    if claims.held_elsewhere(ids):
                        continue
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # -- writing a finished pack
    def write_pack(self, results: list[RunResult]) -> Path:
        """Side tables (curves, spectral, outputs), then the runs part (the commit). Returns the runs part
        path. The pack's Grams were written before, by the task that computed them (:class:`GramWriter`).
        A side part of the same pack left by an earlier attempt, with no rows now, is deleted first."""
        if not results:
            raise ValueError("write_pack needs at least one result")
        dataset = results[0].config.dataset
        pid = pack_id(r.run_id for r in results)
        side = {
            CURVES: [{"run_id": r.run_id, **{k: v[i] for k, v in r.curves.items()}}
                     for r in results for i in range(len(r.curves.get("step", [])))],
            SPECTRAL: [{"run_id": r.run_id, **{k: v[i] for k, v in r.spectral.items()}}
                       for r in results for i in range(len(r.spectral.get("step", [])))],
            OUTPUTS: [{"run_id": r.run_id, "n_test": r.f0_test.shape[0], "k": r.f0_test.shape[1],
                       "f0_test": r.f0_test.reshape(-1).tolist()} for r in results if r.f0_test is not None],
        }
        for kind, rows in side.items():
            if rows:
                write_parquet_atomic(_table(rows), self.part_path(kind, dataset, pid))
            else:
                self.part_path(kind, dataset, pid).unlink(missing_ok=True)
        runs_path = self.part_path(RUNS, dataset, pid)
        write_parquet_atomic(_table([r.row() for r in results]), runs_path)
        return runs_path

    def supersede(self, run_ids: Iterable[str], keep: Path, rels: Iterable[str]) -> int:
        """Drop the rows of ``run_ids`` from the packs at ``rels`` (paths relative to the table
        folders) but the one whose ``runs`` part is ``keep``: side parts first, the ``runs`` part
        last; a part left empty is deleted. For a retried run whose new pack has committed (until
        this runs, reads prefer its rows anyway). Returns how many parts changed."""
        import pyarrow.compute as pc

        ids = pa.array(sorted(set(run_ids)), pa.string())
        keep_rel = self._rel(RUNS, keep)
        changed = 0
        for rel in sorted(set(rels) - {keep_rel}):
            for kind in (*SIDE_TABLES, RUNS):
                path = self.root / kind / rel
                try:
                    table = pq.read_table(path)
                except FileNotFoundError:
                    continue
                kept = table.filter(pc.invert(pc.is_in(table.column("run_id"), value_set=ids)))
                if kept.num_rows == table.num_rows:
                    continue
                if kept.num_rows:
                    write_parquet_atomic(kept, path)
                else:
                    path.unlink(missing_ok=True)
                changed += 1
        return changed

    # -- Grams
    def probe_token(self) -> str:
        """Write (once) a marker file that a worker checks before it writes Grams here: a worker that
        does not see it is on a node where this results directory is some other, local folder."""
        probe = self.root / PROBE
        if not probe.is_file():
            write_bytes_atomic(probe, uuid.uuid4().hex.encode())
        return probe.read_text()

    def read_array(self, path: str) -> np.ndarray:
        import zarr

        try:
            return zarr.open_array(str(self.root / GRAMS / path), mode="r")[...]
        except (FileNotFoundError, KeyError) as exc:
            raise UserError(f"{self.root / GRAMS}: no array at {path!r}") from exc


class RunClaims:
    """Claims on run ids in one results directory, so that two sweeps never run the same run at once.

    ``RESULTS/.claims/<run_id>`` (created with ``O_EXCL``) names the sweep process that runs it. That
    process holds an exclusive ``flock`` on ``RESULTS/.claims/owner-<id>.lock`` as long as it lives,
    so a claim is live exactly while its owner's lock is held: the kernel releases the lock however
    the process ends (``kill -9`` included), and the next sweep takes a dead sweep's claims over at
    once, with no timeout. Claims are taken (and owners probed) only under ``RESULTS/.claims/.lock``,
    and the caller re-reads what is committed under it (:meth:`ResultsStore.runs_index`): a sweep
    commits a pack before it drops the pack's claims, so a run is never claimed after its commit
    unseen. ``flock`` holds across processes on one machine and, on NFSv4, across machines (Linux
    maps it to POSIX byte-range locks there).
    """

    def __init__(self, store: ResultsStore) -> None:
        self.dir = store.root / CLAIMS
        self.owner = uuid.uuid4().hex
        self.held: set[str] = set()
        self._owner_fd: int | None = None
        self._alive: dict[str, bool] = {}

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the results directory's claims lock (blocking until it is free)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._alive = {}
            yield
        finally:
            os.close(fd)

    def _owner_path(self, owner: str) -> Path:
        return self.dir / f"owner-{owner}.lock"

    def _is_alive(self, owner: str) -> bool:
        if owner == self.owner:
            return True
        if owner not in self._alive:
            try:
                fd = os.open(self._owner_path(owner), os.O_RDWR)
            except (FileNotFoundError, ValueError):
                self._alive[owner] = False
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._alive[owner] = True
            else:  # its process is gone: nobody holds this lock again
                self._alive[owner] = False
                self._owner_path(owner).unlink(missing_ok=True)
            finally:
                os.close(fd)
        return self._alive[owner]

    def _owner_of(self, run_id: str) -> str:
        try:
            return (self.dir / run_id).read_text().strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return ""

    def claim(self, run_ids: Iterable[str]) -> set[str]:
        """Claim ``run_ids`` (inside :meth:`locked`): each one free or left by a dead sweep becomes
        this process's. Returns the ones it holds; the others are a live sweep's."""
        if self._owner_fd is None:
            fd = os.open(self._owner_path(self.owner), os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"pid {os.getpid()}\n".encode())
            self._owner_fd = fd
        ids = list(run_ids)
        for rid in ids:
            path = self.dir / rid
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner_of(rid)
                if owner and self._is_alive(owner):
                    if owner == self.owner:
                        self.held.add(rid)
                    continue
                write_bytes_atomic(path, self.owner.encode())  # taken over from a dead sweep
            else:
                with os.fdopen(fd, "w") as fh:
                    fh.write(self.owner)
            self.held.add(rid)
        return self.held.intersection(ids)

    def held_elsewhere(self, run_ids: Iterable[str]) -> set[str]:
        """The run ids of ``run_ids`` claimed by a live sweep other than this one (inside :meth:`locked`)."""
        out = set()
        for rid in run_ids:
            owner = self._owner_of(rid)
            if owner and owner != self.owner and self._is_alive(owner):
                out.add(rid)
        return out

    def release(self, run_ids: Iterable[str]) -> None:
        """Drop this process's claims on ``run_ids`` (after their pack committed, or was lost)."""
        for rid in set(run_ids) & self.held:
            (self.dir / rid).unlink(missing_ok=True)
            self.held.discard(rid)

    def close(self) -> None:
        """Drop every claim of this process and its owner lock."""
        self.release(list(self.held))
        if self._owner_fd is not None:
            self._owner_path(self.owner).unlink(missing_ok=True)
            os.close(self._owner_fd)
            self._owner_fd = None


class ResultsNotShared(RuntimeError):
    """A worker does not see the driver's results directory (it is not on a shared filesystem)."""


def nngp_test_path(config: RunConfig) -> str:
    """Where in ``grams.zarr`` the analytic NNGP on a run's test points lies: one array per (subset,
    architecture), named by a hash of the fields it depends on (the data directory and width do not
    matter: the NNGP of an MLP does not depend on the width in any parameterisation here)."""
    fields = dict(dataset=config.dataset, n_train=config.n_train, n_test=config.n_test,
                  classes=list(config.classes) if config.classes else None, preprocess=config.preprocess,
                  label_noise=config.label_noise, data_seed=config.data_seed, depth=config.depth,
                  activation=config.canonical()["activation"], w_std=config.w_std, b_std=config.b_std)
    key = hashlib.sha256(yaml.safe_dump(fields, sort_keys=True).encode()).hexdigest()[:16]
    return f"limits/{key}/nngp_test"


class GramWriter:
    """Writes a run's empirical NTK Grams into ``RESULTS/grams.zarr/empirical/<run_id>/{init,final}`` with
    :func:`kernels.gram.gram_to_zarr` (its layout, tiles and attributes: the project's one Zarr convention),
    in the process that trained the run, so no Gram passes through the driver. Picklable: Ray ships it to
    the task. ``probe``: the token of :meth:`ResultsStore.probe_token`; the first write checks that this
    node sees it, i.e. that the results directory is the same (shared) folder here as on the driver."""

    def __init__(self, root: str | Path, store: str, probe: str | None = None) -> None:
        self.root, self.store, self.probe = str(root), store, probe
        self._checked = probe is None

    def sees_results(self) -> bool:
        """Whether this node sees the driver's probe, i.e. the driver's results directory."""
        if self.probe is None:
            return True
        probe = Path(self.root) / PROBE
        return probe.is_file() and probe.read_text() == self.probe

    def check(self) -> None:
        """Raise :class:`ResultsNotShared` if this node does not see the driver's probe (once per task; no-op
        when the job stores no Grams)."""
        import socket

        if self._checked or self.store == "none":
            return
        if not self.sees_results():
            raise ResultsNotShared(f"results directory {self.root} on node {socket.gethostname()} is not the "
                                   "driver's: the workers write the Grams there, so it must be a path that every "
                                   "node sees (a shared filesystem)")
        self._checked = True

    def write_nngp_test(self, config: RunConfig, x_test: np.ndarray) -> None:
        """Write the analytic NNGP on a run's test points, ``(m, m)`` float64, at :func:`nngp_test_path`:
        what the outputs at init are compared with (:mod:`pipeline.gp_init`), stored once per subset and
        architecture by the task that computes the run's limits, so reading results never recomputes it.

        A job that stores no Grams may run where the workers do not see the results directory: there the
        block is not written (``gp_init`` then names those groups); otherwise that stops the sweep, as for
        the Grams."""
        if not self.sees_results():
            self.check()
            return
        import torch

        from kernels.gram import AnalyticKernel, gram_to_zarr

        k = config.kernel_args()
        kernel = AnalyticKernel(kind="nngp", depth=k["depth"], activation=k["activation"], w_std=k["w_std"],
                                b_std=k["b_std"], dtype="float64", impl="generic")
        attrs = {"kernel": "nngp", "dataset": config.dataset, "n_test": config.n_test,
                 "preprocess": config.preprocess, "data_seed": config.data_seed,
                 "classes": list(config.classes) if config.classes else None, "points": f"test[:{config.n_test}]"}
        gram_to_zarr(kernel, np.asarray(x_test, dtype=np.float64), store=str(Path(self.root) / GRAMS),
                     path=nngp_test_path(config), dtype="float64", attrs=attrs, overwrite=True, scheduler="sync",
                     progress=False, workers=1, torch_threads=torch.get_num_threads())

    def __call__(self, result: RunResult, model0, model_t, x_all) -> None:
        """Write ``init`` (and ``final`` when the job stores it and the run did not diverge). Each Gram is
        computed again here, tile by tile: the run's measurements formed it in row panels and kept none."""
        if self.store == "none":
            return
        self.check()
        import torch

        from kernels.gram import ModelNTK, gram_to_zarr

        c = result.config
        x = x_all.detach().cpu().numpy() if hasattr(x_all, "detach") else np.asarray(x_all)
        attrs = {"run_id": c.run_id, "kernel": "empirical_ntk", "trace": "mean over outputs",
                 "dataset": c.dataset, "n_train": c.n_train, "n_test": c.n_test, "preprocess": c.preprocess,
                 "data_seed": c.data_seed, "classes": list(c.classes) if c.classes else None,
                 "points": f"train[:{c.n_train}] ++ test[:{c.n_test}]"}
        grams = [("init", model0)] + ([("final", model_t)] if self.store == "init+final" and model_t else [])
        for when, model in grams:
            gram_to_zarr(ModelNTK(model), x, store=str(Path(self.root) / GRAMS), path=f"empirical/{c.run_id}/{when}",
                         attrs={**attrs, "time": when}, overwrite=True, scheduler="sync", progress=False,
                         workers=1, torch_threads=torch.get_num_threads())
