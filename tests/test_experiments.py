import json
from pathlib import Path

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


def test_a_synthetic_set_from_an_older_generator_is_made_again(tmp_path, capsys):
    """The manifest's synthetic_version tells an older generator's set (remade, with the reason printed)
    from a current one (kept as it is)."""
    from osteo.synthetic import SYNTHETIC_VERSION

    exp = Experiments(TINY, results_dir=tmp_path / "results", data_dir=tmp_path / "data", progress=False)
    m = exp.manifest()
    made = m.stat().st_mtime_ns
    assert exp.manifest() == m and m.stat().st_mtime_ns == made and capsys.readouterr().out == ""  # current: kept
    current = pd.read_csv(m)
    assert set(current["synthetic_version"]) == {SYNTHETIC_VERSION}
    for version, reason in (("synthetic-0", "made by version synthetic-0 of the generator"),
                            (None, "made by a generator older than version labels")):
        old = current.copy()
        if version is None:
            old = old.drop(columns=["synthetic_version"])
        else:
            old["synthetic_version"] = version
        old.to_csv(m, index=False)
        assert exp.manifest() == m
        out = capsys.readouterr().out
        assert reason in out and f"not the current {SYNTHETIC_VERSION}: making it again" in out
        again = pd.read_csv(m)
        assert set(again["synthetic_version"]) == {SYNTHETIC_VERSION}
        pd.testing.assert_frame_equal(again, current)  # the same generator and seed: the same set
        assert all((m.parent / p).is_file() for p in again["path"])


def test_a_foreign_manifest_in_the_synthetic_folder_is_refused_untouched(tmp_path):
    from osteo.synthetic import SyntheticError

    exp = Experiments(TINY, results_dir=tmp_path / "results", data_dir=tmp_path / "data", progress=False)
    m = exp.manifest()
    theirs = pd.read_csv(m)
    theirs["patient_id"] = [f"HOSP{i:04d}" for i in range(len(theirs))]  # not ids the generator writes
    theirs = theirs.drop(columns=["synthetic_version"])
    theirs.to_csv(m, index=False)
    before = m.read_bytes()
    files = sorted(p for p in m.parent.rglob("*.dcm"))
    with pytest.raises(SyntheticError, match=r"manifest.csv: not a synthetic set made by osteo"):
        exp.manifest()
    assert m.read_bytes() == before and sorted(m.parent.rglob("*.dcm")) == files
    m.write_text("not,a\n\"csv")
    with pytest.raises(SyntheticError, match=r"manifest.csv: cannot read this manifest"):
        exp.manifest()


def _result(acc_correct, n=10, seed=0, groups=None):
    y = [0] * n
    pred = [0] * acc_correct + [1] * (n - acc_correct)
    groups = groups or [f"SYN{i // 2:05d}" for i in range(n)]  # two slices per patient
    rep = osteo.classification_report(y, pred, labels=osteo.LABELS, groups=groups)
    return TrainResult(config={"seed": seed, "epochs": 1}, history=[], test={"main": rep}, main_head="main", y_true=y,
                       predictions={"main": pred}, alpha=None, pretrained_used=False, device="cpu", seconds=0.0,
                       test_patient_id=list(groups))


def test_summarise_reports_seeds_as_seeds_and_patients_as_the_unit(tmp_path):
    row = summarise("m", [_result(6, seed=0), _result(8, seed=1)], paper_acc=70.0)
    assert row["acc"] == 70.0 and row["per_seed"] == [60.0, 80.0] and row["seeds"] == [0, 1]
    assert row["gap_to_paper"] == 0.0 and row["seed_sd"] == pytest.approx(14.14, abs=0.01)
    # two-level bootstrap (seeds, then the 5 patients), never Wilson on 20 "independent" slices
    mean, lo, hi = osteo.accuracy_ci_seeds([0] * 10, [[0] * 6 + [1] * 4, [0] * 8 + [1] * 2],
                                           [f"SYN{i // 2:05d}" for i in range(10)])
    assert (row["ci95_low"], row["ci95_high"]) == (round(lo * 100, 2), round(hi * 100, 2))
    wl, wh = osteo.metrics.wilson_interval(14, 20)
    assert hi - lo > wh - wl
    assert row["n_patients"] == 5 and row["n_slices"] == 10 and "seeds and patients" in row["interval"]
    one = summarise("m", [_result(6)], paper_acc=None)
    assert one["interval"] == "patients (one seed: test-set sampling only)" and one["seed_sd"] is None
    assert (one["ci95_low"], one["ci95_high"]) == tuple(round(100 * v, 2) for v in _result(6).accuracy_ci95)
    with pytest.raises(ValueError, match="different slices"):
        summarise("m", [_result(6), _result(6, groups=[f"SYN{i:05d}" for i in range(10)])], paper_acc=None)
    exp = Experiments(TINY, results_dir=tmp_path, data_dir=tmp_path / "data", progress=False)
    exp.save_table("table2", pd.DataFrame([dict(row, model=label, paper_acc=p) for label, _, p in TABLES["table2"]["rows"]]))
    text = write_report(exp.out).read_text()
    assert "Table 2. Ablation study" in text and "| Ours | 77.11 | 70.00 |" in text and "synthetic" in text
    assert json.loads((exp.out / "tables" / "table2.json").read_text())["profile"]["name"] == "tiny"


def _fake_train(calls):
    """Stands in for osteo.train in the grid tests: records the config, writes a result.json
    whose heads are right on 9 of 12 test slices (the twin's G_s on 6, G_t on 12)."""
    from pathlib import Path

    def train(cfg, data, out_dir=None, progress=True):
        f = Path(out_dir) / "result.json"
        if f.exists() and TrainResult.from_json(f).config == cfg.to_dict():  # the cache, as osteo.train has it
            return TrainResult.from_json(f)
        calls.append(cfg.key())
        y = [0, 1, 2] * 4
        some = [0, 1, 2] * 3 + [1, 2, 0]
        heads = {"f": some, "s": [0] * 12, "t": y} if cfg.model == "twin" else {"main": some}
        groups = [f"SYN{i:05d}" for i in range(12)]
        test = {h: osteo.classification_report(y, p, labels=osteo.LABELS, groups=groups) for h, p in heads.items()}
        res = TrainResult(config=cfg.to_dict(), history=[], test=test, main_head=next(iter(heads)), y_true=y,
                          predictions=heads, alpha=0.5 if cfg.model == "twin" else None, pretrained_used=False,
                          device="fake", seconds=0.0, test_patient_id=groups)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        res.to_json(Path(out_dir) / "result.json")
        return res

    return train


def test_seeds_override_and_the_grid_configs(tmp_path):
    exp = Experiments(TINY, seeds=[3, 4], results_dir=tmp_path, data_dir=tmp_path / "data", progress=False)
    assert exp.profile.seeds == (3, 4) and TINY.seeds == (0,)
    cfgs = exp.table_configs(["table2", "table3"])
    # Table 2: 4 rows; Table 3: 3 rows, of which (x_s, x_t) without L_dis is Table 2's "Ours - L_dis"
    assert len(cfgs) == 2 * 6 and len({c.key() for c in cfgs}) == 12
    assert {c.seed for c in cfgs} == {3, 4}
    assert len(exp.table_configs()) == 2 * (4 + 2 + 5 + 5)  # all four tables: 16 distinct runs per seed
    with pytest.raises(ValueError, match="unknown table"):
        exp.table_configs(["table9"])
    with pytest.raises(ValueError, match="at least one seed"):
        Experiments(TINY, seeds=[], results_dir=tmp_path)


def test_grid_workers_share_the_runs_and_resume(tmp_path, monkeypatch):
    import osteo.experiments as E

    calls = []
    monkeypatch.setattr(E, "train", _fake_train(calls))
    exp = Experiments(TINY, results_dir=tmp_path / "results", data_dir=tmp_path / "data", progress=False)
    names = ["table2", "table3"]
    assert len(exp.missing(names)) == 6
    exp.grid(names, worker=0, n_workers=4)  # runs 1 and 5
    exp.grid(names, worker=2, n_workers=4)  # run 3
    assert len(calls) == 3 and len(exp.missing(names)) == 3
    with pytest.raises(ValueError, match="worker 4 of 4"):
        exp.grid(names, worker=4, n_workers=4)
    exp.grid(names)  # the rest; the finished three come from the cache
    assert len(calls) == 6 and len(set(calls)) == 6 and exp.missing(names) == []
    exp.grid(names)
    assert len(calls) == 6  # nothing trains twice


def test_grid_command_saves_complete_tables_and_reports_the_rest(tmp_path, monkeypatch, capsys):
    import osteo.experiments as E
    from osteo import cli

    calls = []
    monkeypatch.setattr(E, "train", _fake_train(calls))
    import dataclasses

    monkeypatch.setitem(E.PROFILES, "tiny", dataclasses.replace(TINY, note="a tiny test profile"))
    monkeypatch.setenv("OSTEO_ROOT", str(tmp_path))
    args = ["grid", "--profile", "tiny", "--tables", "table2", "table3", "--seeds", "0", "1", "--no-progress"]
    assert cli.main(args + ["--worker", "1/2"]) == 0
    assert len(calls) == 6 and not (tmp_path / "results" / "tiny" / "tables").exists()  # workers save no tables
    assert cli.main(args + ["--only-cached"]) == 0  # nothing complete yet: nothing saved, no error
    assert "table2: not saved, " in capsys.readouterr().out and len(calls) == 6
    assert cli.main(args) == 0  # trains the other worker's half, then saves
    assert len(calls) == 12
    tables = tmp_path / "results" / "tiny" / "tables"
    t2 = pd.read_csv(tables / "table2.csv")
    assert list(t2["model"]) == [r[0] for r in TABLES["table2"]["rows"]]
    assert (t2["acc"] == 75.0).all() and t2["per_seed"].str.contains("75.0, 75.0").all()
    fig3 = pd.read_csv(tables / "fig3.csv")  # G_s says "normal" always, G_t is always right
    assert list(fig3["normal"]) == [100.0, 100.0, 100.0, 100.0] and list(fig3["osteopenia"]) == [0.0, 100.0] * 2
    paired = pd.read_csv(tables / "paired.csv")  # every claim of Tables 2 and 3: seeds 0, 1 and combined
    from osteo.experiments import paper_claims

    n_claims = len(paper_claims("table2")) + len(paper_claims("table3"))
    assert len(paired) == 3 * n_claims and list(paired["seed"][:3]) == ["0", "1", "all"]
    assert (paired["diff"] == 0).all() and (paired["p_value"] == 1).all() and (paired["holds"] == "not shown").all()
    report = (tmp_path / "results" / "tiny" / "REPORT.md").read_text()
    assert "seeds 0, 1 (the profile's own seeds are 0). A tiny test profile." in report
    assert "## Not run yet" in report and "Table 4, Table 5" in report and "Trained on: fake." in report


def test_grid_worker_option_is_checked():
    from osteo import cli

    for bad in ("3/2", "0/2", "x"):
        with pytest.raises(cli.UserError, match="--worker"):
            cli._parse_worker(bad)
    assert cli._parse_worker("2/3") == (1, 3)  # 1-based on the command line, 0-based for Experiments.grid


def test_model_retrains_a_result_cached_without_weights(tmp_path, capsys):
    """git keeps results/paper/runs/*/result.json but not the checkpoints: notebooks 02 and 08 need the
    weights, so such a run trains again, and its new result replaces the old one."""
    import torch
    import torchvision

    exp = Experiments(TINY, results_dir=tmp_path / "results", data_dir=tmp_path / "data", progress=False)
    cfg = exp.config(model="resnet18_acm", inputs=("t",))
    model, first = exp.model(cfg)  # trains
    d = exp.run_dir(cfg)
    assert (d / "checkpoint.pt").exists() and isinstance(model, torchvision.models.ResNet)
    again, res = exp.model(cfg)  # cached with weights: the same network, nothing printed
    assert res.test == first.test and "again" not in capsys.readouterr().out
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    # as a clone has it: the result without its checkpoint, and an old accuracy we can recognise
    (d / "checkpoint.pt").unlink()
    old = json.loads((d / "result.json").read_text())
    old["device"] = "an old GPU"
    (d / "result.json").write_text(json.dumps(old))
    model3, res3 = exp.model(cfg)
    out = capsys.readouterr().out
    assert "cached without its weights; training it again" in out and "(an old GPU)" in out
    assert (d / "checkpoint.pt").exists() and res3.device == "cpu"
    assert json.loads((d / "result.json").read_text())["device"] == "cpu"  # replaced, not left stale
    assert res3.test == first.test  # the CPU retrains bit for bit
    for (name, p), q in zip(model.state_dict().items(), model3.state_dict().values()):
        assert torch.equal(p, q), name


def test_retraining_for_weights_keeps_the_old_result_until_the_new_one_exists(tmp_path, monkeypatch, capsys):
    """A run cached without weights trains again beside the old result: stopped half-way, the old
    result is still there (and still what run() returns); the next call finishes and replaces it."""
    import osteo.experiments as E
    from osteo.training import TrainingInterrupted

    exp = Experiments(TINY, results_dir=tmp_path / "results", data_dir=tmp_path / "data", progress=False)
    cfg = exp.config(model="resnet18_acm", inputs=("t",))
    first = exp.run(cfg)
    d = exp.run_dir(cfg)
    (d / "checkpoint.pt").unlink()
    old = json.loads((d / "result.json").read_text())
    old["device"] = "an old GPU"
    (d / "result.json").write_text(json.dumps(old))
    real_train = E.train

    def stopped(*a, **k):
        return real_train(*a, **{**k, "stop_after_steps": 1})

    monkeypatch.setattr(E, "train", stopped)
    with pytest.raises(TrainingInterrupted):
        exp.trained_model(cfg)
    assert json.loads((d / "result.json").read_text())["device"] == "an old GPU"  # not deleted
    assert not (d / "checkpoint.pt").exists() and exp.run(cfg).device == "an old GPU"
    assert "the cached result stays until the new one is written" in capsys.readouterr().out
    monkeypatch.setattr(E, "train", real_train)
    model, res = exp.model(cfg)  # the older name: the same method
    assert "(an old GPU)" in capsys.readouterr().out
    assert res.device == "cpu" and json.loads((d / "result.json").read_text())["device"] == "cpu"
    assert (d / "checkpoint.pt").exists() and not (d / "retraining").exists()
    assert res.test == first.test  # the CPU retrains bit for bit, resumed or not


def test_paper_profile_on_a_cpu_warns(monkeypatch, capsys):
    import torch

    from osteo import cli
    from osteo.experiments import PROFILES, cpu_warning

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    w = cpu_warning(PROFILES["paper"])
    assert "without a CUDA GPU" in w and "60 epochs on 3600 slices at 224 px" in w and "use profile laptop" in w
    assert cpu_warning(PROFILES["laptop"]) is None and cpu_warning(PROFILES["smoke"]) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_warning(PROFILES["paper"]) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    import papermill as pm

    import osteo.notebook
    import osteo.report

    ran = []
    monkeypatch.setattr(pm, "execute_notebook", lambda nb, *a, **k: ran.append(nb))
    monkeypatch.setattr(osteo.report, "write_report", lambda out: Path(out) / "REPORT.md")
    assert cli.main(["reproduce", "--profile", "paper", "--notebooks", "01"]) == 0
    assert [Path(nb).name[:2] for nb in ran] == ["01", "09"]  # the warning does not stop it (cached runs)
    assert "warning: profile paper without a CUDA GPU" in capsys.readouterr().err
    assert "without a CUDA GPU" in osteo.notebook.setup_summary(Experiments("paper"))


def test_a_claim_holds_only_when_interval_and_exact_test_agree():
    from osteo.experiments import verdict

    assert verdict(0.01, 0.09, 0.01) == "yes" and verdict(-0.09, -0.01, 0.01) == "no: B better"
    assert verdict(-0.01, 0.09, 0.04) == "not shown"  # the interval holds 0
    assert verdict(0.01, 0.09, 0.2) == "not shown"  # a narrow bootstrap on few patients, the exact test disagrees
