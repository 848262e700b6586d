"""Every "Try this" exercise has a solution in notebooks/solutions/, and every solution runs.

The solutions are jupytext scripts (``# %%`` cells), one per notebook, one ``## Exercise N`` section per
numbered exercise. Each is executed as a notebook under the ``smoke`` profile, as a student would run
it, after the batch (``osteo reproduce --profile smoke``, which test_reproduce.py runs first) has
cached the notebooks' runs: then each trains at most the one or two runs its exercises add
(seconds each under smoke). Every exercise must show a result; none may warn or fail.
"""
import re

import nbformat
import pytest

from test_notebooks_clean import EXPECTED, NB_DIR, _warnings_and_stderr

SOLUTIONS = NB_DIR / "solutions"


def _exercises(stem: str) -> int:
    nb = nbformat.read(NB_DIR / f"{stem}.ipynb", as_version=4)
    [cell] = [c for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("## Try this")]
    assert f"(solutions/{stem}.py)" in cell.source, f"{stem}: the Try this cell does not link its solution"
    return len(re.findall(r"^\d+\. ", cell.source, re.M))


def _sections(nb) -> dict:
    """{exercise number: its code cells}"""
    out, current = {}, None
    for c in nb.cells:
        if c.cell_type == "markdown":
            m = re.match(r"## Exercise (\d+)\b", c.source)
            current = int(m.group(1)) if m else current
            if m:
                out[current] = []
        elif current is not None:
            out[current].append(c)
    return out


@pytest.mark.parametrize("stem", EXPECTED)
def test_every_exercise_has_a_solution_section(stem):
    jupytext = pytest.importorskip("jupytext", reason="jupytext is not installed (pip install -e '.[test]')")
    path = SOLUTIONS / f"{stem}.py"
    assert path.is_file(), f"no solutions for {stem}: write {path.relative_to(NB_DIR.parent)}"
    sections = _sections(jupytext.read(path))
    n = _exercises(stem)
    assert n >= 1 and sorted(sections) == list(range(1, n + 1)), \
        f"{path.name}: exercise sections {sorted(sections)}, but notebook {stem} has {n} exercises"
    assert all(sections.values()), f"{path.name}: an exercise section has no code"


@pytest.mark.slow
@pytest.mark.parametrize("stem", EXPECTED)
def test_solution_runs_under_smoke_and_shows_each_answer(stem, monkeypatch):
    jupytext = pytest.importorskip("jupytext", reason="jupytext is not installed (pip install -e '.[test]')")
    from nbclient import NotebookClient

    monkeypatch.setenv("OSTEO_PROFILE", "smoke")
    nb = jupytext.read(SOLUTIONS / f"{stem}.py")
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NB_DIR)}},
                   extra_arguments=["--IPKernelApp.log_level=ERROR"]).execute()
    for k, cells in _sections(nb).items():
        shown = [o for c in cells for o in c.outputs if o.output_type in ("stream", "display_data", "execute_result")]
        assert shown, f"{stem}.py, exercise {k}: shows nothing"
    noise = list(_warnings_and_stderr(nb))
    assert not noise, f"{stem}.py: cell {noise[0][0]} warns or writes to stderr: {noise[0][1][:300]!r}"
