import json

import pandas as pd
import pytest

import osteo
from osteo.experiments import OURS, TABLES, Experiments, Profile, resolve_profile, summarise
from osteo.report import write_report
from osteo.training import TrainResult

TINY = Profile("tiny", n_per_class=6, synth_size=64, image_size=32, epochs=1, vit_epochs=1, batch_size=8,
               seeds=(0,), slices_per_patient=2, device="cpu")


def test_resolve_profile(monkeypatch):
    monkeypatch.setenv("OSTEO_PROFILE", "smoke")
    assert resolve_profile().name == "smoke" and resolve_profile("auto").name == "smoke"
    assert resolve_profile("paper").epochs == 60 and resolve_profile("paper").seeds == (0, 1, 2)
    monkeypatch.delenv("OSTEO_PROFILE")
    assert resolve_profile().name in ("laptop", "paper")
    with pytest.raises(ValueError, match="unknown profile"):
        resolve_profile("huge")


def test_runs_are_cached_by_config_and_data(tmp_path, monkeypatch):
    exp = Experiments(TINY, results_dir=tmp_path / "results", data_dir=tmp_path / "data", progress=False)
    cfg = exp.config(**OURS)
    assert (cfg.epochs, cfg.image_size, cfg.batch_size, cfg.lam) == (1, 32, 8, 0.1)
    assert exp.config(model="inception_v3", inputs=("t",)).image_size == round(32 * 299 / 224)
    first = exp.run(cfg)
    assert (exp.run_dir(cfg) / "result.json").exists()
    import osteo.training as T

    monkeypatch.setattr(T, "make_model", lambda cfg: (_ for _ in ()).throw(AssertionError("retrained")))
    assert exp.run(cfg).test == first.test  # a second notebook gets the cached run
    assert exp.run_dir(cfg) != exp.run_dir(exp.config(**dict(OURS, lam=0.0)))
    # a remade data set with other sizes is detected, and its runs get other keys
    bigger = Experiments(Profile(**{**TINY.__dict__, "n_per_class": 8}), results_dir=tmp_path / "results",
                         data_dir=tmp_path / "data", progress=False)
    bigger._data.clear()
    assert len(pd.read_csv(bigger.manifest())) == 24
    assert bigger.run_dir(cfg) != exp.run_dir(cfg)


def _result(acc_correct, n=10, seed=0):
    y = [0] * n
    pred = [0] * acc_correct + [1] * (n - acc_correct)
    rep = osteo.classification_report(y, pred, labels=osteo.LABELS)
    return TrainResult(config={"seed": seed, "epochs": 1}, history=[], test={"main": rep}, main_head="main", y_true=y,
                       predictions={"main": pred}, alpha=None, pretrained_used=False, device="cpu", seconds=0.0)


def test_summarise_pools_seeds(tmp_path):
    row = summarise("m", [_result(6, seed=0), _result(8, seed=1)], paper_acc=70.0)
    assert row["acc"] == 70.0 and row["per_seed"] == [60.0, 80.0] and row["seeds"] == [0, 1]
    lo, hi = osteo.metrics.wilson_interval(14, 20)
    assert (row["ci95_low"], row["ci95_high"]) == (round(lo * 100, 2), round(hi * 100, 2))
    assert row["gap_to_paper"] == 0.0 and row["seed_sd"] == pytest.approx(14.14, abs=0.01)
    exp = Experiments(TINY, results_dir=tmp_path, data_dir=tmp_path / "data", progress=False)
    exp.save_table("table2", pd.DataFrame([dict(row, model=label, paper_acc=p) for label, _, p in TABLES["table2"]["rows"]]))
    text = write_report(exp.out).read_text()
    assert "Table 2. Ablation study" in text and "| Ours | 77.11 | 70.00 |" in text and "synthetic" in text
    assert json.loads((exp.out / "tables" / "table2.json").read_text())["profile"]["name"] == "tiny"
