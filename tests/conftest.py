"""Shared fixtures, and two switches that make this machine compute like another CPU.

Floating-point results depend on the CPU: the instruction set, the number of threads and the
convolution library (oneDNN) change the kernels and the order of summation. Tests that compare two
code paths must therefore hold on any x86-64 CPU; to check that without another machine, run
them with different kernels here:

    OSTEO_TEST_THREADS=1 pytest tests/test_engines.py      # torch.set_num_threads(1) for the session
    OSTEO_TEST_NO_MKLDNN=1 pytest tests/test_engines.py    # oneDNN (mkldnn) off: PyTorch's own conv kernels
    ATEN_CPU_CAPABILITY=avx2 pytest tests/test_engines.py  # PyTorch's own switch: AVX2 kernels on an AVX-512 CPU
    ATEN_CPU_CAPABILITY=default pytest ...                 # ... or none (also changes seeded weights: normal_)
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 pytest ...  # oneDNN's convolutions on AVX2 too

benchmarks/rounding_drift.py measures how far the code paths drift apart under these settings.
"""
import os
import shutil
import socket
import tempfile

import numpy as np
import pytest
import torch

from osteo.data import SliceData, SliceSet

# compiled engines keep their work in a folder of this test session, not in the user's cache; the
# folder is deleted when the session ends (torch's kernels in it take hundreds of MB)
_SESSION_COMPILE_CACHE = None
if not os.environ.get("OSTEO_COMPILE_CACHE"):
    _SESSION_COMPILE_CACHE = os.environ["OSTEO_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="osteo-test-compile-")
if os.environ.get("OSTEO_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["OSTEO_TEST_THREADS"]))
if os.environ.get("OSTEO_TEST_NO_MKLDNN", "0") not in ("", "0"):
    torch.backends.mkldnn.enabled = False


def pytest_unconfigure(config):
    if _SESSION_COMPILE_CACHE:
        shutil.rmtree(_SESSION_COMPILE_CACHE, ignore_errors=True)


def pytest_report_header(config):
    free = shutil.disk_usage(config.rootpath).free / 2**30
    tmp_free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    # measured: the suite's folders (results/smoke and the temporary ones) peak at about 4 GB
    disk = f"disk: {free:.1f} GiB free here, {tmp_free:.1f} GiB in {tempfile.gettempdir()} (the suite needs about 4 GiB)"
    isa = f" (at most {os.environ['ONEDNN_MAX_CPU_ISA']})" if os.environ.get("ONEDNN_MAX_CPU_ISA") else ""
    return [f"torch {torch.__version__}: {torch.get_num_threads()} threads, oneDNN "
            f"{'on' if torch.backends.mkldnn.enabled else 'off'}{isa}, "
            f"CPU kernels {torch.backends.cpu.get_cpu_capability()}", disk]


def make_separable(n_per_class=24, size=32, seed=0, test_fraction=0.25):
    """Tiny in-memory data set whose classes differ in trabecular HU by a lot (separable)."""
    g = np.random.default_rng(seed)
    hu, y, pid = [], [], []
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    for c, mean in enumerate((350.0, 200.0, 50.0)):
        for i in range(n_per_class):
            img = np.full((size, size), -100.0) + g.normal(0, 20, (size, size))
            img[disc] = mean + g.normal(0, 20, disc.sum())
            hu.append(np.rint(img).astype(np.int16))
            y.append(c)
            pid.append(f"SYN{c}{i:03d}")
    hu, y = np.stack(hu), np.array(y)
    test = np.zeros(len(y), bool)
    for c in range(3):
        idx = np.flatnonzero(y == c)
        test[g.permutation(idx)[: int(round(test_fraction * len(idx)))]] = True

    def subset(mask):
        idx = np.flatnonzero(mask)
        return SliceSet(torch.from_numpy(hu[idx]), torch.from_numpy(y[idx]), [pid[i] for i in idx], [f"/x/{pid[i]}.dcm" for i in idx])

    return SliceData(subset(~test), subset(test), size, source="separable-test-set")


@pytest.fixture(scope="session")
def _refusing_url():
    """A local address that refuses connections: a socket bound but never listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.fixture(autouse=True)
def _offline_weights(monkeypatch, tmp_path_factory, _refusing_url):
    """No test reaches the internet for ImageNet weights or sees the user's torch cache: downloads go
    to a refusing local port, the cache is a fresh temporary folder, and failed downloads are forgotten."""
    import osteo.weights

    monkeypatch.setenv("OSTEO_WEIGHTS_URL", _refusing_url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
    monkeypatch.setattr(osteo.weights, "_FAILED", {})


@pytest.fixture(scope="session")
def separable():
    return make_separable()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need an NVIDIA GPU: skipped (with the reason) where torch sees none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
