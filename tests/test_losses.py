"""Losses, Eqs. (3)-(5), and the ACM penalty, against hand-computed values."""
import math

import pytest
import torch

from osteo.losses import acm_penalty, dissimilarity_loss, twin_loss, twin_loss_terms
from osteo.models import TwinOutput


def test_dissimilarity_is_batch_mean_cosine():
    g_s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    g_t = torch.tensor([[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0]])  # cos = 0, 1, -1
    assert dissimilarity_loss(g_s, g_t).item() == pytest.approx(0.0, abs=1e-7)
    assert dissimilarity_loss(g_s[:2], g_t[:2]).item() == pytest.approx(0.5)
    # 60 degrees apart -> cos = 0.5; (B, D, 1, 1) features are flattened
    a = torch.tensor([[1.0, 0.0]]).reshape(1, 2, 1, 1)
    b = torch.tensor([[0.5, math.sqrt(3) / 2]]).reshape(1, 2, 1, 1)
    assert dissimilarity_loss(a, b).item() == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        dissimilarity_loss(g_s, g_t[:, :1])


def _ce(logits, y):
    return -math.log(math.exp(logits[y]) / sum(math.exp(v) for v in logits))


def test_twin_loss_terms_by_hand():
    ls = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    lt = [[0.0, 0.0, 0.0], [0.0, 0.0, 3.0]]
    lf = [[1.0, -1.0, 0.5], [0.2, 0.1, 0.0]]
    y = [0, 2]
    out = TwinOutput(torch.tensor(ls), torch.tensor(lt), torch.tensor(lf),
                     torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    terms = twin_loss_terms(out, torch.tensor(y), lam=0.1)
    for key, logits in (("ce_s", ls), ("ce_t", lt), ("ce_f", lf)):
        expected = (_ce(logits[0], y[0]) + _ce(logits[1], y[1])) / 2
        assert terms[key].item() == pytest.approx(expected, rel=1e-6), key
    assert terms["ce_t"].item() == pytest.approx((math.log(3) + _ce(lt[1], 2)) / 2, rel=1e-6)
    assert terms["dis"].item() == pytest.approx(0.5)
    total = terms["ce_s"] + terms["ce_t"] + terms["ce_f"] + 0.1 * 0.5
    assert terms["total"].item() == pytest.approx(total.item(), rel=1e-6)
    assert twin_loss(out, torch.tensor(y), lam=0.1).item() == pytest.approx(total.item(), rel=1e-6)
    # lam = 0 is "Ours - L_dis"; lam scales only the dissimilarity term
    assert twin_loss(out, torch.tensor(y), lam=0.0).item() == pytest.approx(total.item() - 0.05, rel=1e-6)
    assert twin_loss(out, torch.tensor(y), lam=1.0).item() == pytest.approx(total.item() + 0.45, rel=1e-6)


def test_twin_loss_gradient_pushes_features_apart():
    g_s = torch.tensor([[1.0, 0.2]], requires_grad=True)
    g_t = torch.tensor([[1.0, 0.0]])
    out = TwinOutput(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), g_s, g_t)
    twin_loss(out, torch.tensor([1]), lam=0.1).backward()
    # descending the loss rotates g_s away from g_t: the gradient on the 2nd coordinate is negative
    assert g_s.grad[0, 1] < 0


def test_acm_penalty_value_and_gradient():
    term = torch.tensor([0.2, -0.6], requires_grad=True)  # mean -0.2
    pen = acm_penalty(term)
    assert pen.item() == pytest.approx(0.02)
    assert acm_penalty(term, weight=0.5).item() == pytest.approx(0.1)
    pen.backward()
    torch.testing.assert_close(term.grad, torch.tensor([-0.05, -0.05]))  # 0.1 * sign(-0.2) / 2
