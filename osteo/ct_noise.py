"""CT noise from a reconstruction, for the synthetic data set (:mod:`osteo.synthetic`).

Real CT noise is not white: filtered back-projection (FBP) shapes it. The ramp filter boosts high
frequencies, the reconstruction kernel's apodisation cuts the highest, so its noise power spectrum
(NPS) rises from zero at DC, peaks at ~0.1-0.3 cycles/mm and falls again; rays through more tissue
(laterally across an abdomen) and through dense bone carry fewer photons, which leaves streaks.

:func:`noise_bank` makes such noise once with scikit-image's parallel-beam projector: an abdomen
phantom (a water ellipse wider than deep, a spine and a few dense ribs) is projected
(:func:`skimage.transform.radon`), the detector counts ``N ~ Poisson(I0 exp(-p))`` are drawn, the
noise of the log sinogram ``log(I0 / N) - p`` is reconstructed by FBP
(:func:`skimage.transform.iradon`, Hann-apodised ramp) and a mild extra Gaussian apodisation (a
standard soft-tissue kernel) is applied. Each field is scaled to unit SD over its central part. The
synthetic generator crops a random window of a random field, flips it at random (left-right,
up-down: the streaks stay lateral, as in a supine patient) and multiplies it by the slice's noise SD.

The bank is deterministic from its seed and size, kept in memory and cached on disk
(``$XDG_CACHE_HOME/osteo-kit`` or ``~/.cache/osteo-kit``; ``OSTEO_NOISE_CACHE`` overrides) so that it
is made once (~1 s per field).
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
from pathlib import Path

import numpy as np
import skimage  # cheap: its submodules load on first use

BANK_FIELDS = 12  # fields in one bank
_I0 = 2.0e5  # photons per ray before the patient (sets the relative noise of the sinogram)
BANK_VERSION = 1  # bump when the recipe changes (part of the cache key)


def _cache_dir() -> Path:
    d = os.environ.get("OSTEO_NOISE_CACHE")
    if d:
        return Path(d)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "osteo-kit"


def bank_size(size: int) -> int:
    """Side of the bank's fields for slices of ``size`` pixels (room for random crops)."""
    return max(384, int(math.ceil((size + 128) / 64.0)) * 64)


def _phantom(n: int, rng: np.random.Generator) -> np.ndarray:
    """Attenuation map (per pixel) of a supine abdomen: water ellipse, spine, ribs, some gas."""
    yy, xx = (np.mgrid[:n, :n] - (n - 1) / 2.0) / (n / 2.0)
    mu = np.zeros((n, n))
    a, b = rng.uniform(0.82, 0.9), rng.uniform(0.58, 0.66)
    mu[(xx / a) ** 2 + (yy / b) ** 2 <= 1] = 1.0
    spine_y = rng.uniform(0.2, 0.3)
    mu[(xx / 0.13) ** 2 + ((yy - spine_y) / 0.1) ** 2 <= 1] = 1.6  # vertebral body
    mu[(xx / 0.05) ** 2 + ((yy - spine_y - 0.2) / 0.12) ** 2 <= 1] = 2.2  # posterior elements
    for s in (-1, 1):
        for _ in range(2):
            cx, cy = s * rng.uniform(0.55, 0.75), rng.uniform(-0.1, 0.35)
            mu[((xx - cx) / 0.025) ** 2 + ((yy - cy) / 0.025) ** 2 <= 1] = 3.0  # ribs
    for _ in range(3):  # bowel gas
        cx, cy = rng.uniform(-0.4, 0.4), rng.uniform(-0.45, -0.1)
        mu[((xx - cx) / 0.06) ** 2 + ((yy - cy) / 0.04) ** 2 <= 1] = 0.0
    # scale: 1.0 is water; the longest lateral path through water has a line integral of ~6.5
    return mu * (6.5 / (2 * a * n / 2.0))


def _make_field(n: int, rng: np.random.Generator, theta: np.ndarray) -> np.ndarray:
    from skimage.transform import iradon, radon  # heavy (~0.3 s): only when a bank is not yet cached

    mu = _phantom(n, rng)
    p = radon(mu, theta=theta, circle=True)
    counts = rng.poisson(_I0 * np.exp(-p)).astype(np.float64)
    noise_sino = np.log(_I0 / np.maximum(counts, 1.0)) - p
    rec = iradon(noise_sino, theta=theta, filter_name="hann", circle=True, output_size=n)
    c = 64  # the part random crops use (see noise_patch)
    centre = rec[c:-c, c:-c]
    return ((rec - centre.mean()) / centre.std()).astype(np.float32)


@functools.lru_cache(maxsize=4)
def noise_bank(size: int = 384, seed: int = 0, n_fields: int = BANK_FIELDS) -> np.ndarray:
    """``n_fields`` FBP noise fields of ``size`` x ``size`` pixels, unit SD at the centre (float32,
    read-only). Deterministic from ``(size, seed, n_fields)``; cached in memory and on disk."""
    key = hashlib.sha256(f"{BANK_VERSION}|{size}|{seed}|{n_fields}|{_I0}|{skimage.__version__}".encode()).hexdigest()[:16]
    path = _cache_dir() / f"ct-noise-{size}-{key}.npy"
    bank = None
    if path.exists():
        try:
            bank = np.load(path)
            if bank.shape != (n_fields, size, size):
                bank = None
        except (OSError, ValueError):
            bank = None  # a damaged cache file is made again
    if bank is None:
        rng = np.random.default_rng([seed, 77, size])
        theta = np.linspace(0.0, 180.0, size, endpoint=False)
        bank = np.stack([_make_field(size, rng, theta) for _ in range(n_fields)])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, bank)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: keep the bank in memory only
    bank.setflags(write=False)
    return bank


def noise_patch(rng: np.random.Generator, shape: tuple, bank: np.ndarray) -> np.ndarray:
    """A random crop of a random bank field, flipped left-right and/or up-down at random, scaled to unit SD."""
    n = bank.shape[1]
    h, w = shape
    if h > n or w > n:
        raise ValueError(f"noise_patch: a {h} x {w} patch does not fit the {n} x {n} bank")
    i = int(rng.integers(bank.shape[0]))
    # crops stay within the central part, where the fields were scaled to unit SD
    lo_r, lo_c = max(0, (n - h) // 2 - n // 8), max(0, (n - w) // 2 - n // 8)
    hi_r, hi_c = min(n - h, (n - h) // 2 + n // 8), min(n - w, (n - w) // 2 + n // 8)
    r0 = int(rng.integers(lo_r, hi_r + 1))
    c0 = int(rng.integers(lo_c, hi_c + 1))
    f = bank[i, r0:r0 + h, c0:c0 + w]
    if rng.random() < 0.5:
        f = f[:, ::-1]
    if rng.random() < 0.5:
        f = f[::-1, :]
    return f * np.float32(1.0 / max(float(f.std()), 1e-6))  # unit SD in every crop (the FBP noise is not stationary)


def radial_nps(field: np.ndarray, spacing: float, nbins: int = 40):
    """Radially averaged noise power spectrum of a 2-D noise field: (frequencies in cycles/mm, NPS)."""
    f = field - field.mean()
    h, w = f.shape
    win = np.hanning(h)[:, None] * np.hanning(w)[None, :]
    p = np.abs(np.fft.fftshift(np.fft.fft2(f * win))) ** 2
    fy = np.fft.fftshift(np.fft.fftfreq(h, d=spacing))[:, None]
    fx = np.fft.fftshift(np.fft.fftfreq(w, d=spacing))[None, :]
    fr = np.sqrt(fx * fx + fy * fy)
    edges = np.linspace(0.0, 0.5 / spacing, nbins + 1)
    idx = np.digitize(fr.ravel(), edges) - 1
    ok = (idx >= 0) & (idx < nbins)
    s = np.bincount(idx[ok], p.ravel()[ok], nbins)
    c = np.bincount(idx[ok], minlength=nbins)
    return (edges[:-1] + edges[1:]) / 2, s / np.maximum(c, 1)


def nps_peak(field: np.ndarray, spacing: float) -> float:
    """Frequency (cycles/mm) where the radially averaged NPS of ``field`` peaks."""
    f, p = radial_nps(field, spacing)
    return float(f[int(np.argmax(p))])
