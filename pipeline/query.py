"""SQL over a results directory (DuckDB), from Python and from ``ntk-sweep query``.

Views, one per table that exists:

    runs       RESULTS/runs/*/*.parquet       one row per run (``dataset`` from the Hive folder)
    curves     RESULTS/curves/*/*.parquet     one row per (run_id, logged step)
    by_width   RESULTS/aggregates/by_width.parquet   (see :mod:`pipeline.aggregate`)
    scaling    RESULTS/aggregates/scaling.parquet
    gp_init    RESULTS/aggregates/gp_init.parquet    (see :mod:`pipeline.gp_init`)
    spectral   RESULTS/spectral/*/*.parquet   residual energy per NTK eigen-band per logged step
    <name>     any other RESULTS/<name>/ folder of Parquet parts, and RESULTS/aggregates/<name>.parquet

The aggregates are recomputed first when the runs changed and the SQL names one of them. Parts
whose columns differ (a column added later) are read by name (``union_by_name``).

From Python::

    from pipeline import query
    df = query.query("results/quick", "SELECT width, mean FROM by_width WHERE measure = 'kernel_rel_dev_init'")

The module itself is callable too, ``pipeline.query(results, sql)`` (the same function), so that it
can be re-exported from the package without shadowing this module.

Keep this module light: ``ntk-sweep --help`` imports it; duckdb and pandas load inside functions.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
from pathlib import Path

from pipeline.errors import UserError

AGGREGATES = ("by_width", "scaling", "gp_init")
CORE_TABLES = ("runs", "curves", *AGGREGATES)
FORMATS = ("table", "csv", "json", "parquet")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _sql_str(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def table_sources(results: str | Path) -> dict[str, str]:
    """View name -> DuckDB ``read_parquet(...)`` expression, for every table present in ``results``."""
    root = Path(results)
    sources: dict[str, str] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name == "aggregates" or folder.name.endswith(".zarr") or not _IDENT.match(folder.name):
            continue
        if any(folder.glob("*/*.parquet")):  # Hive-partitioned parts: RESULTS/<name>/<key>=<value>/*.parquet
            glob = _sql_str(folder / "*" / "*.parquet")
            sources[folder.name] = f"read_parquet({glob}, hive_partitioning = true, union_by_name = true)"
        elif any(folder.glob("*.parquet")):
            sources[folder.name] = f"read_parquet({_sql_str(folder / '*.parquet')}, union_by_name = true)"
    for path in sorted((root / "aggregates").glob("*.parquet")):
        if _IDENT.match(path.stem) and path.stem not in sources:
            sources[path.stem] = f"read_parquet({_sql_str(path)})"
    return sources


def _mentions(sql: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"\b{n}\b", sql, flags=re.IGNORECASE) for n in names)


def connect(results: str | Path, *, refresh: bool = True):
    """An in-memory DuckDB connection with a view per table of ``results`` (see the module docstring).
    ``refresh``: recompute stale aggregates first (when there are runs)."""
    import duckdb

    from pipeline import aggregate

    root = Path(results)
    if not root.is_dir():
        raise UserError(f"{root}: not a results directory")
    if refresh and aggregate.runs_parts(root):
        aggregate.ensure_aggregates(root)
    con = duckdb.connect(":memory:")
    for name, source in table_sources(root).items():
        con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM {source}')
    return con


def query(results: str | Path, sql: str, *, refresh: bool = True):
    """Run ``sql`` (DuckDB dialect) over the tables of ``results``; returns a pandas DataFrame.

    Raises :class:`UserError` for a missing results directory, a table that does not exist (yet),
    or any SQL error (with DuckDB's message). ``refresh``: recompute stale aggregates first if the
    SQL names one of the aggregates (``by_width``, ``scaling``, ``gp_init``).
    """
    import duckdb

    root = Path(results)
    if not sql or not sql.strip():
        raise UserError("query: empty SQL")
    con = connect(root, refresh=refresh and _mentions(sql, AGGREGATES))
    try:
        return con.execute(sql).df()
    except duckdb.CatalogException as exc:
        missing = re.search(r'Table with name "?([^"\s]+)"? does not exist', str(exc))
        if missing:
            name = missing.group(1)
            present = ", ".join(table_sources(root)) or "none"
            hint = f" (it appears once {_where(root, name)} exists)" if name in CORE_TABLES else ""
            raise UserError(f"{root}: no table {name!r}{hint}; tables: {present}") from None
        raise UserError(f"SQL error: {_one_line(exc)}") from None
    except duckdb.Error as exc:
        raise UserError(f"SQL error: {_one_line(exc)}") from None
    finally:
        con.close()


def _where(root: Path, name: str) -> str:
    if name in AGGREGATES:
        return f"{root / 'runs'} holds a run"
    return f"{root / name}/*/part-*.parquet"


def _one_line(exc: Exception) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


# ----------------------------------------------------------------------------------------------
# The command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run SQL (DuckDB) over a results directory. Tables: runs, curves, spectral, outputs, and the "
        "aggregates by_width, scaling, gp_init (recomputed when the runs changed)."
    )
    parser.add_argument("results", help="results directory (as given to ntk-sweep run --out)")
    parser.add_argument("sql", help="a DuckDB query, e.g. \"SELECT width, mean FROM by_width "
                                    "WHERE measure = 'kernel_rel_dev_init'\"")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="output format (default: a readable table; with --output, from its suffix)")
    parser.add_argument("--output", "-o", default=None, help="write the result to this file instead of stdout")
    parser.add_argument("--max-rows", type=int, default=100, help="rows shown by --format table (default 100)")


def _format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    if args.output:
        suffix = Path(args.output).suffix.lower().lstrip(".")
        return suffix if suffix in FORMATS else "table"
    return "table"


def render_table(df, max_rows: int = 100) -> str:
    """A DataFrame as aligned text, floats to 4 significant digits, list cells compact."""
    import pandas as pd

    shown = df.head(max_rows) if max_rows > 0 else df
    with pd.option_context("display.max_columns", None, "display.width", 10_000, "display.max_colwidth", 60,
                           "display.float_format", "{:.4g}".format):
        text = shown.to_string(index=False) if len(shown.columns) else "(no columns)"
    more = f", {len(df) - len(shown)} not shown (--max-rows)" if len(shown) < len(df) else ""
    return f"{text}\n({len(df)} row{'s' if len(df) != 1 else ''}{more})"


def write_frame(df, fmt: str, output: str | Path | None) -> str | None:
    """Write ``df`` as ``fmt`` to ``output``; without ``output`` return the text (parquet needs a file)."""
    if fmt == "parquet":
        if not output:
            raise UserError("--format parquet: needs --output FILE")
        import pyarrow as pa

        from pipeline.store import write_parquet_atomic

        write_parquet_atomic(pa.Table.from_pandas(df, preserve_index=False), Path(output))
        return None
    if fmt == "csv":
        text = df.to_csv(index=False)
    elif fmt == "json":
        text = df.to_json(orient="records", indent=1) + "\n"
    else:
        text = render_table(df) + "\n"
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
        return None
    return text


def main(args: argparse.Namespace) -> int:
    df = query(args.results, args.sql)
    fmt = _format(args)
    if fmt == "table" and not args.output:
        print(render_table(df, args.max_rows))
        return 0
    text = write_frame(df, fmt, args.output)
    if text is not None:
        sys.stdout.write(text)
    else:
        print(f"{len(df)} rows -> {args.output}", file=sys.stderr)
    return 0


class _CallableModule(types.ModuleType):
    """Makes ``pipeline.query(results, sql)`` work while ``pipeline.query`` stays this module."""

    def __call__(self, results: str | Path, sql: str, **kwargs):
        return query(results, sql, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
