"""Ray set-up for ntk-sweep: start or join Ray, and check that a task can ever be scheduled.

:func:`init_ray` starts a local Ray on this machine (``address=None``) or connects to a cluster.
Usage stats are off; a local Ray keeps Ray's default token authentication (Ray >= 2.59 generates
the token in ``~/.ray/auth_token``) and listens on loopback only: GCS, raylet, object manager,
dashboard, dashboard agent, runtime-env agent, metrics exporters and every worker bind 127.0.0.1.

How: Ray derives every bind address of a node from its *node IP*; when that IP is loopback, each
server binds 127.0.0.1 (the C++ gRPC servers, the agents, the Prometheus exporters), otherwise
they bind all interfaces (``0.0.0.0`` / ``::``). ``ray.init(_node_ip_address="127.0.0.1")`` alone
does not get there on Linux: ``ray.init`` passes the value through
``ray._private.services.resolve_ip_for_localhost``, which replaces a loopback address by this
machine's routable IP unless ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` is false (Ray's
local-only mode, the default on macOS and Windows, set from the environment variable
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when ray is imported). :func:`init_ray` turns that flag off
for the duration of ``ray.init`` only, so a later connection to a real cluster is unaffected.

:func:`check_task_fits` turns "this task can never be scheduled" (Ray would otherwise wait forever,
printing a warning about an infeasible task) into a one-line :class:`~pipeline.errors.UserError`
naming the job field, and tells the caller when the sweep will wait for the autoscaler instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pipeline.errors import UserError  # noqa: E402

LOOPBACK = "127.0.0.1"

# Job fields that set each Ray resource of a training task (``memory`` is not a job field: it is the
# estimate of ``ntk-sweep plan`` for the largest run).
FIELD_OF = {"CPU": "resources.num_cpus", "GPU": "resources.num_gpus", "memory": "memory"}

_GIB = 1024**3
_EPS = 1e-6


def use_auth_token_if_present() -> None:
    """Set ``RAY_AUTH_MODE=token`` when a Ray token is available and the mode is not set yet.

    Clients of a token-authenticated cluster need ``RAY_AUTH_MODE=token`` before ray is first
    imported; a token is available as ``RAY_AUTH_TOKEN``, in ``RAY_AUTH_TOKEN_PATH`` or in
    ``~/.ray/auth_token``.
    """
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def _refresh_auth_mode() -> None:
    """Make an already imported ray see ``RAY_AUTH_MODE=token`` set after its import.

    Ray caches its configuration (``RayConfig``) when first read; Ray's own token set-up re-reads
    it with ``ray._raylet.Config.initialize("")`` after changing the variable. Best effort: on a
    Ray without token authentication this does nothing.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return
    try:
        from ray._raylet import AuthenticationMode, Config, get_authentication_mode
    except ImportError:
        return
    if get_authentication_mode() != AuthenticationMode.TOKEN:
        Config.initialize("")


@contextlib.contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """Within this block, Ray takes 127.0.0.1 as this machine's node IP (see the module docstring).

    Used around ``ray.init`` of a local Ray. Also what a driver needs to join a cluster whose
    nodes run on this machine's loopback only (the tests do).
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster at ``address``, or start a local Ray when ``address`` is None.

    Does nothing if Ray is already initialised in this process. A local Ray gets ``num_cpus`` CPUs
    (default: all of this machine's), Ray's default token authentication, a dashboard on
    127.0.0.1 and every socket on loopback only. It is always a new Ray of this process
    (``address="local"``): ``RAY_ADDRESS`` or a cluster started here by ``ray start`` is not
    joined. For a cluster, the token must be available as for any Ray client (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; see :func:`use_auth_token_if_present`).
    """
    if address:
        use_auth_token_if_present()
    import ray

    if ray.is_initialized():
        return
    if address:
        _refresh_auth_mode()
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        return
    with _loopback_node_ip():
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=True,
            dashboard_host=LOOPBACK,
            _node_ip_address=LOOPBACK,
            logging_level="WARNING",
            log_to_driver=False,
        )


# --------------------------------------------------------------------------------------------------
# Will a task ever fit?


@dataclass(frozen=True)
class NodeType:
    """A node type the autoscaler can start: its resources (None when unknown) and how many."""

    name: str
    resources: Mapping[str, float] | None
    max_workers: int  # -1: no limit
    limits: Mapping[str, float] = field(default_factory=dict)  # cluster-wide caps on resources


def _fits(have: Mapping[str, float], need: Mapping[str, float]) -> bool:
    return all(have.get(k, 0.0) >= v - _EPS for k, v in need.items())


def _num(x: float) -> str:
    return str(int(round(x))) if abs(x - round(x)) < _EPS else f"{x:.3g}"


def _gib(x: float) -> str:
    return f"{x / _GIB:.1f} GiB"


def _fmt_resources(res: Mapping[str, float], keys: list[str]) -> str:
    shown = [k for k in keys if k in res]
    parts = [f"{k}: {_gib(res[k]) if k.endswith('memory') else _num(res[k])}" for k in shown]
    return "{" + ", ".join(parts) + "}"


def _order(keys) -> list[str]:
    rank = {"GPU": 0, "CPU": 1, "memory": 2}
    return sorted(keys, key=lambda k: (rank.get(k, 3), k))


def _amount(k: str, v: float) -> str:
    """``1 GPU``, ``0.25 GPU``, ``2 GPUs``, ``11.2 GiB of memory``."""
    if k == "memory":
        return f"{_gib(v)} of memory"
    unit = k + ("s" if v > 1 + _EPS and k in ("CPU", "GPU") else "")
    return f"{_num(v)} {unit}"


def _shortfall_text(k: str, need: float, most: float, local: bool) -> str:
    """One clause ``FIELD: a task asks for ... but ...`` for a resource no node has enough of."""
    field_name = FIELD_OF.get(k, "resources")
    if k == "memory":
        where = "this machine's Ray node has" if local else "the largest node has"
        return (f"{field_name}: a task needs {_gib(need)} of memory (estimated by ntk-sweep plan for the largest "
                f"run) but {where} {_gib(most)}")
    if most <= _EPS:
        tail = f" (this machine: 0 {k}s)" if local and k in ("CPU", "GPU") else ""
        return f"{field_name}: a task asks for {_amount(k, need)} but no node has one{tail}"
    where = "this machine has" if local else "the largest node has"
    return f"{field_name}: a task asks for {_amount(k, need)} but {where} {_num(most)}"


def _describe_type(t: NodeType, need: Mapping[str, float]) -> str:
    """``gpu_worker has {CPU: 8, GPU: 1} and no memory``: a node type's resources relevant to ``need``,
    and the needed ones it does not declare (the autoscaler counts those as 0)."""
    res = t.resources or {}
    text = f"{t.name} has {_fmt_resources(res, _order(set(res) & ({'CPU', 'GPU', 'memory'} | set(need))))}"
    undeclared = [k for k in _order(need) if k not in res]
    return text + (f" and no {', '.join(undeclared)}" if undeclared else "")


def _readonly_from_status() -> bool | None:
    """From the autoscaler v1 status in the GCS: True when it runs Ray's *readonly* provider (a
    cluster started by hand or a local Ray, which starts no node), False for a real provider,
    None when there is no such status (autoscaler v2, or no monitor)."""
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        raw = _internal_kv_get("__autoscaling_status")
        report = json.loads(raw).get("autoscaler_report") if raw else None
    except Exception:
        return None
    mapping = (report or {}).get("node_type_mapping") or {}
    if not mapping:
        return None
    # The readonly provider names each node's type "node_<node id>" (format_readonly_node_type).
    return all(node_type == f"node_{node}" for node, node_type in mapping.items())


def _types_from_cluster_config() -> list[NodeType] | None:
    """Node types an autoscaler reported to the GCS (``ReportClusterConfig``; stored in the GCS
    internal KV, namespace ``__autoscaler``, key ``__autoscaler_cluster_config``), or None."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # older Ray without it, or no such key
        return None
    if config is None or not config.node_group_configs:
        return None
    limits = {k: float(v) for k, v in config.max_resources.items()}
    return [NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count), limits)
            for g in config.node_group_configs]


def _types_from_autoscaling_config(path: str) -> list[NodeType] | None:
    """Node types of a cluster-launcher autoscaling config (YAML or JSON), or None if unreadable."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).expanduser().read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict) or not isinstance(config.get("available_node_types"), dict):
        return None
    cluster_max = config.get("max_workers")  # missing: the provider's default, unknown here
    types = []
    for name, spec in config["available_node_types"].items():
        spec = spec or {}
        resources = spec.get("resources")
        # As Ray fills in defaults: 0 more of the head type, the cluster's max_workers of the others.
        default = 0 if name == config.get("head_node_type") else cluster_max if cluster_max is not None else -1
        max_workers = spec.get("max_workers", default)
        if cluster_max is not None and max_workers != -1:
            max_workers = min(max_workers, cluster_max)
        types.append(NodeType(str(name), None if resources is None else {k: float(v) for k, v in resources.items()},
                              int(max_workers)))
    return types


def _types_from_local_monitor(gcs_address: str) -> list[NodeType] | None:
    """Node types of the autoscaler monitor of this cluster when it runs on this machine (a driver
    on the head node, e.g. a submitted job): the ``--autoscaling-config`` file on its command line.
    A monitor without one runs the readonly provider, which starts no node: []. None when no
    monitor of this cluster runs here."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if not any(part.endswith("monitor.py") and "autoscaler" in part for part in cmd):
            continue
        if f"--gcs-address={gcs_address}" not in cmd:
            continue
        configs = [part.split("=", 1)[1] for part in cmd if part.startswith("--autoscaling-config=")]
        return _types_from_autoscaling_config(configs[0]) if configs else []
    return None


def autoscaler_node_types() -> list[NodeType] | None:
    """The node types the autoscaler of the connected cluster can start; [] when it can start none
    (no autoscaler: a local Ray or a cluster started by hand); None when this cannot be known here.

    Sources, first that answers: the cluster config an autoscaler reports to the GCS
    (``ray._private.state.state.get_cluster_config()``; Ray's OSS monitor of Ray 2.60 does not
    report it, newer autoscalers and other integrations may); the ``--autoscaling-config`` of the
    cluster's monitor process when the driver runs on the head node; the autoscaler status in the
    GCS, which tells a readonly autoscaler (no node types) from a real one (types unknown).
    """
    import ray

    types = _types_from_cluster_config()
    if types is not None:
        return types
    types = _types_from_local_monitor(ray.get_runtime_context().gcs_address)
    if types is not None:
        return types
    return [] if _readonly_from_status() else None


def check_task_fits(demand: Mapping[str, float], *, local: bool, what: str) -> str | None:
    """Check that a task asking for ``demand`` can be scheduled on the connected Ray cluster.

    ``demand``: one task's Ray resources, e.g. ``{"CPU": 2, "GPU": 0.25, "memory": 3.2e9}``
    (memory in bytes, as Ray's ``memory=`` option). Call after :func:`init_ray`. Returns None when
    some alive node's total resources can hold the task; for a cluster whose autoscaler can start
    a node type that holds it, returns one line saying what the sweep waits for (the caller prints
    it once). Otherwise (a local Ray, ``local=True``, or a cluster whose autoscaler cannot start
    such a node) raises :class:`UserError` with one line ``WHAT: FIELD: ...`` naming the job field
    (``resources.num_cpus``, ``resources.num_gpus``, or ``memory``: the plan's estimate). When the
    autoscaler's node types cannot be read from here (a driver off the head node of a cluster whose
    autoscaler does not report them), returns a waiting line that says so.
    """
    import ray

    need = {k: float(v) for k, v in demand.items() if v and float(v) > 0}
    nodes = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
    if not need or any(_fits(n, need) for n in nodes):
        return None

    keys = _order(need)
    most = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in keys}
    short = [k for k in keys if most[k] < need[k] - _EPS]
    if short:
        missing = ", ".join(_amount(k, need[k]) for k in short)
        clauses = [_shortfall_text(k, need[k], most[k], local) for k in short]
    else:  # every resource exists somewhere, but never all on one node
        missing = f"all of {_fmt_resources(need, keys)}"
        largest = ", ".join(_fmt_resources(n, keys) for n in nodes[:4])
        clauses = [f"{FIELD_OF.get(keys[0], 'resources')}: a task asks for {_fmt_resources(need, keys)} "
                   f"but no node has all of it (nodes: {largest})"]

    suffix = ""
    if not local:
        types = autoscaler_node_types()
        if types is None:
            return (f"waiting for a node with {_fmt_resources(need, keys)} (no node now has {missing} in total; "
                    f"the autoscaler's node types cannot be read from this machine, so ntk-sweep cannot tell "
                    f"whether one will be started)")
        startable = [t for t in types if t.max_workers != 0]
        fitting = [t for t in startable
                   if t.resources is not None and _fits(t.resources, need)
                   and all(t.limits.get(k, math.inf) >= v - _EPS for k, v in need.items())]
        if fitting:
            t = fitting[0]
            shown = _order(set(t.resources) & ({"CPU", "GPU", "memory"} | set(need)))
            return (f"waiting for the autoscaler to start a node with {_fmt_resources(t.resources, shown)} "
                    f"(node type {t.name}; no node now has {missing} in total)")
        if any(t.resources is None for t in startable):
            return (f"waiting for the autoscaler to start a node with {_fmt_resources(need, keys)} (no node now "
                    f"has {missing} in total; some of its node types do not declare their resources)")
        if startable:
            listed = "; ".join(_describe_type(t, need) for t in startable[:4])
            suffix = f" (and no node type of the autoscaler can hold it: {listed})"
        else:
            suffix = " (and this cluster has no autoscaler that could start a bigger node)"
    message = f"{what}: " + "; ".join(clauses) + suffix
    raise UserError(" ".join(message.split()))
