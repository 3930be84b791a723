"""Which runs belong together: the runs table split into groups (every config setting but seed and width)
and per-run arrays of widths, seeds, statuses and measures, as the aggregates and the report need them."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import UserError
from pipeline.run_config import RunConfig

# Config columns that do not define a group: seed and width vary within one; sweep, data_dir and device do
# not change a result; lr in a run row is the rate actually used, a measurement.
NOT_GROUPED = ("seed", "width", "lr", "sweep", "data_dir", "device")


@dataclass
class Runs:
    """The runs table split into what the aggregates need. ``groups``: one row per group (the group
    columns, their original types); ``group_ids``: a stable hash of each group's settings (the
    ``group_id`` column of the aggregates); ``gid``: per run, its group's row in ``groups``;
    ``width``, ``seed``, ``status``: per run; ``measures``: name -> float64 per run (NaN where missing)."""

    groups: pa.Table
    group_ids: list[str]
    gid: np.ndarray
    width: np.ndarray
    seed: np.ndarray
    status: np.ndarray
    measures: dict[str, np.ndarray]


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _as_float(column: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def split_runs(table: pa.Table) -> Runs:
    if "width" not in table.column_names:
        raise UserError("runs table: no 'width' column")
    config = set(RunConfig.model_fields)
    group_cols = [c for c in RunConfig.model_fields if c in table.column_names and c not in NOT_GROUPED]
    group_tbl = table.select(group_cols)
    if "dataset" in group_cols:  # a Hive partition column may come back dictionary-encoded
        group_tbl = group_tbl.set_column(group_cols.index("dataset"), "dataset",
                                         group_tbl.column("dataset").cast(pa.string()))
    settings = group_tbl.to_pylist()
    keys = [json.dumps(r, sort_keys=True, default=str) for r in settings]
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    # Groups in a stable order: by their settings (dataset, n_train, ..., depth, activation, ...).
    ordered = sorted(first, key=lambda k: tuple(_sort_key(v) for v in settings[first[k]].values()))
    ids = {k: g for g, k in enumerate(ordered)}
    gid = np.array([ids[k] for k in keys], dtype=np.int64)
    groups = group_tbl.take(pa.array([first[k] for k in ordered], pa.int64()))
    group_ids = [hashlib.sha256(k.encode()).hexdigest()[:12] for k in ordered]

    n = table.num_rows
    status = (np.array(table.column("status").to_pylist(), dtype=object) if "status" in table.column_names
              else np.full(n, "ok", dtype=object))
    seed = _as_float(table.column("seed")) if "seed" in table.column_names else np.zeros(n)
    measures: dict[str, np.ndarray] = {}
    for field in table.schema:
        name = field.name
        if name in config and name != "lr":
            continue
        if _numeric(field.type):
            measures[name] = _as_float(table.column(name))
        elif (pa.types.is_list(field.type) or pa.types.is_large_list(field.type)) and name.endswith("_by_layer") \
                and _numeric(field.type.value_type):
            lists = table.column(name).to_pylist()
            layers = max((len(v) for v in lists if v), default=0)
            stem = name[: -len("_by_layer")]
            for i in range(layers):
                measures[f"{stem}_layer{i}"] = np.array(
                    [float(v[i]) if v is not None and i < len(v) and v[i] is not None else math.nan for v in lists])
    if "agree_nn_lin_test" in measures and "disagree_nn_lin_test" not in measures:
        measures["disagree_nn_lin_test"] = 1.0 - measures["agree_nn_lin_test"]
    width = _as_float(table.column("width")).astype(np.int64)
    return Runs(groups=groups, group_ids=group_ids, gid=gid, width=width, seed=seed, status=status, measures=measures)


def _sort_key(value: Any) -> tuple:
    if value is None:
        return (2, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))



def with_groups(runs: Runs, gids: np.ndarray, cols: dict[str, pa.Array]) -> pa.Table:
    """The rows of ``cols`` (one per entry of ``gids``) after ``group_id`` and the group columns."""
    out = runs.groups.take(pa.array(gids, pa.int64()))
    out = out.add_column(0, "group_id", pa.array([runs.group_ids[g] for g in gids], pa.string()))
    for name, col in cols.items():
        out = out.append_column(name, col)
    return out
