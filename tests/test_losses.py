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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_losses_compute_in_at_least_float32_and_keep_float64(dtype):
    """Mixed-precision logits are lifted to float32 for the loss; a float64 model keeps a float64
    loss and float64 gradients (rounding the logits to float32 would make float64 runs of two code
    paths differ by float32 rounding, ~1e-7)."""
    want = torch.promote_types(dtype, torch.float32)
    g = torch.Generator().manual_seed(1)
    raw = [torch.randn(4, 3, generator=g, dtype=torch.float64) / 3 for _ in range(3)]
    feats = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    leaves = [t.to(dtype, copy=True).requires_grad_() for t in raw + feats]
    y = torch.tensor([0, 2, 1, 2])
    terms = twin_loss_terms(TwinOutput(*leaves), y, lam=0.1)
    assert {k: v.dtype for k, v in terms.items()} == {k: want for k in ("ce_s", "ce_t", "ce_f", "dis", "total")}
    terms["total"].backward()
    assert all(t.grad.dtype == dtype for t in leaves)
    acm = torch.randn(4, generator=g, dtype=torch.float64).to(dtype)
    assert acm_penalty(acm).dtype == want
    if dtype == torch.float64:  # against the exact formula: float32 arithmetic would be off by ~1e-8
        for key, logits in zip(("ce_s", "ce_t", "ce_f"), raw):
            expected = sum(_ce(row.tolist(), int(c)) for row, c in zip(logits, y)) / len(y)
            assert terms[key].item() == pytest.approx(expected, rel=1e-14, abs=0), key
        cos = [float(a @ b / (a.norm() * b.norm())) for a, b in zip(*feats)]
        assert terms["dis"].item() == pytest.approx(sum(cos) / len(cos), rel=1e-14, abs=1e-16)
        assert acm_penalty(acm, weight=0.3).item() == pytest.approx(0.3 * abs(sum(acm.tolist()) / 4), rel=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_single_network_loss_keeps_float64(dtype):
    from osteo.training import TrainConfig, loss_terms

    cfg = TrainConfig(model="resnet18", inputs=("t",), acm_weight=0.0)
    logits = (torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) / 3)
    y = torch.tensor([1, 0, 2, 2])
    terms = loss_terms(cfg, logits.to(dtype), y, None)
    assert terms["ce"].dtype == terms["total"].dtype == torch.promote_types(dtype, torch.float32)
    if dtype == torch.float64:
        expected = sum(_ce(row.tolist(), int(c)) for row, c in zip(logits, y)) / len(y)
        assert terms["ce"].item() == pytest.approx(expected, rel=1e-14, abs=0)
