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
backbone's buffers. The forward itself is not written again: the eager modules and this engine run
the same functions (:func:`osteo.acm.resnet_stem`, :func:`osteo.acm.acm_block`,
:func:`osteo.acm.backbone_features`, and the twin's own heads, ``TwinNet.output``, for Eq. 2), only
with each layer given as the grouped layer of all backbones.

:func:`grouped_twins_forward` does the same for several twins at once (2N backbones as one network),
for example Table 4's five fixed-alpha twins, which train on the same batches: the benchmark measures
whether that fills a large GPU better than training them one after the other.
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F
from torch import nn

from .acm import acm_block, acm_function, backbone_features, resnet_stem

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


def _grouped(fn, modules: list):
    return functools.partial(fn, list(modules))


def _block(blocks: list, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of every backbone as one grouped block (:func:`osteo.acm.acm_block`)."""
    b = blocks[0]
    downsample = None
    if b.downsample is not None:
        conv, bn = _grouped(_conv, [m.downsample[0] for m in blocks]), _grouped(_batch_norm, [m.downsample[1] for m in blocks])
        downsample = lambda x: bn(conv(x))  # noqa: E731
    return acm_block(
        x, _grouped(_conv, [m.conv1 for m in blocks]), _grouped(_batch_norm, [m.bn1 for m in blocks]),
        _grouped(_conv, [m.conv2 for m in blocks]), _grouped(_batch_norm, [m.bn2 for m in blocks]),
        _grouped(_acm, [_ACMWeights(m.acm) for m in blocks]), downsample,
    )


def _grouped_backbones(nets: list, xs: list) -> tuple[list, torch.Tensor]:
    """Backbones of one architecture as one grouped network, each on its own input; returns each
    one's pooled features and their ACM terms, (B, n) summed over the blocks."""
    x = torch.cat(xs, dim=1)
    if xs[0].is_contiguous(memory_format=torch.channels_last) and not xs[0].is_contiguous():
        x = x.contiguous(memory_format=torch.channels_last)
    stem = functools.partial(resnet_stem, conv1=_grouped(_conv, [n.conv1 for n in nets]),
                             bn1=_grouped(_batch_norm, [n.bn1 for n in nets]))
    blocks = [_grouped(_block, blocks) for blocks in zip(*(n.blocks() for n in nets))]
    g, dps = backbone_features(x, stem, blocks)
    return list(g.chunk(len(nets), dim=1)), functools.reduce(operator.add, dps)


def grouped_twins_forward(models: list, views: list) -> list:
    """``[m(x_s, x_t) for m, (x_s, x_t) in zip(models, views)]`` as ONE grouped network of all their
    backbones; returns ``[(TwinOutput, acm_term), ...]``, one per twin, as :func:`grouped_twin_forward`."""
    nets = [net for m in models for net in (m.G_s, m.G_t)]
    feats, acm_terms = _grouped_backbones(nets, [x for pair in views for x in pair])
    out = []
    for i, m in enumerate(models):
        o = m.output(feats[2 * i], feats[2 * i + 1], acm_terms[:, 2 * i] + acm_terms[:, 2 * i + 1])
        out.append((o, o.acm))
    return out


def grouped_twin_forward(model, x_s: torch.Tensor, x_t: torch.Tensor) -> tuple:
    """``model(x_s, x_t)`` computed as one grouped network; returns ``(TwinOutput, acm_term)``.

    ``acm_term`` is the output's ``acm`` (the (B,) sum of ACM's ``dp`` over the 16 modules of both
    backbones), as the eager forward returns it.
    """
    return grouped_twins_forward([model], [(x_s, x_t)])[0]
