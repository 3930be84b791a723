"""Bad input, real files: job files and flags, dataset files, the subset cache, stalled downloads, and a
property-based fuzz of job files. Every refusal is one line, exit code 2, and nothing written."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import gzip
import http.server
import io
import math
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import data
from pipeline.cli import main
from pipeline.data import load_subset
from pipeline.errors import UserError
from pipeline.fetch import CHECKSUMS, fetch_dataset, remove_leftovers
from pipeline.run import train_run
from pipeline.run_config import RunConfig
from pipeline.spec import MAX_RUNS, load_sweep, parse_sweep

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "datasets": [{"name": "digits", "n_train": [40], "n_test": 30}],
    "architectures": [{"depth": [1], "activation": "relu"}],
    "widths": [16, 32],
    "seeds": 2,
    "optimizer": {"name": "gd", "lr_scale": 0.5, "steps": 10},
    "kernels": {"store": "none"},
    "resources": {"num_cpus": 1},
}


def _run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    rc = main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


def _assert_refused(rc: int, err: list[str], *needles: str) -> str:
    assert rc == 2, err
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


# ----------------------------------------------------------------------------------- job files and flags


def _text_job(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "job.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


TINY_TEXT = yaml.safe_dump(TINY, sort_keys=False)


@pytest.mark.parametrize(
    ("old", "new", "needles"),
    [
        ("lr_scale: 0.5", "lr: .nan", ["optimizer.lr", "finite"]),
        ("num_cpus: 1", "num_cpus: .inf", ["resources.num_cpus", "finite"]),
        ("lr_scale: 0.5", "lr_scale: -.inf", ["optimizer.lr_scale", "finite"]),
        ("lr_scale: 0.5", "lr_scale: 1.0e+400", ["optimizer.lr_scale", "finite"]),  # overflows to inf
        ("activation: relu", "activation: relu\n  w_std: .NaN", ["w_std", "finite"]),
        ("- 32", "- 100000000000000000000000000000", ["widths[1]", "2^63"]),
        ("- 32", "- 10000000000", ["widths[1]", "host memory"]),
        ("- 40", "- 1000000000", ["datasets[0].n_train[0]", "host memory"]),
        ("n_test: 30", "n_test: 2000000", ["datasets[0].n_test", "host memory"]),
        ("seeds: 2", "seeds: 1000000000", ["seeds", f"{MAX_RUNS:,}"]),
        ("- 1\n", "- 100000\n", ["architectures[0].depth[0]", "1000"]),
        ("steps: 10", "steps: 10000000000000", ["optimizer.steps"]),
        ("steps: 10", "steps: 10\n  log_points: 1000000000", ["optimizer.log_points"]),
        ("name: tiny", "name: " + "x" * 300, ["name"]),
        ("name: tiny", "name: 2001-13-01", ["invalid YAML value"]),
    ],
)
def test_bad_numbers_and_absurd_sizes_are_one_line_and_write_nothing(tmp_path, capsys, old, new, needles):
    assert old in TINY_TEXT
    job = _text_job(tmp_path, TINY_TEXT.replace(old, new, 1))
    out = tmp_path / "results"
    started = time.perf_counter()
    rc, err = _run_cli(["run", str(job), "--out", str(out)], capsys)
    _assert_refused(rc, err, str(job), *needles)
    assert not out.exists()
    assert time.perf_counter() - started < 10


def test_sizes_that_fit_a_gpu_but_not_the_largest_one_name_the_gpu(tmp_path, capsys):
    job = dict(copy.deepcopy(TINY), device="cuda", widths=[16, 10_000_000], resources={"num_cpus": 4, "num_gpus": 1})
    job["datasets"][0]["n_train"] = [1000]
    job["datasets"][0]["name"] = "mnist"
    path = _text_job(tmp_path, yaml.safe_dump(job))
    rc, err = _run_cli(["plan", str(path)], capsys)
    _assert_refused(rc, err, "widths[1]", "GPU memory", "H200")


def test_the_shipped_jobs_pass_the_size_check():
    for job in sorted((REPO / "jobs").glob("*.yaml")):
        load_sweep(job)


def test_file_over_1_mib_is_refused_before_parsing(tmp_path, capsys):
    job = _text_job(tmp_path, TINY_TEXT + "# " + "x" * (1 << 20) + "\n")
    started = time.perf_counter()
    rc, err = _run_cli(["run", str(job), "--out", str(tmp_path / "r")], capsys)
    _assert_refused(rc, err, str(job), "larger than 1024 KiB")
    assert time.perf_counter() - started < 2
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (TINY_TEXT.encode() + b"# caf\xe9 latin-1\n", ["not valid UTF-8", "0xe9",
                                                        f"line {TINY_TEXT.count(chr(10)) + 1} column 6"]),
        (b"\xff\xfe" + TINY_TEXT.encode(), ["not valid UTF-8"]),
        (TINY_TEXT + "extra: " + "[" * 200 + "]" * 200 + "\n", ["nests deeper than 32"]),
        (TINY_TEXT + "extra:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 60)) + "  " * 60 + "v: 1\n",
         ["nests deeper than 32"]),
        # A billion laughs: each line doubles the previous one; 2^40 values once the aliases are expanded.
        ("a0: &a0 [1, 1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 40)) + TINY_TEXT,
         ["more than 100,000 values"]),
        ("a: &a [*a]\n" + TINY_TEXT, ["nests deeper than 32"]),  # a list that contains itself
    ],
)
def test_hostile_yaml_is_refused_before_it_costs_anything(tmp_path, capsys, text, needles):
    job = _text_job(tmp_path, text)
    started = time.perf_counter()
    rc, err = _run_cli(["run", str(job), "--out", str(tmp_path / "r")], capsys)
    _assert_refused(rc, err, str(job), *needles)
    assert time.perf_counter() - started < 2
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("flag", "value"), [("--max-parallel", "0"), ("--max-parallel", "-3"), ("--num-cpus", "0"),
                                             ("--num-cpus", "-1")])
def test_non_positive_run_flags_are_refused(tmp_path, capsys, flag, value):
    job = _text_job(tmp_path, TINY_TEXT)
    rc, err = _run_cli(["run", str(job), "--out", str(tmp_path / "r"), flag, value], capsys)
    _assert_refused(rc, err, flag, "positive")
    assert not (tmp_path / "r").exists()


def test_cluster_file_with_an_infinite_number_is_one_line(tmp_path, capsys):
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    cluster["available_node_types"]["gpu_worker"]["resources"]["GPU"] = float("inf")
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cluster))
    rc, err = _run_cli(["plan", str(REPO / "jobs" / "quickstart.yaml"), "--cluster", str(path)], capsys)
    _assert_refused(rc, err, "available_node_types.gpu_worker.resources.GPU")


def test_steps_0_means_init_only_measurements():
    """``steps: 0`` is accepted (see OptimizerSpec.steps): the run is measured at initialisation, its
    training measures are exactly zero, and it ends ``ok`` with one curve point at step 0."""
    parse_sweep(dict(copy.deepcopy(TINY), optimizer={"name": "gd", "steps": 0}))
    res = train_run(RunConfig(dataset="digits", n_train=40, n_test=20, width=32, depth=1, steps=0))
    assert res.status == "ok", res.error
    m = res.metrics
    assert m["kernel_rel_change"] == 0 and m["weight_rel_change"] == 0 and m["rmse_nn_lin_test"] == 0
    assert 0 < m["kernel_rel_dev_init"] < 10 and math.isfinite(m["test_loss"]) and 0 <= m["ntk_test_acc"] <= 1
    assert list(res.curves["step"]) == [0]


# ----------------------------------------------------------------------------------- dataset files


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    raw = struct.pack(">I", 0x800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def fake_mnist(folder: Path, n_train: int = 30, n_test: int = 20, gz: bool = True) -> None:
    """The four MNIST IDX files with random 28x28 images, labels cycling 0..9."""
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, gz)


def _idx_header(magic: int, *dims: int) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims)


def _unprivileged_read(path: Path, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` (with ``path`` bound) in a child Python; as root (which reads anything), it first imports
    pipeline.data and then becomes nobody (uid 65534)."""
    drop = ("import os\nimport pipeline.data, pipeline.errors\n"
            "if os.geteuid() == 0:\n    os.setgroups([]); os.setgid(65534); os.setuid(65534)\n")
    return subprocess.run([sys.executable, "-c", f"import pathlib; path = pathlib.Path({str(path)!r})\n{drop}{code}"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_unreadable_dataset_file_is_one_line(tmp_path):
    # A folder any user can traverse: the permission that fails is the file's own.
    base = Path(tempfile.mkdtemp(prefix="ntk-perm-"))
    try:
        base.chmod(0o755)
        folder = base / "mnist"
        fake_mnist(folder)
        for p in [folder, *folder.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        locked = folder / "train-images-idx3-ubyte.gz"
        locked.chmod(0)
        done = _unprivileged_read(base, (
            "from pipeline.data import make_subset\nfrom pipeline.errors import UserError\n"
            "try:\n    make_subset('mnist', path, n_train=20, n_test=10, seed=0, cache_dir=path.parent / 'c')\n"
            "except UserError as exc:\n    print(exc)\n"))
        assert done.returncode == 0, done.stderr
        lines = done.stdout.strip().splitlines()
        assert len(lines) == 1 and str(locked) in lines[0] and "Permission denied" in lines[0], done.stdout
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_header_whose_dims_overflow_is_one_line(tmp_path, gz):
    # 2^31 * 2^31 * 4 = 2^64: wraps to 0 in int64, so a header-only file looked the right size.
    raw = _idx_header(0x803, 2**31, 2**31, 4)
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte"
    path.parent.mkdir()
    path = path.with_name(path.name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(UserError) as excinfo:
        data.read_idx(path, 0x803)
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message and "dimensions" in message


def _gzip_bomb(path: Path, header: bytes, megabytes: int) -> None:
    """A gzip file that decompresses to ``header`` and ``megabytes`` MiB of zeros: one member for the header,
    then the same 1 MiB member again and again (multi-member gzip is valid); ~1 KB per MiB on disk."""
    zeros = gzip.compress(bytes(1 << 20), compresslevel=9)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(header))
        for _ in range(megabytes):
            fh.write(zeros)


def test_gzip_bomb_and_oversized_batches_stay_bounded_in_memory(tmp_path):
    """A 300 MiB gzip bomb behind an IDX header that says 10 images, and a 1 GiB (sparse) CIFAR-10 binary
    batch: both one line, and the reading process's peak RSS (its VmHWM, read by the parent from /proc while
    the child waits) stays far below them."""
    bomb = tmp_path / "t10k-images-idx3-ubyte.gz"
    _gzip_bomb(bomb, _idx_header(0x803, 10, 28, 28), 300)
    batch = tmp_path / "data_batch_1.bin"
    with open(batch, "wb") as fh:
        fh.truncate(1 << 30)
    code = (
        "from pipeline.data import read_idx, read_cifar_binary_batch\nfrom pipeline.errors import UserError\n"
        f"for read, arg in ((read_idx, ({str(bomb)!r}, 0x803)), (read_cifar_binary_batch, ({str(batch)!r},))):\n"
        "    try:\n        read(*arg)\n    except UserError as exc:\n        print(exc, flush=True)\n"
        "import sys\nsys.stdin.read()\n"  # wait, so that the parent can read the peak
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=REPO)
    lines = [child.stdout.readline().strip() for _ in range(2)]
    status = Path(f"/proc/{child.pid}/status").read_text()
    child.stdin.close()
    assert child.wait(timeout=60) == 0
    assert all(lines), lines
    assert str(bomb) in lines[0] and "decompression stopped" in lines[0]
    assert str(batch) in lines[1] and "larger than" in lines[1]
    peak_mib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
    assert peak_mib < 200, f"peak RSS {peak_mib:.0f} MiB"  # was ~650 MiB (the bomb) and ~1.1 GiB (the batch)


# ----------------------------------------------------------------------------------- subset cache


def test_a_dataset_file_changed_in_place_is_never_served_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "data"
    fake_mnist(root / "mnist", n_train=40, n_test=20, gz=False)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    first = data.make_subset("mnist", root, n_train=20, n_test=10, seed=0)
    index = tmp_path / "xdg" / "ntk-sweep" / "subsets" / data.HASH_INDEX
    stamp = index.stat().st_mtime_ns
    assert data.make_subset("mnist", root, n_train=20, n_test=10, seed=0).key == first.key
    assert index.stat().st_mtime_ns == stamp  # unchanged files: served from the index, not hashed again

    # Same name, same size, same mtime: only the pixels differ.
    images = root / "mnist" / "train-images-idx3-ubyte"
    st = images.stat()
    write_idx(images, np.full((40, 28, 28), 7, np.uint8))
    os.utime(images, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert images.stat().st_size == st.st_size and images.stat().st_mtime_ns == st.st_mtime_ns
    second = data.make_subset("mnist", root, n_train=20, n_test=10, seed=0)
    assert second.key != first.key
    assert np.ptp(second.x_train, axis=1).max() == 0  # every image constant: the new file, not the cached one
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # the data dir is never written


def test_a_failing_job_writes_nothing_into_the_data_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "data"
    fake_mnist(root / "mnist", n_train=40, n_test=20)
    job = copy.deepcopy(TINY)
    job["datasets"] = [{"name": "mnist", "n_train": [20], "n_test": 10},
                       {"name": "mnist", "n_train": [30], "n_test": 500}]  # the second subset fails
    path = _text_job(tmp_path, yaml.safe_dump(job))
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    rc, err = _run_cli(["run", str(path), "--out", str(tmp_path / "r"), "--data-dir", str(root)], capsys)
    _assert_refused(rc, err, "n_test=500")
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # no .ntk_sweep_cache/ any more
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------- data fetch


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Promises 1000 bytes, then sends one byte every ``interval`` seconds (for at most ``limit`` s)."""

    interval = 0.3
    limit = 20.0

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        end = time.monotonic() + self.limit
        try:
            while time.monotonic() < end:
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(self.interval)
        except OSError:
            pass


@pytest.fixture
def trickle(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_trickling_server_fails_in_bounded_time_with_one_line(tmp_path, trickle, capsys):
    root = tmp_path / "data"
    started = time.perf_counter()
    rc, err = _run_cli(["data", "fetch", "mnist", "--root", str(root), "--mirror", trickle,
                        "--stall-timeout", "1"], capsys)
    elapsed = time.perf_counter() - started
    _assert_refused(rc, err, "train-images-idx3-ubyte.gz", "stalled")
    assert elapsed < 4, elapsed  # 1 s window (+ one read of at most 1 s); it hung forever before
    assert not root.exists()


@pytest.mark.slow
def test_part_files_of_a_killed_fetch_are_removed_by_the_next(tmp_path, trickle, serve_files):
    root = tmp_path / "data"
    folder = root / "mnist"
    child = subprocess.Popen([sys.executable, "-c", "from pipeline.fetch import fetch_dataset; "
                              f"fetch_dataset('mnist', {str(root)!r}, mirror={trickle!r})"], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not list(folder.glob(".*.part")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    parts = list(folder.glob(".*.part"))
    assert parts, "the killed fetch left no .part file"

    # A .part that a live fetch holds is left alone.
    live = folder / ".t10k-labels-idx1-ubyte.gz.live.part"
    holder = open(live, "wb")
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
    try:
        mirror, checksums = serve_files
        fetch_dataset("mnist", root, mirror=mirror, checksums=checksums)
        assert [p.name for p in folder.glob(".*.part")] == [live.name]
    finally:
        holder.close()
    assert remove_leftovers(folder) == [live.name]
    assert sorted(p.name for p in folder.iterdir()) == sorted(CHECKSUMS["mnist"])


@pytest.fixture
def serve_files(tmp_path, monkeypatch):
    """A loopback mirror with four small fake MNIST files, and their md5s."""
    import functools
    import hashlib

    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    checksums = {}
    for name in CHECKSUMS["mnist"]:
        payload = gzip.compress(name.encode() * 10)
        (mirror / name).write_bytes(payload)
        checksums[name] = hashlib.md5(payload, usedforsecurity=False).hexdigest()
    handler = functools.partial(_QuietFiles, directory=str(mirror))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", checksums
    server.shutdown()
    server.server_close()


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


# ----------------------------------------------------------------------------------- fuzzing

_SCALARS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2, 3, 7, 64, 10**6, 10**12, 2**63 - 1, 2**63, 2**64, 10**30]),
    st.integers(-100, 100),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.sampled_from(["relu", "erf", "gd", "sgd", "mnist", "digits", "init", "cuda", "cpu", "1e400", "-.inf"]),
)
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=6)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@st.composite
def job_files(draw) -> bytes:
    """A tiny valid job, then up to three mutations (a value replaced, a key dropped or added, a level of
    nesting added), dumped to YAML; sometimes with random bytes spliced in."""
    job = copy.deepcopy(TINY)
    for _ in range(draw(st.integers(0, 3))):
        paths = [p for p in _paths(job) if p]
        path = draw(st.sampled_from(paths))
        parent = job
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "replace", "drop", "add", "nest"]))
        if action == "replace":
            parent[path[-1]] = draw(_VALUES)
        elif action == "drop" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(_VALUES)
        elif action == "nest":
            parent[path[-1]] = {"value": parent[path[-1]]} if draw(st.booleans()) else [parent[path[-1]]]
    text = yaml.safe_dump(job, allow_unicode=draw(st.booleans())).encode()
    if draw(st.integers(0, 4)) == 0:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.binary(min_size=1, max_size=8)) + text[at:]
    return text


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(text=job_files())
def test_fuzzed_job_files_are_accepted_or_refused_in_one_line(text, monkeypatch):
    """``plan`` and ``run``'s checks before Ray (the job, then every subset it loads): exit 0, or exit 2 with
    one line on stderr, and the results directory never created."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp / "xdg"))
        job = tmp / "job.yaml"
        job.write_bytes(text)
        out = tmp / "results"
        stderr = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            rc = main(["plan", str(job)])
        lines = stderr.getvalue().strip().splitlines()
        if rc == 0:
            try:  # what run does next, before it starts Ray or writes anything
                for run in load_sweep(job).expand():
                    load_subset(run)
            except UserError as exc:
                assert "\n" not in str(exc)
        else:
            assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, lines)
            stderr = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
                rc = main(["run", str(job), "--out", str(out)])
            lines = stderr.getvalue().strip().splitlines()
            assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, lines)
        assert not out.exists()
