"""How far a batched run's members (osteo.batched) drift from their separate runs, in float64 on the CPU.

The numbers behind tests/test_batched.py and docs/design.md (section 3):

    PYTHONPATH=. python benchmarks/batched_drift.py            # about 1 minute on 2 cores
    PYTHONPATH=. python benchmarks/batched_drift.py --threads 2

1. One step of two members (twin; ResNet18+ACM), batches of 8 and of 2 slices: the largest difference
   of a loss term (relative), of a gradient (relative to its tensor's largest entry; ACM's key/query
   biases apart, relative to the model's largest gradient), of a weight after Adam where |g| > 1e-6
   (relative to max(1, the tensor's scale)) and of a batch-norm statistic (relative to its scale).
2. Six steps of the twin (lr 3e-3), batches of 8 only or with every third batch of 2 slices: the
   weight tensor furthest from the separate run's (relative to its scale; the key/query biases
   apart, given in absolute terms), and the gradient and Adam's sqrt(v) at its furthest element.

Measured here (torch 2.14.1, 1 and 2 threads): one step equal to <= 6.3e-15 (gradients; loss terms
and batch-norm statistics identical, weights <= 1e-15); six steps of 8 slices 4.8e-12, with two
2-slice batches 1.1e-5 (the 2-slice steps multiply the difference by ~1e3 each). Before ACM read a
member's strided feature map through the branch of a contiguous one, one step differed by 3e-14
(batch 8) and 1.7e-10 (batch 2) in the gradients, 1.4e-9 in the weights.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import make_separable

import osteo.batched as B
import osteo.training as T
from osteo.training import TrainConfig

BASE = dict(epochs=2, batch_size=8, image_size=32, pretrained=False, device="cpu")
MEMBERS = {
    "twin": [dict(seed=1, lam=0.1), dict(seed=2, lam=0.5, lr=3e-3)],
    "resnet18_acm": [dict(model="resnet18_acm", inputs=("t",), seed=4),
                     dict(model="resnet18_acm", inputs=("s",), seed=5, acm_weight=0.0)],
}


def float64():
    plain_model, plain_inputs = T.make_model, T.network_inputs
    T.make_model = lambda cfg: plain_model(cfg).double()
    T.network_inputs = B.network_inputs = lambda cfg, hu: [x.double() for x in plain_inputs(cfg, hu)]


def runs_and_refs(members):
    cfgs = [TrainConfig(**BASE, **m) for m in members]
    runs = [T._start_run(c, torch.device("cpu")) for c in cfgs]
    refs = [T._start_run(c, torch.device("cpu")) for c in cfgs]  # separate runs: same seeds, same weights
    for r in runs + refs:
        r.model.train()
    return runs, refs


def batches(data, n, sizes, g):
    idx = [torch.randperm(len(data.train), generator=g)[:s] for s in sizes[:n]]
    return [data.train.hu[i] for i in idx], [data.train.y[i] for i in idx]


def one_step(data, kind, batch):
    runs, refs = runs_and_refs(MEMBERS[kind])
    hus, ys = batches(data, len(runs), [batch] * len(runs), torch.Generator().manual_seed(0))
    _, terms = B._BatchedStep(runs, amp=False)(hus, ys)
    loss = grad = kq = weight = bn = 0.0
    for r, ref, hu, y, t in zip(runs, refs, hus, ys, terms):
        _, want = T.train_step(ref.model, ref.cfg, ref.opt, hu, y, amp=False)
        for k in want:
            a, b = float(t[k].detach()), float(want[k].detach())
            loss = max(loss, abs(a - b) / abs(b))
        got = dict(r.model.named_parameters())
        largest = max(float(p.grad.abs().max()) for p in ref.model.parameters())
        for k, p in ref.model.named_parameters():
            d = float((got[k].grad - p.grad).abs().max())
            if k.endswith("acm.kq.bias"):
                kq = max(kq, d / largest)
            else:
                grad = max(grad, d / max(float(p.grad.abs().max()), 1e-300))
            sure = p.grad.abs() > 1e-6
            if sure.any():
                d = float((got[k] - p).detach()[sure].abs().max())
                weight = max(weight, d / max(1.0, float(p.detach().abs().max())))
        bufs = dict(r.model.named_buffers())
        for k, b in ref.model.named_buffers():
            if b.is_floating_point():
                bn = max(bn, float((bufs[k] - b).abs().max()) / max(float(b.abs().max()), 1e-300))
    print(f"{kind:13s} batch {batch}: loss {loss:.1e}  gradient {grad:.1e}  key/query-bias gradient {kq:.1e}  "
          f"weight {weight:.1e}  batch-norm statistics {bn:.1e}")


def six_steps(data, small_batches):
    runs, refs = runs_and_refs(MEMBERS["twin"])
    step, g = B._BatchedStep(runs, amp=False), torch.Generator().manual_seed(0)
    print(f"twin, 6 steps, batches of 8{' and every third of 2' if small_batches else ''} (member lr 3e-3):")
    for s in range(6):
        size = 2 if small_batches and s % 3 == 2 else 8
        hus, ys = batches(data, len(runs), [size] * len(runs), g)
        step(hus, ys)
        for ref, hu, y in zip(refs, hus, ys):
            T.train_step(ref.model, ref.cfg, ref.opt, hu, y, amp=False)
        got, opt = dict(runs[1].model.named_parameters()), refs[1].opt
        worst, kq = (0.0, "", 0.0, 0.0), 0.0
        for k, p in refs[1].model.named_parameters():
            d = (got[k] - p).detach().abs()
            if k.endswith("acm.kq.bias"):
                kq = max(kq, float(d.max()))
                continue
            rel = float(d.max()) / max(float(p.detach().abs().max()), 1e-300)
            if rel > worst[0]:
                j, st = int(d.argmax()), opt.state[p]
                v = float(st["exp_avg_sq"].flatten()[j] / (1 - 0.999 ** int(st["step"])))
                worst = (rel, k, float(p.grad.flatten()[j].abs()), v ** 0.5)
        print(f"  step {s + 1} ({size} slices): {worst[1]} {worst[0]:.1e} of its scale (there |g| {worst[2]:.1e}, "
              f"sqrt(v) {worst[3]:.1e}); key/query biases {kq:.1e} apart")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    float64()
    data = make_separable(n_per_class=8)
    print(f"float64, {args.threads} thread(s), torch {torch.__version__}")
    for kind in MEMBERS:
        for batch in (8, 2):
            one_step(data, kind, batch)
    for small in (False, True):
        six_steps(data, small)


if __name__ == "__main__":
    main()
