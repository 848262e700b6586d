"""Patient-level uncertainty: the cluster bootstrap, the paired test and the design effect, checked
against references (Wilson, statsmodels' exact McNemar, scikit-learn) and against the properties
any honest interval must have (no shrinking when slices are repeated, no dependence on ids)."""
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, f1_score
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

import osteo
from osteo import metrics as M


def _clustered(n_patients=180, m=5, acc=0.7, rho_flip=0.1, seed=0, per_class=None):
    """A test set of n_patients x m slices: each patient is right or wrong as a whole, then each
    slice flips with probability rho_flip (slices of one patient strongly correlated)."""
    rng = np.random.default_rng(seed)
    y_pat = np.repeat(np.arange(3), -(-n_patients // 3))[:n_patients]
    accs = np.full(3, acc) if per_class is None else np.asarray(per_class)
    right_pat = rng.random(n_patients) < accs[y_pat]
    g = np.repeat(np.arange(n_patients), m)
    y = y_pat[g]
    right = right_pat[g] ^ (rng.random(g.size) < rho_flip)
    wrong_to = (y + rng.integers(1, 3, g.size)) % 3
    return y, np.where(right, y, wrong_to), g


# ---- reference checks ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_slice_per_patient_agrees_with_wilson(seed):
    # equal per-class accuracy: stratifying by class removes nothing, so the bootstrap of
    # independent slices estimates the binomial interval; it differs from Wilson by the bootstrap's
    # Monte-Carlo error (~0.1 point) plus the sqrt((n-1)/n) of a percentile bootstrap and Wilson's
    # skew (< 0.3 point at n = 900): 0.6 point is the sampling error allowed
    y, p, g = _clustered(900, 1, acc=0.72, rho_flip=0.0, seed=seed)
    acc, lo, hi = osteo.accuracy_ci(y, p, g)
    wl, wh = M.wilson_interval(int((y == p).sum()), y.size)
    assert acc == pytest.approx((y == p).mean())
    assert abs(lo - wl) < 0.006 and abs(hi - wh) < 0.006
    half = (hi - lo) / 2
    assert half == pytest.approx((wh - wl) / 2, rel=0.06)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_repeating_each_slice_within_its_patient_does_not_shrink_the_interval(k):
    y, p, g = _clustered(150, 1, seed=3)
    base = osteo.accuracy_ci(y, p, g, seed=7)
    rep = osteo.accuracy_ci(np.repeat(y, k), np.repeat(p, k), np.repeat(g, k), seed=7)
    assert rep == pytest.approx(base, abs=1e-12)  # the same resamples: identical, not narrower
    wl, wh = M.wilson_interval(int(k * (y == p).sum()), k * y.size)
    assert wh - wl < (base[2] - base[1]) / np.sqrt(k) * 1.2  # where Wilson, counting slices, shrinks by sqrt(k)
    assert M.design_effect(np.repeat(y, k), np.repeat(p, k), np.repeat(g, k))["deff"] == pytest.approx(k, rel=0.02)


@pytest.mark.parametrize("seed", range(6))
def test_paired_test_on_independent_slices_is_exact_mcnemar(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    y = rng.integers(0, 3, n)
    pa = np.where(rng.random(n) < 0.7, y, (y + 1) % 3)
    pb = np.where(rng.random(n) < rng.uniform(0.55, 0.8), y, (y + 2) % 3)
    ra, rb = pa == y, pb == y
    table = [[int((ra & rb).sum()), int((ra & ~rb).sum())], [int((~ra & rb).sum()), int((~ra & ~rb).sum())]]
    ref = sm_mcnemar(table, exact=True).pvalue
    c = osteo.compare(y, pa, pb, np.arange(n))
    assert c.p == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert c.p == pytest.approx(M.mcnemar(ra, rb)["p_value"], rel=1e-9, abs=1e-12)
    assert c.diff == pytest.approx(ra.mean() - rb.mean())


def test_kappa_and_f1_agree_with_scikit_learn():
    for seed in range(5):
        y, p, g = _clustered(90, 3, seed=seed, per_class=[0.8, 0.4, 0.7])
        b = M.bootstrap_metrics(y, p, g, n_resamples=500)
        assert b["qw_kappa"][0] == pytest.approx(cohen_kappa_score(y, p, weights="quadratic"), abs=1e-12)
        assert b["macro_f1"][0] == pytest.approx(f1_score(y, p, average="macro"), abs=1e-12)
        for name in ("accuracy", "macro_f1", "qw_kappa", *[("per_class_accuracy", i) for i in range(3)]):
            v, lo, hi = b[name[0]][name[1]] if isinstance(name, tuple) else b[name]
            assert lo <= v <= hi
    cm = M.confusion_matrix([0, 0, 1, 2, 2, 2], [0, 2, 1, 2, 1, 0])
    assert M.quadratic_weighted_kappa(cm) == pytest.approx(
        cohen_kappa_score([0, 0, 1, 2, 2, 2], [0, 2, 1, 2, 1, 0], weights="quadratic"))


def test_cluster_interval_is_wider_than_wilson_by_the_design_effect():
    y, p, g = _clustered(180, 5, seed=4)
    acc, lo, hi = osteo.accuracy_ci(y, p, g)
    wl, wh = M.wilson_interval(int((y == p).sum()), y.size)
    deff = M.design_effect(y, p, g)
    assert deff["deff"] > 2.5 and deff["n_eff"] == pytest.approx(900 / deff["deff"])
    # the interval's width grows as sqrt(deff) (stratification and Monte-Carlo error: 10 %)
    assert (hi - lo) / (wh - wl) == pytest.approx(np.sqrt(deff["deff"]), rel=0.1)


def test_bootstrap_ends_are_stable_to_a_tenth_of_a_point():
    y, p, g = _clustered(180, 5, seed=5)
    ends = np.array([osteo.accuracy_ci(y, p, g, seed=s)[1:] for s in range(8)])
    assert ends.std(0, ddof=1).max() < 0.001  # SD over bootstrap seeds < 0.1 point


# ---- properties ---------------------------------------------------------------------------------
def test_invariant_to_patient_ids_and_slice_order():
    y, p, g = _clustered(120, 3, seed=6)
    q = _clustered(120, 3, seed=7)[1]
    rng = np.random.default_rng(0)
    ids = np.array([f"P-{i:012x}" for i in rng.permutation(10**6)[:120]])  # other names, other order
    perm = rng.permutation(y.size)
    base = osteo.accuracy_ci(y, p, g)
    assert osteo.accuracy_ci(y[perm], p[perm], ids[g][perm]) == base
    assert osteo.accuracy_ci(list(y), list(p), [str(x) for x in ids[g]]) == base  # lists work too
    c = osteo.compare(y, p, q, g)
    assert osteo.compare(y[perm], p[perm], q[perm], ids[g][perm]) == c
    b1 = M.bootstrap_metrics(y, p, g)
    b2 = M.bootstrap_metrics(y[perm], p[perm], ids[g][perm])
    assert b1 == b2


@pytest.mark.parametrize("seed", range(4))
def test_interval_contains_the_estimate_and_compare_is_antisymmetric(seed):
    rng = np.random.default_rng(seed)
    y, p, g = _clustered(int(rng.integers(9, 200)), int(rng.integers(1, 6)), acc=rng.uniform(0.3, 0.95), seed=seed)
    q = np.where(rng.random(y.size) < 0.2, (p + 1) % 3, p)
    acc, lo, hi = osteo.accuracy_ci(y, p, g)
    assert 0 <= lo <= acc <= hi <= 1
    same = osteo.compare(y, p, p, g)
    assert same == (0.0, 0.0, 0.0, 1.0)
    ab, ba = osteo.compare(y, p, q, g), osteo.compare(y, q, p, g)
    assert ab.diff == -ba.diff and ab.p == ba.p
    assert ab.lo == pytest.approx(-ba.hi, abs=1e-12) and ab.hi == pytest.approx(-ba.lo, abs=1e-12)
    assert ab.lo <= ab.diff <= ab.hi and 0 < ab.p <= 1


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="empty"):
        osteo.accuracy_ci([], [], [])
    with pytest.raises(ValueError, match="groups has 2 entries but y_true has 3"):
        osteo.accuracy_ci([0, 1, 2], [0, 1, 2], [1, 2])
    with pytest.raises(ValueError, match="3 entries but y_true has 2"):
        osteo.compare([0, 1], [0, 1], [0, 1, 2], ["a", "b"])
    with pytest.raises(ValueError, match="class indices"):
        osteo.accuracy_ci([0, 1], [0, 0.5], ["a", "b"])
    with pytest.raises(ValueError, match="same number"):
        M.compare_seeds([0, 1], [[0, 1]], [[0, 1], [1, 1]], ["a", "b"])


# ---- seeds ----------------------------------------------------------------------------------------
def test_seeds_combined_cover_seed_variation_and_never_pool_slices():
    y, p, g = _clustered(180, 5, seed=8)
    rng = np.random.default_rng(1)
    seeds = [np.where(rng.random(y.size) < s, (p + 1) % 3, p) for s in (0.0, 0.15, 0.3)]
    mean, lo, hi = M.accuracy_ci_seeds(y, seeds, g)
    assert mean == pytest.approx(np.mean([(s == y).mean() for s in seeds]))
    one = osteo.accuracy_ci(y, seeds[1], g)
    assert hi - lo > one[2] - one[1]  # seeds add variation: wider than any one seed's interval
    # a single seed: the same as the per-run interval
    assert M.accuracy_ci_seeds(y, [p], g) == pytest.approx(osteo.accuracy_ci(y, p, g))
    # combined comparison of identical seeds equals the single comparison's difference and p
    q = np.where(rng.random(y.size) < 0.2, (p + 1) % 3, p)
    c1, c3 = osteo.compare(y, p, q, g), M.compare_seeds(y, [p] * 3, [q] * 3, g)
    assert c3.diff == pytest.approx(c1.diff) and c3.p == pytest.approx(c1.p)


def test_minimum_detectable_difference_shrinks_with_more_patients():
    small = _clustered(90, 5, seed=9)
    big = _clustered(900, 1, seed=9)
    mdd = []
    for y, p, g in (small, big):  # B differs from A on whole patients (25 % of them)
        q = np.where((np.random.default_rng(2).random(g.max() + 1) < 0.25)[g], (p + 1) % 3, p)
        mdd.append(M.min_detectable_difference(y, p, q, g))
        # 2.8 bootstrap SDs: a difference this large has its interval clear of 0 most of the time
        assert 0 < mdd[-1] < 0.5
    assert mdd[1] < mdd[0] / 2  # 900 patients against 90: sqrt(10) ~ 3 times finer
