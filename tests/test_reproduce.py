"""`osteo reproduce --profile smoke`: the whole notebook batch, headless, as the README runs it.

This is the longest test (minutes on 2 cores). It writes results/smoke/ in the checkout; the
notebook run by nbval afterwards reuses its cached experiments.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from osteo.experiments import TABLES
from osteo.report import notebook_times, times_table
from test_notebooks_clean import EXPECTED, assert_executed_notebook_clean

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "smoke"
FIGURES = ["00_slices_per_class", "00_hu_histograms", "01_windows", "01_grey_levels", "02_loss_curves", "02_alpha",
           "02_confusion", "table2", "table3", "table4", "05_alpha_learned", "table5", "table5_clinical", "fig3", "fig4"]


@pytest.fixture(scope="module")
def batch():
    env = dict(os.environ, OSTEO_PROFILE="smoke", PYTHONUNBUFFERED="1")
    osteo_cmd = Path(sys.executable).with_name("osteo")
    proc = subprocess.run([str(osteo_cmd), "reproduce", "--profile", "smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, f"osteo reproduce failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_every_table_has_its_rows_with_numbers(batch):
    for name, table in TABLES.items():
        meta = json.loads((OUT / "tables" / f"{name}.json").read_text())
        rows = meta["rows"]
        assert [r["model"] for r in rows] == [label for label, _, _ in table["rows"]]
        for r, (_, _, paper) in zip(rows, table["rows"]):
            assert r["paper_acc"] == paper
            assert 0 <= r["ci95_low"] <= r["acc"] <= r["ci95_high"] <= 100
            assert r["n_patients"] == r["n_slices"] and "patients" in r["interval"]  # one slice per test patient
            assert r["gap_to_paper"] == pytest.approx(r["acc"] - paper, abs=0.02)
            assert len(r["per_seed"]) == len(r["seeds"]) == 1


def test_extra_tables_and_figures(batch):
    fig3 = json.loads((OUT / "tables" / "fig3.json").read_text())["rows"]
    assert sorted(r["head"][:3] for r in fig3) == ["G_s", "G_t"]  # one seed in smoke
    for r in fig3:
        assert all(0 <= r[c] <= 100 for c in ("normal", "osteopenia", "osteoporosis", "overall"))
    paired = json.loads((OUT / "tables" / "paired.json").read_text())["rows"]
    assert paired and all(0 <= r["p_value"] <= 1 and r["ci95_low"] <= r["diff"] <= r["ci95_high"] for r in paired)
    assert {r["holds"] for r in paired} <= {"yes", "not shown", "no: B better"}
    for f in FIGURES:
        p = OUT / "figures" / f"{f}.png"
        assert p.is_file() and p.stat().st_size > 5000, p


def test_report_lists_every_table_beside_the_paper(batch):
    report = (OUT / "REPORT.md").read_text()
    for table in TABLES.values():
        assert table["title"] in report
    assert "77.11" in report and "synthetic" in report
    assert "Fig. 3" in report and "Paired test" in report


def test_executed_notebooks_leak_no_path_or_identifier(batch):
    executed = sorted((OUT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert [p.stem for p in executed] == EXPECTED
    for path in executed:
        assert_executed_notebook_clean(path)


def test_reproduce_passes_profile_and_seeds_to_every_notebook(monkeypatch, capsys):
    """`osteo reproduce --seeds 0` (a first pass of the paper profile): papermill gets the seeds, and
    every notebook's parameters cell has them and gives them to its Experiments."""
    import papermill as pm

    import osteo.report
    from osteo import cli

    calls = []
    monkeypatch.setattr(pm, "execute_notebook", lambda nb, out, parameters, **kw: calls.append((nb, parameters)))
    monkeypatch.setattr(osteo.report, "write_report", lambda out: ROOT / "results" / "smoke" / "REPORT.md")
    assert cli.main(["reproduce", "--profile", "smoke", "--tables", "table2", "--seeds", "0", "7"]) == 0
    assert [Path(nb).name[:2] for nb, _ in calls] == ["03", "09"]
    assert calls[0][1] == {"profile": "smoke", "seeds": [0, 7]}
    assert calls[1][1] == {"profile": "smoke", "seeds": [0, 7], "train_missing": False}  # only what was asked
    assert "seeds 0, 7 (the profile's: 0)" in capsys.readouterr().out
    calls.clear()
    assert cli.reproduce("smoke") == 0  # the whole batch: the report makes whatever is missing
    assert len(calls) == len(EXPECTED)
    [report_params] = [p for nb, p in calls if Path(nb).name.startswith("09_")]
    assert report_params == {"profile": "smoke", "seeds": None, "train_missing": True}
    for name in EXPECTED:
        cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
        params = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
        assert len(params) == 1 and "seeds = None" in "".join(params[0]["source"]), name
        assert any("osteo.Experiments(profile, seeds=seeds)" in "".join(c["source"]) for c in cells), name


def test_batch_shows_a_bar_and_the_time_of_each_notebook_without_kernel_warnings(batch):
    out = batch.stdout + batch.stderr
    for name in EXPECTED:
        assert re.search(rf"^{name}\.ipynb: done in \d+ (s|min \d\d s|h \d\d min)$", batch.stdout, re.M), \
            f"no run time for {name} in the output of osteo reproduce"
        assert re.search(rf"{name}: +100%\|", batch.stdout), f"no progress bar over the cells of {name}"
    assert "IPKernelApp" not in out and "WARNING" not in out, "a kernel warning reached the output of osteo reproduce"
    times = {r["notebook"]: r for r in notebook_times(OUT / "notebooks")}
    assert sorted(times) == EXPECTED and all(0 < r["cells_seconds"] <= r["seconds"] for r in times.values())


def test_reproduce_asks_papermill_for_a_cell_bar_and_a_quiet_kernel(monkeypatch):
    import papermill as pm

    import osteo.report
    from osteo import cli

    kwargs = []
    monkeypatch.setattr(pm, "execute_notebook", lambda nb, out, parameters, **kw: kwargs.append(kw))
    monkeypatch.setattr(osteo.report, "write_report", lambda out: ROOT / "results" / "smoke" / "REPORT.md")
    assert cli.reproduce("smoke", notebooks=["01"]) == 0
    assert [kw["progress_bar"]["desc"] for kw in kwargs] == ["01_preprocessing", "09_report"]
    assert all(kw["extra_arguments"] == ["--IPKernelApp.log_level=CRITICAL"] for kw in kwargs)


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (59.4, "59 s"), (59.6, "1 min 00 s"), (125, "2 min 05 s"),
                                           (3599.4, "59 min 59 s"), (3600, "1 h 00 min"), (7322, "2 h 02 min")])
def test_durations_read_like_a_person_writes_them(seconds, text):
    from osteo.report import duration

    assert duration(seconds) == text


def _executed(tmp_path, name, duration, cells, exception=None):
    nb = {"cells": [{"cell_type": "code", "metadata": {"papermill": {"duration": d}}, "source": "", "outputs": [],
                     "execution_count": 1} for d in cells],
          "metadata": {"papermill": {"duration": duration, "exception": exception}}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / f"{name}.ipynb").write_text(json.dumps(nb))


def test_notebook_times_reads_papermill_metadata(tmp_path):
    _executed(tmp_path, "00_data", 12.5, [0.1, 9.0, None, 2.0])
    _executed(tmp_path, "01_preprocessing", 3.0, [1.0, 1.5])
    rows = notebook_times(tmp_path)
    assert [r["notebook"] for r in rows] == ["00_data", "01_preprocessing"]
    assert rows[0]["seconds"] == 12.5 and rows[0]["cells_seconds"] == pytest.approx(11.1)
    assert (rows[0]["slowest_cell"], rows[0]["slowest_seconds"]) == (1, 9.0)
    table = times_table(rows)
    assert "| 00_data | 12 s | [1]: 9 s |" in table and "| **all** | 16 s | |" in table
    _executed(tmp_path, "02_train_twin", None, [1.0])
    with pytest.raises(ValueError, match="02_train_twin.ipynb: no complete papermill run"):
        notebook_times(tmp_path)
    with pytest.raises(FileNotFoundError, match="no executed notebooks"):
        notebook_times(tmp_path / "empty")
