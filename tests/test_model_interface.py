"""The one model interface: a network the kit has never seen, registered in the model registry,
trains, evaluates, resumes, saves and loads its checkpoint, predicts and draws Grad-CAM maps
through the same code paths as the twin, with no other change anywhere."""
import csv
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import osteo.models as M
from osteo.acm import ACM
from osteo.losses import model_loss
from osteo.predict import gradcam_panels, predict_files
from osteo.training import TrainConfig, TrainingInterrupted, evaluate, forward_heads, load_model, train
from test_dicom import RAW, make_ct, save


class _Backbone(nn.Module):
    """A tiny conv net with an ACM: pooled 8-d feature and the ACM term."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.acm = ACM(8, groups=2)
        self.last = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x, dp = self.acm(F.relu(self.bn(self.conv(x))))
        x = F.relu(self.last(x))
        return x.mean(dim=(2, 3)), dp


class Triple(nn.Module):
    """Three backbones on three views, a head each and a head on their mean (the prediction)."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.nets = nn.ModuleList(_Backbone() for _ in range(3))
        self.heads = nn.ModuleList(nn.Linear(8, num_classes) for _ in range(4))

    def forward(self, a, b, c):
        feats, dps = zip(*(net(x) for net, x in zip(self.nets, (a, b, c))))
        logits = {name: head(g) for name, head, g in zip("abc", self.heads, feats)}
        logits["f"] = self.heads[3](torch.stack(feats).mean(0))
        return M.ModelOutput(logits, {f"g_{n}": g for n, g in zip("abc", feats)}, {"acm": sum(dps)}, main="f")


TRIPLE = M.ModelSpec(
    name="triple", n_inputs=3, main_head="f", default_inputs=("s", "t", "s"),
    build=lambda cfg: Triple(cfg.num_classes),
    forward=lambda model, a, b, c: model(a, b, c),
    gradcam=lambda model: [(i, net.last, h) for i, (net, h) in enumerate(zip(model.nets, "abc"))],
)


@pytest.fixture
def triple(monkeypatch):
    monkeypatch.setitem(M.MODELS, "triple", TRIPLE)
    return TRIPLE


def _cfg(**kw):
    return TrainConfig(**{**dict(model="triple", inputs=("s", "t", "s"), epochs=2, batch_size=8, image_size=32,
                                 pretrained=False, device="cpu"), **kw})


def test_registry_knows_every_network_and_is_the_only_place_that_names_them():
    assert set(M.MODEL_NAMES) | {"twin"} == set(M.MODELS)
    assert M.model_spec("twin").n_inputs == 2 and M.model_spec("twin").main_head == "f"
    assert all(M.model_spec(n).n_inputs == 1 for n in M.MODEL_NAMES)
    with pytest.raises(ValueError, match="unknown model 'nope'.*twin"):
        M.model_spec("nope")
    with pytest.raises(ValueError, match="already registered"):
        M.register_model(M.model_spec("twin"))


def test_a_registered_network_is_a_config(triple):
    assert _cfg().inputs == ("s", "t", "s")
    with pytest.raises(ValueError, match="reads 3 input"):
        _cfg(inputs=("s", "t"))
    with pytest.raises(ValueError, match="init"):
        _cfg(init="shared")  # the toy network does not read init


def test_loss_of_a_new_network_pairs_its_features(triple):
    torch.manual_seed(0)
    model = Triple().double()
    xs = [torch.randn(4, 3, 16, 16, dtype=torch.float64) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 0])
    out = triple.run(model, xs)
    terms = model_loss(out, y, lam=0.5, acm_weight=0.2)
    assert list(terms) == ["ce_a", "ce_b", "ce_c", "ce_f", "dis", "total", "acm"]
    g = list(out.features.values())
    cos = [F.cosine_similarity(g[i], g[j], dim=1).mean() for i, j in ((0, 1), (0, 2), (1, 2))]
    torch.testing.assert_close(terms["dis"], sum(cos) / 3, rtol=1e-12, atol=1e-15)
    ce = sum(F.cross_entropy(out.logits[h], y) for h in "abcf")
    torch.testing.assert_close(terms["total"], ce + 0.5 * terms["dis"] + 0.2 * out.aux["acm"].mean().abs(),
                               rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="reads 3 input"):
        triple.run(model, xs[:2])


def test_new_network_trains_resumes_evaluates_and_loads(triple, separable, tmp_path):
    cfg = _cfg()
    with pytest.raises(TrainingInterrupted):
        train(cfg, separable, out_dir=tmp_path, progress=False, stop_after_steps=len(separable.train) // 8 + 1,
              checkpoint_every_s=0)
    res = train(cfg, separable, out_dir=tmp_path, progress=False, checkpoint_every_s=0)  # resumes after epoch 1
    fresh = train(cfg, separable, progress=False)
    assert res.history == [{k: v for k, v in h.items()} for h in fresh.history]
    assert res.main_head == "f" and res.alpha is None
    assert list(res.test) == ["f", "a", "b", "c"]
    rec = res.history[0]
    for k in ("loss_ce_a", "loss_ce_f", "loss_dis", "loss_total", "loss_acm", "cos_start"):
        assert k in rec and rec[k] == rec[k], k  # present and not NaN
    assert rec["loss_acm"] > 0
    model, cfg2 = load_model(tmp_path / "checkpoint.pt")
    assert cfg2 == cfg and isinstance(model, Triple)
    metrics, preds = evaluate(model, cfg2, separable.test)
    assert preds == res.predictions and metrics == res.test
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["config"]["model"] == "triple"


def test_new_network_predicts_and_draws_gradcam(triple, separable, tmp_path):
    cfg = _cfg(epochs=1)
    train(cfg, separable, out_dir=tmp_path / "run", progress=False)
    (tmp_path / "in").mkdir()
    files = [save(make_ct(RAW + k), tmp_path / "in" / f"s{k}.dcm") for k in range(2)]
    rc = predict_files(tmp_path / "run" / "checkpoint.pt", files, out_csv=tmp_path / "p.csv",
                       gradcam_dir=tmp_path / "cams", progress=False)
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(r["heads_agree"] in ("True", "False") and r["alpha"] == "" for r in rows)
    assert len(list((tmp_path / "cams").glob("*.png"))) == 2
    model, cfg = load_model(tmp_path / "run" / "checkpoint.pt")
    hu = separable.test.hu[:1]
    panels = gradcam_panels(model, cfg, hu, target=1)
    assert [(t, v) for t, v, _ in panels] == [("G_a on x_s", "s"), ("G_b on x_t", "t"), ("G_c on x_s", "s")]
    for _, _, cam in panels:
        assert cam.shape == (1, 32, 32) and 0 <= float(cam.min()) and float(cam.max()) <= 1
    with torch.no_grad():
        out = forward_heads(model, cfg, hu)
    assert out.main == "f" and set(out.logits) == {"a", "b", "c", "f"}
