"""osteo.dicom.read_hu on real files (pydicom's CT_small.dcm, pydicom-data's explicit_VR-UN.dcm and
eCT_Supplemental.dcm) and on files written here, one DICOM pitfall each (SPEC section 6)."""
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from osteo.dicom import DicomError, iter_dicom_files, read_hu

SECRET_NAME = "Zyxwvu^Qponmlk"
SECRET_ID = "MRN-7788990011"
SECRETS = ("Zyxwvu", "Qponmlk", SECRET_ID)

# Stored values of the small test image: a ramp with air, fat, soft tissue and bone.
RAW = (np.arange(12 * 10, dtype=np.int32).reshape(12, 10) * 23 - 1024).astype(np.int16)


def data_file(name):
    """A file from pydicom's test data or the pydicom-data package, offline; skip if not installed."""
    path = pydicom.data.get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} not found offline: install the 'pydicom-data' package (pip install pydicom-data)")
    return path


def make_ct(pixels=RAW, slope=1.0, intercept=0.0, signed=True, **tags) -> Dataset:
    """A small valid single-frame CT dataset (explicit VR LE) with planted patient identifiers."""
    pixels = np.asarray(pixels)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientName = SECRET_NAME
    ds.PatientID = SECRET_ID
    ds.InstitutionName = "Secret General Hospital"
    ds.KVP = 120
    ds.SliceThickness = 2.5
    ds.PixelSpacing = [0.7, 0.8]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def expect_error(path, *needles, frame=None) -> str:
    """read_hu must raise DicomError naming the file and each needle, and no patient identifier."""
    with pytest.raises(DicomError) as ei:
        read_hu(path, frame=frame)
    msg = str(ei.value)
    assert Path(path).name in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    for s in SECRETS + ("Secret General",):
        assert s.lower() not in msg.lower(), f"identifier leaked into {msg!r}"
    return msg


# --- real files ---------------------------------------------------------------------------------


def test_ct_small_hu_is_slope_times_stored_plus_intercept():
    path = data_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    hu, meta = read_hu(path)
    assert hu.dtype == np.float32 and hu.shape == (128, 128)
    np.testing.assert_array_equal(hu, expected.astype(np.float32))
    assert float(ds.RescaleIntercept) == -1024.0  # so HU != stored: the rescale really applied
    assert meta["modality"] == "CT"
    assert meta["pixel_spacing"] == pytest.approx((float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])))
    assert meta["pixel_spacing"] == pytest.approx((0.661468, 0.661468))
    assert meta["flipped"] == () and meta["padding_masked"] == 0
    assert meta["patient_id"] == str(ds.PatientID)
    assert meta["transfer_syntax"] == "Explicit VR Little Endian"
    assert meta["kvp"] == 120.0 and meta["rows"] == 128 and meta["cols"] == 128


def test_explicit_vr_un_jpeg2000_decodes_and_is_flipped_upright():
    path = data_file("explicit_VR-UN.dcm")
    ds = pydicom.dcmread(path)
    assert "JPEG 2000" in ds.file_meta.TransferSyntaxUID.name
    assert [float(x) for x in ds.ImageOrientationPatient] == [1, 0, 0, 0, -1, 0]
    raw = ds.pixel_array.astype(np.float64)
    slope, icpt = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    hu, meta = read_hu(path)
    assert hu.shape == (512, 512)
    np.testing.assert_array_equal(hu, (raw[::-1] * slope + icpt).astype(np.float32))
    assert not np.array_equal(hu, (raw * slope + icpt).astype(np.float32))  # the flip matters
    assert meta["flipped"] == ("rows",)
    assert "JPEG 2000" in meta["transfer_syntax"]
    assert hu.min() == -1024.0 and hu.max() > 1000  # air and bone: HU, not raw codes


def test_real_enhanced_ct_frame_with_functional_group_rescale_and_row_direction_minus_x():
    path = data_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    assert int(ds.NumberOfFrames) == 2 and "RescaleIntercept" not in ds
    expect_error(path, "2 frames", "split the volume")
    hu, meta = read_hu(path, frame=1)
    raw = ds.pixel_array[1].astype(np.float64)
    # Functional groups say intercept -1024, slope 1; IOP [-1,0,0,0,1,0]: columns flipped.
    np.testing.assert_array_equal(hu, (raw[:, ::-1] - 1024.0).astype(np.float32))
    assert meta["flipped"] == ("cols",) and meta["rescale_source"] == "functional groups"
    assert meta["pixel_spacing"] == pytest.approx((0.388672, 0.388672))
    assert meta["slice_thickness"] == 10.0 and meta["frame"] == 1 and meta["frames"] == 2
    expect_error(path, "frame 2 out of range", frame=2)


# --- written files: one pitfall each ------------------------------------------------------------


def test_float_slope_and_intercept_exact(tmp_path):
    path = save(make_ct(slope=0.5, intercept=-1024.5), tmp_path / "float.dcm")
    hu, meta = read_hu(path)
    expected = (RAW.astype(np.float64) * 0.5 - 1024.5).astype(np.float32)
    np.testing.assert_array_equal(hu, expected)
    assert hu[0, 0] == np.float32(-1024 * 0.5 - 1024.5) == -1536.5
    assert (meta["rescale_slope"], meta["rescale_intercept"]) == (0.5, -1024.5)
    assert meta["pixel_spacing"] == (0.7, 0.8) and meta["slice_thickness"] == 2.5


def test_padding_value_masked_in_stored_units(tmp_path):
    raw = RAW.copy()
    raw[:2, :] = -2000  # padding outside the field of view
    ds = make_ct(raw, slope=1.0, intercept=-1024.0, PixelPaddingValue=-2000)
    hu, meta = read_hu(save(ds, tmp_path / "pad.dcm"))
    assert meta["padding_masked"] == 20
    assert np.all(hu[:2] == -1024.0)  # air, not -2000 - 1024 = -3024
    np.testing.assert_array_equal(hu[2:], (raw[2:].astype(np.float64) - 1024).astype(np.float32))


def test_padding_range_limit(tmp_path):
    raw = RAW.copy()
    raw[0, :5] = [-2000, -1990, -1980, -1500, 7]
    ds = make_ct(raw, slope=2.0, intercept=0.0, PixelPaddingValue=-2000, PixelPaddingRangeLimit=-1980)
    hu, meta = read_hu(save(ds, tmp_path / "padrange.dcm"))
    assert meta["padding_masked"] == 3
    np.testing.assert_array_equal(hu[0, :5], np.float32([-1024, -1024, -1024, -3000, 14]))


def test_monochrome1_is_not_inverted(tmp_path):
    ds = make_ct(slope=1.0, intercept=-1024.0, PhotometricInterpretation="MONOCHROME1")
    hu, meta = read_hu(save(ds, tmp_path / "m1.dcm"))
    np.testing.assert_array_equal(hu, (RAW.astype(np.float64) - 1024).astype(np.float32))
    assert meta["photometric"] == "MONOCHROME1"


def test_missing_file_meta_header_is_read_and_recorded(tmp_path):
    ds = make_ct(slope=1.0, intercept=-1024.0)
    del ds.file_meta
    path = tmp_path / "nometa"
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(path)  # really no preamble / meta
    hu, meta = read_hu(path)
    np.testing.assert_array_equal(hu, (RAW.astype(np.float64) - 1024).astype(np.float32))
    assert meta["file_meta"].startswith("missing") and "Implicit VR Little Endian" in meta["file_meta"]


def test_file_meta_without_preamble(tmp_path):
    ds = make_ct(slope=1.0, intercept=-1024.0)
    ds.preamble = None
    path = tmp_path / "nopreamble.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=False)
    assert path.read_bytes()[:4] == b"\x02\x00\x02\x00"  # starts with group 2, no 128-byte preamble
    hu, meta = read_hu(path)
    np.testing.assert_array_equal(hu, (RAW.astype(np.float64) - 1024).astype(np.float32))
    assert meta["file_meta"] == "no DICM preamble (file meta present)"


def test_truncated_pixel_data(tmp_path):
    path = save(make_ct(), tmp_path / "trunc.dcm")
    data = path.read_bytes()
    path.write_bytes(data[:-50])
    expect_error(path, "truncated pixel data")


def test_mr_refused(tmp_path):
    ds = make_ct(Modality="MR", SOPClassUID=MRImageStorage)
    expect_error(save(ds, tmp_path / "mr.dcm"), "modality MR, expected CT")


def test_real_mr_refused():
    expect_error(data_file("MR_small.dcm"), "modality MR, expected CT")


def test_text_file_is_not_dicom(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("patient Zyxwvu: osteoporosis?\n" * 20)
    expect_error(path, "not a DICOM file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    expect_error(path, "empty file")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nowhere.dcm", "no such file")


def test_folder_is_not_a_file(tmp_path):
    (tmp_path / "a.dcm").mkdir()
    expect_error(tmp_path / "a.dcm", "folder")


def test_no_pixel_data(tmp_path):
    ds = make_ct()
    del ds.PixelData
    expect_error(save(ds, tmp_path / "nopix.dcm"), "no pixel data")


def test_missing_rescale_accepted_when_values_look_like_hu(tmp_path):
    ds = make_ct(slope=None, intercept=None)
    hu, meta = read_hu(save(ds, tmp_path / "hu.dcm"))
    np.testing.assert_array_equal(hu, RAW.astype(np.float32))
    assert meta["rescale_source"].startswith("absent")


def test_missing_rescale_refused_on_raw_codes(tmp_path):
    unsigned = (RAW.astype(np.int32) + 1024).astype(np.uint16)  # 0..: what a scanner stores
    ds = make_ct(unsigned, slope=None, intercept=None, signed=False)
    expect_error(save(ds, tmp_path / "codes.dcm"), "RescaleSlope/RescaleIntercept missing", "min 0")
    too_low = RAW.copy()
    too_low[0, 0] = -3000
    ds = make_ct(too_low, slope=None, intercept=None)
    expect_error(save(ds, tmp_path / "low.dcm"), "RescaleSlope/RescaleIntercept missing", "min -3000")


def test_compressed_syntax_without_decoder_names_the_package(tmp_path, monkeypatch):
    from pydicom.pixels import get_decoder

    ds = make_ct()
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    ds["PixelData"].VR = "OB"
    path = save(ds, tmp_path / "jpegll.dcm")
    # Make sure no plugin is available, whatever this machine has installed.
    monkeypatch.setattr(get_decoder(JPEGLosslessSV1), "_available", {})
    msg = expect_error(path, "JPEG Lossless", "no decoder", "pip install")
    assert "pylibjpeg-libjpeg" in msg and "python-gdcm" in msg


def test_rle_compressed_reads_like_uncompressed(tmp_path):
    ds = make_ct(slope=1.0, intercept=-1024.0)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    path = save(ds, tmp_path / "rle.dcm")
    hu, meta = read_hu(path)
    np.testing.assert_array_equal(hu, (RAW.astype(np.float64) - 1024).astype(np.float32))
    assert meta["transfer_syntax"] == "RLE Lossless"


def _enhanced(frames, shared_rescale, per_frame_rescale=None) -> Dataset:
    """Enhanced CT with ``frames`` (list of 2-D int16) and rescale only in functional groups."""
    stack = np.stack(frames)
    ds = make_ct(stack[0], slope=None, intercept=None)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    del ds.PixelSpacing, ds.ImageOrientationPatient, ds.SliceThickness
    ds.NumberOfFrames = len(frames)
    ds.PixelData = stack.astype(np.int16).tobytes()

    def item(keyword, **values):
        inner = Dataset()
        for k, v in values.items():
            setattr(inner, k, v)
        return keyword, Sequence([inner])

    shared = Dataset()
    for kw, seq in (
        item("PixelValueTransformationSequence", RescaleSlope=shared_rescale[0], RescaleIntercept=shared_rescale[1], RescaleType="HU"),
        item("PixelMeasuresSequence", PixelSpacing=[0.6, 0.9], SliceThickness=1.25),
        item("PlaneOrientationSequence", ImageOrientationPatient=[1, 0, 0, 0, 1, 0]),
    ):
        setattr(shared, kw, seq)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    if per_frame_rescale is not None:
        per = []
        for s, i in per_frame_rescale:
            fg = Dataset()
            kw, seq = item("PixelValueTransformationSequence", RescaleSlope=s, RescaleIntercept=i)
            setattr(fg, kw, seq)
            per.append(fg)
        ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    return ds


def test_enhanced_single_frame_rescale_from_shared_functional_groups(tmp_path):
    path = save(_enhanced([RAW], shared_rescale=(2.0, -1000.0)), tmp_path / "enh1.dcm")
    hu, meta = read_hu(path)
    np.testing.assert_array_equal(hu, (RAW.astype(np.float64) * 2 - 1000).astype(np.float32))
    assert meta["rescale_source"] == "functional groups" and meta["rescale_type"] == "HU"
    assert meta["pixel_spacing"] == (0.6, 0.9) and meta["slice_thickness"] == 1.25
    assert meta["sop_class"] == "Enhanced CT Image Storage"


def test_multiframe_refused_without_frame_and_per_frame_rescale_wins(tmp_path):
    frames = [RAW, RAW + 1, RAW + 2]
    ds = _enhanced(frames, shared_rescale=(2.0, -1000.0), per_frame_rescale=[(1, -1024), (1, -1000), (0.5, -10)])
    path = save(ds, tmp_path / "volume.dcm")
    expect_error(path, "3 frames", "osteo reads single slices; split the volume")
    hu, meta = read_hu(path, frame=2)
    np.testing.assert_array_equal(hu, ((RAW.astype(np.float64) + 2) * 0.5 - 10).astype(np.float32))
    assert (meta["rescale_slope"], meta["rescale_intercept"]) == (0.5, -10.0)
    expect_error(path, "frame 3 out of range", frame=3)


@pytest.mark.parametrize(
    "iop, plane",
    [([0, 1, 0, 0, 0, -1], "sagittal"), ([1, 0, 0, 0, 0, -1], "coronal")],
)
def test_non_axial_refused(tmp_path, iop, plane):
    ds = make_ct(ImageOrientationPatient=iop)
    expect_error(save(ds, tmp_path / f"{plane}.dcm"), plane, "not axial")


def test_transposed_and_mirrored_orientations_made_canonical(tmp_path):
    raw = RAW.astype(np.float64)
    cases = {
        "transposed": ([0, 1, 0, 1, 0, 0], raw.T, ("transpose",)),
        "mirrored": ([-1, 0, 0, 0, 1, 0], raw[:, ::-1], ("cols",)),
        "rotated180": ([-1, 0, 0, 0, -1, 0], raw[::-1, ::-1], ("rows", "cols")),
        "tilted": ([1, 0, 0, 0, 0.9848078, -0.1736482], raw, ()),
    }
    for name, (iop, expected, flips) in cases.items():
        hu, meta = read_hu(save(make_ct(ImageOrientationPatient=iop), tmp_path / f"{name}.dcm"))
        np.testing.assert_array_equal(hu, expected.astype(np.float32), err_msg=name)
        assert meta["flipped"] == flips, name
    hu, meta = read_hu(tmp_path / "transposed.dcm")
    assert meta["pixel_spacing"] == (0.8, 0.7) and (meta["rows"], meta["cols"]) == (10, 12)
    assert read_hu(tmp_path / "tilted.dcm")[1]["tilt_deg"] == pytest.approx(10.0, abs=1e-3)


def test_identifiers_scrubbed_from_wrapped_pydicom_errors(tmp_path, monkeypatch):
    """Every failure above checks that no identifier leaks; here pydicom's own error text quotes the
    patient's name, id and institution, and the wrapped DicomError must carry none of them."""
    path = save(make_ct(), tmp_path / "x.dcm")

    def boom(self):
        raise ValueError(f"cannot decode for Qponmlk Zyxwvu ({SECRET_NAME}, {SECRET_ID}) at secret general hospital")

    monkeypatch.setattr(Dataset, "pixel_array", property(boom))
    msg = expect_error(path, "could not be decoded", "[redacted]")
    assert msg.count("[redacted]") == 4, msg


def test_iter_dicom_files(tmp_path):
    for rel in ["b/2.dcm", "a.dcm", "noext", "1.2.840.10008.99", "notes.txt", ".hidden.dcm",
                ".cache/x.dcm", "b/c.DCM", "DICOMDIR", "b/img.png"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    got = [p.relative_to(tmp_path).as_posix() for p in iter_dicom_files(tmp_path)]
    assert got == ["1.2.840.10008.99", "a.dcm", "b/2.dcm", "b/c.DCM", "noext"]
    with pytest.raises(DicomError, match="no such folder"):
        iter_dicom_files(tmp_path / "missing")
