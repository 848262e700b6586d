"""The protocol choices that decide a result: the twin's starting weights (init), and three pitfall
switches that inflate accuracy (split by slice, best epoch on the test set, 8-bit windows); and the
run keys of configs that leave them at their defaults."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import make_separable
from osteo.data import SliceData, SliceSet
from osteo.manifest import LABELS, split_patients, split_slices
from osteo.models import TwinNet
from osteo.training import ADDED_FIELDS, TrainConfig, TrainResult, network_inputs, train
from osteo.weights import WeightsError
from osteo.windowing import HU_MAX, HU_MIN_S, HU_MIN_T, to_network_input, window

ROOT = Path(__file__).resolve().parents[1]


# --- run keys -------------------------------------------------------------------------------------

def test_keys_of_default_configs_are_unchanged():
    # computed before init, split, report_epoch and window_bits existed
    assert TrainConfig().key() == "21060109ecdb9ca5"
    assert TrainConfig().key("abc") == "1f23f07a5625e98f"
    assert TrainConfig(model="resnet18_acm", inputs=("s",), seed=2, epochs=8, pretrained=False).key("d1") == "7a9ef9cca082eabb"
    assert not set(ADDED_FIELDS) & set(TrainConfig().to_dict())


def test_committed_results_keep_their_config_and_key():
    files = sorted(ROOT.glob("results/*/runs/*/result.json"))
    for f in files:
        saved = json.loads(f.read_text())["config"]
        assert TrainConfig.from_dict(saved).to_dict() == saved, f  # so TrainConfig.key() is the same hash


@pytest.mark.parametrize("field,value", [("init", "shared"), ("init", "imagenet"), ("split", "slice"),
                                         ("report_epoch", "best_on_test"), ("window_bits", 8)])
def test_a_changed_switch_is_recorded_and_changes_the_key(field, value):
    cfg = TrainConfig(**{field: value})
    assert cfg.to_dict()[field] == value
    assert cfg.key() != TrainConfig().key()
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("kw,match", [
    (dict(init="same"), "init must be one of"),
    (dict(init="imagenet", pretrained=False), "contradicts"),
    (dict(model="resnet18", inputs=("t",), init="shared"), "is for the twin"),
    (dict(split="patients"), "split must be 'patient' or 'slice'"),
    (dict(report_epoch="best"), "report_epoch must be"),
    (dict(window_bits=16), "window_bits must be None"),
    (dict(window_bits=8.0000001), "window_bits must be None"),
])
def test_bad_values_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


# --- init: independent, shared, imagenet ---------------------------------------------------------

def _cos(model, hu, views=("s", "s")):
    model.eval()
    with torch.no_grad():
        out = model(to_network_input(hu, views[0]), to_network_input(hu, views[1]))
    return F.cosine_similarity(out.g_s.double(), out.g_t.double(), dim=1).mean().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_start_makes_the_branches_equal(seed):
    hu = make_separable(n_per_class=3, size=64, seed=seed).train.hu.float()
    torch.manual_seed(seed)
    shared = TwinNet(init="shared")
    torch.manual_seed(seed)
    indep = TwinNet(init="independent")
    s_s, s_t = shared.G_s.state_dict(), shared.G_t.state_dict()
    assert s_s.keys() == s_t.keys()
    assert all(torch.equal(s_s[k], s_t[k]) for k in s_s)  # every weight and buffer, ACM modules included
    i_s, i_t = indep.G_s.state_dict(), indep.G_t.state_dict()
    assert not torch.equal(i_s["conv1.weight"], i_t["conv1.weight"])
    assert not any(torch.equal(i_s[k], i_t[k]) for k in i_s if k.endswith("conv1.weight") or k.endswith("conv2.weight"))
    # the same random numbers for everything else: the heads and G_s are those of the independent twin
    assert torch.equal(shared.head_f.weight, indep.head_f.weight) and torch.equal(s_s["conv1.weight"], i_s["conv1.weight"])
    # one view into both branches: identical features (cos 1 up to float64 rounding); independent: unrelated channels
    assert _cos(shared, hu) > 1 - 1e-9
    assert _cos(indep, hu) < 0.9  # measured 0.42-0.51 for seeds 0-2
    assert _cos(shared, hu, ("s", "t")) > 0.95 > _cos(indep, hu, ("s", "t"))  # two windows of one slice: still close


def test_shared_start_stays_shared_only_until_training():
    torch.manual_seed(0)
    m = TwinNet(init="shared")
    with torch.no_grad():
        m.G_s.conv1.weight.add_(1.0)
    assert not torch.equal(m.G_s.conv1.weight, m.G_t.conv1.weight)  # two networks, not one tied one


def test_imagenet_init_needs_the_weights():
    with pytest.raises(ValueError, match="contradicts"):
        TwinNet(init="imagenet", pretrained=False)
    with pytest.raises(WeightsError, match="resnet18-f37072fd.pth: the ImageNet weights for resnet18_acm cannot be had"):
        TwinNet(init="imagenet", pretrained="auto")  # "imagenet" asks for them: no silent fallback
    with pytest.raises(ValueError, match="init must be one of"):
        TwinNet(init="copy")


def test_imagenet_init_loads_both_branches(monkeypatch, tmp_path):
    import hashlib
    import io

    import torchvision

    import osteo.weights as ow

    torch.manual_seed(3)
    sd = torchvision.models.resnet18().state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    wf = ow.WeightsFile(f"https://example.invalid/resnet18-{digest[:8]}.pth")
    ow.cache_dir().mkdir(parents=True, exist_ok=True)
    (ow.cache_dir() / wf.name).write_bytes(buf.getvalue())
    monkeypatch.setitem(ow.WEIGHTS, "resnet18_acm", wf)
    for init in ("imagenet", "shared"):
        m = TwinNet(init=init, pretrained="auto")
        assert m.pretrained_used and m.imagenet_weights == {"file": wf.name, "sha256": digest}
        for branch in (m.G_s, m.G_t):
            assert torch.equal(branch.layer3[0].conv2.weight, sd["layer3.0.conv2.weight"])


def test_init_is_recorded_and_the_cosine_is_in_the_history(tmp_path):
    data = make_separable(n_per_class=4, size=32)
    base = dict(epochs=2, batch_size=9, image_size=32, device="cpu", pretrained=False, seed=0, lam=0.0, inputs=("s", "s"))
    res = {init: train(TrainConfig(init=init, **base), data, out_dir=tmp_path / init, progress=False)
           for init in ("independent", "shared")}
    assert res["shared"].config["init"] == "shared" and "init" not in res["independent"].config
    saved = TrainResult.from_json(tmp_path / "shared" / "result.json")
    assert [h["loss_dis"] for h in saved.history] == [h["loss_dis"] for h in res["shared"].history]
    cos = {k: [h["loss_dis"] for h in r.history] for k, r in res.items()}
    assert all(len(v) == 2 and all(-1 <= c <= 1 for c in v) for v in cos.values())
    start = {k: r.history[0]["cos_start"] for k, r in res.items()}
    assert "cos_start" not in res["shared"].history[1]
    # Table 3's (x_s, x_s) twin before any update: one network twice (identical features) or two unrelated ones
    # (float32 cosine of identical features: measured 1 - cos <= 1.2e-7 over threads, oneDNN and kernel
    # sets; independent: 0.41)
    assert start["shared"] > 1 - 1e-6 and start["independent"] < 0.9
    assert cos["shared"][0] == start["shared"]  # one step per epoch: epoch 1's mean is the start


# --- split by slice --------------------------------------------------------------------------------

def _manifest(n_patients=(8, 7, 9), per_patient=4):
    rows = []
    for lab, n in zip(LABELS, n_patients):
        for p in range(n):
            for s in range(per_patient):
                rows.append({"path": f"/d/{lab}/{p:02d}_{s}.dcm", "label": lab, "patient_id": f"{lab}-{p:02d}"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_slice_split_puts_patients_on_both_sides(seed):
    df = _manifest()
    out = split_slices(df, test_fraction=0.2, seed=seed)
    assert set(out["split"]) == {"train", "test"} and len(out) == len(df)
    sides = out.groupby("patient_id")["split"].nunique()
    assert (sides == 2).sum() >= 5  # most patients with 4 slices have some in test, some in train
    for lab in LABELS:
        n = (df["label"] == lab).sum()
        assert (out.loc[out["label"] == lab, "split"] == "test").sum() == int(np.floor(0.2 * n + 0.5))
    assert out.equals(split_slices(df.sample(frac=1, random_state=seed), 0.2, seed).loc[df.index])  # row order-free
    patient = split_patients(df, 0.2, seed)
    assert (patient.groupby("patient_id")["split"].nunique() == 1).all()  # the honest split: never


def test_slice_split_replaces_a_given_split_and_checks_labels():
    df = split_patients(_manifest(), 0.2, 0)
    out = split_slices(df, 0.25, 3)
    assert (out.groupby("patient_id")["split"].nunique() == 2).any()
    bad = _manifest()
    bad.loc[3, "label"] = "normall"
    with pytest.raises(Exception, match="unknown label 'normall'"):
        split_slices(bad)


def test_train_refuses_data_split_otherwise_than_the_config_says():
    data = make_separable(n_per_class=6, size=32)
    with pytest.raises(ValueError, match="split by patient, but TrainConfig.split is 'slice'"):
        train(TrainConfig(split="slice", epochs=1, image_size=32, device="cpu", pretrained=False), data, progress=False)
    leaky = SliceData(data.train, SliceSet(data.test.hu, data.test.y, [data.train.patient_id[0]] + data.test.patient_id[1:],
                                           data.test.path), 32, source="leaky")
    with pytest.raises(ValueError, match=f"leaky: patient {data.train.patient_id[0]} is in both train and test"):
        train(TrainConfig(epochs=1, image_size=32, device="cpu", pretrained=False), leaky, progress=False)


def test_load_data_by_slice_from_dicom(tmp_path):
    from osteo.data import load_data
    from osteo.synthetic import synthesize

    synthesize(tmp_path / "syn", n_per_class=6, size=32, seed=0, slices_per_patient=3, progress=False)
    honest = load_data(tmp_path / "syn" / "manifest.csv", image_size=32, progress=False)
    leaky = load_data(tmp_path / "syn" / "manifest.csv", image_size=32, progress=False, split="slice")
    assert honest.split == "patient" and leaky.split == "slice"
    assert not set(honest.train.patient_id) & set(honest.test.patient_id)
    assert set(leaky.train.patient_id) & set(leaky.test.patient_id)
    assert len(leaky.train) + len(leaky.test) == len(honest.train) + len(honest.test) == 18
    assert "BY SLICE" in leaky.describe() and "BY SLICE" not in honest.describe()
    with pytest.raises(ValueError, match="split must be 'patient' or 'slice'"):
        load_data(tmp_path / "syn" / "manifest.csv", image_size=32, progress=False, split="random")


# --- best epoch on the test set -------------------------------------------------------------------

def test_best_on_test_reports_the_max_over_epochs(tmp_path):
    data = make_separable(n_per_class=6, size=32, seed=2)
    base = dict(model="resnet18", inputs=("t",), epochs=4, batch_size=8, image_size=32, device="cpu",
                pretrained=False, seed=1, lr=3e-3)
    last = train(TrainConfig(**base), data, progress=False)
    best = train(TrainConfig(report_epoch="best_on_test", **base), data, out_dir=tmp_path / "b", progress=False)
    accs = [h["test_acc"] for h in best.history]
    assert len(accs) == 4 and "test_acc" not in last.history[0]
    # evaluating on the test set does not change training: the same trajectory, the same last epoch
    assert [h["loss_total"] for h in best.history] == [h["loss_total"] for h in last.history]
    assert accs[-1] == last.accuracy and last.reported_epoch == 4
    assert best.accuracy == max(accs) and best.reported_epoch == accs.index(max(accs)) + 1
    y = np.asarray(best.y_true)
    assert np.mean(np.asarray(best.predictions["main"]) == y) == best.accuracy  # metrics and predictions agree
    assert best.config["report_epoch"] == "best_on_test" and "report_epoch" not in last.config
    saved = TrainResult.from_json(tmp_path / "b" / "result.json")
    assert saved.reported_epoch == best.reported_epoch and saved.accuracy == best.accuracy


def test_best_on_test_survives_a_resume(tmp_path):
    from osteo.training import TrainingInterrupted, epoch_batches

    data = make_separable(n_per_class=4, size=32, seed=4)
    cfg = TrainConfig(model="resnet18", inputs=("t",), epochs=3, batch_size=8, image_size=32, device="cpu",
                      pretrained=False, seed=0, report_epoch="best_on_test")
    whole = train(cfg, data, out_dir=tmp_path / "whole", progress=False, checkpoint_every_s=0)
    steps_per_epoch = len(epoch_batches(len(data.train), 8))  # a lone last slice joins the batch before
    with pytest.raises(TrainingInterrupted):
        train(cfg, data, out_dir=tmp_path / "cut", progress=False, checkpoint_every_s=0, stop_after_steps=2 * steps_per_epoch + 1)
    resumed = train(cfg, data, out_dir=tmp_path / "cut", progress=False, checkpoint_every_s=0)
    assert [h["test_acc"] for h in resumed.history] == [h["test_acc"] for h in whole.history]
    assert (resumed.reported_epoch, resumed.accuracy, resumed.predictions) == (whole.reported_epoch, whole.accuracy, whole.predictions)


# --- 8-bit windows ---------------------------------------------------------------------------------

HU_RANGE = np.arange(-2000, 3001)


def _exact_round(hu, hu_min):
    """Eq. (1) rounded half to even, from exact rational arithmetic on integers."""
    span = int(HU_MAX - hu_min)
    num = np.clip((hu.astype(np.int64) - int(hu_min)) * 255, 0, 255 * span)
    q, r = np.divmod(num, span)
    up = (2 * r > span) | ((2 * r == span) & (q % 2 == 1))
    return (q + up).astype(np.float64)


@pytest.mark.parametrize("hu_min", [HU_MIN_S, HU_MIN_T, -1000.0])
def test_8bit_windows_are_round_p_with_256_levels(hu_min):
    ref = _exact_round(HU_RANGE, hu_min)
    for got in (window(HU_RANGE.astype(np.int16), hu_min, bits=8),
                window(torch.from_numpy(HU_RANGE.astype(np.int16)), hu_min, bits=8).numpy(),
                window(HU_RANGE.astype(np.float32), hu_min, bits=8)):
        got = np.asarray(got, dtype=np.float64)
        assert np.array_equal(got, ref)
        assert np.array_equal(np.unique(got), np.arange(256))  # exactly the 256 levels of an 8-bit image
    # and round(p) of the float window, except exactly on the halves, where float p is not exact
    p = window(HU_RANGE, hu_min).astype(np.float64)
    away = np.abs(p - np.floor(p) - 0.5) > 1e-3
    assert np.array_equal(np.rint(p)[away], ref[away])


def test_8bit_halves_round_to_even():
    # HU 64 in x_s: p = 255 * 192 / 1152 = 42.5 exactly
    assert window(np.array([64], np.int16), HU_MIN_S, bits=8)[0] == 42.0
    assert window(torch.tensor([64]), HU_MIN_S, bits=8)[0].item() == 42.0


def test_8bit_network_input_and_config():
    hu = torch.from_numpy(HU_RANGE[:4900].reshape(7, 700, 1).repeat(2, axis=2).astype(np.int16))
    x = to_network_input(hu, "t", bits=8)
    assert all(len(torch.unique(x[:, c])) == 256 for c in range(3))
    assert len(torch.unique(to_network_input(hu, "t")[:, 0])) > 1000
    xs_8 = network_inputs(TrainConfig(window_bits=8), hu)
    xs_f = network_inputs(TrainConfig(), hu)
    assert torch.equal(xs_8[1], x) and not torch.equal(xs_8[1], xs_f[1])
    assert (xs_8[1] - xs_f[1]).abs().max() <= 0.5 / 255 / min(0.229, 0.224, 0.225) + 1e-6  # at most half a level
    with pytest.raises(ValueError, match="bits must be None"):
        window(HU_RANGE, HU_MIN_S, bits=4)


def test_a_checkpoint_of_an_imagenet_start_loads_without_the_weights(tmp_path):
    from osteo.training import CHECKPOINT_FORMAT, load_model, save_checkpoint

    cfg = TrainConfig(init="imagenet", image_size=32, epochs=1)  # a finished run (unfinished ones are refused)
    torch.manual_seed(0)
    net = TwinNet(init="shared")
    save_checkpoint(tmp_path / "c.pt", {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "epoch": 1,
                                        "model": net.state_dict()})
    model, loaded = load_model(tmp_path / "c.pt")  # no ImageNet file here, and none needed
    assert loaded == cfg and loaded.init == "imagenet"
    assert torch.equal(model.G_t.conv1.weight, net.G_t.conv1.weight)


def test_experiments_keep_slice_split_data_and_runs_apart(tmp_path):
    from osteo.experiments import Experiments
    from osteo.synthetic import synthesize

    synthesize(tmp_path / "syn", n_per_class=6, size=32, seed=0, slices_per_patient=3, progress=False)
    exp = Experiments("smoke", results_dir=tmp_path / "results", data_source=str(tmp_path / "syn" / "manifest.csv"),
                      progress=False)
    honest, leaky = exp.config(), exp.config(split="slice")
    assert exp.data(honest.image_size).split == "patient" and exp.data(leaky.image_size, "slice").split == "slice"
    assert exp.run_dir(honest) != exp.run_dir(leaky)
    assert exp.run_dir(honest).name == honest.key(exp._ids[honest.image_size])  # the key of the honest data as before
