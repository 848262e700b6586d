"""Manifests (CSV and folder layout), the patient-level split, and the privacy helpers."""
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset

from osteo.manifest import LABELS, ManifestError, check_split, load_manifest, split_patients
from osteo.privacy import IDENTIFYING_TAGS, dataset_identifiers, get_salt, is_synthetic_id, pseudonymize, scrub
from test_dicom import make_ct, save


@pytest.fixture(autouse=True)
def _isolated_salt(tmp_path, monkeypatch):
    """Never touch the real ~/.cache/osteo/salt from the tests."""
    monkeypatch.delenv("OSTEO_SALT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def write_ct(path: Path, patient_id=None, name="Doe^Jane"):
    """A tiny valid CT DICOM file (header is what the manifest reads); no PatientID when None."""
    ds = make_ct(np.zeros((4, 4), np.int16), slope=1, intercept=-1024, PatientName=name)
    if patient_id is None:
        del ds.PatientID
    else:
        ds.PatientID = patient_id
    path.parent.mkdir(parents=True, exist_ok=True)
    return save(ds, path)


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


# --- CSV manifests ------------------------------------------------------------------------------


def test_csv_relative_paths_resolved_and_y_added(tmp_path):
    for n in ("a", "b", "c"):
        touch(tmp_path / "scans" / f"{n}.dcm")
    (tmp_path / "m").mkdir()
    csv = tmp_path / "m" / "manifest.csv"
    csv.write_text(
        "path,label,patient_id,age\n"
        "../scans/a.dcm,normal,0042,61\n"
        f"{(tmp_path / 'scans' / 'b.dcm').as_posix()},Osteopenia,NA,70\n"
        "../scans/./c.dcm,osteoporosis,SYN7,\n"
    )
    df = load_manifest(csv)
    assert df["path"].tolist() == [Path(os.path.abspath(tmp_path / "scans" / f"{n}.dcm")).as_posix() for n in "abc"]
    assert df["label"].tolist() == ["normal", "osteopenia", "osteoporosis"]
    assert df["y"].tolist() == [0, 1, 2] and df["y"].dtype == np.int64
    assert df["patient_id"].tolist() == ["0042", "NA", "SYN7"]  # text, leading zeros and "NA" kept
    assert df["age"].iloc[0] == 61 and pd.isna(df["age"].iloc[2])  # extra column kept, typed
    assert "split" not in df.columns


def test_csv_every_problem_reported_at_once(tmp_path):
    for n in ("ok1", "ok2", "ok3", "ok4", "dup", "leak1", "leak2"):
        touch(tmp_path / f"{n}.dcm")
    csv = tmp_path / "manifest.csv"
    csv.write_text(
        "path,label,patient_id,split\n"
        "ok1.dcm,normal,p1,train\n"  # line 2
        "ok2.dcm,normal,p2,test\n"  # line 3
        "ok3.dcm,osteoporoz,p3,train\n"  # line 4: unknown label
        "gone.dcm,osteopenia,p4,train\n"  # line 5: missing file
        "dup.dcm,osteopenia,p5,test\n"  # line 6
        "./dup.dcm,osteopenia,p5,test\n"  # line 7: duplicate of line 6
        "leak1.dcm,osteoporosis,p6,train\n"  # line 8: p6 in both splits
        "leak2.dcm,osteoporosis,p6,test\n"  # line 9
        "ok4.dcm,osteoporosis,,valid\n"  # line 10: empty id, bad split
    )
    with pytest.raises(ManifestError) as ei:
        load_manifest(csv)
    msg = str(ei.value)
    ap = lambda n: Path(os.path.abspath(tmp_path / n)).as_posix()  # noqa: E731
    assert f"line 4: {ap('ok3.dcm')}: unknown label 'osteoporoz' (allowed: normal, osteopenia, osteoporosis)" in msg
    assert f"line 5: {ap('gone.dcm')}: missing file" in msg
    assert f"line 7: {ap('dup.dcm')}: duplicate path (also at line 6)" in msg
    assert f"line 8: {ap('leak1.dcm')}: patient p6 is in both train and test" in msg
    assert f"line 9: {ap('leak2.dcm')}: patient p6 is in both train and test" in msg
    assert f"line 10: {ap('ok4.dcm')}: empty patient_id" in msg
    assert f"line 10: {ap('ok4.dcm')}: split 'valid' is not train or test" in msg
    assert "line 2:" not in msg and "line 3:" not in msg  # good rows are not blamed
    # check_files=False skips only the existence check
    with pytest.raises(ManifestError) as ei:
        load_manifest(csv, check_files=False)
    assert "missing file" not in str(ei.value) and "unknown label" in str(ei.value)


def test_csv_missing_columns(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("file,label\na.dcm,normal\n")
    with pytest.raises(ManifestError, match=r"missing column\(s\) path, patient_id.*found: file, label"):
        load_manifest(csv)


def test_csv_patient_with_two_labels_and_class_missing_from_a_split(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text(
        "path,label,patient_id,split\n"
        "a.dcm,normal,p1,train\n"
        "b.dcm,osteopenia,p1,train\n"
        "c.dcm,normal,p2,test\n"
        "d.dcm,osteopenia,p3,train\n"
    )
    with pytest.raises(ManifestError) as ei:
        load_manifest(csv, check_files=False)
    msg = str(ei.value)
    assert "line 2:" in msg and "line 3:" in msg and "patient p1 has several labels" in msg
    assert "class osteopenia: no test patient" in msg
    assert "class normal" not in msg


def test_listing_capped_at_50(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("path,label,patient_id\n" + "".join(f"f{i}.dcm,normal,p{i}\n" for i in range(60)))
    with pytest.raises(ManifestError) as ei:
        load_manifest(csv)
    msg = str(ei.value)
    assert "60 problem(s)" in msg and msg.count("missing file") == 50 and "... and 10 more" in msg


def test_csv_ids_pseudonymised_on_request(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("path,label,patient_id\na.dcm,normal,MRN55\nb.dcm,normal,SYN01\n")
    df = load_manifest(csv, check_files=False, pseudonymize_ids=True, salt="s")
    # a CSV cannot prove an id synthetic: every id is pseudonymised on request
    assert df["patient_id"].tolist() == [pseudonymize("MRN55", "s"), pseudonymize("SYN01", "s")]


# --- folder layout ------------------------------------------------------------------------------


def test_folder_layout_pseudonymised(tmp_path):
    root = tmp_path / "data"
    write_ct(root / "Normal" / "pat1" / "IM0001", "HOSP-111")
    write_ct(root / "Normal" / "pat1" / "IM0002", "HOSP-111")
    write_ct(root / "osteopenia" / "x.dcm", "HOSP-222")
    write_ct(root / "OSTEOPOROSIS" / "y.dcm", "SYN0005")
    (root / "README.md").write_text("not a scan")
    write_ct(root / ".cache" / "z.dcm", "HOSP-999")  # hidden: ignored
    df = load_manifest(root, salt="pepper")
    assert df["label"].tolist() == ["normal", "normal", "osteopenia", "osteoporosis"]
    assert df["y"].tolist() == [0, 0, 1, 2]
    h1, h2 = pseudonymize("HOSP-111", "pepper"), pseudonymize("HOSP-222", "pepper")
    # a hospital file whose id starts with SYN is pseudonymised like any other
    assert df["patient_id"].tolist() == [h1, h1, h2, pseudonymize("SYN0005", "pepper")]
    dump = df.to_csv()
    assert "HOSP-" not in dump and "Doe" not in dump
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])
    # another salt, other pseudonyms; the same salt, the same ones
    assert load_manifest(root, salt="other")["patient_id"].iloc[0] != h1
    assert load_manifest(root, salt="pepper")["patient_id"].tolist() == df["patient_id"].tolist()


def test_folder_layout_problems(tmp_path):
    root = tmp_path / "data"
    write_ct(root / "normal" / "a.dcm", None)  # no PatientID
    write_ct(root / "healthy" / "b.dcm", "X1")  # not a label
    with pytest.raises(ManifestError) as ei:
        load_manifest(root)
    msg = str(ei.value)
    assert "a.dcm: no PatientID" in msg
    assert "folder 'healthy' is not a label (allowed: normal, osteopenia, osteoporosis)" in msg


# --- splits -------------------------------------------------------------------------------------


def _patients_df(n_per_label=(10, 7, 5), slices=2):
    rows = []
    for lab, n in zip(LABELS, n_per_label):
        for p in range(n):
            for s in range(slices):
                rows.append({"path": f"/d/{lab}/{p}/{s}.dcm", "label": lab, "patient_id": f"{lab}-{p:02d}"})
    return pd.DataFrame(rows)


def test_split_patients_stratified_patient_level_deterministic():
    df = _patients_df()
    a = split_patients(df, test_fraction=0.2, seed=0)
    assert "split" not in df.columns  # a copy
    assert a.groupby("patient_id")["split"].nunique().max() == 1  # patient level
    test_pat = a[a["split"] == "test"].groupby("label")["patient_id"].nunique().to_dict()
    # round(0.2 * 10) = 2, round(0.2 * 7) = 1.4 -> 1, round(0.2 * 5) = 1
    assert test_pat == {"normal": 2, "osteopenia": 1, "osteoporosis": 1}
    assert (a[a["split"] == "test"].groupby("patient_id").size() == 2).all()  # all slices follow
    b = split_patients(df.sample(frac=1, random_state=3), test_fraction=0.2, seed=0)
    assert set(b.loc[b["split"] == "test", "patient_id"]) == set(a.loc[a["split"] == "test", "patient_id"])
    seeds = {frozenset(split_patients(df, seed=s).query("split == 'test'")["patient_id"]) for s in range(5)}
    assert len(seeds) > 1  # the seed matters
    check_split(a)
    assert split_patients(a, seed=99)["split"].tolist() == a["split"].tolist()  # complete: unchanged
    partial = a.copy()
    partial.loc[partial.index[:3], "split"] = None
    with pytest.raises(ManifestError, match="split given on some rows only"):
        split_patients(partial)
    empty = a.assign(split=None)
    assert split_patients(empty, seed=0)["split"].tolist() == a["split"].tolist()  # all empty: filled


def test_split_patients_small_classes():
    df = _patients_df(n_per_label=(2, 3, 1))
    with pytest.raises(ManifestError, match="class osteoporosis: 1 patient, need at least 2"):
        split_patients(df)
    out = split_patients(_patients_df(n_per_label=(2, 2, 2)), test_fraction=0.9)
    # at least one patient per class stays in train, at least one goes to test
    per = out.groupby(["label", "split"])["patient_id"].nunique()
    assert (per == 1).all() and len(per) == 6


def test_check_split_catches_leaks():
    df = split_patients(_patients_df(), seed=0)
    leaked = df[df["split"] == "test"]["patient_id"].iloc[0]
    i = df.index[(df["patient_id"] == leaked)][0]
    df.loc[i, "split"] = "train"
    with pytest.raises(ManifestError) as ei:
        check_split(df)
    msg = str(ei.value)
    assert f"patient {leaked} is in both train and test" in msg
    assert df.at[i, "path"] in msg and msg.count(leaked) == 2  # both of its rows are named
    with pytest.raises(ManifestError, match="no split column"):
        check_split(_patients_df())


# --- privacy ------------------------------------------------------------------------------------


def test_pseudonymize_salt_precedence_and_format(monkeypatch, tmp_path):
    p = pseudonymize("12345", salt="a")
    assert p.startswith("P-") and len(p) == 14 and int(p[2:], 16) >= 0
    assert p == pseudonymize(" 12345 ", salt="a") and p != pseudonymize("12345", salt="b")
    monkeypatch.setenv("OSTEO_SALT", "a")
    assert pseudonymize("12345") == p
    monkeypatch.delenv("OSTEO_SALT")
    salt_file = tmp_path / "xdg-cache" / "osteo" / "salt"
    assert not salt_file.exists()
    q = pseudonymize("12345")  # creates the per-installation salt
    assert salt_file.exists() and stat.S_IMODE(os.stat(salt_file).st_mode) == 0o600
    assert get_salt() == salt_file.read_text().strip() and len(get_salt()) == 64
    assert pseudonymize("12345") == q == pseudonymize("12345", salt=get_salt())
    with pytest.raises(ValueError, match="empty patient id"):
        pseudonymize("  ")


def test_synthetic_ids_and_scrub():
    assert is_synthetic_id("SYN00012") and not is_synthetic_id("12345") and not is_synthetic_id(None)
    assert {"PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
            "ReferringPhysicianName", "OtherPatientIDs", "PatientAddress", "StudyID"} <= set(IDENTIFYING_TAGS)
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN-42"
    ds.StudyID = "7"
    idents = dataset_identifiers(ds)
    text = "file of Jane Doe (DOE^JANE, mrn-42), study 7"
    assert scrub(text, idents) == "file of [redacted] ([redacted], [redacted]), study 7"
    assert scrub("nothing here", idents) == "nothing here"


# --- synthetic ids are kept only for files the synthetic generator wrote -----------------------------


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    from osteo.synthetic import synthesize

    root = tmp_path_factory.mktemp("syn")
    df = synthesize(root, n_per_class=2, size=32, seed=5, slices_per_patient=1, progress=False)
    return root, df


def test_files_of_the_synthetic_generator_keep_their_ids(synthetic_set):
    import pydicom

    from osteo.privacy import is_synthetic_dataset

    root, df = synthetic_set
    loaded = load_manifest(root, salt="pepper")
    assert sorted(loaded["patient_id"]) == sorted(df["patient_id"])
    assert all(is_synthetic_id(p) for p in loaded["patient_id"])
    assert all(is_synthetic_dataset(pydicom.dcmread(root / p)) for p in df["path"])


@pytest.mark.parametrize("pid", ["SYN0005", "SYN12345", "SYN-12", "SYNTHIA01", "SYN", "P-000012345678", "P-abcdef012345"])
def test_hospital_ids_that_look_synthetic_or_pseudonymous_are_pseudonymised(tmp_path, pid):
    root = tmp_path / "data"
    write_ct(root / "normal" / "a.dcm", pid)
    write_ct(root / "osteopenia" / "b.dcm", "HOSP-1")
    write_ct(root / "osteoporosis" / "c.dcm", "HOSP-2")
    df = load_manifest(root, salt="pepper")
    assert df["patient_id"].iloc[0] == pseudonymize(pid, "pepper") != pid
    assert pid not in df.to_csv()


@pytest.mark.parametrize("drop", ["Manufacturer", "PatientIdentityRemoved", "PatientName", "StudyInstanceUID", "PatientID"])
def test_a_file_with_only_some_synthetic_markers_is_pseudonymised(synthetic_set, tmp_path, drop):
    """Each marker is needed: a hospital file that shares the others (a SYN id, identity removed,
    a 2.25 UID, even our Manufacturer) is still pseudonymised."""
    import pydicom

    from osteo.privacy import is_synthetic_dataset

    root, df = synthetic_set
    ds = pydicom.dcmread(root / df["path"].iloc[0])
    assert is_synthetic_dataset(ds)
    changed = {"Manufacturer": "SIEMENS", "PatientIdentityRemoved": "NO", "PatientName": "Doe^Jane",
               "StudyInstanceUID": "1.2.840.113619.2.55.3.1", "PatientID": "SYN0001A"}[drop]
    setattr(ds, drop, changed)
    assert not is_synthetic_dataset(ds)
    out = tmp_path / "data"
    for i, lab in enumerate(("normal", "osteopenia", "osteoporosis")):
        if lab == "normal":
            p = out / lab / "x.dcm"
            p.parent.mkdir(parents=True)
            ds.save_as(p)
        else:
            write_ct(out / lab / f"{i}.dcm", f"HOSP-{i}")
    got = load_manifest(out, salt="pepper")["patient_id"].iloc[0]
    assert got == pseudonymize(str(ds.PatientID), "pepper")


@pytest.mark.parametrize("length", [0xFFFFFFF0, 50_000_000])
def test_class_folder_file_with_a_huge_length_field_is_refused_before_allocating(tmp_path, length):
    import struct
    import tracemalloc

    from test_dicom import make_ct, save

    for lab in LABELS:
        (tmp_path / lab).mkdir()
        for i in range(2):
            save(make_ct(PatientID=f"ID{lab}{i}"), tmp_path / lab / f"{i}.dcm")
    bad = tmp_path / "normal" / "0.dcm"
    data = bytearray(bad.read_bytes())
    marker = b"\x02\x00\x01\x00OB\x00\x00"  # the file meta's version, a 4-byte length
    struct.pack_into("<I", data, data.index(marker) + len(marker), length)
    bad.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError) as ei:
            load_manifest(tmp_path)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    msg = str(ei.value)
    assert "0.dcm: cannot read the DICOM header: damaged header" in msg and f"length of {length} bytes" in msg, msg
    assert peak < 20, f"{peak:.0f} MB allocated while refusing the file"


# --- CSV shapes pandas alone gets wrong -----------------------------------------------------------


def _three_classes(tmp_path: Path) -> str:
    for k in range(6):
        touch(tmp_path / f"s{k}.dcm")
    return "".join(f"s{k}.dcm,{LABELS[k // 2]},P{k}\n" for k in range(6))


@pytest.mark.parametrize("row,fields", [("s9.dcm,normal,P9,train,extra\n", 5), ("s9.dcm,normal,P9,,,,\n", 7),
                                        ("s9.dcm,normal,P9,x,y,z,w,v\n", 8)])
def test_row_with_more_fields_than_the_header_names_its_line(tmp_path, row, fields):
    m = tmp_path / "m.csv"
    m.write_text("path,label,patient_id\n" + _three_classes(tmp_path) + row)
    with pytest.raises(ManifestError) as e:
        load_manifest(m)
    assert str(e.value) == f"{m}: cannot be read as CSV (line 8: {fields} fields, but the header names 3 columns (a comma too many?))"


@pytest.mark.parametrize("header", ["path,label,patient_id,path", "path,label,label,patient_id",
                                    "path,label,patient_id,patient_id", "path,label, patient_id,patient_id"])
def test_a_column_named_twice_is_refused(tmp_path, header):
    m = tmp_path / "m.csv"
    body = _three_classes(tmp_path).replace("\n", ",x\n")
    m.write_text(header + "\n" + body)
    with pytest.raises(ManifestError, match=r"line 1: column\(s\) (path|label|patient_id) appear more than once"):
        load_manifest(m)


@pytest.mark.parametrize("layout", ["blank lines", "CRLF and blank lines", "quoted line break", "BOM"])
def test_problems_name_the_line_the_row_is_on(tmp_path, layout):
    body = _three_classes(tmp_path)
    lines = ["path,label,patient_id"] + body.strip().split("\n") + ["missing.dcm,normal,P9"]
    if layout == "blank lines":
        text, line = "\n\n".join(lines) + "\n", 15
    elif layout == "CRLF and blank lines":
        text, line = "\r\n".join(lines[:3] + ["", ""] + lines[3:]) + "\r\n", 10
    elif layout == "quoted line break":
        lines[2] = lines[2].replace(",P1", ',"P\n1"')
        text, line = "\n".join(lines) + "\n", 9
    else:
        text, line = "\ufeff" + "\n".join(lines) + "\n", 8
    m = tmp_path / "m.csv"
    m.write_text(text, newline="")
    with pytest.raises(ManifestError) as e:
        load_manifest(m)
    assert f"line {line}: {(tmp_path / 'missing.dcm').as_posix()}: missing file" in str(e.value), str(e.value)


@pytest.mark.parametrize("name", ["x" * 300 + ".dcm", "/".join(["y" * 200] * 30) + ".dcm", "z" * 100_000])
def test_paths_the_file_system_cannot_check_give_a_short_problem(tmp_path, name):
    m = tmp_path / "m.csv"
    m.write_text("path,label,patient_id\n" + _three_classes(tmp_path) + f"{name},normal,P9\n")
    with pytest.raises(ManifestError) as e:
        load_manifest(m)
    msg = str(e.value)
    assert "line 8: " in msg and ("cannot be checked (file name too long)" in msg or "missing file" in msg), msg
    assert len(msg) < 600, len(msg)  # the path is shortened, not pasted whole
