"""De-identification at the site: DICOM headers (PS3.15 basic profile, keep-list) and report text.

A keep-list rather than a remove-list: an attribute we did not think of (a private tag, a vendor
comment holding the patient's name) is dropped by default instead of leaking. Identifiers that the
pipeline must still join on (patient, study, UIDs) are replaced by keyed hashes with a site secret,
so the mapping is consistent inside a site and useless to anyone without the secret.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

SECRET_BYTES: Final[int] = 32

# Attributes that carry no identity and that image handling needs (PS3.15 Table E.1-1 marks none
# of them for removal under the basic profile, or marks them "retain" under the patient
# characteristics option: sex and age).
KEEP_ATTRIBUTES: Final[tuple[str, ...]] = (
    "SOPClassUID",
    "Modality",
    "ImageType",
    "ViewPosition",
    "BodyPartExamined",
    "PatientOrientation",
    "ImageLaterality",
    "Laterality",
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "PresentationLUTShape",
    "LossyImageCompression",
    "BurnedInAnnotation",
    "PatientSex",
    "PixelData",
    # Geometry and phase of CT/MR slices: what orders a series into a volume (series.py) and
    # tells a second phase or a cine from a stack of slices.
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceThickness",
    "SpacingBetweenSlices",
    "SliceLocation",
    "InstanceNumber",
    "AcquisitionNumber",
    "TemporalPositionIndex",
    "TriggerTime",
    "DiffusionBValue",
    "FrameIncrementPointer",
)

# Enhanced CT/MR objects keep their per-frame and shared geometry, rebuilt from this keep-list:
# a functional group item keeps only these macros, each macro only these attributes. Anything
# else in a group (a private tag, a referenced image, a frame comment, an acquisition time) is
# dropped, as it would be at the top level.
FUNCTIONAL_GROUPS: Final[tuple[str, ...]] = (
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
)
GEOMETRY_MACROS: Final[dict[str, tuple[str, ...]]] = {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "FrameContentSequence": (
        "StackID",
        "InStackPositionNumber",
        "TemporalPositionIndex",
        "FrameAcquisitionNumber",
    ),
    "PixelValueTransformationSequence": ("RescaleIntercept", "RescaleSlope", "RescaleType"),
}

# UIDs that identify an instance, series, study or frame of reference: replaced, consistently.
REMAP_UIDS: Final[tuple[str, ...]] = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
)

# The header attributes whose values are looked for (and removed) in report text.
PHI_TEXT_ATTRIBUTES: Final[tuple[str, ...]] = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "RequestingPhysician",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "StudyID",
    "DeviceSerialNumber",
)
PHI_DATE_ATTRIBUTES: Final[tuple[str, ...]] = ("PatientBirthDate", "StudyDate", "AcquisitionDate")

DEID_METHOD: Final[str] = "PS3.15 Basic Profile, fedrad keep-list"


@dataclass(frozen=True)
class PseudonymKey:
    """The site secret behind every pseudonym; it never leaves the site."""

    secret: bytes

    def token(self, value: str, *, namespace: str, length: int = 16) -> str:
        digest = hmac.new(self.secret, f"{namespace}:{value}".encode(), hashlib.sha256)
        return digest.hexdigest()[:length]

    def uid(self, value: str) -> str:
        """A valid DICOM UID (2.25 + integer) derived from the original by keyed hash."""
        digest = hmac.new(self.secret, f"uid:{value}".encode(), hashlib.sha256).digest()
        return "2.25." + str(int.from_bytes(digest[:16], "big"))


def load_or_create_key(path: Path) -> PseudonymKey:
    """Reads the site secret, or creates it with owner-only permissions on first use. An
    existing key is read only if it is a regular file (not a link), owned by this user and
    readable by nobody else: a key planted by whoever can write the export would make the
    site's pseudonyms computable by them."""
    if os.path.lexists(path):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise ValueError(f"pseudonym key {path} cannot be opened ({exc.strerror})") from exc
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"pseudonym key {path} is not a regular file")
            if info.st_uid != os.getuid() or info.st_mode & 0o077:
                raise ValueError(
                    f"pseudonym key {path} must be owned by this user with mode 0600 "
                    "(was it written by someone else?)"
                )
            data = handle.read(SECRET_BYTES + 1)
        if len(data) < SECRET_BYTES:
            raise ValueError(f"pseudonym key file is too short: {path}")
        return PseudonymKey(data[:SECRET_BYTES])
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(SECRET_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
    return PseudonymKey(secret)


def _age_value(ds: Dataset) -> str | None:
    """PatientAge, capped at 90 years as HIPAA safe harbour asks; None when unknown."""
    age = str(ds.get("PatientAge", "") or "").strip()
    if re.fullmatch(r"\d{3}[DWMY]", age):
        if age.endswith("Y") and int(age[:3]) > 89:
            return "090Y"
        return age
    return None


def deidentify_dataset(ds: Dataset, key: PseudonymKey) -> Dataset:
    """A new dataset holding only the keep-list, pseudonymous identifiers and remapped UIDs."""
    out = Dataset()
    for keyword in KEEP_ATTRIBUTES:
        if keyword in ds:
            out[keyword] = ds[keyword]
    for keyword in FUNCTIONAL_GROUPS:
        groups = ds.get(keyword)
        if groups:
            setattr(out, keyword, Sequence([_geometry_only(item) for item in groups]))
    age = _age_value(ds)
    if age is not None:
        out.PatientAge = age
    for keyword in REMAP_UIDS:
        value = ds.get(keyword)
        if value:
            setattr(out, keyword, key.uid(str(value)))
    patient = str(ds.get("PatientID", "") or "")
    out.PatientID = key.token(patient, namespace="patient") if patient else ""
    out.PatientName = f"ANON^{out.PatientID[:8]}" if patient else "ANONYMOUS"
    accession = str(ds.get("AccessionNumber", "") or "")
    out.AccessionNumber = key.token(accession, namespace="accession") if accession else ""
    # Type 2 attributes of the general study/patient modules: present, empty.
    for keyword in (
        "PatientBirthDate",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
    ):
        setattr(out, keyword, "")
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = DEID_METHOD
    out.DeidentificationMethodCodeSequence = Sequence(
        [
            _code("113100", "Basic Application Confidentiality Profile"),
            _code("113108", "Retain Patient Characteristics Option"),
        ]
    )
    meta = FileMetaDataset()
    source_meta = getattr(ds, "file_meta", None)
    if source_meta is not None and "TransferSyntaxUID" in source_meta:
        meta.TransferSyntaxUID = source_meta.TransferSyntaxUID
    if "SOPClassUID" in out:
        meta.MediaStorageSOPClassUID = out.SOPClassUID
    if "SOPInstanceUID" in out:
        meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    out.file_meta = meta
    return out


def _geometry_only(group: Dataset) -> Dataset:
    """A functional group item rebuilt from GEOMETRY_MACROS; an item left empty stays, so the
    per-frame sequence still holds one item per frame."""
    out = Dataset()
    for macro, attributes in GEOMETRY_MACROS.items():
        items = group.get(macro)
        if not items:
            continue
        kept = []
        for item in items:
            clean = Dataset()
            for keyword in attributes:
                if keyword in item:
                    clean[keyword] = item[keyword]
            kept.append(clean)
        setattr(out, macro, Sequence(kept))
    return out


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


# ---------------------------------------------------------------------------------------------
# Report text


@dataclass(frozen=True)
class PhiValues:
    """Identifying strings of one study, gathered from its headers, to be removed from its text."""

    names: frozenset[str]
    identifiers: frozenset[str]
    places: frozenset[str]
    dates: frozenset[dt.date]

    @staticmethod
    def empty() -> PhiValues:
        return PhiValues(frozenset(), frozenset(), frozenset(), frozenset())

    def merge(self, other: PhiValues) -> PhiValues:
        return PhiValues(
            self.names | other.names,
            self.identifiers | other.identifiers,
            self.places | other.places,
            self.dates | other.dates,
        )


_NAME_KEYWORDS: Final[frozenset[str]] = frozenset(
    {
        "PatientName",
        "OtherPatientNames",
        "PatientBirthName",
        "PatientMotherBirthName",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "NameOfPhysiciansReadingStudy",
        "OperatorsName",
        "RequestingPhysician",
    }
)
_PLACE_KEYWORDS: Final[frozenset[str]] = frozenset(
    {"InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "PatientAddress"}
)


def _values(element_value: object) -> list[str]:
    if element_value is None:
        return []
    if isinstance(element_value, list | tuple) or type(element_value).__name__ == "MultiValue":
        return [str(v) for v in element_value]  # type: ignore[union-attr]
    return [str(element_value)]


def header_date(ds: Dataset, keyword: str) -> dt.date | None:
    """A DA attribute as a date (YYYYMMDD); None when missing or malformed."""
    value = str(ds.get(keyword, "") or "").strip()
    if not re.fullmatch(r"\d{8}", value):
        return None
    try:
        return dt.date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    except ValueError:
        return None


def collect_phi(ds: Dataset) -> PhiValues:
    """Every identifying string in the header that report prose might repeat."""
    names: set[str] = set()
    identifiers: set[str] = set()
    places: set[str] = set()
    dates: set[dt.date] = set()
    for keyword in PHI_TEXT_ATTRIBUTES:
        if keyword not in ds:
            continue
        for raw in _values(ds[keyword].value):
            value = raw.strip()
            if not value:
                continue
            if keyword in _NAME_KEYWORDS:
                for part in re.split(r"[\^=,\s]+", value):
                    part = part.strip(". ")
                    if len(part) >= 2 and not part.isdigit():
                        names.add(part)
            elif keyword in _PLACE_KEYWORDS:
                places.add(value)
            elif len(value) >= 3:
                identifiers.add(value)
    for keyword in PHI_DATE_ATTRIBUTES:
        day = header_date(ds, keyword)
        if day is not None:
            dates.add(day)
    return PhiValues(frozenset(names), frozenset(identifiers), frozenset(places), frozenset(dates))


_MONTHS = (
    "January|February|March|April|May|June|July|August|September|October|November|December|"
    "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
)
_GENERIC_PATTERNS: Final[tuple[tuple[re.Pattern[str], str], ...]] = (
    # Dates in the formats reports use: 2021-03-04, 03/04/2021, 3.4.21, 4 March 2021, March 4, 2021
    (re.compile(r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b"), "[DATE]"),
    (re.compile(r"\b\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}\b"), "[DATE]"),
    (
        re.compile(rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:{_MONTHS})\.?,?\s+\d{{2,4}}\b", re.I),
        "[DATE]",
    ),
    (
        re.compile(rf"\b(?:{_MONTHS})\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{2,4}}\b", re.I),
        "[DATE]",
    ),
    (re.compile(r"\b\d{8}\b"), "[DATE]"),
    # Record numbers, phone numbers, e-mail addresses
    (
        re.compile(
            r"\b(?:MRN|MR#|MR\s*No\.?|Acc(?:ession)?(?:\s*(?:No\.?|#))?)[:#\s]*[A-Z0-9-]+", re.I
        ),
        "[ID]",
    ),
    (re.compile(r"\(?\b\d{3}\)?[-.\s]\d{3}[-.\s]\d{4}\b"), "[PHONE]"),
    (re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.]+\b"), "[EMAIL]"),
    (re.compile(r"\b[A-Z]*\d[A-Z0-9]{5,}\b"), "[ID]"),
    # Ages over 89 are identifying (HIPAA safe harbour): "92 y/o", "93-year-old", "age 95"
    (
        re.compile(r"\b(?:9\d|1[0-4]\d)(?=\s*(?:-|\s)?(?:y/?o|yo|years?[- ]old|yrs?)\b)", re.I),
        "90+",
    ),
    (re.compile(r"\b(age[d]?\s+)(?:9\d|1[0-4]\d)\b", re.I), r"\g<1>90+"),
    # A titled name: "Dr. Smith", "Dr Jane Smith", "Doctor Smith"
    (
        re.compile(r"\b(Dr\.?|Doctor|Mr\.?|Mrs\.?|Ms\.?)\s+(?:[A-Z][a-zA-Z'-]+\s?){1,3}"),
        r"\1 [NAME] ",
    ),
)


def _date_forms(day: dt.date) -> list[str]:
    forms = {
        day.strftime("%Y%m%d"),
        day.strftime("%Y-%m-%d"),
        day.strftime("%m/%d/%Y"),
        day.strftime("%d/%m/%Y"),
        day.strftime("%d.%m.%Y"),
        f"{day.month}/{day.day}/{day.year}",
        f"{day.day}/{day.month}/{day.year}",
        day.strftime("%B ") + f"{day.day}, {day.year}",
        f"{day.day} " + day.strftime("%B %Y"),
    }
    return sorted(forms, key=len, reverse=True)


def _literal_pattern(
    values: Iterable[str], *, case_sensitive_names: bool
) -> re.Pattern[str] | None:
    parts = sorted({v for v in values if v}, key=lambda v: (-len(v), v))
    if not parts:
        return None
    body = "|".join(re.escape(p) for p in parts)
    flags = 0 if case_sensitive_names else re.IGNORECASE
    # The group makes the word boundaries hold for every alternative, not the first and last.
    return re.compile(rf"(?<![\w])(?:{body})(?![\w])", flags)


def scrub_text(text: str, phi: PhiValues) -> str:
    """Report text with the study's header PHI and generic identifier patterns replaced.

    Names match case-sensitively in Title and UPPER case, so that a patient called "Clear" does
    not erase "the lungs are clear"; identifiers, places and dates match in any case.
    """
    out = text
    ident = _literal_pattern(phi.identifiers, case_sensitive_names=False)
    if ident is not None:
        out = ident.sub("[ID]", out)
    places = _literal_pattern(phi.places, case_sensitive_names=False)
    if places is not None:
        out = places.sub("[INSTITUTION]", out)
    date_forms = [form for day in phi.dates for form in _date_forms(day)]
    dates = _literal_pattern(date_forms, case_sensitive_names=False)
    if dates is not None:
        out = dates.sub("[DATE]", out)
    name_forms: set[str] = set()
    for name in phi.names:
        name_forms.update({name, name.title(), name.upper()})
    names = _literal_pattern(name_forms, case_sensitive_names=True)
    if names is not None:
        out = names.sub("[NAME]", out)
    for pattern, replacement in _GENERIC_PATTERNS:
        out = pattern.sub(replacement, out)
    return re.sub(r"[ \t]{2,}", " ", out).replace(" .", ".").strip()
