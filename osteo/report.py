"""REPORT.md: every reproduced table beside the paper's, with patient-level intervals, seeds, the
gap, and the paper's claims "A beats B" tested pairwise.

Built from the table files that the notebooks write under ``results/<profile>/tables/``, so it can
be regenerated at any time with ``osteo report --profile P``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .experiments import PROFILES, TABLES, project_root

EXTRA_TABLES = {"clinical": "Clinical reference: threshold on mean trabecular HU (fitted on train)",
                "fig3": "Fig. 3. Class-wise accuracy of G_s and G_t (Ours)",
                "paired": "Did the paper's claims hold? Paired tests over patients",
                "pitfalls": "Protocol pitfalls: each against the honest protocol (notebook 10)"}


def _fmt(v, nd=2) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    if isinstance(v, list):
        return ", ".join(_fmt(x, nd) for x in v)
    return str(v)


def markdown_table(rows: list, columns: list) -> str:
    head = "| " + " | ".join(c for c, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k)) for _, k in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


ACC_COLUMNS = [
    ("Model", "model"), ("Paper acc %", "paper_acc"), ("Reproduced acc % (mean)", "acc"),
    ("95 % CI", "ci"), ("SD over seeds", "seed_sd"), ("Seeds: acc %", "per_seed"), ("Gap", "gap_to_paper"),
    ("Macro-F1", "macro_f1"), ("QW kappa", "qw_kappa"), ("alpha", "alpha"),
]
PAIRED_COLUMNS = [
    ("Claim: A beats B", "claim"), ("Seed", "seed"), ("Paper A - B", "paper_diff"), ("Ours A - B", "diff"),
    ("95 % CI", "ci"), ("p", "p"), ("Detectable (80 % power)", "mdd80"), ("Held?", "holds"),
]


def _test_set_line(rows: list) -> str:
    """Per table: test patients, slices, design effect and effective sample size, and what the interval covers."""
    r = rows[0]
    kinds = sorted({x.get("interval") or "Wilson over slices pooled over seeds" for x in rows})
    if r.get("n_patients"):
        size = (f"Test set: {r['n_patients']} patients, {r['n_slices']} slices; design effect "
                f"{_fmt(float(r['design_effect']))} (mean over rows), so the slices are worth about "
                f"{round(r['n_slices'] / float(r['design_effect']))} independent ones (effective sample size).")
    elif r.get("n_slices"):
        size = f"Test set: {r['n_slices']} slices (patients not recorded)."
    else:
        size = "Test set: patients not recorded (a table made by an older version of the kit)."
    return f"{size} 95 % intervals cover: {'; '.join(kinds)}."


def _paired_section(rows: list) -> list:
    for r in rows:
        r["claim"] = f"{r['a']} > {r['b']}"
        r["ci"] = f"{r['ci95_low']:.1f} to {r['ci95_high']:.1f}"
        r["p"] = "< 0.001" if r["p_value"] < 0.001 else f"{r['p_value']:.3f}"
    out = ["A claim holds when the 95 % interval of the accuracy difference (points) lies above 0 (and p < 0.05). The interval "
           "is a paired bootstrap over test patients (stratified by class, percentile); combined over seeds "
           "(`all`) a two-level bootstrap, seeds then patients. p: exact permutation test, A and B swapped per "
           "patient. 'Detectable' is the smallest difference this test finds with 80 % power on this test set: "
           "'not shown' says nothing about smaller differences.", ""]
    for table in dict.fromkeys(r["table"] for r in rows):
        sub = [r for r in rows if r["table"] == table]
        n = sub[0].get("n_patients")
        out += [f"**{table}** ({n} test patients, {sub[0]['n_slices']} slices)" if n else f"**{table}**", "",
                markdown_table(sub, PAIRED_COLUMNS), ""]
    return out


def write_report(profile_dir, out_path=None) -> Path:
    """Write ``REPORT.md`` for one profile's results folder; returns its path."""
    profile_dir = Path(profile_dir)
    tdir = profile_dir / "tables"
    if not tdir.is_dir():
        raise FileNotFoundError(f"{tdir}: no tables yet; run the notebooks (osteo reproduce) first")
    parts = [f"# osteo-kit reproduction report: profile `{profile_dir.name}`", ""]
    profile = None
    devices = set()
    legacy = False  # a table made before the kit kept each test slice's patient
    for name in list(TABLES) + list(EXTRA_TABLES):
        f = tdir / f"{name}.json"
        if not f.exists():
            continue
        meta = json.loads(f.read_text())
        profile = profile or meta.get("profile")
        rows = meta["rows"]
        parts += [f"## {EXTRA_TABLES.get(name) or meta.get('title', name)}", ""]
        if name in TABLES:
            for r in rows:
                r["ci"] = f"{r['ci95_low']:.1f}-{r['ci95_high']:.1f}"
                devices.add(r.get("device") or "?")
                legacy |= not r.get("n_patients")
            parts.append(markdown_table(rows, ACC_COLUMNS))
            pre = {r.get("pretrained") for r in rows}
            parts += ["", _test_set_line(rows),
                      f"ImageNet weights used: {'yes' if pre == {True} else 'no' if pre == {False} else 'some'}."]
        elif name == "paired" and rows and "diff" in rows[0]:
            parts += _paired_section(rows)
        else:
            cols = [(k, k) for k in rows[0]] if rows else []
            parts.append(markdown_table(rows, cols))
        if meta.get("note"):
            parts += ["", meta["note"]]
        parts.append("")
    missing = [TABLES[n]["title"].split(".")[0] for n in TABLES if not (tdir / f"{n}.json").exists()]
    if missing:
        parts += ["## Not run yet", "",
                  f"{', '.join(missing)}: no results for this profile yet. `osteo grid --profile {profile_dir.name} "
                  f"--tables ...` (or the notebooks) trains them; finished runs are kept, so this continues the grid.", ""]
    if profile:
        seeds = ", ".join(str(s) for s in profile["seeds"])
        default = PROFILES.get(profile["name"])
        if default is not None and tuple(profile["seeds"]) != tuple(default.seeds):
            seeds += f" (the profile's own seeds are {', '.join(str(s) for s in default.seeds)})"
        parts[1:1] = [
            "",
            f"Profile `{profile['name']}`: {profile['n_per_class']} slices per class, {profile['image_size']} px, "
            f"{profile['epochs']} epochs (ViT {profile['vit_epochs']}), batch {profile['batch_size']}, seeds {seeds}. "
            f"{profile.get('note', '')[:1].upper()}{profile.get('note', '')[1:]}",
            "",
            "Unless the data were your own, these numbers come from the kit's **synthetic** CT slices, not from "
            "the paper's private hospital data: they test the method, they are not the paper's results. "
            "Slices of one patient are not independent evidence, so every 95 % interval is a bootstrap over "
            "test patients (stratified by class, percentile); with several seeds it covers seeds too "
            "(seeds, then patients); with one seed it covers test-set sampling only. Whether a paper's claim "
            "held comes from the paired tests at the end, never from comparing two intervals."
            + (" Tables that say 'patients not recorded' were made by an older version of the kit: their "
               "intervals are Wilson intervals over slices pooled over seeds, too narrow when a patient gives "
               "several slices; running the batch again replaces them." if legacy else ""),
        ]
        if devices:
            parts[2] = parts[2].rstrip(". ") + f". Trained on: {', '.join(sorted(devices))}."
    out_path = Path(out_path) if out_path else profile_dir / "REPORT.md"
    out_path.write_text("\n".join(parts) + "\n")
    return out_path


# ---- how long each notebook took ------------------------------------------------------------------
def notebook_times(notebooks_dir) -> list:
    """Run time of each executed notebook in a folder (``results/<profile>/notebooks/``, written by
    ``osteo reproduce``), from the metadata papermill stores: one dict per notebook with
    ``notebook``, ``seconds`` (the whole run, kernel start included), ``cells_seconds`` (the sum of the
    cells' own times) and ``slowest_cell`` (its index in the executed notebook) with ``slowest_seconds``.

    A notebook without papermill's timing (not executed by ``osteo reproduce``, or interrupted) is
    an error naming the file, not a silent zero.
    """
    folder = Path(notebooks_dir)
    paths = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"{folder}: no executed notebooks; run `osteo reproduce --profile P` first")
    rows = []
    for p in paths:
        nb = json.loads(p.read_text(encoding="utf-8"))
        pm = nb.get("metadata", {}).get("papermill", {})
        if pm.get("duration") is None or pm.get("exception"):
            raise ValueError(f"{p}: no complete papermill run recorded (was it executed to the end by `osteo reproduce`?)")
        cells = [(i, c.get("metadata", {}).get("papermill", {}).get("duration")) for i, c in enumerate(nb["cells"])]
        timed = [(i, d) for i, d in cells if d is not None]
        slow = max(timed, key=lambda t: t[1]) if timed else (None, None)
        rows.append({"notebook": p.stem, "seconds": float(pm["duration"]),
                     "cells_seconds": float(sum(d for _, d in timed)),
                     "slowest_cell": slow[0], "slowest_seconds": slow[1]})
    return rows


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``: a run time for people."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def times_table(rows: list) -> str:
    """The rows of :func:`notebook_times` as a markdown table, with the total."""
    lines = ["| notebook | run time | slowest cell |", "|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['notebook']} | {duration(r['seconds'])} | "
                     f"[{r['slowest_cell']}]: {duration(r['slowest_seconds'] or 0)} |")
    lines.append(f"| **all** | {duration(sum(r['seconds'] for r in rows))} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m osteo.report times PROFILE``: the run time of each notebook of the last batch."""
    ap = argparse.ArgumentParser(prog="python -m osteo.report", description=main.__doc__)
    ap.add_argument("what", choices=["times"])
    ap.add_argument("profile", choices=sorted(PROFILES), help="whose executed notebooks: results/PROFILE/notebooks/")
    ap.add_argument("--dir", help="another folder of executed notebooks")
    a = ap.parse_args(argv)
    folder = Path(a.dir) if a.dir else project_root() / "results" / a.profile / "notebooks"
    try:
        rows = notebook_times(folder)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(times_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
