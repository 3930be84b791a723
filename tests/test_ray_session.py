"""pipeline.ray_session on real Ray (no mocks): the sockets of a local Ray, and check_task_fits on a local Ray
and on a fake-provider autoscaling cluster.

The autoscaling cluster is what ``ray.cluster_utils.AutoscalingCluster`` builds, started by hand:
AutoscalingCluster itself cannot be used here, as its constructor reads
``ray/autoscaler/_private/fake_multi_node/example.yaml``, which the Ray 2.60 wheel does not ship (the
``fake_multinode`` provider type needs that file for its defaults; the ``external`` provider type loads the
same FakeMultiNodeProvider without it), and its start()/shutdown() run ``ray stop --force``, which would kill
every Ray process of this user on the machine. Here the head runs in its own temp dir on loopback only, and
exactly its processes are ended afterwards (found by that temp dir, a marker in their environment, and the
process tree).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pipeline.errors import UserError  # noqa: E402
from pipeline.ray_session import (  # noqa: E402
    _loopback_node_ip,
    _types_from_autoscaling_config,
    autoscaler_node_types,
    check_task_fits,
    init_ray,
)

JOB = "jobs/x.yaml"


def _is_loopback(ip: str) -> bool:
    """127.0.0.1 or ::1, also as the IPv4-mapped ::ffff:127.0.0.1 of a dual-stack socket."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr) in ("127.0.0.1", "::1")


def _one_line_user_error(demand: dict, *, local: bool) -> str:
    with pytest.raises(UserError) as exc:
        check_task_fits(demand, local=local, what=JOB)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{JOB}: "), msg
    return msg


def test_node_types_of_the_repos_cluster_yaml():
    # What the monitor's --autoscaling-config gives on a head started from cluster.yaml (the bootstrap copy
    # on AWS also holds the memory the cluster launcher fills in for worker types).
    path = Path(__file__).parents[1] / "cluster.yaml"
    declared = yaml.safe_load(path.read_text())["available_node_types"]["gpu_worker"]
    types = {t.name: t for t in _types_from_autoscaling_config(str(path))}
    assert types["head"].max_workers == 0
    assert dict(types["gpu_worker"].resources) == {k: float(v) for k, v in declared["resources"].items()}
    assert types["gpu_worker"].resources["GPU"] == 1.0
    assert types["gpu_worker"].max_workers == declared["max_workers"]


@pytest.mark.slow
class TestLocalRay:
    """One local Ray (1 CPU, no GPU) started by init_ray, shared by these tests."""

    @pytest.fixture(scope="class")
    @classmethod
    def ray(cls):
        import ray

        ray.shutdown()  # a Ray left by an earlier test in this process (in-process sweeps keep theirs)
        init_ray(None, num_cpus=1)
        try:
            yield ray
        finally:
            ray.shutdown()

    def test_every_listening_socket_is_on_loopback(self, ray):
        @ray.remote(num_cpus=0.5)
        def worker_pid() -> int:
            time.sleep(0.5)
            return os.getpid()

        worker_pids = set(ray.get([worker_pid.remote() for _ in range(4)], timeout=60))
        # The driver (this process) and everything the local Ray started: gcs_server, raylet, dashboard,
        # monitor, log monitor, dashboard and runtime-env agents, workers.
        me = psutil.Process()
        procs = {p.pid: p for p in me.children(recursive=True)} | {me.pid: me}
        assert worker_pids <= set(procs)
        names = {}
        for pid, p in procs.items():
            with contextlib.suppress(psutil.Error):
                names[pid] = p.name()

        sockets = [c for c in psutil.net_connections(kind="inet") if c.pid in procs and c.laddr]
        listening = [c for c in sockets if c.status == psutil.CONN_LISTEN]
        udp = [c for c in sockets if c.type == socket.SOCK_DGRAM]
        exposed = [f"{names.get(c.pid, '?')} (pid {c.pid}) on {c.laddr.ip}:{c.laddr.port}"
                   for c in listening + udp if not _is_loopback(c.laddr.ip)]
        assert not exposed, "Ray listens beyond loopback: " + ", ".join(exposed)

        # The check saw the components it is about.
        listeners = {c.pid for c in listening}
        seen = {names.get(pid, "?") for pid in listeners}
        assert {"gcs_server", "raylet"} <= seen, seen
        assert any("DashboardAgent" in n for n in seen), seen
        assert any("RuntimeEnvAgent" in n for n in seen), seen
        assert me.pid in listeners  # the driver's own core-worker server
        assert worker_pids & listeners, (worker_pids, seen)  # the workers' servers

    def test_gpu_on_a_machine_without_gpu_is_a_user_error(self, ray):
        msg = _one_line_user_error({"GPU": 1}, local=True)
        assert msg.startswith(f"{JOB}: resources.num_gpus: ")
        assert "1 GPU" in msg and "this machine: 0 GPUs" in msg

    def test_one_cpu_fits(self, ray):
        assert check_task_fits({"CPU": 1}, local=True, what=JOB) is None
        assert check_task_fits({}, local=True, what=JOB) is None
        assert check_task_fits({"CPU": 1, "memory": 2**20, "GPU": 0}, local=True, what=JOB) is None

    def test_too_many_cpus_and_too_much_memory(self, ray):
        msg = _one_line_user_error({"CPU": 4}, local=True)
        assert msg == f"{JOB}: resources.num_cpus: a task asks for 4 CPUs but this machine has 1"
        msg = _one_line_user_error({"CPU": 1, "memory": 2**60}, local=True)
        assert msg.startswith(f"{JOB}: memory: a task needs 1073741824.0 GiB of memory (estimated by ntk-sweep plan")

    def test_a_cluster_without_autoscaler_cannot_wait(self, ray):
        # A local Ray is a one-node cluster whose monitor runs the readonly provider: it starts no node.
        assert autoscaler_node_types() == []
        msg = _one_line_user_error({"GPU": 0.25}, local=False)
        assert msg.startswith(f"{JOB}: resources.num_gpus: a task asks for 0.25 GPU but no node has one")
        assert "no autoscaler" in msg

    def test_node_types_reported_to_the_gcs(self, ray):
        # The channel newer autoscalers use: a ClusterConfig in the GCS (ReportClusterConfig RPC).
        from ray.core.generated import autoscaler_pb2

        gcs = ray._private.worker.global_worker.gcs_client
        config = autoscaler_pb2.ClusterConfig()
        group = config.node_group_configs.add()
        group.name, group.max_count = "gpu_worker", 4
        group.resources["CPU"], group.resources["GPU"] = 8, 1
        gcs.report_cluster_config(config.SerializeToString())
        try:
            line = check_task_fits({"CPU": 2, "GPU": 0.25}, local=False, what=JOB)
            assert line == ("waiting for the autoscaler to start a node with {GPU: 1, CPU: 8} "
                            "(node type gpu_worker; no node now has 0.25 GPU, 2 CPUs in total)")
            # A local Ray never waits, whatever is reported.
            _one_line_user_error({"GPU": 0.25}, local=True)
            msg = _one_line_user_error({"GPU": 2}, local=False)
            assert msg.endswith("(and no node type of the autoscaler can hold it: gpu_worker has {GPU: 1, CPU: 8})")
        finally:
            gcs.report_cluster_config(autoscaler_pb2.ClusterConfig().SerializeToString())
        assert autoscaler_node_types() == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_marker(pid: int, marker: str) -> bool:
    """Whether the process's initial environment holds NTK_SWEEP_TEST_RAY=marker. Read raw: Ray's processes
    overwrite part of that block with their title (``ray::DashboardAgent``), which stops psutil's parser."""
    try:
        return f"NTK_SWEEP_TEST_RAY={marker}".encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def _end_cluster_processes(tmp: str, marker: str) -> None:
    """End exactly the processes of the fixture's cluster: those whose command line names its temp dir
    (gcs_server, raylets, monitor, log monitor) or whose environment carries its marker, and all their
    descendants (agents and workers, whose command line is their title), collected before any is ended."""
    roots = []
    for p in psutil.process_iter():
        try:
            if tmp in " ".join(p.cmdline()) or _has_marker(p.pid, marker):
                roots.append(p)
        except psutil.Error:
            continue
    procs = {p.pid: p for p in roots}
    for p in roots:
        try:
            procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            continue
    procs.pop(os.getpid(), None)
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=3)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=3)


HEAD_CPUS = 1
WORKER_TYPE = {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1}


@pytest.mark.slow
class TestAutoscalingCluster:
    """A head with 1 CPU and an autoscaler (fake multi-node provider) that can start one node of type
    gpu_worker {CPU: 2, GPU: 1}: the tests run in order, the last one makes it start that node."""

    @pytest.fixture(scope="class")
    @classmethod
    def ray(cls):
        import ray

        assert not ray.is_initialized()
        tmp = tempfile.mkdtemp(prefix="ntkrs", dir="/tmp")  # short: Ray's unix sockets live below it
        marker = uuid.uuid4().hex
        port = _free_port()
        config = {
            "cluster_name": "ntk-sweep-test", "max_workers": 1, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
            "provider": {
                "type": "external",
                "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                "gcs_address": f"127.0.0.1:{port}", "use_node_id_as_ip": True,
                "disable_node_updaters": True, "disable_launch_config_check": True,
            },
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": HEAD_CPUS}, "node_config": {}, "max_workers": 0},
                "gpu_worker": WORKER_TYPE,
            },
            "head_node_type": "ray.head.default",
            # The rest of what the v1 autoscaler reads (fake_multi_node/example.yaml in Ray's source tree).
            "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }
        config_path = Path(tmp) / "autoscaling.json"
        config_path.write_text(json.dumps(config))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update({
            "NTK_SWEEP_TEST_RAY": marker,
            "RAY_FAKE_CLUSTER": "1",  # FakeMultiNodeProvider refuses to run without it
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "AUTOSCALER_METRIC_PORT": str(_free_port()),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's local-only mode: every node on 127.0.0.1
            "RAY_USAGE_STATS_ENABLED": "0",
        })
        ray_cli = Path(sys.executable).with_name("ray")
        cmd = [str(ray_cli), "start", "--head", f"--port={port}", f"--temp-dir={tmp}",
               f"--autoscaling-config={config_path}", f"--num-cpus={HEAD_CPUS}", "--include-dashboard=false",
               f"--ray-client-server-port={_free_port()}", "--dashboard-agent-listen-port=0",
               "--disable-usage-stats"]
        try:
            started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
            if started.returncode != 0:
                pytest.fail(f"ray start failed: {started.stderr[-2000:]}")
            with _loopback_node_ip():  # the head is on loopback: join it there, not on this machine's IP
                init_ray(f"127.0.0.1:{port}")
            yield ray
        finally:
            ray.shutdown()
            _end_cluster_processes(tmp, marker)
            shutil.rmtree(tmp, ignore_errors=True)

    def test_reads_the_autoscaler_node_types(self, ray):
        types = {t.name: t for t in autoscaler_node_types()}
        assert dict(types["gpu_worker"].resources) == {"CPU": 2.0, "GPU": 1.0}
        assert types["gpu_worker"].max_workers == 1
        assert types["ray.head.default"].max_workers == 0

    def test_fits_on_the_head(self, ray):
        assert check_task_fits({"CPU": 1}, local=False, what=JOB) is None

    def test_too_big_for_every_node_type(self, ray):
        msg = _one_line_user_error({"GPU": 2}, local=False)
        assert msg.startswith(f"{JOB}: resources.num_gpus: a task asks for 2 GPUs but no node has one")
        assert msg.endswith("(and no node type of the autoscaler can hold it: gpu_worker has {GPU: 1, CPU: 2})")
        msg = _one_line_user_error({"CPU": 4}, local=False)
        assert msg.startswith(f"{JOB}: resources.num_cpus: a task asks for 4 CPUs but the largest node has 1")

    def test_memory_a_node_type_does_not_declare(self, ray):
        # Ray's autoscaler counts an undeclared resource as 0: it starts no gpu_worker for a task with memory=.
        msg = _one_line_user_error({"GPU": 0.25, "memory": 2**30}, local=False)
        assert "resources.num_gpus" in msg and "gpu_worker has {GPU: 1, CPU: 2} and no memory" in msg

    def test_waits_for_the_autoscaler_and_it_does_start_the_node(self, ray):
        line = check_task_fits({"CPU": 1, "GPU": 0.25}, local=False, what=JOB)
        assert line == ("waiting for the autoscaler to start a node with {GPU: 1, CPU: 2} "
                        "(node type gpu_worker; no node now has 0.25 GPU in total)")

        @ray.remote(num_cpus=1, num_gpus=0.25)
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        head = ray.get_runtime_context().get_node_id()
        assert ray.get(where.remote(), timeout=60) != head  # ran on the node the autoscaler started
        assert check_task_fits({"CPU": 1, "GPU": 0.25}, local=False, what=JOB) is None
