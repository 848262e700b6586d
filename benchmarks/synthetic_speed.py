"""How long the synthetic CT set takes to make (SYNTHETIC DATA).

Writes the default set (4500 slices of 256 x 256 px, 1500 per class, as DICOM) into a temporary
folder with ``synthesize(workers=N)`` and prints the wall-clock time, once with the reconstructed-noise
bank already cached on disk and once with a fresh, empty noise cache (what a first run on a new
machine pays). The target is under 90 s on 2 CPU cores.

    PYTHONPATH=. python benchmarks/synthetic_speed.py [--workers 2] [--n-per-class 1500] [--size 256]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from osteo.synthetic import synthesize


def timed(n_per_class: int, size: int, workers: int) -> tuple[int, float]:
    out = tempfile.mkdtemp(prefix="osteo-speed-")
    try:
        t = time.perf_counter()
        df = synthesize(out, n_per_class=n_per_class, size=size, workers=workers, progress=False)
        return len(df), time.perf_counter() - t
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--n-per-class", type=int, default=1500)
    ap.add_argument("--size", type=int, default=256)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["OSTEO_NOISE_CACHE"] = cache
        n, cold = timed(a.n_per_class, a.size, a.workers)
        print(f"{n} slices of {a.size} px, {a.workers} worker(s), noise bank made first: {cold:.1f} s")
        n, warm = timed(a.n_per_class, a.size, a.workers)
        print(f"{n} slices of {a.size} px, {a.workers} worker(s), noise bank cached:     {warm:.1f} s")


if __name__ == "__main__":
    main()
