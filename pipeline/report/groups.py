"""The runs as the report sees them: groups of runs with their labels, regime sets, and a row's RunConfig.

A group is one setting of every config field but seed and width (see :mod:`pipeline.aggregate`); the
report draws its figures and writes its sections per group, and :class:`Group` collects what was drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ALWAYS_IN_LABEL = ("dataset", "n_train", "depth", "activation")
PARAM_NAMES = {"ntk": "NTK", "standard": "standard", "mup": "μP"}  # also the order within a regime set
REGIME_MEASURES = ("kernel_rel_change", "kernel_rel_dev_init", "rmse_nn_lin_test", "relu_flip_frac",
                   "weight_rel_change", "weight_distance")  # compared across parameterisations


@dataclass
class Group:
    """One group of runs: its settings, a label, and what the report wrote for it."""

    index: int
    group_id: str
    settings: dict[str, Any]
    label: str
    suffix: str
    figures: dict[str, str] = field(default_factory=dict)
    tables: dict[str, list[str]] = field(default_factory=dict)  # markdown lines of a section's table
    skipped: dict[str, str] = field(default_factory=dict)  # section -> why it is not shown
    threshold: float | None = None  # interpolation-threshold width, where the double descent is drawn


def make_groups(runs) -> list[Group]:
    """One :class:`Group` per group of ``runs`` (``aggregate.split_runs``), labelled by the settings
    that always matter and those that vary between the groups."""
    settings = runs.groups.to_pylist()
    varying = [c for c in runs.groups.column_names
               if c not in ALWAYS_IN_LABEL and len({repr(s[c]) for s in settings}) > 1]
    groups = []
    for i, s in enumerate(settings):
        parts = [str(s.get("dataset", "?"))]
        parts += [f"{c}={fmt_value(s[c])}" for c in ("n_train", "depth") if c in s]
        parts += [str(s["activation"])] if "activation" in s else []
        parts += [f"{c}={fmt_value(s[c])}" for c in varying]
        suffix = "" if len(settings) == 1 else f"_g{i + 1}"
        groups.append(Group(i, runs.group_ids[i], s, ", ".join(parts), suffix))
    return groups


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)


def param(g: Group) -> str:
    """The group's parameterisation (``ntk`` when the runs predate the field)."""
    return str(g.settings.get("parameterization", "ntk"))


def regime_clusters(groups: list[Group]) -> list[list[Group]]:
    """Sets of groups whose settings differ only in ``parameterization`` (two or more parameterisations),
    ordered ntk, standard, mup within a set; sets in the order of their first group."""
    clusters: dict[str, list[Group]] = {}
    for g in groups:
        key = repr(sorted((k, repr(v)) for k, v in g.settings.items() if k != "parameterization"))
        clusters.setdefault(key, []).append(g)
    order = list(PARAM_NAMES)
    out = []
    for members in clusters.values():
        if len({param(g) for g in members}) > 1:
            out.append(sorted(members, key=lambda g: order.index(param(g)) if param(g) in order else len(order)))
    return out


def hidden_layers(fits_by_group: list[dict]) -> list[str]:
    """The per-layer weight-change measures (``weight_rel_change_layer<l>``) of any of the fits, by layer."""
    names = set().union(*[set(f) for f in fits_by_group]) if fits_by_group else set()
    layers = sorted((m for m in names if m.startswith("weight_rel_change_layer")), key=lambda m: int(m[23:]))
    return layers


def layer_role(i: int, layers: int) -> str:
    """``input``, ``hidden`` or ``output``: what weight matrix ``i`` of ``layers`` is."""
    return "input" if i == 0 else "output" if i == layers - 1 else "hidden"
