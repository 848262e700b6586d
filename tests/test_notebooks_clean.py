"""The committed notebooks are clean and share one skeleton; executed ones leak nothing and warn of nothing.

Committed (``notebooks/NN_*.ipynb``): no outputs, ``execution_count`` null, the kit's kernel
``osteo-kit`` (which ``make`` registers), exactly one cell tagged ``parameters`` (papermill) that
sets ``profile = None``, a first markdown cell saying what it shows, what it needs and how long it
takes per profile, a setup cell, a "Try this" section with a solution for every exercise in
``notebooks/solutions/``, and a cleanup cell. The ``.ipynb`` files are the source: edit them in
JupyterLab; the nbstripout git filter (``make`` installs it) strips outputs before git sees them,
and each file is already in the form that filter writes, so a save in JupyterLab shows in
``git diff`` as the edit alone.

Executed (``results/smoke/notebooks/*.ipynb``, written by ``osteo reproduce --profile smoke``,
which CI runs before the tests): no output holds an absolute path of the machine or a patient
identifier (no identifier leaves the DICOM files), no cell ended in an error, and nothing was
written to stderr but progress bars (no warning).
"""
import copy
import functools
import json
import re
import subprocess
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
EXECUTED = sorted((ROOT / "results" / "smoke" / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXPECTED = ["00_data", "01_preprocessing", "02_train_twin", "03_ablation_dissimilarity", "04_ensemble_perspective",
            "05_alpha_fusion", "06_baselines", "07_classwise_accuracy", "08_gradcam", "09_report", "10_pitfalls"]

_ROOTS = ["work", "home", "root", "tmp", "Users", "private", "var/folders"]  # written apart: no literal path in the repo
ABSOLUTE_PATH = re.compile(r"(?<![\w.])(" + "|".join(f"/{r}/" for r in _ROOTS) + r"|\b[A-Za-z]:\\\w)")
# DICOM keywords of identifying attributes, and the name/id stored in pydicom's CT_small.dcm (notebook 00 reads it)
IDENTIFIERS = ["PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "OtherPatientIDs",
               "AccessionNumber", "CompressedSamples", "1CT1", "JFK IMAGING"]


def _git(*args, text_in=None):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, input=text_in, capture_output=True, text=True, encoding="utf-8")
    except FileNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def committed_texts(path: Path) -> dict:
    """A notebook as git has it: ``{"git index": the blob committed or staged, "as git reads the file":
    the file through the nbstripout clean filter}``. The filter (``make`` installs it) takes outputs
    out of a notebook saved in JupyterLab, so outputs on disk are fine where it is installed; without
    it, or without git, the file itself is checked."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    out = {}
    rel = str(path.relative_to(ROOT))
    blob = _git("show", f":{rel}")
    if blob is not None and blob.returncode == 0:
        out["git index"] = blob.stdout
    attr = _git("check-attr", "filter", "--", rel)
    clean = _git("config", "--get", "filter.nbstripout.clean")
    if attr is None or attr.returncode or not attr.stdout.strip().endswith(": nbstripout") or clean.returncode:
        out["the file (no git filter installed)"] = text
        return out
    proc = subprocess.run(clean.stdout.strip(), shell=True, cwd=ROOT, input=text, capture_output=True, text=True,
                          encoding="utf-8")
    assert proc.returncode == 0, f"{path.name}: the git filter nbstripout failed: {proc.stderr[-500:]}"
    out["the file as the git filter reads it"] = proc.stdout
    return out


def test_every_notebook_of_the_course_is_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_clean(path):
    for version, text in committed_texts(path).items():
        _check_clean(path, nbformat.reads(text, as_version=4), version)


def _check_clean(path, nb, version):
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"] == KERNELSPEC, f"{path.name}: the kernel must be {KERNELSPEC}"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} ({version}): cell {i} has outputs; clear them (Edit > Clear Outputs of All Cells, then save)"
            assert cell.execution_count is None, f"{path.name} ({version}): cell {i} has an execution count"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters', need exactly one"
    assert tagged[0].cell_type == "code" and re.search(r"^profile = None\b", tagged[0].source, re.M), \
        f"{path.name}: the parameters cell must set profile = None"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), f"{path.name}: must open with a markdown title"
    for word in ("What it shows", "What it needs", "How long", "`smoke`", "`laptop`", "`paper`"):
        assert word in first.source, f"{path.name}: the opening cell does not mention {word!r}"
    how_long = re.search(r"\*\*How long\.\*\*(.*?)(?:\n\n|$)", first.source, re.S).group(1)
    assert re.search(r"`smoke`: [\d.]+ (s|min)", how_long) and re.search(r"`laptop`: [\d.]+ (s|min)", how_long), \
        f"{path.name}: 'How long' must give the smoke and laptop times"
    assert "measured" in how_long, f"{path.name}: 'How long' must say how the times were measured"
    assert "not measured" not in how_long and "approx" not in how_long, \
        f"{path.name}: 'How long' says both measured and not measured; say which time is an estimate"
    setup = [c for c in nb.cells if c.cell_type == "code" and re.search(r"^import osteo$", c.source, re.M)]
    assert len(setup) == 1, f"{path.name}: needs exactly one setup cell that imports osteo"
    assert "IProgress" not in setup[0].source, f"{path.name}: progress bars are widgets (ipywidgets): no IProgress filter"
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert any("osteo.Experiments(profile, seeds=seeds)" in s for s in code), f"{path.name}: does not build its runner from the profile"
    assert not any("plt.show" in s or "%matplotlib" in s for s in code), f"{path.name}: figures come from osteo.plots"
    assert any(c.cell_type == "markdown" and c.source.startswith("## Try this") for c in nb.cells), f"{path.name}: no 'Try this'"
    assert nb.cells[-1].cell_type == "code" and "gc.collect()" in nb.cells[-1].source, f"{path.name}: no cleanup at the end"


KERNELSPEC = {"display_name": "osteo-kit", "language": "python", "name": "osteo-kit"}


def test_make_registers_the_kernel_the_notebooks_name():
    makefile = (ROOT / "Makefile").read_text()
    assert f'ipykernel install --user --name {KERNELSPEC["name"]} --display-name "{KERNELSPEC["display_name"]}"' in makefile
    assert re.search(r"^test: .*\bkernel\b", makefile, re.M) and re.search(r"^lab: .*\bkernel\b", makefile, re.M)


def test_committed_notebooks_are_in_the_form_the_git_filter_writes():
    """What the nbstripout filter writes (the Makefile's options) equals the committed file byte for
    byte: then git sees a notebook saved in JupyterLab as unchanged, apart from its source edits."""
    nbstripout = pytest.importorskip("nbstripout", reason="nbstripout is not installed (pip install -e '.[test]')")
    makefile = (ROOT / "Makefile").read_text()
    assert "-m nbstripout --keep-id" in makefile and "--install --attributes .gitattributes" in makefile
    extra = re.search(r"^NB_EXTRA_KEYS := (.*?)(?<!\\)$", makefile, re.M | re.S).group(1).replace("\\\n", " ").split()
    assert "metadata.language_info.version" in extra
    extra += ["metadata.signature", "metadata.widgets", "cell.metadata.collapsed", "cell.metadata.ExecuteTime",
              "cell.metadata.execution", "cell.metadata.heading_collapsed", "cell.metadata.hidden",
              "cell.metadata.scrolled"]  # what the nbstripout command strips by default
    attrs = (ROOT / ".gitattributes").read_text().splitlines()
    assert "*.ipynb filter=nbstripout" in attrs and "*.ipynb diff=ipynb" in attrs
    for path, (version, committed) in [(p, v) for p in NOTEBOOKS for v in committed_texts(p).items()]:
        nb = nbformat.reads(committed, as_version=4)
        saved = copy.deepcopy(nb)  # as JupyterLab saves it after a run: outputs, counts, kernel details
        saved.metadata["language_info"] = {"name": "python", "version": "3.11.7", "pygments_lexer": "ipython3",
                                           "codemirror_mode": {"name": "ipython", "version": 3},
                                           "file_extension": ".py", "mimetype": "text/x-python",
                                           "nbconvert_exporter": "python"}
        saved.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
        for c in saved.cells:
            if c.cell_type == "code":
                c.execution_count = 3
                c.outputs = [nbformat.v4.new_output("stream", name="stdout", text="x\n")]
                c.metadata["execution"] = {"iopub.status.idle": "2026-01-01T00:00:00Z"}
        for version in (nb, saved):
            stripped = nbstripout.strip_output(copy.deepcopy(version), keep_output=False, keep_count=False,
                                               keep_id=True, extra_keys=extra)
            assert nbformat.writes(stripped) + "\n" == committed, \
                f"{path.name} ({version}): not in the form the git filter writes (run: python -m nbstripout --keep-id {path})"


def _progress_bar(text: str) -> bool:
    """Whether a stderr text is only tqdm progress bars (text bars: where ipywidgets is missing)."""
    parts = [p.strip() for p in re.split(r"[\r\n]", text) if p.strip()]
    return bool(parts) and all(re.search(r"\d+%\|.*\| *\d+/\d+", p) for p in parts)


def _warnings_and_stderr(nb):
    """(cell, text) of every stderr output that is not a progress bar, and of every output naming a warning."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr" and not _progress_bar(out["text"]):
                yield i, out["text"]
            elif re.search(r"\b\w*Warning\b: ", out.get("text", "") or out.get("data", {}).get("text/plain", "")):
                yield i, out.get("text") or out["data"]["text/plain"]


def test_stderr_scanner_tells_progress_bars_from_warnings():
    nb = nbformat.v4.new_notebook()
    bar = "train twin:  50%|█████     | 3/6 [00:01<00:01,  2.1it/s]\rtrain twin: 100%|██████████| 6/6 [00:02<00:00,  2.9it/s]\n"
    ok = nbformat.v4.new_code_cell("x")
    ok.outputs = [nbformat.v4.new_output("stream", name="stderr", text=bar),
                  nbformat.v4.new_output("stream", name="stdout", text="accuracy 0.5\n")]
    bad = nbformat.v4.new_code_cell("y")
    bad.outputs = [nbformat.v4.new_output("stream", name="stderr", text="UserWarning: Converting a tensor with requires_grad=True\n")]
    quiet_warning = nbformat.v4.new_code_cell("z")
    quiet_warning.outputs = [nbformat.v4.new_output("stream", name="stdout", text="RuntimeWarning: overflow in exp\n")]
    nb.cells = [ok, bad, quiet_warning]
    assert [i for i, _ in _warnings_and_stderr(nb)] == [1, 2]
    assert not _progress_bar("") and not _progress_bar("50% done\n") and _progress_bar(bar)


def _output_texts(nb):
    """Every text an executed notebook shows (images left out: base64 can hold any letters)."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if "text" in out:
                yield i, out["text"]
            for mime, data in out.get("data", {}).items():
                if not mime.startswith("image/"):
                    yield i, data if isinstance(data, str) else json.dumps(data)
            for key in ("ename", "evalue"):
                if key in out:
                    yield i, str(out[key])
            if "traceback" in out:
                yield i, "\n".join(out["traceback"])
    yield "metadata", json.dumps(nb.metadata)


def test_output_scanner_catches_leaks():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(path)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="reading " + "/" + "work/main/data/x.dcm\n"),
                    nbformat.v4.new_output("execute_result", data={"text/plain": "PatientName: Doe^John"}, execution_count=1)]
    nb.cells.append(cell)
    texts = [t for _, t in _output_texts(nb)]
    assert any(ABSOLUTE_PATH.search(t) for t in texts)
    assert any("PatientName" in t for t in texts)
    assert ABSOLUTE_PATH.search("C:\\Users\\me\\data")
    assert not ABSOLUTE_PATH.search("results/smoke/runs/abc/checkpoint.pt and 3/4 of 12/tmp")


def test_executed_notebooks_exist_or_say_why():
    if not EXECUTED:
        pytest.skip("no executed notebooks in results/smoke/notebooks/: run `osteo reproduce --profile smoke` first "
                    "(CI does), then these checks run")
    assert [p.stem for p in EXECUTED] == EXPECTED


def assert_executed_notebook_clean(path):
    """No absolute path, no identifier tag name, no error cell in an executed notebook."""
    nb = nbformat.read(path, as_version=4)
    for where, text in _output_texts(nb):
        m = ABSOLUTE_PATH.search(text)
        assert m is None, f"{path.name} cell {where}: absolute path in output: ...{text[max(0, m.start() - 60):m.end() + 60]}..."
        for ident in IDENTIFIERS:
            assert ident not in text, f"{path.name} cell {where}: output shows {ident!r}"
    errors = [i for i, c in enumerate(nb.cells) for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: cells {errors} ended in an error"
    noise = list(_warnings_and_stderr(nb))
    assert not noise, f"{path.name}: cell {noise[0][0]} shows a warning or writes to stderr: {noise[0][1][:300]!r}"


@pytest.mark.parametrize("path", EXECUTED, ids=lambda p: p.stem)
def test_executed_notebook_leaks_no_path_or_identifier(path):
    assert_executed_notebook_clean(path)
