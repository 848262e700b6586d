import math

import numpy as np
import pytest
import torch

import osteo
from osteo.metrics import (classification_report, confusion_matrix, macro_f1, mcnemar,
                           quadratic_weighted_kappa, wilson_interval)
from osteo.windowing import IMAGENET_MEAN, IMAGENET_STD, to_network_input


def test_window_matches_eq1_by_hand():
    hu = np.array([-2000, -450, -128, 0, 448, 1024, 3000], dtype=np.int16)
    # Eq. (1) with HU_min = -450, HU_max = 1024: 255 * (HU + 450) / 1474, clipped
    expect_t = [0.0, 0.0, 255 * 322 / 1474, 255 * 450 / 1474, 255 * 898 / 1474, 255.0, 255.0]
    expect_s = [0.0, 0.0, 0.0, 255 * 128 / 1152, 255 * 576 / 1152, 255.0, 255.0]
    x_s, x_t = osteo.two_views(hu)
    assert x_t.dtype == np.float32 and x_s.dtype == np.float32
    np.testing.assert_allclose(x_t, expect_t, rtol=1e-6)
    np.testing.assert_allclose(x_s, expect_s, rtol=1e-6)


def test_window_torch_keeps_device_and_agrees_with_numpy():
    hu = torch.tensor([[-300.0, 50.5], [900.0, 1500.0]])
    out = osteo.window(hu, -450)
    assert isinstance(out, torch.Tensor) and out.device == hu.device and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), osteo.window(hu.numpy(), -450), rtol=1e-6)
    assert float(out[0, 1]) == pytest.approx(255 * 500.5 / 1474)  # float, not quantised to uint8


def test_window_rejects_empty_window():
    with pytest.raises(ValueError, match="hu_max > hu_min"):
        osteo.window(np.zeros(3), 1024)


def test_network_input_is_windowed_replicated_and_normalised():
    hu = torch.tensor([[[-128.0, 1024.0], [448.0, 0.0]]])
    x = to_network_input(hu, "s")
    assert x.shape == (1, 3, 2, 2)
    grey = 255 * (448 + 128) / 1152 / 255
    for c in range(3):
        assert float(x[0, c, 1, 0]) == pytest.approx((grey - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rel=1e-5)
        assert float(x[0, c, 0, 0]) == pytest.approx((0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rel=1e-5)
    with pytest.raises(ValueError, match="unknown view"):
        to_network_input(hu, "x")


def test_confusion_f1_kappa_by_hand():
    y = [0, 0, 1, 1, 2, 2]
    p = [0, 1, 1, 1, 2, 0]
    cm = confusion_matrix(y, p)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # F1 per class: 2/4, 4/5, 2/3
    assert macro_f1(cm) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # quadratic kappa by hand: weights (i-j)^2/4; observed sum w*O = 0.25*1 + 1*1 = 1.25
    # expected = outer(row, col)/6 with rows (2,2,2), cols (2,3,1): sum w*E = (2/6)*sum_ij w_ij col_j
    exp = sum(((i - j) ** 2 / 4) * 2 * c / 6 for i in range(3) for j, c in enumerate([2, 3, 1]))
    assert quadratic_weighted_kappa(cm) == pytest.approx(1 - 1.25 / exp)
    assert quadratic_weighted_kappa(confusion_matrix(y, y)) == pytest.approx(1.0)


def test_report_and_interval():
    rep = classification_report([0, 1, 2, 2], [0, 1, 2, 1], labels=osteo.LABELS)
    assert rep["accuracy"] == 0.75
    assert rep["per_class_accuracy"] == {"normal": 1.0, "osteopenia": 1.0, "osteoporosis": 0.5}
    lo, hi = wilson_interval(693, 900)  # 77 % of 900: about +-2.7 points (design section 4)
    assert 0.74 < lo < 0.745 and 0.795 < hi < 0.80
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1])


def test_mcnemar_exact():
    a = np.array([1] * 10 + [0] * 2 + [1] * 5, dtype=bool)
    b = np.array([0] * 10 + [1] * 2 + [1] * 5, dtype=bool)
    r = mcnemar(a, b)
    assert (r["b"], r["c"]) == (10, 2)
    p = 2 * sum(math.comb(12, i) for i in range(3)) / 2**12
    assert r["p_value"] == pytest.approx(p)
    assert mcnemar(a, a)["p_value"] == 1.0
