"""The one reader of the YAML files a user hands in (job files, Ray cluster configs), with bounds.

Before anything is parsed, a file over :data:`MAX_YAML_BYTES` or one that is not UTF-8 is refused; the
YAML event stream (libyaml's parser where PyYAML has it) is then checked for nesting deeper than
:data:`MAX_NESTING` before any object is built; and the objects built (anchors and aliases expanded) must
number at most :data:`MAX_NODES`. Each refusal is a one-line :class:`~pipeline.errors.UserError` naming
the file. The limits are far above what a job file needs (the real studies: about 2 KB, depth 4, 100 values)
and far below what costs noticeable time or memory (a 1 MB file parses in about a second).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError

MAX_YAML_BYTES = 1 << 20  # 1 MiB
MAX_NESTING = 32  # mappings and sequences inside one another
MAX_NODES = 100_000  # scalars, mappings and sequences, aliases counted as often as they are used

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~5x faster, same safe constructors
_OPEN = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSE = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def _read_bounded(path: Path, kind: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_YAML_BYTES + 1)  # never more, whatever stat says (pipes, /proc, growing files)
    except OSError as exc:
        raise UserError(f"{path}: cannot read {kind} file ({exc.strerror or exc})") from None
    if len(data) > MAX_YAML_BYTES:
        raise UserError(f"{path}: {kind} file is larger than {MAX_YAML_BYTES // 1024} KiB; refused before parsing "
                        "(a job file is a few KB)")
    return data


def _decode(data: bytes, path: Path, kind: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UserError(f"{path}: line {line} column {column}: {kind} file is not valid UTF-8 "
                        f"(byte 0x{data[exc.start]:02x})") from None


def _yaml_error(exc: yaml.YAMLError, path: Path) -> UserError:
    mark = getattr(exc, "problem_mark", None)
    where = f" line {mark.line + 1}" if mark else ""
    return UserError(f"{path}:{where} invalid YAML: {one_line(getattr(exc, 'problem', None) or exc)}")


def _check_nesting(text: str, path: Path, kind: str) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, _OPEN):
            depth += 1
            if depth > MAX_NESTING:
                mark = event.start_mark
                raise UserError(f"{path}: line {mark.line + 1}: {kind} file nests deeper than {MAX_NESTING} levels")
        elif isinstance(event, _CLOSE):
            depth -= 1


def _count_nodes(data: Any, path: Path, kind: str) -> None:
    """Refuse more than :data:`MAX_NODES` nodes or :data:`MAX_NESTING` levels once aliases are expanded
    (``a: &a [1, 1]`` then ``b: &b [*a, *a]`` ... doubles at each line). Shared objects are sized once."""
    sizes: dict[int, int] = {}

    def size(obj: Any, depth: int) -> int:
        if not isinstance(obj, (dict, list)):
            return 1
        if depth > MAX_NESTING:  # also catches a recursive alias (&a [*a])
            raise UserError(f"{path}: {kind} file nests deeper than {MAX_NESTING} levels (through aliases)")
        known = sizes.get(id(obj))
        if known is not None:
            return known
        children = [*obj.keys(), *obj.values()] if isinstance(obj, dict) else obj
        total = 1
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_NODES:
                raise UserError(f"{path}: {kind} file has more than {MAX_NODES:,} values (aliases expanded)")
        sizes[id(obj)] = total
        return total

    size(data, 1)


def read_yaml_file(path: str | Path, kind: str) -> Any:
    """The parsed YAML of ``path`` (``kind``: ``job``, ``cluster``, named in errors).

    Raises a one-line :class:`UserError` naming the file for: an unreadable file, more than
    :data:`MAX_YAML_BYTES`, bytes that are not UTF-8 (these two before parsing), nesting deeper than
    :data:`MAX_NESTING` (before any object is built), more than :data:`MAX_NODES` values once aliases are
    expanded, and invalid YAML (``PATH: line L invalid YAML: ...``).
    """
    path = Path(path)
    text = _decode(_read_bounded(path, kind), path, kind)
    try:
        _check_nesting(text, path, kind)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, path) from None
    except RecursionError:  # not reached after _check_nesting; kept so no traceback can escape
        raise UserError(f"{path}: {kind} file nests too deeply") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a tagged or date-like scalar that does not convert
        raise UserError(f"{path}: invalid YAML value: {one_line(exc)}") from None
    _count_nodes(data, path, kind)
    return data
