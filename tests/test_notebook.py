"""osteo.notebook: what the notebooks print about themselves, and their explicit setup."""
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from osteo import notebook, plots

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def test_shown_path_is_never_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("OSTEO_ROOT", str(tmp_path))
    assert notebook.shown_path(tmp_path / "results" / "smoke" / "runs" / "abc" / "checkpoint.pt") == \
        "results/smoke/runs/abc/checkpoint.pt"
    outside = notebook.shown_path(tmp_path.parent / "elsewhere" / "manifest.csv")
    assert outside == "<outside the project>/manifest.csv"


def test_data_label_says_whose_data(monkeypatch):
    monkeypatch.delenv("OSTEO_DATA", raising=False)
    assert notebook.data_label(SimpleNamespace(data_source=None)) == "synthetic data"
    assert notebook.data_label(SimpleNamespace(data_source="my/manifest.csv")) == "your data"
    monkeypatch.setenv("OSTEO_DATA", "x.csv")
    assert notebook.data_label(SimpleNamespace(data_source=None)) == "your data"


@pytest.mark.parametrize("name", ["shown_path", "data_label", "setup_summary", "weights_note"])
def test_the_old_names_in_plots_still_work_with_a_deprecation_warning(name):
    with pytest.warns(DeprecationWarning, match=f"osteo.notebook.{name}"):
        assert getattr(plots, name) is getattr(notebook, name)


def test_plots_has_no_other_invented_names():
    with pytest.raises(AttributeError, match="no attribute 'setup'"):
        plots.setup  # noqa: B018 - the attribute access is the test
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not hasattr(plots, "project_root")


def test_figure_png_is_a_png():
    fig = plots.confusion(np.eye(3, dtype=int), ("normal", "osteopenia", "osteoporosis"))
    data = notebook.figure_png(fig)
    assert data[:8] == PNG and len(data) > 1000


def test_setup_outside_ipython_does_nothing():
    assert notebook.setup() is False


# In a fresh process: an IPython shell shows a returned Figure as PNG only after notebook.setup(),
# importing osteo (and osteo.plots) registers nothing.
_IPYTHON_SCRIPT = textwrap.dedent("""
    from IPython.core.interactiveshell import InteractiveShell
    from matplotlib.figure import Figure
    shell = InteractiveShell.instance()
    png = shell.display_formatter.formatters["image/png"]
    import osteo
    from osteo import notebook, plots
    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    print("before", png(fig) is None)
    print("setup", notebook.setup())
    print("after", png(fig)[:8] == b"\\x89PNG\\r\\n\\x1a\\n")
""")


def test_figures_display_after_setup_and_not_by_importing():
    proc = subprocess.run([sys.executable, "-c", _IPYTHON_SCRIPT], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["before", "True", "setup", "True", "after", "True"], proc.stdout + proc.stderr


def test_every_notebook_calls_setup_in_its_setup_cell():
    import nbformat

    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        setup = [c.source for c in nb.cells if c.cell_type == "code" and "import osteo\n" in c.source]
        assert len(setup) == 1 and "notebook.setup()" in setup[0], f"{path.name}: the setup cell must call notebook.setup()"
