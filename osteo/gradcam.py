"""Grad-CAM (Selvaraju et al., 2017) for the maps of the paper's Fig. 4 (design section 4).

``cam = ReLU(sum_c w_c * A_c)`` with ``A`` the activations of a target layer and ``w_c`` the
spatial mean of d(logit of the target class)/dA_c; then bilinearly upsampled to the input size
and min-max normalised per sample to [0, 1] (both optional). Works on any callable returning
logits, e.g. ``lambda a, b: twin(a, b).logits_s`` with layer ``twin.G_s.layer4[-1]``. A layer may
return a tuple whose first item is the maps (the ACM blocks return ``(output, dp)``).

The forward hook hands the rest of the network a detached copy of the layer's output that
requires grad, and the gradient is taken with ``torch.autograd.grad``: no parameter ``.grad`` is
touched, requires_grad flags and train/eval mode are left as they are (call ``model.eval()``
yourself: in train mode BatchNorm statistics would update), and maps come even from frozen nets.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GradCAM", "grad_cam", "overlay"]


class GradCAM:
    """Context manager holding a forward hook on ``layer``; call it like ``fn`` plus ``target``.

    >>> with GradCAM(lambda x: model(x), model.layer4[-1]) as cam:
    ...     maps = cam(x, target=y)          # (B, H, W) in [0, 1]

    ``close()`` (or leaving the ``with`` block) removes the hook. If ``layer`` runs several times
    in one forward, the last call is used. Token outputs (B, 1 + h*w, D) of a ViT layer are
    reshaped to (B, D, h, w) after dropping the class token.
    """

    def __init__(self, fn, layer: nn.Module):
        self.fn, self.layer = fn, layer
        self._act: torch.Tensor | None = None
        self._handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        # a block that returns (maps, extra terms), as the ACM blocks return (output, dp): the maps are the first
        rest = None
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            output, rest = output[0], output[1:]
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"osteo/gradcam.py: the Grad-CAM layer {type(module).__name__} must output one tensor, "
                            f"got {type(output).__name__}")
        act = output.detach().requires_grad_(True)
        self._act = act
        return act if rest is None else (act, *rest)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._act = None

    def __enter__(self) -> "GradCAM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, *inputs: torch.Tensor, target, normalize: bool = True, upsample: bool = True) -> torch.Tensor:
        """Grad-CAM maps (B, H, W) for class ``target`` (int or LongTensor of B classes).

        ``upsample=False`` keeps the layer's resolution; ``normalize=False`` skips the min-max
        scaling (the raw ReLU'd map, as captum's ``LayerGradCam(relu_attributions=True)``).
        """
        if self._handle is None:
            raise RuntimeError("osteo/gradcam.py: this GradCAM is closed")
        self._act = None
        try:
            with torch.enable_grad():
                logits = self.fn(*inputs)
                act = self._act
                if act is None:
                    raise RuntimeError(f"osteo/gradcam.py: the layer {type(self.layer).__name__} did not run in fn(*inputs)")
                if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                    raise ValueError("osteo/gradcam.py: fn(*inputs) must return logits of shape (B, K), got "
                                     f"{getattr(logits, 'shape', type(logits).__name__)}")
                tgt = _target(target, logits)
                score = logits.gather(1, tgt[:, None]).sum()
                (grad,) = torch.autograd.grad(score, act, allow_unused=True)
        finally:
            self._act = None
        act = act.detach().float()
        grad = torch.zeros_like(act) if grad is None else grad.float()
        act, grad = _as_maps(act), _as_maps(grad)
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * act).sum(dim=1))  # (B, h, w)
        if upsample:
            cam = F.interpolate(cam[:, None], size=tuple(inputs[0].shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
        if normalize:
            flat = cam.flatten(1)
            lo = flat.min(dim=1).values[:, None, None]
            hi = flat.max(dim=1).values[:, None, None]
            span = hi - lo
            cam = ((cam - lo) / torch.where(span > 0, span, torch.ones_like(span))).clamp(0, 1)  # constant map -> 0
        return cam


def _target(target, logits: torch.Tensor) -> torch.Tensor:
    b, k = logits.shape
    if isinstance(target, (list, tuple)):
        target = torch.as_tensor(target)
    if isinstance(target, torch.Tensor):
        t = target.to(device=logits.device, dtype=torch.long).reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
    else:
        t = torch.full((b,), int(target), dtype=torch.long, device=logits.device)
    if t.shape != (b,):
        raise ValueError(f"osteo/gradcam.py: target must be an int or {b} class indices, got shape {tuple(t.shape)}")
    if (t < 0).any() or (t >= k).any():
        raise ValueError(f"osteo/gradcam.py: target classes must lie in [0, {k}), got {t.tolist()}")
    return t


def _as_maps(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) as is; ViT tokens (B, 1 + h*w, D) -> (B, D, h, w) without the class token."""
    if x.dim() == 4:
        return x
    if x.dim() == 3:
        n = x.shape[1] - 1
        side = math.isqrt(n)
        if side * side == n:
            return x[:, 1:].reshape(x.shape[0], side, side, x.shape[2]).permute(0, 3, 1, 2)
    raise ValueError(f"osteo/gradcam.py: Grad-CAM needs (B, C, h, w) maps or ViT tokens (B, 1+h*w, D), got {tuple(x.shape)}")


def grad_cam(fn, layer: nn.Module, *inputs: torch.Tensor, target, normalize: bool = True,
             upsample: bool = True) -> torch.Tensor:
    """Functional Grad-CAM: ``fn(*inputs)`` returns logits (B, K); maps (B, H, W) at ``inputs[0]``'s size.

    ReLU, bilinear upsampling and per-sample min-max to [0, 1] (all-zero maps stay zero). The hook
    on ``layer`` is removed afterwards, also on error.
    """
    with GradCAM(fn, layer) as cam:
        return cam(*inputs, target=target, normalize=normalize, upsample=upsample)


def overlay(ax, image, cam=None, alpha: float = 0.4, title: str | None = None, fontsize=None) -> None:
    """Draw a Grad-CAM map over a grey slice on a matplotlib axis: the one drawing of Fig. 4's maps
    (``osteo predict --gradcam`` and :func:`osteo.plots.gradcam_grid` both use it).

    ``image``: the windowed slice (H, W), grey levels 0-255; ``cam``: the map (H, W) in [0, 1] shown
    with the jet colour map at opacity ``alpha`` (None: the slice alone). Ticks are hidden (axis
    labels stay, for row titles).
    """
    ax.imshow(_numpy(image), cmap="gray", vmin=0, vmax=255)
    if cam is not None:
        ax.imshow(_numpy(cam), cmap="jet", vmin=0, vmax=1, alpha=alpha)
    ax.set_xticks([]), ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=fontsize)


def _numpy(x):
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else x
