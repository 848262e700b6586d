"""What the notebooks print about themselves, and their one-line setup.

:func:`setup` (the notebooks' setup cell calls it) lets a returned :class:`matplotlib.figure.Figure`
display itself; :func:`setup_summary` says what a notebook runs with (profile, data, results
folder, torch, device, ImageNet weights); :func:`data_label` says whether numbers come from
synthetic data or yours; :func:`shown_path` prints a path without your machine's folders.
"""
from __future__ import annotations

import io
import os

import torch
from IPython import get_ipython
from matplotlib.figure import Figure

from .experiments import cpu_warning, shown_path
from .training import resolve_device
from .weights import status

__all__ = ["data_label", "figure_png", "setup", "setup_summary", "shown_path", "weights_note"]


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes: what Jupyter shows for a returned figure after :func:`setup`."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def setup() -> bool:
    """Let a returned Figure display itself as PNG in Jupyter, whatever the matplotlib backend.
    Returns False outside IPython (nothing to do there)."""
    ip = get_ipython()
    if ip is None or not hasattr(ip, "display_formatter"):
        return False
    ip.display_formatter.formatters["image/png"].for_type(Figure, figure_png)
    return True


def data_label(exp) -> str:
    """``"synthetic data"`` unless ``exp`` reads your own manifest (``data_source`` or ``OSTEO_DATA``):
    every figure and table of reproduced numbers says which."""
    return "your data" if (exp.data_source or os.environ.get("OSTEO_DATA")) else "synthetic data"


def setup_summary(exp) -> str:
    """What a notebook runs with: profile, data, results folder (relative), torch and the device."""
    p = exp.profile
    dev = resolve_device(p.device)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    if dev.type == "cpu" and torch.cuda.is_available():
        where += f" (a GPU is present; profile {p.name} trains on the CPU)"
    warning = cpu_warning(p)
    return "\n".join(([warning] if warning else []) + [
        f"profile {p.name}: {p.note}",
        f"  {p.n_per_class} slices per class, {p.image_size} px, {p.epochs} epochs (ViT {p.vit_epochs}), "
        f"batch {p.batch_size}, seeds {', '.join(map(str, p.seeds))}",
        f"data: {data_label(exp)}; results: {shown_path(exp.out)}",
        f"torch {torch.__version__}; training device: {where}",
        weights_note(),
    ])


def weights_note() -> str:
    """One plain line on the ImageNet weights (``pretrained="auto"``, the default): which files are in
    the torch cache, and what happens without them. Notebooks print it instead of showing the
    per-network warning that training from scratch gives."""
    rows = {r["file"]: r["state"] for r in status()}
    ok = sum(state == "verified" for state in rows.values())
    if ok == len(rows):
        return f"ImageNet weights: all {ok} files in the torch cache, verified"
    return (f"ImageNet weights: {ok} of {len(rows)} files in the torch cache; a network whose file is missing "
            f"tries one download, else trains from scratch (`osteo weights download`, or `osteo weights import` "
            f"on an offline machine: README)")
