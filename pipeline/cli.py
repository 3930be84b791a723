"""The ``ntk-sweep`` command line: argument parsing only; every command calls one library function.

Errors from bad input (:class:`pipeline.errors.UserError`) print one line and exit with status 2.
``run`` exits with status 3 when runs are still missing at its end (its last line gives the count).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.errors import UserError


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from pipeline.fetch import fetch_dataset

    fetch_dataset(args.name, args.root, mirror=args.mirror, stall_s=args.stall_timeout)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.runner import run_sweep

    for flag, value in (("--max-parallel", args.max_parallel), ("--num-cpus", args.num_cpus)):
        if value is not None and value < 1:  # before anything is read or written
            raise UserError(f"{flag}: must be a positive integer, got {value}")
    summary = run_sweep(args.job, args.out, address=args.address, max_parallel=args.max_parallel,
                        data_dir=args.data_dir, num_cpus=args.num_cpus, retry_failed=args.retry_failed)
    print(f"results: {args.out}  (ntk-sweep query {args.out} \"SELECT * FROM runs LIMIT 5\")")
    print(summary.line())  # the last line: with "N missing" when runs are still missing (exit code 3)
    return 130 if summary.interrupted else 3 if summary.missing else 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.runner import remote_results_dir, submit_sweep

    job_id = submit_sweep(args.job, args.out, args.address, working_dir=args.working_dir, python=args.python,
                          remote_root=args.remote_root, shared_root=args.shared_root)
    print(f"results on the head node: {remote_results_dir(args.out, args.remote_root)}", file=sys.stderr)
    print(job_id)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.runner import job_status, results_status

    if Path(args.target).is_dir():
        print(results_status(args.target))
    elif args.address:
        print(job_status(args.target, args.address))
    else:
        raise UserError(f"{args.target}: not a results directory (for a Ray job id, pass --address)")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.plan import format_json, format_table, plan_sweep
    from pipeline.spec import load_sweep

    plan = plan_sweep(load_sweep(args.job), args.cluster, data_dir=args.data_dir, gpu=args.gpu)
    print(format_json(plan) if args.format == "json" else format_table(plan))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntk-sweep", description="Width sweeps of neural networks against their NTK limits."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a sweep (locally, or on a Ray cluster with --address)")
    run.add_argument("job", help="job file, e.g. jobs/quickstart.yaml")
    run.add_argument("--out", required=True, help="results directory (created; re-running resumes)")
    run.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray on this machine)")
    run.add_argument("--max-parallel", type=int, default=None, help="at most this many tasks in flight")
    run.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    run.add_argument("--data-dir", default=None, help="dataset root (default: $NTK_SWEEP_DATA, else a user cache)")
    run.add_argument("--retry-failed", action="store_true",
                     help="run the runs recorded status=failed again too (their new rows replace the failed ones)")
    run.set_defaults(func=_cmd_run)

    plan = sub.add_parser("plan", help="estimate a sweep's memory, FLOPs, time and disk, and check it against a "
                          "cluster; runs nothing")
    plan.add_argument("job", help="job file, e.g. jobs/mnist_width_sweep.yaml")
    plan.add_argument("--cluster", default=None, help="Ray cluster-launcher YAML (e.g. cluster.yaml): does every "
                      "task fit its node types, how many nodes can the sweep use")
    plan.add_argument("--format", choices=("table", "json"), default="table",
                      help="table (default) or json: one object per run")
    plan.add_argument("--gpu", default=None, help="GPU class for the time estimate when the job asks for GPUs "
                      "(default: the cluster's, else A10G)")
    plan.add_argument("--data-dir", default=None, help="dataset root recorded in the runs (nothing is read)")
    plan.set_defaults(func=_cmd_plan)

    submit = sub.add_parser("submit", help="submit a sweep to a Ray cluster as a Ray Job")
    submit.add_argument("job")
    submit.add_argument("--address", required=True, help="dashboard address, e.g. http://HEAD:8265")
    submit.add_argument("--out", default="results", help="results directory on the cluster's head node; a relative "
                        "path is taken under --remote-root")
    submit.add_argument("--remote-root", default="~/ntk-sweep",
                        help="head-node folder for a relative --out (default ~/ntk-sweep, where cluster.yaml "
                             "mounts the project)")
    submit.add_argument("--working-dir", default=".", help="folder shipped with the job (default: .)")
    submit.add_argument("--python", default="python", help="the cluster's interpreter (default: python on its PATH)")
    submit.add_argument("--shared-root", default="/mnt/shared",  # pipeline.runner.DEFAULT_SHARED_ROOT
                        help="the filesystem every node sees (cluster.yaml mounts it at %(default)s); a job that "
                             "stores Grams must put --out under it, because the workers write them")
    submit.set_defaults(func=_cmd_submit)

    status = sub.add_parser("status", help="progress of a results directory, or of a submitted job id")
    status.add_argument("target", help="RESULTS directory or Ray job id")
    status.add_argument("--address", default=None, help="dashboard address, for a job id")
    status.set_defaults(func=_cmd_status)

    data = sub.add_parser("data", help="dataset files: download and verify")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser("fetch", help="download the official archives and verify their MD5s")
    fetch.add_argument("name", help="mnist, fashion_mnist or cifar10")
    fetch.add_argument("--root", required=True, help="data directory to write into")
    fetch.add_argument("--mirror", default=None, help="base URL to download from instead of the default")
    fetch.add_argument("--stall-timeout", type=float, default=60.0, metavar="SECONDS",  # pipeline.fetch.STALL_S
                       help="fail a transfer that gets less than 64 KiB in this many seconds (default %(default)s)")
    fetch.set_defaults(func=_cmd_data_fetch)

    from pipeline import gram_job  # light module: heavy imports happen inside its main()

    gram = sub.add_parser("gram", help="analytic NNGP/NTK Gram of a dataset, tiled into a Zarr store")
    gram_job.add_arguments(gram)
    gram.set_defaults(func=gram_job.main)

    from pipeline import predict  # light module: heavy imports happen inside its main()

    predict_cmd = sub.add_parser("predict", help="infinite-width (NNGP/NTK kernel regression) test predictions, "
                                 "Grams on disk, out of core when large")
    predict.add_arguments(predict_cmd)
    predict_cmd.set_defaults(func=predict.main)

    from pipeline import query, report  # light modules: heavy imports happen inside their main()

    query_cmd = sub.add_parser("query", help="SQL (DuckDB) over the runs, curves and aggregate tables")
    query.add_arguments(query_cmd)
    query_cmd.set_defaults(func=query.main)

    report_cmd = sub.add_parser("report", help="aggregate a results directory and draw the report")
    report.add_arguments(report_cmd)
    report_cmd.set_defaults(func=report.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
