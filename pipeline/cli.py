"""The ``ntk-sweep`` command line: argument parsing only; every command calls one library function.

Errors from bad input (:class:`pipeline.errors.UserError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.errors import UserError


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from pipeline.fetch import fetch_dataset

    fetch_dataset(args.name, args.root, mirror=args.mirror)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntk-sweep", description="Width sweeps of neural networks against their NTK limits."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset files: download and verify")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser("fetch", help="download the official archives and verify their MD5s")
    fetch.add_argument("name", help="mnist, fashion_mnist or cifar10")
    fetch.add_argument("--root", required=True, help="data directory to write into")
    fetch.add_argument("--mirror", default=None, help="base URL to download from instead of the default")
    fetch.set_defaults(func=_cmd_data_fetch)

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
