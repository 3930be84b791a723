"""The results directory: atomic Parquet parts, Zarr Grams, and what is already done.

    RESULTS/
      sweeps/<sweep name>.yaml                       the resolved job of each sweep written here
      runs/dataset=<name>/part-<pack id>.parquet     one row per run (the commit record of a pack)
      curves/dataset=<name>/part-<pack id>.parquet   one row per (run, logged step)
      spectral/dataset=<name>/part-<pack id>.parquet one row per (run, logged step, eigen-band)
      outputs/dataset=<name>/part-<pack id>.parquet  one row per run: its outputs f(x; theta0) on the test points
      grams.zarr/empirical/<run_id>/{init,final}     empirical NTK over the run's train ++ test points
      grams.zarr/analytic/<subset key>-<arch key>/{nngp,ntk}

A pack's Grams, curves, spectral and outputs parts are written first and its ``runs`` part last,
each by temp file + rename, so a run is done exactly when a ``runs`` part holds its row. A re-run
skips those run ids; side parts left by a pack killed before its ``runs`` part are deleted first. Two sweeps can
share a directory: part names are hashes of their run ids and job files are named by sweep.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.errors import UserError
from pipeline.train import RunResult

RUNS, CURVES, SPECTRAL, OUTPUTS, SWEEPS, GRAMS = "runs", "curves", "spectral", "outputs", "sweeps", "grams.zarr"
PROBE = ".ntk-sweep-probe"
SIDE_TABLES = (CURVES, SPECTRAL, OUTPUTS)


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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` through a temp file in the same folder and a rename."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    _atomic_write_bytes(path, sink.getvalue().to_pybytes())


class ResultsStore:
    """One results directory (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{self.root}: results path exists and is not a directory")

    # -- layout
    def part_path(self, kind: str, dataset: str, pid: str) -> Path:
        return self.root / kind / f"dataset={dataset}" / f"part-{pid}.parquet"

    def _parts(self, kind: str) -> list[Path]:
        return sorted((self.root / kind).glob("dataset=*/part-*.parquet"))

    # -- sweeps
    def write_sweep(self, name: str, resolved: dict) -> None:
        _atomic_write_bytes(self.root / SWEEPS / f"{name}.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())

    def sweeps(self) -> dict[str, dict]:
        return {p.stem: yaml.safe_load(p.read_text()) for p in sorted((self.root / SWEEPS).glob("*.yaml"))}

    # -- what is done
    def done_run_ids(self) -> set[str]:
        done: set[str] = set()
        for part in self._parts(RUNS):
            done.update(pq.read_table(part, columns=["run_id"]).column("run_id").to_pylist())
        return done

    def remove_orphans(self) -> int:
        """Delete side-table parts whose pack never committed its runs part. Returns how many."""
        committed = {p.relative_to(self.root / RUNS) for p in self._parts(RUNS)}
        orphans = [p for kind in SIDE_TABLES for p in self._parts(kind)
                   if p.relative_to(self.root / kind) not in committed]
        for p in orphans:
            p.unlink(missing_ok=True)
        return len(orphans)

    # -- writing a finished pack
    def write_pack(self, results: list[RunResult]) -> Path:
        """Side tables (curves, spectral, outputs), then the runs part (the commit). Returns the runs part
        path. The pack's Grams were written before, by the task that computed them (:class:`GramWriter`)."""
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
        runs_path = self.part_path(RUNS, dataset, pid)
        write_parquet_atomic(_table([r.row() for r in results]), runs_path)
        return runs_path

    # -- Grams
    def probe_token(self) -> str:
        """Write (once) a marker file that a worker checks before it writes Grams here: a worker that
        does not see it is on a node where this results directory is some other, local folder."""
        probe = self.root / PROBE
        if not probe.is_file():
            _atomic_write_bytes(probe, uuid.uuid4().hex.encode())
        return probe.read_text()

    def read_array(self, path: str) -> np.ndarray:
        import zarr

        try:
            return zarr.open_array(str(self.root / GRAMS / path), mode="r")[...]
        except (FileNotFoundError, KeyError) as exc:
            raise UserError(f"{self.root / GRAMS}: no array at {path!r}") from exc

    # -- reading
    def table(self, kind: str = RUNS) -> pa.Table:
        """One table (``runs``, ``curves``, ``spectral``, ``outputs``) from all its parts, with
        ``dataset`` from the partition folders."""
        import pyarrow.dataset as ds

        parts = self._parts(kind)
        if not parts:
            return pa.table({})
        # Parts written by newer code may carry more columns: read with the union of all schemas.
        schema = pa.unify_schemas([pq.read_schema(p) for p in parts])
        partitioning = ds.partitioning(pa.schema([("dataset", pa.string())]), flavor="hive")
        schema = schema.append(pa.field("dataset", pa.string())) if "dataset" not in schema.names else schema
        return ds.dataset(parts, format="parquet", partitioning=partitioning, schema=schema,
                          partition_base_dir=str(self.root / kind)).to_table()


class ResultsNotShared(RuntimeError):
    """A worker does not see the driver's results directory (it is not on a shared filesystem)."""


class GramWriter:
    """Writes a run's empirical NTK Grams into ``RESULTS/grams.zarr/empirical/<run_id>/{init,final}`` with
    :func:`kernels.gram.gram_to_zarr` (its layout, tiles and attributes: the project's one Zarr convention),
    in the process that trained the run, so no Gram passes through the driver. Picklable: Ray ships it to
    the task. ``probe``: the token of :meth:`ResultsStore.probe_token`; the first write checks that this
    node sees it, i.e. that the results directory is the same (shared) folder here as on the driver."""

    def __init__(self, root: str | Path, store: str, probe: str | None = None) -> None:
        self.root, self.store, self.probe = str(root), store, probe
        self._checked = probe is None

    def check(self) -> None:
        """Raise :class:`ResultsNotShared` if this node does not see the driver's probe (no-op when the
        job stores no Grams)."""
        import socket

        if self._checked or self.store == "none":
            return
        probe = Path(self.root) / PROBE
        seen = probe.read_text() if probe.is_file() else None
        if seen != self.probe:
            raise ResultsNotShared(f"results directory {self.root} on node {socket.gethostname()} is not the "
                                   "driver's: the workers write the Grams there, so it must be a path that every "
                                   "node sees (a shared filesystem)")
        self._checked = True

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
