"""The kit's embedded default data set: synthetic axial CT slices of a lumbar vertebra, as real CT DICOM.

The paper's 4500 hospital slices are private (SPEC section 5), so the kit ships a generator whose
output goes through the same loader as real data. Each slice is a 2-D phantom in millimetres,
rasterised at 0.6-0.9 mm pixels: vertebral body (kidney-shaped, thin cortical shell, trabecular
network, basivertebral vein), spinal canal (epidural fat, CSF), pedicles, laminae, articular,
spinous and transverse processes, psoas, paraspinal and quadratus muscles, aorta, IVC, kidneys,
bowel, fat, skin and air. HU values follow SPEC section 5.

Bone model: every patient has an age (a DXA-referral cohort, 65 +- 12 years), a sex and a latent
trabecular density (HU at 120 kVp, unenhanced; 226 +- 44 below 30 years, falling ~2.3 HU/year to
89 +- 38 at 90, SPEC 5). The label does NOT come from CT: a DXA-like T-score
``T = -1.6 + 1.2 (0.62 z + 0.78 e)`` (z: the density's z-score in the cohort, e: a standard-normal
residual) correlates with that density only imperfectly (r = 0.62) and is thresholded like DXA
(normal T > -1, osteopenia -2.5 < T <= -1, osteoporosis T <= -2.5). The brief suggested r ~0.7-0.8;
0.62 reproduces SPEC's per-class means (normal ~180, osteopenia ~145, osteoporosis ~115 HU) and
their heavy overlap (we get ~190/150/116 with contrast and kVp effects). A slice's ``trabecular_hu``
adds to the density a level-to-level variation (3 %), the kVp effect (100 kVp +8 %, 140 kVp -5 % on
the bone part) and contrast enhancement of the marrow (+10-20 HU). Mean HU alone therefore reaches
~55 % (3 classes).

Microarchitecture -- a design assumption of the kit, not a fact from the paper. The paper's premise is
that texture carries information beyond mean HU (its CNNs reach 64-77 %); with a label tied to density
alone no model could beat ~55 % here. So the residual e gets a visible counterpart: every patient has a
score ``micro_score = 0.95 e + 0.31 eta`` (standard normal, eta independent; + = healthier) that
changes the texture AT EQUAL MEAN HU:

- fat-replaced pockets: a fraction ``0.22 Phi(-(score + 0.6) / 1.1)`` of the trabecular area (mean
  ~3 % normal, ~7 % osteopenia, ~14 % osteoporosis) becomes yellow marrow (90-100 % fat, few remnant
  trabeculae: -70 to -100 HU before blur) in pockets ~2-5 mm across (excursions of a smooth random
  field), elongated along z (8 mm: horizontal trabeculae are lost first, so marrow spaces join
  vertically, which keeps them visible in thick slices). The bone outside the pockets gains exactly
  what the pockets lose over the trabecular mask (the remaining trabeculae are thicker), so
  ``trabecular_hu`` is that of the density-only model and knows nothing of the score;
- a coarser network: the trabecular network's spatial frequency scales by ``1 + 0.08 score`` (fewer,
  thicker trabeculae at the same BV/TV when the score is low).

Rationale: osteoporotic bone loses trabecular number and connectivity before thickness and its marrow
turns fatty (focal fat is common in elderly vertebrae), while the DXA residual of real cohorts comes
partly from cortex, bone size and degenerative change; tying the residual to texture is our choice,
made so that the paper's question has an answer on these data. Measured (seed 0, the default 3 x 1500
slices of 256 px): per-class mean ``trabecular_hu`` 188 / 147 / 116 (as before); the threshold rule on
it 54 % on the test slices (53 % on test patients); a nearest-class-mean rule on two features measured
in the image (ROI mean HU and the fraction of dark pocket pixels) 70 % (5-fold CV by patient); the
label from ``trabecular_hu`` and the slice's true pocket fraction 79 % (near what an ideal observer of
a slice can do), from ``bone_density`` and ``micro_score`` 86-89 %. Trabecular ROI SD (median, with
noise) rises from ~41 HU (normal) to ~58 HU (osteoporosis). Windows: pockets cannot go below fat
(~-100 HU); below -128 HU (where x_s clips and x_t does not) lie only noise tails, < 0.01 % of
trabecular pixels, so x_s and x_t show the same bone information with different contrast. We found no
physical way to put bone information between -450 and -128 HU and did not invent one.

Texture: a rod/plate network drawn at 3x the pixel resolution (zero level set of band-pass noise,
constant thickness) from which trabeculae are removed as density falls (BV/TV falls, thickness
stays), in marrow that gets fattier and patchier, plus the pockets above; it is averaged to CT
pixels, shrunk towards its mean for the slice thickness (the phantom is 2-D; a slice averages layers
along z, calibrated so the trabecular ROI SD is ~40-60 HU with noise, SPEC 5 says ~35-50 on real
slices), blurred by a Gaussian PSF (sigma 0.45-0.75 mm) and overlaid with slightly correlated noise
(SD 10-30 HU, lower for thick slices and high kVp).
Soft tissues are drawn once per patient; each of a patient's slices (neighbouring levels) moves,
rotates and scales the vertebra a little and draws new texture and noise.

Everything is deterministic from ``seed`` (same seed, same bytes). ``threshold_rule`` is the
"clinical reference": opportunistic screening by mean trabecular HU with two thresholds fitted on
train (Pickhardt-style), which is not part of the paper.
"""
from __future__ import annotations

import functools
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

from .manifest import LABELS  # one ordering of the classes for the whole kit

MANIFEST_COLUMNS = (
    "path", "label", "patient_id", "split",
    "bone_density", "dxa_tscore", "trabecular_hu", "kvp", "contrast", "noise_sd",
    "pixel_spacing", "slice_thickness", "age", "sex",
    # our extras
    "roi_hu", "roi_sd", "bv_tv", "marrow_hu", "psf_sigma", "slice_index",
    "micro_score", "pocket_frac",  # microarchitecture: the patient's latent score, the slice's pocket fraction
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
_BASE_BVTV = 0.30  # BV/TV of the complete network; lower densities remove trabeculae
_UP = 3  # texture super-sampling factor
_GAP_F = 0.45  # cycles/mm: scale of the holes left by removed trabeculae
# mm: correlation length of the network along z (the phantom is 2-D), calibrated with the pockets to
# SPEC 5's ROI SD (0.2 before the microarchitecture model)
_Z_CORR = 0.1
_MARROW_PATCH_HU = 30.0  # depth of fatty marrow patches per unit fat fraction
# microarchitecture (see module docstring): a latent score per patient that explains most of the
# T-score's residual after density, shown as fat-replaced pockets and a coarser network at equal mean HU
_MICRO_CORR = 0.95  # correlation of the microarchitecture score with the T-score residual
_POCKET_M0, _POCKET_MS = 0.6, 1.1  # pocket fraction = MAX * Phi(-(score + M0) / MS)
_POCKET_MAX = 0.22  # area fraction of fat pockets as the score -> -infinity
_POCKET_F = 0.17  # cycles/mm: Gaussian low-pass of the pocket field (correlation 1.3 mm: pockets ~2-5 mm)
_POCKET_Z = 8.0  # mm: extent of a pocket along z (partial volume in thick slices)
_F0_SLOPE = 0.08  # relative change of the network's spatial frequency per unit score
_PAD = 8  # pixels of edge padding around the FFT blur (avoids wrap-around)


class SyntheticError(RuntimeError):
    """Raised for problems with the synthetic data set's output folder."""


def _density_prior(age: float, sex: str) -> tuple[float, float]:
    """Mean and SD of L1 trabecular HU at ``age`` (SPEC 5: 226 +- 44 below 30, 89 +- 38 at 90)."""
    f = min(max((age - 30.0) / 60.0, 0.0), 1.0)
    mu = 226.0 - (226.0 - 89.0) * f
    sd = 44.0 - 6.0 * f
    if age > 50:
        mu += -6.0 if sex == "F" else 6.0
    return mu, sd


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
    t_resid: float = 0.0  # standard-normal residual of the T-score after density (not stored)


def _draw_patient(rng: np.random.Generator, cand: int) -> _Patient:
    age = float(np.clip(rng.normal(_AGE_MEAN, _AGE_SD), 20.0, 90.0))
    sex = "F" if rng.random() < _FEMALE_FRACTION else "M"
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
                    contrast, round(noise_sd, 2), spacing, thickness, psf, t_resid=e)


def _cohort(n_per_class: int, seed: int, slices_per_patient: int) -> list[_Patient]:
    """Draw patients until every class holds exactly ``n_per_class`` slices (last patient may get fewer)."""
    if n_per_class < 1 or slices_per_patient < 1:
        raise ValueError(f"synthesize: n_per_class ({n_per_class}) and slices_per_patient "
                         f"({slices_per_patient}) must be >= 1")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"synthesize: seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng([seed, 0])
    need = {lab: n_per_class for lab in LABELS}
    out, cand = [], 0
    while any(need.values()):
        p = _draw_patient(rng, cand)
        cand += 1
        if need[p.label] == 0:
            continue
        p.n_slices = min(slices_per_patient, need[p.label])
        need[p.label] -= p.n_slices
        out.append(p)
    width = max(5, len(str(len(out))))
    for i, p in enumerate(out, 1):
        p.patient_id = f"SYN{i:0{width}d}"
    return out


def _split_patients(df: pd.DataFrame, test_fraction: float = 0.2, seed: int = 0) -> pd.Series:
    """Patient-level split stratified by label: per class, patients in a seeded random order join
    test while its slice count stays within round(test_fraction * class slices) (SPEC 3: 80/20).

    Unlike :func:`osteo.manifest.split_patients` (which counts patients, for real data), this counts
    slices, so the synthetic set has exactly the paper's 300 test slices per class."""
    split = pd.Series("train", index=df.index, dtype=object)
    rng = np.random.default_rng([seed, 3])
    for lab in LABELS:
        sub = df[df["label"] == lab]
        if sub.empty:
            continue
        counts = sub.groupby("patient_id", sort=True).size()
        target = int(round(test_fraction * len(sub)))
        chosen, total = [], 0
        for pid in counts.index[rng.permutation(len(counts))]:
            if total + counts[pid] <= target:
                chosen.append(pid)
                total += counts[pid]
        if not chosen:  # tiny classes: at least one test patient
            chosen = [counts.index[0]]
        split[sub.index[sub["patient_id"].isin(chosen)]] = "test"
    return split


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


@dataclass
class _Shape:
    kind: str  # "ellipse" | "capsule" | "circle"
    args: tuple
    bbox: tuple  # xmin, xmax, ymin, ymax (mm, vertebra frame)

    def sd(self, x, y):
        return {"ellipse": _sd_ellipse, "capsule": _sd_capsule, "circle": _sd_circle}[self.kind](x, y, *self.args)


def _ellipse(cx, cy, a, b, ang=0.0):
    r = max(a, b)
    return _Shape("ellipse", (cx, cy, a, b, ang), (cx - r, cx + r, cy - r, cy + r))


def _capsule(x0, y0, x1, y1, r):
    return _Shape("capsule", (x0, y0, x1, y1, r),
                  (min(x0, x1) - r, max(x0, x1) + r, min(y0, y1) - r, max(y0, y1) + r))


def _circle(cx, cy, r):
    return _Shape("circle", (cx, cy, r), (cx - r, cx + r, cy - r, cy + r))


def _union_bbox(shapes):
    b = np.array([s.bbox for s in shapes])
    return (b[:, 0].min(), b[:, 1].max(), b[:, 2].min(), b[:, 3].max())


@dataclass
class _Anatomy:
    """Per-patient anatomy in the vertebra's frame (mm; x to the patient's left, y posterior)."""

    a: float
    b: float
    concave_r: float
    concave_depth: float
    t_body: float  # cortical shell of the body (mm)
    t_post: float  # cortex of the posterior elements (mm)
    vein_r: float
    fat_hu: float
    muscle_hu: float
    csf_hu: float
    blood_hu: float
    aorta_hu: float
    ivc_hu: float
    kidney_hu: float
    marrow_hu: float
    fat_fraction: float
    bvtv: float
    tissue_hu: float
    psoas: float
    offset: tuple  # body centre in image mm
    theta: float
    scale: float
    z0: float
    f0: float  # band-pass centre (cycles/mm) of the trabecular network
    background: tuple | None = None  # (size, image) cache of _background
    tex_half: tuple = (0, 0)  # half size (rows, cols) of the texture window, pixels
    soft: list = field(default_factory=list)  # (shape, hu, kind) painted in order
    body_outline: tuple = ()  # (cx, cy, W, H)
    micro: float = 0.0  # microarchitecture score (standard normal; low = fewer, thicker trabeculae, fat pockets)
    pocket_phi: float = 0.0  # expected area fraction of fat-replaced pockets
    pocket_hu: float = 0.0  # HU of a pocket (yellow marrow, a few trabecular remnants)


def _anatomy(p: _Patient, rng: np.random.Generator) -> _Anatomy:
    s = float(np.clip(rng.normal(1.0, 0.07), 0.85, 1.18))
    a = 23.0 * s * rng.uniform(0.95, 1.05)
    b = 16.5 * s * rng.uniform(0.92, 1.08)
    kb = _KVP_BONE[p.kvp]
    # marrow gets fattier as density falls (SPEC 5); BV/TV from the target mean at 120 kVp, unenhanced
    ff = float(np.clip(0.3 + 0.45 * (226.0 - p.density) / 137.0 + rng.normal(0, 0.05), 0.1, 0.9))
    marrow0 = (1 - ff) * 35.0 + ff * (-95.0)
    bvtv = float(np.clip((p.density - marrow0) / (_BONE_TISSUE_HU - marrow0), 0.02, 0.45))
    boost = rng.uniform(10.0, 20.0) if p.contrast else 0.0  # enhancement of marrow (~+10-20 HU)
    fat = rng.uniform(-102.0, -98.0) + _KVP_FAT[p.kvp]
    an = _Anatomy(
        a=a, b=b, concave_r=rng.uniform(11, 16) * s, concave_depth=rng.uniform(1.5, 3.5) * s,
        t_body=rng.uniform(0.38, 0.6), t_post=rng.uniform(0.6, 0.9), vein_r=rng.uniform(1.0, 1.6),
        fat_hu=fat, muscle_hu=rng.uniform(45.0, 52.0), csf_hu=rng.uniform(5.0, 15.0),
        blood_hu=rng.uniform(130, 180) if p.contrast else rng.uniform(35, 45),
        aorta_hu=rng.uniform(150, 250) if p.contrast else rng.uniform(35, 45),
        ivc_hu=rng.uniform(100, 170) if p.contrast else rng.uniform(35, 45),
        kidney_hu=rng.uniform(140, 200) if p.contrast else rng.uniform(28, 38),
        marrow_hu=marrow0 + boost, fat_fraction=ff, bvtv=bvtv, tissue_hu=_BONE_TISSUE_HU * kb,
        psoas=rng.uniform(0.7, 1.3),
        offset=(rng.uniform(-4, 4), -rng.uniform(2, 10)), theta=math.radians(rng.normal(0, 3.0)),
        scale=1.0, z0=rng.uniform(-250, -120), f0=rng.uniform(0.6, 0.75),
    )
    yp = b - an.concave_depth  # posterior edge of the body in the midline
    reach = 1.12 * (max(a, b) + 0.15 * min(a, b)) / p.pixel_spacing  # margin for rotation and level changes
    an.tex_half = (2 * math.ceil((b * reach / max(a, b) + 3) / 2), 2 * math.ceil((reach + 3) / 2))
    m = an.muscle_hu + (4.0 if p.contrast else 0.0)  # muscle enhances a little
    soft = []
    # body outline: posterior skin behind the spinous process plus subcutaneous fat
    y_post = yp + 48.0 + rng.uniform(8, 45)
    H, W = rng.uniform(100, 135), rng.uniform(150, 185)
    an.body_outline = (rng.normal(0, 3), y_post - H, W, H)
    # bowel loops anteriorly (some with gas)
    for _ in range(int(rng.integers(4, 8))):
        cx, cy = rng.uniform(-70, 70), rng.uniform(-(b + 85), -(b + 32))
        ea, eb = rng.uniform(6, 18), rng.uniform(6, 16)
        ang = rng.uniform(0, math.pi)
        soft.append((_ellipse(cx, cy, ea, eb, ang), rng.uniform(15, 40) + (15 if p.contrast else 0), "bowel"))
        if rng.random() < 0.3:
            soft.append((_ellipse(cx, cy, 0.5 * ea, 0.5 * eb, ang), rng.uniform(-950, -800), "gas"))
    for side in (-1, 1):  # kidneys
        kx, ky = side * rng.uniform(70, 85), yp + rng.uniform(-5, 15)
        soft.append((_ellipse(kx, ky, rng.uniform(22, 30), rng.uniform(30, 38), side * rng.uniform(0.35, 0.7)),
                     an.kidney_hu, "kidney"))
    ivc = _ellipse(-rng.uniform(16, 24), -(b + rng.uniform(7, 11)), rng.uniform(10, 14), rng.uniform(6, 9))
    soft.append((ivc, an.ivc_hu, "vessel"))
    ar = rng.uniform(9.0, 12.5)
    ax, ay = rng.uniform(5, 14), -(b + ar + rng.uniform(1, 4))
    soft.append((_circle(ax, ay, ar), an.aorta_hu, "vessel"))
    if rng.random() < (p.age - 40) / 80:  # wall calcification in the elderly
        ang = rng.uniform(0, 2 * math.pi)
        x0, y0 = ax + (ar - 0.8) * math.cos(ang), ay + (ar - 0.8) * math.sin(ang)
        x1, y1 = ax + (ar - 0.8) * math.cos(ang + 0.5), ay + (ar - 0.8) * math.sin(ang + 0.5)
        soft.append((_capsule(x0, y0, x1, y1, 0.7), rng.uniform(400, 800), "calcification"))
    for side in (-1, 1):  # muscles: quadratus lumborum, erector spinae, multifidus (psoas per slice)
        soft.append((_ellipse(side * (a + 40), yp + 12, 14 * rng.uniform(0.8, 1.2), 8, side * 0.45),
                     m + rng.normal(0, 1.0), "muscle"))
        soft.append((_ellipse(side * 24, yp + 36, 17 * rng.uniform(0.9, 1.15), 19 * rng.uniform(0.9, 1.1),
                              side * 0.17), m + rng.normal(0, 1.0), "muscle"))
        soft.append((_ellipse(side * 9, yp + 37, 7.5, 13), m + rng.normal(0, 1.0), "muscle"))
    an.soft = soft
    # microarchitecture (drawn last: the draws above are those of the density-only model)
    c = _MICRO_CORR
    an.micro = c * p.t_resid + math.sqrt(1 - c * c) * float(rng.standard_normal())
    an.f0 = float(np.clip(an.f0 * (1.0 + _F0_SLOPE * an.micro), 0.45, 0.9))
    an.pocket_phi = _POCKET_MAX * statistics.NormalDist().cdf(-(an.micro + _POCKET_M0) / _POCKET_MS)
    ffp = rng.uniform(0.9, 1.0)  # fat fraction of the yellow marrow in a pocket
    an.pocket_hu = ffp * fat + (1 - ffp) * 35.0 + 0.3 * boost + rng.uniform(0.0, 0.005) * (an.tissue_hu - fat)
    return an


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
        """A (2*half[0]) x (2*half[1]) pixel window centred on the vertebral body (clipped to the image)."""
        cy = int(round(self.oy / self.ps + self.cc))
        cx = int(round(self.ox / self.ps + self.cc))
        return (slice(max(cy - half[0], 0), min(cy + half[0], self.size)),
                slice(max(cx - half[1], 0), min(cx + half[1], self.size)))

    def coords(self, win):
        rows, cols = win
        u = (np.arange(cols.start, cols.stop, dtype=np.float32) - self.cc) * self.ps - self.ox
        v = (np.arange(rows.start, rows.stop, dtype=np.float32) - self.cc) * self.ps - self.oy
        x = (self.c * u[None, :] + self.s * v[:, None]) / self.scale
        y = (-self.s * u[None, :] + self.c * v[:, None]) / self.scale
        return x, y

    def cover(self, d):
        """Anti-aliased area coverage of a pixel from its signed distance (vertebra-frame mm)."""
        return np.clip(0.5 - d * (self.scale / self.ps), 0.0, 1.0)


def _inv_norm(p):
    return statistics.NormalDist().inv_cdf(min(max(p, 1e-6), 1 - 1e-6))


@functools.lru_cache(maxsize=256)
def _amplitude(shape, spacing, kind, param):
    """rfft-grid amplitude that turns complex white noise into a unit-variance field (cached).

    kinds: "band" (ring at ``param`` cycles/mm, width 0.15), "low" (Gaussian low-pass, sigma ``param``),
    "nps" (FBP-like noise power: ramp times apodisation, slightly correlated noise),
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
    elif kind == "nps":
        amp = np.sqrt(0.25 + f / 0.6) * np.exp(-0.5 * (f / 0.55) ** 2)
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


def _bone_shapes(an: _Anatomy, psoas_f: float):
    a, b = an.a, an.b
    yp = b - an.concave_depth
    post = []
    for side in (-1, 1):
        post.append(_ellipse(side * 12.5, yp + 3.5, 5.0, 8.0, -side * 0.18))  # pedicle
        post.append(_capsule(side * 14.0, yp + 11.0, side * 3.0, yp + 21.0, 4.0))  # lamina
        post.append(_ellipse(side * 17.0, yp + 14.0, 5.0, 7.0, side * 0.4))  # articular process
        post.append(_capsule(side * 15.0, yp + 2.0, side * (a + 24.0), yp - 2.0, 3.5))  # transverse
    post.append(_capsule(0.0, yp + 19.0, 0.0, yp + 46.0, 4.0))  # spinous process
    psoas = [_ellipse(side * (a + 11 * psoas_f), -2.0, 11 * psoas_f, 15 * psoas_f, side * 0.35) for side in (-1, 1)]
    return post, psoas


def _painter(fr: _Frame, img: np.ndarray, dbg_sd: dict | None):
    """paint(shape, hu[, kind]): composite a shape (anti-aliased) into ``img``; in debug mode keep its
    signed distance over the whole image (image mm) under ``kind``."""
    X = Y = None
    if dbg_sd is not None:
        X, Y = fr.coords((slice(0, fr.size), slice(0, fr.size)))

    def paint(shape, hu, kind=None):
        win = fr.window(shape.bbox)
        if win is None:
            return
        x, y = fr.coords(win)
        c = fr.cover(shape.sd(x, y))
        sub = img[win]
        sub += c * (np.float32(hu) - sub)
        if dbg_sd is not None and kind is not None:
            dbg_sd.setdefault(kind, []).append(shape.sd(X, Y) * fr.scale)

    return paint


def _background(an: _Anatomy, size: int, ps: float, debug: bool = False):
    """Soft tissues of one patient (outline, skin, fat, bowel, kidneys, vessels, back muscles), drawn
    once in the patient's base frame: neighbouring levels reuse them while the vertebra moves."""
    fr = _Frame(size, ps, an.offset, an.theta, an.scale)
    img = np.full((size, size), -1000.0, dtype=np.float32)
    dbg_sd = {} if debug else None
    paint = _painter(fr, img, dbg_sd)
    bx, by, W, H = an.body_outline
    paint(_ellipse(bx, by, W, H), 30.0)  # skin: 2 mm of soft tissue
    paint(_ellipse(bx, by, W - 2.0, H - 2.0), an.fat_hu, "fat")
    for shape, hu, kind in an.soft:
        paint(shape, hu, kind)
    return img, dbg_sd


def _render(p: _Patient, an: _Anatomy, k: int, size: int, rng: np.random.Generator, debug: bool = False):
    """Render slice ``k`` of patient ``p``: returns (hu int16, stats dict[, debug dict])."""
    ps = p.pixel_spacing
    # small level-to-level changes: position, rotation, size, psoas, density
    off = (an.offset[0] + rng.normal(0, 0.8), an.offset[1] + rng.normal(0, 0.8))
    theta = an.theta + math.radians(rng.normal(0, 0.5))
    scale = an.scale * (1.0 + 0.015 * k + rng.normal(0, 0.01))
    psoas_f = an.psoas * (1.0 + 0.05 * k)
    dens_k = p.density * (1.0 + rng.normal(0, 0.03))
    fr = _Frame(size, ps, off, theta, scale)
    if an.background is None or an.background[0] != size:
        an.background = (size, _background(an, size, ps)[0])
    img = an.background[1].copy()
    dbg_sd = None
    if debug:
        dbg_sd = _background(an, size, ps, debug=True)[1]
    paint = _painter(fr, img, dbg_sd)
    post, psoas = _bone_shapes(an, psoas_f)
    for sh in psoas:
        paint(sh, an.muscle_hu + (4.0 if p.contrast else 0.0) + rng.normal(0, 1.0), "muscle")

    # ---- vertebra: canal, posterior elements, body (one window) -------------------------------
    a, b = an.a, an.b
    yp = b - an.concave_depth
    canal = _ellipse(0.0, yp + 9.0, 11.5, 8.5)
    dura = _ellipse(0.0, yp + 8.5, 8.5, 6.5)
    paint(canal, an.fat_hu + 10.0, "canal")
    paint(dura, an.csf_hu, "canal")
    vb = _union_bbox(post + [_ellipse(0, 0, a, b)])
    win = fr.window(vb)
    x, y = fr.coords(win)
    d_body = np.maximum(_sd_ellipse(x, y, 0.0, 0.0, a, b),
                        -_sd_circle(x, y, 0.0, b - an.concave_depth + an.concave_r, an.concave_r))
    d_post = np.minimum.reduce([sh.sd(x, y) for sh in post])
    d_post = np.maximum(d_post, -(canal.sd(x, y) - 0.5))
    d_bone = np.minimum(d_body, d_post)
    d_in = np.minimum(d_body + an.t_body, d_post + an.t_post)
    c_bone, c_in = fr.cover(d_bone), fr.cover(d_in)
    c_body_in = fr.cover(d_body + an.t_body)

    # trabecular texture, on a fixed-size window around the body, at _UP x the pixel resolution
    kb = _KVP_BONE[p.kvp]
    marrow = an.marrow_hu
    bvtv = float(np.clip(an.bvtv * dens_k / p.density, 0.02, 0.45))
    post_val = marrow + 1.1 * bvtv * (an.tissue_hu - marrow)
    bw = fr.centred_window(an.tex_half)
    h, w = bw[0].stop - bw[0].start, bw[1].stop - bw[1].start
    keep = min(1.0, bvtv / _BASE_BVTV)
    eps = _inv_norm(0.5 + 0.5 * bvtv / keep)
    hi = (_UP * h, _UP * w)
    net = np.abs(_field(rng, hi, ps / _UP, "band", an.f0)) < eps
    net &= _field(rng, hi, ps / _UP, "low", _GAP_F) > _inv_norm(1.0 - keep)
    frac = net.reshape(h, _UP, w, _UP).mean(axis=(1, 3), dtype=np.float32)
    kz = math.sqrt(_Z_CORR / (_Z_CORR + p.slice_thickness))  # a slice averages ~thk/_Z_CORR layers along z
    frac = np.float32(bvtv) + (frac - np.float32(bvtv)) * np.float32(kz)
    # fatty marrow is patchy: a smooth field (~3-5 mm blobs) whose amplitude grows with the fat fraction
    patches = np.abs(_field(rng, (h, w), ps, "low", 0.12)) - np.float32(math.sqrt(2 / math.pi))
    marrow_map = np.float32(marrow) - np.float32(_MARROW_PATCH_HU * an.fat_fraction) * patches
    tex = marrow_map + frac * (np.float32(an.tissue_hu) - marrow_map)
    # fat-replaced pockets: excursions of a smooth field (anti-aliased over ~1 pixel), partial volume along z
    pf = _field(rng, (h, w), ps, "low", _POCKET_F)
    ell = math.sqrt(2.0) / (2.0 * math.pi * _POCKET_F)  # correlation length of the field (mm)
    thr = np.float32(_inv_norm(1.0 - an.pocket_phi))
    pw = np.clip((pf - thr) * np.float32(ell / ps) + np.float32(0.5), 0.0, 1.0)
    kzp = math.sqrt(_POCKET_Z / (_POCKET_Z + p.slice_thickness))
    pw = pw * np.float32(kzp) + np.float32(an.pocket_phi * (1.0 - kzp))
    trab = np.full(c_in.shape, post_val, dtype=np.float32)
    fr_t = np.full(c_in.shape, np.nan, dtype=np.float32)
    pk = np.zeros(c_in.shape, dtype=np.float32)
    r0, r1 = max(bw[0].start, win[0].start), min(bw[0].stop, win[0].stop)
    q0, q1 = max(bw[1].start, win[1].start), min(bw[1].stop, win[1].stop)
    dst = (slice(r0 - win[0].start, r1 - win[0].start), slice(q0 - win[1].start, q1 - win[1].start))
    src = (slice(r0 - bw[0].start, r1 - bw[0].start), slice(q0 - bw[1].start, q1 - bw[1].start))
    trab[dst] = tex[src]
    fr_t[dst] = frac[src]
    pk[dst] = pw[src]
    # noise-free truth inside the trabecular mask (pixels fully inside the shell, off the vein)
    d_vein = _sd_capsule(x, y, 0.0, yp - 9.0, 0.0, yp + 0.8, an.vein_r)
    trab_mask = (c_body_in >= 1.0) & (d_vein * scale > ps)
    # equal mean HU: the bone outside the pockets gains what the pockets lose, exactly over the mask
    pm = pk[trab_mask]
    loss = float((pm * (trab[trab_mask] - np.float32(an.pocket_hu))).sum())
    delta = np.float32(loss / max(float((1.0 - pm).sum()), 1e-6))
    trab = (1.0 - pk) * (trab + delta) + pk * np.float32(an.pocket_hu)
    p_bone = (an.pocket_hu - an.fat_hu) / (an.tissue_hu - an.fat_hu)  # rough BV/TV of a pocket
    fr_t = (1.0 - pk) * (fr_t + delta / np.float32(an.tissue_hu - marrow)) + pk * np.float32(p_bone)
    interior = c_body_in * trab + (1.0 - c_body_in) * np.float32(post_val)
    cortex = np.float32(_BONE_TISSUE_HU * kb)
    sub = img[win]
    vert = sub * (1.0 - c_bone) + (c_bone - c_in) * cortex + c_in * interior
    # basivertebral vein: a channel through the posterior cortex into the body
    c_vein = np.minimum(fr.cover(d_vein), c_bone)
    vert += c_vein * (np.float32(an.blood_hu) - vert)
    img[win] = vert

    if debug:
        cort_mask = (np.abs(d_body + 0.5 * an.t_body) * scale < 0.5 * ps) & (y < -0.3 * b)
    trabecular_hu = float(vert[trab_mask].mean())
    # a clinician's ROI: an ellipse in the anterior-central body, off the cortex and the vein
    roi = (_sd_ellipse(x, y, 0.0, -0.15 * b, 0.6 * a, 0.55 * b) < 0) & trab_mask
    if not roi.any():  # tiny crops
        roi = trab_mask

    # ---- scanner: PSF blur + slightly correlated noise, edge-padded, one inverse FFT -------------
    P = _PAD
    padded = np.pad(img, P, mode="edge")
    shp = padded.shape
    obj = np.fft.rfft2(padded)
    obj *= _amplitude(shp, float(ps), "psf", float(p.psf_sigma))
    nspec = _spectrum(rng, shp, ps, "nps")
    nspec *= np.float32(p.noise_sd)
    final = np.fft.irfft2(obj + nspec, s=shp)[P:-P, P:-P]
    hu = np.clip(np.rint(final), -1024, 3071).astype(np.int16)
    hu_win = hu[win].astype(np.float32)
    stats = dict(trabecular_hu=trabecular_hu, roi_hu=float(hu_win[roi].mean()), roi_sd=float(hu_win[roi].std()),
                 bv_tv=float(np.nanmean(fr_t[trab_mask])), marrow_hu=float(marrow),
                 micro_score=an.micro, pocket_frac=float(pm.mean()) if pm.size else 0.0)
    if not debug:
        return hu, stats
    blurred = np.fft.irfft2(obj, s=shp)[P:-P, P:-P]
    noise = np.fft.irfft2(nspec, s=shp)[P:-P, P:-P]
    # masks of "pure" regions, at least 2-3 mm from any other structure (for tests and figures)
    later = lambda kinds: np.minimum.reduce([d for kd in kinds for d in dbg_sd.get(kd, [])]
                                            + [np.full((size, size), 1e9, np.float32)])
    bone_full = np.full((size, size), 1e9, np.float32)
    bone_full[win] = d_bone * scale
    others = np.minimum(later(["bowel", "gas", "kidney", "vessel", "calcification", "muscle", "canal"]), bone_full)
    fat_mask = (dbg_sd["fat"][0] < -3.0) & (others > 3.0)
    muscle_mask = (later(["muscle"]) < -2.0) & (np.minimum(later(["canal"]), bone_full) > 2.0)
    tm = np.zeros((size, size), bool)
    tm[win] = trab_mask
    rm = np.zeros((size, size), bool)
    rm[win] = roi
    cm = np.zeros((size, size), bool)
    cm[win] = cort_mask
    pkm = np.zeros((size, size), np.float32)
    pkm[win] = pk * c_body_in
    return hu, stats, dict(phantom=img, blurred=blurred, noise=noise, fat=fat_mask, muscle=muscle_mask,
                           trabecular=tm, roi=rm, cortex=cm, pockets=pkm)


# ---- DICOM -------------------------------------------------------------------------------------
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/osteo-kit/synthetic")


def _uid(seed, *parts) -> str:
    """A deterministic DICOM UID: '2.25.' + a name-based UUID (PS3.5 B.2). (pydicom's
    ``generate_uid(prefix=None, ...)`` ignores ``entropy_srcs`` and is random.)"""
    name = "|".join(["osteo-kit synthetic", str(seed), *map(str, parts)])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _dicom_template(p: _Patient, an: _Anatomy, seed: int, size: int):
    """The series' static CT header (one per patient); :func:`_dicom_bytes` fills in each slice."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

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
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

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
        from pydicom.dataset import Dataset
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_file_meta_info

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
    from pydicom.dataelem import DataElement

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
    import io

    _fill_slice(ds, hu, p, an, k, seed)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ---- public API --------------------------------------------------------------------------------
def _rngs(seed: int, p: _Patient):
    return np.random.default_rng([seed, 1, p.cand]), np.random.default_rng([seed, 2, p.cand])


def _patient_rows(job) -> list[dict]:
    """Render and write every slice of one patient; return its manifest rows (runs in a worker)."""
    p, seed, size, out = job
    rng_a, rng_s = _rngs(seed, p)
    an = _anatomy(p, rng_a)
    writer = _SeriesWriter(p, an, seed, size)
    rows = []
    for k in range(p.n_slices):
        hu, st = _render(p, an, k, size, rng_s)
        rel = f"{p.label}/{p.patient_id}_{k}.dcm"
        (out / rel).write_bytes(writer.slice_bytes(hu, k))
        rows.append(dict(
            path=rel, label=p.label, patient_id=p.patient_id, bone_density=p.density, dxa_tscore=p.tscore,
            trabecular_hu=round(st["trabecular_hu"], 2), kvp=p.kvp, contrast=p.contrast, noise_sd=p.noise_sd,
            pixel_spacing=p.pixel_spacing, slice_thickness=p.slice_thickness, age=p.age, sex=p.sex,
            roi_hu=round(st["roi_hu"], 2), roi_sd=round(st["roi_sd"], 2), bv_tv=round(st["bv_tv"], 4),
            marrow_hu=round(st["marrow_hu"], 2), psf_sigma=p.psf_sigma, slice_index=k,
            micro_score=round(st["micro_score"], 3), pocket_frac=round(st["pocket_frac"], 4),
        ))
    return rows


def synthesize(out_dir, n_per_class: int = 1500, size: int = 256, seed: int = 0, slices_per_patient: int = 5,
               progress: bool = True, overwrite: bool = False, workers: int = 1) -> pd.DataFrame:
    """Write the synthetic lumbar CT set as DICOM (``out_dir/<label>/<patient>_<k>.dcm``) and
    ``out_dir/manifest.csv``; return the manifest.

    Exactly ``n_per_class`` slices per class (SPEC 3: 1500), ``slices_per_patient`` neighbouring
    levels per patient, a patient-level 80/20 split stratified by label. Deterministic from ``seed``
    (byte-identical files, whatever ``workers``). The manifest is written last (temporary file +
    rename), so an interrupted run leaves no manifest pointing at missing files. An existing manifest
    is an error unless ``overwrite=True``, which first removes the old manifest and the files it
    lists. ``workers > 1`` renders patients in that many forked processes (Linux/macOS; the same
    bytes, since every patient has its own seeds); one process makes the default 4500 slices of
    256 x 256 in ~30-40 s on a 2-core machine.
    """
    from tqdm.auto import tqdm

    if size < 32:
        raise ValueError(f"synthesize: size must be >= 32 pixels, got {size}")
    out = Path(out_dir)
    man = out / "manifest.csv"
    patients = _cohort(n_per_class, seed, slices_per_patient)  # validates the counts first
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
    jobs = [(p, seed, size, out) for p in patients]
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
    df = pd.DataFrame(rows)
    df.insert(3, "split", _split_patients(df, 0.2, seed))
    df = df[list(MANIFEST_COLUMNS)]
    tmp = out / "manifest.csv.tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, man)
    return df


def debug_slice(patient_id: str, k: int = 0, n_per_class: int = 1500, size: int = 256, seed: int = 0,
                slices_per_patient: int = 5) -> dict:
    """Re-render one slice of ``synthesize(..., n_per_class, size, seed, slices_per_patient)`` with its
    ground truth: ``hu`` (as in the file), ``phantom`` (noise-free, before blur), ``blurred``, ``noise``,
    masks ``fat``, ``muscle``, ``trabecular`` (the mask of ``trabecular_hu``), ``roi`` (of ``roi_hu``),
    ``pockets`` (the fat-pocket weight, 0-1, of the microarchitecture model) and ``stats``. For tests
    and figures."""
    for p in _cohort(n_per_class, seed, slices_per_patient):
        if p.patient_id == patient_id:
            break
    else:
        raise KeyError(f"debug_slice: no patient {patient_id!r} in the synthetic set (seed {seed}, "
                       f"n_per_class {n_per_class})")
    if not 0 <= k < p.n_slices:
        raise KeyError(f"debug_slice: patient {patient_id} has {p.n_slices} slices, not slice {k}")
    rng_a, rng_s = _rngs(seed, p)
    an = _anatomy(p, rng_a)
    for j in range(k):  # advance the slice generator exactly as synthesize does
        _render(p, an, j, size, rng_s)
    hu, stats, dbg = _render(p, an, k, size, rng_s, debug=True)
    return dict(hu=hu, stats=stats, **dbg)


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
