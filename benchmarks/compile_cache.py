"""How long the first compiled training step takes, with and without the kit's compile cache.

Three fresh processes train the same few steps of a twin with a compiled engine, and report the
time of their first step (tracing + compiling + running it) and of a steady step:

- ``cold``: empty caches, as on a fresh machine; it fills the kit's folder (osteo.compile_cache:
  the artifacts file, and torch's own cache in its ``torch`` subfolder);
- ``artifacts file only``: a folder holding only the artifacts file (what a new machine of another
  kind can reuse; on a GPU it holds the compiled kernels, on the CPU not the C++ ones);
- ``the kit's whole folder``: the folder the cold run left (the same machine later, after a reboot,
  or machines of one kind sharing ``OSTEO_COMPILE_CACHE``).

The ratio cold / cached is measured in the same run. Results go to
``results/bench/compile-cache-<device>-<size>px.json``.

    PYTHONPATH=. python benchmarks/compile_cache.py [--device cpu] [--image-size 64] [--batch-size 16]
                                                    [--engine grouped+compile]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time, torch
from osteo.training import TrainConfig, _start_run, network_inputs
import osteo.training as T
a = json.loads(sys.argv[1])
cfg = TrainConfig(model="twin", batch_size=a["batch_size"], image_size=a["image_size"], pretrained=False,
                  device=a["device"], engine=a["engine"], epochs=1)
run = _start_run(cfg, T.resolve_device(cfg.device))
step = run.engine.runner(run.model, cfg, run.opt, cfg.amp and run.device.type == "cuda")
g = torch.Generator().manual_seed(0)
hu = torch.randint(-1000, 1500, (cfg.batch_size, cfg.image_size, cfg.image_size), generator=g, dtype=torch.int16)
hu, y = hu.to(run.device), torch.randint(0, 3, (cfg.batch_size,), generator=g).to(run.device)
sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
times = []
for _ in range(a["steps"]):
    t = time.perf_counter()
    out, terms = step(hu, y)
    float(terms["total"]); sync()
    times.append(time.perf_counter() - t)
print(json.dumps({"first_s": times[0], "steady_s": sorted(times[1:])[len(times[1:]) // 2],
                  "loaded": getattr(step, "cache_loaded", None)}))
"""


def child(args: dict, env: dict) -> dict:
    env = {**{k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}, "PYTHONPATH": str(ROOT), **env}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], env=env,
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"benchmark step failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--engine", default="grouped+compile")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=None, help="JSON file (default results/bench/compile-cache-<device>-<size>px.json)")
    a = ap.parse_args(argv)
    import torch

    args = dict(device=a.device, image_size=a.image_size, batch_size=a.batch_size, engine=a.engine, steps=a.steps)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        kit, file_only = Path(tmp) / "kit", Path(tmp) / "file-only"
        t = time.perf_counter()
        rows["cold"] = child(args, {"OSTEO_COMPILE_CACHE": str(kit)})
        files = sorted(kit.glob("*.bin"))
        file_only.mkdir()
        for f in files:
            shutil.copy(f, file_only / f.name)
        rows["artifacts file only"] = child(args, {"OSTEO_COMPILE_CACHE": str(file_only)})
        rows["the kit's whole folder"] = child(args, {"OSTEO_COMPILE_CACHE": str(kit)})
        size_mb = sum(f.stat().st_size for f in files) / 2**20
        wall = time.perf_counter() - t
    cold = rows["cold"]["first_s"]
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"{a.engine}, twin, {a.image_size} px, batch {a.batch_size}, {dev} ({a.device}), torch {torch.__version__}")
    print("| run | first step s | x faster than cold | steady step s |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        r["speedup_vs_cold"] = cold / r["first_s"]
        print(f"| {name} | {r['first_s']:.1f} | {r['speedup_vs_cold']:.1f} | {r['steady_s']:.3f} |")
    print(f"kit cache: {len(files)} file(s), {size_mb:.1f} MB; whole benchmark {wall:.0f} s")
    slug = re.sub(r"[^a-z0-9]+", "-", ("cpu" if a.device == "cpu" else dev).lower()).strip("-")
    out = Path(a.out) if a.out else ROOT / "results" / "bench" / f"compile-cache-{slug}-{a.image_size}px.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/compile_cache.py " + " ".join(argv or sys.argv[1:]),
                               "device": dev, "torch": torch.__version__, "threads": torch.get_num_threads(),
                               **args, "rows": rows, "cache_mb": round(size_mb, 2)}, indent=1) + "\n")
    print(f"saved {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
