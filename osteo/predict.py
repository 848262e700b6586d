"""``osteo predict``: classify DICOM slices with a trained checkpoint.

Writes one CSV row per file: the predicted class (the fused head F for the twin), the three class
probabilities, alpha, and whether the heads G_s, G_t and F agree. A file that cannot be read is
listed with its error and the others are still predicted; the exit code is 1 when any failed.
With ``gradcam_dir``, one PNG per slice shows the Grad-CAM of G_s (on x_s) and G_t (on x_t).
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import resize_hu
from .dicom import DicomError, iter_dicom_files, read_hu
from .manifest import LABELS
from .training import forward_heads, head_logits, load_model, resolve_device
from .windowing import to_network_input

COLUMNS = ["file", "status", "error", "predicted", *[f"p_{c}" for c in LABELS], "alpha", "heads_agree"]


def expand_paths(paths) -> list:
    """Files as given, folders expanded to their DICOM candidates (sorted); a missing path stays, to fail later."""
    out = []
    for p in map(Path, paths):
        out.extend(iter_dicom_files(p) if p.is_dir() else [p])
    return out


def predict_files(checkpoint, paths, out_csv="predictions.csv", gradcam_dir=None, device="auto", progress=True) -> int:
    """Predict every file; returns the exit code (0: all predicted, 1: some failed)."""
    dev = resolve_device(device)
    model, cfg = load_model(checkpoint, device=dev)
    files = expand_paths(paths)
    if not files:
        print("error: no files to predict", file=sys.stderr)
        return 2
    rows, failed = [], 0
    for f in tqdm(files, desc="predict", disable=not progress or len(files) < 2):
        row = dict.fromkeys(COLUMNS, "")
        row["file"] = str(f)
        try:
            hu, _ = read_hu(f)
        except DicomError as e:
            row.update(status="error", error=str(e))
            rows.append(row)
            failed += 1
            continue
        x = torch.from_numpy(resize_hu(hu, cfg.image_size))[None].to(dev)
        with torch.no_grad():
            out = forward_heads(model, cfg, x)
        heads = {h: l.float() for h, l in head_logits(cfg, out).items()}
        main = heads["f" if cfg.model == "twin" else "main"]
        prob = torch.softmax(main, 1)[0].cpu().numpy()
        pred = int(prob.argmax())
        row.update(status="ok", predicted=LABELS[pred], **{f"p_{c}": f"{p:.4f}" for c, p in zip(LABELS, prob)})
        if cfg.model == "twin":
            row["alpha"] = f"{float(model.alpha.detach()):.4f}"
            row["heads_agree"] = str(len({int(l.argmax()) for l in heads.values()}) == 1)
        rows.append(row)
        if gradcam_dir is not None:
            save_gradcam_png(model, cfg, x, pred, Path(gradcam_dir) / f"{len(rows):05d}_{Path(f).stem}.png")
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_csv.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out_csv)
    print(f"{len(rows) - failed} of {len(rows)} files predicted; {failed} failed; wrote {out_csv}")
    if failed:
        for r in rows:
            if r["status"] == "error":
                print(f"  {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def save_gradcam_png(model, cfg, hu: torch.Tensor, target: int, path: Path) -> Path:
    """One PNG: the slice in each view with the Grad-CAM of the branch that reads it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .gradcam import grad_cam
    from .models import gradcam_layer
    from .windowing import window, VIEW_HU_MIN

    panels = []
    if cfg.model == "twin":
        xs = {v: to_network_input(hu, v, bits=cfg.window_bits) for v in set(cfg.inputs)}
        a, b = xs[cfg.inputs[0]], xs[cfg.inputs[1]]
        cam_s = grad_cam(lambda p, q: model(p, q).logits_s, model.G_s.layer4[-1], a, b, target=target)
        cam_t = grad_cam(lambda p, q: model(p, q).logits_t, model.G_t.layer4[-1], a, b, target=target)
        panels = [(f"G_s on x_{cfg.inputs[0]}", cfg.inputs[0], cam_s), (f"G_t on x_{cfg.inputs[1]}", cfg.inputs[1], cam_t)]
    else:
        v = cfg.inputs[0]
        cam = grad_cam(lambda p: model(p), gradcam_layer(model), to_network_input(hu, v, bits=cfg.window_bits), target=target)
        panels = [(f"{cfg.model} on x_{v}", v, cam)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (title, view, cam) in zip(axes[0], panels):
        ax.imshow(window(hu[0].float().cpu(), VIEW_HU_MIN[view]).numpy(), cmap="gray", vmin=0, vmax=255)
        ax.imshow(cam[0].detach().cpu().numpy(), cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.set_title(f"{title}\npredicted: {LABELS[target]}")
        ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
