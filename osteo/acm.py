"""Attend-and-Compare Module (ACM; Kim et al., ECCV 2020) as used by the paper's backbones (design section 2).

This is OUR adaptation to ResNet18's BasicBlock: the official ACM code supports only Bottleneck
ResNets (and has no licence, so nothing here is copied from it). One module sits on the residual
branch of every BasicBlock, after ``bn2`` and before the identity is added (see
:func:`osteo.models.resnet18_acm`). For an input ``X`` (B x C x H x W), with ``mu`` the per-channel
spatial mean and ``X~ = X - mu``:

- K, Q: grouped 1x1 convs (C -> G maps each, bias), softmax over the H*W positions of each map;
  channel c of K (of Q) is the attention-weighted spatial mean of ``X~_c`` under its group's map.
  Because softmax ignores a constant per map, feeding the convs X or X~ gives the same maps;
- P: grouped 1x1 conv C -> C/2, ReLU, grouped 1x1 conv C/2 -> C, sigmoid, applied to ``mu``;
- ``Y = (X + K - Q) * P``; orthogonality term ``dp = mean over channels of K*Q`` (shape (B,)),
  RETURNED by the forward with ``Y`` (nothing is stored on the module). Training adds
  ``acm_weight * |batch mean of the dp summed over modules|`` (:func:`osteo.losses.acm_penalty`);
  the paper's Eq. (5) does not mention this term.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACM", "acm_block", "acm_function", "acm_orthogonality", "backbone_features", "block_diagonal",
           "reference_acm_forward", "resnet_stem"]


def block_diagonal(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The dense (O, I) matrix of a grouped 1x1 conv weight (O, I/groups, 1, 1): zeros off the group blocks.

    GPUs run a grouped 1x1 convolution with few channels per group far below their speed for a
    dense one (ACM's own code uses them, and they made a straightforward twin ~4x slower than two
    plain ResNet18s); a dense GEMM with a block-diagonal weight computes the same function
    with more, but fast, arithmetic. Built in one broadcast multiply, so gradients reach ``weight``.
    """
    o, ig = weight.shape[:2]
    w3 = weight.reshape(groups, o // groups, ig)
    eye = torch.eye(groups, dtype=weight.dtype, device=weight.device)
    return (w3.unsqueeze(2) * eye.view(groups, 1, groups, 1)).reshape(o, groups * ig)


def _channels_last(x: torch.Tensor) -> bool:
    """Whether (B, C, H, W) ``x`` is stored channels-last, read from its strides (inside vmap,
    ``is_contiguous(memory_format=...)`` cannot be asked)."""
    _, c, _, w = x.shape
    return x.stride()[1:] == (1, w * c, c)


def acm_function(x, kq_weight, kq_bias, p1_weight, p1_bias, p2_weight, p2_bias, groups: int, branches: int = 1):
    """ACM as a function of its input and weights (design section 2); returns ``(Y, dp)``, ``dp`` of shape (B,).

    ``branches`` > 1: ``x`` holds that many networks' feature maps side by side on the channel axis
    (:mod:`osteo.grouped`), and ``dp`` is each one's own term, of shape (B, branches).

    Same function as the module description above, arranged for speed: the grouped 1x1 convs are
    dense GEMMs with block-diagonal weights (:func:`block_diagonal`), and since each softmax map sums
    to one, ``K = A_K X - mu`` needs no centred copy of X (``K - Q = (A_K - A_Q) X``). The weighted
    means are one matmul per sample: grouped (a free view) for a contiguous X, dense then block
    diagonal for channels-last X, so neither layout copies the feature map. X in any other layout
    (one member's slice of a stacked batch, as :mod:`osteo.batched` hands it over under vmap) is
    copied into the branch a separate run of the kit takes on that device (grouped on the CPU,
    dense on CUDA, where the inputs are channels-last), so a batched run sums in the same order as
    its separate run. The twin's batched path
    (:mod:`osteo.grouped`) calls this with both branches' weights concatenated and ``2 * groups``.
    """
    b, c, h, w = x.shape
    g = groups
    mu = x.mean(dim=(2, 3))  # (B, C)
    logits = F.conv2d(x, block_diagonal(kq_weight, g)[:, :, None, None], kq_bias)  # (B, 2G, H, W)
    # X in neither layout (a member's slice of a stacked batch under vmap): the branch a separate run
    # takes on this device (its inputs are channels-last on CUDA, contiguous elsewhere; a 1x1 map
    # stored channels-last is also contiguous, so a separate run takes the grouped branch there)
    dense = not x.is_contiguous() and (_channels_last(x) or x.is_cuda and h * w > 1)
    if not dense:
        attn = logits.reshape(b, g, 2, h * w).softmax(dim=-1)  # [:, g, 0] group g's K map, [:, g, 1] its Q map
        agg = torch.matmul(attn, x.reshape(b, g, c // g, h * w).transpose(-1, -2))  # (B, G, 2, C/G)
        agg = agg.transpose(1, 2).reshape(b, 2, c)
    else:  # channels-last: (B, HW, C) is a free view; all groups at once, then keep each group's own block
        attn = logits.reshape(b, 2 * g, h * w).softmax(dim=-1)
        agg = torch.bmm(attn, x.permute(0, 2, 3, 1).reshape(b, h * w, c))  # (B, 2G, C)
        agg = agg.reshape(b, g, 2, g, c // g).diagonal(dim1=1, dim2=3)  # (B, 2, C/G, G)
        agg = agg.permute(0, 1, 3, 2).reshape(b, 2, c)
    k = agg[:, 0] - mu
    q = agg[:, 1] - mu
    hidden = F.relu(F.linear(mu, block_diagonal(p1_weight, g), p1_bias))
    p = torch.sigmoid(F.linear(hidden, block_diagonal(p2_weight, g), p2_bias))
    dp = (k * q).mean(dim=1) if branches == 1 else (k * q).reshape(b, branches, c // branches).mean(dim=2)
    return (x + (k - q)[:, :, None, None]) * p[:, :, None, None], dp


class ACM(nn.Module):
    """Attend-and-Compare Module on ``channels`` feature maps with ``groups`` attention maps per branch.

    K and Q logits come from ONE grouped conv ``kq`` (C -> 2G, groups G): output channel ``2g`` is
    group g's K map, ``2g + 1`` its Q map (the same as two separate C -> G grouped convs).
    ``p1``/``p2`` form the channel gate P. Kaiming-normal (fan_out, relu) init, zero bias.
    """

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        if groups < 1 or channels % groups:
            raise ValueError(f"osteo/acm.py: ACM groups ({groups}) must divide channels ({channels})")
        if channels % 2 or (channels // 2) % groups:
            raise ValueError(f"osteo/acm.py: ACM needs channels/2 ({channels / 2:g}) divisible by groups ({groups}) "
                             "for the grouped conv of P")
        self.channels, self.groups = channels, groups
        self.kq = nn.Conv2d(channels, 2 * groups, 1, groups=groups, bias=True)
        self.p1 = nn.Conv2d(channels, channels // 2, 1, groups=groups, bias=True)
        self.p2 = nn.Conv2d(channels // 2, channels, 1, groups=groups, bias=True)
        for m in (self.kq, self.p1, self.p2):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Y, dp)``: the gated features and the (B,) orthogonality term of this module."""
        return acm_function(x, self.kq.weight, self.kq.bias, self.p1.weight, self.p1.bias,
                            self.p2.weight, self.p2.bias, self.groups)


# ---- the ResNet18+ACM forward, written once -------------------------------------------------------
# These functions take the layers as callables, so the eager modules (:class:`osteo.models.ResNetACM`)
# and the grouped engine (:mod:`osteo.grouped`, each layer of several backbones run as one) compute
# the same forward.

def resnet_stem(x: torch.Tensor, conv1, bn1) -> torch.Tensor:
    """ResNet's stem: 7x7 conv, batch norm, ReLU, 3x3 max pool (stride 2)."""
    return F.max_pool2d(F.relu(bn1(conv1(x))), 3, 2, 1)


def acm_block(x: torch.Tensor, conv1, bn1, conv2, bn2, acm, downsample=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One BasicBlock with ACM on its residual branch (after ``bn2``, before the identity is added);
    returns ``(output, dp)`` with ``dp`` the ACM term of the block."""
    identity = x if downsample is None else downsample(x)
    out = F.relu(bn1(conv1(x)))
    out, dp = acm(bn2(conv2(out)))
    return F.relu(out + identity), dp


def backbone_features(x: torch.Tensor, stem, blocks) -> tuple[torch.Tensor, list]:
    """Stem, the blocks in order, global average pooling: the pooled feature (B, C) and each
    block's ACM term, in block order."""
    x = stem(x)
    dps = []
    for block in blocks:
        x, dp = block(x)
        dps.append(dp)
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), dps


def reference_acm_forward(module: ACM, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain, loop-based re-computation of ``module(x)`` (per sample, per group); returns ``(Y, dp)``.

    Deliberately slow and literal, for the tests: it reads the K/Q weights of group g from rows
    ``2g`` / ``2g + 1`` of ``module.kq`` and follows design section 2 step by step.
    """
    b, c, h, w = x.shape
    g = module.groups
    cg = c // g
    wkq = module.kq.weight[:, :, 0, 0]  # (2G, C/G)
    bkq = module.kq.bias
    ys, dps = [], []
    for i in range(b):
        xi = x[i]  # (C, H, W)
        mu = xi.mean(dim=(1, 2))  # (C,)
        xt = xi - mu[:, None, None]
        k = torch.zeros(c, dtype=x.dtype, device=x.device)
        q = torch.zeros(c, dtype=x.dtype, device=x.device)
        for j in range(g):
            xs = xt[j * cg:(j + 1) * cg].reshape(cg, h * w)  # this group's channels, (C/G, HW)
            logit_k = wkq[2 * j] @ xs + bkq[2 * j]
            logit_q = wkq[2 * j + 1] @ xs + bkq[2 * j + 1]
            ak = torch.exp(logit_k - logit_k.max())
            ak = ak / ak.sum()
            aq = torch.exp(logit_q - logit_q.max())
            aq = aq / aq.sum()
            for ch in range(cg):
                k[j * cg + ch] = (ak * xs[ch]).sum()
                q[j * cg + ch] = (aq * xs[ch]).sum()
        hidden = F.relu(module.p1(mu[None, :, None, None]))
        p = torch.sigmoid(module.p2(hidden))[0, :, 0, 0]
        ys.append((xi + (k - q)[:, None, None]) * p[:, None, None])
        dps.append((k * q).mean())
    return torch.stack(ys), torch.stack(dps)


def acm_orthogonality(model: nn.Module):
    """Deprecated: ACM modules no longer keep ``dp`` after a forward; the term is returned instead.

    Read it from the network's output: ``out.aux["acm"]`` (:class:`osteo.models.ModelOutput`; for the
    twin also ``out.acm``), or ``ACM.forward``'s second value.
    """
    raise RuntimeError("osteo/acm.py: acm_orthogonality is deprecated: ACM modules return their term; "
                       "read out.aux['acm'] of the network's output (osteo.models.run_model)")
