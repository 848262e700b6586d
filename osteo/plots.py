"""Figures for the notebooks: small functions that each return a :class:`matplotlib.figure.Figure`.

Figures are built with ``matplotlib.figure.Figure`` directly, not with ``pyplot``: nothing is shown
or kept open behind your back (no ``plt.show``, no figure registry filling up memory in a long
batch), and every function works headless (Agg). In a notebook a returned figure displays itself
as the cell's last expression once :func:`osteo.notebook.setup` ran (the notebooks' setup cell calls
it); :func:`save_figure` writes it as PNG.

Titles and labels carry class names, model names and slice numbers only, never patient
identifiers.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from pydicom.data import get_testdata_file
from scipy.ndimage import gaussian_filter

from .ct_noise import radial_nps
from .dicom import read_hu
from .manifest import LABELS as DEFAULT_LABELS  # the classes, ordered (design section 1)
from .windowing import HU_MAX, VIEW_HU_MIN, window

VIEW_NAME = {"s": "x_s (HU -128..1024)", "t": "x_t (HU -450..1024)"}
CLASS_COLOURS = ("tab:green", "tab:orange", "tab:red")
PAPER_COLOUR, OURS_COLOUR = "0.7", "tab:blue"
#: The columns of a paper table the notebooks show (all are in the saved JSON and REPORT.md).
TABLE_COLUMNS = ["model", "paper_acc", "acc", "ci95_low", "ci95_high", "seed_sd", "per_seed", "gap_to_paper", "interval",
                 "pretrained"]
#: The columns of a paired table (the paper's claims "A beats B") the notebooks show.
PAIRED_COLUMNS = ["a", "b", "seed", "paper_diff", "diff", "ci95_low", "ci95_high", "p_value", "mdd80", "holds"]


def _grid(nrows: int, ncols: int, w: float = 2.6, h: float = 2.6, **kw):
    fig = Figure(figsize=(max(3.0, w * ncols), max(2.5, h * nrows)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _colour(i: int) -> str:
    return CLASS_COLOURS[i % len(CLASS_COLOURS)]


def save_figure(fig: Figure, path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG at ``path`` (folders are created); returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG: {path.name} should end in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


# ---- data and windows ---------------------------------------------------------------------------
def show_slices(hu_list, titles=None, windows=("s", "t"), per_row: int | None = None) -> Figure:
    """Slices in HU, one column each, one row per window of Eq. (1) (``'s'``: x_s, ``'t'``: x_t).

    More than ``per_row`` slices (default: all up to 4, else 3) wrap into blocks of rows, so that
    every panel, and its title, stays readable on a laptop screen.
    """
    hu_list = [np.asarray(h, dtype=np.float32) for h in hu_list]
    if not hu_list:
        raise ValueError("show_slices needs at least one slice")
    titles = list(titles) if titles is not None else [f"slice {i + 1}" for i in range(len(hu_list))]
    if len(titles) != len(hu_list):
        raise ValueError(f"show_slices: {len(hu_list)} slices but {len(titles)} titles")
    n = len(hu_list)
    if per_row is None:
        per_row = n if n <= 4 else 3
    if per_row < 1:
        raise ValueError(f"show_slices: per_row must be at least 1, got {per_row}")
    per_row = min(per_row, n)
    blocks = -(-n // per_row)
    fig, axes = _grid(len(windows) * blocks, per_row, w=2.2, h=2.2)
    for ax in axes.flat:
        ax.set_axis_off()
    for i, hu in enumerate(hu_list):
        b, c = divmod(i, per_row)
        for k, w in enumerate(windows):
            if w not in VIEW_HU_MIN:
                raise ValueError(f"unknown window {w!r}: use 's' or 't'")
            ax = axes[b * len(windows) + k, c]
            ax.set_axis_on()
            ax.imshow(window(hu, VIEW_HU_MIN[w]), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([]), ax.set_yticks([])
            if k == 0:
                ax.set_title(titles[i], fontsize=11)
            if c == 0:
                ax.set_ylabel(VIEW_NAME[w], fontsize=11)
    return fig


def _values_by_class(data, column: str, label_column: str) -> dict:
    if isinstance(data, dict):
        return {str(k): np.asarray(v, dtype=float) for k, v in data.items()}
    if column not in data.columns:
        raise KeyError(f"no column {column!r} in the table (columns: {', '.join(map(str, data.columns))})")
    present = list(data[label_column].unique())
    order = [lab for lab in DEFAULT_LABELS if lab in present] + [lab for lab in present if lab not in DEFAULT_LABELS]
    return {str(lab): data.loc[data[label_column] == lab, column].to_numpy(float) for lab in order}


def hu_histograms(data, column: str = "trabecular_hu", label_column: str = "label", bins: int = 30) -> Figure:
    """Histogram of a HU measure per class (a DataFrame with ``label`` and ``column``, or a dict
    class -> values), with each class mean as a dashed line."""
    by_class = _values_by_class(data, column, label_column)
    allv = np.concatenate([v for v in by_class.values() if v.size])
    edges = np.histogram_bin_edges(allv, bins=bins)
    fig, axes = _grid(1, 1, w=6.0, h=3.4)
    ax = axes[0, 0]
    for i, (lab, v) in enumerate(by_class.items()):
        ax.hist(v, bins=edges, alpha=0.45, color=_colour(i), label=f"{lab} (n={v.size}, mean {v.mean():.0f} HU)")
        ax.axvline(v.mean(), color=_colour(i), ls="--", lw=1.5)
    ax.set_xlabel(f"{column} (HU)")
    ax.set_ylabel("slices")
    ax.legend(fontsize=8)
    return fig


def window_comparison(hu, hu_range=(-1100, 1300)) -> Figure:
    """One slice as x_s and as x_t side by side, and the two transfer curves of Eq. (1)."""
    hu = np.asarray(hu, dtype=np.float32)
    fig, axes = _grid(1, 3, w=3.2, h=3.2)
    for ax, v in zip(axes[0, :2], ("s", "t")):
        ax.imshow(window(hu, VIEW_HU_MIN[v]), cmap="gray", vmin=0, vmax=255)
        ax.set_title(VIEW_NAME[v], fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    ax = axes[0, 2]
    grid = np.linspace(hu_range[0], hu_range[1], 481, dtype=np.float32)
    for v, ls in (("s", "-"), ("t", "--")):
        ax.plot(grid, window(grid, VIEW_HU_MIN[v]), ls, label=f"{VIEW_NAME[v].split()[0]}: HU_min {VIEW_HU_MIN[v]:.0f}")
    ax.axvline(HU_MAX, color="0.5", lw=0.8)
    ax.set_xlabel("HU")
    ax.set_ylabel("grey level, Eq. (1)")
    ax.set_title("Eq. (1) transfer curves", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def grey_levels_between_classes(class_hu: dict, windows=("s", "t")) -> Figure:
    """Why we keep float windows: the class means of trabecular HU (``{class: mean HU}``) mapped by
    Eq. (1). Left: the transfer curve in float and quantised to uint8 over the classes' HU range;
    right: grey levels between neighbouring classes in each window (bar heights)."""
    labs = list(class_hu)
    hus = np.array([float(class_hu[k]) for k in labs])
    if len(labs) < 2:
        raise ValueError("grey_levels_between_classes needs at least two classes")
    fig, axes = _grid(1, 2, w=4.0, h=3.4)
    ax = axes[0, 0]
    lo, hi = hus.min() - 25, hus.max() + 25
    grid = np.linspace(lo, hi, 600, dtype=np.float32)
    for v, ls in zip(windows, ("-", "--")):
        g = window(grid, VIEW_HU_MIN[v])
        ax.plot(grid, g, ls, lw=1.2, label=f"{v}: float")
        ax.step(grid, np.floor(g), where="post", lw=0.8, alpha=0.7, label=f"{v}: uint8")
    for i, h in enumerate(hus):
        ax.axvline(h, color=_colour(i), ls=":", lw=1.2)
    ax.set_xlabel("HU")
    ax.set_ylabel("grey level")
    ax.set_title("class means on the Eq. (1) curve", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    pairs = [f"{labs[i]}\nvs {labs[i + 1]}" for i in range(len(labs) - 1)]
    x = np.arange(len(pairs))
    width = 0.8 / len(windows)
    for j, v in enumerate(windows):
        g = window(hus, VIEW_HU_MIN[v])
        gaps = np.abs(np.diff(g))
        bars = ax.bar(x + (j - (len(windows) - 1) / 2) * width, gaps, width, label=VIEW_NAME[v])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, pairs, fontsize=8)
    ax.set_ylabel("grey levels between class means")
    ax.set_title("of 256 levels", fontsize=9)
    ax.legend(fontsize=7)
    return fig


# ---- training ------------------------------------------------------------------------------------
def loss_curves(history: list, title=None) -> Figure:
    """Each loss term (``loss_*`` in a TrainResult's history) per epoch, Eqs. (3)-(5)."""
    if not history:
        raise ValueError("loss_curves: the history is empty")
    keys = [k for k in history[0] if k.startswith("loss_")]
    if not keys:
        raise ValueError("loss_curves: the history has no loss_* entries")
    epochs = [h["epoch"] for h in history]
    fig, axes = _grid(1, 1, w=6.0, h=3.6)
    ax = axes[0, 0]
    for k in keys:
        ax.plot(epochs, [h[k] for h in history], "o-" if len(epochs) < 20 else "-", ms=3,
                lw=2.2 if k == "loss_total" else 1.2, label=k[5:])
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("training loss (mean over the epoch)")
    ax.legend(fontsize=8, ncol=2)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def alpha_curve(history: list, initial: float = 0.5, title=None) -> Figure:
    """The learnable fusion weight alpha of Eq. (2) after each epoch; dashed: its initial value."""
    if not history or "alpha" not in history[0]:
        raise ValueError("alpha_curve: the history has no alpha (only the twin network has one)")
    fig, axes = _grid(1, 1, w=5.0, h=3.2)
    ax = axes[0, 0]
    ax.plot([h["epoch"] for h in history], [h["alpha"] for h in history], "o-", ms=3, label="alpha")
    ax.axhline(initial, color="0.5", ls="--", lw=1, label=f"initial {initial}")
    ax.set_ylim(0, 1)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("alpha (weight of g_s)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def cosine_curves(runs: dict, title=None) -> Figure:
    """cos(g_s, g_t) of twin runs over training, one line per entry of ``runs`` ({label: TrainResult
    or a list of them, one per seed: their mean}): at epoch 0 the cosine on the first batch before
    any update (``cos_start`` of the history), then ``loss_dis`` of each epoch (the mean over its
    batches, Eq. 4). The dissimilarity loss pushes this down; near 0 the features are orthogonal.
    Labels that differ only after their last comma ("Ours, independent", "Ours, shared") share a
    colour; a label with "shared" in it is dashed."""
    if not runs:
        raise ValueError("cosine_curves: give at least one run")
    fig, axes = _grid(1, 1, w=6.4, h=3.8)
    ax = axes[0, 0]
    colours = {}
    for label, res in runs.items():
        colour = colours.setdefault(str(label).rsplit(",", 1)[0], f"C{len(colours)}")
        res = list(res) if isinstance(res, (list, tuple)) else [res]
        curves = []
        for r in res:
            h = r.history
            if not h or "loss_dis" not in h[0]:
                raise ValueError(f"cosine_curves: {label!r} has no cos(g_s, g_t) in its history (only the twin has one)")
            start = [h[0]["cos_start"]] if "cos_start" in h[0] else [np.nan]
            curves.append(start + [e["loss_dis"] for e in h])
        if len({len(c) for c in curves}) != 1:
            raise ValueError(f"cosine_curves: the runs of {label!r} have different numbers of epochs")
        a = np.array(curves, dtype=float)
        seen = np.isfinite(a).sum(0)  # runs made before cos_start was kept have none at epoch 0
        y = np.divide(np.nansum(a, 0), seen, out=np.full(a.shape[1], np.nan), where=seen > 0)
        ax.plot(np.arange(len(y)), y, marker="o" if len(y) < 25 else None, ms=3, lw=1.5, color=colour, label=label,
                ls="--" if "shared" in str(label) else "-")  # a shared start dashed
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.05)
    ax.set_xlabel("epoch (0: before the first update)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cos(g_s, g_t)")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def confusion(cm, labels=DEFAULT_LABELS, title=None) -> Figure:
    """Confusion matrix (rows: true class, columns: predicted), counts written in each cell and the
    colour the row fraction. ``cm`` may also be a dict ``{panel title: cm}``: one panel each, and
    ``title`` goes above them all."""
    mats = cm if isinstance(cm, dict) else {title or "": cm}
    fig, axes = _grid(1, len(mats), w=3.3, h=3.1)
    for ax, (name, m) in zip(axes[0], mats.items()):
        m = np.asarray(m)
        k = m.shape[0]
        if m.shape != (k, k) or len(labels) != k:
            raise ValueError(f"confusion: matrix {m.shape} does not fit {len(labels)} labels")
        rows = m.sum(1, keepdims=True)
        frac = np.divide(m, rows, out=np.zeros(m.shape, float), where=rows > 0)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(m[i, j])), ha="center", va="center",
                        color="white" if frac[i, j] > 0.6 else "black", fontsize=9)
        ax.set_xticks(range(k), labels, rotation=30, fontsize=8)
        ax.set_yticks(range(k), labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if name:
            ax.set_title(name, fontsize=9)
    if title and isinstance(cm, dict):
        fig.suptitle(title, fontsize=10)
    return fig


# ---- tables and figures of the paper -------------------------------------------------------------
def table_bars(df, title=None, ours_label: str = "reproduced", chance: float | None = 100 / 3) -> Figure:
    """A table of :meth:`osteo.experiments.Experiments.table` as bars: the paper's accuracy (grey)
    beside ours (blue) with its 95 % interval as error bars (``ci95_low``..``ci95_high``). Rows
    without a paper number (``paper_acc`` missing) get our bar only. Say in ``ours_label`` what the
    data were (for example "reproduced, synthetic data")."""
    need = {"model", "acc", "ci95_low", "ci95_high"}
    if not need <= set(df.columns):
        raise KeyError(f"table_bars needs columns {sorted(need)}, got {list(df.columns)}")
    n = len(df)
    x = np.arange(n)
    fig, axes = _grid(1, 1, w=max(5.0, 1.1 * n + 1.5), h=3.8)
    ax = axes[0, 0]
    paper = df["paper_acc"].astype(float).to_numpy() if "paper_acc" in df else np.full(n, np.nan)
    has = ~np.isnan(paper)
    if has.any():
        pb = ax.bar(x[has] - 0.2, paper[has], 0.4, color=PAPER_COLOUR, label="paper (Choi et al. 2021)")
        ax.bar_label(pb, fmt="%.1f", fontsize=7)
    acc = df["acc"].astype(float).to_numpy()
    err = np.vstack([acc - df["ci95_low"].astype(float).to_numpy(), df["ci95_high"].astype(float).to_numpy() - acc])
    ob = ax.bar(x + np.where(has, 0.2, 0.0), acc, 0.4, yerr=err, capsize=3, color=OURS_COLOUR,
                label=f"{ours_label} (95 % CI)")
    ax.bar_label(ob, fmt="%.1f", fontsize=7, padding=2)
    if chance is not None:
        ax.axhline(chance, color="k", ls=":", lw=1, label="chance (3 classes)")
    ax.set_xticks(x, [str(m) for m in df["model"]], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    return fig


def classwise_accuracy(results, heads=("s", "t")) -> dict:
    """Per-class test accuracy in % of each head, mean over the results (seeds):
    ``{head: {class: acc}}``."""
    results = results if isinstance(results, (list, tuple)) else [results]
    out = {}
    for h in heads:
        per = [r.test[h]["per_class_accuracy"] for r in results]
        out[h] = {lab: 100 * float(np.mean([p[lab] for p in per])) for lab in per[0]}
    return out


def classwise_bars(results, heads=("s", "t"), names=None, title=None) -> Figure:
    """Fig. 3 of the paper: class-wise test accuracy of G_s and G_t, the twin's heads ``s`` and ``t``
    of a :class:`osteo.training.TrainResult` (or the mean over a list of them, one per seed, with each
    seed as a dot)."""
    results = results if isinstance(results, (list, tuple)) else [results]
    names = names or {"s": "G_s (on x_s)", "t": "G_t (on x_t)"}
    acc = classwise_accuracy(results, heads)
    labs = list(acc[heads[0]])
    x = np.arange(len(labs))
    width = 0.8 / len(heads)
    fig, axes = _grid(1, 1, w=5.5, h=3.6)
    ax = axes[0, 0]
    for j, h in enumerate(heads):
        pos = x + (j - (len(heads) - 1) / 2) * width
        bars = ax.bar(pos, [acc[h][lab] for lab in labs], width, label=names.get(h, h))
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        if len(results) > 1:
            for r in results:
                ax.plot(pos, [100 * r.test[h]["per_class_accuracy"][lab] for lab in labs], "k.", ms=4)
    ax.set_xticks(x, labs)
    ax.set_ylabel("class-wise test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def gradcam_grid(images, cams, row_titles=None, col_titles=None, alpha: float = 0.45, title=None) -> Figure:
    """Fig. 4: Grad-CAM maps (in [0, 1]) over grey slices. ``images[r][c]`` and ``cams[r][c]`` are
    2-D arrays of the same size (grey levels 0-255 for the images); a ``None`` cam shows the slice
    alone."""
    from .gradcam import overlay  # the one Grad-CAM drawing, shared with ``osteo predict --gradcam``

    nr = len(images)
    nc = len(images[0]) if nr else 0
    if nr == 0 or nc == 0:
        raise ValueError("gradcam_grid needs at least one image")
    if len(cams) != nr or any(len(r) != nc for r in images) or any(len(r) != nc for r in cams):
        raise ValueError("gradcam_grid: images and cams must be grids of the same shape")
    fig, axes = _grid(nr, nc, w=2.2, h=2.2)
    for r in range(nr):
        for c in range(nc):
            ax = axes[r, c]
            img = np.asarray(images[r][c], float)
            cam = None if cams[r][c] is None else np.asarray(cams[r][c], float)
            if cam is not None and img.shape != cam.shape:
                raise ValueError(f"gradcam_grid: image {img.shape} and cam {cam.shape} differ at row {r}, column {c}")
            overlay(ax, img, cam, alpha=alpha, title=col_titles[c] if r == 0 and col_titles is not None else None,
                    fontsize=8)
            if c == 0 and row_titles is not None:
                ax.set_ylabel(row_titles[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _noise_residual(hu: np.ndarray, sigma_px: float = 3.0) -> np.ndarray:
    """The image minus a Gaussian-smoothed copy, inside soft tissue (-200..300 HU): a rough noise
    estimate computed the same way for real and synthetic slices."""
    hu = np.asarray(hu, dtype=np.float64)
    res = hu - gaussian_filter(hu, sigma_px)
    inside = gaussian_filter(((hu > -200) & (hu < 300)).astype(float), sigma_px) > 0.99
    return np.where(inside, res, 0.0)


def synthetic_vs_real(synthetic_dir, levels=("L1", "L3", "L5")) -> Figure:
    """Synthetic slices (``synthetic_dir``: the set's folder or its manifest) at ``levels`` beside the two real CT slices the kit can read (pydicom's
    ``CT_small.dcm`` and pydicom-data's ``explicit_VR-UN.dcm``), in the two windows of Eq. (1), with
    their HU histograms and noise power spectra (of the image minus a smoothed copy, in soft tissue)."""
    d = Path(synthetic_dir)
    if d.is_file():  # the manifest itself
        d = d.parent
    man = pd.read_csv(d / "manifest.csv")
    if "level" not in man.columns:
        raise ValueError(f"{d / 'manifest.csv'}: made by an older generator (no 'level' column): make it again")
    cols = []
    for lev in levels:
        rows = man[man["level"] == lev]
        if rows.empty:
            raise ValueError(f"{d / 'manifest.csv'}: no slice at level {lev}")
        r = rows.iloc[len(rows) // 2]
        hu, meta = read_hu(d / r["path"])
        cols.append((f"synthetic {lev} ({r['label']})", hu, float(meta["pixel_spacing"][0]), True))
    for name in ("CT_small.dcm", "explicit_VR-UN.dcm"):
        path = get_testdata_file(name)
        if path is None:
            raise FileNotFoundError(f"{name}: not found (explicit_VR-UN.dcm comes with `pip install pydicom-data`)")
        hu, meta = read_hu(path)
        cols.append((f"real {name}", hu, float(meta["pixel_spacing"][0]), False))
    fig, axes = _grid(3, len(cols), w=2.8, h=2.8)
    for c, (title, hu, ps, _) in enumerate(cols):
        for r, w in enumerate(("s", "t")):
            ax = axes[r, c]
            ax.imshow(window(hu, VIEW_HU_MIN[w]), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
            if c == 0:
                ax.set_ylabel(VIEW_NAME[w], fontsize=8)
    for ax in axes[2, 2:]:
        ax.remove()
    hx, nx = axes[2, 0], axes[2, 1]
    for i, (title, hu, ps, syn) in enumerate(cols):
        style = "-" if syn else "--"
        v = np.asarray(hu, dtype=np.float64).ravel()
        v = v[(v > -300) & (v < 400)]
        hx.hist(v, bins=70, range=(-300, 400), density=True, histtype="step", ls=style, color=_colour(i),
                label=title)
        f, p = radial_nps(_noise_residual(hu), ps)
        peak = f[int(np.argmax(p))]
        nx.plot(f, p / p.max(), style, color=_colour(i), label=f"{title.split(' (')[0]}: peak {peak:.2f}")
    hx.set_xlabel("HU (soft tissue and bone)", fontsize=8)
    hx.set_title("HU histograms", fontsize=8)
    nx.set_xlabel("cycles/mm", fontsize=8)
    nx.set_title("noise power (normalised)", fontsize=8)
    nx.set_xlim(0, 0.8)
    nx.legend(fontsize=6, loc="upper right")
    hx.legend(fontsize=6, loc="upper left")
    fig.suptitle("Synthetic slices (solid) beside two real CT slices (dashed)", fontsize=10)
    return fig


# ---- names that moved to osteo.notebook ---------------------------------------------------------
_MOVED_TO_NOTEBOOK = ("shown_path", "data_label", "setup_summary", "weights_note")


def __getattr__(name):
    """``plots.setup_summary`` and the other notebook helpers of earlier versions still work, with a
    DeprecationWarning: they live in :mod:`osteo.notebook` now. Imported on first use so that the
    figures module does not load the experiment runner."""
    if name in _MOVED_TO_NOTEBOOK:
        from . import notebook  # on first use only: osteo.notebook imports the runner, plots does not

        warnings.warn(f"osteo.plots.{name} moved to osteo.notebook.{name}", DeprecationWarning, stacklevel=2)
        return getattr(notebook, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
