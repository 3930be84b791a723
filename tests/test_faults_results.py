"""Faults in a results directory (issue 14, part A), each on real files, real DuckDB and a real local Ray:
unreadable Parquet parts (named in one line, quarantined and redone by a re-run), read-only results,
the SQL sandbox, two sweeps in one directory (claims, orphans), --retry-failed and exit code 3."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import query
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.spec import parse_sweep
from pipeline.store import CURVES, OUTPUTS, RUNS, SPECTRAL, ResultsStore, pack_id

REPO = Path(__file__).resolve().parents[1]
JOB = {
    "name": "faults",
    "datasets": [{"name": "digits", "n_train": [40], "n_test": 30}],
    "architectures": [{"depth": [1], "activation": "relu"}],
    "widths": [16, 24],
    "seeds": 2,
    "optimizer": {"name": "gd", "lr_scale": 0.5, "steps": 10},
    "kernels": {"store": "none"},
    "resources": {"num_cpus": 1, "pack_seeds": False},  # one pack per run: 4 packs
}
RUN_IDS = sorted(r.run_id for r in parse_sweep(JOB).expand())


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, Path]:
    """(job file, results) of a real 4-run sweep on an in-process local Ray; tests work on copies."""
    import ray

    from pipeline.runner import run_sweep

    ray.shutdown()  # a Ray left by an earlier test in this process may be a multi-node test cluster
    base = tmp_path_factory.mktemp("faults")
    job = base / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    summary = run_sweep(job, base / "results", num_cpus=2, progress=False)
    assert summary.status == {"ok": 4}, summary.line()
    return job, base / "results"


def copy_results(sweep, tmp_path: Path) -> Path:
    out = tmp_path / "results"
    shutil.copytree(sweep[1], out)
    return out


def part(out: Path, kind: str, run_id: str) -> Path:
    return ResultsStore(out).part_path(kind, "digits", pack_id([run_id]))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root``: relative path -> (size, mtime) of a file, (0, 0) of a folder."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (0, 0)
            for p in root.rglob("*")}


def raw_rows(out: Path, kind: str = RUNS) -> pa.Table:
    return ds.dataset(out / kind, format="parquet", partitioning="hive").to_table()


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


# ----------------------------------------------------------------------------------------------
# Unreadable parts


@pytest.mark.slow
def test_an_unreadable_part_is_named_in_one_line_and_the_other_parts_and_tables_are_served(sweep, tmp_path, capsys):
    out = copy_results(sweep, tmp_path)
    bad_curves, bad_runs = part(out, CURVES, RUN_IDS[0]), part(out, RUNS, RUN_IDS[1])
    truncate(bad_curves)
    truncate(bad_runs)

    assert main(["status", str(out)]) == 0
    cap = capsys.readouterr()
    assert "faults: 4 runs: missing 1, ok 3" in cap.out
    assert len(warnings(cap.err)) == 1 and str(bad_runs) in cap.err, cap.err

    assert main(["query", str(out), "SELECT count(*) AS n FROM runs"]) == 0
    cap = capsys.readouterr()  # (the runs part was named above: once per process)
    assert " 3\n" in cap.out and str(bad_curves) in cap.err and len(warnings(cap.err)) == 1, cap.err
    # The curves of the pack whose runs part is bad are not committed; the bad part's are left out.
    assert main(["query", str(out), "SELECT count(DISTINCT run_id) AS n FROM curves"]) == 0
    assert " 2\n" in capsys.readouterr().out
    df = query.query(out, "SELECT count(*) AS n FROM outputs")
    assert df.n.tolist() == [3]
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file()
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
def test_a_rerun_quarantines_unreadable_parts_with_their_pack_and_redoes_its_runs(sweep, tmp_path, capsys):
    job, _ = sweep
    out = copy_results(sweep, tmp_path)
    truncate(part(out, RUNS, RUN_IDS[0]))
    part(out, SPECTRAL, RUN_IDS[1]).write_bytes(b"not parquet at all")

    job_file = out / "sweeps" / "faults.yaml"
    stamp = job_file.stat().st_mtime_ns
    assert main(["run", str(job), "--out", str(out)]) == 0
    assert job_file.stat().st_mtime_ns == stamp  # the same job: its file is not rewritten
    cap = capsys.readouterr()
    assert "2 part(s) that did not read" in cap.err and "Traceback" not in cap.err, cap.err
    assert cap.out.strip().splitlines()[-1].startswith("4 runs: 2 already done, ok 2")
    q = out / "quarantine"
    moved = sorted(p.relative_to(q).as_posix() for p in q.rglob("*.parquet"))
    pid0, pid1 = pack_id([RUN_IDS[0]]), pack_id([RUN_IDS[1]])
    assert moved == sorted(f"{kind}/dataset=digits/part-{pid}.parquet"
                           for pid in (pid0, pid1) for kind in (RUNS, CURVES, SPECTRAL, OUTPUTS)), moved
    runs = raw_rows(out)
    assert sorted(runs.column("run_id").to_pylist()) == RUN_IDS
    assert set(runs.column("status").to_pylist()) == {"ok"}
    for kind in (CURVES, SPECTRAL, OUTPUTS):
        assert set(raw_rows(out, kind).column("run_id").to_pylist()) == set(RUN_IDS), kind
    # A second bad copy of the same part goes beside the first, not over it.
    truncate(part(out, RUNS, RUN_IDS[0]))
    assert main(["run", str(job), "--out", str(out)]) == 0
    assert (q / RUNS / "dataset=digits" / f"part-{pid0}.1.parquet").is_file()


@pytest.mark.slow
def test_reads_deduplicate_by_run_id(sweep, tmp_path):
    out = copy_results(sweep, tmp_path)
    row = pq.read_table(part(out, RUNS, RUN_IDS[0]))
    failed = row.set_column(row.column_names.index("status"), "status", pa.array(["failed"]))
    newer = row.set_column(row.column_names.index("wall_s"), "wall_s", pa.array([123.0]))
    pq.write_table(failed, out / RUNS / "dataset=digits" / "part-failedcopy.parquet")
    time.sleep(0.01)
    pq.write_table(newer, out / RUNS / "dataset=digits" / "part-newercopy.parquet")
    curves = pq.read_table(part(out, CURVES, RUN_IDS[0]))
    pq.write_table(curves, out / CURVES / "dataset=digits" / "part-newercopy.parquet")
    table = ResultsStore(out).table()
    assert table.num_rows == 4 and sorted(table.column("run_id").to_pylist()) == RUN_IDS
    mine = table.filter(pc.equal(table.column("run_id"), RUN_IDS[0])).to_pylist()[0]
    assert mine["status"] == "ok" and mine["wall_s"] == 123.0  # ok beats failed, then the newest part
    df = query.query(out, "SELECT count(*) AS n, count(DISTINCT run_id) AS d FROM runs")
    assert df.to_dict("records") == [{"n": 4, "d": 4}]
    steps = query.query(out, "SELECT run_id, count(*) AS n FROM curves GROUP BY run_id")
    assert len(steps) == 4 and steps.n.nunique() == 1


# ----------------------------------------------------------------------------------------------
# Read-only places


@pytest.mark.slow
def test_a_rerun_with_everything_done_writes_nothing(sweep, tmp_path):
    job, _ = sweep
    out = copy_results(sweep, tmp_path)
    before = tree(out)
    time.sleep(0.01)
    assert main(["run", str(job), "--out", str(out)]) == 0
    assert tree(out) == before
    # Another sweep whose runs are all done here: its job file is written once (status lists it), then never.
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**JOB, "name": "other"}))
    assert main(["run", str(other), "--out", str(out)]) == 0
    after = tree(out)
    assert set(after) - set(before) == {"sweeps/other.yaml"} and all(after[k] == v for k, v in before.items())
    assert main(["run", str(other), "--out", str(out)]) == 0
    assert tree(out) == after


_RUN_CLI = """
import contextlib, io, json, sys
from pipeline.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def _cli_read_only(results: Path, *commands: list[str]) -> list[tuple[int, str, str]]:
    """``ntk-sweep`` commands, each as ``(exit code, stdout, stderr)``, run one after the other in one
    subprocess that sees ``results`` read-only: a read-only bind mount in a private mount namespace
    when this is root (root ignores permission bits), else chmod a-w."""
    import json

    cmd = [sys.executable, "-c", _RUN_CLI, json.dumps(commands)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if os.geteuid() != 0:
        paths = [results, *results.rglob("*")]
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(modes[p] & ~0o222)
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        finally:
            for p in paths:
                p.chmod(modes[p])
    else:
        if not (shutil.which("unshare") and shutil.which("mount")):
            pytest.skip("running as root without unshare/mount: cannot make a read-only directory")
        wrapped = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(results), *cmd]
        proc = subprocess.run(wrapped, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0 and ("mount:" in proc.stderr or "unshare:" in proc.stderr):
            pytest.skip(f"cannot make a read-only bind mount here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


@pytest.mark.slow
def test_read_only_results(sweep, tmp_path):
    job, _ = sweep
    out = copy_results(sweep, tmp_path)
    for kind in (RUNS, CURVES, SPECTRAL, OUTPUTS):
        part(out, kind, RUN_IDS[0]).unlink()  # one run missing: a re-run has something to write
    before = tree(out)
    sql = "SELECT count(*) AS n FROM scaling WHERE measure = 'kernel_rel_dev_init'"
    ran, q, rep, bad = _cli_read_only(out, ["run", str(job), "--out", str(out)], ["query", str(out), sql],
                                      ["report", str(out), "--out", str(tmp_path / "rep")], ["report", str(out)])
    assert ran[0] == 2, ran
    assert ran[2].startswith("error: ") and ran[2].count("\n") == 1 and "cannot be written" in ran[2], ran
    assert q[0] == 0 and " 1\n" in q[1], q
    assert rep[0] == 0 and (tmp_path / "rep" / "report.md").is_file(), rep
    assert bad[0] == 2 and bad[2].count("\n") == 1 and "--out" in bad[2], bad  # its default is inside
    assert tree(out) == before


# ----------------------------------------------------------------------------------------------
# The SQL sandbox


@pytest.mark.slow
@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_parquet('{out}/runs/*/*.parquet')",
    "COPY (SELECT * FROM runs) TO '{out}/runs/dataset=digits/part-evil.parquet'",
    "COPY (SELECT 1) TO '{tmp}/x.csv'",
    "ATTACH '{tmp}/x.duckdb' AS x",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SELECT * FROM glob('/*')",
])
def test_queries_read_the_results_tables_and_nothing_else(sweep, tmp_path, capsys, sql):
    out = copy_results(sweep, tmp_path)
    before = tree(out)
    sql = sql.format(out=out, tmp=tmp_path)
    assert main(["query", str(out), sql]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not allowed" in err, err
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.duckdb").exists()
    with pytest.raises(UserError, match="not allowed"):
        query.query(out, sql)
    # What it may do still works once locked: views over the parts, joins, aggregates.
    df = query.query(out, "SELECT r.width, count(*) AS n FROM runs r JOIN curves c USING (run_id) "
                          "JOIN by_width b ON b.width = r.width GROUP BY 1 ORDER BY 1")
    assert df.width.tolist() == [16, 24]
    assert {k: v for k, v in tree(out).items() if not k.startswith("aggregates")} == before


# ----------------------------------------------------------------------------------------------
# Two sweeps in one directory; exit code 3


def _hold_claims(out: Path, run_ids: list[str], orphan: str | None = None) -> subprocess.Popen:
    """Another process that claims ``run_ids`` in ``out`` (and, as a sweep committing a pack does, writes
    the pack of ``orphan``'s curves part before its runs part), then stays alive until killed."""
    code = (
        "import sys, time, pyarrow as pa\n"
        "from pipeline.store import CURVES, ResultsStore, RunClaims, pack_id, write_parquet_atomic\n"
        "out, ids, orphan = sys.argv[1], sys.argv[2].split(','), sys.argv[3]\n"
        "store = ResultsStore(out)\n"
        "claims = RunClaims(store)\n"
        "with claims.locked():\n"
        "    print(','.join(sorted(claims.claim(ids))), flush=True)\n"
        "if orphan:\n"
        "    write_parquet_atomic(pa.table({'run_id': [orphan], 'step': [0]}),\n"
        "                         store.part_path(CURVES, 'digits', pack_id([orphan])))\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(out), ",".join(run_ids), orphan or ""], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc


@pytest.mark.slow
def test_claims_taken_at_the_same_moment_are_disjoint(tmp_path):
    ids = [f"{i:04d}" for i in range(300)]
    procs = [_hold_claims(tmp_path, ids) for _ in range(2)]
    try:
        got = [set(p.stdout.readline().strip().split(",")) - {""} for p in procs]
        assert all(p.stdout.readline().strip() == "ready" for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert not (got[0] & got[1]) and (got[0] | got[1]) == set(ids), (len(got[0]), len(got[1]))


@pytest.mark.slow
def test_runs_claimed_by_a_live_sweep_are_left_to_it_until_it_dies(sweep, tmp_path, capsys):
    job, _ = sweep
    out = tmp_path / "results"
    other = _hold_claims(out, RUN_IDS[:2], orphan=RUN_IDS[0])
    try:
        assert other.stdout.readline().strip() == ",".join(RUN_IDS[:2])
        assert other.stdout.readline().strip() == "ready"
        orphan = part(out, CURVES, RUN_IDS[0])
        assert main(["run", str(job), "--out", str(out)]) == 3
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert last.startswith("4 runs: 0 already done, ok 2; 2 missing") and "2 being run by another sweep" in last
        assert sorted(raw_rows(out).column("run_id").to_pylist()) == RUN_IDS[2:]
        assert orphan.is_file()  # the other sweep is committing that pack: not deleted as an orphan
        claimed = {p.name for p in (out / ".claims").iterdir() if not p.name.startswith((".", "owner-"))}
        assert claimed == set(RUN_IDS[:2])  # this sweep's own claims are released
    finally:
        other.kill()  # dies holding its claims, like a sweep killed with SIGKILL
        other.wait()
    assert main(["run", str(job), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("4 runs: 2 already done, ok 2 ")
    assert sorted(raw_rows(out).column("run_id").to_pylist()) == RUN_IDS
    assert pq.read_table(orphan).num_rows > 1  # the real curves of that run, the stale orphan gone
    assert not [p for p in (out / ".claims").iterdir() if not p.name.startswith((".", "owner-"))]


# ----------------------------------------------------------------------------------------------
# --retry-failed


@pytest.mark.slow
def test_retry_failed_reruns_failed_runs_and_replaces_their_rows(sweep, tmp_path, capsys):
    job, _ = sweep
    out = copy_results(sweep, tmp_path)
    x, y = RUN_IDS[0], RUN_IDS[1]
    # x: its failed row in some other pack's part (as when it was packed differently); y: failed in place.
    row = pq.read_table(part(out, RUNS, x))
    stale = out / RUNS / "dataset=digits" / "part-stale.parquet"
    pq.write_table(row.set_column(row.column_names.index("status"), "status", pa.array(["failed"])), stale)
    for kind in (RUNS, CURVES, SPECTRAL, OUTPUTS):
        part(out, kind, x).unlink()
    row = pq.read_table(part(out, RUNS, y))
    pq.write_table(row.set_column(row.column_names.index("status"), "status", pa.array(["failed"])),
                   part(out, RUNS, y))
    before = tree(out)
    assert main(["run", str(job), "--out", str(out)]) == 0  # failed runs are done unless retried
    assert "4 already done" in capsys.readouterr().out and tree(out) == before

    assert main(["run", str(job), "--out", str(out), "--retry-failed"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("4 runs: 2 already done, ok 2 ")
    runs = raw_rows(out)  # on disk, not just as read
    assert sorted(runs.column("run_id").to_pylist()) == RUN_IDS
    assert set(runs.column("status").to_pylist()) == {"ok"}
    assert not stale.exists()
