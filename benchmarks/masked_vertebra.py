"""Masked-vertebra audit of the synthetic data (SYNTHETIC DATA, not the paper's).

How much does a CNN learn about the label from everything BUT the vertebra? A small CNN is trained on
synthetic slices whose vertebra (bone, dilated by 3 mm) is replaced by a flat 40 HU, once with the
confounders on and once off, and, for comparison, on the full slices. Patients are split 5-fold (one
slice per patient, so every patient is a test patient once); the accuracy's 95 % interval comes from a
bootstrap over patients stratified by class. Chance is 33.3 %.

    PYTHONPATH=. python benchmarks/masked_vertebra.py [--n-per-class 300] [--size 64] [--epochs 25]

With the confounders off, the masked network should stay near chance; on, it should beat chance by
a margin, while the full slices stay well above both.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from osteo.synthetic import LABELS, _anatomy, _cohort, _confounder_set, _render, _rngs, _with_sex


def make_set(n_per_class: int, size: int, seed: int, confounders: bool):
    """HU slices, the same slices with the vertebra masked, labels and patient ids (one slice each)."""
    from scipy.ndimage import binary_dilation

    conf = _confounder_set(confounders)
    full, masked, y, pids = [], [], [], []
    for p in _cohort(n_per_class, seed, 1):  # exactly the slices synthesize() writes
        p = _with_sex(p, conf)
        rng_a, rng_s = _rngs(seed, p)
        an = _anatomy(p, rng_a, conf)
        hu, st = _render(p, an, 0, size, rng_s)
        hu = hu.astype(np.float32)
        win, bone = st["vertebra_window"]
        m = np.zeros(hu.shape, bool)
        m[win] = bone
        m = binary_dilation(m, iterations=max(1, int(round(3.0 / p.pixel_spacing))))
        mk = hu.copy()
        mk[m] = 40.0
        full.append(hu)
        masked.append(mk)
        y.append(LABELS.index(p.label))
        pids.append(p.patient_id)
    return np.stack(full), np.stack(masked), np.array(y), np.array(pids)


def _net() -> nn.Module:
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(2, 16), block(16, 32), block(32, 64), block(64, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(64, 3))


def _inputs(hu: np.ndarray) -> torch.Tensor:
    """Two windows as channels: soft tissue (-160..240 HU) and bone (-450..1050 HU), scaled to 0-1."""
    s = np.clip((hu + 160.0) / 400.0, 0, 1)
    b = np.clip((hu + 450.0) / 1500.0, 0, 1)
    return torch.from_numpy(np.stack([s, b], 1).astype(np.float32))


def cv_predict(hu: np.ndarray, y: np.ndarray, folds: int, epochs: int, seed: int) -> np.ndarray:
    x = _inputs(hu)
    yt = torch.from_numpy(y).long()
    fold = np.random.default_rng(seed).permutation(len(y)) % folds
    pred = np.full(len(y), -1)
    for f in range(folds):
        torch.manual_seed(seed * 100 + f)
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        net = _net()
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 4e-3, total_steps=epochs * ((len(tr) + 63) // 64))
        g = torch.Generator().manual_seed(seed + f)
        for _ in range(epochs):
            net.train()
            for idx in torch.randperm(len(tr), generator=g).split(64):
                bi = torch.from_numpy(tr)[idx]
                xb = x[bi]
                if torch.rand(1, generator=g).item() < 0.5:
                    xb = xb.flip(-1)
                loss = nn.functional.cross_entropy(net(xb), yt[bi])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        with torch.no_grad():
            pred[te] = net(x[torch.from_numpy(te)]).argmax(1).numpy()
    return pred


def patient_ci(correct: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0):
    """95 % percentile interval of the accuracy, resampling patients (one slice each) within each class."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)]
    accs = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(g, len(g)) for g in groups])
        accs.append(correct[idx].mean())
    return float(np.percentile(accs, 2.5)), float(np.percentile(accs, 97.5))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-per-class", type=int, default=300)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"synthetic data, {a.n_per_class} patients per class (one slice each), {a.size} px, "
          f"{a.folds}-fold CV by patient, {a.epochs} epochs, seed {a.seed}")
    for conf in (True, False):
        t0 = time.time()
        full, masked, y, _ = make_set(a.n_per_class, a.size, a.seed, conf)
        for name, hu in (("vertebra masked", masked), ("full slice", full)):
            if name == "full slice" and not conf:
                continue  # the bone is the same with or without confounders
            pred = cv_predict(hu, y, a.folds, a.epochs, a.seed)
            correct = (pred == y).astype(float)
            lo, hi = patient_ci(correct, y)
            print(f"confounders {'on ' if conf else 'off'} | {name:15s} | accuracy {100 * correct.mean():5.1f} % "
                  f"(95 % CI {100 * lo:.1f}-{100 * hi:.1f}, n = {len(y)} patients) | {time.time() - t0:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main()
