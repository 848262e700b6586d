"""``osteo predict``: classify DICOM slices with a trained checkpoint.

Writes one CSV row per file: the predicted class (the fused head F for the twin), the three class
probabilities, alpha, and whether the heads G_s, G_t and F agree. A file that cannot be read, or a
folder with no DICOM file in it, is listed with its error and the others are still predicted; the
exit code is 1 when any failed. With ``gradcam_dir``, one PNG per slice shows the Grad-CAM of G_s
(on x_s) and G_t (on x_t).

The CSV is UTF-8. It is written atomically: rows go to a temporary file with a unique name in the
target folder, which replaces the CSV only when every row is in, so two runs writing the same CSV
never see each other's half-written file (the last to finish wins) and the CSV is never half
written. If a run is interrupted (Ctrl-C), the rows computed so far are kept in
``<name>.partial.csv`` next to the target, and the message says so. A file name that is not valid
UTF-8 (POSIX allows any bytes) is written with each undecodable byte as ``\\xNN`` (Python's
``backslashreplace``), in the CSV and in messages alike.
"""
from __future__ import annotations

import csv
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import resize_hu
from .dicom import DICOM_SUFFIXES, DicomError, iter_dicom_files, read_hu
from .manifest import LABELS
from .training import UnfinishedRunWarning, forward_heads, head_logits, load_model, resolve_device
from .windowing import to_network_input

class PredictError(ValueError):
    """An output of ``osteo predict`` that cannot be written, or nothing to predict."""


COLUMNS = ["file", "status", "error", "predicted", *[f"p_{c}" for c in LABELS], "alpha", "heads_agree"]


def printable(text) -> str:
    """``text`` with the bytes of a non-UTF-8 file name (surrogate escapes) as ``\\xNN``: valid UTF-8."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def expand_paths(paths) -> list:
    """Files as given, folders expanded to their DICOM candidates (sorted); a missing path stays,
    to fail later. A folder without any DICOM candidate is returned as itself (it fails later, as
    an error row naming it)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            files = iter_dicom_files(p)
            out.extend(files if files else [p])
        else:
            out.append(p)
    return out


def _empty_folder_problem(folder: Path) -> str:
    """Why a folder gives nothing to predict (it holds no file osteo takes for DICOM)."""
    others = sorted(q.name for q in folder.rglob("*") if q.is_file())
    if not others:
        return "folder holds no files: nothing to predict"
    shown = ", ".join(printable(n) for n in others[:3]) + (", ..." if len(others) > 3 else "")
    return (f"folder holds no DICOM files ({len(others)} other file(s): {shown}; DICOM files end in "
            f"{', '.join(DICOM_SUFFIXES)}, a number, or have no suffix)")


def _check_output(out_csv: Path, gradcam_dir) -> None:
    """Refuse outputs that cannot be written before any prediction is made."""
    if out_csv.is_dir():
        raise PredictError(f"{printable(out_csv)}: --out is a folder; give a CSV file name")
    for parent in (out_csv.parent, *out_csv.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise PredictError(f"{printable(parent)}: not a folder, so {printable(out_csv)} cannot be written")
            break
    if gradcam_dir is not None and Path(gradcam_dir).exists() and not Path(gradcam_dir).is_dir():
        raise PredictError(f"{printable(gradcam_dir)}: --gradcam exists and is not a folder")


class _CsvOut:
    """Rows streamed into a unique temporary file in the CSV's folder; ``commit`` renames it."""

    def __init__(self, out_csv: Path):
        self.target = out_csv
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out_csv.name}.", suffix=".tmp", dir=out_csv.parent)
        self.tmp = Path(tmp)
        self.fh = os.fdopen(fd, "w", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.fh, fieldnames=COLUMNS)
        self.writer.writeheader()
        self.n = 0

    def write(self, row: dict) -> None:
        self.writer.writerow({k: printable(v) for k, v in row.items()})
        self.n += 1

    def commit(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.chmod(self.tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 -> what open() would have given
        os.replace(self.tmp, self.target)

    def keep_partial(self) -> Path | None:
        """After an interruption: keep the rows so far as ``<stem>.partial.csv`` (None if no row)."""
        self.fh.close()
        if self.n == 0:
            self.tmp.unlink(missing_ok=True)
            return None
        partial = self.target.with_name(self.target.stem + ".partial.csv")
        os.replace(self.tmp, partial)
        return partial


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import: os.umask can only be read by setting it


def predict_files(checkpoint, paths, out_csv="predictions.csv", gradcam_dir=None, device="auto", progress=True,
                  allow_unfinished: bool = False) -> int:
    """Predict every file; returns the exit code (0: all predicted, 1: some failed).

    The checkpoint and the outputs are checked before any prediction (a :class:`CheckpointError`
    or :class:`PredictError` naming the file). ``allow_unfinished`` predicts with the checkpoint of
    a run stopped before its last epoch, with a warning.
    """
    out_csv = Path(out_csv)
    _check_output(out_csv, gradcam_dir)
    dev = resolve_device(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnfinishedRunWarning)
        model, cfg = load_model(checkpoint, device=dev, allow_unfinished=allow_unfinished)
    for w in caught:
        if issubclass(w.category, UnfinishedRunWarning):
            print(f"osteo: warning: {printable(w.message)}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    files = expand_paths(paths)
    if not files:
        raise PredictError("no files to predict")
    out = _CsvOut(out_csv)
    failed, errors, n = 0, [], 0
    try:
        for f in tqdm(files, desc="predict", disable=not progress or len(files) < 2):
            row = _predict_one(model, cfg, dev, Path(f), gradcam_dir, n + 1)
            out.write(row)
            n += 1
            if row["status"] == "error":
                failed += 1
                errors.append(row["error"])
    except BaseException:
        partial = out.keep_partial()
        where = f"; the {n} rows computed so far are in {printable(partial)}" if partial else ""
        print(f"osteo: predict stopped after {n} of {len(files)} files{where}", file=sys.stderr)
        raise
    out.commit()
    print(f"{n - failed} of {n} files predicted; {failed} failed; wrote {printable(out_csv)}")
    for msg in errors:
        print(f"  {printable(msg)}", file=sys.stderr)
    return 1 if failed else 0


def _predict_one(model, cfg, dev, f: Path, gradcam_dir, number: int) -> dict:
    """One CSV row: the prediction, or the error that stopped it."""
    row = dict.fromkeys(COLUMNS, "")
    row["file"] = str(f)
    if f.is_dir():  # a folder without DICOM candidates (expand_paths kept it)
        row.update(status="error", error=f"{f}: {_empty_folder_problem(f)}")
        return row
    try:
        hu, _ = read_hu(f)
    except DicomError as e:
        row.update(status="error", error=str(e))
        return row
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
    if gradcam_dir is not None:
        save_gradcam_png(model, cfg, x, pred, Path(gradcam_dir) / f"{number:05d}_{f.stem}.png")
    return row


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
