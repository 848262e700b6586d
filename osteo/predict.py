"""``osteo predict``: classify DICOM slices with a trained checkpoint.

Writes one CSV row per file: the predicted class (the fused head F for the twin), the three class
probabilities, alpha, and whether the heads G_s, G_t and F agree. A file that cannot be read, or a
folder with no DICOM file in it, is listed with its error and the others are still predicted; the
exit code is 1 when any failed. With ``gradcam_dir``, one PNG per slice shows the Grad-CAM of G_s
(on x_s) and G_t (on x_t).

The CSV is UTF-8. It is written atomically: rows go to a temporary file with a unique name in the
target folder, which replaces the CSV only when every row is in, so two runs writing the same CSV
never see each other's half-written file (the last to finish wins) and the CSV is never half
written. An existing file named by ``--out`` is replaced only if it is a predictions CSV (its
first line starts with ``file,``) and not write-protected: a DICOM file, a checkpoint or any other
file given by mistake is refused before anything is computed. If a run is interrupted (Ctrl-C), the rows computed so far are kept in
``<name>.partial.csv`` next to the target, and the message says so. A file name that is not valid
UTF-8 (POSIX allows any bytes) is written with each undecodable byte as ``\\xNN`` (Python's
``backslashreplace``), in the CSV and in messages alike.
"""
from __future__ import annotations

import csv
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import _UMASK, AtomicFile  # _UMASK: the permissions a committed CSV gets
from .data import resize_hu
from .dicom import DICOM_SUFFIXES, DicomError, iter_dicom_files, read_hu
from .gradcam import grad_cam, overlay
from .manifest import LABELS
from .models import model_spec
from .training import UnfinishedRunWarning, forward_heads, head_logits, load_model, network_inputs, resolve_device
from .windowing import VIEW_HU_MIN, window

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


def _check_parents(path: Path, option: str) -> None:
    """The nearest existing folder above ``path`` must be a folder (``path`` is created below it)."""
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise PredictError(f"{printable(parent)}: not a folder, so {option} {printable(path)} cannot be written")
            break


def _is_predictions_csv(path: Path) -> bool:
    """True for an empty file or one whose first line is a CSV header whose first column is
    ``file``: as osteo writes it, or re-saved by a spreadsheet (a UTF-8 BOM, quotes, ``;``).
    An unreadable file raises OSError (reported as such, not as a foreign file)."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    head = head.removeprefix(b"\xef\xbb\xbf")
    return head == b"" or any(head.startswith(p) for p in (b"file,", b'"file",', b"file;", b'"file";'))


def _check_output(out_csv: Path, gradcam_dir) -> None:
    """Refuse outputs that cannot be written before any prediction is made; an existing file is
    replaced only if it is a predictions CSV and not write-protected (never a DICOM file, a
    checkpoint or anything else that happens to be named by ``--out``)."""
    if out_csv.is_dir():
        raise PredictError(f"{printable(out_csv)}: --out is a folder; give a CSV file name")
    _check_parents(out_csv, "--out")
    if out_csv.exists():
        if not _is_predictions_csv(out_csv):
            raise PredictError(f"{printable(out_csv)}: --out names an existing file that is not a predictions CSV; "
                               "refusing to replace it (give another file name)")
        if not out_csv.stat().st_mode & 0o222:
            raise PredictError(f"{printable(out_csv)}: --out is write-protected; refusing to replace it")
    if gradcam_dir is not None:
        gradcam_dir = Path(gradcam_dir)
        if gradcam_dir.exists() and not gradcam_dir.is_dir():
            raise PredictError(f"{printable(gradcam_dir)}: --gradcam exists and is not a folder")
        _check_parents(gradcam_dir, "--gradcam")


class _CsvOut:
    """Rows streamed into a unique temporary file in the CSV's folder (:class:`osteo.atomic.AtomicFile`);
    ``commit`` renames it over the CSV."""

    def __init__(self, out_csv: Path):
        self.target = out_csv
        try:
            out_csv.parent.mkdir(parents=True, exist_ok=True)
            self.file = AtomicFile(out_csv, "w", newline="", encoding="utf-8")
        except OSError as e:  # a read-only folder, a full disk: before any prediction is made
            why = (e.strerror or type(e).__name__).lower()
            raise PredictError(f"{printable(out_csv)}: cannot be written ({why} in {printable(out_csv.parent)})") from None
        self.writer = csv.DictWriter(self.file.file, fieldnames=COLUMNS)
        self.writer.writeheader()
        self.n = 0

    @property
    def tmp(self) -> Path:
        """The temporary file the rows go to."""
        return self.file.tmp

    def write(self, row: dict) -> None:
        self.writer.writerow({k: printable(v) for k, v in row.items()})
        self.n += 1

    def commit(self) -> None:
        """Put the CSV in place. If that fails (the folder turned read-only, the target became a
        folder, the disk is full), the rows stay in the temporary file and the error says where."""
        try:
            f = self.file.file
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.chmod(self.tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 -> what open() would have given
            os.replace(self.tmp, self.target)
        except OSError as e:
            why = (e.strerror or type(e).__name__).lower()
            kept = f"; the {self.n} rows are kept in {printable(self.tmp)}" if self.tmp.exists() else ""
            raise PredictError(f"{printable(self.target)}: cannot be written ({why}){kept}") from None

    def keep_partial(self) -> Path | None:
        """After an interruption: keep the rows so far as ``<stem>.partial.csv`` (None if no row);
        if that name cannot be written, the rows stay in the temporary file, which is returned."""
        if self.n == 0:
            self.file.discard()
            return None
        self.file.file.close()
        partial = self.target.with_name(self.target.stem + ".partial.csv")
        try:
            os.replace(self.file.tmp, partial)
        except OSError:
            return self.file.tmp
        return partial


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
        print(f"osteo: error: {printable(msg)}", file=sys.stderr)
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
    prob = torch.softmax(heads[out.main], 1)[0].cpu().numpy()
    if not all(bool(torch.isfinite(l).all()) for l in heads.values()) or not np.isfinite(prob).all():
        row.update(status="error", error=f"{f}: the network's output is not finite (NaN or infinite) for this slice; "
                                         "the checkpoint's weights are damaged")
        return row
    pred = int(prob.argmax())
    row.update(status="ok", predicted=LABELS[pred], **{f"p_{c}": f"{p:.4f}" for c, p in zip(LABELS, prob)})
    scalars = model_spec(cfg.model).scalars(model)
    if "alpha" in scalars:
        row["alpha"] = f"{scalars['alpha']:.4f}"
    if len(heads) > 1:
        row["heads_agree"] = str(len({int(l.argmax()) for l in heads.values()}) == 1)
    if gradcam_dir is not None:
        save_gradcam_png(model, cfg, x, pred, Path(gradcam_dir) / f"{number:05d}_{f.stem}.png")
    return row


def gradcam_panels(model, cfg, hu: torch.Tensor, target: int) -> list:
    """``(title, view, cam)`` per branch of the network: the Grad-CAM (B, H, W) of each branch's head
    for class ``target``, on the view that branch reads (the registry says which layer and head)."""
    spec = model_spec(cfg.model)
    xs = network_inputs(cfg, hu)
    panels = []
    for i, layer, head in spec.gradcam(model):
        cam = grad_cam(lambda *v: spec.run(model, list(v)).logits[head], layer, *xs, target=target)
        name = f"G_{head}" if len(xs) > 1 else cfg.model
        panels.append((f"{name} on x_{cfg.inputs[i]}", cfg.inputs[i], cam))
    return panels


def save_gradcam_png(model, cfg, hu: torch.Tensor, target: int, path: Path) -> Path:
    """One PNG: the slice in each view with the Grad-CAM of the branch that reads it."""
    import matplotlib  # optional here: only --gradcam draws, so plain prediction never loads matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = gradcam_panels(model, cfg, hu, target)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (title, view, cam) in zip(axes[0], panels):
        overlay(ax, window(hu[0].float().cpu(), VIEW_HU_MIN[view]), cam[0], alpha=0.4,
                title=f"{title}\npredicted: {LABELS[target]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
