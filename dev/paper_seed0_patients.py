"""Give the committed paper-profile runs (results/paper/runs/*/result.json) their test patients,
and rebuild the paper tables from the saved predictions with patient-level intervals.

Those runs were trained on a GPU on the synthetic set of the kit's first data version (commit
41af995: five neighbouring test slices per patient, 180 test patients), before result files kept
each test slice's patient. This script regenerates that version's manifest with that version's
generator (cohort and split only: no image is rendered), checks that its test labels are exactly
the runs' ``y_true`` slice by slice, stores the patient ids in each result.json, recomputes the test
metrics with patient-level intervals, and writes tables 2, 3, Fig. 3 and the paired tests of
results/paper/tables/ and results/paper/REPORT.md. Run from the repository root (needs git):

    PYTHONPATH=$PWD python dev/paper_seed0_patients.py
"""
from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

import osteo
from osteo.experiments import OURS, TABLES, Experiments, fig3_rows, paired_rows, paper_claims, summarise
from osteo.report import write_report
from osteo.training import LABELS, TrainResult

DATA_COMMIT = "41af995"  # the commit whose synthetic set the paper runs were trained on
DATA_NOTE = ("Trained on the first version of the synthetic set (commit 41af995: 5 slices per test patient, "
             "180 test patients), not on today's generator (one slice per test patient); these numbers are "
             "recomputed from the saved predictions with patient-level intervals, until a GPU runs the "
             "paper profile again.")


def old_test_patients() -> tuple:
    """(labels, patient ids) of the old synthetic set's test slices, in manifest order."""
    src = subprocess.run(["git", "show", f"{DATA_COMMIT}:osteo/synthetic.py"], check=True, capture_output=True,
                         text=True).stdout
    src = src.replace("from .manifest import LABELS", "from osteo.manifest import LABELS")
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "old_synthetic.py"
        f.write_text(src)
        spec = importlib.util.spec_from_file_location("old_synthetic", f)
        old = importlib.util.module_from_spec(spec)
        sys.modules["old_synthetic"] = old  # dataclasses look their module up
        spec.loader.exec_module(old)
    prof = osteo.experiments.PROFILES["paper"]
    rows = [dict(label=p.label, patient_id=p.patient_id) for p in old._cohort(prof.n_per_class, 0, prof.slices_per_patient)
            for _ in range(p.n_slices)]
    df = pd.DataFrame(rows)
    df["split"] = old._split_patients(df, 0.2, 0)
    test = df[df["split"] == "test"]
    return [LABELS.index(lab) for lab in test["label"]], test["patient_id"].tolist()


def main() -> int:
    y_old, ids = old_test_patients()
    exp = Experiments("paper", seeds=(0,), progress=False)
    runs = {}
    for f in sorted((exp.out / "runs").glob("*/result.json")):
        r = TrainResult.from_json(f)
        if list(r.y_true) != y_old:
            raise SystemExit(f"{f}: its test labels are not the old synthetic set's: cannot map patients")
        r.test_patient_id = ids
        cfg = osteo.TrainConfig(**r.config)
        r.test = {h: osteo.classification_report(r.y_true, p, cfg.num_classes, LABELS, groups=ids)
                  for h, p in r.predictions.items()}
        r.to_json(f)
        runs[osteo.TrainConfig(**r.config).key()] = r
    print(f"{len(runs)} runs: {len(ids)} test slices of {len(set(ids))} patients, labels match slice by slice")

    def result(overrides):
        return runs.get(exp.config(seed=0, **overrides).key())

    done = []
    for name, spec in TABLES.items():
        res = [result(ov) for _, ov, _ in spec["rows"]]
        if any(r is None for r in res):
            continue
        exp.save_table(name, pd.DataFrame([summarise(label, [r], p) for (label, _, p), r in zip(spec["rows"], res)]),
                       note=DATA_NOTE)
        done.append(name)
    paired = []
    for name in done:
        spec = {label: (ov, p) for label, ov, p in TABLES[name]["rows"]}
        for a, b in paper_claims(name):
            paired += paired_rows(TABLES[name]["title"].split(".")[0], a, b, [result(spec[a][0])],
                                  [result(spec[b][0])], spec[a][1] - spec[b][1])
    exp.save_table("paired", pd.DataFrame(paired), note=DATA_NOTE)
    exp.save_table("fig3", pd.DataFrame(fig3_rows([result(OURS)])), note=DATA_NOTE)
    stale = exp.out / "tables" / "mcnemar.csv"
    for f in (stale, stale.with_suffix(".json")):
        f.unlink(missing_ok=True)
    print(f"tables {', '.join(done)}, fig3, paired; report: {write_report(exp.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
