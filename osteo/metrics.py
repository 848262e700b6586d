"""Test metrics with their uncertainty.

The paper reports one accuracy per model (Tables 2-5). We report, for every head: accuracy with a
95 % Wilson interval, per-class accuracy (recall, Fig. 3), the confusion matrix, macro-F1 and
quadratic-weighted Cohen's kappa (the classes are ordered: normal < osteopenia < osteoporosis).
On 900 test images a 95 % interval on 77 % is about +-2.7 points (SPEC section 4), so most gaps in
the paper's tables are within noise; :func:`mcnemar` tests two models on the same test images.
"""
from __future__ import annotations

import math

import numpy as np


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
    """95 % Wilson score interval for a proportion k/n (better than k/n +- 1.96 SE near 0 or 1)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN); a class never seen nor predicted counts 0."""
    tp = np.diag(cm).astype(float)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1.mean())


def quadratic_weighted_kappa(cm: np.ndarray) -> float:
    """Cohen's kappa with quadratic weights ``(i - j)^2 / (K - 1)^2``: 1 perfect, 0 chance level."""
    cm = np.asarray(cm, dtype=float)
    k = cm.shape[0]
    n = cm.sum()
    if n == 0:
        return float("nan")
    i, j = np.indices((k, k))
    w = (i - j) ** 2 / (k - 1) ** 2
    expected = np.outer(cm.sum(1), cm.sum(0)) / n
    denom = (w * expected).sum()
    return float(1.0 - (w * cm).sum() / denom) if denom > 0 else float("nan")


def classification_report(y_true, y_pred, num_classes: int = 3, labels=None) -> dict:
    """All test metrics of one head as a JSON-ready dict."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    n = int(cm.sum())
    correct = int(np.trace(cm))
    lo, hi = wilson_interval(correct, n)
    per_class = np.divide(np.diag(cm), cm.sum(1), out=np.full(num_classes, np.nan), where=cm.sum(1) > 0)
    labels = list(labels) if labels is not None else [str(c) for c in range(num_classes)]
    return {
        "n": n,
        "accuracy": correct / n if n else float("nan"),
        "accuracy_ci95": [lo, hi],
        "per_class_accuracy": {lab: float(a) for lab, a in zip(labels, per_class)},
        "confusion_matrix": cm.tolist(),
        "macro_f1": macro_f1(cm),
        "qw_kappa": quadratic_weighted_kappa(cm),
    }


def mcnemar(correct_a, correct_b) -> dict:
    """Exact (binomial) McNemar test of two models on the same test images.

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
