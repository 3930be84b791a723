"""Run a sweep on Ray: one task per pack of seeds (or per run), resumable, with progress.

The driver stays thin. It validates the job, loads each dataset subset once (from the data directory
on the driver's machine, so workers need no dataset files) and puts it in the object store, starts
one task per (subset, architecture) for the analytic kernels, then one training task per pack that
receives both by reference. Results come back to the driver, which writes them atomically
(:mod:`pipeline.store`); only the Grams (and the NNGP of the test points, which ``gp_init`` compares the
outputs with) are written by the workers, into a results directory they must share with the driver.

Failures: an exception inside a run is deterministic; :func:`pipeline.run.train_runs` records it
as ``status="failed"`` and the sweep goes on (``retry_exceptions`` is off); ``retry_failed`` runs them
again, and their new rows supersede the failed ones (:meth:`pipeline.store.ResultsStore.supersede`).
A worker that dies (OOM, lost node) is retried ``max_retries`` times; if it still fails, its runs
stay missing and a re-run of the same command tries them again.

Re-runs and shared directories: a re-run first moves every part that does not read to
``RESULTS/quarantine/`` (with the rest of its pack) and runs that pack's runs again; it claims the
runs it is about to run (:class:`pipeline.store.RunClaims`), so a run that another live sweep is
running into the same directory is left to it (and counted missing here); a re-run with nothing to
do writes nothing.

Ray set-up: usage stats are off. Ray >= 2.59 enables token authentication for local clusters by
default; we keep it (``ray.init`` generates the token) and bind the dashboard to 127.0.0.1, so
nothing listens beyond this machine. For a cluster (``--address``), the token must be available as
for any Ray client (``RAY_AUTH_TOKEN`` or ``ray get-auth-token``), see cluster.yaml.
"""

from __future__ import annotations

import errno
import os
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pipeline.errors import UserError  # noqa: E402
from pipeline.plan import estimate_analytic, estimate_gp, estimate_pack, gp_configs, num_params  # noqa: E402
from pipeline.ray_session import check_task_fits, init_ray, use_auth_token_if_present  # noqa: E402,F401
from pipeline.run_config import RunConfig, analytic_args, make_packs, subset_args  # noqa: E402,F401
from pipeline.spec import Sweep, load_sweep  # noqa: E402
from pipeline.store import (  # noqa: E402
    GP_SAMPLES,
    GramWriter,
    ResultsNotShared,
    ResultsStore,
    RunClaims,
    is_not_writable,
    nngp_test_path,
    write_parquet_atomic,
)


@dataclass
class SweepSummary:
    total: int
    skipped: int
    status: Counter = field(default_factory=Counter)
    missing: int = 0
    wall_s: float = 0.0
    interrupted: bool = False
    elsewhere: int = 0  # of the missing: runs another live sweep into the same directory is running
    quarantined: int = 0  # parts moved to RESULTS/quarantine/ because they did not read

    def line(self) -> str:
        """One line: counts of the runs; ``N missing`` whenever some runs have no row yet."""
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.status.items())) or "nothing new"
        other = f", {self.elsewhere} being run by another sweep" if self.elsewhere else ""
        extra = f"; {self.missing} missing ({'re-run to retry' + other})" if self.missing else ""
        stop = " (interrupted)" if self.interrupted else ""
        return (f"{self.total} runs: {self.skipped} already done, {counts}{extra} "
                f"in {self.wall_s:.1f} s{stop}")


def pack_cost(pack: list[RunConfig], in_dim: int, out_dim: int) -> float:
    """Training FLOPs, up to a constant: points x parameters x steps x seeds."""
    c = pack[0]
    return len(pack) * c.n_train * num_params(in_dim, c.width, c.depth, out_dim) * max(c.steps, 1)


def _train_task(configs: list[RunConfig], subset, analytic, num_cpus: float, gram_writer) -> list:
    import torch

    from pipeline.run import train_runs

    gram_writer.check()  # before any work: raises ResultsNotShared, which stops the sweep
    # A pooled worker keeps the thread count of its first task: set it for every task.
    torch.set_num_threads(max(1, int(num_cpus)))
    results = train_runs(configs, subset=subset, analytic=analytic, gram_writer=gram_writer)
    import ray

    peak = getattr(analytic, "peak_rss_bytes", None)
    node = ray.get_runtime_context().get_node_id()
    for r in results:
        r.analytic_peak_rss_bytes, r.node = peak, node
    return results


def _analytic_task(config: RunConfig, subset, num_cpus: float, nngp_writer):
    """The run's limits (:func:`pipeline.limits.analytic_blocks`); with ``nngp_writer``, this task also
    stores the NNGP of the test points (one task per NNGP array writes it)."""
    import torch

    from pipeline.limits import analytic_blocks

    torch.set_num_threads(max(1, int(num_cpus)))
    blocks = analytic_blocks(config, subset)
    if nngp_writer is not None:
        nngp_writer.write_nngp_test(config, subset.x_test)
    return blocks


def _gp_task(config: RunConfig, subset, seeds: int, num_cpus: float) -> dict:
    import torch

    from pipeline.gp_sample import gp_samples

    torch.set_num_threads(max(1, int(num_cpus)))
    return gp_samples(config, subset, seeds)


def gp_todo(sweep: Sweep, runs: list[RunConfig], store: ResultsStore) -> list[RunConfig]:
    """For ``gp_seeds``: the runs (:func:`pipeline.plan.gp_configs`) whose ``gp_samples`` row is missing."""
    from pipeline.gp_sample import gp_id

    configs = gp_configs(sweep, runs)
    if not configs:
        return []
    table = store.table(GP_SAMPLES, warn=False) if (store.root / GP_SAMPLES).is_dir() else None
    have = set(table.column("gp_id").to_pylist()) if table is not None and table.num_rows else set()
    return [r for r in configs if gp_id(r, sweep.gp_seeds) not in have]


def run_sweep(
    job: str | Path | Sweep,
    out: str | Path,
    *,
    address: str | None = None,
    max_parallel: int | None = None,
    data_dir: str | None = None,
    num_cpus: int | None = None,
    progress: bool | None = None,
    retry_failed: bool = False,
) -> SweepSummary:
    """Run every missing run of ``job`` into the results directory ``out``.

    Validates everything (job fields, dataset files, subset sizes, a writable ``out``) before writing
    anything; raises :class:`UserError` for bad input. ``address``: a Ray cluster to connect to (else
    a local Ray on this machine with ``num_cpus`` CPUs, default all). ``max_parallel``: at most this
    many tasks in flight (default: as many as fit). ``retry_failed``: run the runs recorded
    ``failed`` again too. Writes nothing when every run is done and the recorded job is the same.
    """
    from tqdm import tqdm

    from pipeline.data import load_subset

    start = time.perf_counter()
    for flag, value in (("max_parallel", max_parallel), ("num_cpus", num_cpus)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UserError(f"{flag}={value!r}: must be a positive integer")
    sweep = job if isinstance(job, Sweep) else load_sweep(job)
    runs = sweep.expand(data_dir)
    store = ResultsStore(out)
    subsets = {}
    for r in runs:  # load (and cache) each subset once; bad data fails here, before any write
        key = subset_args(r)
        if key not in subsets:
            subsets[key] = load_subset(r)

    resolved = sweep.model_dump(mode="json")
    bad = store.unreadable_parts() if store.root.is_dir() else []
    index = store.runs_index()
    done = index.done(retry_failed) - store.redo_run_ids(bad, index)
    todo = [r for r in runs if r.run_id not in done]
    gp_missing = gp_todo(sweep, runs, store)
    summary = SweepSummary(total=len(runs), skipped=len(runs) - len(todo))
    if not todo and not gp_missing and not bad and not store.sweep_changed(sweep.name, resolved):
        summary.wall_s = time.perf_counter() - start
        return summary  # nothing to do: nothing written
    store.check_writable()

    import ray

    res = sweep.resources
    dims = {key: (s.dim, s.y_train.shape[1]) for key, s in subsets.items()}

    def plan(todo: list[RunConfig]) -> tuple[list[list[RunConfig]], list[int], dict[tuple, int]]:
        """Packs of ``todo``, each pack's Ray ``memory=`` (the plan's estimate of its peak, so that a node
        never takes more tasks than its memory holds), and each analytic task's."""
        packs = make_packs(todo, res.pack_seeds, res.pack_max_width)
        pack_memory = [estimate_pack(p, *dims[subset_args(p[0])], store=sweep.kernels.store,
                                     num_cpus=res.num_cpus, num_gpus=res.num_gpus).host_peak_bytes for p in packs]
        analytic_memory = {analytic_args(r): estimate_analytic(r, *dims[subset_args(r)]) for r in todo}
        return packs, pack_memory, analytic_memory

    if todo or gp_missing:
        init_ray(address, num_cpus)
    if todo:
        _, pack_memory, analytic_memory = plan(todo)
        # The check below fails at once on what no node (or node type) can hold.
        largest = max(pack_memory + list(analytic_memory.values()))
        waiting = check_task_fits({"CPU": res.num_cpus, "GPU": res.num_gpus, "memory": largest},
                                  local=address is None, what=str(job) if not isinstance(job, Sweep) else sweep.name)
        if waiting:
            print(f"{sweep.name}: {waiting}", file=sys.stderr, flush=True)
    # Only now, with every check passed, is anything written.
    claims = RunClaims(store)
    try:
        try:
            with claims.locked():
                moved = store.quarantine(bad)
                store.write_sweep(sweep.name, resolved)
                held = claims.claim(r.run_id for r in todo)
                index = store.runs_index()  # what other sweeps committed meanwhile
                done = index.done(retry_failed)
                claims.release(held & done)
                store.remove_orphans(claims)
                superseded = index.rels_of(r.run_id for r in todo) if retry_failed else {}
        except OSError as exc:
            raise UserError(f"{out}: cannot write the results directory ({exc.strerror or exc}: "
                            f"{exc.filename or out})") from None
        if moved:
            summary.quarantined = len(moved)
            print(f"{out}: {len(bad)} part(s) that did not read moved to {store.root / 'quarantine'} with the rest "
                  f"of their packs ({len(moved)} files, {bad[0].path.name}: {bad[0].reason}); their runs are run "
                  "again", file=sys.stderr, flush=True)
        fresh = [r for r in todo if r.run_id in done]
        summary.skipped += len(fresh)
        summary.elsewhere = sum(1 for r in todo if r.run_id not in claims.held and r.run_id not in done)
        summary.missing += summary.elsewhere
        todo = [r for r in todo if r.run_id in claims.held]
        needed = {subset_args(r) for r in (*todo, *gp_missing)}
        subset_refs = {key: ray.put(s) for key, s in subsets.items() if key in needed}
        gp_refs = _submit_gp(sweep, gp_missing, subsets, subset_refs, ray) if gp_missing else {}
        if todo:
            _run_packs(sweep, store, claims, todo, plan(todo), subsets, subset_refs, summary, superseded,
                       max_parallel=max_parallel, progress=progress, out=out, tqdm=tqdm, total=len(runs), ray=ray)
        if gp_refs:
            _commit_gp(store, gp_refs, ray, out, summary)
    finally:
        claims.close()
        summary.wall_s = time.perf_counter() - start
    return summary


def _submit_gp(sweep: Sweep, configs: list[RunConfig], subsets: dict, subset_refs: dict, ray) -> dict:
    """Start the init-only GP tasks (``gp_seeds``); they run beside the training packs."""
    res = sweep.resources
    task = ray.remote(_gp_task)
    refs = {}
    for c in configs:
        subset = subsets[subset_args(c)]
        memory = estimate_gp(c, subset.n_test, subset.y_train.shape[1], subset.dim, sweep.gp_seeds,
                             res.num_cpus).peak_bytes
        ref = task.options(num_cpus=res.num_cpus, num_gpus=0, memory=memory, max_retries=res.max_retries,
                           retry_exceptions=False).remote(c, subset_refs[subset_args(c)], sweep.gp_seeds, res.num_cpus)
        refs[ref] = c
    return refs


def _commit_gp(store: ResultsStore, refs: dict, ray, out: str | Path, summary: SweepSummary) -> None:
    """Write each GP task's row as its own part of ``gp_samples`` (atomically), as it finishes."""
    import pyarrow as pa

    pending = dict(refs)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        config = pending.pop(ready[0])
        try:
            row = ray.get(ready[0])
        except Exception as exc:  # noqa: BLE001 - a failed GP check must not lose the sweep's runs
            print(f"{out}: gp_seeds check for width {config.width} failed ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''}); a re-run retries it", file=sys.stderr)
            summary.missing += 1
            continue
        table = pa.Table.from_pylist([row], schema=pa.schema([
            ("gp_id", pa.string()), ("run_id", pa.string()), ("width", pa.int64()), ("seeds", pa.int64()),
            ("n_test", pa.int64()), ("k", pa.int64()), ("points", pa.int64()), ("k_fro2", pa.float64()),
            ("residual_gram", pa.list_(pa.float64())), ("f0_test", pa.list_(pa.float32())),
            ("wall_s", pa.float64())]))
        write_parquet_atomic(table, store.part_path(GP_SAMPLES, config.dataset, row["gp_id"]))


def _run_packs(sweep: Sweep, store: ResultsStore, claims: RunClaims, todo: list[RunConfig], planned: tuple,
               subsets: dict, subset_refs: dict, summary: SweepSummary, superseded: dict[str, set[str]], *,
               max_parallel: int | None, progress: bool | None, out: str | Path, tqdm, total: int, ray) -> None:
    """Submit the packs of ``todo`` (claimed by ``claims``) to Ray and commit each as it finishes.
    ``subset_refs``: each subset's object-store reference, by :func:`subset_args`."""
    res = sweep.resources
    packs, pack_memory, analytic_memory = planned
    # A GPU task gets a fresh worker, as Ray does for @ray.remote(num_gpus=...): torch's caching
    # allocator would otherwise keep the previous task's GPU memory. (max_calls is not an .options() field.)
    train_task = ray.remote(max_calls=1)(_train_task) if res.num_gpus > 0 else ray.remote(_train_task)
    analytic_task = ray.remote(_analytic_task)
    common = dict(num_cpus=res.num_cpus, max_retries=res.max_retries, retry_exceptions=False)
    writer = GramWriter(store.root.resolve(), sweep.kernels.store, store.probe_token())
    dims = {key: (s.dim, s.y_train.shape[1]) for key, s in subsets.items()}

    analytic_refs: dict[tuple, object] = {}
    nngp_paths: set[str] = set()  # limits of different parameterisations share one NNGP: written once
    for r in todo:
        key = analytic_args(r)
        if key not in analytic_refs:
            path = nngp_test_path(r)
            nngp_writer = writer if path not in nngp_paths else None
            nngp_paths.add(path)
            analytic_refs[key] = analytic_task.options(num_gpus=0, memory=analytic_memory[key], **common).remote(
                r, subset_refs[subset_args(r)], res.num_cpus, nngp_writer)

    # Largest first, so the long tasks start early and the small ones fill the gaps.
    order = sorted(range(len(packs)), key=lambda i: -pack_cost(packs[i], *dims[subset_args(packs[i][0])]))
    packs, pack_memory = [packs[i] for i in order], [pack_memory[i] for i in order]
    # Every pack is submitted at once unless --max-parallel asks for backpressure: Ray (not the driver)
    # limits concurrency by the declared resources, and an autoscaler sees the sweep's whole demand.
    slots = max_parallel or len(packs)
    pending: dict = {}
    bar = tqdm(total=total, initial=summary.skipped, unit="run", disable=progress is False,
               dynamic_ncols=True, desc=sweep.name)

    def submit(pack: list[RunConfig], memory: int) -> None:
        first = pack[0]
        ref = train_task.options(num_gpus=res.num_gpus, memory=memory, **common).remote(
            pack, subset_refs[subset_args(first)], analytic_refs[analytic_args(first)], res.num_cpus, writer)
        pending[ref] = pack

    queue = list(reversed(list(zip(packs, pack_memory, strict=True))))  # pop() takes the largest first
    try:
        while queue or pending:
            while queue and len(pending) < slots:
                submit(*queue.pop())
            ready, _ = ray.wait(list(pending), num_returns=1)
            pack = pending.pop(ready[0])
            ids = [r.run_id for r in pack]
            try:
                results = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # worker death after retries: leave missing
                if isinstance(getattr(exc, "cause", None), ResultsNotShared):
                    for ref in pending:
                        ray.cancel(ref, force=True)
                    raise UserError(f"{out}: {exc.cause}") from None
                claims.release(ids)
                summary.missing += len(pack)
                bar.write(f"{len(pack)} run(s) lost ({type(exc).__name__}); a re-run retries them")
                bar.update(len(pack))
                continue
            try:
                path = store.write_pack(results)
                rels = set().union(*(superseded.get(i, set()) for i in ids))
                if rels:
                    with claims.locked():
                        store.supersede(ids, path, rels)
            except OSError as exc:
                if not is_not_writable(exc) and exc.errno != errno.ENOSPC:
                    raise
                raise UserError(f"{out}: cannot write results ({exc.strerror}: {exc.filename or out}); "
                                "re-run to resume") from None
            claims.release(ids)
            summary.status.update(r.status for r in results)
            bar.update(len(results))
            bar.set_postfix({k: v for k, v in summary.status.items()}, refresh=False)
    except KeyboardInterrupt:
        summary.interrupted = True
        for ref in pending:
            ray.cancel(ref, force=True)
        summary.missing += sum(len(p) for p in pending.values()) + sum(len(p) for p, _ in queue)
    finally:
        bar.close()


def _jobs_client(address: str):
    r"""A Ray Jobs client; uses the cluster's auth token when one is available (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``). Failures become one-line :class:`UserError`\s."""
    use_auth_token_if_present()
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - connection refused, auth required, bad URL
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "uthenticat" in str(exc):
            first = "authentication required: set RAY_AUTH_TOKEN or put the cluster's token in ~/.ray/auth_token"
        raise UserError(f"{address}: cannot reach the Ray Jobs API: {first}") from None


def remote_results_dir(out: str, remote_root: str = "~/ntk-sweep") -> str:
    """Where ``--out`` lands on the head node: an absolute path as given, a relative one under
    ``remote_root`` (cluster.yaml mounts the project at ``~/ntk-sweep``). Never relative to the job's
    working directory, which is a temporary copy that Ray deletes."""
    return out if out.startswith(("/", "~")) else f"{remote_root.rstrip('/')}/{out}"


def _shell_path(path: str) -> str:
    """A path for the entrypoint's shell: quoted, with a leading ``~/`` left to expand to $HOME."""
    return '"$HOME"/' + shlex.quote(path[2:]) if path.startswith("~/") else shlex.quote(path)


DEFAULT_SHARED_ROOT = "/mnt/shared"  # where cluster.yaml mounts the filesystem that every node sees


def check_grams_reachable(job: str | Path, sweep: Sweep, remote_out: str, shared_root: str | None) -> None:
    """A job that stores Grams has them written by the workers into the results directory, so that
    directory must be one that every node sees: under ``shared_root`` (cluster.yaml's shared filesystem).
    Raises a one-line :class:`UserError` otherwise (at run time, workers also check it, see
    :class:`pipeline.store.GramWriter`)."""
    if sweep.kernels.store == "none":
        return
    root = (shared_root or "").rstrip("/")
    if root and (remote_out == root or remote_out.startswith(root + "/")):
        return
    where = f"--out under the shared filesystem {root} (--shared-root)" if root else "a shared --shared-root"
    raise UserError(f"{job}: kernels.store: {sweep.kernels.store}: the workers write the Grams into the results "
                    f"directory, but {remote_out} is on the head node's own disk, which workers cannot see; use "
                    f"{where}, or kernels.store: none")


def submit_sweep(job: str | Path, out: str, address: str, working_dir: str | Path = ".",
                 python: str = "python", remote_root: str = "~/ntk-sweep",
                 shared_root: str | None = DEFAULT_SHARED_ROOT) -> str:
    """Submit ``ntk-sweep run JOB --out OUT --address auto`` as a Ray Job; returns the job id.

    The entrypoint runs on the head node with ``python`` as found on the PATH that Ray was started
    with (cluster.yaml activates the project's venv first), or the interpreter given; it must have
    this project installed. ``working_dir`` ships the job file and the code. The results go to
    :func:`remote_results_dir` on the head node; a job that stores Grams needs it under ``shared_root``.
    """
    sweep = load_sweep(job)  # fail here, not on the cluster
    check_grams_reachable(job, sweep, remote_results_dir(out, remote_root), shared_root)
    client = _jobs_client(address)
    job_path = Path(job)
    try:
        rel = job_path.resolve().relative_to(Path(working_dir).resolve()) if job_path.is_absolute() else job_path
    except ValueError:
        raise UserError(f"{job}: the job file must be inside --working-dir {working_dir} (it is shipped from "
                        "there)") from None
    dest = _shell_path(remote_results_dir(out, remote_root))
    try:
        return client.submit_job(
            entrypoint=f"{shlex.quote(python)} -m pipeline.cli run {shlex.quote(str(rel))} --out {dest} "
                       "--address auto",
            runtime_env={"working_dir": str(working_dir), "excludes": [".venv", ".git", "results", "*.zarr"]},
        )
    except RuntimeError as exc:
        raise UserError(f"{address}: job submission failed: {str(exc).strip().splitlines()[0]}") from None


def results_status(out: str | Path) -> str:
    """Progress of every sweep written into a results directory, one line each."""
    store = ResultsStore(out)
    sweeps = store.sweeps()
    if not sweeps:
        raise UserError(f"{out}: no sweep has been run into this directory")
    table = store.table()
    by_id = dict(zip(table.column("run_id").to_pylist(), table.column("status").to_pylist(), strict=True)) \
        if table.num_rows else {}
    lines = []
    for name, resolved in sweeps.items():
        ids = [r.run_id for r in Sweep.model_validate(resolved).expand()]
        counts = Counter(by_id.get(i, "missing") for i in ids)
        lines.append(f"{name}: {len(ids)} runs: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def job_status(job_id: str, address: str) -> str:
    client = _jobs_client(address)
    try:
        status = client.get_job_status(job_id)
    except RuntimeError as exc:
        raise UserError(f"{address}: no job {job_id!r} ({str(exc).strip().splitlines()[0]})") from None
    logs = client.get_job_logs(job_id).strip().splitlines()
    return f"{job_id}: {status}" + (f"\n{logs[-1]}" if logs else "")


if __name__ == "__main__":  # pragma: no cover
    print(run_sweep(sys.argv[1], sys.argv[2]).line())
