"""How far two code paths that compute the same training step drift apart, in float32 and float64.

The numbers behind the tolerances of tests/test_engines.py: a few optimiser steps of the twin
(32 px, batch 8, random HU) with the eager engine, the grouped engine and, for one step, the
compiled one, on this CPU under several kernel settings (threads, oneDNN on/off, the vector
instruction set PyTorch's and oneDNN's CPU kernels use). Each setting runs in its own process
(``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA`` are read at start), then every pair that should
agree is compared:

    python benchmarks/rounding_drift.py --no-compile    # eager and grouped, float32 and float64 (~5 min on 2 cores)
    python benchmarks/rounding_drift.py --compile-only  # the compiled engine's first float32 step (~10 min)

Reported per comparison and step: the largest relative difference of a loss term; for the first
step also the outputs' and the gradients' largest difference, relative to the tensor's largest
entry (for gradients at least 1e-3 of the model's largest gradient, as in the tests).
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS = 5


def run_one(engine: str, dtype_name: str, opt_name: str, steps: int, threads: int, mkldnn: bool) -> dict:
    """``steps`` optimiser steps of one engine in this process; loss terms of every step, the first
    step's outputs and gradients."""
    import torch

    import osteo.training as T
    from osteo.training import Engine, StepRunner, TrainConfig, make_model, train_step

    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn
    dtype = getattr(torch, dtype_name)
    plain_inputs = T.network_inputs
    T.network_inputs = lambda cfg, hu: [x.to(dtype) for x in plain_inputs(cfg, hu)]
    size, batch = 32, 8
    cfg = TrainConfig(image_size=size, batch_size=batch, pretrained=False, device="cpu", lam=0.5,
                      engine="eager" if engine == "reference" else engine)
    torch.manual_seed(0)
    model = make_model(cfg).to(dtype)
    opt = (torch.optim.Adam(model.parameters(), lr=1e-3) if opt_name == "adam"
           else torch.optim.SGD(model.parameters(), lr=1e-2))
    g = torch.Generator().manual_seed(0)
    hu = torch.randint(-300, 900, (steps, batch, size, size), generator=g).to(torch.int16)
    y = torch.randint(0, 3, (steps, batch), generator=g)
    if engine == "reference":
        run = lambda h, t: train_step(model, cfg, opt, h, t, amp=False)  # noqa: E731
    else:
        run = StepRunner(Engine.parse(engine, torch.device("cpu")), model, cfg, opt, amp=False)
    curve, out0, grads0 = [], None, None
    for i in range(steps):
        out, terms = run(hu[i], y[i])
        assert all(o.dtype == dtype for o in out)
        if i == 0:
            out0 = [o.detach().double() for o in out]
            grads0 = {n: p.grad.detach().double() for n, p in model.named_parameters()}
        curve.append({k: float(v.detach()) for k, v in terms.items()})
    return {"curve": curve, "out": out0, "grads": grads0,
            "setting": {"threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.enabled,
                        "isa": torch.backends.cpu.get_cpu_capability()}}


def compare(a: dict, b: dict) -> dict:
    steps = []
    for ra, rb in zip(a["curve"], b["curve"]):
        steps.append(max(abs(rb[k] - ra[k]) / max(abs(ra[k]), 1e-300) for k in ra))
    out = max(float((y - x).abs().max()) / max(float(x.abs().max()), 1e-300) for x, y in zip(a["out"], b["out"]))
    top = max(float(v.abs().max()) for v in a["grads"].values())
    grads = max(float((b["grads"][n] - v).abs().max()) / max(float(v.abs().max()), 1e-3 * top)
                for n, v in a["grads"].items())
    return {"loss_rel_by_step": steps, "out_rel": out, "grad_rel": grads}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled engine (slow to compile)")
    p.add_argument("--compile-only", action="store_true", help="only the compiled engine's first float32 step against eager")
    p.add_argument("--settings", help="comma-separated numbers of the settings to run (0: this CPU as it is; default all)")
    p.add_argument("--json", help="also write the comparisons here")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:  # one process, one setting: every job, pickled to a file
        import torch

        spec = json.loads(args._child)
        res = {}
        for job in spec["jobs"]:
            res["|".join(map(str, job))] = run_one(*job, threads=spec["threads"], mkldnn=spec["mkldnn"])
        torch.save(res, spec["out"])
        return

    import torch

    jobs = [(e, d, o, STEPS) for e, d, o in itertools.product(("reference", "grouped"), ("float32", "float64"), ("adam", "sgd"))]
    if args.compile_only:
        jobs = [("reference", "float32", "adam", 1)]
    if not args.no_compile:
        jobs += [("grouped+compile", "float32", "adam", 1)]  # float64: tests/test_engines.py, tolerance 1e-10
    isas = [i for i in ("default", "avx2", "avx512") if i != torch.backends.cpu.get_cpu_capability().lower()]
    settings = [dict(isa="", threads=2, mkldnn=True), dict(isa="", threads=1, mkldnn=True),
                dict(isa="", threads=2, mkldnn=False), dict(isa="", threads=1, mkldnn=False)]
    settings += [dict(isa=i, threads=2, mkldnn=True) for i in isas]
    if "avx2" in isas:  # as a CPU without AVX-512 (e.g. most AMD EPYCs): oneDNN's convolutions limited to AVX2 too
        settings.append(dict(isa="avx2", onednn_isa="AVX2", threads=2, mkldnn=True))
    if args.settings:
        settings = [settings[int(i)] for i in args.settings.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in settings:
            isa = s["isa"] + (f" + oneDNN {s['onednn_isa']}" if s.get("onednn_isa") else "")
            name = f"{isa or 'native'}, {s['threads']} thread(s), oneDNN {'on' if s['mkldnn'] else 'off'}"
            out = Path(tmp) / f"{len(results)}.pt"
            env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
            if s["isa"]:
                env["ATEN_CPU_CAPABILITY"] = s["isa"]  # PyTorch's own vectorised kernels
            if s.get("onednn_isa"):
                env["ONEDNN_MAX_CPU_ISA"] = s["onednn_isa"]  # oneDNN's (convolutions)
            env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / f"inductor-{len(results)}")  # compiled for this setting
            child = json.dumps({"jobs": jobs, "threads": s["threads"], "mkldnn": s["mkldnn"], "out": str(out)})
            if subprocess.run([sys.executable, __file__, "--_child", child], env=env, check=False).returncode:
                print(f"failed: {name} (left out)", flush=True)  # e.g. torch.compile under ATEN_CPU_CAPABILITY=default
                continue
            results[name] = torch.load(out)
            print(f"ran: {name} (PyTorch kernels: {next(iter(results[name].values()))['setting']['isa']})", flush=True)

    rows = []
    names = list(results)
    native = names[0]
    for dtype, opt in itertools.product(("float32", "float64"), ("adam", "sgd")) if not args.compile_only else ():
        key = lambda e: f"{e}|{dtype}|{opt}|{STEPS}"  # noqa: E731
        for n in names:  # the two engines under one setting
            rows.append((f"grouped vs eager [{n}]", dtype, opt, compare(results[n][key("reference")], results[n][key("grouped")])))
        for n in names[1:]:  # one engine under two settings
            rows.append((f"eager: {n} vs {native}", dtype, opt, compare(results[native][key("reference")], results[n][key("reference")])))
    if not args.no_compile:
        for n in names:
            ref = dict(results[n][f"reference|float32|adam|{1 if args.compile_only else STEPS}"])
            ref["curve"] = ref["curve"][:1]
            rows.append((f"grouped+compile vs eager [{n}]", "float32", "adam", compare(ref, results[n]["grouped+compile|float32|adam|1"])))

    print(f"\n{'comparison':<66} {'dtype':<8} {'opt':<5} {'outputs':>8} {'grads':>8}  loss terms, steps 1..{STEPS}")
    for what, dtype, opt, c in rows:
        steps = " ".join(f"{v:8.1e}" for v in c["loss_rel_by_step"])
        print(f"{what:<66} {dtype:<8} {opt:<5} {c['out_rel']:8.1e} {c['grad_rel']:8.1e}  {steps}")
    if any(n.startswith("default") for n in names):
        print("\n'default' (no vector instructions) also changes the seeded starting weights (torch's normal_ is "
              "vectorised), so one engine there vs native differs from the start, not only by rounding.")
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps([dict(comparison=w, dtype=d, opt=o, **c) for w, d, o, c in rows], indent=1))


if __name__ == "__main__":
    main()
