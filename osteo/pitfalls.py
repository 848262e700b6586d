"""Protocol pitfalls measured: how much of a reported accuracy comes from how it was measured.

Three choices that papers often make without saying so, each a :class:`osteo.TrainConfig` switch:
``split="slice"`` (one patient's neighbouring slices in train and test), ``report_epoch=
"best_on_test"`` (model selection on the test set) and ``window_bits=8`` (Eq. 1 rounded to 256 grey
levels, as in a PNG export). :func:`pitfall_row` sets a pitfall's run beside the honest one: a
paired test over patients when both were tested on the same slices, else an unpaired comparison
(:func:`osteo.compare_unpaired`). :func:`patient_pool` gives the honest and the by-slice split the
same slices to share out, so that they differ only in how the slices are split.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from .experiments import Experiments, describe, patients_of, verdict
from .manifest import load_manifest
from .metrics import accuracy_ci, compare, compare_unpaired
from .training import TrainConfig, TrainResult


def patient_pool(exp: Experiments) -> Experiments:
    """A runner on the training patients of ``exp``'s data, with no split of its own: then
    ``split="patient"`` and ``split="slice"`` both split the SAME slices 80/20 (by patient, by slice),
    with the same number of training slices. (The kit's synthetic test patients have one slice
    each, so splitting the whole set by slice would also change the training set's size.)

    The pool's manifest is written under ``<data_dir>/patient-pool/`` (paths relative to it), and
    rewritten only when its content changes; its runs are cached like any other."""
    source = exp.manifest()
    df = load_manifest(source)
    if "split" in df.columns:
        df = df[df["split"] == "train"]
    folder = exp.data_dir / "patient-pool" / (
        f"{exp.profile.name}-{hashlib.sha256(str(os.path.abspath(source)).encode()).hexdigest()[:8]}")
    folder.mkdir(parents=True, exist_ok=True)
    keep = [c for c in df.columns if c not in ("split", "y")]
    out = df[keep].copy()
    out["path"] = [os.path.relpath(p, folder).replace(os.sep, "/") for p in out["path"]]
    text = out.to_csv(index=False)
    man = folder / "manifest.csv"
    if not man.exists() or man.read_text() != text:
        tmp = man.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, man)
    return Experiments(exp.profile, results_dir=exp.results_dir, data_source=str(man), data_dir=exp.data_dir,
                       progress=exp.progress)


def same_test_set(a: TrainResult, b: TrainResult) -> bool:
    """Whether two runs were tested on the same slices (labels and patients, in the same order)."""
    return list(a.y_true) == list(b.y_true) and patients_of(a)[0] == patients_of(b)[0]


def pitfall_row(pitfall: str, honest: TrainResult, other: TrainResult, seed: int = 0) -> dict:
    """One row of a pitfall table: the honest run's and the pitfall's accuracy (%) with their 95 %
    intervals over patients, and the pitfall's change ``diff`` = pitfall - honest (points) with its
    95 % interval and p-value: paired over patients (:func:`osteo.compare`) when both runs were
    tested on the same slices, else unpaired (:func:`osteo.compare_unpaired`; ``test`` says which).
    ``shown`` is "yes" when the interval excludes 0 above and p < 0.05 (the pitfall raised the
    accuracy beyond test-set noise), "no: lower" when it excludes 0 below, else "not shown"."""
    row = {"pitfall": pitfall}
    for name, r in (("honest", honest), ("pitfall", other)):
        groups, known = patients_of(r)
        if not known:
            raise ValueError(f"{describe(TrainConfig(**r.config))}: the run does not know its test patients; "
                             "train it again with this version of the kit")
        acc, lo, hi = accuracy_ci(r.y_true, r.predictions[r.main_head], groups, seed=seed)
        row.update({f"{name}_acc": round(100 * acc, 2), f"{name}_ci95": f"{100 * lo:.1f}-{100 * hi:.1f}",
                    f"{name}_patients": len(set(groups))})
    pa, pb = other.predictions[other.main_head], honest.predictions[honest.main_head]
    if same_test_set(honest, other):
        c = compare(other.y_true, pa, pb, patients_of(other)[0], seed=seed)
        test = "paired over the same patients"
    else:
        c = compare_unpaired(other.y_true, pa, patients_of(other)[0], honest.y_true, pb, patients_of(honest)[0],
                             seed=seed)
        test = "unpaired: different test sets"
    shown = verdict(c.lo, c.hi, c.p)
    row.update({"diff": round(100 * c.diff, 2), "ci95_low": round(100 * c.lo, 2), "ci95_high": round(100 * c.hi, 2),
                "p_value": round(c.p, 4), "test": test,
                "shown": {"yes": "yes", "no: B better": "no: lower"}.get(shown, shown)})
    return row


def leak_share(data) -> tuple:
    """``(k, n)``: how many of the ``n`` test slices have a slice of their patient in training."""
    train = set(data.train.patient_id)
    k = int(np.sum([p in train for p in data.test.patient_id]))
    return k, len(data.test.patient_id)

