"""Test metrics with their uncertainty, counted over patients.

The paper reports one accuracy per model (Tables 2-5). We report, for every head: accuracy,
per-class accuracy (recall, Fig. 3), the confusion matrix, macro-F1 and quadratic-weighted
Cohen's kappa (the classes are ordered: normal < osteopenia < osteoporosis), each with a 95 %
interval.

Slices of one patient are not independent evidence: neighbouring slices share the patient's bone,
scanner and protocol, so a model right on one is mostly right on the others. Every interval here
is therefore a **cluster bootstrap over patients**, stratified by class (each resample draws, per
class, as many patients as the test set has, with replacement, and keeps all slices of each drawn
patient); the interval is the **percentile** interval of :data:`N_RESAMPLES` resamples with a fixed
seed (its ends move by less than 0.1 point between bootstrap seeds: ``tests/test_uncertainty.py``).
:func:`compare` answers "does A beat B?" on the same test slices with a paired bootstrap over
patients (the interval) and an exact sign-flip permutation test over patients (the p-value); with
one slice per patient that test is exactly McNemar's. :func:`wilson_interval` and :func:`mcnemar`
treat slices as independent and are kept as references only.
"""
from __future__ import annotations

import math
from collections import namedtuple
from statistics import NormalDist

import numpy as np

N_RESAMPLES = 20_000  # bootstrap resamples: interval ends move by SD < 0.1 point between seeds (0.07 measured)
_CHUNK_CELLS = 4_000_000  # resamples x patients per chunk (32 MB of float64 weights)
_Z975 = NormalDist().inv_cdf(0.975)

Comparison = namedtuple("Comparison", "diff lo hi p")
Comparison.__doc__ = "Accuracy of A minus B (fraction), its 95 % interval and the two-sided p-value."


def confusion_matrix(y_true, y_pred, num_classes: int = 3) -> np.ndarray:
    """Counts ``C[i, j]`` of true class i predicted as j."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} holds a class outside 0..{num_classes - 1}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion k/n of **independent** trials (a reference:
    test slices of one patient are not independent, see :func:`accuracy_ci`)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN); a class never seen nor predicted counts 0."""
    return float(_macro_f1(np.asarray(cm, dtype=float)[None])[0])


def quadratic_weighted_kappa(cm: np.ndarray) -> float:
    """Cohen's kappa with quadratic weights ``(i - j)^2 / (K - 1)^2``: 1 perfect, 0 chance level."""
    return float(_qw_kappa(np.asarray(cm, dtype=float)[None])[0])


# ---- vectorised metrics of a stack of confusion matrices (B, K, K) ---------------------------------
def _accuracy(cms):
    n = cms.sum((1, 2))
    return np.divide(np.trace(cms, axis1=1, axis2=2), n, out=np.full(len(cms), np.nan), where=n > 0)


def _per_class(cms):
    rows = cms.sum(2)
    diag = np.diagonal(cms, axis1=1, axis2=2)
    return np.divide(diag, rows, out=np.full(rows.shape, np.nan), where=rows > 0)


def _macro_f1(cms):
    tp = np.diagonal(cms, axis1=1, axis2=2)
    denom = cms.sum(1) + cms.sum(2)  # 2 TP + FP + FN
    return np.divide(2 * tp, denom, out=np.zeros(tp.shape), where=denom > 0).mean(1)


def _qw_kappa(cms):
    k = cms.shape[1]
    n = cms.sum((1, 2))
    i, j = np.indices((k, k))
    w = (i - j) ** 2 / (k - 1) ** 2
    safe_n = np.where(n > 0, n, 1.0)
    expected = cms.sum(2)[:, :, None] * cms.sum(1)[:, None, :] / safe_n[:, None, None]
    denom = (w * expected).sum((1, 2))
    num = (w * cms).sum((1, 2))
    ok = (denom > 0) & (n > 0)
    return np.where(ok, 1.0 - np.divide(num, denom, out=np.zeros(len(cms)), where=ok), np.nan)


# ---- input checks and patients ----------------------------------------------------------------------
def _arrays(y_true, preds, groups, num_classes=None):
    """Check lengths and emptiness; return y (int64), the predictions (list of int64 arrays) and
    patient codes 0..G-1 (np.unique order of the ids)."""
    y = np.asarray(y_true).ravel()
    ps = [np.asarray(p).ravel() for p in preds]
    g = np.asarray(groups).ravel()
    if y.size == 0:
        raise ValueError("no test slices: y_true is empty")
    for name, a in [("groups", g)] + [(f"predictions {i + 1}" if len(ps) > 1 else "y_pred", p) for i, p in enumerate(ps)]:
        if a.size != y.size:
            raise ValueError(f"{name} has {a.size} entries but y_true has {y.size}: give one per test slice")
    try:
        y = y.astype(np.int64, casting="safe") if y.dtype.kind in "iub" else _as_int(y, "y_true")
        ps = [p.astype(np.int64, casting="safe") if p.dtype.kind in "iub" else _as_int(p, "predictions") for p in ps]
    except TypeError as e:
        raise ValueError(str(e)) from None
    k = num_classes or int(max(y.max(), *(p.max() for p in ps))) + 1
    for name, a in [("y_true", y)] + [("predictions", p) for p in ps]:
        if a.min() < 0 or a.max() >= k:
            raise ValueError(f"{name} holds a class outside 0..{k - 1}")
    if g.dtype.kind == "O" and any(v is None for v in g):
        raise ValueError("groups holds a missing patient id (None)")
    _, codes = np.unique(g.astype(str) if g.dtype.kind == "O" else g, return_inverse=True)
    return y, ps, codes.ravel(), k


def _as_int(a, name):
    f = np.asarray(a, dtype=float)
    if not np.all(np.isfinite(f)) or not np.all(f == np.round(f)):
        raise TypeError(f"{name} must hold class indices (integers)")
    return f.astype(np.int64)


def _strata(y, codes):
    """The class of each patient (its most frequent true class; ties: the lowest)."""
    g = codes.max() + 1
    k = y.max() + 1
    counts = np.zeros((g, k), dtype=np.int64)
    np.add.at(counts, (codes, y), 1)
    return counts.argmax(1)


def _canonical(stratum, feats):
    """The distinct kinds of patient: unique rows of (class, what the patient contributes), sorted,
    with how many patients have each. The bootstrap depends only on these, never on the ids or the
    order of the slices. Returns (class of each kind, its features, its number of patients)."""
    rows, counts = np.unique(np.column_stack([stratum, feats]), axis=0, return_counts=True)
    return rows[:, 0].astype(np.int64), rows[:, 1:] + 0.0, counts


def _resample_weights(stratum, counts, n_resamples, rng):
    """Yield chunks of (b, U) float64 weights: how many patients of each kind a resample draws.

    Drawing a class's n patients with replacement puts Multinomial(n, counts / n) draws on its kinds
    of patient: the same distribution as drawing patient by patient, at a fraction of the cost."""
    kinds = [np.flatnonzero(stratum == s) for s in np.unique(stratum)]
    n_kinds = len(stratum)
    chunk = max(1, min(n_resamples, _CHUNK_CELLS // max(n_kinds, 1)))
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        w = np.zeros((b, n_kinds))
        for idx in kinds:
            n = counts[idx].sum()
            w[:, idx] = rng.multinomial(n, counts[idx] / n, size=b)
        done += b
        yield w


def _percentile(values, level=0.95):
    a = (1 - level) / 2
    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(v, [a, 1 - a])
    return float(lo), float(hi)


# ---- per run ---------------------------------------------------------------------------------------
def bootstrap_metrics(y_true, y_pred, groups, num_classes: int = 3, seed: int = 0,
                      n_resamples: int = N_RESAMPLES) -> dict:
    """Accuracy, per-class accuracy, macro-F1 and QW kappa, each with its 95 % patient-level interval.

    Stratified cluster bootstrap over patients, percentile interval (see the module docstring).
    Returns ``{"accuracy": (value, lo, hi), "per_class_accuracy": [(value, lo, hi), ...],
    "macro_f1": (...), "qw_kappa": (...), "n_patients": G, "n_slices": N}`` (fractions).
    """
    y, (p,), codes, k = _arrays(y_true, [y_pred], groups, num_classes)
    g = codes.max() + 1
    cell = np.zeros((g, k * k))
    np.add.at(cell, (codes, y * k + p), 1.0)
    stratum, cell, counts = _canonical(_strata(y, codes), cell)
    rng = np.random.default_rng(seed)
    stats = []
    for w in _resample_weights(stratum, counts, n_resamples, rng):
        cms = (w @ cell).reshape(-1, k, k)  # integer counts: exact in float64
        stats.append(np.column_stack([_accuracy(cms), _per_class(cms), _macro_f1(cms), _qw_kappa(cms)]))
    stats = np.vstack(stats)
    cm = (counts @ cell).reshape(1, k, k)
    point = np.concatenate([_accuracy(cm), _per_class(cm)[0], _macro_f1(cm), _qw_kappa(cm)])
    out = [(float(v), *_percentile(stats[:, i])) for i, v in enumerate(point)]
    return {"accuracy": out[0], "per_class_accuracy": out[1:1 + k], "macro_f1": out[1 + k],
            "qw_kappa": out[2 + k], "n_patients": int(g), "n_slices": int(y.size)}


def accuracy_ci(y_true, y_pred, groups, seed: int = 0, n_resamples: int = N_RESAMPLES) -> tuple:
    """``(accuracy, lo, hi)`` as fractions: the 95 % interval of a cluster bootstrap over patients,
    stratified by class (percentile method). ``groups`` holds one patient id per test slice."""
    y, (p,), codes, _ = _arrays(y_true, [y_pred], groups)
    g = codes.max() + 1
    feats = np.zeros((g, 2))
    np.add.at(feats, (codes, 0), 1.0)
    np.add.at(feats, (codes, 1), (y == p).astype(float))
    stratum, feats, counts = _canonical(_strata(y, codes), feats)
    rng = np.random.default_rng(seed)
    acc = np.concatenate([(w @ feats[:, 1]) / (w @ feats[:, 0])
                          for w in _resample_weights(stratum, counts, n_resamples, rng)])
    tot = counts @ feats
    return (float(tot[1] / tot[0]), *_percentile(acc))


def design_effect(y_true, y_pred, groups) -> dict:
    """How much less a test set of clustered slices tells than as many independent slices.

    ``deff`` = variance of the accuracy with patients as the unit (the between-patient variance of
    a ratio estimator, per class) / the variance if every slice were an independent trial (the
    binomial variance, per class). ``n_eff = n_slices / deff`` is the number of independent slices
    worth as much. With m slices per patient and intraclass correlation rho of "the model is right",
    deff ~ 1 + (m - 1) rho. Returns ``{"deff", "n_eff", "n_slices", "n_patients"}``.
    """
    y, (p,), codes, _ = _arrays(y_true, [y_pred], groups)
    stratum = _strata(y, codes)
    g = codes.max() + 1
    n_g = np.bincount(codes, minlength=g).astype(float)
    c_g = np.bincount(codes, weights=(y == p).astype(float), minlength=g)
    n = y.size
    v_clu = v_iid = 0.0
    for s in np.unique(stratum):
        m = stratum == s
        ns, cs = n_g[m].sum(), c_g[m].sum()
        acc_s = cs / ns
        w = ns / n
        v_iid += w * w * acc_s * (1 - acc_s) / ns
        v_clu += w * w * ((c_g[m] - acc_s * n_g[m]) ** 2).sum() / ns**2  # as the bootstrap: no n/(n-1)
    # every class all right or all wrong: no variance at all, nothing to inflate
    deff = v_clu / v_iid if v_iid > 0 else 1.0
    return {"deff": float(deff), "n_eff": float(n / deff) if deff > 0 else float("inf"),
            "n_slices": int(n), "n_patients": int(g)}


# ---- comparisons -----------------------------------------------------------------------------------
def _sign_flip_p(d):
    """Exact two-sided p-value of the sign-flip permutation test: under 'A and B are exchangeable
    within every patient', each patient's integer difference d_g is +d_g or -d_g with probability 1/2.
    P(|sum s_g d_g| >= |sum d_g|), by exact convolution of the null distribution."""
    d = np.asarray(d, dtype=np.int64)
    obs = abs(int(d.sum()))
    d = np.abs(d[d != 0])
    if d.size == 0:
        return 1.0
    total = int(d.sum())
    dist = np.zeros(2 * total + 1)
    dist[total] = 1.0
    for v in d:
        dist = 0.5 * (np.roll(dist, v) + np.roll(dist, -v))  # support stays within +-total: no wrap
    s = np.arange(-total, total + 1)
    return float(min(1.0, dist[np.abs(s) >= obs].sum()))


def _paired_inputs(y_true, preds_a, preds_b, groups):
    """Per-seed predictions (lists of arrays, same slices) -> y, codes, per-patient features."""
    y, ps, codes, _ = _arrays(y_true, list(preds_a) + list(preds_b), groups)
    s = len(preds_a)
    g = codes.max() + 1
    n_g = np.bincount(codes, minlength=g).astype(float)
    d = np.stack([np.bincount(codes, weights=(ps[i] == y).astype(float) - (ps[s + i] == y), minlength=g)
                  for i in range(s)], axis=1)  # (G, seeds): right_a - right_b per patient
    return y, codes, n_g, d


def _compare(y_true, preds_a, preds_b, groups, seed, n_resamples):
    y, codes, n_g, d = _paired_inputs(y_true, preds_a, preds_b, groups)
    n_seeds = d.shape[1]
    strata = _strata(y, codes)
    # orient A/B canonically, so that compare(b, a) draws the same resamples and is exactly -compare(a, b)
    kinds = _canonical(strata, np.column_stack([n_g, d]))
    flipped = _canonical(strata, np.column_stack([n_g, -d]))  # (_canonical adds 0.0: no -0.0 in the bytes)
    key, key_f = (b"".join(a.tobytes() for a in x) for x in (kinds, flipped))
    sign = 1.0 if key <= key_f else -1.0
    symmetric = key == key_f
    stratum, feats, counts = kinds if sign > 0 else flipped
    n_g, d = feats[:, 0], feats[:, 1:]
    tot = counts @ feats
    diff = float(tot[1:].mean() / tot[0])
    rng = np.random.default_rng(seed)
    boots = []
    for w in _resample_weights(stratum, counts, n_resamples, rng):
        per_seed = (w @ d) / (w @ n_g)[:, None]  # (b, seeds)
        if n_seeds > 1:  # two levels: draw the seeds too, then average
            pick = rng.integers(0, n_seeds, size=(len(w), n_seeds))
            boots.append(np.take_along_axis(per_seed, pick, 1).mean(1))
        else:
            boots.append(per_seed[:, 0])
    boots = np.concatenate(boots)
    if symmetric:  # A's and B's per-patient results are mirror images: so is the bootstrap distribution
        boots = np.concatenate([boots, -boots])
    lo, hi = _percentile(boots)
    p = _sign_flip_p(np.repeat(np.round(d.sum(1)).astype(np.int64), counts))
    if sign < 0:
        diff, lo, hi = -diff, -hi, -lo
    return Comparison(diff + 0.0, lo + 0.0, hi + 0.0, p), float(boots.std(ddof=1))


def compare(y_true, pred_a, pred_b, groups, seed: int = 0, n_resamples: int = N_RESAMPLES) -> Comparison:
    """Does A beat B on the same test slices? ``Comparison(diff, lo, hi, p)``: accuracy of A minus
    accuracy of B (fraction), the 95 % interval of a paired cluster bootstrap over patients
    (stratified by class, percentile) and the two-sided p-value of an exact sign-flip permutation
    test over patients (A's and B's answers swapped for all slices of a patient at once; with one
    slice per patient this is McNemar's exact test). A claim "A beats B" holds when ``lo > 0`` and
    ``p < 0.05`` (on a few dozen patients the percentile interval is too narrow; the exact test is not)."""
    return _compare(y_true, [pred_a], [pred_b], groups, seed, n_resamples)[0]


def compare_seeds(y_true, preds_a, preds_b, groups, seed: int = 0, n_resamples: int = N_RESAMPLES) -> Comparison:
    """:func:`compare` combined over seeds: ``preds_a``/``preds_b`` hold one prediction array per
    seed (seed i of A paired with seed i of B, all on the same test slices). ``diff`` is the mean
    over seeds; the interval is a two-level bootstrap (seeds with replacement, then patients);
    the p-value flips A and B per patient in all seeds at once (exact). Never concatenate the
    seeds as if they were more test slices: they are the same patients."""
    if len(preds_a) != len(preds_b) or not len(preds_a):
        raise ValueError(f"compare_seeds: give the same number (>= 1) of seeds for A and B, got "
                         f"{len(preds_a)} and {len(preds_b)}")
    return _compare(y_true, preds_a, preds_b, groups, seed, n_resamples)[0]


def _patient_accuracy_kinds(y_true, y_pred, groups):
    """One test set as kinds of patient: (class, slices, slices right) with how many patients of each."""
    y, (p,), codes, _ = _arrays(y_true, [y_pred], groups)
    g = codes.max() + 1
    feats = np.zeros((g, 2))
    np.add.at(feats, (codes, 0), 1.0)
    np.add.at(feats, (codes, 1), (y == p).astype(float))
    return _canonical(_strata(y, codes), feats)


def _bootstrap_accuracy(kinds, n_resamples, rng):
    stratum, feats, counts = kinds
    return np.concatenate([(w @ feats[:, 1]) / (w @ feats[:, 0])
                           for w in _resample_weights(stratum, counts, n_resamples, rng)])


def _two_sample_permutation_p(ka, kb, n_perm, rng):
    """Two-sided p of a permutation test over patients: within each class, the patients of both test
    sets are pooled and dealt out again to A and B (as many to each as before); the statistic is
    the accuracy difference. Monte Carlo with ``n_perm`` deals: ``(1 + #|d| >= |d_obs|) / (1 + n_perm)``."""
    units, side = [], []
    for which, (stratum, feats, counts) in enumerate((ka, kb)):
        rows = np.repeat(np.column_stack([stratum, feats]), counts, axis=0)
        units.append(rows)
        side.append(np.full(len(rows), which))
    units, side = np.vstack(units), np.concatenate(side)
    strata, n_g, c_g = units[:, 0], units[:, 1], units[:, 2]
    in_a = side == 0
    obs = c_g[in_a].sum() / n_g[in_a].sum() - c_g[~in_a].sum() / n_g[~in_a].sum()
    tot_n, tot_c = n_g.sum(), c_g.sum()
    hits, done = 0, 0
    chunk = max(1, min(n_perm, _CHUNK_CELLS // max(len(units), 1)))
    tol = 1e-12  # the observed deal itself must count: ratios of the same integers, rounding apart
    while done < n_perm:
        b = min(chunk, n_perm - done)
        a_n, a_c = np.zeros(b), np.zeros(b)
        for s in np.unique(strata):
            idx = np.flatnonzero(strata == s)
            k = int(in_a[idx].sum())
            pick = np.argsort(rng.random((b, len(idx))), axis=1)[:, :k]  # k patients of the class go to A
            a_n += n_g[idx][pick].sum(1)
            a_c += c_g[idx][pick].sum(1)
        d = a_c / a_n - (tot_c - a_c) / (tot_n - a_n)
        hits += int((np.abs(d) >= abs(obs) - tol).sum())
        done += b
    return (1 + hits) / (1 + n_perm)


def compare_unpaired(y_a, pred_a, groups_a, y_b, pred_b, groups_b, seed: int = 0,
                     n_resamples: int = N_RESAMPLES) -> Comparison:
    """Accuracy of A minus accuracy of B when A and B were tested on DIFFERENT test sets (for example
    two splits of one data set), where no paired test is possible. ``Comparison(diff, lo, hi, p)``:
    the interval is the percentile interval of the difference of two independent cluster bootstraps,
    each over its own test patients (stratified by class, as :func:`accuracy_ci`); the p-value is a
    two-sample permutation test over patients (within each class the patients of both sets are dealt
    out again at random; ``n_resamples`` deals). Two test sets that share patients are positively
    correlated, so treating them as independent makes the interval wider, not narrower. When both
    models were tested on the same slices use :func:`compare`: it is much sharper."""
    ka = _patient_accuracy_kinds(y_a, pred_a, groups_a)
    kb = _patient_accuracy_kinds(y_b, pred_b, groups_b)
    # draw in a canonical order, so that compare_unpaired(B, A) is exactly -compare_unpaired(A, B)
    key_a, key_b = (b"".join(x.tobytes() for x in k) for k in (ka, kb))
    sign = 1.0 if key_a <= key_b else -1.0
    first, second = (ka, kb) if sign > 0 else (kb, ka)
    rng = np.random.default_rng(seed)
    boots = _bootstrap_accuracy(first, n_resamples, rng) - _bootstrap_accuracy(second, n_resamples, rng)
    acc = [(k[2] @ k[1])[1] / (k[2] @ k[1])[0] for k in (first, second)]
    diff = float(acc[0] - acc[1])
    lo, hi = _percentile(boots)
    p = float(_two_sample_permutation_p(first, second, n_resamples, rng))
    if sign < 0:
        diff, lo, hi = -diff, -hi, -lo
    return Comparison(diff + 0.0, lo + 0.0, hi + 0.0, p)


def min_detectable_difference(y_true, preds_a, preds_b, groups, power: float = 0.8, seed: int = 0,
                              n_resamples: int = N_RESAMPLES) -> float:
    """The smallest accuracy difference (fraction) the paired test detects with ``power`` at the
    5 % level on this test set: ``(z_0.975 + z_power) * SE``, with SE the bootstrap SD of the
    difference (patients, and seeds when several are given; normal approximation). ``preds_a`` and
    ``preds_b`` are one prediction array each, or one per seed. A 'no difference' result means
    little about differences smaller than this."""
    if not 0 < power < 1:
        raise ValueError(f"power must lie in (0, 1), got {power}")
    pa = preds_a if _is_seed_list(preds_a) else [preds_a]
    pb = preds_b if _is_seed_list(preds_b) else [preds_b]
    if len(pa) != len(pb):
        raise ValueError(f"give the same number of seeds for A and B, got {len(pa)} and {len(pb)}")
    z = _Z975 + NormalDist().inv_cdf(power)
    return z * _compare(y_true, pa, pb, groups, seed, n_resamples)[1]


def _is_seed_list(p) -> bool:
    return isinstance(p, (list, tuple)) and len(p) > 0 and np.ndim(p[0]) == 1 or (
        isinstance(p, np.ndarray) and p.ndim == 2)


def accuracy_ci_seeds(y_true, preds, groups, seed: int = 0, n_resamples: int = N_RESAMPLES) -> tuple:
    """Mean accuracy over seeds with a 95 % interval covering seeds and patients: ``(mean, lo, hi)``.

    ``preds`` holds one prediction array per seed, all on the same test slices. Two-level
    bootstrap: draw the seeds with replacement, then the patients (stratified by class, the same
    patients for every drawn seed, since the seeds share the test set), percentile interval. With
    one seed it covers test-set sampling only."""
    preds = list(preds)
    if not preds:
        raise ValueError("accuracy_ci_seeds: give at least one seed's predictions")
    y, ps, codes, _ = _arrays(y_true, preds, groups)
    g = codes.max() + 1
    n_g = np.bincount(codes, minlength=g).astype(float)
    c = np.stack([np.bincount(codes, weights=(p == y).astype(float), minlength=g) for p in ps], axis=1)
    stratum, feats, counts = _canonical(_strata(y, codes), np.column_stack([n_g, c]))
    n_g, c = feats[:, 0], feats[:, 1:]
    rng = np.random.default_rng(seed)
    boots = []
    for w in _resample_weights(stratum, counts, n_resamples, rng):
        per_seed = (w @ c) / (w @ n_g)[:, None]
        if len(ps) > 1:
            pick = rng.integers(0, len(ps), size=(len(w), len(ps)))
            per_seed = np.take_along_axis(per_seed, pick, 1)
        boots.append(per_seed.mean(1))
    tot = counts @ feats
    return (float(tot[1:].mean() / tot[0]), *_percentile(np.concatenate(boots)))


# ---- the report of one head ------------------------------------------------------------------------
def classification_report(y_true, y_pred, num_classes: int = 3, labels=None, groups=None, seed: int = 0) -> dict:
    """All test metrics of one head as a JSON-ready dict.

    With ``groups`` (one patient id per slice) every 95 % interval is patient-level
    (:func:`bootstrap_metrics`); without them the accuracy's interval is Wilson's, which treats
    slices as independent (``"interval"`` says which).
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    n = int(cm.sum())
    correct = int(np.trace(cm))
    per_class = np.divide(np.diag(cm), cm.sum(1), out=np.full(num_classes, np.nan), where=cm.sum(1) > 0)
    labels = list(labels) if labels is not None else [str(c) for c in range(num_classes)]
    out = {
        "n": n,
        "accuracy": correct / n if n else float("nan"),
        "accuracy_ci95": list(wilson_interval(correct, n)),
        "per_class_accuracy": {lab: float(a) for lab, a in zip(labels, per_class)},
        "confusion_matrix": cm.tolist(),
        "macro_f1": macro_f1(cm),
        "qw_kappa": quadratic_weighted_kappa(cm),
        "interval": "Wilson (slices as independent trials)",
    }
    if groups is not None and n:
        b = bootstrap_metrics(y_true, y_pred, groups, num_classes, seed=seed)
        de = design_effect(y_true, y_pred, groups)
        out.update({
            "n_patients": b["n_patients"],
            "accuracy_ci95": list(b["accuracy"][1:]),
            "per_class_accuracy_ci95": {lab: list(v[1:]) for lab, v in zip(labels, b["per_class_accuracy"])},
            "macro_f1_ci95": list(b["macro_f1"][1:]),
            "qw_kappa_ci95": list(b["qw_kappa"][1:]),
            "design_effect": de["deff"],
            "interval": f"patient bootstrap (stratified by class, percentile, {N_RESAMPLES} resamples, seed {seed})",
        })
    return out


def mcnemar(correct_a, correct_b) -> dict:
    """Exact (binomial) McNemar test of two models on the same test images, **independent** images
    only (a reference; with several slices per patient use :func:`compare`).

    ``correct_a``/``correct_b`` are boolean arrays: did model A/B classify image i right. Only the
    discordant pairs count: b = A right and B wrong, c = A wrong and B right. Returns b, c and the
    two-sided p-value ``min(1, 2 * P(X <= min(b, c)))`` with X ~ Binomial(b + c, 1/2).
    """
    a = np.asarray(correct_a, dtype=bool)
    b_ = np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError(f"McNemar needs the same test images: shapes {a.shape} and {b_.shape}")
    b = int((a & ~b_).sum())
    c = int((~a & b_).sum())
    n = b + c
    if n == 0:
        return {"b": 0, "c": 0, "p_value": 1.0}
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return {"b": b, "c": c, "p_value": min(1.0, 2.0 * tail)}
