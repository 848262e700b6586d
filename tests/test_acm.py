"""ACM (design section 2): the fast module against a literal loop re-computation, special cases, gradients, errors."""
import copy
import pickle

import pytest
import torch
from torch import nn

import torch.nn.functional as F

from osteo.acm import ACM, acm_orthogonality, block_diagonal, reference_acm_forward


def _acm(channels=64, groups=32, seed=0):
    torch.manual_seed(seed)
    m = ACM(channels, groups).double()
    with torch.no_grad():  # non-zero biases so they are exercised too
        for p in (m.kq.bias, m.p1.bias, m.p2.bias):
            p.normal_(0, 0.5)
    return m


@pytest.mark.parametrize("channels,groups,shape", [(64, 32, (2, 5, 7)), (128, 32, (3, 4, 4)), (48, 8, (1, 6, 3))])
def test_matches_loop_reference(channels, groups, shape):
    m = _acm(channels, groups)
    b, h, w = shape
    x = torch.randn(b, channels, h, w, dtype=torch.float64) * 2 + 0.5
    y, dp = m(x)
    y_ref, dp_ref = reference_acm_forward(m, x)
    assert y.shape == x.shape and dp.shape == (b,)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dp, dp_ref, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(y, x)  # the module does something


def test_channels_last_input_gives_the_same_output():
    m = _acm()
    x = torch.randn(2, 64, 6, 5, dtype=torch.float64)
    y, dp = m(x)
    y2, dp2 = m(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(dp2, dp)


@pytest.mark.parametrize("layout", ["member of a stack", "under vmap", "sliced channels-last"])
def test_any_layout_gives_the_same_output_and_only_channels_last_takes_the_dense_branch(layout, monkeypatch):
    """On the CPU a feature map stored neither contiguous nor channels-last (one member's slice of a
    stacked batch, as vmap hands the members of a batched run to ACM) takes the branch a contiguous
    map takes, the one a separate run takes; only a channels-last map takes the dense one (torch.bmm).
    Taking the dense branch there summed in another order and, amplified by batch norm and Adam,
    made batched runs drift from their separate runs. Same values to 1e-15 of the output's scale in
    float64 (measured: identical)."""
    from torch.func import functional_call, vmap

    m = _acm()
    x = torch.randn(3, 64, 6, 5, dtype=torch.float64) * 2 + 0.5
    y, dp = m(x)
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(1) or bmm(*a, **k))
    if layout == "member of a stack":
        stack = torch.stack([torch.zeros_like(x), x], dim=1)  # (B, N, C, H, W): each member strided
        xm = stack[:, 1]
        assert not xm.is_contiguous() and not xm.is_contiguous(memory_format=torch.channels_last)
        y2, dp2 = m(xm)
    elif layout == "under vmap":
        params = {k: torch.stack([v, v]) for k, v in m.named_parameters()}
        y2, dp2 = vmap(lambda p, xx: functional_call(m, p, (xx,)), in_dims=(0, 1))(
            params, torch.stack([x, x], dim=1))
        y2, dp2 = y2[1], dp2[1]
    else:
        big = torch.cat([x, x]).contiguous(memory_format=torch.channels_last)[::2]  # channels-last, strided batch
        y, dp = m(big.contiguous())
        y2, dp2 = m(big)
    assert bool(calls) == (layout == "sliced channels-last")  # the branch: what a separate run takes
    # float64; the branches add in another order (grouped matmul vs bmm), and other CPUs' kernels
    # may too: 64 roundings of the output's scale (measured here: identical, or ~1 rounding)
    tol = 64 * torch.finfo(torch.float64).eps
    torch.testing.assert_close(y2, y, rtol=0, atol=tol * float(y.abs().max()))
    torch.testing.assert_close(dp2, dp, rtol=0, atol=tol * float(dp.abs().max()))


def test_identity_when_k_equals_q_and_gate_open():
    m = _acm()
    with torch.no_grad():
        m.kq.weight[1::2] = m.kq.weight[0::2]  # Q map of each group := its K map
        m.kq.bias[1::2] = m.kq.bias[0::2]
        m.p2.weight.zero_()
        m.p2.bias.fill_(50.0)  # sigmoid(50) == 1.0 in float64
    x = torch.randn(2, 64, 5, 5, dtype=torch.float64)
    y, dp = m(x)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
    # K == Q, so dp = mean(K^2) > 0, and it still matches the reference
    _, dp_ref = reference_acm_forward(m, x)
    assert (dp > 0).all()
    torch.testing.assert_close(dp, dp_ref)


def test_zero_gate_zeroes_output():
    m = _acm()
    with torch.no_grad():
        m.p2.weight.zero_()
        m.p2.bias.fill_(-1e4)
    assert m(torch.randn(1, 64, 3, 3, dtype=torch.float64))[0].abs().max() == 0


def test_gradient_reaches_every_parameter_and_input():
    m = _acm()
    x = torch.randn(2, 64, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 64, 4, 4, dtype=torch.float64)
    y, dp = m(x)
    ((y * w).sum() + dp.sum()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_small_module(channels_last):
    m = _acm(channels=4, groups=2)
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64)
    if channels_last:  # the GPU layout takes the dense-matmul branch of acm_function
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(m, (x,))


@pytest.mark.parametrize("out_ch,in_ch,groups", [(64, 64, 32), (32, 64, 32), (64, 32, 32), (12, 8, 4)])
def test_block_diagonal_is_the_grouped_conv(out_ch, in_ch, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(in_ch, out_ch, 1, groups=groups, bias=False).double()
    x = torch.randn(3, in_ch, 5, 4, dtype=torch.float64)
    dense = block_diagonal(conv.weight, groups)
    assert dense.shape == (out_ch, in_ch)
    assert (dense != 0).sum() <= out_ch * in_ch // groups  # nothing outside the group blocks
    torch.testing.assert_close(F.conv2d(x, dense[:, :, None, None]), conv(x), rtol=1e-12, atol=1e-12)


def test_init_kaiming_fan_out_zero_bias():
    torch.manual_seed(0)
    m = ACM(512, 32)
    for conv in (m.kq, m.p1, m.p2):
        assert conv.bias.abs().max() == 0
    # kaiming normal, fan_out mode: std = sqrt(2 / out_channels) for 1x1 convs
    std = m.p1.weight.std().item()
    assert abs(std - (2 / 256) ** 0.5) / (2 / 256) ** 0.5 < 0.05


@pytest.mark.parametrize("channels,groups", [(48, 32), (64, 0), (32, 32), (63, 3)])
def test_bad_groups_raise(channels, groups):
    with pytest.raises(ValueError, match="osteo/acm.py"):
        ACM(channels, groups)


def test_forward_stores_nothing_and_copies_after_forward():
    """The term is returned, never kept on the module: a second forward cannot see a stale one,
    and deepcopy/pickle work right after a forward."""
    m = _acm()
    _, dp = m(torch.randn(1, 64, 3, 3, dtype=torch.float64))
    assert dp.grad_fn is not None
    assert not any(isinstance(v, torch.Tensor) and v.grad_fn is not None for v in vars(m).values())
    m2 = copy.deepcopy(m)
    m3 = pickle.loads(pickle.dumps(m))
    x = torch.randn(1, 64, 3, 3, dtype=torch.float64)
    for a, b in zip(m3(x), m(x)):
        torch.testing.assert_close(a, b)
    for a, b in zip(m2(x), m(x)):
        torch.testing.assert_close(a, b)


def test_acm_orthogonality_is_deprecated_and_says_where_the_term_is():
    with pytest.raises(RuntimeError, match=r"out.aux\['acm'\]"):
        acm_orthogonality(nn.Sequential(ACM(64)))
