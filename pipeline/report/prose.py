"""The report's prose: the named blocks of ``report.md.tmpl``, read once and filled in.

See the head of ``report.md.tmpl`` for its format: ``@@ NAME`` starts a block, ``@{field}`` is a field.
"""

from __future__ import annotations

import string
from functools import cache
from importlib import resources

TEMPLATE = "report.md.tmpl"
BLOCK = "@@ "


class Block(string.Template):
    """A block of the template: ``@{field}`` fields, so that ``$`` stays free for LaTeX."""

    delimiter = "@"


@cache
def blocks() -> dict[str, Block]:
    """Every block of the template by name."""
    text = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    found: dict[str, list[str]] = {}
    current: list[str] | None = None  # the lines before the first block are the template's own notes
    for line in text.split("\n"):
        if line.startswith(BLOCK):
            current = found.setdefault(line[len(BLOCK):].strip(), [])
        elif current is not None:
            current.append(line)
    return {name: Block("\n".join(lines).strip("\n")) for name, lines in found.items()}


def lines(name: str, **fields: object) -> list[str]:
    """Block ``name`` with its fields filled in, as report.md lines."""
    return blocks()[name].substitute(fields).split("\n")


def text(name: str, **fields: object) -> str:
    """Block ``name`` with its fields filled in, as one string (a block of one line: that line)."""
    return blocks()[name].substitute(fields)


def heading(name: str) -> str:
    """The first line of block ``name``: the heading of its section."""
    return blocks()[name].template.split("\n")[0]
