"""The kit's embedded default data set: synthetic axial CT slices of the lumbar spine, as real CT DICOM.

The paper's 4500 hospital slices are private, so the kit ships a generator whose output goes through
the same loader as real data. SYNTHETIC DATA: numbers measured on it are not the paper's.

Anatomy (per patient one lumbar level, L1-L5, in the manifest's ``level``; all of the patient's slices
cut that vertebra, 3-5 mm apart). At every level: skin, subcutaneous fat (5-45 mm), abdominal wall
muscles, visceral fat between bowel loops packed in the peritoneal cavity (fluid, gas with an air-fluid
level, faeces), aorta (bifurcating at L4) and IVC (iliac vessels at L5), psoas growing from L1 to L5,
quadratus lumborum, erector spinae, multifidus. At L1-L2: liver, spleen, stomach with gas, pancreas,
SMA, crura of the diaphragm, kidneys with cortex, medulla, sinus fat and pelvis, renal veins, lower ribs;
at L3 the kidneys' lower poles and the colon; at L5 the iliac wings with iliacus and gluteus. Organ HU
(unenhanced / portal venous) follow radiology teaching values (e.g. Hofer, CT Teaching Manual): liver
55-65 / 100-120, spleen 45-50 / 110-130, pancreas 40-50 / 90-110 (fattier with age), kidney 30-35 /
cortex 150-200, muscle 45-55 (lower with fat infiltration), fat -95 to -105, bowel wall 30-45; organs
have soft partial-volume edges (1-1.5 mm) and a faint parenchymal texture. Body fat is ~35-50 % of the
cross-section (``body_fat_fraction``; one real L1-L2 slice: 38 %).

The vertebra's section depends on where the slice cuts it (``z_in_vertebra``, 0 = upper endplate;
``section``): pedicles at 0.12-0.52 of the body's height, transverse processes 0.2-0.45, superior
facets 0-0.35, laminae 0.35-0.9, inferior facets 0.72-1, spinous process 0.45-1, the basivertebral vein
at mid-height, the dense endplate and the ring apophysis near 0 and 1; an element cut by only part of
the slice thickness appears with that partial volume. The canal is oval at L1-L2, trefoil at L3-L5.
The cortical shell (``cortex_mm``, 0.3-0.8 mm) varies around the body and thins with bone loss.

Bone model: every patient has an age (a DXA-referral cohort, 65 +- 12 years) and a latent trabecular
density (HU at 120 kVp, unenhanced; 226 +- 44 below 30 years, falling ~2.3 HU/year to 89 +- 38 at 90).
The label does NOT come from CT: a DXA-like T-score ``T = -1.6 + 1.2 (0.62 z + 0.78 e)`` (z: the
density's z-score in the cohort, e: a standard-normal residual) correlates with that density only
imperfectly (r = 0.62) and is thresholded like DXA (normal T > -1, osteopenia -2.5 < T <= -1,
osteoporosis T <= -2.5). A slice's ``trabecular_hu`` adds a level-to-level variation, the kVp effect
(100 kVp +8 %, 140 kVp -5 %) and contrast enhancement of the marrow (+10-20 HU).

Trabecular texture (drawn at 3x the pixel resolution, then averaged, blurred and partial-volumed over
the slice thickness): vertical trabeculae cross an axial slice as rods (spots of a band-pass field),
continuous from slice to slice (an AR(1) process along z, correlation length 12 mm), so a patient's
neighbouring slices share their texture; horizontal trabeculae form a network of lines in the slice,
new in each slice. Bone loss removes the horizontal trabeculae first (``h_share``, the share of the
bone in them, falls from ~0.5 to ~0.2: vertical striation dominates), makes the pattern coarser
(larger marrow spaces) and the marrow fattier and patchier (a smooth field, also continuous along z).
Microarchitecture -- a design assumption of the kit: the T-score residual e gets a visible counterpart,
a score ``micro_score = 0.95 e + 0.31 eta`` (+ = healthier) that shifts ``h_share`` and the coarseness
AT EQUAL MEAN HU (the bone fraction is re-centred exactly over the trabecular mask), so texture carries
information beyond mean HU, as the paper's premise needs; it looks like trabecular loss, not like holes.

Confounders (``synthesize(confounders=...)``, each switchable and recorded in ``confounders``; the
labels, densities and T-scores are identical with and without them). Off, the attribute is drawn
independently of the label; on, it goes with the T-score at about its literature strength:

- ``sex``: women's T-scores are 1 SD lower, so osteoporosis is ~3-4x as common in women over 50
  (Wright et al., J Bone Miner Res 2014, NHANES 2005-2010). Sex shows
  in the image through body habitus (more subcutaneous fat, smaller muscles and vertebrae in women).
- ``body``: body size and fat (subcutaneous thickness, visceral fat) correlate r = 0.3 with the T-score
  (low weight/BMI is among the strongest correlates of low BMD: Felson et al., J Bone Miner Res 1993).
- ``muscle``: psoas and paraspinal size and attenuation (fat infiltration) correlate r = 0.3 with the
  T-score (sarcopenia and osteoporosis go together; low muscle attenuation predicts fracture: Lang et
  al., J Bone Miner Res 2010).
- ``cortex``: the cortical shell's thickness correlates r = 0.4 with the T-score's residual after
  trabecular density (the shell carries a large part of vertebral strength and of areal BMD and thins
  in osteoporosis: Ritzel et al., J Bone Miner Res 1997).
- ``aorta``: aortic wall calcification becomes more likely with age (log odds +0.09 per year) and with
  a low T-score (odds ratio 1.65 per SD: Schulz et al., J Clin Endocrinol Metab 2004; Kiel et al.,
  Calcif Tissue Int 2001). Off, calcification follows a random age instead of the patient's.

What a network can learn from them, measured by ``benchmarks/masked_vertebra.py`` (a small CNN, 300
patients per class, one 64-px slice each, 5-fold cross-validation by patient, 25 epochs, seed 0;
95 % intervals by a bootstrap over patients): with the vertebra masked out it reaches 38.0 %
(35.0-41.2) with the confounders on and 32.8 % (29.7-36.0, chance 33.3 %) with them off; on the full
slices (confounders on) 67.6 % (64.7-70.4). So the soft tissues carry a small signal, as in real
cohorts, and the bone carries most of it.

Scanner: a Gaussian PSF (sigma 0.45-0.75 mm), then noise from a filtered back-projection
(:mod:`osteo.ct_noise`: a bank of fields made by projecting an abdomen phantom, adding quantum noise
to the sinogram and reconstructing; a random crop of a random field per slice, scaled to the slice's
``noise_sd`` of 10-30 HU): its power peaks at ~0.1-0.2 cycles/mm, with mild lateral streaks.

Everything is deterministic from ``seed`` (same seed, same bytes). ``SYNTHETIC_VERSION`` is written in
every manifest row and carried into every training result; results of another version are not
comparable. ``threshold_rule`` is the "clinical reference": opportunistic screening by mean trabecular
HU with two thresholds fitted on train (Pickhardt-style), which is not part of the paper.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import multiprocessing as mp
import os
import statistics
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from tqdm.auto import tqdm

from .ct_noise import bank_size, noise_bank, noise_patch
from .manifest import LABELS  # one ordering of the classes for the whole kit

MANIFEST_COLUMNS = (
    "path", "label", "patient_id", "split",
    "bone_density", "dxa_tscore", "trabecular_hu", "kvp", "contrast", "noise_sd",
    "pixel_spacing", "slice_thickness", "age", "sex",
    # our extras
    "roi_hu", "roi_sd", "bv_tv", "marrow_hu", "psf_sigma", "slice_index",
    "micro_score", "h_share",  # microarchitecture: the patient's latent score, horizontal trabeculae's share
    # anatomy and confounders (module docstring)
    "level", "section", "z_in_vertebra", "confounders", "body_fat_fraction", "subcutaneous_fat_mm",
    "psoas_cm2", "muscle_hu", "cortex_mm", "aortic_calcium", "synthetic_version",
)

# ---- cohort model (tuned by simulation, see module docstring) -------------------------------
_AGE_MEAN, _AGE_SD = 65.0, 12.0  # a DXA-referral cohort, clipped to [20, 90]
_FEMALE_FRACTION = 0.6
_POP_DENSITY_MEAN, _POP_DENSITY_SD = 145.0, 49.0  # density of that cohort (for the z-score)
_T_MEAN, _T_SD, _T_DENSITY_CORR = -1.6, 1.2, 0.62
_KVP_BONE = {100: 1.08, 120: 1.0, 140: 0.95}  # lower kVp -> higher bone HU
_KVP_NOISE = {100: 1.2, 120: 1.0, 140: 0.85}
_KVP_FAT = {100: -3.0, 120: 0.0, 140: 2.0}
_BONE_TISSUE_HU = 1800.0  # effective HU of fully mineralised bone tissue (before partial volume)
_UP = 3  # texture super-sampling factor
_MARROW_PATCH_HU = 30.0  # depth of fatty marrow patches per unit fat fraction
# microarchitecture (see module docstring): a latent score per patient that explains most of the
# T-score's residual after density, shown as fewer horizontal trabeculae and a coarser pattern at equal mean HU
_MICRO_CORR = 0.95  # correlation of the microarchitecture score with the T-score residual
_H_SLOPE = 0.12  # change of the horizontal trabeculae's share of the bone per unit score
_F0_SLOPE = 0.08  # relative change of the pattern's spatial frequency per unit score
SYNTHETIC_VERSION = "synthetic-2"  # recorded in every manifest row and result; bump when the images change
_PAD = 8  # pixels of edge padding around the FFT blur (avoids wrap-around)


class SyntheticError(RuntimeError):
    """Raised for problems with the synthetic data set's output folder."""


def _density_prior(age: float, sex: str) -> tuple[float, float]:
    """Mean and SD of L1 trabecular HU at ``age`` (design section 5: 226 +- 44 below 30, 89 +- 38 at 90)."""
    f = min(max((age - 30.0) / 60.0, 0.0), 1.0)
    mu = 226.0 - (226.0 - 89.0) * f
    sd = 44.0 - 6.0 * f
    return mu, sd  # sex acts through the T-score (the "sex" confounder), not through CT density


def _label_of(t: float) -> str:
    return "normal" if t > -1.0 else ("osteopenia" if t > -2.5 else "osteoporosis")


@dataclass
class _Patient:
    cand: int  # candidate index in the draw sequence (seeds its anatomy and slices)
    age: float
    sex: str
    density: float
    tscore: float
    label: str
    kvp: int
    contrast: bool
    noise_sd: float
    pixel_spacing: float
    slice_thickness: float
    psf_sigma: float
    patient_id: str = ""
    n_slices: int = 0
    split: str = ""  # "train" or "test" (set by _cohort)
    t_resid: float = 0.0  # standard-normal residual of the T-score after density (not stored)
    u_sex: float = 0.0  # the uniform that drew the sex (re-used when sex goes with the T-score)


def _draw_patient(rng: np.random.Generator, cand: int) -> _Patient:
    age = float(np.clip(rng.normal(_AGE_MEAN, _AGE_SD), 20.0, 90.0))
    u_sex = float(rng.random())
    sex = "F" if u_sex < _FEMALE_FRACTION else "M"
    mu, sd = _density_prior(age, sex)
    density = max(mu + sd * rng.standard_normal(), 30.0)
    z = (density - _POP_DENSITY_MEAN) / _POP_DENSITY_SD
    r = _T_DENSITY_CORR
    e = float(rng.standard_normal())  # the T-score's residual after density
    tscore = round(_T_MEAN + _T_SD * (r * z + math.sqrt(1 - r * r) * e), 3)  # as stored
    kvp = int(rng.choice([100, 120, 140], p=[0.25, 0.6, 0.15]))
    contrast = bool(rng.random() < 0.5)
    thickness = float(rng.choice([1.0, 1.25, 2.0, 2.5, 3.0, 5.0]))
    spacing = round(float(rng.uniform(0.6, 0.9)), 4)
    psf = round(float(rng.uniform(0.45, 0.75)), 3)
    dose_sd = rng.uniform(11.0, 21.0)
    noise_sd = float(np.clip(dose_sd * math.sqrt(2.5 / thickness) * _KVP_NOISE[kvp], 10.5, 29.0))
    return _Patient(cand, round(age, 1), sex, round(density, 2), tscore, _label_of(tscore), kvp,
                    contrast, round(noise_sd, 2), spacing, thickness, psf, t_resid=e, u_sex=u_sex)


def _test_slices(n_per_class: int, n_test_per_class: int | None) -> int:
    """Test slices (= test patients) per class: ``n_test_per_class``, else 20 % (the paper's 80/20 split), at least one."""
    if n_test_per_class is None:
        return min(n_per_class, max(1, int(round(0.2 * n_per_class))))
    if not 1 <= n_test_per_class <= n_per_class:
        raise ValueError(f"synthesize: n_test_per_class ({n_test_per_class}) must lie in 1..n_per_class ({n_per_class})")
    return int(n_test_per_class)


def _cohort(n_per_class: int, seed: int, slices_per_patient: int, n_test_per_class: int | None = None) -> list[_Patient]:
    """The patients of the synthetic set, in the order of their ids, each with its split and slice count.

    Per class: ``n_test`` test patients with ONE slice each (evaluation is cheap: one slice per
    patient gives the most independent evidence for a given number of test slices) and training
    patients with ``slices_per_patient`` neighbouring slices (the last may get fewer), so every class
    holds exactly ``n_per_class`` slices. Patients are drawn from one random sequence until every
    class is full (rejection by label); which patients of a class are tested is a seeded
    permutation, and the ids ``SYN00001..`` are a seeded permutation of all patients, so neither the
    id, the file name nor the order of the rows carries the label or the split.
    """
    if n_per_class < 1 or slices_per_patient < 1:
        raise ValueError(f"synthesize: n_per_class ({n_per_class}) and slices_per_patient "
                         f"({slices_per_patient}) must be >= 1")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"synthesize: seed must be a non-negative integer, got {seed!r}")
    n_test = _test_slices(n_per_class, n_test_per_class)
    n_train = n_per_class - n_test
    need = {lab: n_test + -(-n_train // slices_per_patient) for lab in LABELS}  # patients per class
    rng = np.random.default_rng([seed, 0])
    by_label: dict = {lab: [] for lab in LABELS}
    cand = 0
    while any(len(by_label[lab]) < need[lab] for lab in LABELS):
        p = _draw_patient(rng, cand)
        cand += 1
        if len(by_label[p.label]) < need[p.label]:
            by_label[p.label].append(p)
    split_rng = np.random.default_rng([seed, 3])
    for lab in LABELS:
        ps = [by_label[lab][i] for i in split_rng.permutation(len(by_label[lab]))]
        left = n_train
        for i, p in enumerate(ps):
            if i < n_test:
                p.split, p.n_slices = "test", 1
            else:
                p.split, p.n_slices = "train", min(slices_per_patient, left)
                left -= p.n_slices
    out = [p for lab in LABELS for p in by_label[lab]]
    order = np.random.default_rng([seed, 4]).permutation(len(out))
    width = max(5, len(str(len(out))))
    for rank, i in enumerate(order, 1):
        out[i].patient_id = f"SYN{rank:0{width}d}"
    return sorted(out, key=lambda q: q.patient_id)


# ---- shapes: signed distances (mm, negative inside) in the vertebra's frame --------------------
def _sd_ellipse(x, y, cx, cy, a, b, ang=0.0):
    u, v = x - cx, y - cy
    if ang:
        c, s = math.cos(ang), math.sin(ang)
        u, v = c * u + s * v, -s * u + c * v
    k0 = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    k1 = np.sqrt((u / (a * a)) ** 2 + (v / (b * b)) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _sd_capsule(x, y, x0, y0, x1, y1, r):
    dx, dy = x1 - x0, y1 - y0
    px, py = x - x0, y - y0
    h = np.clip((px * dx + py * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.sqrt((px - h * dx) ** 2 + (py - h * dy) ** 2) - r


def _sd_circle(x, y, cx, cy, r):
    return np.sqrt((x - cx) ** 2 + (y - cy) ** 2) - r


def _sd_above(x, y, y0):
    """Half-plane y < y0 (anterior of y0: where gas collects in a supine patient)."""
    return (y - y0) + 0.0 * x


@dataclass
class _Shape:
    kind: str  # "ellipse" | "capsule" | "circle" | "above" | "inter" (intersection of sub-shapes)
    args: tuple
    bbox: tuple  # xmin, xmax, ymin, ymax (mm, vertebra frame)

    def sd(self, x, y):
        if self.kind == "inter":
            return np.maximum.reduce([s.sd(x, y) for s in self.args])
        return {"ellipse": _sd_ellipse, "capsule": _sd_capsule, "circle": _sd_circle,
                "above": _sd_above}[self.kind](x, y, *self.args)


def _ellipse(cx, cy, a, b, ang=0.0):
    r = max(a, b)
    return _Shape("ellipse", (cx, cy, a, b, ang), (cx - r, cx + r, cy - r, cy + r))


def _capsule(x0, y0, x1, y1, r):
    return _Shape("capsule", (x0, y0, x1, y1, r),
                  (min(x0, x1) - r, max(x0, x1) + r, min(y0, y1) - r, max(y0, y1) + r))


def _circle(cx, cy, r):
    return _Shape("circle", (cx, cy, r), (cx - r, cx + r, cy - r, cy + r))


def _inter(*shapes):
    """Intersection (the first shape's bounding box; an "above" half-plane has none of its own)."""
    return _Shape("inter", shapes, shapes[0].bbox)


def _above(y0):
    return _Shape("above", (y0,), (-1e4, 1e4, -1e4, y0))


def _union_bbox(shapes):
    b = np.array([s.bbox for s in shapes])
    return (b[:, 0].min(), b[:, 1].max(), b[:, 2].min(), b[:, 3].max())


# ---- confounders and anatomy -------------------------------------------------------------------
CONFOUNDERS = ("sex", "body", "muscle", "cortex", "aorta")
LEVELS = ("L1", "L2", "L3", "L4", "L5")
_RHO_BODY = 0.3  # BMI/body fat vs BMD (module docstring: Felson 1993)
_RHO_MUSCLE = 0.3  # psoas/paraspinal size and attenuation vs BMD (module docstring)
_RHO_CORTEX = 0.4  # cortical thickness vs the T-score residual after trabecular density
_CALC_T_LOGOR = 0.5  # log odds ratio of aortic calcification per SD lower T-score
_SEX_T_SHIFT = 1.0  # mean T-score, women minus men: -1.0 SD (osteoporosis 3-4x as common in women)
_ROD_Z = 12.0  # mm: correlation length of the vertical trabeculae along z (continuity between slices)
_MARROW_Z = 20.0  # mm: correlation length of the fatty-marrow pattern along z
_H_Z = 0.3  # mm: horizontal trabeculae decorrelate within a slice (partial volume over its thickness)
_ROD_PV = 0.3  # contrast of the trabecular pattern at CT resolution (calibrated: ROI SD ~35-60 HU with noise)
_V_Z = 6.0  # mm: vertical trabeculae wander a little (partial volume over the slice thickness)
# psoas cross-section (cm^2, one side, men; women ~25 % less) by level: Imamura 1983-style growth L1 -> L5
_PSOAS_CM2 = {"L1": 3.0, "L2": 6.0, "L3": 10.0, "L4": 13.5, "L5": 15.0}
_TP_LEN = {"L1": 16.0, "L2": 20.0, "L3": 26.0, "L4": 22.0, "L5": 15.0}  # transverse process length (mm)
# z-extent of the posterior elements as a fraction of the body's height (0 = upper endplate)
_ELEMENTS_Z = {"pedicle": (0.12, 0.52), "transverse": (0.2, 0.45), "sup_facet": (0.0, 0.35),
               "lamina": (0.35, 0.9), "inf_facet": (0.72, 1.0), "spinous": (0.45, 1.0)}


def _confounder_set(confounders) -> frozenset:
    if confounders is True:
        return frozenset(CONFOUNDERS)
    if confounders is None or confounders is False:
        return frozenset()
    if isinstance(confounders, str):
        confounders = [c for c in confounders.replace(",", "+").split("+") if c and c != "none"]
    out = frozenset(confounders)
    bad = sorted(out - set(CONFOUNDERS))
    if bad:
        raise ValueError(f"synthesize: unknown confounder(s) {bad}; choose from {list(CONFOUNDERS)}")
    return out


def _confounder_label(conf: frozenset) -> str:
    return "+".join(c for c in CONFOUNDERS if c in conf) or "none"


def _t_z(p: _Patient) -> float:
    return (p.tscore - _T_MEAN) / _T_SD


def _with_sex(p: _Patient, conf: frozenset) -> _Patient:
    """The patient with its sex drawn from the T-score (``"sex"`` on: women have a T-score 1 SD
    lower, so osteoporosis is 3-4x as common in them) or independently of it (off)."""
    if "sex" not in conf:
        return p
    mu_f = _T_MEAN - (1 - _FEMALE_FRACTION) * _SEX_T_SHIFT * _T_SD
    mu_m = mu_f + _SEX_T_SHIFT * _T_SD
    var = _T_SD ** 2 - _FEMALE_FRACTION * (1 - _FEMALE_FRACTION) * (_SEX_T_SHIFT * _T_SD) ** 2
    logit = (math.log(_FEMALE_FRACTION / (1 - _FEMALE_FRACTION))
             + ((p.tscore - mu_m) ** 2 - (p.tscore - mu_f) ** 2) / (2 * var))
    pf = 1.0 / (1.0 + math.exp(-logit))
    return dataclasses.replace(p, sex="F" if p.u_sex < pf else "M")


def _coupled(rng, conf, name, rho, z_label) -> float:
    """A standard-normal latent, correlated ``rho`` with ``z_label`` when confounder ``name`` is on."""
    e = float(rng.standard_normal())
    return rho * z_label + math.sqrt(1 - rho * rho) * e if name in conf else e


@dataclass
class _Anatomy:
    """Per-patient anatomy in the vertebra's frame (mm; x to the patient's left, y posterior)."""

    level: str
    a: float
    b: float
    height: float  # vertebral body height (mm)
    z_start: float  # first slice's centre, mm below the upper endplate
    concave_r: float
    concave_depth: float
    t_body: float  # mean cortical shell of the body (mm)
    t_harm: tuple  # variation of the shell around the body: (amp1, phase1, amp2, phase2)
    t_post: float  # cortex of the posterior elements (mm)
    vein_r: float
    fat_hu: float
    muscle_hu: float
    csf_hu: float
    blood_hu: float
    marrow_hu: float
    fat_fraction: float  # marrow fat fraction
    bvtv: float
    tissue_hu: float
    offset: tuple  # body centre in image mm
    theta: float
    scale: float
    z0: float
    f0: float  # centre frequency (cycles/mm) of the trabecular pattern
    loss: float  # 0 (young, healthy) .. 1 (severe loss): drives the texture's anisotropy and coarseness
    body_outline: tuple = ()  # (cx, cy, W, H, y_back)
    micro: float = 0.0  # microarchitecture score (standard normal; low = fewer horizontal trabeculae, coarser)
    h_share: float = 0.5  # share of the bone in horizontal trabeculae
    body_fat: float = 0.0  # fat fraction of the body cross-section (whole body, not the crop)
    psoas_cm2: float = 0.0
    calcium: int = 0  # aortic wall plaques
    sub_fat: float = 0.0  # subcutaneous fat thickness (mm)
    background: tuple | None = None  # (size, image) cache of _background
    tex_half: tuple = (0, 0)  # half size (rows, cols) of the texture window, pixels
    soft: list = field(default_factory=list)  # (shape, hu, kind, edge_mm) painted in order
    rod_spectrum: np.ndarray | None = None  # spectrum of the vertical trabeculae (AR(1) along z)
    marrow_spectrum: np.ndarray | None = None  # spectrum of the fatty-marrow pattern (AR(1) along z)


def _anatomy(p: _Patient, rng: np.random.Generator, conf: frozenset = frozenset(CONFOUNDERS)) -> _Anatomy:
    """One patient's anatomy at one lumbar level (all the patient's slices cut that vertebra)."""
    fem = p.sex == "F"
    zt = _t_z(p)
    z_body = _coupled(rng, conf, "body", _RHO_BODY, zt)
    z_mus = _coupled(rng, conf, "muscle", _RHO_MUSCLE, zt)
    z_cort = _coupled(rng, conf, "cortex", _RHO_CORTEX, p.t_resid)
    age_c = p.age if "aorta" in conf else float(np.clip(rng.normal(_AGE_MEAN, _AGE_SD), 20, 90))
    level = LEVELS[int(rng.integers(5))]
    li = LEVELS.index(level)
    s = float(np.clip(rng.normal(1.0, 0.07), 0.85, 1.18)) * (0.94 if fem else 1.0) * (1 + 0.03 * li)
    a = 22.0 * s * rng.uniform(0.95, 1.05)
    b = 16.0 * s * rng.uniform(0.92, 1.08)
    kb = _KVP_BONE[p.kvp]
    # marrow gets fattier as density falls (design section 5); BV/TV from the target mean at 120 kVp, unenhanced
    ff = float(np.clip(0.3 + 0.45 * (226.0 - p.density) / 137.0 + rng.normal(0, 0.05), 0.1, 0.9))
    marrow0 = (1 - ff) * 35.0 + ff * (-95.0)
    bvtv = float(np.clip((p.density - marrow0) / (_BONE_TISSUE_HU - marrow0), 0.02, 0.45))
    boost = rng.uniform(10.0, 20.0) if p.contrast else 0.0  # enhancement of marrow (~+10-20 HU)
    fat = rng.uniform(-104.0, -96.0) + _KVP_FAT[p.kvp]
    # cortical shell: thins with bone loss (and with the T-score residual when "cortex" is on)
    t_body = float(np.clip((0.2 + 0.0021 * p.density) * (1 + 0.15 * z_cort), 0.3, 0.8))
    # muscle: smaller and fattier with age-related loss ("muscle"), women smaller
    mus_hu = float(np.clip(47.0 + 4.0 * z_mus + rng.normal(0, 1.5), 30.0, 58.0)) + (6.0 if p.contrast else 0.0)
    height = rng.uniform(24.0, 28.0) * s
    step = max(p.slice_thickness, 3.0)
    span = (max(p.n_slices, 1) - 1) * step
    lo, hi = 0.5, max(height - 0.5 - span, 0.6)
    an = _Anatomy(
        level=level, a=a, b=b, height=height, z_start=rng.uniform(lo, hi),
        concave_r=rng.uniform(11, 16) * s, concave_depth=rng.uniform(1.5, 3.5) * s,
        t_body=t_body, t_harm=(rng.uniform(0.15, 0.35), rng.uniform(0, 2 * math.pi), rng.uniform(0.05, 0.2),
                               rng.uniform(0, 2 * math.pi)),
        t_post=rng.uniform(0.6, 0.9) * (0.8 + 0.2 * t_body / 0.5), vein_r=rng.uniform(1.0, 1.6),
        fat_hu=fat, muscle_hu=mus_hu, csf_hu=rng.uniform(5.0, 15.0),
        blood_hu=rng.uniform(130, 180) if p.contrast else rng.uniform(35, 45),
        marrow_hu=marrow0 + boost, fat_fraction=ff, bvtv=bvtv, tissue_hu=_BONE_TISSUE_HU * kb,
        offset=(rng.uniform(-4, 4), -rng.uniform(2, 10)), theta=math.radians(rng.normal(0, 3.0)),
        scale=1.0, z0=rng.uniform(-250, -120), f0=rng.uniform(0.5, 0.6),
        loss=float(np.clip((226.0 - p.density) / 160.0, 0.0, 1.0)),
    )
    reach = 1.12 * (max(a, b) + 0.15 * min(a, b)) / p.pixel_spacing
    an.tex_half = (2 * math.ceil((b * reach / max(a, b) + 3) / 2), 2 * math.ceil((reach + 3) / 2))
    _soft_tissue(an, p, rng, fem, z_body, z_mus, age_c, zt, conf)
    # microarchitecture (see module docstring): fewer horizontal trabeculae and a coarser pattern
    c = _MICRO_CORR
    an.micro = c * p.t_resid + math.sqrt(1 - c * c) * float(rng.standard_normal())
    an.h_share = float(np.clip(0.5 - 0.3 * an.loss + _H_SLOPE * an.micro, 0.08, 0.65))
    an.f0 = float(np.clip(an.f0 * (1.0 - 0.2 * an.loss + _F0_SLOPE * an.micro), 0.3, 0.8))
    an.body_fat = _body_fat_fraction(an)
    return an


class _Abdomen:
    """Builds the soft tissues of one cross-section as (shape, HU, kind, edge) in painting order.

    Each step draws from the patient's generator in a fixed order (changing the order changes every
    image); later shapes paint over earlier ones."""

    def __init__(self, an: _Anatomy, p: _Patient, rng: np.random.Generator):
        self.an, self.p, self.rng = an, p, rng
        self.li = LEVELS.index(an.level)
        self.contrast = p.contrast
        self.y_spine = an.b - an.concave_depth  # posterior edge of the vertebral body
        self.soft = []

    def add(self, shape, hu, kind, edge=1.2):
        self.soft.append((shape, float(hu), kind, edge))

    def enhanced(self, plain, portal):
        """HU drawn from ``portal`` (contrast-enhanced scan) or ``plain`` (unenhanced)."""
        return self.rng.uniform(*portal) if self.contrast else self.rng.uniform(*plain)

    def body_wall(self, fem, z_body, z_mus):
        """Body habitus (size and fat from the body latent and sex; body fat ~30-45 % of the
        cross-section): skin, subcutaneous fat, wall muscles and the peritoneal cavity."""
        rng, an = self.rng, self.an
        sub = float(np.clip(10.0 + 5.0 * z_body + (5.0 if fem else -3.0) + rng.normal(0, 2), 5.0, 45.0))
        self.visc = float(np.clip(1.0 + 0.35 * z_body + (-0.25 if fem else 0.1) + rng.normal(0, 0.1), 0.35, 1.9))
        self.mus = mus = float(np.clip((1.0 + 0.12 * z_mus) * (0.78 if fem else 1.0), 0.55, 1.4))
        an.sub_fat = self.sub = sub
        back = 40.0 * math.sqrt(mus) + 8.0  # posterior body wall to the back muscles' fascia
        self.y_back = y_back = self.y_spine + back + sub + 2.0
        H = float(np.clip(105.0 + 12.0 * z_body + 0.6 * (sub - 17.0) + rng.normal(0, 6), 85.0, 160.0))
        W = float(np.clip(1.3 * H + 18.0 + rng.normal(0, 8) + (4.0 if fem else 0.0), 115.0, 215.0))
        self.W, self.H = W, H
        self.bx, self.by = bx, by = rng.normal(0, 3), y_back - 0.93 * H
        self.add(_inter(_ellipse(bx, by, W, H), _above(y_back)), 40.0, "skin", 0.8)
        self.add(_inter(_ellipse(bx, by, W - 2, H - 2), _above(y_back - 2)), an.fat_hu, "fat", 0.8)
        self.wall = 12.0 + 10.0 * mus  # abdominal wall muscles (rectus, obliques, transversus)
        self.Wm, self.Hm = W - 2 - sub, H - 2 - sub * rng.uniform(0.8, 1.2)
        self.add(_ellipse(bx, by, self.Wm, self.Hm), an.muscle_hu, "wall", 0.8)
        self.Wc, self.Hc = self.Wm - self.wall, self.Hm - self.wall
        # the peritoneal cavity and retroperitoneum, filled with visceral fat
        self.cavity = _ellipse(bx, by, self.Wc, self.Hc)
        self.add(self.cavity, an.fat_hu + 5.0, "vfat", 0.8)

    def bowel(self, cx, cy, ra, rb, ang, content=None):
        """One bowel loop: wall, and fluid, gas (an air-fluid level), feces or collapsed."""
        rng, cav = self.rng, self.cavity
        content = content or rng.choice(["fluid", "gas", "feces", "collapsed"], p=[0.35, 0.3, 0.15, 0.2])
        if content == "collapsed":
            self.add(_inter(_ellipse(cx, cy, 0.6 * ra, 0.5 * rb, ang), cav), self.wall_hu, "bowel")
            return
        self.add(_inter(_ellipse(cx, cy, ra, rb, ang), cav), self.wall_hu, "bowel")
        lumen = _ellipse(cx, cy, max(ra - 2.5, 1.0), max(rb - 2.5, 1.0), ang)
        if content == "feces":
            self.add(lumen, rng.uniform(-60, 10), "bowel")
            for _ in range(int(rng.integers(3, 7))):
                self.add(_circle(cx + rng.uniform(-0.6, 0.6) * ra, cy + rng.uniform(-0.6, 0.6) * rb,
                                 rng.uniform(1.0, 2.5)), -900, "gas", 0.6)
        else:
            self.add(lumen, rng.uniform(0, 25) + (10 if self.contrast else 0), "bowel")
            if content == "gas":  # gas rises anteriorly (supine): an air-fluid level
                self.add(_inter(lumen, _above(cy + rng.uniform(-0.3, 0.6) * rb)), rng.uniform(-1000, -960), "gas", 0.6)

    def place_aorta(self):
        """Where the aorta lies (it widens with age); the organs around it refer to it."""
        rng, b = self.rng, self.an.b
        self.ay_aorta = -(b + rng.uniform(10, 13))
        self.ar = rng.uniform(8.5, 11.5) * (1.0 + 0.004 * (self.p.age - 60))
        self.ax = rng.uniform(4, 12)

    def upper_abdomen(self):
        """L1-L2: liver, spleen, stomach (L1), pancreas, superior mesenteric artery, diaphragm crura
        (x to the patient's left, so the liver is at negative x)."""
        rng, an, cav = self.rng, self.an, self.cavity
        bx, by, Wc, Hc = self.bx, self.by, self.Wc, self.Hc
        big = an.level == "L1"
        lv = _ellipse(bx - 0.42 * Wc, by + (0.05 if big else 0.25) * Hc, (0.55 if big else 0.32) * Wc,
                      (0.62 if big else 0.4) * Hc, -0.2)
        self.add(_inter(lv, cav), self.enhanced((55, 65), (100, 120)), "liver", 1.5)
        if big or rng.random() < 0.4:
            sp = _ellipse(bx + 0.7 * Wc, self.y_spine - rng.uniform(0, 20), (22 if big else 13) * rng.uniform(0.8, 1.2),
                          (42 if big else 25) * rng.uniform(0.8, 1.2), 0.5)
            self.add(_inter(sp, cav), self.enhanced((45, 50), (110, 130)), "spleen", 1.5)
        if big:  # stomach with contents and gas anteriorly
            cx, cy = bx + 0.3 * Wc, by - 0.4 * Hc
            ra, rb = rng.uniform(30, 50), rng.uniform(20, 32)
            self.add(_inter(_ellipse(cx, cy, ra, rb, 0.4), cav), self.wall_hu, "bowel")
            lum = _inter(_ellipse(cx, cy, ra - 4, rb - 4, 0.4), cav)
            self.add(lum, rng.uniform(10, 35), "bowel")
            self.add(_inter(lum, _above(cy - rng.uniform(0.0, 0.5) * rb)), rng.uniform(-1000, -960), "gas", 0.6)
        # pancreas: head near the duodenum, body across the aorta, tail towards the spleen
        panc_hu = self.enhanced((40, 50), (90, 110)) - 0.15 * max(self.p.age - 50, 0)  # fatty involution with age
        py = self.ay_aorta - self.ar - rng.uniform(12, 18)
        self.add(_capsule(-28, py + 6, 55, py - (8 if big else 0), rng.uniform(8, 11)), panc_hu, "pancreas", 1.5)
        self.add(_circle(self.ax + rng.uniform(-2, 2), self.ay_aorta - self.ar - rng.uniform(5, 8), 3.5),
                 an.blood_hu, "vessel")  # SMA
        for side, r in ((-1, 4.0 if big else 3.0), (1, 3.2 if big else 2.0)):  # crura around the aorta
            self.add(_capsule(side * 0.6 * an.a, -0.8 * an.b, self.ax + side * (self.ar + 2.5),
                              self.ay_aorta - 0.5 * self.ar, r), an.muscle_hu, "muscle", 1.0)

    def bowel_loops(self):
        """Bowel loops pack the rest of the cavity; the gaps between them are the visceral fat."""
        rng, li, a, b = self.rng, self.li, self.an.a, self.an.b
        bx, by, Wc, Hc = self.bx, self.by, self.Wc, self.Hc
        r_loop = rng.uniform(9, 13)
        gap = 0.2 + 1.5 * self.visc  # visceral fat between the loops
        g = 2 * r_loop + gap  # grid step
        y_lim = self.y_spine - (25 if li <= 1 else 0)
        for gy in np.arange(by - Hc + g / 2, y_lim, g):
            for gx in np.arange(bx - Wc + g / 2, bx + Wc, g):
                cx, cy = gx + rng.uniform(-0.25, 0.25) * g, gy + rng.uniform(-0.25, 0.25) * g
                if ((cx - bx) / Wc) ** 2 + ((cy - by) / Hc) ** 2 > 0.92 or abs(cx) < a + 12 and cy > -b - 25:
                    continue
                if li <= 1 and ((cx < bx - 0.1 * Wc) or (li == 0 and cx > bx + 0.45 * Wc and cy > by - 0.2 * Hc)):
                    continue  # liver (right), spleen (left) at L1-L2
                self.bowel(cx, cy, r_loop * rng.uniform(0.7, 1.2), r_loop * rng.uniform(0.6, 1.0), rng.uniform(0, math.pi))

    def colon(self):
        """L3-L5: ascending (right) and descending (left) colon, lateral."""
        rng, bx, by, Wc, Hc = self.rng, self.bx, self.by, self.Wc, self.Hc
        self.bowel(bx - 0.72 * Wc, by + 0.05 * Hc, rng.uniform(15, 25), rng.uniform(15, 22), 0.0,
                   rng.choice(["gas", "feces"]))
        self.bowel(bx + 0.75 * Wc, by + 0.1 * Hc, rng.uniform(10, 16), rng.uniform(10, 15), 0.0,
                   rng.choice(["gas", "feces", "collapsed"]))

    def kidneys(self):
        """L1-L3: kidneys with cortex, medulla and hilum (sinus fat, pelvis, renal vein at L1-L2)."""
        rng, an, li = self.rng, self.an, self.li
        for side in (-1, 1):
            pole = (li == 2) or (li == 0 and side == -1)  # the right kidney lies lower
            ka, kb = (22, 30) if not pole else (15, 19)
            ka, kb = ka * rng.uniform(0.85, 1.1), kb * rng.uniform(0.85, 1.1)
            kx, ky = side * (an.a + 28 + ka * 0.8), self.y_spine + rng.uniform(-8, 6)
            ang = side * rng.uniform(0.35, 0.7)
            self.add(_ellipse(kx, ky, ka, kb, ang), self.enhanced((30, 35), (150, 200)), "kidney", 1.0)
            self.add(_ellipse(kx, ky, ka * 0.62, kb * 0.7, ang), self.enhanced((28, 33), (100, 140)), "kidney", 1.5)
            if not pole:  # hilum opens anteromedially
                hx, hy = kx - side * 0.55 * ka, ky - 0.35 * kb
                self.add(_ellipse(hx, hy, 0.45 * ka, 0.35 * kb, ang), an.fat_hu + 10, "kidney", 1.0)
                self.add(_ellipse(hx, hy, 0.22 * ka, 0.16 * kb, ang), rng.uniform(0, 15), "kidney", 1.0)
                if li <= 1:
                    self.add(_capsule(hx, hy, (self.ax if side > 0 else -rng.uniform(16, 22)),
                                      self.ay_aorta - (self.ar if side > 0 else 0), 3.5), an.blood_hu, "vessel", 1.0)

    def great_vessels(self):
        """Aorta (bifurcates at L4) and IVC (iliac veins at L5); returns the arteries as (x, y, r)."""
        rng, li, b = self.rng, self.li, self.an.b
        art_hu = rng.uniform(150, 250) if self.contrast else rng.uniform(35, 45)
        ven_hu = rng.uniform(100, 170) if self.contrast else rng.uniform(35, 45)
        ax, ay, ar = self.ax, self.ay_aorta, self.ar
        if li <= 2:
            arteries = [(ax, ay, ar)]
            self.add(_ellipse(-rng.uniform(18, 24), -(b + rng.uniform(7, 11)), rng.uniform(10, 14), rng.uniform(6, 9)),
                     ven_hu, "vessel", 1.0)
        else:
            d = 8.0 if li == 3 else rng.uniform(15, 22)  # half the distance between the iliac arteries
            arteries = [(ax - d, ay + 2, 0.62 * ar), (ax + d - 4, ay + 2, 0.62 * ar)]
            if li == 3:
                self.add(_ellipse(-rng.uniform(16, 22), -(b + 8), 11, 7), ven_hu, "vessel", 1.0)
            else:
                for side in (-1, 1):
                    self.add(_ellipse(side * 14 - 6, -(b + 6), 8, 6), ven_hu, "vessel", 1.0)
        for vx, vy, vr in arteries:
            self.add(_circle(vx, vy, vr), art_hu, "vessel", 0.8)
        return arteries

    def aortic_calcification(self, arteries, age_c, zt, conf) -> int:
        """Plaques in the arterial wall: more with age, and with a low T-score when "aorta" is on;
        returns their number."""
        rng = self.rng
        logit = -2.2 + 0.09 * (age_c - 60.0) - (_CALC_T_LOGOR * zt if "aorta" in conf else 0.0)
        if rng.random() >= 1.0 / (1.0 + math.exp(-logit)):
            return 0
        n_calc = int(rng.integers(1, 3 + int(max(age_c - 60, 0) // 8)))
        for _ in range(n_calc):
            vx, vy, vr = arteries[int(rng.integers(len(arteries)))]
            ang, arc = rng.uniform(0, 2 * math.pi), rng.uniform(0.2, 0.8)
            x0, y0 = vx + (vr - 0.7) * math.cos(ang), vy + (vr - 0.7) * math.sin(ang)
            x1, y1 = vx + (vr - 0.7) * math.cos(ang + arc), vy + (vr - 0.7) * math.sin(ang + arc)
            self.add(_capsule(x0, y0, x1, y1, rng.uniform(0.5, 0.9)), rng.uniform(500, 1000), "calcification", 0.5)
        return n_calc

    def ribs(self, cortex_hu, marrow_hu):
        """L1-L2: the lower ribs in the abdominal wall (two pairs at L1, one at L2)."""
        rng, li = self.rng, self.li
        for side in (-1, 1):
            for j in range(2 - li):
                ang = rng.uniform(0.15, 0.55) + 0.3 * j
                rx = side * (self.Wm - self.wall / 2) * math.cos(ang) + self.bx
                ry = self.by + (self.Hm - self.wall / 2) * math.sin(ang)
                self.add(_ellipse(rx, ry, 6.0, 4.0, side * ang), cortex_hu, "bone", 0.6)
                self.add(_ellipse(rx, ry, 4.8, 2.8, side * ang), marrow_hu, "bone", 0.6)

    def back_muscles(self) -> float:
        """Psoas (grows L1 -> L5), quadratus lumborum (L1-L4), erector spinae and multifidus;
        returns the psoas area (cm2, one side)."""
        rng, an, li, mus, m = self.rng, self.an, self.li, self.mus, self.an.muscle_hu
        yp, a, b = self.y_spine, an.a, an.b
        pa = _PSOAS_CM2[an.level] * 100.0 * mus ** 2 * rng.uniform(0.85, 1.15)
        pb = math.sqrt(pa / (math.pi * 1.35))
        for side in (-1, 1):
            px = side * (a + 0.75 * pb - (2 if li <= 1 else 0))
            py = -0.15 * b - 2.0 * li
            self.add(_ellipse(px, py, pb, 1.35 * pb, side * 0.35), m + rng.normal(0, 1), "muscle", 1.0)
            if li <= 3:
                self.add(_ellipse(side * (a + 34 + 2 * li), yp + 10, 13 * mus * rng.uniform(0.85, 1.15), 8 * mus,
                                  side * 0.45), m + rng.normal(0, 1), "muscle", 1.0)
            es_y0, es_y1 = yp + 14, self.y_back - self.sub - 2 - 4
            es_c, es_b = (es_y0 + es_y1) / 2, (es_y1 - es_y0) / 2
            es_a = (24 if li <= 3 else 20) * mus * rng.uniform(0.9, 1.1)
            self.add(_ellipse(side * (8 + es_a), es_c, es_a, es_b, side * 0.1), m - 4 * (1 - mus) + rng.normal(0, 1),
                     "muscle", 1.0)
            self.add(_ellipse(side * 9, yp + 34, 7.5 * mus, 14 * mus), m + rng.normal(0, 1), "muscle", 1.0)
        return round(pa / 100.0, 2)

    def iliac_wings(self, cortex_hu, marrow_hu):
        """L5: iliac wings with iliacus (medial) and gluteus medius (lateral)."""
        a, yp, m = self.an.a, self.y_spine, self.an.muscle_hu
        for side in (-1, 1):
            x0, y0, x1, y1 = side * (a + 42), yp + 22, side * (a + 88), yp - 38
            self.add(_capsule(x0 + side * 10, y0 - 8, x1 + side * 14, y1 + 4, 14), m, "muscle", 1.0)  # gluteus
            self.add(_capsule(x0, y0, x1, y1, 5.5), cortex_hu, "bone", 0.6)
            self.add(_capsule(x0, y0, x1, y1, 3.5), marrow_hu, "bone", 0.6)
            self.add(_capsule(x0 - side * 12, y0 - 14, x1 - side * 14, y1 - 6, 9), m, "muscle", 1.0)  # iliacus


def _soft_tissue(an, p, rng, fem, z_body, z_mus, age_c, zt, conf):
    """The soft tissues and extra-vertebral bone at the patient's level: sets ``an.soft`` (shape, HU,
    kind, edge) in painting order, the body outline and the body-composition measures."""
    ab = _Abdomen(an, p, rng)
    ab.body_wall(fem, z_body, z_mus)
    ab.wall_hu = ab.enhanced((30, 45), (60, 90))  # bowel and stomach wall
    ab.place_aorta()
    if ab.li <= 1:
        ab.upper_abdomen()
    ab.bowel_loops()
    if ab.li >= 2:
        ab.colon()
    if ab.li <= 2:
        ab.kidneys()
    arteries = ab.great_vessels()
    an.calcium = ab.aortic_calcification(arteries, age_c, zt, conf)
    cortex_hu = _BONE_TISSUE_HU * 0.45 * _KVP_BONE[p.kvp]  # ribs and iliac wings
    marrow_hu = 0.6 * an.marrow_hu + 0.4 * p.density
    if ab.li <= 1:
        ab.ribs(cortex_hu, marrow_hu)
    an.psoas_cm2 = ab.back_muscles()
    if ab.li == 4:
        ab.iliac_wings(cortex_hu, marrow_hu)
    an.soft = ab.soft
    an.body_outline = (ab.bx, ab.by, ab.W, ab.H, ab.y_back)


def _body_fat_fraction(an: _Anatomy) -> float:
    """Fat area / body area of the whole cross-section (noise-free soft tissues at 3 mm pixels)."""
    bx, by, W, H, _ = an.body_outline
    ps = 3.0
    n = int(2 * max(W, H) / ps) + 4
    fr = _Frame(n, ps, (-bx, -by), 0.0, 1.0)
    img = np.full((n, n), -1000.0, dtype=np.float32)
    paint = _painter(fr, img, None)
    for shape, hu, kind, edge in an.soft:
        paint(shape, hu, None, edge)
    body = img > -500
    fat = (img > -200) & (img < -40)
    return float(fat.sum() / max(body.sum(), 1))


# ---- rasterisation ---------------------------------------------------------------------------
class _Frame:
    """Maps pixels of a size x size image to the vertebra's frame for one slice."""

    def __init__(self, size, ps, offset, theta, scale):
        self.size, self.ps, self.ox, self.oy = size, ps, offset[0], offset[1]
        self.c, self.s, self.scale = math.cos(theta), math.sin(theta), scale
        self.cc = (size - 1) / 2.0

    def window(self, bbox, margin_mm=2.0):
        xmin, xmax, ymin, ymax = bbox
        xs = np.array([xmin, xmax, xmin, xmax]) * self.scale
        ys = np.array([ymin, ymin, ymax, ymax]) * self.scale
        ix = (self.c * xs - self.s * ys + self.ox) / self.ps + self.cc
        iy = (self.s * xs + self.c * ys + self.oy) / self.ps + self.cc
        m = margin_mm / self.ps + 1
        c0, c1 = max(int(math.floor(ix.min() - m)), 0), min(int(math.ceil(ix.max() + m)) + 1, self.size)
        r0, r1 = max(int(math.floor(iy.min() - m)), 0), min(int(math.ceil(iy.max() + m)) + 1, self.size)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def centred_window(self, half):
        """A (2*half[0]) x (2*half[1]) pixel window centred on the vertebral body (NOT clipped)."""
        cy = int(round(self.oy / self.ps + self.cc))
        cx = int(round(self.ox / self.ps + self.cc))
        return slice(cy - half[0], cy + half[0]), slice(cx - half[1], cx + half[1])

    def coords(self, win):
        rows, cols = win
        u = (np.arange(cols.start, cols.stop, dtype=np.float32) - self.cc) * self.ps - self.ox
        v = (np.arange(rows.start, rows.stop, dtype=np.float32) - self.cc) * self.ps - self.oy
        x = (self.c * u[None, :] + self.s * v[:, None]) / self.scale
        y = (-self.s * u[None, :] + self.c * v[:, None]) / self.scale
        return x, y

    def cover(self, d, edge_mm=0.0):
        """Area coverage of a pixel from its signed distance (vertebra-frame mm): anti-aliased over one
        pixel, or a soft partial-volume edge ``edge_mm`` wide when that is wider."""
        w = max(self.ps, edge_mm * self.scale) / self.scale
        return np.clip(0.5 - d / np.float32(w), 0.0, 1.0)


def _inv_norm(p):
    return statistics.NormalDist().inv_cdf(min(max(p, 1e-6), 1 - 1e-6))


@functools.lru_cache(maxsize=256)
def _amplitude(shape, spacing, kind, param):
    """rfft-grid amplitude that turns complex white noise into a unit-variance field (cached).

    kinds: "band" (ring at ``param`` cycles/mm, width 0.15), "low" (Gaussian low-pass, sigma ``param``),
    "psf" (Gaussian PSF of sigma ``param`` mm: the transfer function itself, not normalised)."""
    h, w = shape
    fy = np.fft.fftfreq(h, d=spacing)[:, None]
    fx = np.fft.rfftfreq(w, d=spacing)[None, :]
    f2 = fx * fx + fy * fy
    if kind == "psf":
        return np.exp(-2.0 * math.pi ** 2 * param ** 2 * f2).astype(np.float32)
    f = np.sqrt(f2)
    if kind == "band":
        amp = np.exp(-0.5 * ((f - param) / 0.15) ** 2)
    elif kind == "low":
        amp = np.exp(-0.5 * f2 / param ** 2)
    else:
        raise ValueError(kind)
    amp[0, 0] = 0.0
    wts = np.full(fx.shape[1], 2.0)  # each rfft column stands for two full-grid columns ...
    wts[0] = 1.0  # ... except DC and (even width) Nyquist
    if w % 2 == 0:
        wts[-1] = 1.0
    var = float((amp ** 2 * wts[None, :]).sum() / (h * w))
    # complex white noise of unit real and imaginary variance has E|z|^2 = 2; irfft2 divides by h*w
    return (amp * math.sqrt(h * w / (2.0 * max(var, 1e-24)))).astype(np.float32)


def _spectrum(rng, shape, spacing, kind, param=0.0):
    """Random rfft2 spectrum whose inverse is a unit-variance Gaussian field (see :func:`_amplitude`)."""
    amp = _amplitude(shape, float(spacing), kind, float(param))
    # unit-variance uniform real and imaginary parts (4x cheaper than normals): every pixel of the
    # inverse transform sums thousands of them, so the field is Gaussian all the same
    z = rng.random(amp.shape + (2,), dtype=np.float32).view(np.complex64)[..., 0]
    z -= np.complex64(0.5 + 0.5j)
    z *= amp * np.float32(math.sqrt(12.0))
    return z


def _field(rng, shape, spacing, kind, param=0.0):
    return np.fft.irfft2(_spectrum(rng, shape, spacing, kind, param), s=shape)


def _ar_field(rng, prev, shape, spacing, kind, param, rho):
    """AR(1) along z of a Gaussian field: ``rho`` times the previous slice's spectrum plus fresh noise."""
    new = _spectrum(rng, shape, spacing, kind, param)
    if prev is not None:
        new *= np.float32(math.sqrt(1.0 - rho * rho))
        new += np.float32(rho) * prev
    return new, np.fft.irfft2(new, s=shape)


def _z_overlap(zr: float, hz: float, lo: float, hi: float) -> float:
    """Fraction of the slice [zr - hz, zr + hz] (relative to the body's height) inside [lo, hi]."""
    return max(0.0, min(zr + hz, hi) - max(zr - hz, lo)) / (2 * hz)


def _section(zr: float) -> str:
    return "endplate" if (zr < 0.1 or zr > 0.9) else ("pedicles" if zr < 0.45 else "laminae")


def _bone_shapes(an: _Anatomy, zr: float, hz: float):
    """Posterior elements present in a slice at relative height ``zr`` (each with its opacity: the
    fraction of the slice thickness that cuts it)."""
    a, b = an.a, an.b
    yp = b - an.concave_depth
    tp = _TP_LEN[an.level]
    r_tp = 3.0 if an.level != "L5" else 5.0
    els = {
        "pedicle": [_ellipse(s * 12.5, yp + 3.5, 5.0, 8.0, -s * 0.18) for s in (-1, 1)],
        "transverse": [_capsule(s * 15.0, yp + 2.0, s * (a + tp), yp - 2.0 + (4 if an.level == "L5" else 0), r_tp)
                       for s in (-1, 1)],
        "sup_facet": [_ellipse(s * 17.0, yp + 14.0, 5.0, 7.0, s * 0.4) for s in (-1, 1)],
        "lamina": [_capsule(s * 14.0, yp + 11.0, s * 3.0, yp + 21.0, 3.5) for s in (-1, 1)],
        "inf_facet": [_ellipse(s * 12.0, yp + 20.0, 4.5, 6.5, -s * 0.3) for s in (-1, 1)],
        "spinous": [_capsule(0.0, yp + 19.0, 0.0, yp + 46.0, 4.0)],
    }
    out = []
    for name, shapes in els.items():
        alpha = _z_overlap(zr, hz, *_ELEMENTS_Z[name])
        if alpha > 0.02:
            out += [(sh, alpha) for sh in shapes]
    return out


def _painter(fr: _Frame, img: np.ndarray, dbg_sd: dict | None):
    """paint(shape, hu[, kind, edge]): composite a shape (anti-aliased, soft edge ``edge`` mm) into
    ``img``; in debug mode keep its signed distance over the whole image (image mm) under ``kind``."""
    X = Y = None
    if dbg_sd is not None:
        X, Y = fr.coords((slice(0, fr.size), slice(0, fr.size)))

    def paint(shape, hu, kind=None, edge=0.0):
        win = fr.window(shape.bbox)
        if win is None:
            return
        x, y = fr.coords(win)
        c = fr.cover(shape.sd(x, y), edge)
        sub = img[win]
        sub += c * (np.float32(hu) - sub)
        if dbg_sd is not None and kind is not None:
            dbg_sd.setdefault(kind, []).append(shape.sd(X, Y) * fr.scale)

    return paint


def _background(an: _Anatomy, size: int, ps: float, rng_tex: np.random.Generator | None = None, debug: bool = False):
    """Soft tissues of one patient (body wall, organs, bowel, vessels, muscles, ribs or iliac wings)
    drawn once in the patient's base frame: its neighbouring slices reuse them while the vertebra
    moves. Soft tissues get a faint low-frequency texture (organ parenchyma, fat strands)."""
    fr = _Frame(size, ps, an.offset, an.theta, an.scale)
    img = np.full((size, size), -1000.0, dtype=np.float32)
    dbg_sd = {} if debug else None
    paint = _painter(fr, img, dbg_sd)
    for shape, hu, kind, edge in an.soft:
        paint(shape, hu, kind, edge)
    if rng_tex is not None:
        tex = _field(rng_tex, (size, size), ps, "low", 0.15)
        img += np.float32(3.0) * tex * (img > -200)
    return img, dbg_sd


@dataclass
class _Cut:
    """Where slice ``k`` cuts the vertebra (``zr``: relative height of its centre, ``hz``: half its
    thickness, both in body heights) and how the spine sits in it (``fr``)."""

    step: float  # mm between neighbouring slices
    zr: float
    hz: float
    density: float  # the slice's trabecular density (the patient's, +-2 %)
    fr: _Frame


def _cut(p: _Patient, an: _Anatomy, k: int, size: int, rng: np.random.Generator) -> _Cut:
    """The slice's position and pose: neighbouring slices of one series barely move (a little lordosis)."""
    step = max(p.slice_thickness, 3.0)
    zmm = an.z_start + k * step  # below the upper endplate
    off = (an.offset[0] + rng.normal(0, 0.2), an.offset[1] + 0.15 * k + rng.normal(0, 0.2))
    theta = an.theta + math.radians(rng.normal(0, 0.2))
    scale = an.scale * (1.0 + rng.normal(0, 0.004))
    density = p.density * (1.0 + rng.normal(0, 0.02))
    return _Cut(step=step, zr=zmm / an.height, hz=0.5 * p.slice_thickness / an.height, density=density,
                fr=_Frame(size, p.pixel_spacing, off, theta, scale))


def _canvas(an: _Anatomy, size: int, ps: float, rng: np.random.Generator, debug: bool):
    """A copy of the patient's soft tissues (drawn on the first slice) to paint the vertebra on, and
    in debug mode the signed distances of every soft-tissue shape."""
    if an.background is None or an.background[0] != size:
        an.background = (size, _background(an, size, ps, np.random.default_rng(int(rng.integers(2 ** 62))))[0])
    img = an.background[1].copy()
    dbg_sd = _background(an, size, ps, debug=True)[1] if debug else None
    return img, dbg_sd


@dataclass
class _VertebraGeometry:
    """The vertebra in one slice, on the pixel window ``win`` around it: vertebra-frame coordinates
    ``x``, ``y`` and the pixel coverage of body and posterior elements (whole, and inside the cortex)."""

    win: tuple
    x: np.ndarray
    y: np.ndarray
    a: float  # body half-width and half-depth (mm), widened at the ring apophysis
    b: float
    y_spine: float  # posterior edge of the body
    endplate: float  # fraction of the slice in the endplate
    d_body: np.ndarray  # signed distance to the body's outline (mm)
    t_loc: np.ndarray  # local cortical thickness (mm)
    c_body: np.ndarray
    c_body_in: np.ndarray
    c_post: np.ndarray
    c_post_in: np.ndarray


def _vertebra_geometry(an: _Anatomy, cut: _Cut, paint) -> _VertebraGeometry:
    """Paint the spinal canal; return the body and posterior elements' outlines and cortical shells
    (one window for all)."""
    fr, zr, hz = cut.fr, cut.zr, cut.hz
    ep = _z_overlap(zr, hz, 0.0, 0.04) + _z_overlap(zr, hz, 0.96, 1.0)  # endplate in the slice
    ring = 1.0 + 0.05 * (_z_overlap(zr, hz, 0.0, 0.1) + _z_overlap(zr, hz, 0.9, 1.0))  # ring apophysis
    a, b = an.a * ring, an.b * ring
    yp = an.b - an.concave_depth
    canal_parts = [_ellipse(0.0, yp + 9.0, 11.5, 8.5)]
    if LEVELS.index(an.level) >= 2:  # trefoil canal at L3-L5
        canal_parts += [_ellipse(s * 8.5, yp + 5.0, 4.5, 3.0, s * 0.4) for s in (-1, 1)]
    for cp in canal_parts:
        paint(cp, an.fat_hu + 10.0, "canal", 0.8)
    paint(_ellipse(0.0, yp + 8.5, 8.5, 6.5), an.csf_hu, "canal", 0.8)
    post = _bone_shapes(an, zr, hz)
    win = fr.window(_union_bbox([sh for sh, _ in post] + [_ellipse(0, 0, a, b)]))
    x, y = fr.coords(win)
    d_body = np.maximum(_sd_ellipse(x, y, 0.0, 0.0, a, b),
                        -_sd_circle(x, y, 0.0, b - an.concave_depth + an.concave_r, an.concave_r))
    # cortical shell: thickness varies around the body (and the endplate adds bone)
    ang = np.arctan2(y, x)
    a1, p1, a2, p2 = an.t_harm
    t_loc = np.float32(an.t_body) * (1.0 + a1 * np.cos(ang - p1) + a2 * np.cos(2 * ang - p2)).astype(np.float32)
    c_body = fr.cover(d_body)
    c_body_in = fr.cover(d_body + t_loc)
    d_canal = np.minimum.reduce([cp.sd(x, y) for cp in canal_parts])
    c_post = np.zeros_like(c_body)
    c_post_in = np.zeros_like(c_body)
    for sh, alpha in post:
        d = np.maximum(sh.sd(x, y), -(d_canal - 0.5))
        np.maximum(c_post, np.float32(alpha) * fr.cover(d), out=c_post)
        np.maximum(c_post_in, np.float32(alpha) * fr.cover(d + an.t_post), out=c_post_in)
    return _VertebraGeometry(win=win, x=x, y=y, a=a, b=b, y_spine=yp, endplate=ep, d_body=d_body, t_loc=t_loc,
                             c_body=c_body, c_body_in=c_body_in, c_post=c_post, c_post_in=c_post_in)


def _trabecular_bone(p: _Patient, an: _Anatomy, rng: np.random.Generator, cut: _Cut, g: _VertebraGeometry):
    """The trabecular texture (made on a fixed window around the body at ``_UP`` x the pixel
    resolution) copied onto the vertebra's window: returns (HU, bone fraction, the texture, share
    of horizontal trabeculae, HU of the posterior elements' marrow, BV/TV)."""
    marrow = an.marrow_hu
    bvtv = float(np.clip(an.bvtv * cut.density / p.density, 0.02, 0.45))
    post_val = marrow + 1.1 * bvtv * (an.tissue_hu - marrow)
    tex, frac, h_share = _texture(p, an, rng, bvtv, cut.step)
    bw, win = cut.fr.centred_window(an.tex_half), g.win
    trab = np.full(g.c_body.shape, post_val, dtype=np.float32)
    fr_t = np.full(g.c_body.shape, bvtv, dtype=np.float32)
    r0, r1 = max(bw[0].start, win[0].start), min(bw[0].stop, win[0].stop)
    q0, q1 = max(bw[1].start, win[1].start), min(bw[1].stop, win[1].stop)
    if r1 > r0 and q1 > q0:
        dst = (slice(r0 - win[0].start, r1 - win[0].start), slice(q0 - win[1].start, q1 - win[1].start))
        src = (slice(r0 - bw[0].start, r1 - bw[0].start), slice(q0 - bw[1].start, q1 - bw[1].start))
        trab[dst] = tex[src]
        fr_t[dst] = frac[src]
    return trab, fr_t, tex, h_share, post_val, bvtv


def _match_density(an: _Anatomy, trab, fr_t, trab_mask, bvtv):
    """Shift the bone fraction so that the noise-free mean HU inside ``trab_mask`` is exactly that of
    the density model (the texture's own mean wanders); returns (HU, bone fraction)."""
    if not trab_mask.any():
        return trab, fr_t
    shift = np.float32(bvtv - float(fr_t[trab_mask].mean()))
    mar = (trab - fr_t * np.float32(an.tissue_hu)) / np.maximum(1.0 - fr_t, 1e-3)  # marrow under each pixel
    fr_t = np.clip(fr_t + shift, 0.0, 1.0)
    return mar + fr_t * (np.float32(an.tissue_hu) - mar), fr_t


def _composite_vertebra(sub, p: _Patient, an: _Anatomy, g: _VertebraGeometry, trab, post_val, vein_a, d_vein, fr):
    """The vertebra over the soft tissues ``sub`` of its window: cortex, trabecular interior, the
    endplate (a plate of dense bone in part of the slice), the basivertebral vein; returns
    (HU, bone coverage)."""
    interior = g.c_body_in * trab + (1.0 - g.c_body_in) * np.float32(post_val)
    cortex = np.float32(_BONE_TISSUE_HU * _KVP_BONE[p.kvp])
    if g.endplate > 0:
        interior = interior + np.float32(0.5 * g.endplate) * (cortex * np.float32(0.6) - interior)
    c_bone = np.maximum(g.c_body, g.c_post)
    c_in = np.maximum(g.c_body_in, g.c_post_in)
    inside_val = np.where(g.c_body_in >= g.c_post_in, interior, np.float32(post_val))
    vert = sub * (1.0 - c_bone) + (c_bone - c_in) * cortex + c_in * inside_val
    # basivertebral vein: a channel through the posterior cortex into the body (mid-height slices)
    if vein_a > 0.02:
        c_vein = np.minimum(fr.cover(d_vein), c_bone) * np.float32(vein_a)
        vert += c_vein * (np.float32(an.blood_hu) - vert)
    return vert, c_bone


def _scan(img, p: _Patient, size: int, rng: np.random.Generator, bank):
    """The scanner: PSF blur (edge-padded FFT), then noise from a filtered back-projection;
    returns (blurred, noise, stored HU as int16)."""
    P = _PAD
    padded = np.pad(img, P, mode="edge")
    shp = padded.shape
    obj = np.fft.rfft2(padded)
    obj *= _amplitude(shp, float(p.pixel_spacing), "psf", float(p.psf_sigma))
    blurred = np.fft.irfft2(obj, s=shp)[P:-P, P:-P]
    if bank is None:
        bank = noise_bank(bank_size(size))
    noise = noise_patch(rng, (size, size), bank) * np.float32(p.noise_sd)
    final = blurred + noise
    return blurred, noise, np.clip(np.rint(final), -1024, 3071).astype(np.int16)


def _render(p: _Patient, an: _Anatomy, k: int, size: int, rng: np.random.Generator, debug: bool = False,
            bank: np.ndarray | None = None):
    """Render slice ``k`` of patient ``p``: returns (hu int16, stats dict[, debug dict])."""
    ps = p.pixel_spacing
    cut = _cut(p, an, k, size, rng)
    fr, zr, scale = cut.fr, cut.zr, cut.fr.scale
    img, dbg_sd = _canvas(an, size, ps, rng, debug)
    g = _vertebra_geometry(an, cut, _painter(fr, img, dbg_sd))
    x, y, win = g.x, g.y, g.win
    trab, fr_t, tex, h_share, post_val, bvtv = _trabecular_bone(p, an, rng, cut, g)
    # the trabecular mask: pixels fully inside the shell, off the vein
    vein_a = _z_overlap(zr, cut.hz, 0.3, 0.7)
    d_vein = _sd_capsule(x, y, 0.0, g.y_spine - 9.0, 0.0, g.y_spine + 0.8, an.vein_r)
    trab_mask = (g.c_body_in >= 1.0) & ((d_vein * scale > ps) | (vein_a < 0.02))
    trab, fr_t = _match_density(an, trab, fr_t, trab_mask, bvtv)
    vert, c_bone = _composite_vertebra(img[win], p, an, g, trab, post_val, vein_a, d_vein, fr)
    img[win] = vert
    trabecular_hu = float(vert[trab_mask].mean()) if trab_mask.any() else float("nan")
    # a clinician's ROI: an ellipse in the anterior-central body, off the cortex and the vein
    roi = (_sd_ellipse(x, y, 0.0, -0.15 * g.b, 0.6 * g.a, 0.55 * g.b) < 0) & trab_mask
    if not roi.any():  # tiny crops
        roi = trab_mask
    blurred, noise, hu = _scan(img, p, size, rng, bank)
    hu_win = hu[win].astype(np.float32)
    stats = dict(trabecular_hu=trabecular_hu, roi_hu=float(hu_win[roi].mean()), roi_sd=float(hu_win[roi].std()),
                 bv_tv=float(np.mean(fr_t[trab_mask])) if trab_mask.any() else float("nan"),
                 marrow_hu=float(an.marrow_hu), micro_score=an.micro, h_share=h_share,
                 z_in_vertebra=zr, section=_section(zr), vertebra_window=(win, c_bone > 0.05))
    if not debug:
        return hu, stats
    cort_mask = (np.abs(g.d_body + 0.5 * g.t_loc) * scale < 0.5 * ps) & (y < -0.3 * g.b)
    masks = _debug_masks(size, dbg_sd, g, scale, dict(trabecular=trab_mask, roi=roi, cortex=cort_mask,
                                                      vertebra=c_bone > 0))
    return hu, stats, dict(phantom=img, blurred=blurred, noise=noise, texture=tex, **masks)


def _debug_masks(size: int, dbg_sd: dict, g: _VertebraGeometry, scale: float, window_masks: dict) -> dict:
    """Masks of "pure" regions, at least 2-3 mm from any other structure (for tests and figures):
    ``fat``, ``muscle``, ``organs`` (liver, spleen, kidney where present), and ``window_masks``
    (on the vertebra's window) placed on the whole image."""
    later = lambda kinds: np.minimum.reduce([d for kd in kinds for d in dbg_sd.get(kd, [])]
                                            + [np.full((size, size), 1e9, np.float32)])
    bone_full = np.full((size, size), 1e9, np.float32)
    bone_full[g.win] = np.minimum(g.d_body, np.where(g.c_post > 0, -1.0, 1e9)) * scale
    organs = ["bowel", "gas", "kidney", "vessel", "calcification", "muscle", "canal", "liver", "spleen",
              "pancreas", "bone"]
    others = np.minimum(later(organs), bone_full)
    fat_mask = (later(["vfat"]) < -3.0) & (np.minimum(others, later(["wall"])) > 4.0)  # visceral and retroperitoneal fat
    if "fat" in dbg_sd:  # subcutaneous fat: inside its outline, outside the wall muscles
        fat_mask |= (later(["fat"]) < -3.0) & (later(["wall"]) > 3.0)
    muscle_mask = (later(["muscle"]) < -2.0) & (np.minimum(later([o for o in organs if o != "muscle"]),
                                                           bone_full) > 2.0)
    organ_masks = {}
    for kd in ("liver", "spleen", "kidney"):
        if kd in dbg_sd:
            organ_masks[kd] = (later([kd]) < -3.0) & (np.minimum(later([o for o in organs if o != kd]), bone_full) > 3.0)
    out = dict(fat=fat_mask, muscle=muscle_mask, organs=organ_masks)
    for name, m in window_masks.items():
        full = np.zeros((size, size), bool)
        full[g.win] = m
        out[name] = full
    return out


def _texture(p: _Patient, an: _Anatomy, rng: np.random.Generator, bvtv: float, step: float):
    """Trabecular bone of one slice on the patient's fixed texture window: (HU, bone fraction, share
    of the bone in horizontal trabeculae).

    Vertical trabeculae cross an axial slice as rods: spots of a band-pass field, continuous along z
    (an AR(1) process from slice to slice, correlation length ``_ROD_Z``). Horizontal trabeculae lie in
    the slice as a network of lines (the zero set of another band-pass field, thinned by a smooth
    field), new in every slice and averaged over its thickness. Bone loss removes horizontal
    trabeculae first (``h_share`` falls), makes the pattern coarser (lower ``f0``) and the marrow
    fattier and patchier (a smooth field, also continuous along z)."""
    h, w = 2 * an.tex_half[0], 2 * an.tex_half[1]
    ps = p.pixel_spacing
    hi = (_UP * h, _UP * w)
    hps = ps / _UP
    thk = p.slice_thickness
    hs = an.h_share
    bv_v, bv_h = bvtv * (1 - hs), bvtv * hs
    an.rod_spectrum, V = _ar_field(rng, an.rod_spectrum, hi, hps, "band", an.f0, math.exp(-step / _ROD_Z))
    rods = V > _inv_norm(1.0 - min(bv_v * 1.6, 0.6))  # spots; the 1.6 leaves room for the partial volume below
    keep = min(1.0, 0.35 + 2.5 * bv_h)  # how much of the horizontal network survives
    eps = _inv_norm(0.5 + 0.5 * min(bv_h * 1.6 / keep, 0.9))
    lines = np.abs(_field(rng, hi, hps, "band", 1.15 * an.f0)) < eps
    lines &= _field(rng, hi, hps, "low", 0.35) > _inv_norm(1.0 - keep)
    fv = rods.reshape(h, _UP, w, _UP).mean(axis=(1, 3), dtype=np.float32)
    fh = lines.reshape(h, _UP, w, _UP).mean(axis=(1, 3), dtype=np.float32)
    # trabeculae (0.1-0.3 mm) are far thinner than a voxel: a pixel sees a partial volume of them
    kv = _ROD_PV * math.sqrt(_V_Z / (_V_Z + thk))
    kh = _ROD_PV * math.sqrt(_H_Z / (_H_Z + thk))
    fv = np.float32(bv_v) + (fv - fv.mean()) * np.float32(kv)
    fh = np.float32(bv_h) + (fh - fh.mean()) * np.float32(kh)
    frac = np.clip(fv + fh, 0.0, 1.0)
    an.marrow_spectrum, patches = _ar_field(rng, an.marrow_spectrum, (h, w), ps, "low", 0.12, math.exp(-step / _MARROW_Z))
    patches = np.abs(patches) - np.float32(math.sqrt(2 / math.pi))
    marrow_map = np.float32(an.marrow_hu) - np.float32(_MARROW_PATCH_HU * an.fat_fraction) * patches
    tex = marrow_map + frac * (np.float32(an.tissue_hu) - marrow_map)
    return tex, frac, hs


# ---- DICOM -------------------------------------------------------------------------------------
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/osteo-kit/synthetic")


def _uid(seed, *parts) -> str:
    """A deterministic DICOM UID: '2.25.' + a name-based UUID (PS3.5 B.2). (pydicom's
    ``generate_uid(prefix=None, ...)`` ignores ``entropy_srcs`` and is random.)"""
    name = "|".join(["osteo-kit synthetic", str(seed), *map(str, parts)])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _dicom_template(p: _Patient, an: _Anatomy, seed: int, size: int):
    """The series' static CT header (one per patient); :func:`_dicom_bytes` fills in each slice."""
    ps = p.pixel_spacing
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = CTImageStorage
    fm.MediaStorageSOPInstanceUID = _uid(seed, p.patient_id, "sop", 0)
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    items = [
        ("SpecificCharacterSet", "ISO_IR 100"),
        ("ImageType", ["ORIGINAL", "PRIMARY", "AXIAL"]),
        ("SOPClassUID", CTImageStorage), ("SOPInstanceUID", fm.MediaStorageSOPInstanceUID),
        ("Modality", "CT"), ("Manufacturer", "osteo-kit synthetic phantom"),
        ("PatientName", f"Synthetic^{p.patient_id}"), ("PatientID", p.patient_id),
        ("PatientSex", p.sex), ("PatientAge", f"{int(p.age):03d}Y"), ("PatientIdentityRemoved", "YES"),
        ("BodyPartExamined", "LSPINE"), ("PatientPosition", "HFS"),
        ("ContrastBolusAgent", "IV contrast (synthetic)" if p.contrast else None),
        ("SliceThickness", f"{p.slice_thickness:g}"), ("KVP", str(p.kvp)), ("ConvolutionKernel", "STANDARD"),
        ("StudyInstanceUID", _uid(seed, p.patient_id, "study")),
        ("SeriesInstanceUID", _uid(seed, p.patient_id, "series")),
        ("StudyID", "1"), ("SeriesNumber", 1), ("InstanceNumber", 1),
        ("ImagePositionPatient", [0, 0, 0]),
        ("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]),
        ("FrameOfReferenceUID", _uid(seed, p.patient_id, "frame")),
        ("SliceLocation", 0),
        ("SamplesPerPixel", 1), ("PhotometricInterpretation", "MONOCHROME2"),
        ("Rows", size), ("Columns", size), ("PixelSpacing", [f"{ps:g}", f"{ps:g}"]),
        ("BitsAllocated", 16), ("BitsStored", 16), ("HighBit", 15), ("PixelRepresentation", 1),
        ("WindowCenter", 300), ("WindowWidth", 1500),
        ("RescaleIntercept", -1024), ("RescaleSlope", 1), ("RescaleType", "HU"),
    ]
    for kw, v in items:
        if v is not None:
            setattr(ds, kw, v)
    return ds


_DYNAMIC_TAGS = (0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)  # change per slice


def _encode(ds) -> bytes:
    """Explicit VR Little Endian encoding of a (sub-)dataset's elements."""
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, ds)
    return fp.getvalue()


def _element(tag: int, vr: str, value) -> bytes:
    """One Explicit VR Little Endian element (UI, IS, DS, UL or OW only: what the writer needs)."""
    if vr == "OW":
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"OW", 0, len(value)) + value
    if vr == "UL":
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"UL", 4, value)
    raw = ("\\".join(value) if isinstance(value, (list, tuple)) else str(value)).encode("ascii")
    if len(raw) % 2:
        raw += b"\x00" if vr == "UI" else b" "
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(raw)) + raw


class _SeriesWriter:
    """Encodes one patient's slices fast: the static header is encoded once by pydicom, in runs
    between the elements that change per slice (SOP instance UID, instance number, position, slice
    location, pixel data), which are encoded by :func:`_element` and spliced in tag order. The bytes
    equal pydicom's ``save_as`` of the full dataset (:func:`_dicom_bytes`; a test checks this)."""

    def __init__(self, p: _Patient, an: _Anatomy, seed: int, size: int):
        self.p, self.an, self.seed, self.size = p, an, seed, size
        self.tpl = tpl = _dicom_template(p, an, seed, size)
        _fill_slice(tpl, np.zeros((size, size), np.int16), p, an, 0, seed)  # every dynamic element present
        runs, cur = [], Dataset()
        for elem in tpl:  # iterates in tag order
            if int(elem.tag) in _DYNAMIC_TAGS:
                runs.append(_encode(cur))
                cur = Dataset()
            else:
                cur.add(elem)
        runs.append(_encode(cur))
        self.runs = runs
        self.dynamic = [int(e.tag) for e in tpl if int(e.tag) in _DYNAMIC_TAGS]
        assert self.dynamic == list(_DYNAMIC_TAGS)
        # file meta: pydicom's, with the media storage SOP instance UID cut out
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = False, True
        write_file_meta_info(fp, tpl.file_meta, enforce_standard=True)
        meta = fp.getvalue()[12:]  # after the group length element
        uid_el = _element(0x00020003, "UI", tpl.file_meta.MediaStorageSOPInstanceUID)
        cut = meta.index(uid_el)
        self.meta_head, self.meta_tail = meta[:cut], meta[cut + len(uid_el):]

    def slice_bytes(self, hu: np.ndarray, k: int) -> bytes:
        p, an = self.p, self.an
        size, ps = self.size, p.pixel_spacing
        sop = _uid(self.seed, p.patient_id, "sop", k)
        x0, y0, z = _slice_position(size, ps, an, p, k)
        uid_el = _element(0x00020003, "UI", sop)
        glen = len(self.meta_head) + len(uid_el) + len(self.meta_tail)
        values = [_element(0x00080018, "UI", sop), _element(0x00200013, "IS", k + 1),
                  _element(0x00200032, "DS", [f"{x0:.4f}", f"{y0:.4f}", f"{z:.2f}"]),
                  _element(0x00201041, "DS", f"{z:.2f}"),
                  _element(0x7FE00010, "OW", (hu.astype(np.int16) + np.int16(1024)).astype("<i2").tobytes())]
        parts = [b"\x00" * 128, b"DICM", _element(0x00020000, "UL", glen), self.meta_head, uid_el,
                 self.meta_tail, self.runs[0]]
        for v, run in zip(values, self.runs[1:]):
            parts += [v, run]
        return b"".join(parts)


def _slice_position(size: int, ps: float, an: _Anatomy, p: _Patient, k: int):
    """ImagePositionPatient of slice ``k``: patient coordinates (LPS) centred on the body of the
    series' first slice; columns run to the patient's left and rows posterior, so the first pixel
    sits at minus half the field of view."""
    x0 = -(size - 1) / 2.0 * ps - an.offset[0]
    y0 = -(size - 1) / 2.0 * ps - an.offset[1]
    z = an.z0 - k * max(p.slice_thickness, 3.0)
    return x0, y0, z


def _fill_slice(ds, hu: np.ndarray, p: _Patient, an: _Anatomy, k: int, seed: int) -> None:
    """Set the per-slice elements: stored value = HU + 1024 (int16), RescaleIntercept -1024."""
    size = hu.shape[0]
    ps = p.pixel_spacing
    sop = _uid(seed, p.patient_id, "sop", k)
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPInstanceUID = sop
    ds.InstanceNumber = k + 1
    x0, y0, z = _slice_position(size, ps, an, p, k)
    ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0:.4f}", f"{z:.2f}"]
    ds.SliceLocation = f"{z:.2f}"
    stored = (hu.astype(np.int16) + np.int16(1024)).astype("<i2").tobytes()
    ds[0x7FE00010] = DataElement(0x7FE00010, "OW", stored)  # PixelData, VR resolved (16-bit)


def _dicom_bytes(ds, hu: np.ndarray, p: _Patient, an: _Anatomy, k: int, seed: int) -> bytes:
    """One slice as a DICOM file through pydicom's own writer (the reference for :class:`_SeriesWriter`)."""
    _fill_slice(ds, hu, p, an, k, seed)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ---- public API --------------------------------------------------------------------------------
def _rngs(seed: int, p: _Patient):
    return np.random.default_rng([seed, 1, p.cand]), np.random.default_rng([seed, 2, p.cand])


def _patient_rows(job) -> list[dict]:
    """Render and write every slice of one patient; return its manifest rows (runs in a worker)."""
    p, seed, size, out, conf = job
    p = _with_sex(p, conf)
    rng_a, rng_s = _rngs(seed, p)
    an = _anatomy(p, rng_a, conf)
    writer = _SeriesWriter(p, an, seed, size)
    bank = noise_bank(bank_size(size))
    rows = []
    for k in range(p.n_slices):
        hu, st = _render(p, an, k, size, rng_s, bank=bank)
        rel = f"{p.label}/{p.patient_id}_{k}.dcm"
        (out / rel).write_bytes(writer.slice_bytes(hu, k))
        rows.append(dict(
            path=rel, label=p.label, patient_id=p.patient_id, split=p.split, bone_density=p.density, dxa_tscore=p.tscore,
            trabecular_hu=round(st["trabecular_hu"], 2), kvp=p.kvp, contrast=p.contrast, noise_sd=p.noise_sd,
            pixel_spacing=p.pixel_spacing, slice_thickness=p.slice_thickness, age=p.age, sex=p.sex,
            roi_hu=round(st["roi_hu"], 2), roi_sd=round(st["roi_sd"], 2), bv_tv=round(st["bv_tv"], 4),
            marrow_hu=round(st["marrow_hu"], 2), psf_sigma=p.psf_sigma, slice_index=k,
            micro_score=round(st["micro_score"], 3), h_share=round(st["h_share"], 4),
            level=an.level, section=st["section"], z_in_vertebra=round(st["z_in_vertebra"], 3),
            confounders=_confounder_label(conf), body_fat_fraction=round(an.body_fat, 4),
            subcutaneous_fat_mm=round(an.sub_fat, 1), psoas_cm2=an.psoas_cm2, muscle_hu=round(an.muscle_hu, 1),
            cortex_mm=round(an.t_body, 3), aortic_calcium=an.calcium, synthetic_version=SYNTHETIC_VERSION,
        ))
    return rows


def synthesize(out_dir, n_per_class: int = 1500, size: int = 256, seed: int = 0, slices_per_patient: int = 5,
               progress: bool = True, overwrite: bool = False, workers: int = 1,
               confounders=True, n_test_per_class: int | None = None) -> pd.DataFrame:
    """Write the synthetic lumbar CT set as DICOM (``out_dir/<label>/<patient>_<k>.dcm``) and
    ``out_dir/manifest.csv``; return the manifest.

    Exactly ``n_per_class`` slices per class (the paper: 1500), of which ``n_test_per_class`` (default
    20 %) are test slices, one per test patient; training patients have ``slices_per_patient``
    neighbouring levels. Patient ids, file names and row order are independent of the label. Deterministic from ``seed``
    (byte-identical files, whatever ``workers``). The manifest is written last (temporary file +
    rename), so an interrupted run leaves no manifest pointing at missing files. An existing manifest
    is an error unless ``overwrite=True``, which first removes the old manifest and the files it
    lists. ``confounders``: ``True`` (all of :data:`CONFOUNDERS`), ``False`` (none) or some of their
    names: each ties one thing outside the trabecular bone to the label (module docstring); the
    labels, densities and T-scores are the same either way. ``workers > 1`` renders patients in that many forked processes (Linux/macOS; the same
    bytes, since every patient has its own seeds); with ``workers=2`` the default 4500 slices of
    256 x 256 take about 25 s on a 2-core machine, 36 s on a first run that also makes the noise
    bank (``benchmarks/synthetic_speed.py`` measures it).
    """
    if size < 32:
        raise ValueError(f"synthesize: size must be >= 32 pixels, got {size}")
    out = Path(out_dir)
    man = out / "manifest.csv"
    patients = _cohort(n_per_class, seed, slices_per_patient, n_test_per_class)  # validates the counts first
    conf = _confounder_set(confounders)
    if man.exists():
        if not overwrite:
            raise SyntheticError(f"{man} already exists: pass overwrite=True to replace this data set "
                                 f"(or choose another folder)")
        try:
            old = pd.read_csv(man)
        except Exception as e:  # noqa: BLE001 - an unreadable old manifest: stop, touch nothing
            raise SyntheticError(f"{man}: cannot read the existing manifest to replace it ({e})") from e
        man.unlink()
        root = out.resolve()
        for rel in old.get("path", pd.Series(dtype=str)).astype(str):
            f = (out / rel).resolve()
            if f.suffix == ".dcm" and root in f.parents and f.exists():
                f.unlink()
    for lab in LABELS:
        (out / lab).mkdir(parents=True, exist_ok=True)
    workers = int(workers)
    if workers > 1 and "fork" not in mp.get_all_start_methods():
        workers = 1  # no fork (Windows): one process
    noise_bank(bank_size(size))  # made (or read from its cache) once, before any worker starts
    jobs = [(p, seed, size, out, conf) for p in patients]
    rows = []
    with tqdm(total=3 * n_per_class, desc="synthetic CT", unit="slice", disable=not progress) as bar:
        if workers <= 1:
            results = map(_patient_rows, jobs)
            pool = None
        else:
            pool = mp.get_context("fork").Pool(workers)
            results = pool.imap(_patient_rows, jobs, chunksize=4)
        try:
            for r in results:
                rows.extend(r)
                bar.update(len(r))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    df = pd.DataFrame(rows)[list(MANIFEST_COLUMNS)]
    tmp = out / "manifest.csv.tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, man)
    return df


def debug_slice(patient_id: str, k: int = 0, n_per_class: int = 1500, size: int = 256, seed: int = 0,
                slices_per_patient: int = 5, confounders=True,
                n_test_per_class: int | None = None) -> dict:
    """Re-render one slice of ``synthesize(..., n_per_class, size, seed, slices_per_patient, n_test_per_class=...)`` with its
    ground truth: ``hu`` (as in the file), ``phantom`` (noise-free, before blur), ``blurred``, ``noise``,
    masks ``fat``, ``muscle``, ``trabecular`` (the mask of ``trabecular_hu``), ``roi`` (of ``roi_hu``),
    ``vertebra`` (bone of the vertebra, for masking it out), ``texture`` (the noise-free trabecular
    pattern on the patient's fixed texture window), ``organs`` (masks of liver, spleen, kidney where
    present), ``anatomy`` and ``stats``. For tests and figures."""
    for p in _cohort(n_per_class, seed, slices_per_patient, n_test_per_class):
        if p.patient_id == patient_id:
            break
    else:
        raise KeyError(f"debug_slice: no patient {patient_id!r} in the synthetic set (seed {seed}, "
                       f"n_per_class {n_per_class})")
    if not 0 <= k < p.n_slices:
        raise KeyError(f"debug_slice: patient {patient_id} has {p.n_slices} slices, not slice {k}")
    conf = _confounder_set(confounders)
    p = _with_sex(p, conf)
    rng_a, rng_s = _rngs(seed, p)
    an = _anatomy(p, rng_a, conf)
    for j in range(k):  # advance the slice generator exactly as synthesize does
        _render(p, an, j, size, rng_s)
    hu, stats, dbg = _render(p, an, k, size, rng_s, debug=True)
    return dict(hu=hu, stats=stats, anatomy=an, **dbg)


def version_note(version: str) -> str:
    """"" for results made with the current generator, else a one-line warning to show with them."""
    if str(version) == SYNTHETIC_VERSION:
        return ""
    made = f"version {version}" if version else "a generator older than version labels"
    return (f"made with synthetic data of {made}, not the current {SYNTHETIC_VERSION}: "
            f"re-run before comparing with newer results")


def threshold_rule(train_df: pd.DataFrame, test_df: pd.DataFrame, column: str = "trabecular_hu",
                   return_thresholds: bool = False):
    """Clinical reference (not in the paper): classify by one HU measurement with two thresholds,
    normal > t1 >= osteopenia > t2 >= osteoporosis, fitted on ``train_df`` by grid search for the
    highest train accuracy (Pickhardt-style opportunistic screening). Returns test predictions as
    class indices (0 normal, 1 osteopenia, 2 osteoporosis) [and ``(t_low, t_high)``]."""
    for name, d in (("train_df", train_df), ("test_df", test_df)):
        missing = {column, "label"} - set(d.columns) if name == "train_df" else {column} - set(d.columns)
        if missing:
            raise KeyError(f"threshold_rule: {name} lacks column(s) {sorted(missing)}")
    x = train_df[column].to_numpy(float)
    y = train_df["label"].map({lab: i for i, lab in enumerate(LABELS)})
    if y.isna().any():
        raise ValueError(f"threshold_rule: labels must be among {LABELS}")
    y = y.to_numpy(int)
    u = np.unique(x)
    mids = (u[:-1] + u[1:]) / 2 if len(u) > 1 else u
    grid = np.unique(np.concatenate([[u[0] - 1.0], np.quantile(mids, np.linspace(0, 1, 401)), [u[-1] + 1.0]]))
    # le[c, i] = number of class-c train samples with x <= grid[i]
    le = np.stack([np.searchsorted(np.sort(x[y == c]), grid, side="right") for c in range(3)])
    n_norm = (y == 0).sum()
    # t2 = grid[i] (osteoporosis <= t2), t1 = grid[j] (normal > t1), i <= j
    acc = le[2][:, None] + (le[1][None, :] - le[1][:, None]) + (n_norm - le[0][None, :])
    acc = np.where(np.arange(len(grid))[:, None] <= np.arange(len(grid))[None, :], acc, -1)
    # ties (e.g. a gap between classes): take the maximiser nearest the centre of all maximisers
    ii, jj = np.nonzero(acc == acc.max())
    k = int(np.argmin((ii - ii.mean()) ** 2 + (jj - jj.mean()) ** 2))
    i, j = ii[k], jj[k]
    t_low, t_high = float(grid[i]), float(grid[j])
    xt = test_df[column].to_numpy(float)
    pred = np.where(xt > t_high, 0, np.where(xt > t_low, 1, 2)).astype(np.int64)
    return (pred, (t_low, t_high)) if return_thresholds else pred
