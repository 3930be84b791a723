"""SQL over a results directory (DuckDB), from Python and from ``ntk-sweep query``.

Views, one per table that exists:

    runs       RESULTS/runs/dataset=*/part-*.parquet      one row per run (``dataset`` from the Hive folder)
    curves     RESULTS/curves/dataset=*/part-*.parquet    one row per (run_id, logged step)
    spectral   RESULTS/spectral/dataset=*/part-*.parquet  residual energy per NTK eigen-band per logged step
    outputs    RESULTS/outputs/dataset=*/part-*.parquet   outputs at init on the test points
    by_width   RESULTS/aggregates/by_width.parquet   (see :mod:`pipeline.aggregate`)
    scaling    RESULTS/aggregates/scaling.parquet
    gp_init    RESULTS/aggregates/gp_init.parquet    (see :mod:`pipeline.gp_init`)
    <name>     any other RESULTS/<name>/ folder of Parquet parts, and RESULTS/aggregates/<name>.parquet

The tables are read by :class:`pipeline.store.ResultsStore` (the one reader of the layout: rows
de-duplicated by run id, parts whose columns differ unified by name, a part that does not read left
out and named in one line on stderr) and handed to DuckDB as Arrow datasets, scanned lazily. The
aggregates are recomputed first when the runs changed and the SQL names one of them (in memory only,
when the results directory is read-only).

Sandbox: once the views exist, the connection is locked (:data:`LOCKDOWN`): no file, URL or database
can be read, written or attached (``read_csv('/etc/passwd')``, ``COPY ... TO``, ``ATTACH``), no
extension installed or loaded, no setting changed back. Such SQL is a one-line :class:`UserError`
(exit code 2).

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


# Applied, in this order, once the tables are registered: after them the connection reads no file and
# loads no extension (the tables are pyarrow datasets, read by pipeline.store, not by DuckDB), and no
# setting can be changed back.
LOCKDOWN = (
    "SET python_enable_replacements = false",  # no Python variables as tables
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET allowed_directories = []",
    "SET allowed_paths = []",
    "SET enable_external_access = false",  # no file, URL, ATTACH, COPY TO, INSTALL or LOAD
    "SET lock_configuration = true",
)


def table_sources(results: str | Path, *, refresh: bool = False) -> dict:
    """View name -> what DuckDB scans for it: a lazy pyarrow dataset over the parts that read, or an
    in-memory Arrow table (de-duplicated rows, or aggregates computed but not stored), for every
    table present in ``results``; all read through :class:`pipeline.store.ResultsStore`. ``refresh``:
    recompute stale aggregates (when there are runs)."""
    from pipeline import aggregate
    from pipeline.store import BadPart, ResultsStore, warn_bad_parts

    root = Path(results)
    store = ResultsStore(root)
    sources: dict = {}
    bad: list[BadPart] = []
    for kind in store.kinds():
        if _IDENT.match(kind):
            source = store.scan(kind, bad=bad)
            if source is not None:
                sources[kind] = source
    warn_bad_parts(bad)  # every part that does not read, in one line
    have_runs = bool(store.runs_index().status)
    stored = aggregate.tables(root, refresh=refresh and have_runs)
    for name, table in stored.items():
        sources.setdefault(name, table)
    for path in sorted((root / aggregate.AGGREGATES).glob("*.parquet")):  # any other stored aggregate
        if _IDENT.match(path.stem) and path.stem not in sources and path.stem not in aggregate.TABLES:
            other = store.scan_file(path)  # named on stderr if it does not read
            if other is not None:
                sources[path.stem] = other
    return sources


def _mentions(sql: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"\b{n}\b", sql, flags=re.IGNORECASE) for n in names)


def connect(results: str | Path, *, refresh: bool = True):
    """An in-memory DuckDB connection with a view per table of ``results`` (see the module docstring),
    locked down (:data:`LOCKDOWN`): it can read those tables and nothing else on disk or the network,
    write no file, attach no database and load no extension. ``refresh``: recompute stale aggregates
    first (when there are runs; in memory only when the results directory is read-only)."""
    import duckdb

    root = Path(results)
    if not root.is_dir():
        raise UserError(f"{root}: not a results directory")
    con = duckdb.connect(":memory:", config={"temp_directory": ""})  # no spill folder to write into either
    for name, source in table_sources(root, refresh=refresh).items():
        con.register(name, source)
    for statement in LOCKDOWN:
        con.execute(statement)
    return con


def query(results: str | Path, sql: str, *, refresh: bool = True):
    """Run ``sql`` (DuckDB dialect) over the tables of ``results``; returns a pandas DataFrame.

    Raises :class:`UserError` for a missing results directory, a table that does not exist (yet),
    anything outside the results' tables (files, URLs, ATTACH, COPY TO, INSTALL/LOAD, settings) or any
    SQL error (with DuckDB's message). ``refresh``: recompute stale aggregates first if the SQL names
    one of them (``by_width``, ``scaling``, ``gp_init``). A part that does not read is named on
    stderr and left out; the other tables are served.
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
            present = ", ".join(sorted(_views(con))) or "none"
            hint = f" (it appears once {_where(root, name)} exists)" if name in CORE_TABLES else ""
            raise UserError(f"{root}: no table {name!r}{hint}; tables: {present}") from None
        raise UserError(f"SQL error: {_one_line(exc)}") from None
    except duckdb.PermissionException as exc:
        raise UserError(f"query: not allowed: {_one_line(exc)} (a query reads the tables of {root} only: "
                        f"{', '.join(sorted(_views(con))) or 'none'})") from None
    except duckdb.Error as exc:
        if "configuration has been locked" in str(exc):
            raise UserError(f"query: not allowed: {_one_line(exc)}") from None
        raise UserError(f"SQL error: {_one_line(exc)}") from None
    finally:
        con.close()


def _views(con) -> list[str]:
    return [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()]


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
