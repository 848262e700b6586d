"""HU windowing, Eq. (1) of the paper, and the two views ``x_s`` and ``x_t``.

Eq. (1): ``p = 255 * (HU - HU_min) / (HU_max - HU_min)``, clipped to [0, 255], with
``HU_max = 1024``. The narrow view ``x_s`` uses ``HU_min = -128`` ("less texture"), the wide view
``x_t`` uses ``HU_min = -450``.

We keep the result in float32 rather than quantising to uint8 as an 8-bit image would be: the
classes differ by only ~30-60 HU, which is 5-13 grey levels after Eq. (1) (design section 3).
"""
from __future__ import annotations

import numpy as np
import torch

HU_MAX = 1024.0
HU_MIN_S = -128.0  # x_s: narrow window
HU_MIN_T = -450.0  # x_t: wide window
VIEW_HU_MIN = {"s": HU_MIN_S, "t": HU_MIN_T}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def window(hu, hu_min: float, hu_max: float = HU_MAX, bits: int | None = None):
    """Eq. (1): map HU to [0, 255] grey values, clipped, as float32.

    NumPy in gives NumPy out; a torch tensor gives a float32 tensor on the same device.
    ``bits=8`` rounds p to the 256 integer levels 0..255 an 8-bit image (a PNG export) keeps
    (half to even); p is then computed as ``(HU - HU_min) * 255 / (HU_max - HU_min)``, so that for
    integer HU the rounding is that of the exact value. ``None`` (the default) keeps p in float.
    """
    if hu_max <= hu_min:
        raise ValueError(f"window needs hu_max > hu_min, got hu_min={hu_min}, hu_max={hu_max}")
    if bits not in (None, 8):
        raise ValueError(f"window: bits must be None (float) or 8, got {bits!r}")
    if bits == 8:
        # For integer HU and window limits, (HU - HU_min) * 255 is exact in float32 (< 2**24) and one
        # correctly rounded division gives the float nearest the exact p. Exact p is either on a half
        # (then the float is exact too) or at least 1 / (2 (HU_max - HU_min)) >= 2e-4 from it, far
        # beyond float32's error near 255 (1.5e-5): the rounding is that of the exact value.
        span = float(hu_max - hu_min)
        if isinstance(hu, torch.Tensor):
            return ((hu.float() - hu_min) * 255.0 / span).clamp_(0.0, 255.0).round_()
        out = (np.asarray(hu, dtype=np.float32) - np.float32(hu_min)) * np.float32(255.0) / np.float32(span)
        return np.rint(np.clip(out, 0.0, 255.0)).astype(np.float32, copy=False)
    scale = 255.0 / (hu_max - hu_min)
    if isinstance(hu, torch.Tensor):
        return ((hu.float() - hu_min) * scale).clamp_(0.0, 255.0)
    out = (np.asarray(hu, dtype=np.float32) - np.float32(hu_min)) * np.float32(scale)
    return np.clip(out, 0.0, 255.0).astype(np.float32, copy=False)


def two_views(hu):
    """Return ``(x_s, x_t)``: the slice windowed with HU_min = -128 and with HU_min = -450."""
    return window(hu, HU_MIN_S), window(hu, HU_MIN_T)


def to_network_input(hu: torch.Tensor, view: str, bits: int | None = None) -> torch.Tensor:
    """HU batch (B, H, W) -> normalised 3-channel network input (B, 3, H, W), float32.

    Windows with Eq. (1) for ``view`` ('s' or 't'; ``bits=8``: rounded to 256 levels, see
    :func:`window`), scales to [0, 1], replicates the grey slice to three channels and normalises
    with ImageNet mean/std (design section 3). Runs on the tensor's device, so on a GPU the data never
    leaves it.
    """
    if view not in VIEW_HU_MIN:
        raise ValueError(f"unknown view {view!r}: use 's' (HU_min -128) or 't' (HU_min -450)")
    grey = window(hu, VIEW_HU_MIN[view], bits=bits).div_(255.0).unsqueeze(1)  # (B, 1, H, W)
    # Python-number arithmetic per channel: a mean/std tensor built here would be copied from the
    # host to the GPU on every batch, a synchronisation inside the training loop.
    return torch.cat([(grey - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], dim=1)
