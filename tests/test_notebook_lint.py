"""The notebooks' code (and their solutions') passes ruff: each notebook becomes a script with
jupytext, and ruff checks it for undefined names, unused imports and variables, syntax errors and
the like (line length and imports below the parameters cell are allowed in teaching notebooks)."""
import importlib.util
import subprocess
import sys

import pytest

from test_notebooks_clean import NB_DIR, NOTEBOOKS

RUFF = [sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated", "--output-format", "concise",
        "--select", "E,F,W", "--ignore", "E402,E501,E731,E741",
        "--config", "builtins = ['display']"]  # display(): IPython's, defined in every notebook


def _need(module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed, so the notebooks' code is not linted (pip install -e '.[test]')")


def test_ruff_catches_a_notebook_bug(tmp_path):
    """The linter as configured here does flag what would break a student's run."""
    _need("ruff")
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nprint(undefined_name)\n")
    proc = subprocess.run(RUFF + [str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and "F821" in proc.stdout and "F401" in proc.stdout


def test_notebooks_and_solutions_pass_ruff(tmp_path):
    _need("ruff"), _need("jupytext")
    import jupytext

    scripts = []
    for nb_path in NOTEBOOKS:
        nb = jupytext.read(nb_path)
        # The cleanup cell `del`s what the notebook made; ruff would then call every name a lambda
        # uses undefined. The skeleton test checks that cell.
        assert "gc.collect()" in nb.cells[-1].source
        nb.cells = nb.cells[:-1]
        script = tmp_path / f"{nb_path.stem}.py"
        jupytext.write(nb, script, fmt="py:percent")
        scripts.append(script)
    # The notebooks share one setup cell that imports the kit's toolbox (np, pd, OURS, TABLES ...) for
    # the student's own cells, so unused imports are allowed there; the solutions import what they use.
    solutions = sorted((NB_DIR / "solutions").glob("*.py"))
    assert solutions, "no solutions in notebooks/solutions/"
    for files, extra in ((scripts, ["--extend-ignore", "F401"]), (solutions, [])):
        proc = subprocess.run(RUFF + extra + [str(f) for f in files], capture_output=True, text=True)
        assert proc.returncode == 0, f"ruff found problems in the notebooks' code (scripts made by jupytext):\n{proc.stdout}{proc.stderr}"
