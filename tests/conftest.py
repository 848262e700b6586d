import numpy as np
import pytest
import torch

from osteo.data import SliceData, SliceSet


def make_separable(n_per_class=24, size=32, seed=0, test_fraction=0.25):
    """Tiny in-memory data set whose classes differ in trabecular HU by a lot (separable)."""
    g = np.random.default_rng(seed)
    hu, y, pid = [], [], []
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    for c, mean in enumerate((350.0, 200.0, 50.0)):
        for i in range(n_per_class):
            img = np.full((size, size), -100.0) + g.normal(0, 20, (size, size))
            img[disc] = mean + g.normal(0, 20, disc.sum())
            hu.append(np.rint(img).astype(np.int16))
            y.append(c)
            pid.append(f"SYN{c}{i:03d}")
    hu, y = np.stack(hu), np.array(y)
    test = np.zeros(len(y), bool)
    for c in range(3):
        idx = np.flatnonzero(y == c)
        test[g.permutation(idx)[: int(round(test_fraction * len(idx)))]] = True

    def subset(mask):
        idx = np.flatnonzero(mask)
        return SliceSet(torch.from_numpy(hu[idx]), torch.from_numpy(y[idx]), [pid[i] for i in idx], [f"/x/{pid[i]}.dcm" for i in idx])

    return SliceData(subset(~test), subset(test), size, source="separable-test-set")


@pytest.fixture(scope="session")
def separable():
    return make_separable()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need an NVIDIA GPU: skipped (with the reason) where torch sees none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
