"""Training losses of the paper, Eqs. (3)-(5), and ACM's own orthogonality penalty (design sections 1-2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["acm_penalty", "dissimilarity_loss", "loss_precision", "twin_loss", "twin_loss_terms"]


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


def twin_loss_terms(out, y: torch.Tensor, lam: float = 0.1) -> dict:
    """The terms of Eq. (5) for a :class:`osteo.models.TwinOutput` and labels ``y``.

    Returns tensors ``ce_s``, ``ce_t``, ``ce_f`` (cross-entropy of G_s, G_t and F, Eq. 3),
    ``dis`` (L_dis, Eq. 4) and ``total = ce_s + ce_t + ce_f + lam * dis``.
    """
    terms = {
        "ce_s": F.cross_entropy(loss_precision(out.logits_s), y),
        "ce_t": F.cross_entropy(loss_precision(out.logits_t), y),
        "ce_f": F.cross_entropy(loss_precision(out.logits_f), y),
        "dis": dissimilarity_loss(out.g_s, out.g_t),
    }
    terms["total"] = terms["ce_s"] + terms["ce_t"] + terms["ce_f"] + lam * terms["dis"]
    return terms


def twin_loss(out, y: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    """Eq. (5): ``CE(G_s) + CE(G_t) + CE(F) + lam * L_dis`` (a scalar; lam = 0 is "Ours - L_dis")."""
    return twin_loss_terms(out, y, lam)["total"]


def acm_penalty(acm_term: torch.Tensor, weight: float = 0.1) -> torch.Tensor:
    """ACM's orthogonality penalty ``weight * |mean over the batch of acm_term|`` (design section 2).

    ``acm_term`` is the (B,) sum of ``dp`` over ACM modules (``TwinNet.acm_term`` or
    :func:`osteo.acm.acm_orthogonality`). Not part of the paper's Eq. (5); reported on its own.
    """
    return weight * loss_precision(acm_term).mean().abs()
