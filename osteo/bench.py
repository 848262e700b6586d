"""Training throughput of the twin network against plain torchvision ResNet18s, in one run.

    python benchmarks/throughput.py                 # on the GPU at hand (or the CPU)
    osteo bench --image-size 224 --batch-size 128   # the same, from the CLI

Rows (images per second, peak GPU memory):
  anchor        two plain torchvision ResNet18s trained one after the other (bf16 autocast on CUDA,
                channels_last, torch.compile when --compile), data already on the device
  resnet18      one plain torchvision ResNet18, same settings
  twin (ours)   TwinNet through osteo's real training step (Eq. 5 + ACM term), windowed from HU
  eval (ours)   TwinNet inference on HU batches
  data path     HU (int16, on the device) -> the two normalised views
The table is printed and written as JSON under results/bench/ with the device name and versions.
Ratios are against the anchor measured in the same run; nothing here is a timed test.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timeit(step, dev, warmup: int, steps: int, batch: int) -> dict:
    for _ in range(warmup):
        step()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    dt = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return {"images_per_s": steps * batch / dt, "seconds_per_step": dt / steps, "peak_mem_gib": mem}


def plain_resnet_step(dev, batch, size, compile_: bool, n_models: int):
    """The anchor (n_models=2) or a single plain ResNet18 (n_models=1)."""
    models = [torchvision.models.resnet18(num_classes=3).to(dev) for _ in range(n_models)]
    if dev.type == "cuda":
        models = [m.to(memory_format=torch.channels_last) for m in models]
    if compile_:
        models = [torch.compile(m) for m in models]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
    x = torch.randn(batch, 3, size, size, device=dev)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (batch,), device=dev)

    def step():
        for m, o in zip(models, opts):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss = F.cross_entropy(m(x), y)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()

    return step


def twin_steps(dev, batch, size):
    from osteo.training import TrainConfig, forward_heads, make_model, train_step
    from osteo.windowing import to_network_input

    cfg = TrainConfig(image_size=size, batch_size=batch, pretrained=False, device=str(dev))
    torch.manual_seed(0)
    model = make_model(cfg).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    hu = torch.randint(-200, 900, (batch, size, size), device=dev, dtype=torch.int16)
    y = torch.randint(0, 3, (batch,), device=dev)
    amp = dev.type == "cuda"

    def step():
        train_step(model, cfg, opt, hu, y, amp)

    @torch.no_grad()
    def eval_step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            forward_heads(model.eval(), cfg, hu)
        model.train()

    def data_step():
        to_network_input(hu, "s")
        to_network_input(hu, "t")

    return step, eval_step, data_step


def run(image_size=224, batch_size=128, steps=20, warmup=5, compile_=None, device="auto", out_dir="results/bench") -> dict:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    compile_ = (dev.type == "cuda") if compile_ is None else compile_
    rows = {}
    rows["anchor (2x ResNet18)"] = _timeit(plain_resnet_step(dev, batch_size, image_size, compile_, 2), dev, warmup, steps, batch_size)
    rows["resnet18"] = _timeit(plain_resnet_step(dev, batch_size, image_size, compile_, 1), dev, warmup, steps, batch_size)
    tr, ev, dp = twin_steps(dev, batch_size, image_size)
    rows["twin (ours), train"] = _timeit(tr, dev, warmup, steps, batch_size)
    rows["twin (ours), eval"] = _timeit(ev, dev, warmup, steps, batch_size)
    rows["data path (HU -> 2 views)"] = _timeit(dp, dev, warmup, steps, batch_size)
    anchor = rows["anchor (2x ResNet18)"]["images_per_s"]
    for r in rows.values():
        r["ratio_to_anchor"] = r["images_per_s"] / anchor
    twin = rows["twin (ours), train"]["images_per_s"]
    report = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
        "image_size": image_size, "batch_size": batch_size, "steps": steps, "compile_anchor": compile_,
        "rows": rows,
        "paper_epoch_seconds": 3600 / twin, "paper_run_60_epochs_seconds": 60 * 3600 / twin,
    }
    print(f"device: {report['device']}; {image_size} px, batch {batch_size}")
    print(f"{'':30s} {'img/s':>10s} {'x anchor':>9s} {'peak GiB':>9s}")
    for name, r in rows.items():
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{name:30s} {r['images_per_s']:10.1f} {r['ratio_to_anchor']:9.2f} {mem:>9s}")
    print(f"one paper-size epoch (3600 slices): {report['paper_epoch_seconds']:.1f} s; 60 epochs: {report['paper_run_60_epochs_seconds']:.0f} s")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if dev.type == "cuda" else "cpu"
    (out / f"throughput-{tag}-{image_size}px.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out-dir", default="results/bench")
    a = p.parse_args(argv)
    run(a.image_size, a.batch_size, a.steps, a.warmup, False if a.no_compile else None, a.device, a.out_dir)


if __name__ == "__main__":
    main()
