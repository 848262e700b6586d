"""One run shared by two processes under torchrun (osteo.distributed), on the CPU with gloo.

The two processes take the steps of the single-process run: the same global batches, batch norm
over the global batch, the same loss. Compared in float64 (tests/ddp_worker.py runs each process):
one step gives the single-process weights to ~1e-15 of their scale (measured 2e-16; tolerance 1e-10),
except ACM's key/query biases, whose gradient is zero in exact arithmetic and rounding noise in any
run (see tests/test_batched.py). After that, Adam near its eps and batch norm over few slices amplify
roundings into different weights (docs/design.md, section 3; 0.2 % of a layer's scale after 6 steps,
measured), so whole runs are compared as the batched runs are: the
same history (measured <= 1.1e-6 relative), alpha (4.5e-10), predictions and metrics.
"""
import copy
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import osteo
from osteo.distributed import GlobalBatchNorm, World, use_global_batchnorm
from osteo.training import TrainConfig, _distributed_step, epoch_batches, load_checkpoint
from conftest import make_separable
from test_batched import _assert_same_result, _assert_same_weights

TESTS = Path(__file__).parent
ROOT = TESTS.parent
# 18 training slices in batches of 7: 7, 7 and 4, so the processes' shares differ (4 and 3)
BASE = dict(epochs=2, batch_size=7, image_size=32, pretrained=False, device="cpu")


def _torchrun(args: list, tmp_path: Path, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "TORCH_HOME": str(tmp_path / "torch-home")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def _shared_run(folder: Path, cfg: dict, stop_after=None, tmp_path=None) -> subprocess.CompletedProcess:
    folder.mkdir(parents=True, exist_ok=True)
    args = [str(TESTS / "ddp_worker.py"), str(folder / "run"), json.dumps(cfg), str(stop_after or "-"), "float64"]
    return _torchrun(args, tmp_path or folder)


@pytest.fixture
def float64(monkeypatch):
    import osteo.training as T

    plain_model, plain_inputs = T.make_model, T.network_inputs
    monkeypatch.setattr(T, "make_model", lambda cfg: plain_model(cfg).double())
    monkeypatch.setattr(T, "network_inputs", lambda cfg, hu: [x.double() for x in plain_inputs(cfg, hu)])


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A 2-epoch twin run shared by two processes (float64), run once for the tests below."""
    folder = tmp_path_factory.mktemp("shared")
    proc = _shared_run(folder, BASE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # two runs' checkpoints: free the disk for later tests


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_shares_cover_every_batch_once(size):
    for n in range(size, 60):
        shares = [World(r, size, r).share(n) for r in range(size)]
        assert shares[0].start == 0 and shares[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(shares, shares[1:]))  # contiguous, in rank order
        lengths = [s.stop - s.start for s in shares]
        assert min(lengths) >= 1 and max(lengths) - min(lengths) <= 1


def test_epoch_batches_fold_a_last_batch_smaller_than_the_processes():
    assert epoch_batches(18, 8) == [(0, 8), (8, 16), (16, 18)]  # one process: unchanged
    assert epoch_batches(18, 8, smallest=3) == [(0, 8), (8, 18)]
    for n in range(2, 50):
        for bs in (2, 3, 5, 8):
            for smallest in (2, 3, 4):
                b = epoch_batches(n, bs, smallest)
                assert b[0][0] == 0 and b[-1][1] == n and all(x[1] == y[0] for x, y in zip(b, b[1:]))
                assert len(b) == 1 or min(hi - lo for lo, hi in b) >= min(smallest, bs)


def test_global_batchnorm_outside_a_shared_run_is_batchnorm():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).double()
    ref = copy.deepcopy(net)
    weight = net[1].weight
    use_global_batchnorm(net)
    assert isinstance(net[1], GlobalBatchNorm) and net[1].weight is weight  # the optimiser's parameter
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(net(x), ref(x))
    for name, buf in ref[1].named_buffers():
        assert torch.equal(getattr(net[1], name), buf), name


def test_shared_run_refuses_the_single_process_engines():
    run = types.SimpleNamespace(cfg=TrainConfig(**BASE, engine="grouped"))
    with pytest.raises(ValueError, match="torchrun uses the eager engine"):
        _distributed_step(run, amp=False)


def test_two_processes_train_the_single_process_run(shared, float64, tmp_path):
    ref = osteo.train(TrainConfig(**BASE), make_separable(n_per_class=8), tmp_path / "single",
                      progress=False, checkpoint_every_s=0)
    got = json.loads((shared / "run" / "result.json").read_text())
    _assert_same_result(json.loads((tmp_path / "single" / "result.json").read_text()), got)
    assert got["engine"] == "eager, 2 processes" and ref.engine == "eager"
    # both processes end with the same model; only the first wrote the checkpoint, once per epoch
    r1 = json.loads((shared / "rank1.json").read_text())
    assert r1["predictions"] == got["predictions"] and r1["history"] == got["history"]
    assert (shared / "saves.log").read_text().split("\n")[:-1] == ["0 1", "0 2"]
    assert load_checkpoint(shared / "run" / "checkpoint.pt")["epoch"] == 2


def test_one_shared_step_is_the_single_process_step(float64, tmp_path):
    """15 training slices in one batch (8 and 7 in the two processes), one epoch: one optimisation step."""
    cfg = dict(BASE, epochs=1, batch_size=15)
    proc = _shared_run(tmp_path / "shared", dict(cfg, n_per_class=7))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = make_separable(n_per_class=7)
    assert len(data.train) == 15
    osteo.train(TrainConfig(**cfg), data, tmp_path / "single", progress=False)
    a = load_checkpoint(tmp_path / "single" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "shared" / "run" / "checkpoint.pt")["model"]
    _assert_same_weights(a, b, tol=1e-10)  # batch-norm statistics included (global batch, unbiased variance)


def test_killed_shared_run_resumes_to_the_same_end(shared, tmp_path):
    """Killed in epoch 2 (3 steps an epoch), both processes resume from the one checkpoint and end
    bit for bit where the uninterrupted shared run ends."""
    folder = tmp_path / "cut"
    proc = _shared_run(folder, BASE, stop_after=4)
    assert proc.returncode != 0
    state = load_checkpoint(folder / "run" / "checkpoint.pt")
    assert state["epoch"] == 1 and not (folder / "run" / "result.json").exists()
    proc = _shared_run(folder, BASE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (load_checkpoint(d / "run" / "checkpoint.pt")["model"] for d in (shared, folder))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "run" / "result.json").read_text()) for d in (shared, folder))
    assert ra["history"] == rb["history"] and ra["predictions"] == rb["predictions"]
    assert (folder / "saves.log").read_text().split("\n")[:-1] == ["0 1", "0 2"]  # the first process only


def test_osteo_train_under_torchrun(tmp_path):
    """The command a user runs: two processes, one line of output each, one result."""
    osteo.synthesize(tmp_path / "syn", n_per_class=6, size=32, seed=0, slices_per_patient=2, progress=False)
    proc = _torchrun(["-m", "osteo", "train", str(tmp_path / "syn" / "manifest.csv"), "--out", str(tmp_path / "run"),
                      "--epochs", "2", "--batch-size", "8", "--image-size", "32", "--pretrained", "false",
                      "--device", "cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test accuracy") == 1 and proc.stdout.count("train ") == 1  # the first process speaks
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert res["engine"] == "eager, 2 processes" and len(res["history"]) == 2
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 2


def test_a_user_error_under_torchrun_is_one_line(tmp_path):
    proc = _torchrun(["-m", "osteo", "train", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "run"),
                      "--device", "cpu"], tmp_path)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("osteo: error:")]
    assert len(lines) == 1 and "missing.csv" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr.split("osteo: error:")[0]  # none of ours before the message
