"""Several runs trained as one batched network (osteo.batched) end as their separate runs.

In float64 on the CPU. vmap orders a few sums differently from a single network (the heads'
matmuls, batch norm's backward): one step's loss terms agree exactly and gradients to ~1e-15 of
each tensor's scale (measured), except the ACM key/query biases, whose gradient is zero in exact
arithmetic (a constant added to the logits of a softmax over positions) and rounding noise
(~1e-17) in any run. Adam amplifies gradient roundings where a gradient is near its eps, and batch
norm over the 2-slice last batch amplifies them too (docs/design.md, section 3): after the six
steps here the weights of the two paths differ by up to 4e-4 of a tensor's scale (measured); like
the grouped engine's test, a whole run is therefore compared by its history, alpha, predictions and
metrics, and the weights after one step.
"""
import json

import pytest
import torch

import osteo
from osteo.batched import batch_key, train_batched
from osteo.training import TrainConfig, TrainingInterrupted, load_checkpoint
from conftest import make_separable

BASE = dict(epochs=2, batch_size=8, image_size=32, pretrained=False, device="cpu")


@pytest.fixture(scope="module")
def tiny():
    return make_separable(n_per_class=8)  # 18 training slices: batches of 8, 8 and 2 (epoch_batches)


@pytest.fixture
def float64(monkeypatch):
    """Float64 networks and views, so the two code paths are compared without float32 rounding."""
    import osteo.training as T

    plain_model, plain_inputs = T.make_model, T.network_inputs
    monkeypatch.setattr(T, "make_model", lambda cfg: plain_model(cfg).double())
    monkeypatch.setattr(T, "network_inputs", lambda cfg, hu: [x.double() for x in plain_inputs(cfg, hu)])
    import osteo.batched as B
    monkeypatch.setattr(B, "network_inputs", T.network_inputs)


def _assert_same_weights(a: dict, b: dict, tol: float):
    """Every tensor within ``tol`` of its scale; the ACM key/query biases (no gradient in exact arithmetic) left out."""
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("acm.kq.bias"):
            continue
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=tol * max(float(a[k].abs().max()), 1e-12), msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def _assert_same_result(ra: dict, rb: dict):
    assert ra["config"] == rb["config"]
    assert ra["predictions"] == rb["predictions"] and ra["y_true"] == rb["y_true"]
    assert ra["test"] == rb["test"]  # computed from the predictions alone
    assert len(ra["history"]) == len(rb["history"])
    for ha, hb in zip(ra["history"], rb["history"]):
        assert ha.keys() == hb.keys()
        # epoch 1: float32 means of float64 terms, rel 1e-6 is a few float32 roundings; later epochs
        # follow weights that Adam moved apart (see above): measured <= 1e-5, tolerance 1e-4
        rel = 1e-6 if ha["epoch"] == 1 else 1e-4
        for k in ha:
            assert hb[k] == pytest.approx(ha[k], rel=rel, abs=1e-9), (ha["epoch"], k)
    if ra["alpha"] is None:  # a single network
        assert rb["alpha"] is None
    else:  # float64, after Adam moved the weights apart: measured 7e-8 relative, tolerance 1e-6
        assert rb["alpha"] == pytest.approx(ra["alpha"], rel=1e-6)


MEMBERS = {
    "twin": [dict(seed=1, lam=0.1), dict(seed=2, lam=0.5, lr=3e-3)],
    "resnet18_acm": [dict(model="resnet18_acm", inputs=("t",), seed=4), dict(model="resnet18_acm", inputs=("s",), seed=5, acm_weight=0.0)],
}


@pytest.mark.parametrize("kind", list(MEMBERS))
def test_batched_members_equal_their_separate_runs(kind, tiny, float64, tmp_path):
    cfgs = [TrainConfig(**BASE, **m) for m in MEMBERS[kind]]
    dirs = [tmp_path / f"b{i}" for i in range(len(cfgs))]
    got = train_batched(cfgs, tiny, dirs, progress=False, checkpoint_every_s=0)
    for i, cfg in enumerate(cfgs):
        ref = osteo.train(cfg, tiny, tmp_path / f"s{i}", progress=False, checkpoint_every_s=0)
        _assert_same_result(ref.__dict__, got[i].__dict__)
        a = json.loads((tmp_path / f"s{i}" / "result.json").read_text())
        b = json.loads((dirs[i] / "result.json").read_text())
        _assert_same_result(a, b)
        assert load_checkpoint(dirs[i] / "checkpoint.pt")["config"] == cfg.to_dict()
    assert {r.engine for r in got} == {f"batched x{len(cfgs)}"}
    assert got[0].history[-1]["loss_total"] < got[0].history[0]["loss_total"]  # it does learn
    # the members did train differently (not one run copied N times)
    assert got[0].history[-1]["loss_total"] != got[1].history[-1]["loss_total"]


def test_killed_batched_run_resumes_to_the_same_end(tiny, float64, tmp_path):
    """Killed in epoch 2 (after epoch 1's checkpoints), the batched run resumes every member from its
    own checkpoint and ends bit for bit where an uninterrupted batched run ends."""
    cfgs = [TrainConfig(**BASE, seed=1, lam=0.1), TrainConfig(**BASE, seed=2, lam=0.5)]
    whole = [tmp_path / f"w{i}" for i in range(2)]
    cut = [tmp_path / f"c{i}" for i in range(2)]
    ref = train_batched(cfgs, tiny, whole, progress=False, checkpoint_every_s=0)
    with pytest.raises(TrainingInterrupted):
        train_batched(cfgs, tiny, cut, progress=False, checkpoint_every_s=0, stop_after_steps=4)  # 3 steps an epoch
    for d in cut:
        assert load_checkpoint(d / "checkpoint.pt")["epoch"] == 1 and not (d / "result.json").exists()
    got = train_batched(cfgs, tiny, cut, progress=False, checkpoint_every_s=0)
    for i in range(2):
        a, b = load_checkpoint(whole[i] / "checkpoint.pt")["model"], load_checkpoint(cut[i] / "checkpoint.pt")["model"]
        for k in a:
            assert torch.equal(a[k], b[k]), k
        assert got[i].history == ref[i].history and got[i].predictions == ref[i].predictions
        assert got[i].test == ref[i].test
    again = train_batched(cfgs, tiny, cut, progress=False)  # finished: the saved results, nothing trained
    assert [r.history for r in again] == [r.history for r in got]


def test_members_in_different_states_train_together(tiny, float64, tmp_path, monkeypatch):
    """One member finished, one killed after its first epoch, one new: the finished one is not
    trained again, the killed one waits for the others to reach its epoch, and both end with the
    results of their separate runs."""
    done, cut, new = (TrainConfig(**BASE, seed=s, lam=0.1 * s) for s in (1, 2, 3))
    dirs = [tmp_path / n for n in ("done", "cut", "new")]
    first = osteo.train(done, tiny, dirs[0], progress=False)
    with pytest.raises(TrainingInterrupted):
        osteo.train(cut, tiny, dirs[1], progress=False, checkpoint_every_s=0, stop_after_steps=4)
    assert load_checkpoint(dirs[1] / "checkpoint.pt")["epoch"] == 1
    calls = []
    import osteo.batched as B
    plain_epoch = B._batched_epoch

    def spy(runs, epoch, *a, **k):
        calls.append((epoch, [r.cfg.seed for r in runs]))
        return plain_epoch(runs, epoch, *a, **k)

    monkeypatch.setattr(B, "_batched_epoch", spy)
    got = train_batched([done, cut, new], tiny, dirs, progress=False, checkpoint_every_s=0)
    assert calls == [(0, [3]), (1, [2, 3])]  # the finished run is not trained, the killed one waits
    assert got[0].history == first.history and got[0].predictions == first.predictions
    for i, cfg in ((1, cut), (2, new)):
        ref = osteo.train(cfg, tiny, tmp_path / f"separate{i}", progress=False)
        _assert_same_result(ref.__dict__, got[i].__dict__)


def test_members_must_share_the_batch_keys():
    a = TrainConfig(**BASE, seed=1)
    assert batch_key(a) == batch_key(TrainConfig(**BASE, seed=2, lam=0.5, lr=1e-2))
    with pytest.raises(ValueError, match="differ in epochs"):
        train_batched([a, TrainConfig(**{**BASE, "epochs": 3}, seed=2)], None)
    with pytest.raises(ValueError, match="differ in model"):
        train_batched([a, TrainConfig(**BASE, model="resnet18_acm", inputs=("t",))], None)
    with pytest.raises(ValueError, match="the same config twice"):
        train_batched([a, TrainConfig(**BASE, seed=1)], None)
    with pytest.raises(ValueError, match="share one out_dir"):
        train_batched([a, TrainConfig(**BASE, seed=2)], None, ["x", "./x"])
    with pytest.raises(ValueError, match="no configs"):
        train_batched([], None)


@pytest.mark.parametrize("batch", [8, 2])
@pytest.mark.parametrize("kind", list(MEMBERS))
def test_one_batched_step_is_each_members_step(kind, batch, tiny, float64):
    """One optimisation step: each member's loss terms, gradients, Adam update and batch-norm statistics
    equal those of its own separate step (its own network, optimiser and config, weight decay included).

    Tolerances from benchmark-style measurements in float64 (1 and 2 threads): the two paths differ only
    in how vmap orders a few sums (the heads' matmuls, batch norm's backward), so loss terms and batch-norm
    statistics agree exactly (tolerance 1e-14) and gradients to <= 2.3e-15 of each tensor's largest
    (batch 8) or 6.3e-15 (batch 2: batch norm over 2 slices and 1x1 maps amplifies rounding;
    tolerance 1e-12, room for other CPUs' summation orders). A feature map that ACM read in a
    different layout under vmap, and so summed in a different order, gave 3e-14 (batch 8) and
    1.7e-10 (batch 2) here: the batch-2 cases catch that. The ACM key/query biases have no gradient
    in exact arithmetic (a constant added to softmax logits): theirs is rounding noise in both paths
    (<= 6e-18 apart, tolerance 1e-13 of the model's largest gradient).
    Adam's first step is ``lr * g / (|g| + eps)`` (``g`` the gradient plus ``weight_decay * w``): a
    gradient error ``d`` moves it by at most ``lr * eps * d / (|g| + eps)**2``, largest where |g| is
    near eps (weight decay can cancel a gradient down to that: measured 7e-13 on such a weight), so
    every weight is held to that bound plus 4 roundings of its tensor's scale (measured without weight
    decay: <= 1e-15 of max(1, scale) where |g| > 1e-6)."""
    import osteo.training as T
    from osteo.batched import _BatchedStep

    members = [dict(m) for m in MEMBERS[kind]]
    members[-1]["weight_decay"] = 1e-4  # the member's own optimiser settings take part
    cfgs = [TrainConfig(**BASE, **m) for m in members]
    runs = [T._start_run(c, torch.device("cpu")) for c in cfgs]
    refs = [T._start_run(c, torch.device("cpu")) for c in cfgs]  # the separate runs: same seed, same weights
    g = torch.Generator().manual_seed(0)
    idx = [torch.randperm(len(tiny.train), generator=g)[:batch] for _ in cfgs]
    hus, ys = [tiny.train.hu[i] for i in idx], [tiny.train.y[i] for i in idx]
    for r in runs + refs:
        r.model.train()
    _, terms = _BatchedStep(runs, amp=False)(hus, ys)
    for r, ref, hu, y, t in zip(runs, refs, hus, ys, terms):
        m, c = ref.model, ref.cfg
        before = {k: p.detach().clone() for k, p in m.named_parameters()}
        _, want = T.train_step(m, c, ref.opt, hu, y, amp=False)
        assert want.keys() == t.keys()
        for k in want:
            assert float(t[k].detach()) == pytest.approx(float(want[k].detach()), rel=1e-14, abs=0), k
        got = dict(r.model.named_parameters())
        largest = max(float(p.grad.abs().max()) for p in m.parameters())
        eps = ref.opt.param_groups[0]["eps"]
        for k, p in m.named_parameters():
            scale = largest if k.endswith("acm.kq.bias") else float(p.grad.abs().max())
            # measured on one CPU (1-2 threads): gradients to 6.3e-15 of their scale (batch of 2), key/query
            # biases to ~1e-17; the wrong ACM branch gave 1.7e-10 at a batch of 2. Bounds with room for
            # other CPUs' summation orders, still far below that:
            d = (1e-13 if k.endswith("acm.kq.bias") else 1e-12) * scale
            torch.testing.assert_close(got[k].grad, p.grad, rtol=0, atol=d, msg=k)
            assert not torch.equal(p.detach(), before[k]) or not p.grad.any(), k  # Adam did move it
            adam_grad = p.grad + c.weight_decay * before[k]  # what Adam divides: weight decay can cancel it to ~eps
            bound = c.lr * eps * d / (adam_grad.abs() + eps) ** 2 + 4 * 2.0 ** -52 * max(1.0, float(p.abs().max()))
            assert ((got[k] - p).abs() <= bound).all(), (k, float((got[k] - p).abs().max()))
        bufs = dict(r.model.named_buffers())
        for k, b in m.named_buffers():  # batch-norm statistics (unbiased running variance, momentum), counters
            if b.is_floating_point():
                torch.testing.assert_close(bufs[k], b, rtol=0, atol=1e-14 * max(float(b.abs().max()), 1e-300), msg=k)
            else:
                assert torch.equal(bufs[k], b), k
            assert bufs[k].dtype == b.dtype, k  # nothing falls back to float32
        moved = [k for k, v in m.state_dict().items() if "running_mean" in k and float(v.abs().max()) > 0]
        assert moved  # the statistics did update (and were compared above)


def test_grid_batch_runs_trains_groups_with_the_separate_runs_results(tmp_path, float64, monkeypatch):
    """``Experiments.grid(batch_runs=N)`` (``osteo grid --batch-runs N``): the missing runs of a table
    train in groups of up to N that share a network, each writing the result its own run gives."""
    import osteo.batched as B
    from osteo.experiments import Experiments
    from test_experiments import TINY

    groups = []
    plain = B.train_batched

    def spy(cfgs, data, out_dirs=None, **kw):
        groups.append([c.model for c in cfgs])
        return plain(cfgs, data, out_dirs, **kw)

    monkeypatch.setattr(B, "train_batched", spy)
    kw = dict(seeds=[0, 1], data_dir=tmp_path / "data", progress=False)
    batched = Experiments(TINY, results_dir=tmp_path / "b", **kw)
    with pytest.raises(ValueError, match="batch_runs must be an integer >= 1"):
        batched.grid(["table2"], batch_runs=0)
    got = batched.grid(["table2"], batch_runs=3)
    # table 2 on 2 seeds: 4 ResNet18+ACM runs (x_s, x_t) and 4 twins, in groups of at most 3
    assert sorted(groups) == sorted([["resnet18_acm"] * 3, ["resnet18_acm"], ["twin"] * 3, ["twin"]])
    assert batched.missing(["table2"]) == []
    separate = Experiments(TINY, results_dir=tmp_path / "s", **kw)
    want = separate.grid(["table2"])
    assert len(got) == len(want) == 8
    for a, b in zip(want, got):
        assert a.config == b.config and a.predictions == b.predictions and a.test == b.test
    batched.grid(["table2"], batch_runs=3)
    assert len(groups) == 4  # all cached: nothing trains again
