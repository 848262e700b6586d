"""The compile cache (osteo.compile_cache): one file per configuration, loaded before compiling.

The end-to-end test compiles a small network (two convolutions) in two fresh processes: the first
saves the artifacts file, the second, with nothing but that file, finds every compiled graph in
torch's cache instead of generating it. (The twin's numbers are in benchmarks/compile_cache.py.)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from osteo import compile_cache
from osteo.training import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def test_one_file_per_graph_not_per_run(monkeypatch, tmp_path):
    monkeypatch.setenv("OSTEO_COMPILE_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    base = TrainConfig(batch_size=8, image_size=32, pretrained=False, engine="grouped+compile")
    path = compile_cache.cache_file(base.to_dict(), cpu)
    assert path.parent == tmp_path and path.name.startswith("twin-32px-b8-")
    same_graph = [dict(seed=3), dict(lr=0.1), dict(epochs=7), dict(alpha=0.9), dict(device="cpu")]
    for change in same_graph:
        assert compile_cache.cache_file(TrainConfig(**{**base.to_dict(), **change}).to_dict(), cpu) == path, change
    other_graph = [dict(batch_size=16), dict(image_size=64), dict(lam=0.0), dict(acm_weight=0.0),
                   dict(learn_alpha=False), dict(engine="compile"), dict(amp=False), dict(inputs=("s", "s")),
                   dict(window_bits=8), dict(num_classes=2)]
    names = {compile_cache.cache_file(TrainConfig(**{**base.to_dict(), **change}).to_dict(), cpu) for change in other_graph}
    assert len(names) == len(other_graph) and path not in names


def test_default_folder_and_torchs_folder(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.delenv("OSTEO_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir() == tmp_path / "xdg" / "osteo-kit" / "compile"
    monkeypatch.setenv("OSTEO_COMPILE_CACHE", str(tmp_path / "kit"))
    for before in (None, default_cache_dir()):  # unset, or torch's own temporary default: moved
        if before is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", before)
        compile_cache.use_kit_folder_for_torch()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "kit" / "torch" / compile_cache.machine_kind()).resolve())
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's choice stays
    compile_cache.use_kit_folder_for_torch()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_machines_of_another_kind_use_other_files(monkeypatch, tmp_path):
    """Code compiled for one instruction set must not reach a machine with another (torch's own cache
    does not tell them apart): the kernel level and the CPU's flags are part of the names."""
    monkeypatch.setenv("OSTEO_COMPILE_CACHE", str(tmp_path))
    cfg, cpu = TrainConfig(pretrained=False, engine="compile").to_dict(), torch.device("cpu")
    here, file_here = compile_cache.machine_kind(), compile_cache.cache_file(cfg, cpu)
    assert here.startswith(f"{__import__('platform').machine().lower()}-{torch.backends.cpu.get_cpu_capability().lower()}-")
    compile_cache.machine_kind.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    try:
        other = compile_cache.machine_kind()
        assert other != here and compile_cache.cache_file(cfg, cpu) != file_here
    finally:
        compile_cache.machine_kind.cache_clear()


def test_a_file_that_cannot_be_used_means_compiling(tmp_path):
    assert compile_cache.load(tmp_path / "none.bin") is False  # nothing saved yet: no warning
    for name, content in [("garbage.bin", b"\x00not torch's format" * 10), ("empty.bin", b"")]:
        (tmp_path / name).write_bytes(content)
        with pytest.warns(UserWarning, match=f"{name}: not a compile cache this torch can use"):
            assert compile_cache.load(tmp_path / name) is False
    (tmp_path / "folder.bin").mkdir()
    with pytest.warns(UserWarning, match="folder.bin: compile cache not readable"):
        assert compile_cache.load(tmp_path / "folder.bin") is False


def test_a_folder_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None))
    (tmp_path / "a-file").write_text("")
    with pytest.warns(UserWarning, match="compile cache not writable"):
        assert compile_cache.save(tmp_path / "a-file" / "x.bin") is False
    assert compile_cache.save(tmp_path / "sub" / "x.bin") is True
    assert (tmp_path / "sub" / "x.bin").read_bytes() == b"artifacts"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.bin"]  # no temporary file left
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)  # nothing compiled
    assert compile_cache.save(tmp_path / "y.bin") is False and not (tmp_path / "y.bin").exists()


CHILD = r"""
import json, sys, torch
from torch import nn
from torch._dynamo.utils import counters
import osteo.models as M
from osteo.training import TrainConfig, _start_run, resolve_device

class Small(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, k)
    def forward(self, x):
        return M.ModelOutput({"main": self.fc(self.body(x))}, {}, {})

M.register_model(M.ModelSpec(name="small", build=lambda cfg: Small(cfg.num_classes), forward=lambda m, x: m(x)))
cfg = TrainConfig(model="small", inputs=("t",), batch_size=4, image_size=16, pretrained=False, device="cpu",
                  engine="compile", epochs=1)
run = _start_run(cfg, resolve_device("cpu"))
step = run.engine.runner(run.model, cfg, run.opt, False)
hu, y = torch.zeros(4, 16, 16, dtype=torch.int16), torch.tensor([0, 1, 2, 0])
for _ in range(2):
    step(hu, y)
print(json.dumps({"loaded": step.cache_loaded, "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def _compile_in_fresh_process(folder: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(PYTHONPATH=str(ROOT), OSTEO_COMPILE_CACHE=str(folder))
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_with_only_the_file_does_not_generate_code(tmp_path):
    first = _compile_in_fresh_process(tmp_path / "machine-1")
    assert first["loaded"] is False and first["misses"] >= 2 and first["hits"] == 0  # forward and backward
    files = list((tmp_path / "machine-1").glob("small-16px-b4-*.bin"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    (tmp_path / "machine-2").mkdir()
    (tmp_path / "machine-2" / files[0].name).write_bytes(files[0].read_bytes())  # the file alone travels
    second = _compile_in_fresh_process(tmp_path / "machine-2")
    assert second["loaded"] is True and second["misses"] == 0 and second["hits"] == first["misses"]
