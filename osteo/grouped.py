"""Both backbones of the twin network as ONE batched computation (the "grouped" engine).

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

:func:`grouped_twins_forward` does the same for several twins at once (2N backbones as one network),
for example Table 4's five fixed-alpha twins, which train on the same batches: the benchmark measures
whether that fills a large GPU better than training them one after the other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .acm import acm_function
from .models import TwinNet, TwinOutput

__all__ = ["grouped_twin_forward", "grouped_twins_forward"]


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
    """All backbones' ACM of one block; ``dp`` is (B, n): each backbone's own term."""
    cat = lambda name: torch.cat([getattr(m, name) for m in acms])  # noqa: E731
    return acm_function(
        x, cat("kq_weight"), cat("kq_bias"), cat("p1_weight"), cat("p1_bias"), cat("p2_weight"), cat("p2_bias"),
        acms[0].groups * len(acms), branches=len(acms),
    )


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


def _grouped_backbones(nets: list, xs: list) -> tuple[list, torch.Tensor]:
    """Backbones of one architecture as one grouped network, each on its own input; returns each
    one's pooled features and their ACM terms, (B, n) summed over the blocks."""
    x = torch.cat(xs, dim=1)
    if xs[0].is_contiguous(memory_format=torch.channels_last) and not xs[0].is_contiguous():
        x = x.contiguous(memory_format=torch.channels_last)
    x = F.relu(_batch_norm([n.bn1 for n in nets], _conv([n.conv1 for n in nets], x)))
    x = F.max_pool2d(x, 3, 2, 1)
    acm_terms = None
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for blocks in zip(*(getattr(n, name) for n in nets)):
            x, dp = _block(list(blocks), x)
            acm_terms = dp if acm_terms is None else acm_terms + dp
    g = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    return list(g.chunk(len(nets), dim=1)), acm_terms


def grouped_twins_forward(models: list, views: list) -> list:
    """``[m(x_s, x_t) for m, (x_s, x_t) in zip(models, views)]`` as ONE grouped network of all their
    backbones; returns ``[(TwinOutput, acm_term), ...]``, one per twin, as :func:`grouped_twin_forward`."""
    nets = [net for m in models for net in (m.G_s, m.G_t)]
    feats, acm_terms = _grouped_backbones(nets, [x for pair in views for x in pair])
    out = []
    for i, m in enumerate(models):
        g_s, g_t = feats[2 * i], feats[2 * i + 1]
        fused = m.alpha * g_s + (1 - m.alpha) * g_t
        out.append((TwinOutput(m.head_s(g_s), m.head_t(g_t), m.head_f(fused), g_s, g_t),
                    acm_terms[:, 2 * i] + acm_terms[:, 2 * i + 1]))
    return out


def grouped_twin_forward(model: TwinNet, x_s: torch.Tensor, x_t: torch.Tensor) -> tuple[TwinOutput, torch.Tensor]:
    """``model(x_s, x_t)`` computed as one grouped network; returns ``(TwinOutput, acm_term)``.

    ``acm_term`` is what ``model.acm_term`` holds after a plain forward (the (B,) sum of ACM's
    ``dp`` over the 16 modules of both backbones); this path does not set the modules' ``dp``.
    """
    return grouped_twins_forward([model], [(x_s, x_t)])[0]
