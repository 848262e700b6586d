"""Manifests: which DICOM slice has which label, belongs to which patient, and goes to which split.

A manifest is a CSV with columns ``path,label,patient_id[,split]`` (extra columns are kept), or a
folder with one sub-folder per class (see :func:`load_manifest`). Labels are ordered as in the
paper: normal < osteopenia < osteoporosis.

Decisions that are ours (the paper says only "80 % train, 20 % test", design section 3):
* the split is made at patient level and stratified by label (:func:`split_patients`), so no
  patient is in both train and test (:func:`check_split`);
* labels are per patient (from DXA, design section 5): a patient with two labels is an error;
* validation collects every problem and raises one :class:`ManifestError` that lists them all.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .dicom import DicomError, iter_dicom_files, read_header
from .privacy import SYNTHETIC_MARKER_TAGS, is_synthetic_dataset, pseudonymize

__all__ = ["LABELS", "SPLITS", "ManifestError", "load_manifest", "split_patients", "split_slices", "check_split"]

#: Class labels, ordered; the integer column ``y`` indexes this tuple.
LABELS = ("normal", "osteopenia", "osteoporosis")
SPLITS = ("train", "test")
REQUIRED_COLUMNS = ("path", "label", "patient_id")
MAX_LISTED = 50


class ManifestError(ValueError):
    """A manifest that cannot be used; the message lists every problem found (up to 50)."""


def _raise_problems(source: str, problems: list[str]) -> None:
    if not problems:
        return
    if len(problems) == 1:  # one line: "<manifest>: line N: <file>: <problem>"
        raise ManifestError(f"{source}: {problems[0]}")
    shown = problems[:MAX_LISTED]
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise ManifestError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(shown) + more)


def _where(df: pd.DataFrame, i) -> str:
    """How a row is named in messages: its CSV line if known, else its index; then its path."""
    line = df.at[i, "_line"] if "_line" in df.columns else None
    where = f"line {line}" if line is not None and not pd.isna(line) else f"row {i}"
    if "path" not in df.columns:
        return where
    path = str(df.at[i, "path"])
    if len(path) > 300:  # a damaged row (a whole file pasted into one cell) is not shown in full
        path = f"{path[:120]}...{path[-60:]} ({len(path)} characters)"
    return f"{where}: {path}"


def _blank(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def load_manifest(path, check_files: bool = True, *, salt: str | None = None, pseudonymize_ids: bool = False) -> pd.DataFrame:
    """Load and validate a manifest; returns a DataFrame with absolute posix ``path``, ``label``
    (lower case, one of :data:`LABELS`), ``patient_id``, ``split`` (if the CSV has one) and int ``y``.

    ``path`` is either
    * a CSV file ``path,label,patient_id[,split]``: relative paths are resolved against the CSV's
      folder; labels are case-insensitive; ``split`` is ``train``/``test`` on every row, or empty
      on every row (then the column is dropped: use :func:`split_patients`). Patient ids are used
      as given (they should already be pseudonyms); ``pseudonymize_ids=True`` pseudonymises every
      one of them (a CSV cannot prove an id synthetic);
    * a folder with one sub-folder per class, named by the label (case-insensitive): every DICOM
      file under a class folder (:func:`osteo.dicom.iter_dicom_files`) is a row, and its patient id
      is read from the DICOM header and pseudonymised with ``salt`` (see :mod:`osteo.privacy`),
      except in files the kit's synthetic generator wrote (:func:`osteo.privacy.is_synthetic_dataset`),
      whose ``SYN...`` ids are kept. Hidden folders are ignored.

    Problems in a CSV are located by line (the header is line 1, one line per row).
    ``check_files`` also checks that every file exists. All problems (missing columns, unknown
    labels, missing or duplicate files, empty patient ids, bad split values, a patient in both
    splits or with two labels, a class missing from a split) are reported in one ManifestError.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ManifestError(f"{path}: no such manifest file or folder")
    if p.is_dir():
        df = _load_folder(p, salt)
        source = str(path)
    else:
        df = _load_csv(p, salt, pseudonymize_ids)
        source = str(path)
    if len(df) == 0:
        raise ManifestError(f"{path}: the manifest lists no files")
    problems = _row_problems(df, check_files) + _split_problems(df)
    _raise_problems(source, problems)
    df["y"] = df["label"].map({lab: i for i, lab in enumerate(LABELS)}).astype(np.int64)
    return df.drop(columns=["_line"], errors="ignore").reset_index(drop=True)


def _not_utf8(p: Path) -> str | None:
    """Where a CSV is not UTF-8 text ("line N: ..."), or None if it all decodes."""
    try:
        data = p.read_bytes()
    except OSError:
        return None
    for n, line in enumerate(data.split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            return (f"line {n}: not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                    "save the manifest as UTF-8")
    return None


def _load_csv(p: Path, salt, pseudonymize_ids: bool) -> pd.DataFrame:
    where = _not_utf8(p)
    if where:
        raise ManifestError(f"{p}: {where}")
    try:
        header = pd.read_csv(p, nrows=0)
    except Exception as e:
        raise ManifestError(f"{p}: cannot be read as CSV ({type(e).__name__}: {e})") from e
    cols = [str(c).strip() for c in header.columns]
    with open(p, newline="", encoding="utf-8-sig") as fh:  # pandas renames a repeated column to "name.1"
        names = [c.strip() for c in next(csv.reader(fh), [])]
    repeated = sorted({c for c in names if names.count(c) > 1 and c})
    if repeated:
        raise ManifestError(f"{p}: line 1: column(s) {', '.join(repeated)} appear more than once; "
                            "each column must be named once")
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if missing:
        raise ManifestError(
            f"{p}: missing column(s) {', '.join(missing)}; a manifest needs path,label,patient_id[,split] "
            f"(found: {', '.join(cols) or 'none'})"
        )
    own = [c for c in ("path", "label", "patient_id", "split") if c in cols]
    # The columns we interpret are read as text with no NA guessing ("NA" can be a patient id);
    # extra columns keep pandas' usual typing.
    try:
        df = pd.read_csv(p, skipinitialspace=True)
        text = pd.read_csv(p, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.ParserError as e:  # a row with more fields than the header, an unclosed quote
        raise ManifestError(f"{p}: cannot be read as CSV ({_parser_problem(e)})") from None
    df.columns = cols
    text.columns = cols
    for c in own:
        df[c] = text[c].str.strip()
    df["_line"] = _row_lines(p, len(df))
    base = Path(os.path.abspath(p)).parent
    df["path"] = [_abs_posix(base, v) if v else "" for v in df["path"]]
    df["label"] = df["label"].str.lower()
    if "split" in df.columns:
        df["split"] = df["split"].str.lower()
        if (df["split"] == "").all():
            df = df.drop(columns=["split"])
    if pseudonymize_ids:
        df["patient_id"] = [pseudonymize(v, salt) if v else v for v in df["patient_id"]]
    return df


def _row_lines(p: Path, n: int) -> np.ndarray:
    """The line of the CSV on which each of the ``n`` rows starts (the header is line 1): blank
    lines, which pandas skips, and values with line breaks inside quotes are counted."""
    starts, prev = [], 0
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            for row in reader:
                if row and any(v.strip() for v in row) or len(row) > 1:
                    starts.append(prev + 1)
                prev = reader.line_num
    except csv.Error:  # a value longer than the csv module takes: count rows as pandas does
        starts = []
    starts = starts[1:]  # the header
    return np.array(starts) if len(starts) == n else np.arange(n) + 2


def _parser_problem(e: Exception) -> str:
    """pandas' tokenizer error in our words: "line N: expected K fields, found M"."""
    import re

    m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
    if m:
        return f"line {m.group(2)}: {m.group(3)} fields, but the header names {m.group(1)} columns (a comma too many?)"
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def _abs_posix(base: Path, v: str) -> str:
    q = Path(os.path.expanduser(v))
    if not q.is_absolute():
        q = base / q
    return Path(os.path.normpath(q)).as_posix()


def _load_folder(root: Path, salt) -> pd.DataFrame:
    label_of = {lab: lab for lab in LABELS}
    rows, problems = [], []
    class_dirs = []
    for d in sorted(root.iterdir()):
        if d.name.startswith("."):
            continue
        if d.is_dir():
            lab = label_of.get(d.name.strip().lower())
            if lab is None:
                problems.append(f"{d.as_posix()}: folder '{d.name}' is not a label (allowed: {', '.join(LABELS)})")
            else:
                class_dirs.append((d, lab))
        elif d.suffix.lower() in (".dcm", ".dicom", ".ima"):
            problems.append(f"{d.as_posix()}: DICOM file outside a class folder (put it in one of {', '.join(LABELS)})")
    if not class_dirs and not problems:
        problems.append(f"no class folders found (expected sub-folders named {', '.join(LABELS)})")
    class_dirs.sort(key=lambda t: (LABELS.index(t[1]), t[0].name))  # rows in label order, then by path
    for d, lab in class_dirs:
        files = iter_dicom_files(d)
        if not files:
            problems.append(f"{d.as_posix()}: class folder with no DICOM files")
        for f in files:
            fp = Path(os.path.abspath(f)).as_posix()
            try:  # through the reader's length checks: a damaged length field allocates nothing
                ds = read_header(f, SYNTHETIC_MARKER_TAGS)
                raw = ds.get("PatientID")
            except DicomError as e:
                problems.append(f"{fp}: cannot read the DICOM header: {e.problem}")
                continue
            except Exception as e:
                problems.append(f"{fp}: cannot read the DICOM header ({type(e).__name__})")
                continue
            raw = "" if raw is None else str(raw).strip()
            if not raw:
                problems.append(f"{fp}: no PatientID in the DICOM header, or not a DICOM file (a patient id is needed for a patient-level split)")
                continue
            pid = raw if is_synthetic_dataset(ds) else pseudonymize(raw, salt)
            rows.append({"path": fp, "label": lab, "patient_id": pid})
    _raise_problems(str(root), problems)
    return pd.DataFrame(rows, columns=["path", "label", "patient_id"])


def _row_problems(df: pd.DataFrame, check_files: bool) -> list[str]:
    problems = []
    first_seen: dict[str, object] = {}
    for i in df.index:
        where = _where(df, i)
        path, label, pid = df.at[i, "path"], df.at[i, "label"], df.at[i, "patient_id"]
        if _blank(path):
            problems.append(f"{where}: empty path")
        elif path in first_seen:
            problems.append(f"{where}: duplicate path (also at {_where(df, first_seen[path]).split(':')[0]})")
        else:
            first_seen[path] = i
            if check_files:
                problem = _file_problem(Path(path))
                if problem:
                    problems.append(f"{where}: {problem}")
        if _blank(label) or label not in LABELS:
            problems.append(f"{where}: unknown label {label!r} (allowed: {', '.join(LABELS)})")
        if _blank(pid):
            problems.append(f"{where}: empty patient_id")
        if "split" in df.columns and df.at[i, "split"] not in SPLITS:
            problems.append(f"{where}: split {df.at[i, 'split']!r} is not train or test")
    problems += _label_conflicts(df)
    return problems


def _file_problem(path: Path) -> str | None:
    """Why ``path`` is not a file the manifest can list (None if it is one)."""
    try:
        if path.is_file():
            return None
        return "not a file" if path.exists() else "missing file"
    except OSError as e:  # a name too long for the file system, a symlink loop
        return f"cannot be checked ({(e.strerror or type(e).__name__).lower()})"


def _label_conflicts(df: pd.DataFrame) -> list[str]:
    problems = []
    ok = df[~df["patient_id"].map(_blank) & df["label"].isin(LABELS)]
    for pid, g in ok.groupby("patient_id", sort=True):
        if g["label"].nunique() > 1:
            for i in g.index:
                problems.append(
                    f"{_where(df, i)}: patient {pid} has several labels ({', '.join(sorted(g['label'].unique()))}); "
                    "labels are per patient"
                )
    return problems


def _leak_problems(df: pd.DataFrame) -> list[str]:
    problems = []
    ok = df[~df["patient_id"].map(_blank) & df["split"].isin(SPLITS)]
    for pid, g in ok.groupby("patient_id", sort=True):
        if g["split"].nunique() > 1:
            for i in g.index:
                problems.append(f"{_where(df, i)}: patient {pid} is in both train and test (this row: {df.at[i, 'split']})")
    return problems


def _split_problems(df: pd.DataFrame) -> list[str]:
    if "split" not in df.columns:
        return []
    problems = _leak_problems(df)
    ok = df[df["split"].isin(SPLITS) & df["label"].isin(LABELS)]
    for lab in LABELS:
        have = set(ok.loc[ok["label"] == lab, "split"])
        if not (df["label"] == lab).any():
            continue
        for s in SPLITS:
            if s not in have:
                problems.append(f"class {lab}: no {s} patient")
    return problems


def check_split(df: pd.DataFrame) -> None:
    """Raise :class:`ManifestError` if a patient is in both train and test (naming the patients and
    their rows), or if ``split`` is missing or holds anything but train/test."""
    if "split" not in df.columns:
        raise ManifestError("no split column: call split_patients first")
    if not df.index.is_unique:
        df = df.reset_index(drop=True)
    problems = [
        f"{_where(df, i)}: split {df.at[i, 'split']!r} is not train or test" for i in df.index if df.at[i, "split"] not in SPLITS
    ]
    problems += _leak_problems(df)
    _raise_problems("split", problems)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def split_patients(df: pd.DataFrame, test_fraction: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """A copy of ``df`` with ``split`` filled in, at patient level and stratified by label.

    For each label (in :data:`LABELS` order) its patients are sorted, shuffled with
    ``numpy.random.default_rng([seed, label index])`` and the first ``round(test_fraction * n)``
    (half up; at least 1, at most n - 1) go to test; the rest to train. Deterministic for a given
    seed and set of patient ids (pseudonyms depend on the salt: see :mod:`osteo.privacy`). A class
    with fewer than 2 patients is an error. If ``df`` already has a complete ``split``, it is
    validated and returned unchanged (as a copy).
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    out = df.copy()
    if not out.index.is_unique:
        raise ManifestError("split_patients: the DataFrame index has duplicates; reset_index(drop=True) first")
    if "split" in out.columns and out["split"].map(_blank).any() and not out["split"].map(_blank).all():
        problems = [f"{_where(out, i)}: empty split while other rows have one" for i in out.index if _blank(out.at[i, "split"])]
        _raise_problems("split_patients: split given on some rows only (fill it on every row or on none)", problems)
    if "split" in out.columns and not out["split"].map(_blank).any():
        problems = [
            f"{_where(out, i)}: split {out.at[i, 'split']!r} is not train or test"
            for i in out.index
            if out.at[i, "split"] not in SPLITS
        ]
        _raise_problems("split", problems + _leak_problems(out) + _label_conflicts(out))
        return out
    problems = [f"{_where(out, i)}: empty patient_id" for i in out.index if _blank(out.at[i, "patient_id"])]
    problems += [
        f"{_where(out, i)}: unknown label {out.at[i, 'label']!r} (allowed: {', '.join(LABELS)})"
        for i in out.index
        if out.at[i, "label"] not in LABELS
    ]
    problems += _label_conflicts(out)
    _raise_problems("split_patients", problems)
    patient_label = out.groupby("patient_id")["label"].first()
    test_patients: set = set()
    for k, lab in enumerate(LABELS):
        pats = sorted(patient_label.index[patient_label == lab])
        if not pats:
            continue
        if len(pats) < 2:
            problems.append(f"class {lab}: {len(pats)} patient, need at least 2 to have one in train and one in test")
            continue
        n_test = min(max(_round_half_up(test_fraction * len(pats)), 1), len(pats) - 1)
        order = np.random.default_rng([int(seed), k]).permutation(len(pats))
        test_patients.update(pats[j] for j in order[:n_test])
    _raise_problems("split_patients", problems)
    out["split"] = np.where(out["patient_id"].isin(test_patients), "test", "train")
    return out


def split_slices(df: pd.DataFrame, test_fraction: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """A copy of ``df`` split BY SLICE, stratified by label: a pitfall, for measuring it, never for results.

    Any ``split`` already there is replaced. For each label its slices (in path order) are shuffled
    with ``numpy.random.default_rng([seed, label index, 1])`` and the first ``round(test_fraction *
    n)`` (half up; at least 1, at most n - 1) go to test, whatever their patient: neighbouring
    slices of one patient end up in train and test, and a model can score by recognising the
    patient rather than the bone. Use :func:`split_patients` for real experiments.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    out = df.copy()
    if not out.index.is_unique:
        raise ManifestError("split_slices: the DataFrame index has duplicates; reset_index(drop=True) first")
    problems = [
        f"{_where(out, i)}: unknown label {out.at[i, 'label']!r} (allowed: {', '.join(LABELS)})"
        for i in out.index
        if out.at[i, "label"] not in LABELS
    ]
    _raise_problems("split_slices", problems)
    split = pd.Series("train", index=out.index, dtype=object)
    for k, lab in enumerate(LABELS):
        rows = out.index[out["label"] == lab]
        if len(rows) == 0:
            continue
        if len(rows) < 2:
            problems.append(f"class {lab}: {len(rows)} slice, need at least 2 to have one in train and one in test")
            continue
        rows = sorted(rows, key=lambda i: str(out.at[i, "path"]))
        n_test = min(max(_round_half_up(test_fraction * len(rows)), 1), len(rows) - 1)
        order = np.random.default_rng([int(seed), k, 1]).permutation(len(rows))
        split.loc[[rows[j] for j in order[:n_test]]] = "test"
    _raise_problems("split_slices", problems)
    out["split"] = split
    return out
