"""``ntk-sweep data fetch`` against a real HTTP server on 127.0.0.1 that serves the shared data files."""

from __future__ import annotations

import functools
import hashlib
import io
import subprocess
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data import load_dataset
from pipeline.errors import UserError
from pipeline.fetch import CHECKSUMS, CIFAR_ARCHIVE, fetch_dataset

MNIST_FILES = list(CHECKSUMS["mnist"])


class _QuietHandler(SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def serve(monkeypatch):
    """``serve(folder) -> (base URL, list of requested paths)``; servers stop after the test."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    servers = []

    def start(folder: Path) -> tuple[str, list[str]]:
        handler = type("Handler", (_QuietHandler,), {"requests": []})
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", handler.requests

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith((".part", ".tmp")) or p.name.startswith(".")]


def test_fetch_mnist_loopback(real_data, tmp_path, serve, capsys):
    base, requests = serve(real_data)
    root = tmp_path / "data"
    assert main(["data", "fetch", "mnist", "--root", str(root), "--mirror", f"{base}/mnist/"]) == 0
    for fname in MNIST_FILES:
        assert _md5(root / "mnist" / fname) == CHECKSUMS["mnist"][fname]
    assert sorted(requests) == sorted(f"/mnist/{f}" for f in MNIST_FILES)
    assert _leftovers(root) == []
    x, y = load_dataset("mnist", root, "test")
    x_real, y_real = load_dataset("mnist", real_data, "test")
    np.testing.assert_array_equal(x, x_real)
    np.testing.assert_array_equal(y, y_real)
    # Everything verified already: a second fetch downloads nothing.
    assert main(["data", "fetch", "mnist", "--root", str(root), "--mirror", f"{base}/mnist"]) == 0
    assert len(requests) == len(MNIST_FILES)


def test_fetch_rejects_corrupted_file(real_data, tmp_path, serve, capsys):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for fname in MNIST_FILES:
        (mirror / fname).symlink_to(real_data / "mnist" / fname)
    corrupted = bytearray((real_data / "mnist" / "train-labels-idx1-ubyte.gz").read_bytes())
    corrupted[1000] ^= 0xFF
    (mirror / "train-labels-idx1-ubyte.gz").unlink()
    (mirror / "train-labels-idx1-ubyte.gz").write_bytes(bytes(corrupted))
    base, _ = serve(mirror)
    root = tmp_path / "data"
    assert main(["data", "fetch", "mnist", "--root", str(root), "--mirror", base]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: train-labels-idx1-ubyte.gz") and "md5" in err
    assert not root.exists()  # nothing written, not even the verified files


def test_fetch_missing_file_on_mirror(tmp_path, serve, capsys):
    (tmp_path / "empty").mkdir()
    base, _ = serve(tmp_path / "empty")
    assert main(["data", "fetch", "fashion_mnist", "--root", str(tmp_path / "data"), "--mirror", base]) == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz" in err and "404" in err
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["data", "fetch", "digits", "--root", "{root}"],
        ["data", "fetch", "mnist", "--root", "{root}", "--mirror", "ftp://example.org/"],
    ],
)
def test_fetch_bad_arguments(tmp_path, capsys, argv):
    assert main([a.format(root=tmp_path / "data") for a in argv]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()


def _cifar_tarball(path: Path, real_data: Path, extra: dict[str, bytes] | None = None) -> str:
    """A ``cifar-10-python.tar.gz`` built from the shared python batches; returns its md5."""
    folder = real_data / "cifar10" / "cifar-10-batches-py"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for batch in sorted(folder.iterdir()):
            tar.add(batch, arcname=f"cifar-10-batches-py/{batch.name}")
        for name, payload in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return _md5(path)


def test_fetch_cifar_loopback(real_data, tmp_path, serve):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    md5 = _cifar_tarball(mirror / CIFAR_ARCHIVE, real_data)
    base, _ = serve(mirror)
    root = tmp_path / "data"
    # The real published md5 is not this tarball's: rejected, nothing written.
    with pytest.raises(UserError, match=CIFAR_ARCHIVE):
        fetch_dataset("cifar10", root, mirror=base)
    assert not root.exists()
    folder = fetch_dataset("cifar10", root, mirror=base, checksums={CIFAR_ARCHIVE: md5})
    assert folder == root / "cifar10" and _leftovers(root) == []
    for split in ("train", "test"):
        x, y = load_dataset("cifar10", root, split)
        x_real, y_real = load_dataset("cifar10", real_data, split)
        np.testing.assert_array_equal(x, x_real)
        np.testing.assert_array_equal(y, y_real)


def test_fetch_cifar_refuses_path_traversal(real_data, tmp_path, serve):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    md5 = _cifar_tarball(mirror / CIFAR_ARCHIVE, real_data, extra={"../../escaped.txt": b"owned"})
    base, _ = serve(mirror)
    root = tmp_path / "data"
    with pytest.raises(UserError, match="unsafe or corrupt archive"):
        fetch_dataset("cifar10", root, mirror=base, checksums={CIFAR_ARCHIVE: md5})
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (root / "cifar10" / "cifar-10-batches-py").exists()


def test_fetch_with_installed_command(real_data, tmp_path, serve):
    command = Path(sys.executable).parent / "ntk-sweep"
    if not command.exists():
        pytest.skip(f"{command} not installed")
    base, _ = serve(real_data / "mnist")
    root = tmp_path / "data"
    done = subprocess.run(
        [str(command), "data", "fetch", "mnist", "--root", str(root), "--mirror", base],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(MNIST_FILES)
