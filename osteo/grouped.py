"""Both backbones of the twin network as ONE batched computation (the "grouped" engine of issue 4).

``TwinNet.forward`` runs ``G_s(x_s)`` and then ``G_t(x_t)``: two networks one after the other, each
too small to fill a large GPU. Two networks of the same architecture side by side are one network
of twice the width whose every layer is split into two independent groups: stack the inputs on
the channel axis, ``[x_s, x_t]`` (B, 6, H, W), concatenate each pair of weights on the output axis
and run every convolution with twice its groups (ACM with ``2 * groups``, batch norm over the
concatenated channels). Channels ``0..C-1`` of every feature map are then ``G_s``'s, ``C..2C-1``
``G_t``'s, and the pooled features split into ``g_s`` and ``g_t``.

:func:`grouped_twin_forward` computes exactly ``TwinNet.forward`` (tests compare logits, features,
gradients and batch-norm statistics) with the model's own parameters: the weights are concatenated
inside the forward, so gradients flow back to ``G_s`` and ``G_t``, and state dicts, checkpoints and
optimisers are the same for both engines. Batch-norm running statistics are written back to each
backbone's buffers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .acm import acm_function
from .models import TwinNet, TwinOutput

__all__ = ["grouped_twin_forward"]


def _conv(convs: list[nn.Conv2d], x: torch.Tensor) -> torch.Tensor:
    c = convs[0]
    weight = torch.cat([m.weight for m in convs])
    bias = None if c.bias is None else torch.cat([m.bias for m in convs])
    return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups * len(convs))


def _batch_norm(bns: list[nn.BatchNorm2d], x: torch.Tensor) -> torch.Tensor:
    b = bns[0]
    weight = torch.cat([m.weight for m in bns])
    bias = torch.cat([m.bias for m in bns])
    mean = torch.cat([m.running_mean for m in bns])
    var = torch.cat([m.running_var for m in bns])
    if not b.training:
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, b.eps)
    if b.momentum is None:
        raise ValueError("osteo/grouped.py: batch norm with momentum=None (cumulative average) is not supported")
    out = F.batch_norm(x, mean, var, weight, bias, True, b.momentum, b.eps)  # updates the concatenated copies
    with torch.no_grad():
        n = b.num_features
        for i, m in enumerate(bns):  # ... so write them back to each backbone
            m.running_mean.copy_(mean[i * n : (i + 1) * n])
            m.running_var.copy_(var[i * n : (i + 1) * n])
            m.num_batches_tracked.add_(1)
    return out


def _acm(acms: list, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cat = lambda name: torch.cat([getattr(m, name) for m in acms])  # noqa: E731
    y, dp = acm_function(
        x, cat("kq_weight"), cat("kq_bias"), cat("p1_weight"), cat("p1_bias"), cat("p2_weight"), cat("p2_bias"),
        acms[0].groups * len(acms),
    )
    return y, dp * len(acms)  # dp is the mean over all n*C channels; the twin term is the sum of the n means


class _ACMWeights:
    """The weights of one ACM under flat names (``kq_weight`` ...), for :func:`_acm`."""

    def __init__(self, m):
        self.groups = m.groups
        self.kq_weight, self.kq_bias = m.kq.weight, m.kq.bias
        self.p1_weight, self.p1_bias = m.p1.weight, m.p1.bias
        self.p2_weight, self.p2_bias = m.p2.weight, m.p2.bias


def _block(blocks: list, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = blocks[0]
    if b.downsample is None:
        identity = x
    else:
        identity = _batch_norm([m.downsample[1] for m in blocks], _conv([m.downsample[0] for m in blocks], x))
    out = F.relu(_batch_norm([m.bn1 for m in blocks], _conv([m.conv1 for m in blocks], x)))
    out = _batch_norm([m.bn2 for m in blocks], _conv([m.conv2 for m in blocks], out))
    out, dp = _acm([_ACMWeights(m.acm) for m in blocks], out)
    return F.relu(out + identity), dp


def grouped_twin_forward(model: TwinNet, x_s: torch.Tensor, x_t: torch.Tensor) -> tuple[TwinOutput, torch.Tensor]:
    """``model(x_s, x_t)`` computed as one grouped network; returns ``(TwinOutput, acm_term)``.

    ``acm_term`` is what ``model.acm_term`` holds after a plain forward (the (B,) sum of ACM's
    ``dp`` over the 16 modules of both backbones); this path does not set the modules' ``dp``.
    """
    nets = [model.G_s, model.G_t]
    x = torch.cat([x_s, x_t], dim=1)
    if x_s.is_contiguous(memory_format=torch.channels_last) and not x_s.is_contiguous():
        x = x.contiguous(memory_format=torch.channels_last)
    x = F.relu(_batch_norm([n.bn1 for n in nets], _conv([n.conv1 for n in nets], x)))
    x = F.max_pool2d(x, 3, 2, 1)
    acm_term = None
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for blocks in zip(*(getattr(n, name) for n in nets)):
            x, dp = _block(list(blocks), x)
            acm_term = dp if acm_term is None else acm_term + dp
    g = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    g_s, g_t = g.chunk(2, dim=1)
    fused = model.alpha * g_s + (1 - model.alpha) * g_t
    return TwinOutput(model.head_s(g_s), model.head_t(g_t), model.head_f(fused), g_s, g_t), acm_term
