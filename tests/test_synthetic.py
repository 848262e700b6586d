"""The synthetic lumbar CT data set (osteo.synthetic): DICOM validity, realism numbers of design section 5,
class structure, split, determinism, the HU threshold rule (the "clinical reference"), and the
microarchitecture model: information about the label beyond mean HU, visible in the image."""
import os

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from osteo.ct_noise import nps_peak
from osteo.synthetic import LABELS, MANIFEST_COLUMNS, SyntheticError, debug_slice, synthesize, threshold_rule
from osteo.synthetic import SYNTHETIC_VERSION as syn_version

SMALL = dict(n_per_class=60, size=128, seed=0)
BIG = dict(n_per_class=400, size=64, seed=0, slices_per_patient=2)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn_small")
    df = synthesize(out, progress=False, **SMALL)
    return out, df


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """More patients at a tiny size: for class statistics and the threshold rule."""
    out = tmp_path_factory.mktemp("syn_big")
    return synthesize(out, progress=False, **BIG)


def _hu(path):
    ds = pydicom.dcmread(path)
    return ds, ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _body_roi_features(path):
    """Image-only features of one slice, in an elliptic ROI (26 x 12 mm) 3.5 mm anterior to the centre
    of the vertebral body, which the generator's header gives (ImagePositionPatient is centred on the
    body): ``roi_mean`` (HU) and ``dark`` (fraction of ROI pixels whose 3 x 3 local mean lies more than
    60 HU below the ROI mean: fat pockets, not single noisy pixels)."""
    ds, hu = _hu(path)
    ps = float(ds.PixelSpacing[0])
    x0, y0 = (float(v) for v in ds.ImagePositionPatient[:2])
    rows, cols = np.mgrid[: hu.shape[0], : hu.shape[1]]
    u, v = cols * ps + x0, rows * ps + y0  # mm from the body centre (x left, y posterior)
    roi = (u / 13.0) ** 2 + ((v + 3.5) / 6.0) ** 2 <= 1.0
    pad = np.pad(hu, 1, mode="edge")
    local = sum(pad[i:i + hu.shape[0], j:j + hu.shape[1]] for i in range(3) for j in range(3)) / 9.0
    mean = hu[roi].mean()
    return dict(roi_mean=mean, dark=(local[roi] < mean - 60.0).mean(), roi_pixels=int(roi.sum()))


def _y(df):
    return df["label"].map({lab: i for i, lab in enumerate(LABELS)}).to_numpy()


def _nearest_class_mean(train, test, cols):
    """Standardise on train, predict the class whose train mean is nearest (Euclidean)."""
    x = train[cols].to_numpy(float)
    mu, sd = x.mean(0), x.std(0)
    y = _y(train)
    centres = np.stack([((x[y == c] - mu) / sd).mean(0) for c in range(3)])
    z = (test[cols].to_numpy(float) - mu) / sd
    return ((z[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)


def _grouped_cv(df, predict, k=5):
    """Out-of-fold predictions of ``predict(train, test)`` with patients dealt round-robin into k folds."""
    ids = sorted(df["patient_id"].unique())
    fold = df["patient_id"].map({pid: i % k for i, pid in enumerate(ids)}).to_numpy()
    out = np.full(len(df), -1)
    for f in range(k):
        out[fold == f] = predict(df[fold != f], df[fold == f])
    assert (out >= 0).all()
    return out


# ---- manifest and files ---------------------------------------------------------------------
def test_manifest_columns_counts_and_file(small):
    out, df = small
    assert list(df.columns[:4]) == ["path", "label", "patient_id", "split"]
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    assert df["label"].value_counts().to_dict() == {lab: 60 for lab in LABELS}
    on_disk = pd.read_csv(out / "manifest.csv")
    pd.testing.assert_frame_equal(on_disk, df, check_dtype=False)
    assert all((out / p).is_file() for p in df["path"])
    assert not list(out.rglob("*.tmp"))
    # each patient has one label, at most 5 slices, ids pseudonymous
    per = df.groupby("patient_id").agg(n=("label", "size"), labels=("label", "nunique"))
    assert (per["labels"] == 1).all() and per["n"].max() == 5
    assert df["patient_id"].str.fullmatch(r"SYN\d{5}").all()
    # labels follow the DXA-like T-score
    t = df["dxa_tscore"]
    assert (t[df.label == "normal"] > -1).all()
    assert ((t[df.label == "osteopenia"] > -2.5) & (t[df.label == "osteopenia"] <= -1)).all()
    assert (t[df.label == "osteoporosis"] <= -2.5).all()
    assert df["pixel_spacing"].between(0.6, 0.9).all() and df["slice_thickness"].between(1, 5).all()
    assert set(df["kvp"]) <= {100, 120, 140} and df["noise_sd"].between(10, 30).all()
    assert df["age"].between(20, 90).all() and set(df["sex"]) <= {"F", "M"}


def test_dicom_files_are_ct_with_the_generated_hu(small):
    out, df = small
    rows = df.groupby("label").head(2)
    for r in rows.itertuples():
        ds, hu = _hu(out / r.path)
        assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.Modality == "CT" and ds.BodyPartExamined == "LSPINE"
        assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
        assert ds.pixel_array.dtype == np.int16 and ds.PixelRepresentation == 1
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert ds.PatientID == r.patient_id and str(ds.PatientName) == f"Synthetic^{r.patient_id}"
        assert float(ds.PixelSpacing[0]) == pytest.approx(r.pixel_spacing)
        assert float(ds.SliceThickness) == r.slice_thickness and int(ds.KVP) == r.kvp
        assert ds.InstanceNumber == r.slice_index + 1
        assert (ds.Rows, ds.Columns) == (128, 128)
        assert hu.min() >= -1024 and hu.max() <= 3071
        d = debug_slice(r.patient_id, r.slice_index, **SMALL)
        np.testing.assert_array_equal(hu, d["hu"])  # the file holds exactly what was generated
        assert d["stats"]["trabecular_hu"] == pytest.approx(r.trabecular_hu, abs=0.01)
        assert d["phantom"][d["trabecular"]].mean() == pytest.approx(r.trabecular_hu, abs=0.01)
        assert hu[d["roi"]].mean() == pytest.approx(r.roi_hu, abs=0.01)
        assert r.synthetic_version == syn_version and r.level in ("L1", "L2", "L3", "L4", "L5")
    uids = [pydicom.dcmread(out / p).SOPInstanceUID for p in df["path"][:12]]
    assert len(set(uids)) == 12 and all(pydicom.uid.UID(u).is_valid for u in uids)


def test_fast_series_writer_equals_pydicoms_writer(small):
    """The writer splices per-slice elements into a header pydicom encoded once; the bytes must be
    exactly those of pydicom's own ``save_as`` of the whole dataset."""
    import osteo.synthetic as syn

    out, df = small
    for pid in df.drop_duplicates("patient_id")["patient_id"][:3]:
        p = next(q for q in syn._cohort(60, 0, 5) if q.patient_id == pid)
        p = syn._with_sex(p, syn._confounder_set(True))
        rng_a, _ = syn._rngs(0, p)
        an = syn._anatomy(p, rng_a)
        w = syn._SeriesWriter(p, an, 0, 128)
        for k in range(p.n_slices):
            hu = _hu(out / f"{p.label}/{pid}_{k}.dcm")[1].astype(np.int16)
            ref = syn._dicom_bytes(syn._dicom_template(p, an, 0, 128), hu, p, an, k, 0)
            assert w.slice_bytes(hu, k) == ref
            assert (out / f"{p.label}/{pid}_{k}.dcm").read_bytes() == ref


# ---- realism (design section 5), measured in the images ------------------------------------------
def test_tissue_hu_noise_and_texture_in_the_image(small):
    _, df = small
    first = df.drop_duplicates("patient_id").groupby("label").head(12)
    fat, muscle, noise, noise_ratio, roi_sd, cortex = [], [], [], [], [], []
    for r in first.itertuples():
        if len(fat) >= 6:
            break
        d = debug_slice(r.patient_id, 0, **SMALL)
        hu = d["hu"].astype(float)
        assert d["muscle"].sum() > 50 and d["trabecular"].sum() > 300
        if d["fat"].sum() < 30:  # a tight crop around the spine often holds no pure fat: take the next patient
            continue
        fat.append(hu[d["fat"]].mean())
        muscle.append(hu[d["muscle"]].mean())
        n_sd = (hu - d["blurred"])[d["fat"]].std()  # the noise actually in the image, on flat fat
        noise.append(n_sd)
        noise_ratio.append(n_sd / r.noise_sd)
        roi_sd.append(hu[d["roi"]].std())
        cortex.append(np.median(d["blurred"][d["cortex"]]))
    # fat -95 to -105 HU; one slice's fat mask can be a few dozen pixels of spatially correlated noise
    # (SD up to 30 HU), so its mean wobbles by several HU: each slice within 15 HU, their median within 5
    assert len(fat) >= 3 and all(-120 <= v <= -80 for v in fat) and -110 <= np.median(fat) <= -90, fat
    assert all(30 <= v <= 65 for v in muscle), muscle  # 45-55, lower with fat infiltration, + contrast
    assert all(10 <= v <= 30 for v in noise), noise
    # manifest's noise_sd is the image's; FBP noise is not stationary, so flat fat shows 0.6-1.4x of it
    assert all(0.6 <= v <= 1.4 for v in noise_ratio), noise_ratio
    assert 25 <= np.median(roi_sd) <= 60 and min(roi_sd) > 15, roi_sd  # low-contrast texture
    # thin shell, partial volume: 400-750 typical; a dense healthy cortex reaches 850-950 (clinical CT: up to ~1000)
    assert all(350 <= v <= 1000 for v in cortex), cortex


def test_noise_comes_from_a_reconstruction_sd_and_spectrum(small):
    """Noise SD 10-30 HU and a filtered back-projection spectrum: power peaks at 0.1-0.3 cycles/mm
    (real abdominal CT: 0.12-0.26), neighbouring pixels correlate, pixels 8 apart hardly."""
    _, df = small
    peaks = []
    for r in df.drop_duplicates("patient_id").head(6).itertuples():
        d = debug_slice(r.patient_id, 0, **SMALL)
        n = d["noise"]
        assert abs(n.mean()) < 4 and 10 <= n.std() <= 30 and n.std() == pytest.approx(r.noise_sd, rel=0.2)
        peaks.append(nps_peak(n, r.pixel_spacing))
        c1 = np.corrcoef(n[:, :-1].ravel(), n[:, 1:].ravel())[0, 1]
        c8 = np.corrcoef(n[:, :-8].ravel(), n[:, 8:].ravel())[0, 1]
        assert 0.3 < c1 < 0.95 and abs(c8) < 0.15, (c1, c8)
        if d["fat"].sum() >= 30:
            assert d["blurred"][d["fat"]].std() < 8  # fat far from edges is nearly flat before noise
    assert all(0.08 <= f <= 0.3 for f in peaks), peaks
    assert 0.1 <= np.median(peaks) <= 0.25, peaks


def test_noise_bank_is_deterministic_and_unit_sd(tmp_path, monkeypatch):
    from osteo import ct_noise

    monkeypatch.setenv("OSTEO_NOISE_CACHE", str(tmp_path))
    ct_noise.noise_bank.cache_clear()
    a = ct_noise.noise_bank(384)
    ct_noise.noise_bank.cache_clear()
    b = ct_noise.noise_bank(384)  # read back from the disk cache
    ct_noise.noise_bank.cache_clear()
    np.testing.assert_array_equal(a, b)
    assert list(tmp_path.glob("ct-noise-384-*.npy"))
    c = a[:, 64:-64, 64:-64]
    assert np.allclose(c.reshape(len(c), -1).std(1), 1.0, atol=1e-3)
    assert not np.array_equal(a[0], a[1])


# ---- classes, overlap, split, clinical reference ------------------------------------------------
def test_class_means_are_ordered_realistic_and_overlap(big):
    df = big
    assert df["label"].value_counts().to_dict() == {lab: 400 for lab in LABELS}
    m = df.groupby("label")["trabecular_hu"].mean()
    assert m["normal"] > m["osteopenia"] > m["osteoporosis"]
    assert 150 <= m["normal"] <= 210 and 120 <= m["osteopenia"] <= 175 and 90 <= m["osteoporosis"] <= 140, m
    q25 = df.loc[df.label == "normal", "trabecular_hu"].quantile(0.25)
    assert (df.loc[df.label == "osteopenia", "trabecular_hu"] > q25).mean() > 0.25
    assert (df.loc[df.label == "osteoporosis", "trabecular_hu"] > q25).mean() > 0.05
    # older patients, lower density (design section 5: ~2.5 HU/year)
    pat = df.drop_duplicates("patient_id")
    slope = np.polyfit(pat["age"], pat["bone_density"], 1)[0]
    assert -3.2 < slope < -1.5, slope


def test_split_is_patient_level_stratified_80_20(big, small):
    for df in (big, small[1]):
        tr = set(df.loc[df.split == "train", "patient_id"])
        te = set(df.loc[df.split == "test", "patient_id"])
        assert tr and te and not tr & te
        for lab in LABELS:
            frac = (df.loc[df.label == lab, "split"] == "test").mean()
            assert 0.15 <= frac <= 0.21, (lab, frac)


def test_threshold_rule_on_test_patients_is_better_than_chance_but_far_from_perfect(big):
    per = big.groupby("patient_id").agg(trabecular_hu=("trabecular_hu", "mean"), label=("label", "first"),
                                        split=("split", "first"))
    train, test = per[per.split == "train"], per[per.split == "test"]
    pred, (lo, hi) = threshold_rule(train, test, return_thresholds=True)
    y = test["label"].map({lab: i for i, lab in enumerate(LABELS)}).to_numpy()
    acc = (pred == y).mean()
    assert 0.45 < acc < 0.85, acc
    assert 90 < lo < hi < 220, (lo, hi)
    assert set(np.unique(pred)) == {0, 1, 2}


# ---- microarchitecture: information beyond mean HU (module docstring) ------------------------------
def test_microarchitecture_score_is_hidden_from_mean_hu_but_carries_the_label(big):
    df = big
    per = df.groupby("patient_id")[["micro_score", "h_share"]].nunique()
    assert (per == 1).all().all()  # one score and one trabecular architecture per patient
    assert df["h_share"].between(0.05, 0.7).all()
    m = df.groupby("label")["micro_score"].mean()
    assert m["normal"] > m["osteopenia"] + 0.5 and m["osteopenia"] > m["osteoporosis"] + 0.5, m
    h = df.groupby("label")["h_share"].mean()  # horizontal trabeculae are lost first
    assert h["normal"] > h["osteopenia"] > h["osteoporosis"], h
    # equal mean HU: what density, kVp and contrast leave of trabecular_hu does not know the score
    d = df["bone_density"].to_numpy(float)
    X = np.column_stack([np.ones_like(d), d, d * (df["kvp"] == 100), d * (df["kvp"] == 140), df["contrast"]])
    resid = df["trabecular_hu"] - X @ np.linalg.lstsq(X, df["trabecular_hu"].to_numpy(float), rcond=None)[0]
    assert abs(np.corrcoef(resid, df["micro_score"])[0, 1]) < 0.1
    # oracle from the latents: density alone ~55 %, density + score ~85 % (texture-free data: ~55 %)
    train, test = df[df.split == "train"], df[df.split == "test"]
    y = _y(test)
    acc_density = (threshold_rule(train, test, column="bone_density") == y).mean()
    acc_oracle = (_nearest_class_mean(train, test, ["bone_density", "micro_score"]) == y).mean()
    assert acc_density < 0.65 and acc_oracle > 0.75, (acc_density, acc_oracle)
    assert acc_oracle > acc_density + 0.15, (acc_density, acc_oracle)


def test_trabecular_texture_is_continuous_along_z_and_new_for_each_patient():
    """The vertical trabeculae and the marrow pattern continue from one slice to the next (3-5 mm
    apart): the noise-free texture of neighbouring slices correlates; two patients' do not."""
    kw = dict(n_per_class=6, size=96, seed=0)
    same, other = [], []
    import osteo.synthetic as syn

    pids = [p.patient_id for p in syn._cohort(6, 0, 5) if p.n_slices >= 2][:4]
    tex = {pid: [debug_slice(pid, k, **kw)["texture"] for k in range(2)] for pid in pids}
    for pid in pids:
        a, b = tex[pid]
        same.append(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    for p1, p2 in zip(pids, pids[1:]):
        a, b = tex[p1][0], tex[p2][0]
        h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
        other.append(np.corrcoef(a[:h, :w].ravel(), b[:h, :w].ravel())[0, 1])
    assert min(same) > 0.3, same
    assert max(abs(c) for c in other) < 0.15, other


def test_tissue_hu_of_organs_and_body_fat_fraction(big):
    """Liver, spleen, kidney HU from the literature (unenhanced / portal venous) and a body fat
    fraction of ~30-45 % of the cross-section (real L1-L2 slice: 38 %)."""
    pat = big.drop_duplicates("patient_id")
    assert pat["body_fat_fraction"].between(0.15, 0.75).all()
    assert 0.33 <= pat["body_fat_fraction"].median() <= 0.47, pat["body_fat_fraction"].median()
    assert pat["subcutaneous_fat_mm"].between(5, 45).all()
    seen = {}
    for r in pat[pat.level.isin(["L1", "L2"])].head(12).itertuples():
        d = debug_slice(r.patient_id, 0, **BIG)
        for organ, m in d["organs"].items():
            if m.sum() > 5:
                seen.setdefault((organ, bool(r.contrast)), []).append(np.median(d["blurred"][m]))
    ranges = {("liver", False): (50, 70), ("liver", True): (95, 135), ("spleen", False): (40, 55),
              ("spleen", True): (105, 135), ("kidney", False): (25, 40), ("kidney", True): (90, 205)}
    assert seen
    for key, vals in seen.items():
        lo, hi = ranges[key]
        assert all(lo <= v <= hi for v in vals), (key, vals)


def test_confounders_switch_off_and_labels_stay(tmp_path):
    """The same cohort with and without confounders: identical labels and densities; with them, women
    and low muscle HU go with osteoporosis; without, they do not."""
    kw = dict(n_per_class=120, size=32, slices_per_patient=1, progress=False, seed=3)
    on = synthesize(tmp_path / "on", **kw)
    off = synthesize(tmp_path / "off", confounders=False, **kw)
    pd.testing.assert_series_equal(on["label"], off["label"])
    pd.testing.assert_series_equal(on["bone_density"], off["bone_density"])
    assert set(on["confounders"]) == {"sex+body+muscle+cortex+aorta"} and set(off["confounders"]) == {"none"}
    f_on = on.groupby("label")["sex"].apply(lambda s: (s == "F").mean())
    f_off = off.groupby("label")["sex"].apply(lambda s: (s == "F").mean())
    assert f_on["osteoporosis"] > f_on["normal"] + 0.25, f_on
    assert abs(f_off["osteoporosis"] - f_off["normal"]) < 0.2, f_off
    mu_on = on.groupby("label")["muscle_hu"].mean()
    assert mu_on["normal"] > mu_on["osteoporosis"] + 1.0, mu_on
    with pytest.raises(ValueError, match="unknown confounder"):
        synthesize(tmp_path / "bad", confounders=["height"], **kw)


def test_threshold_rule_finds_the_gaps_of_separable_data():
    g = np.random.default_rng(0)
    train = pd.DataFrame({"x": np.r_[g.uniform(200, 250, 30), g.uniform(120, 160, 30), g.uniform(40, 90, 30)],
                          "label": np.repeat(LABELS, 30)})
    test = pd.DataFrame({"x": [300.0, 180.0, 140.0, 100.0, 10.0]})
    pred, (lo, hi) = threshold_rule(train, test, column="x", return_thresholds=True)
    x = {lab: train.loc[train.label == lab, "x"] for lab in LABELS}
    assert x["osteoporosis"].max() <= lo < x["osteopenia"].min()
    assert x["osteopenia"].max() <= hi < x["normal"].min()
    # ties are broken towards the middle of the gaps: (90, 120) and (160, 200) here
    assert 100 < lo < 110 and 170 < hi < 190, (lo, hi)
    np.testing.assert_array_equal(pred, [0, 0 if hi < 180 else 1, 1, 2, 2])
    with pytest.raises(KeyError, match="lacks"):
        threshold_rule(train, test, column="trabecular_hu")


# ---- determinism, overwrite, interruption -----------------------------------------------------
def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kw = dict(n_per_class=4, size=64, slices_per_patient=3, progress=False)
    a = synthesize(tmp_path / "a", seed=7, **kw)
    b = synthesize(tmp_path / "b", seed=7, **kw)
    c = synthesize(tmp_path / "c", seed=8, **kw)
    d = synthesize(tmp_path / "d", seed=7, workers=2, **kw)  # worker processes: the same bytes
    assert (tmp_path / "a/manifest.csv").read_bytes() == (tmp_path / "b/manifest.csv").read_bytes()
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(a, d)
    assert a["label"].value_counts().to_dict() == {lab: 4 for lab in LABELS}
    for p in a["path"]:
        np.testing.assert_array_equal(_hu(tmp_path / "a" / p)[1], _hu(tmp_path / "b" / p)[1])
        assert (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes()
        assert (tmp_path / "a" / p).read_bytes() == (tmp_path / "d" / p).read_bytes()
    assert not a["dxa_tscore"].equals(c["dxa_tscore"])
    assert not np.array_equal(_hu(tmp_path / "a" / a.path[0])[1], _hu(tmp_path / "c" / c.path[0])[1])


def test_existing_manifest_needs_overwrite_and_overwrite_removes_old_files(tmp_path):
    kw = dict(size=48, progress=False)
    old = synthesize(tmp_path, n_per_class=6, **kw)
    with pytest.raises(SyntheticError, match="manifest.csv already exists"):
        synthesize(tmp_path, n_per_class=3, **kw)
    new = synthesize(tmp_path, n_per_class=3, overwrite=True, slices_per_patient=2, **kw)
    assert len(new) == 9
    left = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.dcm")}
    assert left == set(new["path"]) and set(old["path"]) - left


def test_interrupted_run_leaves_no_manifest(tmp_path, monkeypatch):
    import osteo.synthetic as syn

    calls = {"n": 0}
    real = syn._SeriesWriter.slice_bytes

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(syn._SeriesWriter, "slice_bytes", flaky)
    with pytest.raises(KeyboardInterrupt):
        syn.synthesize(tmp_path, n_per_class=4, size=48, progress=False)
    assert not (tmp_path / "manifest.csv").exists()
    assert len(list(tmp_path.rglob("*.dcm"))) == 5


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n_per_class"):
        synthesize("/nonexistent-never-written", n_per_class=0, progress=False)
    with pytest.raises(KeyError, match="no patient"):
        debug_slice("SYN99999", 0, n_per_class=2, size=48)


def test_two_loaders_filling_the_same_cache_do_not_collide(small, monkeypatch, tmp_path):
    """Parallel `osteo grid --worker` processes load the same data at once; each writes the slice
    cache through a temporary file of its own (a shared name once made one worker crash)."""
    import osteo.data as D

    out, _ = small
    cache = tmp_path / "cache"
    real_replace, nested = os.replace, []

    def replace_after_a_competitor(src, dst):  # another loader finishes between our save and our rename
        if not nested:
            nested.append(None)
            nested[0] = D.load_data(out / "manifest.csv", image_size=32, cache_dir=cache, progress=False)
        real_replace(src, dst)

    monkeypatch.setattr(D.os, "replace", replace_after_a_competitor)
    data = D.load_data(out / "manifest.csv", image_size=32, cache_dir=cache, progress=False)
    assert torch.equal(data.train.hu, nested[0].train.hu)
    assert [p.name for p in cache.iterdir()] == [next(cache.glob("slices-*.npy")).name]  # no temporary file left
    monkeypatch.setattr(D.os, "replace", real_replace)
    again = D.load_data(out / "manifest.csv", image_size=32, cache_dir=cache, progress=False)  # from the cache
    assert torch.equal(again.test.hu, data.test.hu)


def test_figure_synthetic_beside_real_slices(small):
    from osteo.plots import synthetic_vs_real

    out, df = small
    levels = tuple(sorted(set(df["level"]) & {"L1", "L3", "L5"}))
    assert levels
    fig = synthetic_vs_real(out / "manifest.csv", levels=levels)
    titles = [ax.get_title() for ax in fig.axes]
    assert sum(t.startswith("synthetic") for t in titles) == len(levels)
    assert "real CT_small.dcm" in titles and "real explicit_VR-UN.dcm" in titles
    assert "noise power (normalised)" in titles and "HU histograms" in titles
    with pytest.raises(ValueError, match="no slice at level"):
        synthetic_vs_real(out, levels=("L9",))


# ---- patients: ids carry no label, test patients give one slice each ----------------------------
def test_test_patients_give_one_slice_and_training_patients_several(small, big):
    for df, spp in ((small[1], 5), (big, 2)):
        per = df.groupby("patient_id").agg(n=("label", "size"), split=("split", "first"),
                                           splits=("split", "nunique"), label=("label", "first"))
        assert (per["splits"] == 1).all()
        assert (per.loc[per.split == "test", "n"] == 1).all()
        train = per[per.split == "train"]
        for lab in LABELS:  # full patients of spp slices, at most one smaller remainder per class
            n = train.loc[train.label == lab, "n"]
            assert (n == spp).sum() >= len(n) - 1 and n.max() == spp
        n_class = len(df) // 3
        assert (per[per.split == "test"]["label"].value_counts() == round(0.2 * n_class)).all()


def test_patient_ids_file_names_and_row_order_carry_no_label():
    from osteo.synthetic import _cohort

    for seed in (0, 1):
        pats = _cohort(1500, seed, 5)
        ids = [p.patient_id for p in pats]
        assert ids == sorted(ids) == [f"SYN{i:05d}" for i in range(1, len(pats) + 1)]  # rows in id order
        num = np.array([int(i[3:]) for i in ids], float)
        lab = np.array([LABELS.index(p.label) for p in pats])
        split = np.array([p.split == "test" for p in pats])
        n = len(num)
        for mask in [lab == c for c in range(3)] + [split, ~split]:
            # a random permutation: the mean id of a group of m patients has SD ~ n / sqrt(12 m)
            assert abs(num[mask].mean() - num.mean()) < 4 * n / np.sqrt(12 * mask.sum())
        tercile = np.minimum(3 * (num - 1) // n, 2).astype(int)
        best = max((tercile == np.array(perm)[lab]).mean() for perm in
                   [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)])
        assert best < 0.38  # chance is 1/3 (the old generator's ids allowed 46 %)


def test_test_size_is_set_apart_from_the_training_size(tmp_path):
    df = synthesize(tmp_path, n_per_class=9, n_test_per_class=5, size=48, slices_per_patient=2, progress=False)
    test = df[df.split == "test"]
    assert len(test) == 15 and test["patient_id"].nunique() == 15 and (df.split == "train").sum() == 12
    assert set(df.loc[df.split == "train", "patient_id"]).isdisjoint(test["patient_id"])
    with pytest.raises(ValueError, match="n_test_per_class"):
        synthesize(tmp_path / "x", n_per_class=4, n_test_per_class=5, progress=False)
