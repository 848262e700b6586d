"""From a manifest of DICOM slices to tensors of HU ready for training.

Every slice is read once with :func:`osteo.read_hu`, resized to the training size and kept as int16
HU (a 4500-slice set at 224 px is 450 MB, and fits on any GPU). Windowing (Eq. 1) and ImageNet
normalisation happen per batch on the device that trains (:func:`osteo.windowing.to_network_input`),
so the two views cost no extra memory and no host-device traffic.

Loaded arrays are cached as ``.npz`` keyed by the files' paths, sizes, modification times and the
image size, so a second notebook that needs the same data loads it in a second.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .dicom import DicomError, read_hu
from .manifest import LABELS, check_split, load_manifest, split_patients, split_slices


@dataclass
class SliceSet:
    """One split: HU slices (N, S, S) int16, labels (N,) int64, and where each slice came from."""

    hu: torch.Tensor
    y: torch.Tensor
    patient_id: list
    path: list

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device) -> "SliceSet":
        return SliceSet(self.hu.to(device), self.y.to(device), self.patient_id, self.path)


@dataclass
class SliceData:
    """The train and test splits of one data set at one image size."""

    train: SliceSet
    test: SliceSet
    image_size: int
    labels: tuple = LABELS
    source: str = ""
    synthetic_version: str = ""  # the generator's version for synthetic data ("" for real data)
    split: str = "patient"  # how train and test were made: "patient", or "slice" (the leaky pitfall)

    def to(self, device) -> "SliceData":
        return SliceData(self.train.to(device), self.test.to(device), self.image_size, self.labels, self.source,
                         synthetic_version=self.synthetic_version, split=self.split)

    def describe(self) -> str:
        def counts(s: SliceSet) -> str:
            c = np.bincount(s.y.cpu().numpy(), minlength=len(self.labels))
            return ", ".join(f"{lab} {n}" for lab, n in zip(self.labels, c))

        leak = ("; split BY SLICE: patients in both train and test" if self.split == "slice" else "")
        return (
            f"{self.source}{leak}: {self.image_size} px; train {len(self.train)} slices "
            f"({len(set(self.train.patient_id))} patients: {counts(self.train)}); "
            f"test {len(self.test)} slices ({len(set(self.test.patient_id))} patients: {counts(self.test)})"
        )


def resize_hu(hu: np.ndarray, size: int) -> np.ndarray:
    """Resize one HU slice to ``size x size`` (bilinear, antialiased when shrinking), rounded to int16."""
    if hu.shape == (size, size):
        return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    t = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None]
    shrink = size < max(hu.shape)
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return np.clip(np.rint(out[0, 0].numpy()), -32768, 32767).astype(np.int16)


def _cache_key(paths, image_size: int) -> str:
    h = hashlib.sha256(f"osteo-slices-v1|{image_size}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def read_slices(paths, image_size: int, progress: bool = True, desc: str = "reading DICOM") -> np.ndarray:
    """Read and resize every file; raise one :class:`DicomError` listing every file that failed."""
    out = np.empty((len(paths), image_size, image_size), dtype=np.int16)
    errors = []
    for i, p in enumerate(tqdm(paths, desc=desc, disable=not progress, leave=False)):
        try:
            hu, _ = read_hu(p)
        except DicomError as e:
            errors.append(str(e))
            continue
        out[i] = resize_hu(hu, image_size)
    if errors:
        shown = "\n  ".join(errors[:50])
        more = f"\n  ... and {len(errors) - 50} more" if len(errors) > 50 else ""
        raise DicomError(f"{len(errors)} of {len(paths)} files could not be read:\n  {shown}{more}")
    return out


def load_data(manifest, image_size: int = 224, cache_dir=None, progress: bool = True, seed: int = 0,
              split: str = "patient") -> SliceData:
    """Load a data set for training.

    ``manifest`` is a manifest CSV, a folder (one sub-folder per class), or a DataFrame from
    :func:`osteo.load_manifest`. Without a ``split`` column the patients are split 80/20,
    stratified by class, with ``seed``. ``cache_dir`` (default: a ``.cache`` folder beside the
    manifest) keeps the resized slices for the next call.

    ``split="slice"`` is a pitfall made on purpose (for teaching): the manifest's own split is
    ignored and the slices are split 80/20 by slice (:func:`osteo.manifest.split_slices`), so
    neighbouring slices of one patient land in train and test.
    """
    if split not in ("patient", "slice"):
        raise ValueError(f"load_data: split must be 'patient' or 'slice', got {split!r}")
    if isinstance(manifest, pd.DataFrame):
        df, source = manifest, "DataFrame"
    else:
        df, source = load_manifest(manifest), str(Path(manifest).name)
    if split == "slice":
        df = split_slices(df, test_fraction=0.2, seed=seed)
    else:
        if "split" not in df.columns or df["split"].isna().any():
            df = split_patients(df, test_fraction=0.2, seed=seed)
        check_split(df)
    paths = [str(p) for p in df["path"]]
    arr = None
    cache_file = None
    if cache_dir is None and not isinstance(manifest, pd.DataFrame):
        base = Path(manifest)
        cache_dir = (base if base.is_dir() else base.parent) / ".cache"
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"slices-{_cache_key(paths, image_size)}.npy"
        if cache_file.exists():
            arr = np.load(cache_file)
            if arr.shape != (len(paths), image_size, image_size):
                arr = None
    if arr is None:
        arr = read_slices(paths, image_size, progress=progress)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            # a temporary file of its own: parallel workers (osteo grid --worker) may fill the same cache
            fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=cache_file.stem + ".", suffix=".tmp.npy")
            with os.fdopen(fd, "wb") as f:
                np.save(f, arr)
            os.replace(tmp, cache_file)
    y = df["label"].map({lab: i for i, lab in enumerate(LABELS)}).to_numpy(np.int64)

    def subset(name: str) -> SliceSet:
        idx = np.flatnonzero(df["split"].to_numpy() == name)
        return SliceSet(
            torch.from_numpy(arr[idx]),
            torch.from_numpy(y[idx]),
            df["patient_id"].iloc[idx].astype(str).tolist(),
            [paths[i] for i in idx],
        )

    version = ""
    if "synthetic_version" in df.columns:
        version = "+".join(sorted(set(df["synthetic_version"].astype(str))))
    return SliceData(subset("train"), subset("test"), image_size, LABELS, source,
                     synthetic_version=version, split=split)
