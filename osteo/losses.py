"""Training losses of the paper, Eqs. (3)-(5), and ACM's own orthogonality penalty (design sections 1-2).

:func:`model_loss` is the one loss of every network: it reads a network's output
(:class:`osteo.models.ModelOutput`: heads' logits, features, auxiliary terms).
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F

__all__ = ["acm_penalty", "dissimilarity_loss", "loss_precision", "model_loss", "twin_loss", "twin_loss_terms"]


def loss_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the precision a loss is computed in: bfloat16/float16 (mixed precision) up to
    float32, float32 and float64 as they are (a float64 model keeps a float64 loss and gradient)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def dissimilarity_loss(g_s: torch.Tensor, g_t: torch.Tensor) -> torch.Tensor:
    """Eq. (4): ``L_dis = cos(g_s, g_t)``, averaged over the batch (features flattened to (B, D)).

    Minimising it pushes the two backbones' features apart (towards orthogonal or opposite).
    """
    if g_s.shape != g_t.shape:
        raise ValueError(f"osteo/losses.py: g_s {tuple(g_s.shape)} and g_t {tuple(g_t.shape)} differ in shape")
    return F.cosine_similarity(loss_precision(g_s.flatten(1)), loss_precision(g_t.flatten(1)), dim=1).mean()


def model_loss(out, y: torch.Tensor, lam: float = 0.1, acm_weight: float = 0.0) -> dict:
    """Every loss term of one batch for a network's output ``out``; ``total`` is what is minimised.

    - one cross-entropy per head (Eq. 3): ``ce`` for a network with one head, else ``ce_<head>``;
    - ``dis``, L_dis of Eq. (4), when the network has two or more features (their mean pairwise cosine;
      for the twin exactly cos(g_s, g_t));
    - ``total = sum of the cross-entropies + lam * dis``: Eq. (5) for the twin (lam = 0 is "Ours - L_dis");
    - ``acm = acm_weight * |mean of out.aux["acm"]|`` (:func:`acm_penalty`), added to ``total``, when
      the network has ACM modules and ``acm_weight`` is not 0; not part of Eq. (5).
    """
    logits = out.logits
    terms = {("ce" if len(logits) == 1 else f"ce_{h}"): F.cross_entropy(loss_precision(v), y) for h, v in logits.items()}
    ce = list(terms.values())
    feats = list(out.features.values())
    # every term before their sum: the order the graph is built in fixes the order in which backward
    # adds up gradients, and so the last bits of a float32 run
    if len(feats) >= 2:
        pairs = [dissimilarity_loss(a, b) for i, a in enumerate(feats) for b in feats[i + 1:]]
        terms["dis"] = pairs[0] if len(pairs) == 1 else torch.stack(pairs).mean()
    terms["total"] = functools.reduce(operator.add, ce)
    if "dis" in terms:
        terms["total"] = terms["total"] + lam * terms["dis"]
    acm = out.aux.get("acm")
    if acm is not None and acm_weight:
        terms["acm"] = acm_penalty(acm, acm_weight)
        terms["total"] = terms["total"] + terms["acm"]
    return terms


def twin_loss_terms(out, y: torch.Tensor, lam: float = 0.1) -> dict:
    """The terms of Eq. (5) for a :class:`osteo.models.TwinOutput` and labels ``y`` (:func:`model_loss`
    without the ACM term).

    Returns tensors ``ce_s``, ``ce_t``, ``ce_f`` (cross-entropy of G_s, G_t and F, Eq. 3),
    ``dis`` (L_dis, Eq. 4) and ``total = ce_s + ce_t + ce_f + lam * dis``.
    """
    return model_loss(out, y, lam=lam, acm_weight=0.0)


def twin_loss(out, y: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    """Eq. (5): ``CE(G_s) + CE(G_t) + CE(F) + lam * L_dis`` (a scalar; lam = 0 is "Ours - L_dis")."""
    return twin_loss_terms(out, y, lam)["total"]


def acm_penalty(acm_term: torch.Tensor, weight: float = 0.1) -> torch.Tensor:
    """ACM's orthogonality penalty ``weight * |mean over the batch of acm_term|`` (design section 2).

    ``acm_term`` is the (B,) sum of ``dp`` over ACM modules (``out.aux["acm"]`` of a network's
    output). Not part of the paper's Eq. (5); reported on its own.
    """
    return weight * loss_precision(acm_term).mean().abs()
