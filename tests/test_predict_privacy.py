"""`osteo predict`, and the privacy promise: identifiers planted in DICOM headers never reach any
file the kit writes (manifests, results, checkpoints' JSON, prediction CSVs, figures)."""
import csv
from pathlib import Path

import pydicom
import pytest

import osteo
from osteo.cli import main as osteo_main
from osteo.training import CheckpointError, TrainConfig

PLANTED = {
    "PatientName": "Doe^Janet",
    "PatientID": "MRN-55501234",
    "PatientBirthDate": "19470312",
    "AccessionNumber": "ACC77100042",
    "InstitutionName": "Saint Example Hospital",
}


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    """A class-folder data set whose headers carry realistic identifiers, one patient per 2 slices."""
    root = tmp_path_factory.mktemp("hospital")
    syn = osteo.synthesize(root / "syn", n_per_class=8, size=64, seed=3, progress=False)
    scans = root / "scans"
    for i, row in syn.iterrows():
        ds = pydicom.dcmread(root / "syn" / row["path"])
        n = int(row["patient_id"][3:])
        ds.PatientName = f"Doe^Janet{n}"
        ds.PatientID = f"MRN-555{n:05d}"
        ds.PatientBirthDate = PLANTED["PatientBirthDate"]
        ds.AccessionNumber = f"ACC771{n:05d}"
        ds.InstitutionName = PLANTED["InstitutionName"]
        out = scans / row["label"] / f"img{i:03d}.dcm"
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out)
    return root, scans


def _all_text(folder: Path) -> str:
    chunks = []
    for p in folder.rglob("*"):
        if p.is_file() and p.suffix != ".dcm":
            chunks.append(p.read_bytes().decode("latin-1"))
    return "\n".join(chunks)


def test_pipeline_and_predict_leak_no_identifier(hospital, tmp_path):
    root, scans = hospital
    df = osteo.load_manifest(scans)
    assert not df["patient_id"].str.startswith("MRN").any()
    df.to_csv(tmp_path / "manifest_written.csv", index=False)
    data = osteo.load_data(df, image_size=32, progress=False)
    cfg = TrainConfig(epochs=1, batch_size=8, image_size=32, device="cpu", pretrained=False)
    osteo.train(cfg, data, out_dir=tmp_path / "run", progress=False)
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"not a dicom file at all")
    rc = osteo_main(["predict", str(tmp_path / "run" / "checkpoint.pt"), str(scans / "normal"), str(bad),
                     "--out", str(tmp_path / "pred.csv"), "--gradcam", str(tmp_path / "cams"), "--device", "cpu"])
    assert rc == 1  # one file failed
    rows = list(csv.DictReader(open(tmp_path / "pred.csv")))
    n_normal = len(list((scans / "normal").glob("*.dcm")))
    assert len(rows) == n_normal + 1
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == n_normal
    for r in ok:
        assert r["predicted"] in osteo.LABELS
        assert sum(float(r[f"p_{c}"]) for c in osteo.LABELS) == pytest.approx(1.0, abs=1e-3)
        assert 0 < float(r["alpha"]) < 1 and r["heads_agree"] in ("True", "False")
    err = [r for r in rows if r["status"] == "error"]
    assert len(err) == 1 and "broken.dcm" in err[0]["error"] and "DICOM" in err[0]["error"]
    pngs = list((tmp_path / "cams").glob("*.png"))
    assert len(pngs) == n_normal and all(p.stat().st_size > 1000 for p in pngs)
    text = _all_text(tmp_path)
    for tag, value in PLANTED.items():
        for needle in {value, value[:10], "Janet", "MRN-555", "ACC771"}:
            assert needle not in text, f"{needle!r} ({tag}) leaked into an output file"


def test_predict_all_good_exit_zero(hospital, tmp_path):
    root, scans = hospital
    data = osteo.load_data(osteo.load_manifest(scans), image_size=32, progress=False)
    cfg = TrainConfig(model="resnet18", inputs=("t",), epochs=1, batch_size=8, image_size=32, device="cpu", pretrained=False)
    osteo.train(cfg, data, out_dir=tmp_path / "run", progress=False)
    files = sorted((scans / "osteoporosis").glob("*.dcm"))[:3]
    rc = osteo_main(["predict", str(tmp_path / "run" / "checkpoint.pt"), *map(str, files), "--out", str(tmp_path / "p.csv")])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [r["status"] for r in rows] == ["ok"] * 3 and rows[0]["alpha"] == ""


def test_predict_refuses_a_foreign_checkpoint(tmp_path, capsys):
    import torch

    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    assert osteo_main(["predict", str(tmp_path / "x.pt"), str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"osteo: error: {tmp_path / 'x.pt'}: not an osteo checkpoint (expected format 'osteo-kit/1')\n"
    with pytest.raises(CheckpointError, match="not an osteo checkpoint"):  # --debug: the exception itself
        osteo_main(["predict", str(tmp_path / "x.pt"), str(tmp_path), "--debug"])


@pytest.mark.parametrize("notebook", ["00_data", "02_train_twin", "08_gradcam"])
def test_notebooks_on_identified_data_show_no_identifier(hospital, tmp_path, monkeypatch, notebook):
    """The teaching notebooks, run on the planted folder (as a hospital user would, via OSTEO_DATA),
    write no identifier into their outputs, results or figures."""
    import papermill as pm

    root, scans = hospital
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("OSTEO_DATA", str(scans))
    monkeypatch.setenv("OSTEO_ROOT", str(tmp_path))  # results/ and data/ go to the temporary folder
    monkeypatch.setenv("OSTEO_PROFILE", "smoke")
    out = tmp_path / f"{notebook}.ipynb"
    pm.execute_notebook(str(repo / "notebooks" / f"{notebook}.ipynb"), str(out), parameters={"profile": "smoke"},
                        cwd=str(repo / "notebooks"), kernel_name="python3", progress_bar=False)
    text = _all_text(tmp_path)
    assert "Table" in text or "HU" in text  # the outputs are there to be searched
    for tag, value in PLANTED.items():
        for needle in {value, "Janet", "MRN-555", "ACC771", "19470312"}:
            assert needle not in text, f"{needle!r} ({tag}) leaked into {notebook}'s outputs or results"
