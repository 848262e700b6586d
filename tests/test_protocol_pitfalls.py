"""Measuring the pitfalls: the unpaired comparison of two test sets, a pitfall's row (paired on the
same test slices, unpaired otherwise), the patient pool both splits share out, and the cosine figure."""
import math

import numpy as np
import pandas as pd
import pytest

from osteo.metrics import accuracy_ci, compare, compare_unpaired
from osteo.pitfalls import leak_share, patient_pool, pitfall_row, same_test_set
from osteo.training import TrainConfig, TrainResult


def _set(n_per_class, acc_per_class, seed, slices=1, prefix="p"):
    """A test set with one (or ``slices`` identical-outcome) slice(s) per patient and the given accuracy per class."""
    rng = np.random.default_rng(seed)
    y, pred, groups = [], [], []
    for c, (n, a) in enumerate(zip(n_per_class, acc_per_class)):
        right = rng.permutation(np.arange(n) < round(a * n))
        for i in range(n):
            for _ in range(slices):
                y.append(c)
                pred.append(c if right[i] else (c + 1) % 3)
                groups.append(f"{prefix}{c}-{i}")
    return np.array(y), np.array(pred), groups


def test_all_right_against_all_wrong():
    ya, pa, ga = _set((20, 20, 20), (1, 1, 1), 0)
    yb, pb, gb = _set((15, 15, 15), (0, 0, 0), 1)
    c = compare_unpaired(ya, pa, ga, yb, pb, gb, n_resamples=2000)
    assert (c.diff, c.lo, c.hi) == (1.0, 1.0, 1.0)
    assert c.p == pytest.approx(1 / 2001)  # no deal of the pooled patients is as extreme, but the observed one


def test_swapping_a_and_b_negates_exactly_and_ids_and_order_do_not_matter():
    ya, pa, ga = _set((30, 25, 35), (0.7, 0.5, 0.6), 2)
    yb, pb, gb = _set((28, 30, 31), (0.6, 0.4, 0.5), 3)
    ab = compare_unpaired(ya, pa, ga, yb, pb, gb, n_resamples=4000)
    ba = compare_unpaired(yb, pb, gb, ya, pa, ga, n_resamples=4000)
    assert (ba.diff, ba.lo, ba.hi, ba.p) == (-ab.diff, -ab.hi, -ab.lo, ab.p)
    perm = np.random.default_rng(0).permutation(len(ya))
    renamed = [f"x{g}" for g in np.asarray(ga)[perm]]
    again = compare_unpaired(ya[perm], pa[perm], renamed, yb, pb, gb, n_resamples=4000)
    assert again == ab
    assert ab.diff == pytest.approx(np.mean(pa == ya) - np.mean(pb == yb), abs=1e-15)


def test_interval_matches_the_variance_of_two_independent_stratified_samples():
    n = (200, 200, 200)
    ya, pa, ga = _set(n, (0.8, 0.5, 0.65), 4)
    yb, pb, gb = _set(n, (0.6, 0.55, 0.5), 5)

    def var(y, p):  # stratified by class, one slice per patient: sum over classes of w^2 p(1-p)/n_c
        return sum((1 / 3) ** 2 * np.mean(p[y == c] == c) * (1 - np.mean(p[y == c] == c)) / 200 for c in range(3))

    half = 1.959964 * math.sqrt(var(ya, pa) + var(yb, pb))
    c = compare_unpaired(ya, pa, ga, yb, pb, gb)
    # 600 patients per set: the bootstrap distribution is close to normal; its percentile ends match the
    # normal ones to within 3 % of the half-width (measured: within 1.6 % for bootstrap seeds 0-4)
    assert (c.hi - c.lo) / 2 == pytest.approx(half, rel=0.03)
    assert c.lo < c.diff < c.hi
    # and it is wider than the paired test would be on one set: the sets share nothing
    assert c.p < 0.05 and c.lo > 0  # diff 0.10 against SD ~0.025


def test_patients_not_slices_are_the_unit():
    ya, pa, ga = _set((20, 20, 20), (0.7, 0.5, 0.6), 6, slices=5)
    yb, pb, gb = _set((20, 20, 20), (0.5, 0.5, 0.5), 7, slices=5)
    clustered = compare_unpaired(ya, pa, ga, yb, pb, gb, n_resamples=8000)
    as_slices = compare_unpaired(ya, pa, np.arange(len(ya)), yb, pb, np.arange(len(yb)), n_resamples=8000)
    assert clustered.diff == pytest.approx(as_slices.diff)
    ratio = (clustered.hi - clustered.lo) / (as_slices.hi - as_slices.lo)
    assert ratio == pytest.approx(math.sqrt(5), rel=0.15)  # 5 identical slices per patient: variance x5 (measured 0.95-1.03 x sqrt 5, seeds 0-4)
    assert clustered.p > as_slices.p


def test_permutation_p_of_a_tiny_case_is_the_exact_one():
    # one class, A: 3 patients right, B: 3 wrong. Dealing 6 patients 3/3: only the 2 deals that keep all
    # the right ones together are as extreme, of C(6, 3) = 20: p = 0.1
    c = compare_unpaired([0, 0, 0], [0, 0, 0], ["a", "b", "c"], [0, 0, 0], [1, 1, 1], ["d", "e", "f"], n_resamples=40_000)
    assert c.p == pytest.approx(0.1, abs=0.006)  # Monte Carlo SD sqrt(0.1 * 0.9 / 40000) = 0.0015


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="groups has 2 entries"):
        compare_unpaired([0, 1, 2], [0, 1, 2], ["a", "b"], [0], [0], ["c"])
    with pytest.raises(ValueError, match="empty"):
        compare_unpaired([], [], [], [0], [0], ["c"])


def _result(y, pred, groups, twin=False, history=None, **config):
    head = "f" if twin else "main"
    cfg = TrainConfig(**({} if twin else {"model": "resnet18_acm", "inputs": ("t",)}), **config).to_dict()
    return TrainResult(config=cfg, history=history or [], test={head: {"accuracy": float(np.mean(np.asarray(pred) == y))}},
                       main_head=head, y_true=[int(v) for v in y], predictions={head: [int(v) for v in pred]},
                       alpha=None, pretrained_used=False, device="cpu", seconds=0.0, test_patient_id=list(groups))


def test_pitfall_row_is_paired_on_the_same_test_set_and_unpaired_otherwise():
    y, honest_pred, g = _set((40, 40, 40), (0.6, 0.5, 0.55), 8)
    better = honest_pred.copy()
    wrong = np.flatnonzero(better != y)[:12]
    better[wrong] = y[wrong]  # the pitfall run: right on 12 more patients, the same elsewhere
    honest = _result(y, honest_pred, g)
    pit = _result(y, better, g, report_epoch="best_on_test")
    row = pitfall_row("best epoch", honest, pit)
    c = compare(y, better, honest_pred, g)
    assert row["test"] == "paired over the same patients" and same_test_set(honest, pit)
    assert row["diff"] == pytest.approx(10.0) == pytest.approx(100 * c.diff)
    assert (row["ci95_low"], row["p_value"]) == (round(100 * c.lo, 2), round(c.p, 4))
    assert row["shown"] == "yes" and row["honest_patients"] == row["pitfall_patients"] == 120
    acc, lo, hi = accuracy_ci(y, better, g)
    assert row["pitfall_acc"] == round(100 * acc, 2) and row["pitfall_ci95"] == f"{100 * lo:.1f}-{100 * hi:.1f}"
    # the other way round: lower, and shown as such
    assert pitfall_row("x", pit, honest)["shown"] == "no: lower"

    y2, p2, g2 = _set((30, 30, 30), (0.9, 0.8, 0.85), 9, prefix="q")
    other = _result(y2, p2, g2, split="slice")
    row = pitfall_row("split by slice", honest, other)
    u = compare_unpaired(y2, p2, g2, y, honest_pred, g)
    assert row["test"] == "unpaired: different test sets" and not same_test_set(honest, other)
    assert (row["diff"], row["ci95_low"], row["ci95_high"]) == (round(100 * u.diff, 2), round(100 * u.lo, 2), round(100 * u.hi, 2))


def test_pitfall_row_refuses_runs_without_patients():
    y, p, g = _set((5, 5, 5), (0.6, 0.6, 0.6), 10)
    blind = _result(y, p, g)
    blind.test_patient_id = []
    with pytest.raises(ValueError, match="does not know its test patients"):
        pitfall_row("x", blind, _result(y, p, g))


def test_patient_pool_shares_the_training_patients_by_patient_or_by_slice(tmp_path):
    from osteo.experiments import Experiments
    from osteo.synthetic import synthesize

    synthesize(tmp_path / "syn", n_per_class=12, size=32, seed=0, slices_per_patient=3, progress=False)
    exp = Experiments("smoke", results_dir=tmp_path / "results", data_source=str(tmp_path / "syn" / "manifest.csv"),
                      data_dir=tmp_path / "data", progress=False)
    pool = patient_pool(exp)
    man = pool.manifest()
    assert man.is_relative_to(tmp_path / "data" / "patient-pool")
    text = man.read_text()
    assert "split" not in pd.read_csv(man).columns and str(tmp_path) not in text  # relative paths
    full = pd.read_csv(tmp_path / "syn" / "manifest.csv")
    train_paths = {p for p in full.loc[full["split"] == "train", "path"]}
    honest, leaky = pool.data(32, "patient"), pool.data(32, "slice")
    for d in (honest, leaky):
        paths = {str(p) for p in d.train.path + d.test.path}
        assert len(paths) == len(train_paths) and all(any(p.endswith(t) for p in paths) for t in train_paths)
    assert abs(len(honest.train) - len(leaky.train)) <= 3  # the same slices to share out, nearly the same split sizes
    assert leak_share(honest)[0] == 0 and leak_share(leaky)[0] > 0
    mtime = man.stat().st_mtime_ns
    assert patient_pool(exp).manifest() == man and man.stat().st_mtime_ns == mtime  # not rewritten when unchanged


def test_cosine_curves_plot_the_start_and_every_epoch():
    from osteo import plots

    hist = [{"epoch": 1, "loss_dis": 0.5, "cos_start": 0.99}, {"epoch": 2, "loss_dis": 0.2}]
    y, p, g = _set((2, 2, 2), (1, 1, 1), 11)
    r = _result(y, p, g, twin=True, history=hist)
    r2 = _result(y, p, g, twin=True, history=[dict(hist[0], loss_dis=0.3, cos_start=0.97), dict(hist[1], loss_dis=0.0)])
    fig = plots.cosine_curves({"shared": [r, r2], "one": r})
    lines = {ln.get_label(): ln.get_ydata() for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")}
    assert np.allclose(lines["shared"], [0.98, 0.4, 0.1]) and np.allclose(lines["one"], [0.99, 0.5, 0.2])
    old = [_result(y, p, g, twin=True, history=[{"epoch": 1, "loss_dis": 0.4}, {"epoch": 2, "loss_dis": 0.1}]) for _ in range(2)]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # runs without cos_start: no "mean of empty slice" warning
        fig = plots.cosine_curves({"Ours, independent": old, "Ours, shared": r, "other, shared": r2})
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")}
    assert np.isnan(lines["Ours, independent"].get_ydata()[0]) and np.allclose(lines["Ours, independent"].get_ydata()[1:], [0.4, 0.1])
    assert lines["Ours, independent"].get_color() == lines["Ours, shared"].get_color() != lines["other, shared"].get_color()
    assert lines["Ours, shared"].get_linestyle() == "--" and lines["Ours, independent"].get_linestyle() == "-"
    single = _result(y, p, g)
    with pytest.raises(ValueError, match="only the twin"):
        plots.cosine_curves({"x": single})
    with pytest.raises(ValueError, match="at least one run"):
        plots.cosine_curves({})
