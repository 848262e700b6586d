"""Training throughput of the twin network against plain torchvision ResNet18s, in one run.

    python benchmarks/throughput.py                 # on the GPU at hand (or the CPU)
    osteo bench --image-size 224 --batch-size 128   # the same, from the CLI

Rows (images per second, ratio to the anchor, peak GPU memory, seconds spent warming up/compiling):
  anchor             two plain torchvision ResNet18s trained one after the other (bf16 autocast on
                     CUDA, channels_last, torch.compile on CUDA), data already on the device
  resnet18           one plain torchvision ResNet18, same settings
  twin [ENGINE]      TwinNet through osteo's real training step (Eq. 5 + ACM term, windowed from
                     int16 HU on the device), one row per engine (osteo.training.Engine)
  N twins [ENGINE]   (--twins N) N TwinNets, one per alpha of Table 4, trained on the same batches as ONE
                     grouped network (osteo.grouped.grouped_twins_forward); images/s counts the
                     slices of all N runs, so it compares with the one-twin rows: higher means
                     training a table's runs together would be faster than one after the other
  N twins batched    (--twins N) N twin RUNS (seeds 0..N-1) as ``osteo grid --batch-runs N`` trains them
                     (osteo.batched: one vmapped network, each run its own weights, batch-norm
                     statistics and Adam), against the same N runs' steps one after the other with
                     the engine a separate run uses ("auto"); images/s counts all N runs' slices
  twin eval          TwinNet inference on HU batches (separate and grouped backbones)
  data path          HU (int16, on the device) -> the two normalised views
  loop check         (--loop-check) osteo.train on a smoke-sized run against a plain eager loop of
                     the same model: osteo's loop must not be slower (the CPU path)
  baselines          (--baselines) Table 5's other networks, eager and compiled
An "images" count is the number of slices: a twin image goes through both backbones.
The table is printed and written as JSON under results/bench/ with the device name and versions.
Ratios are against the anchor measured in the same run; nothing here is a timed test.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from .batched import _BatchedStep
from .data import SliceData, SliceSet
from .grouped import grouped_twins_forward
from .losses import acm_penalty, twin_loss
from .models import build_model, default_image_size
from .training import (
    Engine, TrainConfig, _start_run, forward_heads, loss_terms, make_model, network_inputs, resolve_device, train,
)
from .windowing import to_network_input

CUDA_ENGINES = ("eager", "grouped+compile", "compile", "grouped", "grouped+graphs", "graphs")
CPU_ENGINES = ("eager", "grouped")


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timeit(step, dev, warmup: int, steps: int, batch: int, runs: int = 1) -> dict:
    """Images/s of ``steps`` steps after ``warmup`` ones; the peak memory counts the warm-up too
    (CUDA graphs allocate their memory pool while they are captured there)."""
    if dev.type == "cuda":
        _sync(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(dev)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    dt = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return {"images_per_s": runs * steps * batch / dt, "seconds_per_step": dt / steps, "peak_mem_gib": mem,
            "warmup_s": warm}


def plain_step(dev, batch, size, compile_: bool, n_models: int = 1, name: str = "resnet18"):
    """The anchor (n_models=2 plain ResNet18s) or n_models plain torchvision/timm networks, trained one after the other."""
    torch.manual_seed(0)
    models = [build_model(name, 3, pretrained=False, image_size=size).to(dev) for _ in range(n_models)]
    if dev.type == "cuda":
        models = [m.to(memory_format=torch.channels_last) for m in models]
    fwd = [torch.compile(m) if compile_ else m for m in models]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3, fused=dev.type == "cuda") for m in models]
    x = torch.randn(batch, 3, size, size, device=dev)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (batch,), device=dev)

    def step():
        for f, o in zip(fwd, opts):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss = F.cross_entropy(f(x).float(), y)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()

    return step


def _hu_batch(dev, batch, size):
    """A fixed batch of int16 HU slices and labels on the device (what training reads)."""
    g = torch.Generator().manual_seed(0)
    hu = torch.randint(-200, 900, (batch, size, size), generator=g, dtype=torch.int16).to(dev)
    return hu, torch.randint(0, 3, (batch,), generator=g).to(dev)


def _twin(dev, batch, size, engine: str):
    cfg = TrainConfig(image_size=size, batch_size=batch, pretrained=False, device=str(dev), engine=engine)
    torch.manual_seed(0)
    model = make_model(cfg).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=dev.type == "cuda")
    hu, y = _hu_batch(dev, batch, size)
    runner = Engine.parse(engine, dev).runner(model, cfg, opt, amp=cfg.amp and dev.type == "cuda")
    return cfg, model, runner, hu, y


def twin_train_step(dev, batch, size, engine: str):
    _, _, runner, hu, y = _twin(dev, batch, size, engine)
    return lambda: runner(hu, y)


def twins_train_step(dev, batch, size, n_twins: int, compile_: bool):
    """``n_twins`` fixed-alpha TwinNets (Table 4) trained on the same batch as one grouped network: the
    batch is windowed once, every twin's loss (Eq. 5 + ACM term) is summed, then one backward and one
    Adam step. Each twin's parameters get exactly their own gradient, and Adam is per element, so
    this is N separate trainings (tests/test_engines.py checks the forward and the gradients)."""
    alphas = [0.1, 0.3, 0.5, 0.7, 0.9, 0.2, 0.4, 0.6, 0.8][:n_twins]
    cfgs = [TrainConfig(image_size=size, batch_size=batch, pretrained=False, device=str(dev), alpha=a,
                        learn_alpha=False) for a in alphas]
    torch.manual_seed(0)
    models = [make_model(c).to(dev) for c in cfgs]
    if dev.type == "cuda":
        models = [m.to(memory_format=torch.channels_last) for m in models]
    opt = torch.optim.Adam([p for m in models for p in m.parameters()], lr=1e-3, fused=dev.type == "cuda")
    hu, y = _hu_batch(dev, batch, size)

    def loss(hu, y):
        views = network_inputs(cfgs[0], hu)
        outs = grouped_twins_forward(models, [views] * len(models))
        return sum(loss_terms(c, out, y, acm)["total"] for c, (out, acm) in zip(cfgs, outs))

    fn = torch.compile(loss, dynamic=False) if compile_ else loss

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            total = fn(hu, y)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    return step


def twin_runs_step(dev, batch, size, n_runs: int, batched: bool):
    """``n_runs`` twin runs (seeds 0..N-1, each its own network and Adam) training on the same batch:
    as one vmapped network (:mod:`osteo.batched`, what ``osteo grid --batch-runs N`` runs), or one
    after the other, each with the engine a separate run uses (``"auto"``)."""
    cfgs = [TrainConfig(image_size=size, batch_size=batch, pretrained=False, device=str(dev), seed=i)
            for i in range(n_runs)]
    runs = [_start_run(c, dev) for c in cfgs]
    hu, y = _hu_batch(dev, batch, size)
    amp = dev.type == "cuda"
    if batched:
        step = _BatchedStep(runs, amp)
        return lambda: step([hu] * n_runs, [y] * n_runs)
    runners = [r.engine.runner(r.model, r.cfg, r.opt, amp) for r in runs]
    return lambda: [f(hu, y) for f in runners]


def twin_eval_step(dev, batch, size, grouped: bool):
    cfg, model, _, hu, _ = _twin(dev, batch, size, "eager")
    model.eval()

    @torch.no_grad()
    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            forward_heads(model, cfg, hu, grouped=grouped)

    return step


def data_step(dev, batch, size):
    cfg = TrainConfig(image_size=size)
    hu = torch.randint(-200, 900, (batch, size, size), dtype=torch.int16).to(dev)
    return lambda: network_inputs(cfg, hu)


def loop_check(dev, size=64, batch=24, n_train=192, epochs=3, repeats=2) -> dict:
    """osteo.train (engine "auto") against a plain eager loop of the same model on the same batches.

    Seconds per run of ``epochs`` epochs (training only), best of ``repeats``, alternating the two.
    ``plain_over_osteo`` >= 1 means osteo's loop is not slower.
    """
    g = torch.Generator().manual_seed(0)
    hu = torch.randint(-200, 900, (n_train + 8, size, size), generator=g, dtype=torch.int16)
    y = torch.randint(0, 3, (n_train + 8,), generator=g)
    ids = [f"P{i}" for i in range(n_train + 8)]
    part = lambda a, b: SliceSet(hu[a:b], y[a:b], ids[a:b], ids[a:b])  # noqa: E731
    data = SliceData(part(0, n_train), part(n_train, n_train + 8), size, source="bench")
    cfg = TrainConfig(epochs=epochs, batch_size=batch, image_size=size, pretrained=False, device=str(dev))

    def run_osteo():
        return train(cfg, data, progress=False).seconds

    def run_plain():
        torch.manual_seed(cfg.seed)
        model = make_model(cfg).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        h, t = data.train.hu.to(dev), data.train.y.to(dev)
        _sync(dev)
        t0 = time.perf_counter()
        for epoch in range(epochs):
            order = torch.randperm(n_train, generator=torch.Generator().manual_seed(epoch)).to(dev)
            for i in range(0, n_train, batch):
                idx = order[i : i + batch]
                out = model(to_network_input(h[idx], "s"), to_network_input(h[idx], "t"))
                loss = twin_loss(out, t[idx], cfg.lam) + acm_penalty(out.acm, cfg.acm_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        _sync(dev)
        return time.perf_counter() - t0

    osteo_s, plain_s = [], []
    for _ in range(repeats):
        plain_s.append(run_plain())
        osteo_s.append(run_osteo())
    return {"image_size": size, "batch_size": batch, "train_slices": n_train, "epochs": epochs,
            "osteo_train_seconds": min(osteo_s), "plain_loop_seconds": min(plain_s),
            "plain_over_osteo": min(plain_s) / min(osteo_s), "all_osteo": osteo_s, "all_plain": plain_s}


def _device_name(dev) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def run(image_size=224, batch_size=128, steps=20, warmup=5, compile_=None, device="auto", out_dir="results/bench",
        engines=None, loop=False, baselines=False, twins=5) -> dict:
    dev = resolve_device(device)
    compile_ = (dev.type == "cuda") if compile_ is None else compile_
    engines = engines or (CUDA_ENGINES if dev.type == "cuda" else CPU_ENGINES)
    # Compiled steps need more warm-up: compiling, then the first runs of the compiled code
    # (train() compiles the full batch only; a smaller last batch runs eagerly).
    cwarm = max(warmup, 3)
    rows = {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if dev.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", _device_name(dev).lower()).strip("-")
    path = out / f"throughput-{tag}-{image_size}px.json"

    def add(name, step, compiled=False, runs=1):
        print(f"  measuring {name} ...", flush=True)
        rows[name] = r = _timeit(step, dev, cwarm if compiled else warmup, steps, batch_size, runs)
        mem = f", peak {r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else ""
        print(f"    {r['images_per_s']:.1f} img/s{mem}, warm-up {r['warmup_s']:.1f} s", flush=True)
        # a partial table survives a run stopped half-way (a time limit, a crash in a later row)
        path.write_text(json.dumps({"partial": True, "device": _device_name(dev), "torch": torch.__version__,
                                    "image_size": image_size, "batch_size": batch_size, "rows": rows}, indent=1))

    add("anchor (2x ResNet18)", plain_step(dev, batch_size, image_size, compile_, 2), compile_)
    add("resnet18", plain_step(dev, batch_size, image_size, compile_, 1), compile_)
    for e in engines:
        add(f"twin train [{e}]", twin_train_step(dev, batch_size, image_size, e), "compile" in e or "graphs" in e)
    add("twin eval [eager]", twin_eval_step(dev, batch_size, image_size, grouped=False))
    add("twin eval [grouped]", twin_eval_step(dev, batch_size, image_size, grouped=True))
    add("data path (HU -> 2 views)", data_step(dev, batch_size, image_size))
    # last: compiling ten backbones may take long, and a time limit should not cost the rows above
    if twins > 1:
        add(f"{twins} twin runs one after the other [auto]", twin_runs_step(dev, batch_size, image_size, twins, False),
            runs=twins)
        add(f"{twins} twin runs batched [osteo.batched]", twin_runs_step(dev, batch_size, image_size, twins, True),
            runs=twins)
        for comp in (False, True) if dev.type == "cuda" else (False,):
            add(f"{twins} twins as one network [grouped{'+compile' if comp else ''}]",
                twins_train_step(dev, batch_size, image_size, twins, comp), comp, runs=twins)
    if baselines:
        for name in ("efficientnet_b0", "inception_v3", "xception", "vit_b_16"):
            size = default_image_size(name) if default_image_size(name) != 224 else image_size
            for comp in (False, True):
                add(f"{name} {size}px [{'compile' if comp else 'eager'}]", plain_step(dev, batch_size, size, comp, 1, name), comp)
    anchor = rows["anchor (2x ResNet18)"]["images_per_s"]
    for r in rows.values():
        r["ratio_to_anchor"] = r["images_per_s"] / anchor
    twin_rows = {k: v for k, v in rows.items() if k.startswith("twin train")}
    best = max(twin_rows, key=lambda k: twin_rows[k]["images_per_s"])
    twin = twin_rows[best]["images_per_s"]
    report = {
        "device": _device_name(dev),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
        "image_size": image_size, "batch_size": batch_size, "steps": steps, "compile_anchor": compile_,
        "rows": rows,
        "best_twin_engine": best[len("twin train ["):-1],
        "data_path_over_best_train": rows["data path (HU -> 2 views)"]["images_per_s"] / twin,
        "paper_epoch_seconds": 3600 / twin, "paper_run_60_epochs_seconds": 60 * 3600 / twin,
        # ... and with the best engine's warm-up (compilation) added, as a real run pays it once
        "paper_run_60_epochs_with_warmup_seconds": 60 * 3600 / twin + twin_rows[best]["warmup_s"],
    }
    if twins > 1:  # the same N runs, batched against one after the other, in this run
        seq, bat = rows[f"{twins} twin runs one after the other [auto]"], rows[f"{twins} twin runs batched [osteo.batched]"]
        report["batched_runs"] = {"runs": twins, "batched_over_sequential": bat["images_per_s"] / seq["images_per_s"],
                                  "images_per_s_per_run_batched": bat["images_per_s"] / twins,
                                  "images_per_s_per_run_sequential": seq["images_per_s"] / twins}
    if loop:
        print("  measuring the loop check ...", flush=True)
        report["loop_check"] = loop_check(dev)
    print(format_table(report))
    path.write_text(json.dumps(report, indent=1))
    print(f"written: {path}")
    return report


def format_table(report: dict) -> str:
    """The benchmark's table as text (what ``osteo bench`` prints)."""
    w = max(map(len, report["rows"]))
    lines = [f"device: {report['device']}; torch {report['torch']}; {report['image_size']} px, batch {report['batch_size']}",
             f"{'':{w}s} {'img/s':>9s} {'x anchor':>9s} {'peak GiB':>9s} {'warm-up s':>10s}"]
    for name, r in report["rows"].items():
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        lines.append(f"{name:{w}s} {r['images_per_s']:9.1f} {r['ratio_to_anchor']:9.2f} {mem:>9s} {r['warmup_s']:10.1f}")
    lines.append(f"fastest twin engine: {report['best_twin_engine']}; data path / that training: "
                 f"{report['data_path_over_best_train']:.1f}x")
    lines.append(f"one paper-size epoch (3600 slices): {report['paper_epoch_seconds']:.1f} s; "
                 f"60 epochs: {report['paper_run_60_epochs_seconds']:.0f} s in steady state, "
                 f"{report['paper_run_60_epochs_with_warmup_seconds']:.0f} s with its warm-up/compilation")
    if "batched_runs" in report:
        br = report["batched_runs"]
        lines.append(f"{br['runs']} twin runs batched / one after the other: {br['batched_over_sequential']:.2f}x "
                     f"({br['images_per_s_per_run_batched']:.1f} vs {br['images_per_s_per_run_sequential']:.1f} img/s per run)")
    if "loop_check" in report:
        lc = report["loop_check"]
        lines.append(f"loop check ({lc['train_slices']} slices, {lc['image_size']} px, batch {lc['batch_size']}, "
                     f"{lc['epochs']} epochs): osteo.train {lc['osteo_train_seconds']:.1f} s, plain eager loop "
                     f"{lc['plain_loop_seconds']:.1f} s, plain/osteo = {lc['plain_over_osteo']:.2f}")
    return "\n".join(lines)


def add_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options, on *p* (``osteo bench`` passes its own parser)."""
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-compile", action="store_true", help="do not compile the anchor (default: compile on CUDA)")
    p.add_argument("--engines", nargs="+", help=f"twin engines to measure (default CUDA: {' '.join(CUDA_ENGINES)}; "
                                                 f"CPU: {' '.join(CPU_ENGINES)})")
    p.add_argument("--loop-check", action="store_true", help="also time osteo.train against a plain eager loop")
    p.add_argument("--baselines", action="store_true", help="also Table 5's other networks, eager and compiled")
    p.add_argument("--twins", type=int, default=5, help="N twins trained as one grouped network (Table 4 has 5; "
                                                         "0 skips the row)")
    p.add_argument("--out-dir", default="results/bench")
    return p


def check_options(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Refuse a value the measurement would meet only minutes later (``p.error``: one line, exit 2)."""
    for name, low in (("steps", 1), ("warmup", 0), ("twins", 0)):
        if getattr(a, name) < low:
            p.error(f"--{name} must be an integer >= {low}, got {getattr(a, name)}")
    if not 16 <= a.image_size <= 4096:
        p.error(f"--image-size must be an integer in [16, 4096], got {a.image_size}")
    try:
        for engine in a.engines or ("auto",):
            TrainConfig(image_size=a.image_size, batch_size=a.batch_size, pretrained=False, engine=engine)
    except ValueError as e:
        p.error(str(e).replace("TrainConfig.batch_size", "--batch-size").replace("TrainConfig.engine", "--engines"))


def main(argv=None, parser: argparse.ArgumentParser | None = None):
    """``python -m osteo.bench [options]``; ``osteo bench`` passes its parser, whose errors are one line."""
    p = add_options(parser or argparse.ArgumentParser(prog="python -m osteo.bench", description=__doc__.splitlines()[0]))
    a = p.parse_args(argv)
    check_options(p, a)
    run(a.image_size, a.batch_size, a.steps, a.warmup, False if a.no_compile else None, a.device, a.out_dir,
        a.engines, a.loop_check, a.baselines, a.twins)


if __name__ == "__main__":
    main()
