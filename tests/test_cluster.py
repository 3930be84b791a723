"""The sweep on a real multi-node Ray (``ray.cluster_utils.Cluster``: separate raylets on this machine):
nodes that join while the sweep runs receive work, because every pack is submitted up front."""

import os
import threading
import time
from pathlib import Path

import pytest

from pipeline.spec import parse_sweep
from pipeline.store import ResultsStore

JOB = {
    "name": "grow",
    "datasets": [{"name": "digits", "n_train": [120], "n_test": 60}],
    "architectures": [{"depth": [2]}],
    "widths": [64, 96, 128, 192, 256, 384],
    "seeds": 2,
    "optimizer": {"name": "gd", "lr_scale": 0.5, "steps": 150},
    "kernels": {"store": "init"},
    "resources": {"num_cpus": 1, "pack_seeds": False, "max_retries": 0},
    "device": "cpu",
}


@pytest.fixture
def one_cpu_head(monkeypatch):
    """A 1-CPU head, token-authenticated as cluster.yaml's nodes are: every node and the driver share
    the token (set before any of them starts, as the cluster launcher does)."""
    import secrets

    import ray
    from ray.cluster_utils import Cluster

    from pipeline.ray_session import _refresh_auth_mode

    # This process may already hold a token (an earlier local Ray in it read ~/.ray/auth_token): reuse it.
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    token = os.environ.get("RAY_AUTH_TOKEN") or (token_file.read_text().strip() if token_file.is_file() else "")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token or secrets.token_hex(16))
    _refresh_auth_mode()
    ray.shutdown()  # a Ray left by an earlier test in this process would take the sweep
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_nodes_that_join_mid_sweep_receive_work(tmp_path, one_cpu_head):
    from pipeline.runner import run_sweep

    out = tmp_path / "results"
    sweep = parse_sweep(JOB)
    outcome: dict = {}

    def drive() -> None:
        try:
            outcome["summary"] = run_sweep(sweep, out, address=one_cpu_head.address, progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            outcome["error"] = exc

    driver = threading.Thread(target=drive)
    driver.start()
    deadline = time.monotonic() + 120
    while not (out / "runs").exists() and driver.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)  # the first pack has landed on the head: the sweep is under way
    assert driver.is_alive(), outcome
    joined = [one_cpu_head.add_node(num_cpus=2) for _ in range(2)]
    driver.join(timeout=600)
    assert not driver.is_alive() and "error" not in outcome, outcome
    assert outcome["summary"].status == {"ok": 12}, outcome["summary"].line()

    rows = ResultsStore(out).table().to_pylist()
    head_id = one_cpu_head.head_node.node_id
    per_node = {}
    for row in rows:
        per_node[row["node"]] = per_node.get(row["node"], 0) + 1
    joined_ids = {node.node_id for node in joined}
    assert set(per_node) <= joined_ids | {head_id}, per_node
    assert sum(per_node.get(i, 0) for i in joined_ids) >= 4, per_node  # the joined nodes did most of it
    assert all(row["peak_rss_bytes"] > 0 for row in rows)
    # The Grams were written by the workers (on whichever node), in kernels.gram's layout.
    import zarr

    grams = zarr.open_group(str(out / "grams.zarr"), mode="r")
    for row in rows:
        assert grams[f"empirical/{row['run_id']}/init"].attrs["ntk_sweep_gram"]["gram"]["complete"]
