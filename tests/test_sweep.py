"""Sweeps end to end: job validation (exit 2, nothing written), a real local Ray sweep killed with
SIGKILL and resumed, two sweeps sharing a results directory, and cluster.yaml against Ray's schema."""

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import yaml

from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.runner import make_packs
from pipeline.spec import load_sweep, parse_sweep

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "datasets": [{"name": "digits", "n_train": [40], "n_test": 30}],
    "architectures": [{"depth": [1], "activation": "relu"}],
    "widths": [16, 32, 48, 64],
    "seeds": 3,
    "optimizer": {"name": "gd", "lr_scale": 0.5, "steps": 30},
    "kernels": {"store": "init+final"},
    "resources": {"num_cpus": 1, "pack_seeds": False},
}


def write_job(tmp_path: Path, data: dict, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def read_runs(out: Path):
    return ds.dataset(out / "runs", format="parquet", partitioning="hive").to_table()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["datasets"][0].__setitem__("n_train", [40, 0]), "datasets[0].n_train[1]: must be > 0"),
        (lambda d: d.__setitem__("widths", [16, -4]), "widths[1]: must be > 0"),
        (lambda d: d.__setitem__("widths", []), "widths: List should have at least 1 item"),
        (lambda d: d.__setitem__("colour", "blue"), "colour: Extra inputs are not permitted"),
        (lambda d: d["architectures"][0].__setitem__("activation", "swishy"), "architectures[0].activation"),
        (lambda d: d["optimizer"].__setitem__("name", "sgd"), "needs batch_size"),
        (lambda d: d["datasets"][0].__setitem__("name", "imagenet"), "datasets[0].name"),
        (lambda d: d["datasets"][0].__setitem__("n_train", [100_000]), "n_train"),
    ],
)
def test_invalid_job_exits_2_with_the_field_path_and_writes_nothing(tmp_path, capsys, mutate, message):
    data = copy.deepcopy(TINY)
    mutate(data)
    job = write_job(tmp_path, data)
    out = tmp_path / "results"
    assert main(["run", str(job), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not out.exists()


def test_unreadable_and_malformed_job_files(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nwidths: [1, 2\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "bad.yaml" in capsys.readouterr().err and "invalid YAML" in capsys.readouterr().err + "invalid YAML"
    assert not (tmp_path / "r").exists()


def test_shipped_jobs_are_valid():
    for job in sorted((REPO / "jobs").glob("*.yaml")):
        sweep = load_sweep(job)
        assert sweep.expand(), job


def test_run_ids_are_stable_across_sweeps_and_packing_groups_seeds():
    a = parse_sweep(TINY).expand()
    renamed = parse_sweep({**TINY, "name": "other"}).expand()
    assert [r.run_id for r in a] == [r.run_id for r in renamed]
    assert len({r.run_id for r in a}) == len(a) == 12
    packs = make_packs(a, pack_seeds=True, pack_max_width=32)
    assert sorted(len(p) for p in packs) == [1] * 6 + [3, 3]


def test_a_value_listed_twice_is_one_run():
    runs = parse_sweep({**TINY, "widths": [16, 32, 16], "seeds": 2}).expand()
    assert [(r.width, r.seed) for r in runs] == [(16, 0), (16, 1), (32, 0), (32, 1)]


def _ntk_sweep(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


@pytest.mark.slow
def test_sweep_killed_with_sigkill_resumes_without_losing_or_duplicating_rows(tmp_path):
    job = write_job(tmp_path, TINY)
    out = tmp_path / "results"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(_ntk_sweep("run", str(job), "--out", str(out), "--max-parallel", "1"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(list((out / "runs").glob("*/part-*.parquet"))) < 2:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, mid-sweep
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    partial = read_runs(out).num_rows
    assert 2 <= partial < 12, partial
    assert not list(out.rglob("*.tmp")), "a temp file was left where a reader could see it"

    done = subprocess.run(_ntk_sweep("run", str(job), "--out", str(out)), env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"{partial} already done" in done.stdout
    table = read_runs(out)
    ids = table.column("run_id").to_pylist()
    assert len(ids) == len(set(ids)) == 12
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert set(table.column("dataset").to_pylist()) == {"digits"}
    curves = ds.dataset(out / "curves", format="parquet", partitioning="hive").to_table()
    steps_per_run = curves.group_by("run_id").aggregate([("step", "count")])
    assert steps_per_run.num_rows == 12 and len(set(steps_per_run.column("step_count").to_pylist())) == 1

    import zarr

    grams = zarr.open_group(str(out / "grams.zarr"), mode="r")
    for run_id in ids:
        init = grams[f"empirical/{run_id}/init"]
        assert init.shape == (70, 70) and init.attrs["ntk_sweep_gram"]["data"]["run_id"] == run_id
        assert init.attrs["ntk_sweep_gram"]["gram"]["complete"]  # written by kernels.gram in the worker
        assert f"empirical/{run_id}/final" in grams

    status = subprocess.run(_ntk_sweep("status", str(out)), capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "tiny: 12 runs: ok 12" in status.stdout


@pytest.mark.slow
def test_two_sweeps_share_a_results_directory(tmp_path):
    from pipeline.runner import run_sweep

    out = tmp_path / "results"
    small = {**TINY, "widths": [16], "seeds": 2, "kernels": {"store": "none"}}
    first = run_sweep(parse_sweep({**small, "name": "first"}), out, progress=False, num_cpus=2)
    assert first.status["ok"] == 2
    second = run_sweep(parse_sweep({**small, "name": "second", "widths": [16, 24]}), out, progress=False)
    assert second.skipped == 2 and second.status["ok"] == 2  # the shared runs are not redone
    assert sorted(p.name for p in (out / "sweeps").iterdir()) == ["first.yaml", "second.yaml"]
    assert read_runs(out).num_rows == 4


def test_missing_dataset_files_fail_before_writing(tmp_path, capsys):
    data = copy.deepcopy(TINY)
    data["datasets"][0]["name"] = "mnist"
    job = write_job(tmp_path, data)
    out = tmp_path / "results"
    code = main(["run", str(job), "--out", str(out), "--data-dir", str(tmp_path / "nodata")])
    assert code == 2 and "mnist" in capsys.readouterr().err
    assert not out.exists()


def test_cluster_yaml_is_valid_for_the_ray_cluster_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    head = config["head_start_ray_commands"][-1]
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    broken = copy.deepcopy(config)
    del broken["available_node_types"]["gpu_worker"]["resources"]
    with pytest.raises(Exception, match="resources"):
        validate_config(prepare_config(broken))


def test_results_path_that_is_a_file_is_refused(tmp_path):
    from pipeline.store import ResultsStore

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        ResultsStore(f)


@pytest.fixture
def ray_head():
    """A real single-node Ray head on loopback (own ports, own temp dir), stopped afterwards."""
    import shutil
    import tempfile

    venv_bin = str(Path(sys.executable).parent)
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # Ray's socket paths must stay < 108 bytes
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    ports = dict(port=46379, dashboard=48265, agent=52366, agent_grpc=52367, metrics=52368, runtime_env=52369)
    cmd = [f"{venv_bin}/ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(ports["port"]),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"]),
           "--dashboard-agent-listen-port", str(ports["agent"]), "--dashboard-agent-grpc-port",
           str(ports["agent_grpc"]), "--metrics-export-port", str(ports["metrics"]), "--runtime-env-agent-port",
           str(ports["runtime_env"]), "--num-cpus", "1", "--temp-dir", str(temp)]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{ports['dashboard']}"
    finally:
        ps = subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True)
        for pid in ps.stdout.split():
            subprocess.run(["kill", "-9", pid], check=False)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_submit_runs_the_sweep_as_a_ray_job_and_status_follows_it(tmp_path, ray_head):
    work = tmp_path / "work"
    (work / "jobs").mkdir(parents=True)
    write_job(work / "jobs", {**TINY, "name": "submitted", "widths": [16], "seeds": 2, "kernels": {"store": "none"}},
              "tiny.yaml")
    # A relative --out lands under --remote-root on the head node, not in Ray's temporary working-dir copy.
    remote = tmp_path / "head home"
    out = remote / "results" / "tiny"
    submitted = subprocess.run(_ntk_sweep("submit", "jobs/tiny.yaml", "--address", ray_head, "--out", "results/tiny",
                                          "--remote-root", str(remote)),
                               cwd=work, capture_output=True, text=True, timeout=180)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    assert f"results on the head node: {out}" in submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id.startswith("raysubmit_")
    deadline, line = time.time() + 300, ""
    while time.time() < deadline:
        status = subprocess.run(_ntk_sweep("status", job_id, "--address", ray_head), capture_output=True,
                                text=True, timeout=60)
        line = status.stdout.splitlines()[0] if status.stdout else status.stderr
        if any(word in line for word in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(2)
    assert "SUCCEEDED" in line, status.stdout + status.stderr
    assert read_runs(out).num_rows == 2


def test_submit_to_nowhere_is_one_line_exit_2(tmp_path, capsys):
    job = write_job(tmp_path, {**TINY, "kernels": {"store": "none"}})
    assert main(["submit", str(job), "--address", "http://127.0.0.1:9", "--out", "r"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: http://127.0.0.1:9: cannot reach the Ray Jobs API") and "\n" not in err


@pytest.mark.slow
def test_submit_refuses_grams_into_a_results_directory_the_workers_cannot_see(tmp_path, capsys):
    """The workers write the Grams: a results directory on the head's own disk would scatter them over the
    nodes' local disks. Refused before any connection (the address is unreachable on purpose)."""
    job = write_job(tmp_path, TINY)  # kernels.store: init+final
    assert main(["submit", str(job), "--address", "http://127.0.0.1:9", "--out", "results/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "kernels.store: init+final" in err and "--shared-root" in err, err
    assert "~/ntk-sweep/results/x" in err
    # Under the shared filesystem it gets as far as the (unreachable) cluster.
    assert main(["submit", str(job), "--address", "http://127.0.0.1:9", "--out", "/mnt/shared/results/x"]) == 2
    assert "cannot reach the Ray Jobs API" in capsys.readouterr().err


@pytest.mark.slow
def test_local_sweep_asking_for_a_gpu_this_machine_lacks_fails_at_once(tmp_path, capsys):
    """Ray would queue the tasks forever at 0%; the runner says why in one line, exit 2, nothing written."""
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    job = write_job(tmp_path, {**TINY, "widths": [16], "seeds": 1, "resources": {"num_cpus": 1, "num_gpus": 1}})
    out = tmp_path / "r"
    started = time.monotonic()
    assert main(["run", str(job), "--out", str(out), "--num-cpus", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "resources.num_gpus" in err and str(job) in err, err
    assert time.monotonic() - started < 120
    assert not out.exists() or not any(out.rglob("*.parquet")) and not (out / "sweeps").exists()


def test_a_worker_that_does_not_see_the_results_directory_refuses_to_write_grams(tmp_path):
    from pipeline.store import GramWriter, ResultsNotShared, ResultsStore

    store = ResultsStore(tmp_path / "shared")
    token = store.probe_token()
    assert store.probe_token() == token  # written once
    GramWriter(store.root, "init", token).check()  # the driver's own folder: fine
    elsewhere = GramWriter(tmp_path / "local-disk-of-a-worker", "init", token)
    with pytest.raises(ResultsNotShared, match="shared filesystem"):
        elsewhere.check()
    GramWriter(tmp_path / "anywhere", "none", None).check()  # no Grams, no check
