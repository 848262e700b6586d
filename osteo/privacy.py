"""Patient privacy: pseudonyms for patient ids, the DICOM tags that must never reach outputs, and a
scrubber for messages (design section 6: "patient names and other identifiers never reach notebook
outputs, logs or result files"). The paper says nothing about this; it is ours.

Pseudonyms are ``"P-" + 12 hex digits`` of a salted SHA-256 of the patient id. The salt is, in
order of precedence, the ``salt`` argument, the environment variable ``OSTEO_SALT``, or a random
per-installation salt created once in ``~/.cache/osteo/salt`` (``$XDG_CACHE_HOME/osteo/salt`` when
that variable is set; file mode 0600). The same salt always gives the same pseudonym, so a
train/test split computed from pseudonyms is reproducible on one installation; set ``OSTEO_SALT``
(or pass ``salt``) to get the same pseudonyms -- hence the same splits -- on several machines. Keep
the salt secret: with it, a known patient id can be checked against a pseudonym.

Every patient id read from a DICOM header is pseudonymised, except in files that
:func:`is_synthetic_dataset` proves were written by the kit's synthetic generator: their
``"SYN..."`` ids identify nobody and are kept, so synthetic splits are the same everywhere. An id
that merely *looks* synthetic (a hospital id that happens to start with ``SYN``) or looks like one
of our pseudonyms is pseudonymised like any other: the decision rests on what the generator writes
into the file (Manufacturer, PatientName, PatientIdentityRemoved, UID root), never on the id alone.
Result files follow the same rule: a ``SYN`` id from a CSV manifest is kept only when the manifest
names a version of the generator (its ``synthetic_version`` column, which the generator writes).
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path

__all__ = [
    "IDENTIFYING_TAGS",
    "dataset_identifiers",
    "get_salt",
    "is_pseudonym",
    "is_synthetic_dataset",
    "is_synthetic_id",
    "pseudonymize",
    "salt_path",
    "scrub",
]

#: DICOM keywords whose values identify a patient (or narrow one down) and must never be written to
#: notebook outputs, logs, error messages or result files. Based on the PS3.15 basic profile.
IDENTIFYING_TAGS = [
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MedicalRecordLocator",
    "MilitaryRank",
    "EthnicGroup",
    "PatientComments",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "StationName",
    "DeviceSerialNumber",
]

# Identifiers shorter than this are not redacted: a StudyID "1" would otherwise wipe every "1" from a
# message, and so short a value identifies nobody.
_MIN_IDENT_LEN = 3

_PSEUDONYM_RE = re.compile(r"^P-[0-9a-f]{12}$")
_SYNTHETIC_ID_RE = re.compile(r"^SYN[0-9]+$")


def salt_path() -> Path:
    """Where the per-installation salt lives: ``$XDG_CACHE_HOME/osteo/salt`` or ``~/.cache/osteo/salt``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "osteo" / "salt"


def get_salt(salt: str | None = None) -> str:
    """The salt to use: ``salt`` if given, else ``$OSTEO_SALT``, else the per-installation salt file
    (created once, with 32 random bytes in hex, mode 0600)."""
    if salt is not None:
        return str(salt)
    env = os.environ.get("OSTEO_SALT")
    if env:
        return env
    path = salt_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    value = path.read_text().strip()
    if not value:
        raise RuntimeError(f"{path}: the osteo salt file is empty; delete it to create a new one")
    return value


def is_synthetic_id(patient_id) -> bool:
    """True for an id in the synthetic generator's format (``"SYN"`` + digits). The format alone
    does not make an id safe to keep (a hospital id can start with SYN): see :func:`is_synthetic_dataset`."""
    return isinstance(patient_id, str) and bool(_SYNTHETIC_ID_RE.match(patient_id))


#: The Manufacturer the kit's synthetic generator writes into every file.
SYNTHETIC_MANUFACTURER = "osteo-kit synthetic phantom"

#: The DICOM tags :func:`is_synthetic_dataset` reads (pass them to ``dcmread(specific_tags=...)``).
SYNTHETIC_MARKER_TAGS = ["PatientID", "PatientName", "Manufacturer", "PatientIdentityRemoved", "StudyInstanceUID"]


def is_synthetic_dataset(ds) -> bool:
    """True only for a file written by :func:`osteo.synthesize`: all at once, Manufacturer
    ``"osteo-kit synthetic phantom"``, PatientIdentityRemoved ``YES``, PatientID ``"SYN"`` + digits,
    PatientName ``"Synthetic^" + PatientID`` and a StudyInstanceUID in the UUID-derived root
    ``2.25.`` the generator uses. A hospital file carries none of these by accident; its ids are
    always pseudonymised. Never raises: an unreadable value gives False."""
    try:
        pid = str(ds.get("PatientID", "") or "").strip()
        return (
            str(ds.get("Manufacturer", "") or "").strip() == SYNTHETIC_MANUFACTURER
            and str(ds.get("PatientIdentityRemoved", "") or "").strip().upper() == "YES"
            and is_synthetic_id(pid)
            and str(ds.get("PatientName", "") or "").strip() == f"Synthetic^{pid}"
            and str(ds.get("StudyInstanceUID", "") or "").startswith("2.25.")
        )
    except Exception:
        return False


def is_pseudonym(patient_id) -> bool:
    """True for an id already in :func:`pseudonymize`'s format (``"P-"`` + 12 lower-case hex)."""
    return isinstance(patient_id, str) and bool(_PSEUDONYM_RE.match(patient_id))


def pseudonymize(patient_id: str, salt: str | None = None) -> str:
    """``"P-"`` + the first 12 hex digits of SHA-256(salt, NUL, patient id stripped of blanks).

    Deterministic for a given salt (see the module docstring for where the salt comes from).
    Raises ``ValueError`` for an empty id (an empty id would merge unrelated patients).
    """
    pid = "" if patient_id is None else str(patient_id).strip()
    if not pid:
        raise ValueError("empty patient id: cannot pseudonymize")
    digest = hashlib.sha256((get_salt(salt) + "\x00" + pid).encode("utf-8")).hexdigest()
    return "P-" + digest[:12]


def dataset_identifiers(ds) -> list[str]:
    """Every identifying string in a pydicom dataset: the values of :data:`IDENTIFYING_TAGS` found in
    it (person names also as their components, e.g. ``"DOE^JOHN"`` gives ``"DOE"``, ``"JOHN"`` and
    ``"JOHN DOE"``), to pass to :func:`scrub`. Never raises: an unreadable value is skipped."""
    out: set[str] = set()
    for kw in IDENTIFYING_TAGS:
        try:
            elem = ds.get(kw)
        except Exception:  # a damaged value must not stop us from scrubbing the others
            continue
        if elem is None:
            continue
        values = elem if isinstance(elem, (list, tuple)) or type(elem).__name__ == "MultiValue" else [elem]
        for v in values:
            if type(v).__name__ == "Dataset" or type(v).__name__ == "Sequence":
                continue
            try:
                s = str(v).strip()
            except Exception:
                continue
            if not s:
                continue
            out.add(s)
            if "^" in s:  # DICOM person name: family^given^middle^prefix^suffix
                parts = [p.strip() for p in s.split("^") if p.strip()]
                out.update(parts)
                if len(parts) >= 2:
                    out.add(f"{parts[1]} {parts[0]}")
                    out.add(f"{parts[0]} {parts[1]}")
                    out.add(f"{parts[0]}, {parts[1]}")
    return sorted(out)


def scrub(text: str, identifiers) -> str:
    """Replace every occurrence (case-insensitive) of each identifier string in ``text`` by
    ``"[redacted]"``; longer identifiers first, so ``"JOHN DOE"`` goes whole. Identifiers shorter
    than 3 characters are ignored (redacting every "1" would make messages unreadable, and such
    a short value identifies nobody)."""
    text = str(text)
    idents = sorted({str(i).strip() for i in identifiers if i is not None}, key=len, reverse=True)
    for ident in idents:
        if len(ident) < _MIN_IDENT_LEN:
            continue
        text = re.sub(re.escape(ident), "[redacted]", text, flags=re.IGNORECASE)
    return text
