"""``osteo predict`` never loses output: non-UTF-8 file names, two writers of one CSV, an
interrupted run, and empty folders among the inputs."""
import csv
import os
import threading
from pathlib import Path

import pytest

import osteo.predict as P
from osteo.cli import main as osteo_main
from test_dicom import RAW, make_ct, save
from test_user_errors import make_checkpoint

LABELS = ("normal", "osteopenia", "osteoporosis")


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "ok.pt")


def slices(folder: Path, n: int, names=None) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"s{k}.dcm" for k in range(n)]
    return [save(make_ct(RAW + k), folder / nm) for k, nm in enumerate(names)]


def read_rows(path: Path) -> list:
    raw = path.read_bytes()
    raw.decode("utf-8")  # valid UTF-8, whatever the file names
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == P.COLUMNS, rows[0]  # the header is there
    return [dict(zip(P.COLUMNS, r)) for r in rows[1:]]


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".partial" in p.name)


@pytest.mark.parametrize("raw_name", [b"scan_\xff.dcm", b"\xe9t\xe9.dcm", b"caf\xc3\xa9_\x80\x81.dcm", b"\xff\xfe"])
def test_non_utf8_file_names_are_written_escaped(tmp_path, capsys, ck, raw_name):
    d = tmp_path / "in"
    slices(d, 1, ["ok.dcm"])
    bad = os.path.join(os.fsencode(d), raw_name)
    with open(bad, "wb") as fh:
        fh.write((d / "ok.dcm").read_bytes())
    out = tmp_path / "pred.csv"
    rc = osteo_main(["predict", str(ck), str(d), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = read_rows(out)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    shown = os.fsdecode(bad).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    assert shown in {r["file"] for r in rows}
    assert leftovers(tmp_path) == []


def test_non_utf8_name_of_a_bad_file_in_the_error_column(tmp_path, capsys, ck):
    d = tmp_path / "in"
    slices(d, 1)
    with open(os.path.join(os.fsencode(d), b"broken_\xff.dcm"), "wb") as fh:
        fh.write(b"not dicom at all" * 20)
    out = tmp_path / "p.csv"
    assert osteo_main(["predict", str(ck), str(d), "--out", str(out)]) == 1
    rows = read_rows(out)
    err = [r for r in rows if r["status"] == "error"]
    assert len(err) == 1 and "broken_\\xff.dcm" in err[0]["error"] and "broken_\\xff.dcm" in err[0]["file"]
    assert "broken_\\xff.dcm" in capsys.readouterr().err


def test_each_writer_has_its_own_temporary_file(tmp_path):
    target = tmp_path / "p.csv"
    a, b = P._CsvOut(target), P._CsvOut(target)
    assert a.tmp != b.tmp and a.tmp.parent == b.tmp.parent == tmp_path
    a.write({**dict.fromkeys(P.COLUMNS, ""), "file": "from-a", "status": "ok"})
    b.write({**dict.fromkeys(P.COLUMNS, ""), "file": "from-b", "status": "ok"})
    b.commit()
    assert [r["file"] for r in read_rows(target)] == ["from-b"]
    a.commit()  # the last to finish wins, whole
    assert [r["file"] for r in read_rows(target)] == ["from-a"]
    assert leftovers(tmp_path) == []
    assert target.stat().st_mode & 0o777 == 0o666 & ~P._UMASK  # as open() would create it, not mkstemp's 0600


def test_concurrent_runs_on_one_csv_neither_crash_nor_lose_the_header(tmp_path, ck):
    a = slices(tmp_path / "a", 3)
    b = slices(tmp_path / "b", 2, ["x.dcm", "y.dcm"])
    out = tmp_path / "shared.csv"
    codes, errors = [], []

    def run(files):
        try:
            codes.append(P.predict_files(ck, files, out_csv=out, device="cpu", progress=False))
        except BaseException as e:  # noqa: BLE001 - the test reports any crash
            errors.append(e)

    threads = [threading.Thread(target=run, args=(files,)) for files in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and codes == [0, 0, 0, 0]
    rows = read_rows(out)
    assert {r["file"] for r in rows} in ({str(p) for p in a}, {str(p) for p in b})  # one run's rows, whole
    assert all(r["status"] == "ok" for r in rows)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("stop_at", [0, 2])
def test_an_interrupted_run_keeps_computed_rows_and_the_old_csv(tmp_path, capsys, ck, monkeypatch, stop_at):
    files = slices(tmp_path / "in", 4)
    out = tmp_path / "p.csv"
    out.write_text("file,status\nold,contents\n")  # an earlier run's CSV
    real = P.read_hu
    calls = {"n": 0}

    def flaky(path, *a, **k):
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(path, *a, **k)

    monkeypatch.setattr(P, "read_hu", flaky)
    rc = osteo_main(["predict", str(ck), *map(str, files), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 130 and "osteo: interrupted" in err
    assert out.read_text() == "file,status\nold,contents\n"  # never half written
    partial = tmp_path / "p.partial.csv"
    if stop_at:
        assert f"stopped after {stop_at} of 4 files; the {stop_at} rows computed so far are in {partial}" in err
        assert [r["file"] for r in read_rows(partial)] == [str(f) for f in files[:stop_at]]
    else:
        assert not partial.exists()
    assert [p for p in leftovers(tmp_path) if p.endswith(".tmp")] == []


def test_empty_folder_among_inputs_is_an_error_naming_it(tmp_path, capsys, ck):
    files = slices(tmp_path / "good", 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    (pngs / "a.png").write_bytes(b"png")
    (pngs / ".hidden.dcm").write_bytes(b"x")
    out = tmp_path / "p.csv"
    rc = osteo_main(["predict", str(ck), str(tmp_path / "good"), str(empty), str(pngs), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    rows = read_rows(out)
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "error"]
    assert rows[2]["file"] == str(empty) and rows[2]["error"] == f"{empty}: folder holds no files: nothing to predict"
    assert rows[3]["error"].startswith(f"{pngs}: folder holds no DICOM files (") and "a.png" in rows[3]["error"]
    assert str(empty) in err and str(pngs) in err
    assert {r["file"] for r in rows[:2]} == {str(f) for f in files}


def test_empty_folder_alone_fails_naming_it(tmp_path, capsys, ck):
    empty = tmp_path / "nothing here"
    empty.mkdir()
    out = tmp_path / "p.csv"
    assert osteo_main(["predict", str(ck), str(empty), "--out", str(out)]) == 1
    assert f"{empty}: folder holds no files" in capsys.readouterr().err
    assert [r["status"] for r in read_rows(out)] == ["error"]


def test_failed_files_are_reported_as_error_lines_naming_them(tmp_path, capsys, ck):
    good = slices(tmp_path / "in", 1)
    missing, text = tmp_path / "gone.dcm", tmp_path / "notes.dcm"
    text.write_text("not dicom")
    rc = osteo_main(["predict", str(ck), *map(str, good), str(missing), str(text), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("osteo:")]  # (the rest is the progress bar)
    assert rc == 1 and "Traceback" not in err
    assert len(lines) == 2 and lines[0] == f"osteo: error: {missing}: no such file", lines
    assert lines[1].startswith(f"osteo: error: {text}: not a DICOM file")


def test_unwritable_target_folder_fails_before_any_prediction(tmp_path, capsys, ck, monkeypatch):
    files = slices(tmp_path / "in", 2)
    out = tmp_path / "locked" / "p.csv"
    out.parent.mkdir()
    predicted = []
    monkeypatch.setattr(P, "_predict_one", lambda *a, **k: predicted.append(a) or {})

    def refuse(*a, **k):  # what mkstemp raises in a read-only folder (as root, chmod would not stop us)
        raise PermissionError(13, "Permission denied", str(out.parent / ".p.csv.x.tmp"))

    monkeypatch.setattr(P.AtomicFile.__init__.__globals__["tempfile"], "mkstemp", refuse)
    rc = osteo_main(["predict", str(ck), *map(str, files), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and predicted == []
    assert err == [f"osteo: error: {out}: cannot be written (permission denied in {out.parent})"]


@pytest.mark.parametrize("how", ["read-only folder", "target became a folder", "disk full"])
def test_a_csv_that_cannot_be_put_in_place_keeps_every_computed_row(tmp_path, capsys, ck, monkeypatch, how):
    files = slices(tmp_path / "in", 3)
    out = tmp_path / "p.csv"
    if how == "target became a folder":
        real_one = P._predict_one

        def then_mkdir(*a, **k):
            row = real_one(*a, **k)
            out.mkdir(exist_ok=True)  # another program made a folder of that name meanwhile
            return row

        monkeypatch.setattr(P, "_predict_one", then_mkdir)
    else:
        err_no, text = (13, "Permission denied") if how == "read-only folder" else (28, "No space left on device")
        real_replace = os.replace

        def failing_replace(src, dst, *a, **k):
            if Path(dst) == out:
                raise OSError(err_no, text, str(src))
            return real_replace(src, dst, *a, **k)

        monkeypatch.setattr(P.os, "replace", failing_replace)
    rc = osteo_main(["predict", str(ck), *map(str, files), "--out", str(out)])
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("osteo:")]
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"osteo: error: {out}: cannot be written ("), err
    kept = Path(err[0].split("the 3 rows are kept in ")[1])
    assert kept.parent == tmp_path and kept.name.startswith(".p.csv.")
    assert [r["file"] for r in read_rows(kept)] == [str(f) for f in files]


def test_interrupted_run_whose_partial_name_cannot_be_written_keeps_the_rows(tmp_path, capsys, ck, monkeypatch):
    files = slices(tmp_path / "in", 3)
    out = tmp_path / "p.csv"
    real = P.read_hu
    calls = {"n": 0}

    def flaky(path, *a, **k):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(path, *a, **k)

    (tmp_path / "p.partial.csv").mkdir()  # the name for the partial rows is taken by a folder
    monkeypatch.setattr(P, "read_hu", flaky)
    assert osteo_main(["predict", str(ck), *map(str, files), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    kept = Path(err.split("the 2 rows computed so far are in ")[1].splitlines()[0])
    assert kept.name.startswith(".p.csv.") and [r["file"] for r in read_rows(kept)] == [str(f) for f in files[:2]]


# --- an --out that names something else -------------------------------------------------------------


@pytest.mark.parametrize("victim", ["first input", "last input", "checkpoint", "manifest", "binary file", "text file"])
def test_out_naming_a_file_that_is_not_a_predictions_csv_is_refused(tmp_path, capsys, ck, victim):
    files = slices(tmp_path / "in", 3)
    own_ck = tmp_path / "ck.pt"
    own_ck.write_bytes(ck.read_bytes())
    target = {"first input": files[0], "last input": files[-1], "checkpoint": own_ck,
              "manifest": tmp_path / "manifest.csv", "binary file": tmp_path / "x.bin", "text file": tmp_path / "notes.txt"}[victim]
    if victim == "manifest":
        target.write_text("path,label,patient_id\nin/s0.dcm,normal,P1\n")
    elif victim == "binary file":
        target.write_bytes(bytes(range(256)))
    elif victim == "text file":
        target.write_text("my notes\n")
    before = target.read_bytes()
    rc = osteo_main(["predict", str(own_ck), *map(str, files), "--out", str(target)])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == (f"osteo: error: {target}: --out names an existing file that is not a predictions "
                                       "CSV; refusing to replace it (give another file name)"), err
    assert target.read_bytes() == before
    assert leftovers(target.parent) == []


def test_out_naming_an_earlier_predictions_csv_is_replaced(tmp_path, capsys, ck):
    files = slices(tmp_path / "in", 2)
    out = tmp_path / "p.csv"
    header, row = ",".join(P.COLUMNS), "old.dcm,ok,,normal,1,0,0,,"
    quoted = ",".join(f'"{c}"' for c in P.COLUMNS)
    for content in ("", f"{header}\n{row}\n",
                    f"\ufeff{header}\r\n{row}\r\n",  # re-saved by a spreadsheet as "CSV UTF-8" (a BOM)
                    f"{quoted}\n{row}\n",  # written with every field quoted (R's write.csv)
                    f"{header.replace(',', ';')}\n{row.replace(',', ';')}\n"):  # a spreadsheet's ';' CSV
        out.write_text(content, encoding="utf-8")
        assert osteo_main(["predict", str(ck), *map(str, files), "--out", str(out)]) == 0
        assert [r["file"] for r in read_rows(out)] == [str(f) for f in files]


@pytest.mark.parametrize("mode", [0o444, 0o400, 0o555])
def test_write_protected_out_is_not_replaced(tmp_path, capsys, ck, mode):
    files = slices(tmp_path / "in", 2)
    out = tmp_path / "p.csv"
    out.write_text("file,status\nold.dcm,ok\n")
    out.chmod(mode)
    try:
        rc = osteo_main(["predict", str(ck), *map(str, files), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and err.strip() == f"osteo: error: {out}: --out is write-protected; refusing to replace it"
        assert out.read_text() == "file,status\nold.dcm,ok\n"
    finally:
        out.chmod(0o644)


@pytest.mark.parametrize("below", ["a file", "a file two levels up"])
def test_gradcam_folder_below_a_file_is_refused_before_predicting(tmp_path, capsys, ck, below):
    files = slices(tmp_path / "in", 2)
    blocker = files[0]
    gradcam = blocker / "cams" if below == "a file" else blocker / "x" / "cams"
    rc = osteo_main(["predict", str(ck), *map(str, files), "--out", str(tmp_path / "p.csv"), "--gradcam", str(gradcam)])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == f"osteo: error: {blocker}: not a folder, so --gradcam {gradcam} cannot be written"
    assert not (tmp_path / "p.csv").exists()
