"""Read one CT slice from a DICOM file as Hounsfield units, robustly (design section 6).

The paper (section III) takes "one axial CT slice stored in HU" as given; hospital DICOM needs the
care below, all of it ours:

* HU = stored value * RescaleSlope + RescaleIntercept, in float64, returned as float32. For
  enhanced CT the rescale comes from the per-frame, else the shared, functional groups
  (PixelValueTransformationSequence). A rescale tag that is present must hold exactly one finite
  decimal number written as DICOM writes it (``-1024``, ``0.5``, ``1e3``): a value with a letter,
  a decimal comma, two values, NaN/inf, a tab or non-ASCII digit, or nothing at all is refused,
  never replaced by a default. So is a slope of 0 or below, a slope too small for the stored values
  to span air to bone (1000 HU), a rescale that gives values beyond +-40000 (no CT
  reaches them; signed pixels read as unsigned do), and a RescaleType
  other than HU or US (unspecified): OD, MGML, ED, ... are not Hounsfield units.
* A missing rescale tag is taken as its identity value (slope 1, intercept 0) only when the HU
  that this gives look like HU: the lowest value that is not padding lies in [-1100, 0) (every
  body slice holds fat or air below 0 HU; data stored unsigned from 0, which need an intercept of
  about -1024, do not). This one rule covers both tags missing and one of them missing; anything
  else is refused and the message says which tag to add. ``meta["rescale_source"]`` says what was
  assumed.
* Before anything is allocated, every length field is checked against the file's size: a header
  declaring an element longer than the whole file is refused as damaged (no 4 GB allocation), and
  so is a sequence item longer than what remains of the file (or of its sequence).
* Uncompressed pixel data must match the image tags: at least one row more data than Rows x
  Columns x BitsAllocated (x frames) need is refused; so are bits above BitsStored that show
  BitsStored or PixelRepresentation to be wrong (sign-extended negatives declared unsigned, for
  one; others, such as an old overlay plane, are ignored as DICOM says), and padding is found
  in the whole stored value. A slice whose pixels all hold one value (a blank image) or are all
  padding is refused too. PixelSpacing, SliceThickness and KVP that are not positive numbers are
  reported as None (unknown), never as a wrong number; osteo itself does not use them.
* PixelPaddingValue (and PixelPaddingRangeLimit) are compared with the *stored* values, before
  the rescale; those pixels become -1024 HU (air) and are counted in ``meta["padding_masked"]``.
* Compressed transfer syntaxes decode through pydicom's decoders (JPEG 2000 via
  pylibjpeg-openjpeg and JPEG / JPEG Lossless via pylibjpeg-libjpeg, both installed with osteo);
  when no decoder is installed for a syntax, the error names the package to install.
* A file without the File Meta header (no "DICM" preamble) is read with ``force=True`` if what
  follows is a valid dataset; its transfer syntax is taken from the encoding pydicom detected
  (implicit VR little endian if it cannot tell) and ``meta["file_meta"]`` records it.
* MONOCHROME1 is recorded, never inverted: HU are HU whatever the display convention.
* ImageOrientationPatient: the image is transposed and/or flipped to the canonical axial
  orientation (rows run along +x, columns along +y: IOP ~ [1,0,0, 0,1,0], the usual radiological
  view); ``meta["flipped"]`` lists what was done, in order ("transpose", then "rows" = upside
  down and/or "cols" = left-right). Oblique (tilted-gantry) slices are accepted and their tilt
  recorded; sagittal and coronal slices are refused. Without IOP the image is taken as stored.
* Multi-frame files (Enhanced CT volumes): refused unless ``frame=`` picks one frame.

Every failure is a :class:`DicomError` whose message names the file and the problem, and never
contains a patient identifier (values of :data:`osteo.privacy.IDENTIFYING_TAGS` are scrubbed).
"""
from __future__ import annotations

import os
import re
import struct
import threading
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.filereader
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .privacy import dataset_identifiers, scrub

__all__ = ["DicomError", "read_hu", "read_header", "iter_dicom_files", "DICOM_SUFFIXES", "CT_SOP_CLASSES"]

#: File suffixes that mark a DICOM candidate in a folder (besides no suffix and numeric suffixes,
#: as in ``1.2.840.113619.2.55.3.123``).
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima", ".img")

#: SOP classes that hold CT images (accepted even if Modality is absent).
CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}

# What to install for a compressed syntax when pydicom has no decoder for it (used when pydicom's own
# list of missing dependencies cannot be parsed). gdcm's PyPI name is python-gdcm.
_FALLBACK_HINTS = {
    "1.2.840.10008.1.2.4.50": ["pylibjpeg-libjpeg", "python-gdcm"],  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": ["pylibjpeg-libjpeg", "python-gdcm"],  # JPEG Extended
    "1.2.840.10008.1.2.4.57": ["pylibjpeg-libjpeg", "python-gdcm"],  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": ["pylibjpeg-libjpeg", "python-gdcm"],  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": ["pylibjpeg-libjpeg", "pyjpegls", "python-gdcm"],  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": ["pylibjpeg-libjpeg", "pyjpegls", "python-gdcm"],  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": ["pylibjpeg-openjpeg", "python-gdcm"],  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": ["pylibjpeg-openjpeg", "python-gdcm"],  # JPEG 2000
    "1.2.840.10008.1.2.4.201": ["pylibjpeg-openjpeg"],  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": ["pylibjpeg-openjpeg"],  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": ["pylibjpeg-openjpeg"],  # HTJ2K
    "1.2.840.10008.1.2.5": ["pylibjpeg-rle"],  # RLE (pydicom's numpy decoder normally suffices)
}
_PYPI_NAME = {"gdcm": "python-gdcm"}  # import name -> PyPI name, where they differ

_AIR_HU = -1024.0


class DicomError(ValueError):
    """A DICOM file that osteo cannot turn into a HU slice.

    ``DicomError(path, problem)`` reads ``"<path>: <problem>"``; ``DicomError(message)`` is kept
    for summaries of several files. ``.path`` and ``.problem`` hold the parts.
    """

    def __init__(self, path, problem: str | None = None):
        if problem is None:
            self.path, self.problem = None, str(path)
            msg = str(path)
        else:
            self.path, self.problem = str(path), str(problem)
            msg = f"{path}: {problem}"
        super().__init__(msg)


class _Reader:
    """Builds errors for one file, scrubbed of the identifiers found in its dataset."""

    def __init__(self, name: str):
        self.name = name
        self.identifiers: list[str] = []

    def error(self, problem: str, exc: BaseException | None = None) -> DicomError:
        if exc is not None:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            problem = f"{problem} ({type(exc).__name__}: {detail})" if detail else f"{problem} ({type(exc).__name__})"
        return DicomError(self.name, scrub(problem, self.identifiers))


class _LengthTooLarge(Exception):
    """An element length field larger than the whole file (raised before anything is allocated)."""

    def __init__(self, asked: int, offset: int, size: int, what: str = "an element", left: int | None = None):
        super().__init__(asked, offset, size)
        self.asked, self.offset, self.size, self.what, self.left = asked, offset, size, what, left


class _ZeroRun(Exception):
    """Element headers of only zero bytes, over and over: a file padded or overwritten with zeros
    (pydicom would parse each 8 zero bytes as one empty element, for minutes on a large file)."""

    def __init__(self, offset: int):
        super().__init__(offset)
        self.offset = offset


#: Consecutive all-zero 8-byte element headers (2 MB of zeros) after which a file is refused: tag
#: (0000,0000) never appears in a DICOM file, but a few kB of zeros padding the end of one are
#: tolerated, as pydicom tolerates them; 2 MB take it under a second to parse, 4 GB would take an hour.
_MAX_ZERO_HEADERS = 250_000


class _BoundedFile:
    """A read-only binary file for pydicom that refuses, before allocating, to read more bytes
    than the whole file holds: a damaged length field (e.g. 0xFFFFFFF0 = 4 GB) in a 1 kB file
    raises :class:`_LengthTooLarge` instead of a 4 GB allocation. Reads that merely run past the
    end (a truncated file) are left to pydicom, which reports them."""

    def __init__(self, path: Path):
        self._f = open(path, "rb")
        self.name = str(path)
        self.size = os.fstat(self._f.fileno()).st_size
        self._zeros = 0  # consecutive all-zero element headers read

    def read(self, n: int = -1) -> bytes:
        # pydicom's own fixed reads (128-byte preamble, 8-byte tags) may exceed a tiny file: only a
        # read longer than those that is also longer than the file comes from a length field.
        if n is not None and n > self.size and n > 256:
            raise _LengthTooLarge(int(n), self._f.tell(), self.size)
        data = self._f.read(n)
        if n == 8 and data == bytes(8):
            self._zeros += 1
            if self._zeros > _MAX_ZERO_HEADERS:
                raise _ZeroRun(self._f.tell() - 8 * self._zeros)
        elif data:
            self._zeros = 0
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_checking = threading.local()  # set while osteo reads a file: sequence items are checked then


def _checked_sequence_item(fp, is_implicit_VR, is_little_endian, encoding, offset=0):
    """pydicom's ``read_sequence_item``, after checking the item's length field against the bytes
    left (in the file, or in the sequence's own value): a damaged item length is refused, not read
    as if the rest of the file belonged to the item. Only while osteo reads (:func:`_dcmread`)."""
    if getattr(_checking, "size", None) is not None:
        start = fp.tell()
        head = fp.read(8)
        end = fp.seek(0, 2)
        fp.seek(start)
        if len(head) == 8:
            group, elem, length = struct.unpack("<HHL" if is_little_endian else ">HHL", head)
            if (group, elem) == (0xFFFE, 0xE000) and length != 0xFFFFFFFF and length > end - start - 8:
                raise _LengthTooLarge(length, start + offset, _checking.size, what="a sequence item",
                                      left=end - start - 8)
    return _read_sequence_item(fp, is_implicit_VR, is_little_endian, encoding, offset)


_read_sequence_item = pydicom.filereader.read_sequence_item
pydicom.filereader.read_sequence_item = _checked_sequence_item


def _parse_sequences(ds, depth: int = 0) -> None:
    """Parse every sequence now (pydicom parses a sequence of defined length only when it is first
    used), so that :func:`_checked_sequence_item` sees each item's length field. A sequence that
    fails to parse for another reason is left as it was: osteo reads only the tags it needs."""
    if depth > 16:
        return
    for tag in list(ds.keys()):
        try:
            vr = ds.get_item(tag).VR or pydicom.datadict.dictionary_VR(tag)
        except Exception:
            continue
        if vr != "SQ":
            continue
        try:
            items = ds[tag].value
        except _LengthTooLarge:
            raise
        except Exception:
            continue
        for item in items or []:
            _parse_sequences(item, depth + 1)


def _dcmread(path: Path, r: _Reader, **kw):
    """``pydicom.dcmread`` through :class:`_BoundedFile`; a too-large length is a DicomError."""
    try:
        with _BoundedFile(path) as fh:
            _checking.size = fh.size
            try:
                ds = pydicom.dcmread(fh, **kw)
                _parse_sequences(ds)
                return ds
            finally:
                _checking.size = None
    except _ZeroRun as e:
        raise r.error(f"damaged: from byte {e.offset} on, the file holds only zero bytes where DICOM elements "
                      "should be (overwritten or padded with zeros)") from None
    except _LengthTooLarge as e:
        if e.what == "an element":
            raise r.error(
                f"damaged header: an element at byte {e.offset} declares a length of {e.asked} bytes, "
                f"more than the whole file ({e.size} bytes); refused before reading it"
            ) from None
        raise r.error(
            f"damaged header: {e.what} at byte {e.offset} declares a length of {e.asked} bytes, more than the "
            f"{e.left} bytes that remain for it (the whole file has {e.size} bytes); refused before reading it"
        ) from None


def read_header(path, tags: list[str]):
    """The dataset of ``path`` with only ``tags`` read (no pixel data), through the same length
    checks as :func:`read_hu`: a damaged length field is a :class:`DicomError`, never an allocation.
    Files without the DICM preamble are read as they come (``force=True``)."""
    r = _Reader(str(path))
    try:
        return _dcmread(Path(path), r, stop_before_pixels=True, specific_tags=list(tags), force=True)
    except DicomError:
        raise
    except PermissionError as e:
        raise r.error("cannot be read (permission denied)") from e
    except Exception as e:
        raise r.error("not a readable DICOM file", e) from e


def _open(path: Path, r: _Reader):
    """dcmread with the checks that come before it; returns (dataset, note about the file meta)."""
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise r.error("no such file") from e
    except OSError as e:
        raise r.error("cannot be accessed", e) from e
    if path.is_dir():
        raise r.error("is a folder, not a DICOM file")
    if st.st_size == 0:
        raise r.error("empty file (0 bytes), not a DICOM file")
    note = "ok"
    try:
        ds = _dcmread(path, r)
    except DicomError:
        raise
    except InvalidDicomError:
        ds = None
    except PermissionError as e:
        raise r.error("cannot be read (permission denied)") from e
    except Exception as e:  # damaged header, truncated element, ...
        raise r.error("not a readable DICOM file", e) from e
    if ds is None:
        if not _looks_like_header_start(path):  # e.g. a file of zeros: pydicom would walk it 8 bytes at a time
            raise r.error("not a DICOM file (no DICM preamble, and it does not start like a DICOM dataset)")
        try:
            with warnings.catch_warnings():  # pydicom warns about every odd "element" of a non-DICOM file
                warnings.simplefilter("ignore")
                ds = _dcmread(path, r, force=True)
        except DicomError as e:
            if _looks_like_header_start(path):
                raise
            raise r.error("not a DICOM file (no DICM preamble and no valid dataset)") from e
        except Exception as e:
            raise r.error("not a DICOM file (no DICM preamble and no valid dataset)", e) from e
        if not _looks_like_dataset(ds):
            raise r.error("not a DICOM file (no DICM preamble and no valid dataset)")
        has_meta = getattr(ds, "file_meta", None) is not None and ds.file_meta.get("TransferSyntaxUID")
        note = "no DICM preamble (file meta present)" if has_meta else "missing"
    r.identifiers = dataset_identifiers(ds)
    tsuid = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) is not None else None
    if not tsuid:
        enc = getattr(ds, "original_encoding", None)
        implicit, little = enc if enc and None not in enc else (True, True)
        if implicit:
            uid = ImplicitVRLittleEndian
        else:
            uid = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        if getattr(ds, "file_meta", None) is None:
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = uid
        note = f"{note if note == 'missing' else 'no transfer syntax'}: assumed {uid.name}"
    return ds, note


def _looks_like_header_start(path: Path) -> bool:
    """True if a file without the DICM preamble starts like a dataset: the tag of a group from
    0x0002 to 0x7FE0 (even: not a private group; little or big endian), then two upper-case
    letters (an explicit VR) or a length that fits the file (implicit VR). Preamble-less files
    written by any tool start so, whichever group comes first; zeros and most random bytes do not,
    so they are refused at once instead of being parsed as a million empty elements."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8:
        return False
    size = path.stat().st_size
    for order in ("little", "big"):
        group = int.from_bytes(head[0:2], order)
        if group % 2 or not 0x0002 <= group <= 0x7FE0:
            continue
        vr = head[4:6]
        if vr.isalpha() and vr.isupper() or int.from_bytes(head[4:8], order) <= size:
            return True
    return False


def _looks_like_dataset(ds) -> bool:
    """A force-read dataset is accepted only if it holds tags a DICOM image has (random bytes parse
    into one or two nonsense elements)."""
    try:
        keys = set(ds.keys())
    except Exception:
        return False
    wanted = {0x00080016, 0x00080060, 0x7FE00010, 0x00280010, 0x00280011, 0x0020000D, 0x0020000E}
    return len(keys & wanted) >= 2


def _fg_item(ds, frame: int, seq: str):
    """The first item of functional-group sequence ``seq`` for ``frame``: per-frame first, then shared."""
    for groups, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        fg = ds.get(groups)
        if fg is None or len(fg) <= idx:
            continue
        item = fg[idx].get(seq)
        if item is not None and len(item) > 0:
            return item[0]
    return None


def _attr(ds, frame: int, seq: str, keyword: str):
    """``keyword`` from the functional groups (enhanced CT), else from the top level; None if absent."""
    item = _fg_item(ds, frame, seq)
    if item is not None and item.get(keyword) is not None:
        return item.get(keyword), "functional groups"
    val = ds.get(keyword)
    return (val, "tags") if val is not None else (None, None)


def _rescale_elem(ds, frame: int, keyword: str, r: _Reader):
    """(present, value, source) of a rescale tag: the functional groups' item first (enhanced CT),
    else the top level. ``present`` is True for a tag that is there even with an empty value."""
    item = _fg_item(ds, frame, "PixelValueTransformationSequence")
    for where, holder in (("functional groups", item), ("tags", ds)):
        if holder is not None and keyword in holder:
            raw = holder.get_item(keyword)
            if isinstance(raw, RawDataElement) and raw.VR in (None, "DS", "UN") and isinstance(raw.value, bytes):
                # the bytes as stored: pydicom's conversion strips tabs and other blanks and
                # accepts what Python's float() accepts; the rules here are DICOM's
                try:
                    return True, raw.value.decode("ascii"), where
                except UnicodeDecodeError:
                    raise r.error(f"{keyword} {raw.value[:32]!r} is not a number (non-ASCII characters)") from None
            try:
                return True, holder[keyword].value, where
            except Exception as e:  # pydicom could not convert the stored bytes
                raise r.error(f"{keyword} cannot be read as a number", e) from e
    return False, None, None


# A DICOM decimal string (PS3.5 6.2, DS): optional sign, digits with an optional point, optional
# exponent; spaces around it (and NUL padding after it) are allowed. ASCII digits only: no decimal
# comma, no "_", no nan/inf words, no tabs or other blanks, no digits of other scripts (Python's
# float() takes all of these).
_DS_RE = re.compile(r" *[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)? *\x00*")


def _rescale_number(value, keyword: str, r: _Reader) -> float:
    """The one finite number a present rescale tag must hold; anything else is a DicomError that
    names the tag and shows its value (never replaced by a default)."""
    if value is None or (isinstance(value, (str, bytes)) and not value.strip(" \x00" if isinstance(value, str) else b" \x00")):
        raise r.error(f"{keyword} is present but empty: expected one number")
    if isinstance(value, str) and "\\" in value:  # the stored bytes of a multi-valued DS
        value = value.split("\\")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        shown = "\\".join(str(v).strip(" \x00") for v in value)
        raise r.error(f"{keyword} holds {len(value)} values ({shown!r}): expected one number")
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise r.error(f"{keyword} {value[:32]!r} is not a number") from None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, str):
        text = getattr(value, "original_string", None) or repr(float(value))
    else:
        text = str(value)
    if isinstance(value, str) or getattr(value, "original_string", None) is not None:
        if not _DS_RE.fullmatch(text):
            hint = " (a decimal comma? DICOM writes a point)" if re.fullmatch(r"\s*[+-]?\d+,\d+\s*", text) else ""
            raise r.error(f"{keyword} {text.strip(' ')!r} is not a number{hint}")
    number = float(text.strip(" \x00")) if isinstance(value, str) else float(value)
    if not np.isfinite(number):
        raise r.error(f"{keyword} {text.strip()!r} is not a finite number")
    if keyword == "RescaleSlope" and number == 0:
        raise r.error("RescaleSlope is 0: every pixel would get the same HU")
    if keyword == "RescaleSlope" and number < 0:
        raise r.error(f"RescaleSlope {text.strip(' ')} is negative: bone would come out darker than air "
                      "(a CT slope is positive)")
    return number


def _positive_numbers(value, n: int):
    """``n`` positive finite numbers as a tuple, else None (absent, another count, text, 0, NaN):
    a damaged PixelSpacing or SliceThickness is reported as unknown, never as a wrong number."""
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
    numbers = [_float_or_none(v) for v in items]
    if len(numbers) != n or not all(x is not None and np.isfinite(x) and x > 0 for x in numbers):
        return None
    return tuple(numbers)


def _float_or_none(v):
    try:
        return None if v is None or v == "" else float(v)
    except (TypeError, ValueError):
        return None


def _install_hint(tsuid: UID, decoder) -> list[str]:
    """``pip install`` arguments, one per alternative, that would give a decoder for ``tsuid``: from
    pydicom's list of missing plugin dependencies, completed by our own table."""
    options: list[str] = []
    for line in getattr(decoder, "missing_dependencies", []) or []:
        _, _, req = line.partition("requires")
        names = []
        for requirement in re.split(r"\band\b|,", req):
            name = re.split(r"[<>=!~ ]", requirement.strip(), maxsplit=1)[0]
            if name and name != "numpy":
                names.append(_PYPI_NAME.get(name, name))
        if names and " ".join(names) not in options:
            options.append(" ".join(names))
    for pkg in _FALLBACK_HINTS.get(str(tsuid), []):
        if not any(pkg in o.split() for o in options):
            options.append(pkg)
    return sorted(options, key=lambda o: "gdcm" in o)  # pip-installable wheels first, gdcm last


def _check_decoder(ds, r: _Reader) -> None:
    tsuid = UID(ds.file_meta.TransferSyntaxUID)
    try:
        decoder = get_decoder(tsuid)
    except NotImplementedError as e:
        raise r.error(f"transfer syntax {tsuid.name} ({tsuid}) is not supported by pydicom") from e
    except Exception as e:
        raise r.error(f"unknown transfer syntax {tsuid}") from e
    if not decoder.is_available:
        options = _install_hint(tsuid, decoder)
        how = " or ".join(f"'pip install {o}'" for o in options) if options else "a pydicom pixel-data plugin"
        raise r.error(
            f"pixel data compressed as {tsuid.name} ({tsuid}) and no decoder for it is installed: "
            f"install one with {how}"
        )


def _raw_native(ds, frame: int) -> np.ndarray | None:
    """One frame's stored values with every bit of BitsAllocated, before pydicom masks or sign-extends
    the bits above BitsStored (uncompressed grey data of 8, 16 or 32 bits only; else None)."""
    tsuid = UID(ds.file_meta.TransferSyntaxUID)
    data = ds.get("PixelData")
    if tsuid.is_encapsulated or not isinstance(data, (bytes, bytearray)):
        return None
    try:
        rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    frame_bytes = rows * cols * bits // 8
    if bits not in (8, 16, 32) or spp != 1 or len(data) < (frame + 1) * frame_bytes:
        return None
    dtype = np.dtype(f"u{bits // 8}").newbyteorder("<" if tsuid.is_little_endian else ">")
    return np.frombuffer(data, dtype=dtype, count=rows * cols, offset=frame * frame_bytes).reshape(rows, cols)


def _check_native_pixel_data(ds, frame: int, n_frames: int, r: _Reader, arr=None) -> None:
    """For uncompressed pixel data, two checks pydicom leaves to the reader:

    * the data hold no more than Rows x Columns x SamplesPerPixel x BitsAllocated x frames (give or
      take the padding to an even length and a few trailing bytes): at least one whole row more
      means that Rows, Columns, BitsAllocated or NumberOfFrames is wrong, and the image would be
      read scrambled or cut;
    * the bits above BitsStored (only once ``arr``, the decoded frame, is given). DICOM lets a
      writer leave anything there (PS3.5 8.1.1: zeros, sign extension, an old overlay plane), and
      pydicom masks them off (unsigned) or sign-extends (signed), as it should. Refused are only
      the patterns that mean the declared BitsStored or PixelRepresentation is wrong, so that
      masking would change real values: for unsigned data, values that are exactly sign-extended
      negatives (a signed slice declared unsigned: -1024 would read as 3072), or high bits set in
      more than a tenth of the pixels (more than any overlay plane; BitsStored too small); for
      signed data, negatives written with sign extension beside others written without it (values
      beyond BitsStored's range). Padding pixels (PixelPaddingValue, compared with the whole stored
      value) are left out."""
    tsuid = UID(ds.file_meta.TransferSyntaxUID)
    data = ds.get("PixelData")
    if tsuid.is_encapsulated or not isinstance(data, (bytes, bytearray)):
        return
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return  # a missing or damaged image tag: pydicom's decoder names it
    row_bytes = cols * spp * bits // 8
    expected = (rows * cols * spp * bits * n_frames + 7) // 8
    if row_bytes > 0 and len(data) - expected >= row_bytes:
        raise r.error(f"pixel data holds {len(data)} bytes, {len(data) - expected} more than Rows x Columns x "
                      f"BitsAllocated ({rows} x {cols} x {bits} bits, {n_frames} frame(s): {expected} bytes) need: "
                      "Rows, Columns, BitsAllocated or NumberOfFrames is wrong")
    if arr is None:
        return
    stored = int(ds.get("BitsStored", bits) or bits)
    raw = _raw_native(ds, frame)
    if raw is None or not 0 < stored < bits:
        return
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    pad = _padding_mask(ds, _whole_values(raw, signed))
    raw = raw.astype(np.uint64)[~pad] if pad is not None else raw.astype(np.uint64).ravel()
    if raw.size == 0:
        return
    high = raw >> stored  # the bits above BitsStored
    ones = (1 << (bits - stored)) - 1
    negative = ((raw >> (stored - 1)) & 1) == 1  # the top stored bit: the sign, if the data are signed
    extended = high == np.where(negative, ones, 0)  # what sign extension would have written
    what = None
    if not signed and extended.all() and (negative & (high == ones)).any():
        what = (f"{int((high == ones).sum())} values are negative numbers in two's complement (their bits above "
                f"BitsStored {stored} copy its sign bit), but PixelRepresentation says unsigned")
    elif not signed and (high != 0).mean() > 0.1:
        what = (f"{int((high != 0).sum())} of {raw.size} values have bits set above BitsStored {stored}, more than "
                "an overlay plane would: BitsStored is too small for these values")
    elif signed and (negative & (high == ones)).any() and (negative & (high == 0)).any():
        what = (f"{int((negative & (high == 0)).sum())} values need more than BitsStored {stored} bits (signed), "
                "while other negatives are written with their sign extended")
    if what:
        raise r.error(f"{what}; reading them as declared (BitsAllocated {bits}) would change their values: "
                      "BitsStored or PixelRepresentation does not match the pixel data")


def _whole_values(raw: np.ndarray, signed: bool) -> np.ndarray:
    """Stored values read with every bit of BitsAllocated (two's complement when signed)."""
    return raw.astype(raw.dtype.newbyteorder("=")).view(f"i{raw.dtype.itemsize}") if signed else raw


def _stored_pixels(ds, frame: int | None, n_frames: int, r: _Reader) -> np.ndarray:
    _check_decoder(ds, r)
    if not ds.get("PixelData"):
        raise r.error("PixelData is empty (0 bytes): no image in this file")
    _check_native_pixel_data(ds, frame or 0, n_frames, r)  # before pydicom guesses frames from the length
    try:
        if n_frames > 1:
            arr = pixel_array(ds, index=frame)
        else:
            arr = ds.pixel_array
    except Exception as e:
        msg = str(e)
        if "less than expected" in msg or "truncat" in msg.lower() or isinstance(e, EOFError):
            raise r.error("truncated pixel data", e) from e
        tsuid = UID(ds.file_meta.TransferSyntaxUID)
        raise r.error(f"pixel data could not be decoded ({tsuid.name})", e) from e
    arr = np.asarray(arr)
    if arr.ndim == 3 and n_frames == 1 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise r.error(f"pixel data has shape {arr.shape}, expected one grey 2-D slice")
    _check_native_pixel_data(ds, frame or 0, n_frames, r, arr)
    return arr


def _padding_mask(ds, stored: np.ndarray) -> np.ndarray | None:
    """Boolean mask of padded pixels (PixelPaddingValue[, PixelPaddingRangeLimit], stored units)."""
    pv = ds.get("PixelPaddingValue")
    if pv is None:
        return None
    bits = int(ds.get("BitsAllocated", stored.dtype.itemsize * 8) or stored.dtype.itemsize * 8)

    def to_stored(v):
        # US/SS ambiguity: a padding value read unsigned for signed pixels (or the reverse).
        v = int(v)
        if np.issubdtype(stored.dtype, np.signedinteger) and v > np.iinfo(stored.dtype).max:
            v -= 1 << bits
        elif np.issubdtype(stored.dtype, np.unsignedinteger) and v < 0:
            v += 1 << bits
        return v

    lo = to_stored(pv)
    lim = ds.get("PixelPaddingRangeLimit")
    if lim is None:
        return stored == lo
    hi = to_stored(lim)
    lo, hi = min(lo, hi), max(lo, hi)
    return (stored >= lo) & (stored <= hi)


def _orientation(iop, r: _Reader):
    """(transpose, flip_rows, flip_cols, tilt in degrees) that bring an axial slice to canonical."""
    try:
        v = np.array([float(x) for x in iop], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise r.error(f"invalid ImageOrientationPatient {list(iop)!r}") from e
    if v.shape != (6,) or not np.all(np.isfinite(v)):
        raise r.error(f"invalid ImageOrientationPatient {list(iop)!r} (need 6 numbers)")
    row, col = v[:3], v[3:]
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(col) < 1e-6:
        raise r.error(f"invalid ImageOrientationPatient {list(iop)!r} (zero direction)")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    if np.linalg.norm(normal) < 1e-3:
        raise r.error(f"invalid ImageOrientationPatient {list(iop)!r} (row and column directions parallel)")
    normal /= np.linalg.norm(normal)
    plane = ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]
    ar, ac = int(np.argmax(np.abs(row))), int(np.argmax(np.abs(col)))
    if plane != "axial" or {ar, ac} != {0, 1}:
        shown = "[" + ", ".join(f"{x:g}" for x in v) + "]"
        raise r.error(f"ImageOrientationPatient {shown} is a {plane} (or oblique) slice, not axial: osteo reads axial CT slices")
    transpose = ar == 1
    if transpose:
        row, col = col, row
    tilt = float(np.degrees(np.arccos(min(1.0, abs(normal[2])))))
    return transpose, bool(col[1] < 0), bool(row[0] < 0), tilt


def read_hu(path, frame: int | None = None):
    """Read one CT slice as HU: returns ``(hu, meta)``.

    ``hu`` is a float32 2-D array in Hounsfield units in canonical axial orientation; ``meta`` holds
    ``pixel_spacing`` ((row, col) mm of the returned array, or None when absent or not two positive numbers), ``patient_id`` (as stored:
    pseudonymise before it goes anywhere), ``modality``, ``slice_thickness``, ``kvp``, ``rows``,
    ``cols`` (of the returned array), ``transfer_syntax`` (name), ``photometric``, ``flipped``,
    ``padding_masked``, and ``rescale_slope``, ``rescale_intercept``, ``rescale_source``,
    ``file_meta``, ``sop_class``, ``frames``, ``frame``, ``tilt_deg``, ``orientation``.
    ``frame`` picks one frame of a multi-frame file (0-based); a multi-frame file without it is
    refused. See the module docstring for the rules; every failure is a :class:`DicomError`.
    """
    name = str(path)
    r = _Reader(name)
    ds, file_meta_note = _open(Path(path), r)
    try:
        return _to_hu(ds, frame, file_meta_note, r)
    except DicomError:
        raise
    except Exception as e:  # anything pydicom or a damaged value throws that we did not foresee
        raise r.error("could not be read as a CT slice", e) from e


def _check_ct_image(ds, r: _Reader):
    """Refuse anything but a grey CT image with integer pixel data; returns (SOP class UID,
    modality or None, photometric interpretation or None)."""
    sop = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "").strip().upper() or None
    if modality is None and sop not in CT_SOP_CLASSES:
        raise r.error("no Modality tag and not a CT SOP class: expected CT")
    if modality is not None and modality != "CT":
        raise r.error(f"modality {modality}, expected CT")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise r.error("no pixel data in this file (not an image)")
    if "PixelData" not in ds:
        raise r.error("float pixel data is not CT stored values; expected integer PixelData")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper() or None
    if photometric not in (None, "MONOCHROME1", "MONOCHROME2"):
        raise r.error(f"photometric interpretation {photometric}: not a grey CT image")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp != 1:
        raise r.error(f"{spp} samples per pixel: not a grey CT image")
    return sop, modality, photometric


def _frame_index(ds, frame, r: _Reader) -> tuple[int, int]:
    """(index of the frame to read, number of frames): a multi-frame file needs an explicit ``frame``."""
    raw = ds.get("NumberOfFrames")
    n_frames = _float_or_none(raw)
    if raw not in (None, "") and (n_frames is None or n_frames != int(n_frames) or n_frames < 0):
        shown = "\\".join(map(str, raw)) if isinstance(raw, (list, tuple)) or type(raw).__name__ == "MultiValue" else raw
        raise r.error(f"NumberOfFrames {str(shown)!r} is not a count of frames (a whole number)")
    n_frames = int(n_frames or 1)
    if frame is None:
        if n_frames > 1:
            raise r.error(f"{n_frames} frames: osteo reads single slices; split the volume (or pass frame=)")
        return 0, n_frames
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)):
        raise r.error(f"frame must be an int, got {frame!r}")
    idx = int(frame)
    if not 0 <= idx < n_frames:
        raise r.error(f"frame {idx} out of range: the file has {n_frames} frame(s)")
    return idx, n_frames


def _orient(hu: np.ndarray, iop, spacing, r: _Reader):
    """Bring an axial slice to the canonical orientation (:func:`_orientation`) given its
    ImageOrientationPatient ``iop``; returns (image, pixel spacing, what was flipped, gantry tilt in
    degrees or None)."""
    flipped: list[str] = []
    tilt = None
    if iop is not None:
        transpose, flip_rows, flip_cols, tilt = _orientation(iop, r)
        if transpose:
            hu = hu.T
            spacing = (spacing[1], spacing[0]) if spacing else None
            flipped.append("transpose")
        if flip_rows:
            hu = hu[::-1, :]
            flipped.append("rows")
        if flip_cols:
            hu = hu[:, ::-1]
            flipped.append("cols")
    return np.ascontiguousarray(hu), spacing, flipped, tilt


def _to_hu(ds, frame, file_meta_note, r: _Reader):
    """HU image (float32, standard orientation) and metadata of one frame of a checked CT file."""
    sop, modality, photometric = _check_ct_image(ds, r)
    idx, n_frames = _frame_index(ds, frame, r)
    stored = _stored_pixels(ds, idx, n_frames, r)
    pad = _padding_mask(ds, stored)
    raw = _raw_native(ds, idx or 0)
    if pad is not None and raw is not None and raw.shape == stored.shape:
        # padding written with bits above BitsStored (0xFFFF in 12 bits stored) is masked by pydicom
        # to a value that no longer equals PixelPaddingValue: compare the whole stored values too
        pad |= _padding_mask(ds, _whole_values(raw, int(ds.get("PixelRepresentation", 0) or 0) == 1))
    n_pad = int(pad.sum()) if pad is not None else 0

    slope, icpt, rescale_source = _rescale(ds, idx, stored, pad, r)
    rtype = _rescale_type(ds, idx, r)
    hu = stored.astype(np.float64) * slope + icpt
    _check_hu_range(ds, hu, pad, slope, icpt, stored, r)
    if pad is not None:
        hu[pad] = _AIR_HU
    hu = hu.astype(np.float32)

    iop, _ = _attr(ds, idx, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing, _ = _attr(ds, idx, "PixelMeasuresSequence", "PixelSpacing")
    thick, _ = _attr(ds, idx, "PixelMeasuresSequence", "SliceThickness")
    spacing = _positive_numbers(spacing, 2)
    hu, spacing, flipped, tilt = _orient(hu, iop, spacing, r)

    pid = ds.get("PatientID")
    meta = {
        "pixel_spacing": spacing,
        "patient_id": str(pid).strip() if pid is not None and str(pid).strip() else None,
        "modality": modality or "CT",
        "slice_thickness": (_positive_numbers(thick, 1) or (None,))[0],
        "kvp": (_positive_numbers(ds.get("KVP"), 1) or (None,))[0],
        "rows": int(hu.shape[0]),
        "cols": int(hu.shape[1]),
        "transfer_syntax": UID(ds.file_meta.TransferSyntaxUID).name,
        "photometric": photometric,
        "flipped": tuple(flipped),
        "padding_masked": n_pad,
        "rescale_slope": float(slope),
        "rescale_intercept": float(icpt),
        "rescale_source": rescale_source,
        "rescale_type": rtype,
        "file_meta": file_meta_note,
        "sop_class": CT_SOP_CLASSES.get(sop, sop or None),
        "frames": n_frames,
        "frame": idx,
        "orientation": tuple(float(x) for x in iop) if iop is not None else None,
        "tilt_deg": tilt,
    }
    return hu, meta


#: RescaleType values that mean Hounsfield units ("US", unspecified, is what many CT writers put).
_HU_RESCALE_TYPES = ("HU", "US")

#: No CT value lies this far from 0: extended-scale CT ends near 31,000 HU (Siemens 30,710, GE
#: 31,743), and padding outside the field of view near -32,768 - 1024. Signed 16-bit pixels read as
#: unsigned (PixelRepresentation 0 for signed data) turn air into about +64,500 and land beyond it.
_MAX_ABS_HU = 40_000.0

#: Air to cortical bone: the least span of HU a CT's stored values must be able to cover.
_MIN_HU_SPAN = 1000.0


def _rescale_type(ds, idx: int, r: _Reader):
    """RescaleType (None if absent): HU or US (unspecified) are taken as HU; any other unit (OD,
    MGML, ED, Z_EFF, HU_MOD, ...) is refused, since the pixels are then not Hounsfield units."""
    rtype, _ = _attr(ds, idx, "PixelValueTransformationSequence", "RescaleType")
    if rtype is None:
        return None
    text = str(rtype).strip()
    if text.upper() not in _HU_RESCALE_TYPES + ("",):
        raise r.error(f"RescaleType {text!r}: the rescaled values are not Hounsfield units "
                      f"(expected {' or '.join(_HU_RESCALE_TYPES)}); osteo reads CT in HU")
    return text


def _check_hu_range(ds, hu: np.ndarray, pad, slope: float, icpt: float, stored: np.ndarray, r: _Reader) -> None:
    """Refuse a rescale that cannot give CT values: HU beyond +-100000 (or beyond float range), or a
    slope so small that the stored values could never span air to bone (1000 HU)."""
    bits = int(_float_or_none(ds.get("BitsStored")) or stored.dtype.itemsize * 8)
    reach = slope * (2.0 ** max(1, min(bits, 32)) - 1)
    if reach < _MIN_HU_SPAN:
        raise r.error(f"RescaleSlope {slope:g}: the {bits}-bit stored values can span at most {reach:.3g} HU, "
                      f"less than the {_MIN_HU_SPAN:g} HU from air to bone; the rescale is damaged")
    values = hu[~pad] if pad is not None else hu
    if values.size == 0:
        raise r.error(f"every pixel is padding (PixelPaddingValue {ds.get('PixelPaddingValue')}): no image in this file")
    lo, hi = float(values.min()), float(values.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or max(abs(lo), abs(hi)) > _MAX_ABS_HU:
        raise r.error(f"RescaleSlope {slope:g} and RescaleIntercept {icpt:g} give values from {lo:.6g} to {hi:.6g}, "
                      f"not HU (CT values lie within +-{_MAX_ABS_HU:g}); the rescale, or PixelRepresentation "
                      f"({'signed' if int(ds.get('PixelRepresentation', 0) or 0) == 1 else 'unsigned'}), is damaged")
    if lo == hi:
        raise r.error(f"every pixel{' that is not padding' if pad is not None and pad.any() else ''} holds the same "
                      f"value ({lo:g} HU): a blank slice, not a CT image")


def _rescale(ds, idx: int, stored: np.ndarray, pad, r: _Reader):
    """(slope, intercept, source) of one frame; see the module docstring for the rules."""
    has_s, raw_s, src_s = _rescale_elem(ds, idx, "RescaleSlope", r)
    has_i, raw_i, _ = _rescale_elem(ds, idx, "RescaleIntercept", r)
    slope = _rescale_number(raw_s, "RescaleSlope", r) if has_s else None
    icpt = _rescale_number(raw_i, "RescaleIntercept", r) if has_i else None
    if has_s and has_i:
        return slope, icpt, src_s
    missing = [k for k, has in (("RescaleSlope", has_s), ("RescaleIntercept", has_i)) if not has]
    slope = 1.0 if slope is None else slope
    icpt = 0.0 if icpt is None else icpt
    values = stored[~pad] if pad is not None else stored
    lo = float(values.min()) * slope + icpt if values.size else 0.0
    hi = float(values.max()) * slope + icpt if values.size else 0.0
    lo, hi = min(lo, hi), max(lo, hi)
    assumed = " and ".join(f"{k} {1 if k == 'RescaleSlope' else 0}" for k in missing)
    if -1100 <= lo < 0:
        if len(missing) == 2:
            return slope, icpt, "absent: values taken as HU"
        return slope, icpt, f"{missing[0]} absent: {assumed} assumed (values look like HU)"
    present = [f"{k} {v:g}" for k, v, has in (("RescaleSlope", slope, has_s), ("RescaleIntercept", icpt, has_i)) if has]
    given = f" ({', '.join(present)} present)" if present else ""
    raise r.error(
        f"{'/'.join(missing)} missing{given}, and with {assumed} the values (min {lo:g}, max {hi:g}) "
        f"do not look like HU (expected a lowest value in [-1100, 0)): add the missing rescale tag"
    )


def _is_candidate(p: Path) -> bool:
    if p.name.upper() == "DICOMDIR":
        return False
    suf = p.suffix.lower()
    return suf == "" or suf in DICOM_SUFFIXES or suf[1:].isdigit()


def iter_dicom_files(folder) -> list[Path]:
    """Sorted list of the DICOM candidates under ``folder``, recursively: files with a DICOM suffix
    (:data:`DICOM_SUFFIXES`), without a suffix, or with a numeric one (UID-named files); hidden files
    and folders (``.name``) and DICOMDIR are skipped. Nothing is opened here."""
    root = Path(folder)
    if not root.is_dir():
        raise DicomError(str(folder), "no such folder" if not root.exists() else "not a folder")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if fn.startswith("."):
                continue
            p = Path(dirpath) / fn
            if _is_candidate(p):
                out.append(p)
    return sorted(out)
