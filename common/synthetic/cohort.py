"""Generates the synthetic multi-hospital chest radiograph cohort as real DICOM files.

Why: every later stage (ingest, de-identification, report labeling, federated training) must be
exercised on data shaped like a hospital export, without real patients. Each site directory
follows the site data contract exactly (DICOM files in a nested tree + ``reports.csv``); the
truth lives beside it in ``ground_truth.csv``, read only by evaluation.

Determinism: the plan (patients, dates, identifiers, UIDs, paths) comes from per-site seed
sequences, and every study draws from its own ``SeedSequence(seed, spawn_key=(1, site, study))``,
so the output is byte-identical for a seed whatever ``workers`` is.

Radiographs are drawn (`cxr_image.py`) or, with ``radiographs="drr"``, projected from the same
warped real chest CT the CT studies use (`drr.py`), so radiographs and CTs share one anatomy.

Case history (``history`` > 0): that share of each site's patients is followed over 2-4 visits
whose findings evolve (`patient_course.py`). Their plan, course, anatomy and finding placement
come from new streams (``spawn_key`` (4, site) and (5, site, patient, ...)), so a cohort without
history is byte-identical to one generated before history existed.
"""

from __future__ import annotations

import csv
import ctypes
import datetime as dt
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from fedrad.common.findings import FINDINGS, LATERAL_FINDINGS
from fedrad.common.labeling.labeler import label_report

from .cxr_image import (
    Anatomy,
    Finding,
    anchor_finding,
    render_chest,
    reposition,
    sample_anatomy,
    sample_devices,
    sample_finding,
    to_stored,
)
from .patient_course import CHANGES, changes, draw_course, draw_gaps, largest_nodule_mm, sizes
from .report_text import HeaderPHI, write_indication, write_report
from .site_profiles import SiteProfile, profile_for_site, studies_for_site

if TYPE_CHECKING:  # chest_ct is imported when a CT or DRR study is made
    from .chest_ct import CTFinding

logger = logging.getLogger(__name__)

COHORT_FORMAT: Final[int] = 1
"""Bumped whenever the same seed would give different files."""

REPORT_COLUMNS: Final[tuple[str, ...]] = ("accession_number", "report", "study_date", "indication")
GROUND_TRUTH_COLUMNS: Final[tuple[str, ...]] = (
    "accession_number",
    *FINDINGS,
    *(f"report_{f}" for f in FINDINGS),
    *(f"{f}_side" for f in FINDINGS if f in LATERAL_FINDINGS),
    "nodule_size_mm",
    "view",
)
HISTORY_COLUMNS: Final[tuple[str, ...]] = (
    "patient_course",
    "visit",
    "prior_accession",
    *(f"{f}_change" for f in FINDINGS),
    *(f"{f}_size" for f in FINDINGS),
)
"""Appended to GROUND_TRUTH_COLUMNS when ``history`` > 0, filled for followed patients' visits
(empty for patients seen once): the course id ("c<site>-<n>"), the visit number (1-based), the
prior visit's accession, and per finding its change since the prior visit (a
`patient_course.CHANGES` entry; empty on a first visit) and its size on its own scale (mm for a
nodule, small/moderate/large, mild/moderate/marked, acute/healed for a fracture; empty if
absent)."""

_ENCODER_PLUGIN: Final[dict[str, str]] = {
    JPEG2000Lossless: "pylibjpeg",
    RLELossless: "pylibjpeg",
    JPEGLSLossless: "pyjpegls",
}

# fmt: off
_FAMILY = (
    "Smith", "Johnson", "Nguyen", "García", "Müller", "O'Brien", "Van der Berg", "Kowalski",
    "Okafor", "Patel", "Kim", "Rossi", "Andersson", "Haddad", "Ivanova", "Tanaka", "Dubois",
    "Murphy", "Cohen", "Silva", "Singh", "Chen", "Wang", "Li", "Ahmed", "Hassan", "Schmidt",
    "Novak", "Horvath", "Yilmaz", "Papadopoulos", "Mensah", "Adeyemi", "Mwangi", "Fitzgerald",
    "McAllister", "De Luca", "Lindqvist", "Nakamura", "Park", "Fernández", "Gómez", "López",
    "Martin", "Bernard", "Jensen", "Nielsen", "Hansen", "Virtanen", "Brown", "Williams", "Jones",
    "Taylor", "Davies", "Evans", "Wilson", "Thomas", "Roberts", "Walker", "Wright", "Thompson",
    "White", "Hughes", "Edwards", "Green", "Hall", "Wood", "Harris", "Lewis", "Martínez",
    "Rodríguez", "Hernández", "Pérez", "Sánchez", "Ramírez", "Torres", "Flores", "Rivera",
    "Moreau", "Lefèvre", "Schäfer", "Becker", "Hoffmann", "Kaur", "Sharma", "Gupta", "Ali", "Khan",
    "Ibrahim", "Santos", "Oliveira", "Costa", "Björk", "Løvstad", "Achterberg",
)
_GIVEN_M = (
    "James", "John", "Robert", "Michael", "David", "William", "Richard", "Thomas", "Daniel",
    "Matthew", "Anthony", "Mark", "Paul", "Steven", "Andrew", "Kenji", "Wei", "Arjun", "Mohammed",
    "Omar", "Luis", "José", "Carlos", "Pierre", "Hans", "Lars", "Sven", "Chidi", "Kwame", "Ivan",
    "Dmitri", "Giovanni", "Marco", "Seán", "Liam", "Noah", "Ethan", "Hiroshi", "Minh", "Tariq",
)
_GIVEN_F = (
    "Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica", "Sarah",
    "Karen", "Nancy", "Lisa", "Margaret", "Emily", "Sofia", "Yuki", "Mei", "Priya", "Fatima",
    "Aisha", "María", "Lucía", "Chloé", "Ingrid", "Astrid", "Ngozi", "Amara", "Olga", "Elena",
    "Giulia", "Siobhán", "Emma", "Olivia", "Ava", "Hana", "Linh", "Leila", "Zoë", "Anneke", "Ruth",
)
# fmt: on
_INITIALS = "ABCDEFGHJKLMNPRSTW"


@dataclass(frozen=True)
class CourseVisit:
    """One visit of a followed patient, fixed when the site is planned: its findings come from
    the patient's course, not from the study's stream."""

    course_id: str  # "c<site>-<n>", for evaluation only
    patient: int  # the patient's index in the site plan: keys its anatomy and placement streams
    number: int  # 1-based
    prior_accession: str  # "" on the first visit
    findings: tuple[Any, ...]  # Finding (drawn radiographs) or CTFinding (CT, DRR radiographs)
    changes: tuple[tuple[str, str], ...]  # (finding, change) since the prior visit; () on the first
    fit_mm: float  # the largest nodule of the course: where a nodule is placed must hold it


@dataclass(frozen=True)
class StudyTask:
    """Everything one worker needs to write one study (picklable; no randomness left open)."""

    seed: int
    site_index: int
    study_index: int
    profile: SiteProfile
    rows: int
    cols: int
    spacing_mm: float
    path: str  # absolute file path of the image
    patient_name: str  # DICOM PN, Family^Given[^Middle]
    given_name: str
    family_name: str
    patient_id: str
    sex: str
    birth_date: dt.date
    study_date: dt.date
    study_time: str  # HHMMSS
    prior_date: dt.date
    accession: str
    study_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    referring: tuple[str, str]  # (family, given)
    operator: tuple[str, str]
    station: str
    device_serial: str
    kind: str = "radiograph"  # or "CT": a chest CT series on real anatomy (`chest_ct.py`)
    ct_thickness_mm: float | None = None  # the site's reconstruction; None = the working grid
    radiographs: str = "drawn"  # "drawn" (`cxr_image.py`) or "drr" (projected real CT, `drr.py`)
    visit: CourseVisit | None = None  # a followed patient's visit; None: seen once


@dataclass(frozen=True)
class StudyResult:
    """What a worker hands back: CSV rows and timings."""

    site_index: int
    report_row: dict[str, str]
    truth_row: dict[str, str]
    findings: tuple[str, ...]
    view: str
    changes: tuple[tuple[str, str], ...]  # a followed patient's later visit: change per finding
    course: bool  # the study is a followed patient's visit
    render_s: float
    encode_s: float
    nbytes: int


def _age(birth: dt.date, on: dt.date) -> int:
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def _hex(rng: np.random.Generator, n: int) -> str:
    return rng.bytes((n + 1) // 2).hex().upper()[:n]


def _person(rng: np.random.Generator, sex: str | None = None) -> tuple[str, str, str]:
    """(family, given, middle initial or '') drawn from varied name lists."""
    sex = sex or ("F" if rng.random() < 0.5 else "M")
    given = _GIVEN_F if sex == "F" else _GIVEN_M
    middle = _INITIALS[int(rng.integers(len(_INITIALS)))] if rng.random() < 0.3 else ""
    return _FAMILY[int(rng.integers(len(_FAMILY)))], given[int(rng.integers(len(given)))], middle


def _uid(rng: np.random.Generator, *parts: object) -> str:
    """A deterministic UID: entropy from the seeded rng plus the study's identity."""
    return generate_uid(entropy_srcs=[_hex(rng, 32), *map(str, parts)])


def _site_shape(profile: SiteProfile, image_size: int | None) -> tuple[int, int, float]:
    """The site's matrix, or one rescaled to longest side ``image_size`` (same field of view)."""
    if image_size is None:
        return profile.rows, profile.cols, profile.pixel_spacing_mm
    scale = image_size / max(profile.rows, profile.cols)
    rows, cols = max(8, round(profile.rows * scale)), max(8, round(profile.cols * scale))
    return rows, cols, round(profile.pixel_spacing_mm * profile.rows / rows, 4)


CT_GRID: Final[tuple[int, int, int]] = (64, 128, 128)
"""The working grid chest CTs are drawn on (5.2 x 2.8 x 2.8 mm over the real scan's field)."""
CT_THICKNESS_MM: Final[tuple[float | None, ...]] = (None, 2.5, 3.0)
"""Per site (by index): the working grid's 5.2 mm, or a thinner reconstruction."""
CT_NOISE_HU: Final[tuple[float, ...]] = (12.0, 25.0, 18.0)
"""Per site: quantum noise (dose and kernel differ between scanners)."""
CT_NODULE_RATE: Final[float] = 0.3
"""Chest CT finds nodules far more often than a radiograph does (most are incidental): a CT
study without one in its site's draw gets one at this rate."""
RADIOGRAPH_SOURCES: Final[tuple[str, ...]] = ("drawn", "drr")
"""How radiographs are made: drawn by `cxr_image.py`, or DRRs of the real CT (`drr.py`)."""
DRR_DISPLAY: Final[tuple[float, float]] = (0.04, 0.72)
"""(offset, gain) taking `render_drr` output (1.0 = 300 mm of water) to `render_chest`'s display
range (air 0.04, lung ~0.25, mediastinum ~0.6): a fixed map, so a denser patient or a
finding shows as denser, not renormalised away."""
_CARDIAC_CTR: Final[dict[str, float]] = {"mild": 0.57, "moderate": 0.62, "marked": 0.67}
"""Cardiomegaly severity -> the cardiothoracic ratio `write_report` words it by."""


def _ct_plan(seed: int, site_index: int, n: int, fraction: float) -> list[bool]:
    """Which studies of a site are chest CTs: drawn from their own stream, so a cohort
    without CT is byte-identical to one generated before CT existed."""
    if fraction <= 0:
        return [False] * n
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3, site_index)))
    return [bool(v) for v in rng.random(n) < fraction]


def _patient_rng(seed: int, site_index: int, patient: int, *key: int) -> np.random.Generator:
    """A followed patient's own stream: () its course, (1,) anatomy, (2,) lung texture,
    (3, finding index) where that finding sits. Never drawn from a study's stream, so the
    visits (made in any order, by any worker) agree."""
    spawn_key = (5, site_index, patient, *key)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=spawn_key))


def _patient_plan(
    rng: np.random.Generator, n: int, history: float, ct_fraction: float
) -> list[tuple[int, bool]]:
    """(visits, is CT) per patient of a site with ``n`` studies: each patient is followed over
    2-4 visits with chance ``history``, else seen once (never one study left over for a last
    followed patient); one modality per patient, CT with chance ``ct_fraction``."""
    plan = []
    left = n
    while left > 0:
        followed, ct = rng.random() < history, rng.random() < ct_fraction
        k = int(rng.integers(2, 5)) if followed and left >= 2 else 1
        k = min(k, left)
        if k > 1 and left - k == 1:
            k = k + 1 if k < 4 else k - 1
        plan.append((k, bool(ct)))
        left -= k
    return plan


def _prevalence(prof: SiteProfile) -> dict[str, float]:
    """The site's approximate share of studies with each finding."""
    rates = zip(FINDINGS, prof.finding_rates, strict=True)
    return {f: (1.0 - prof.normal_fraction) * r for f, r in rates}


def _course(
    prof: SiteProfile, seed: int, site_index: int, patient: int, visits: int, kind: str, drr: bool
) -> tuple[tuple[int, ...], tuple[tuple[Any, ...], ...]]:
    """(days between visits, findings at each visit) of one followed patient: the first visit's
    drawn as any study's of the site (CT nodules included), then evolved (`patient_course.py`).
    CTs and DRR radiographs follow CT findings, drawn radiographs drawn ones."""
    rng = _patient_rng(seed, site_index, patient)
    gaps = draw_gaps(visits, rng)
    names = prof.draw_findings(rng)
    if kind == "CT" and "nodule" not in names and rng.random() < CT_NODULE_RATE:
        names = tuple(f for f in FINDINGS if f in {*names, "nodule"})
    sample: Callable[[str, np.random.Generator], Any] = sample_finding
    if kind == "CT" or drr:
        from .chest_ct import sample_ct_finding

        sample = sample_ct_finding
    first = [sample(name, rng) for name in names]
    course = draw_course(first, gaps, rng, sample=sample, prevalence=_prevalence(prof))
    return gaps, course


def _plan_site(
    out_dir: Path,
    site_index: int,
    n: int,
    accessions: list[str],
    *,
    seed: int,
    image_size: int | None,
    ct_fraction: float = 0.0,
    radiographs: str = "drawn",
    history: float = 0.0,
) -> list[StudyTask]:
    """Patients, visits, identifiers and paths for one site, from the site's own seed.

    Without history a fifth of the studies are repeat visits of random patients; with it the
    repeats are the followed patients' courses, planned from the site's history stream."""
    prof = profile_for_site(site_index)
    history_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(4, site_index)))
    plan = _patient_plan(history_rng, n, history, ct_fraction) if history > 0 else None
    is_ct = _ct_plan(seed, site_index, n, ct_fraction) if plan is None else []
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, site_index)))
    rows, cols, spacing = _site_shape(prof, image_size)
    physicians = [_person(rng)[:2] for _ in range(8)]
    operators = [_person(rng)[:2] for _ in range(5)]
    stations = [(f"{prof.station_prefix}{i + 1:02d}", f"SN{_hex(rng, 8)}") for i in range(3)]
    n_patients = max(1, math.ceil(n * 0.8)) if plan is None else len(plan)
    start = dt.date(prof.first_year, 1, 1)
    span = (dt.date(prof.last_year, 12, 31) - start).days
    mid = start + dt.timedelta(days=span // 2)
    mrns: set[str] = set()
    folders: set[str] = set()
    patients = []
    for _ in range(n_patients):
        sex = "F" if rng.random() < prof.female_fraction else "M"
        family, given, middle = _person(rng, sex)
        age = float(np.clip(rng.normal(prof.age_mean, prof.age_sd), 18, 96))
        birth = mid - dt.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
        mrn = f"MRN{rng.integers(1_000_000, 10_000_000)}"
        while mrn in mrns:
            mrn = f"MRN{rng.integers(1_000_000, 10_000_000)}"
        folder = _hex(rng, 10)
        while folder in folders:
            folder = _hex(rng, 10)
        mrns.add(mrn)
        folders.add(folder)
        pn = f"{family}^{given}" + (f"^{middle}" if middle else "")
        patients.append((pn, given, family, mrn, sex, birth, folder))
    visits: list[CourseVisit | None] = [None] * n
    dates: dict[tuple[int, int], dt.date] = {}
    if plan is None:
        owner = list(range(n_patients))
        owner += [int(rng.integers(n_patients)) for _ in range(n - n_patients)]
        rng.shuffle(owner)
    else:
        owner, visits, dates = _schedule(
            history_rng,
            plan,
            patients,
            accessions,
            prof,
            seed,
            site_index,
            (start, span),
            radiographs,
        )
        is_ct = [plan[p][1] for p in owner]
    tasks = []
    for j in range(n):
        pn, given, family, mrn, sex, birth, folder = patients[owner[j]]
        day = start + dt.timedelta(days=int(rng.integers(0, span + 1)))
        day = max(day, birth + dt.timedelta(days=18 * 366))
        hour = (
            int(rng.integers(0, 24)) if prof.kind in ("icu", "trauma") else int(rng.integers(7, 20))
        )
        hhmmss = f"{hour:02d}{int(rng.integers(60)):02d}{int(rng.integers(60)):02d}"
        station, serial = stations[int(rng.integers(len(stations)))]
        study_folder = f"S{_hex(rng, 8)}"
        before = int(rng.integers(30, 1500))  # an outside prior the report may cite
        visit = visits[j]
        if visit is not None:
            day = dates[owner[j], visit.number - 1]
        prior = dates.get((owner[j], visit.number - 2)) if visit and visit.number > 1 else None
        tasks.append(
            StudyTask(
                seed=seed,
                site_index=site_index,
                study_index=j,
                profile=prof,
                rows=rows,
                cols=cols,
                spacing_mm=spacing,
                path=str(
                    out_dir
                    / f"site_{site_index + 1}"
                    / "dicom"
                    / folder
                    / study_folder
                    / prof.file_name
                ),
                patient_name=pn,
                given_name=given,
                family_name=family,
                patient_id=mrn,
                sex=sex,
                birth_date=birth,
                study_date=day,
                study_time=hhmmss,
                prior_date=prior or day - dt.timedelta(days=before),
                accession=accessions[j],
                study_id=str(int(rng.integers(1, 100_000))),
                study_uid=_uid(rng, seed, site_index, j, "study"),
                series_uid=_uid(rng, seed, site_index, j, "series"),
                sop_uid=_uid(rng, seed, site_index, j, "sop"),
                referring=physicians[int(rng.integers(len(physicians)))],
                operator=operators[int(rng.integers(len(operators)))],
                station=station,
                device_serial=serial,
                kind="CT" if is_ct[j] else "radiograph",
                ct_thickness_mm=CT_THICKNESS_MM[site_index % len(CT_THICKNESS_MM)],
                radiographs=radiographs,
                visit=visit,
            )
        )
    return tasks


def _schedule(
    rng: np.random.Generator,
    plan: list[tuple[int, bool]],
    patients: list[tuple[str, str, str, str, str, dt.date, str]],
    accessions: list[str],
    prof: SiteProfile,
    seed: int,
    site_index: int,
    years: tuple[dt.date, int],
    radiographs: str,
) -> tuple[list[int], list[CourseVisit | None], dict[tuple[int, int], dt.date]]:
    """(patient of each study, its course visit or None, date of each (patient, visit)) for a
    site with history: the studies in a shuffled order, each followed patient's visits dated
    in order within the site's years, the first when the patient is an adult. ``rng`` is the
    site's history stream, which planned ``plan``; ``years`` the site's first day and span."""
    start, span = years
    slots = [(p, v) for p, (k, _) in enumerate(plan) for v in range(k)]
    order = rng.permutation(len(slots))
    owner = [slots[i][0] for i in order]
    index_of = {slots[i]: j for j, i in enumerate(order)}
    visits: list[CourseVisit | None] = [None] * len(slots)
    dates: dict[tuple[int, int], dt.date] = {}
    n_courses = 0
    for p, (k, ct) in enumerate(plan):
        if k == 1:
            continue
        n_courses += 1
        kind = "CT" if ct else "radiograph"
        gaps, course = _course(prof, seed, site_index, p, k, kind, radiographs == "drr")
        first = start + dt.timedelta(days=int(rng.integers(0, max(0, span - sum(gaps)) + 1)))
        day = max(first, patients[p][5] + dt.timedelta(days=18 * 366))
        fit = largest_nodule_mm(course)
        for v in range(k):
            day += dt.timedelta(days=gaps[v - 1] if v else 0)
            dates[p, v] = day
            prior = accessions[index_of[p, v - 1]] if v else ""
            change = tuple(changes(course[v - 1], course[v]).items()) if v else ()
            visits[index_of[p, v]] = CourseVisit(
                course_id=f"c{site_index + 1}-{n_courses}",
                patient=p,
                number=v + 1,
                prior_accession=prior,
                findings=course[v],
                changes=change,
                fit_mm=fit,
            )
    return owner, visits, dates


def _dataset(t: StudyTask, pixels: np.ndarray, view: str) -> Dataset:
    """The DICOM header of one projection radiograph, PHI included (the de-identifier's job)."""
    prof = t.profile
    dx = prof.modality == "DX"
    sop_class = DigitalXRayImageStorageForPresentation if dx else ComputedRadiographyImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = t.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    date, time_ = t.study_date.strftime("%Y%m%d"), t.study_time
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = t.sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time_
    ds.AccessionNumber = t.accession
    ds.Modality = prof.modality
    if dx:
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = prof.manufacturer
    ds.InstitutionName = prof.institution
    ds.InstitutionAddress = prof.address
    ds.ReferringPhysicianName = "^".join(t.referring)
    ds.StationName = t.station
    portable = view == "AP"
    ds.StudyDescription = "XR CHEST 1 VIEW PORTABLE" if portable else "XR CHEST PA"
    ds.SeriesDescription = f"CHEST {view}"
    ds.InstitutionalDepartmentName = "Radiology"
    ds.OperatorsName = "^".join(t.operator)
    ds.ManufacturerModelName = prof.model
    ds.PatientName = t.patient_name
    ds.PatientID = t.patient_id
    ds.IssuerOfPatientID = prof.station_prefix.split("-")[0]
    ds.PatientBirthDate = t.birth_date.strftime("%Y%m%d")
    ds.PatientSex = t.sex
    ds.PatientAge = f"{_age(t.birth_date, t.study_date):03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.DeviceSerialNumber = t.device_serial
    ds.SoftwareVersions = "5.2.1"
    ds.KVP = "90" if portable else "120"
    ds.DistanceSourceToDetector = "1000" if portable else "1800"
    ds.StudyInstanceUID = t.study_uid
    ds.SeriesInstanceUID = t.series_uid
    ds.StudyID = t.study_id
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]  # row direction toward the patient's left, columns to feet
    ds.ViewPosition = view
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = prof.photometric
    ds.Rows, ds.Columns = pixels.shape
    spacing = [f"{t.spacing_mm:.4g}", f"{t.spacing_mm:.4g}"]
    ds.PixelSpacing = spacing
    if dx:
        ds.ImagerPixelSpacing = spacing
    ds.BitsAllocated = 16
    ds.BitsStored = prof.detector.bits_stored
    ds.HighBit = prof.detector.bits_stored - 1
    ds.PixelRepresentation = 0
    lo, hi = np.percentile(pixels[::4, ::4], [1.0, 99.0])
    ds.WindowCenter = str(round((lo + hi) / 2))
    ds.WindowWidth = str(max(1, round(hi - lo)))
    if dx:
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
        ds.PresentationLUTShape = "INVERSE" if prof.detector.monochrome1 else "IDENTITY"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if prof.private_phi_tag:  # vendors do this; a keep-list de-identifier must drop it
        block = ds.private_block(0x0029, "FEDRAD SYNTH VENDOR", create=True)
        block.add_new(0x10, "LO", t.patient_name.replace("^", " "))
        block.add_new(0x11, "LO", f"{t.patient_id} {t.station}")
    return ds


def _encode(ds: Dataset, pixels: np.ndarray, syntax: str) -> None:
    if syntax == ExplicitVRLittleEndian:
        ds.add_new(0x7FE00010, "OW", pixels.astype("<u2", copy=False).tobytes())
        return
    if syntax == JPEG2000Lossless:  # openjpeg logs one INFO line per tile: keep logs readable
        jlog = logging.getLogger("openjpeg")
        jlog.setLevel(max(jlog.getEffectiveLevel(), logging.WARNING))
    # keep our deterministic SOP Instance UID (pydicom mints a random one by default)
    ds.compress(
        UID(syntax), pixels, encoding_plugin=_ENCODER_PLUGIN[syntax], generate_instance_uid=False
    )


def _make_study(t: StudyTask) -> StudyResult:
    """Draw, report and write one study. Pure in its task: same task, same bytes."""
    if t.kind == "CT":
        return _make_ct_study(t)
    prof = t.profile
    rng = np.random.default_rng(
        np.random.SeedSequence(t.seed, spawn_key=(1, t.site_index, t.study_index))
    )
    t0 = time.perf_counter()
    visit = t.visit
    names = prof.draw_findings(rng) if visit is None else tuple(f.name for f in visit.findings)
    view = "AP" if rng.random() < prof.ap_fraction else "PA"
    devices: tuple[str, ...] = ()
    if t.radiographs == "drr":
        findings, img = _drr_image(t, names, view, rng)
    else:
        findings = tuple(sample_finding(n, rng) for n in names) if visit is None else ()
        devices = sample_devices(rng, rate=prof.device_rate) if view == "AP" else ()
        texture = None
        if visit is None:
            anatomy = sample_anatomy(rng, sex=t.sex, view=view)
        else:
            anatomy, findings, texture = _followed_chest(t, visit, view, rng)
        img = render_chest(
            anatomy,
            findings,
            rows=t.rows,
            cols=t.cols,
            spacing_mm=t.spacing_mm,
            view=view,
            rng=rng,
            devices=devices,
            texture_rng=texture,
        )
    pixels = to_stored(img, prof.detector, spacing_mm=t.spacing_mm, rng=rng)
    phi = HeaderPHI(
        given_name=t.given_name,
        family_name=t.family_name,
        mrn=t.patient_id,
        referring_family=t.referring[0],
        study_date=t.study_date,
        study_time=t.study_time[:4],
        prior_date=t.prior_date,
    )
    report = write_report(
        findings,
        view=view,
        devices=devices,
        style=prof.style,
        phi=phi,
        rng=rng,
        followed=visit is not None,
        has_prior=visit is not None and visit.number > 1,
    )
    age = _age(t.birth_date, t.study_date)
    indication = write_indication(findings, kind=prof.kind, age=age, sex=t.sex, rng=rng)
    t1 = time.perf_counter()
    ds = _dataset(t, pixels, view)
    _encode(ds, pixels, prof.transfer_syntax)
    path = Path(t.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    t2 = time.perf_counter()

    by_name = {f.name: f for f in findings}
    truth: dict[str, str] = {"accession_number": t.accession}
    truth.update({f: str(int(f in by_name)) for f in FINDINGS})
    truth.update({f"report_{f}": str(report.labels[f]) for f in FINDINGS})
    for f in FINDINGS:
        if f in LATERAL_FINDINGS:
            truth[f"{f}_side"] = (by_name[f].side or "") if f in by_name else ""
    nod = by_name.get("nodule")
    truth["nodule_size_mm"] = f"{nod.size_mm:.1f}" if nod is not None and nod.size_mm else ""
    truth["view"] = view
    truth.update(_course_truth(visit))
    return StudyResult(
        site_index=t.site_index,
        report_row={
            "accession_number": t.accession,
            "report": report.text,
            "study_date": t.study_date.isoformat(),
            "indication": indication,
        },
        truth_row=truth,
        findings=names,
        view=view,
        changes=visit.changes if visit is not None else (),
        course=visit is not None,
        render_s=t1 - t0,
        encode_s=t2 - t1,
        nbytes=path.stat().st_size,
    )


def _course_truth(visit: CourseVisit | None) -> dict[str, str]:
    """The `HISTORY_COLUMNS` of a followed patient's visit (none for a patient seen once)."""
    if visit is None:
        return {}
    change = dict(visit.changes)
    size = sizes(visit.findings)
    return {
        "patient_course": visit.course_id,
        "visit": str(visit.number),
        "prior_accession": visit.prior_accession,
        **{f"{f}_change": change.get(f, "") for f in FINDINGS},
        **{f"{f}_size": size[f] for f in FINDINGS},
    }


def _followed_chest(
    t: StudyTask, visit: CourseVisit, view: str, rng: np.random.Generator
) -> tuple[Anatomy, tuple[Finding, ...], np.random.Generator]:
    """(anatomy, placed findings, lung texture stream) of a followed patient's radiograph: the
    patient's own anatomy and lung markings (drawn from the patient's streams, the same at every
    visit) positioned afresh for this visit, and each finding where it sits in those lungs."""
    own = sample_anatomy(_patient_rng(t.seed, t.site_index, visit.patient, 1), sex=t.sex, view="PA")
    findings = tuple(
        anchor_finding(f, own, _placement_rng(t, visit, f.name), fit_mm=visit.fit_mm)
        for f in visit.findings
    )
    anatomy = reposition(own, view="AP" if view == "AP" else "PA", rng=rng)
    return anatomy, findings, _patient_rng(t.seed, t.site_index, visit.patient, 2)


def _placement_rng(t: StudyTask, visit: CourseVisit, finding: str) -> np.random.Generator:
    return _patient_rng(t.seed, t.site_index, visit.patient, 3, FINDINGS.index(finding))


def _followed_ct(
    t: StudyTask, visit: CourseVisit, rng: np.random.Generator, noise_hu: float
) -> tuple[tuple[CTFinding, ...], np.ndarray]:
    """(findings as inserted, HU volume) of a followed patient's chest CT: the patient's own
    warped anatomy (the same at every visit), each finding where it sits in it, and the body
    shifted by a few voxels as the patient lies a little differently on the table each time."""
    from scipy import ndimage

    from .chest_ct import anchor_ct_finding, patient_anatomy, reference_ct, render_ct_with_truth

    ref = reference_ct(CT_GRID)
    anatomy = patient_anatomy(ref, _patient_rng(t.seed, t.site_index, visit.patient, 1))
    placed = tuple(
        anchor_ct_finding(f, ref, anatomy[1], _placement_rng(t, visit, f.name), fit_mm=visit.fit_mm)
        for f in visit.findings
    )
    case = render_ct_with_truth(ref, placed, rng, noise_hu=noise_hu, anatomy=anatomy)
    shift = (int(rng.integers(-1, 2)), int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))
    hu = ndimage.shift(case.hu, shift, order=0, mode="nearest", prefilter=False)
    return case.findings, hu


def _as_drawn(f: CTFinding) -> Finding:
    """A CT finding in the terms `write_report` words a radiograph by (side, zone, size)."""
    zone = f.lobe.split()[1] if f.lobe else None  # "right middle lobe" -> "middle"
    if f.name in ("pleural_effusion", "pneumothorax"):
        return Finding(f.name, side=f.side, size=f.severity or "small")
    if f.name == "cardiomegaly":
        return Finding(f.name, ctr=_CARDIAC_CTR[f.severity or "mild"])
    if f.name == "fracture":  # the CT inserts an acute break unless it is a healed one
        return Finding(f.name, side=f.side, rib=f.rib, chronic=f.chronic)
    if f.name == "consolidation":
        return Finding(f.name, side=f.side, zone=zone, extent=f.extent)
    return Finding(f.name, side=f.side, size_mm=f.size_mm, zone=zone)


def _drr_image(
    t: StudyTask, names: tuple[str, ...], view: str, rng: np.random.Generator
) -> tuple[tuple[Finding, ...], np.ndarray]:
    """A radiograph projected from this patient's chest CT: the findings drawn as CT findings
    (a followed patient's: its course's, in its own anatomy), inserted into the warped real
    anatomy, then projected (`drr.py`); display range as `render_chest`'s. CT quantum noise is
    left out (``noise_hu=0``): the detector adds the radiograph's own in `to_stored`, and
    summing 128 voxels would average CT noise away."""
    from .chest_ct import reference_ct, render_ct_with_truth, sample_ct_finding
    from .drr import render_drr

    ref = reference_ct(CT_GRID)
    if t.visit is None:
        ct_findings = tuple(sample_ct_finding(n, rng) for n in names)
        case = render_ct_with_truth(ref, ct_findings, rng, noise_hu=0.0)
        found, hu = case.findings, case.hu
    else:
        found, hu = _followed_ct(t, t.visit, rng, noise_hu=0.0)
    drr = render_drr(hu, ref.spacing_mm, view=view, rows=t.rows, cols=t.cols)
    offset, gain = DRR_DISPLAY
    img = drr * np.float32(gain) + np.float32(offset)
    return tuple(_as_drawn(f) for f in found), img


def _make_ct_study(t: StudyTask) -> StudyResult:
    """One chest CT: the real anatomy warped for this patient, the findings inserted where
    they belong, written as a multi-file CT series with PHI in every header."""
    from .chest_ct import reference_ct, render_ct_with_truth, sample_ct_finding
    from .ct_report import write_ct_indication, write_ct_report
    from .ct_series import resample_slices, resampled_origin, write_ct_series

    prof = t.profile
    rng = np.random.default_rng(
        np.random.SeedSequence(t.seed, spawn_key=(1, t.site_index, t.study_index))
    )
    t0 = time.perf_counter()
    visit = t.visit
    noise = CT_NOISE_HU[t.site_index % len(CT_NOISE_HU)]
    ref = reference_ct(CT_GRID)
    if visit is None:
        names = prof.draw_findings(rng)
        if "nodule" not in names and rng.random() < CT_NODULE_RATE:
            names = tuple(f for f in FINDINGS if f in {*names, "nodule"})
        findings = tuple(sample_ct_finding(n, rng) for n in names)
        case = render_ct_with_truth(ref, findings, rng, noise_hu=noise)
        found, hu0 = case.findings, case.hu
    else:
        names = tuple(f.name for f in visit.findings)
        found, hu0 = _followed_ct(t, visit, rng, noise_hu=noise)
    hu, spacing, origin = hu0, ref.spacing_mm, ref.origin_lps_mm
    if t.ct_thickness_mm is not None:
        hu, spacing = resample_slices(hu0, ref.spacing_mm, t.ct_thickness_mm)
        origin = resampled_origin(
            origin, hu0.shape[0], ref.spacing_mm[0], hu.shape[0], t.ct_thickness_mm
        )
    report = write_ct_report(
        found,
        rng,
        slice_thickness_mm=spacing[0],
        followed=visit is not None,
        has_prior=visit is not None and visit.number > 1,
    )
    age = _age(t.birth_date, t.study_date)
    indication = write_ct_indication(found, rng, age, t.sex)
    t1 = time.perf_counter()
    phi = {
        "PatientName": t.patient_name,
        "PatientID": t.patient_id,
        "PatientBirthDate": t.birth_date.strftime("%Y%m%d"),
        "PatientSex": t.sex,
        "StudyDate": t.study_date.strftime("%Y%m%d"),
        "StudyTime": t.study_time,
        "StudyID": t.study_id,
        "ReferringPhysicianName": f"{t.referring[0]}^{t.referring[1]}",
        "OperatorsName": f"{t.operator[0]}^{t.operator[1]}",
        "StationName": t.station,
        "DeviceSerialNumber": t.device_serial,
    }
    files = write_ct_series(
        hu,
        spacing,
        Path(t.path).parent / "CT",
        phi=phi,
        study_uid=t.study_uid,
        series_uid=t.series_uid,
        accession=t.accession,
        rng=rng,
        manufacturer=prof.manufacturer,
        institution=prof.institution,
        origin_lps_mm=origin,
    )
    t2 = time.perf_counter()
    by_name = {f.name: f for f in found}
    truth: dict[str, str] = {"accession_number": t.accession}
    truth.update({f: str(int(f in by_name)) for f in FINDINGS})
    written = label_report(report).labels  # what the report says, as the radiograph path records
    truth.update({f"report_{f}": str(written[f]) for f in FINDINGS})
    for f in FINDINGS:
        if f in LATERAL_FINDINGS:
            truth[f"{f}_side"] = (by_name[f].side or "") if f in by_name else ""
    nod = by_name.get("nodule")
    truth["nodule_size_mm"] = f"{nod.size_mm:.1f}" if nod is not None and nod.size_mm else ""
    truth["view"] = "CT"
    truth.update(_course_truth(visit))
    return StudyResult(
        site_index=t.site_index,
        report_row={
            "accession_number": t.accession,
            "report": report,
            "study_date": t.study_date.isoformat(),
            "indication": indication,
        },
        truth_row=truth,
        findings=names,
        view="CT",
        changes=visit.changes if visit is not None else (),
        course=visit is not None,
        render_s=t1 - t0,
        encode_s=t2 - t1,
        nbytes=sum(p.stat().st_size for p in files),
    )


def _worker_init() -> None:
    """Keep freed image buffers in the heap instead of returning them to the OS.

    Each study allocates tens of MB of short-lived float arrays; glibc's default mmap/trim
    thresholds unmap and re-fault them every time, a large share of a worker's time in system
    calls (docs/results/synthetic-cohort.md). Only our own pool workers are tuned; the caller's
    process is left alone.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 256 << 20)
    libc.mallopt(m_top_pad, 64 << 20)


def _run(tasks: list[StudyTask], workers: int) -> Iterator[StudyResult]:
    """Results in task order; a spawn-based pool (safe when the parent holds threads)."""
    if workers == 1:
        yield from map(_make_study, tasks)
        return
    chunk = max(1, min(8, len(tasks) // (workers * 8)))
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
        yield from pool.map(_make_study, tasks, chunksize=chunk)


def _validate(out_dir: Path, sites: int, studies_per_site: int, seed: int, workers: int) -> None:
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    if studies_per_site < 1:
        raise ValueError(f"studies_per_site must be >= 1, got {studies_per_site}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = all cores), got {workers}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"output directory exists and is not empty: {out_dir}")


def generate_cohort(
    out_dir: Path,
    *,
    sites: int,
    studies_per_site: int,
    seed: int,
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
    image_size: int | None = None,
    ct_fractions: Sequence[float] = (),
    radiographs: str = "drawn",
    history: float = 0.0,
) -> dict[str, Any]:
    """Write ``out_dir/site_<i>/`` for each site plus ``out_dir/cohort.json``; return the summary.

    ``studies_per_site`` is the mean: site sizes follow ``site_profiles.SIZE_MULTIPLIERS``.
    ``progress`` is called with the number of studies just finished (an increment, as
    ``tqdm.update`` takes). ``image_size`` (tests, quick demos) rescales every site's matrix so
    its longest side has that many pixels, keeping the field of view. ``ct_fractions`` gives,
    per site in order, the share of its studies that are chest CT series (1.0: a CT-only site;
    sites beyond the list have none). ``radiographs`` is "drawn" (`cxr_image.py`) or "drr":
    each radiograph projected from its own warped copy of the real chest CT, findings inserted
    there (`drr.py`); same detector, header and report path. ``history`` is the share of each
    site's patients followed over 2-4 visits (14-400 days apart, one modality each) whose
    findings appear, grow, shrink or resolve (`patient_course.py`); their reports state every
    size the site compares, and ground_truth.csv gains `HISTORY_COLUMNS`. The returned summary
    is the content of cohort.json plus ``timing`` (which is not written: it is not reproducible).
    """
    out_dir = Path(out_dir)
    _validate(out_dir, sites, studies_per_site, seed, workers)
    if image_size is not None and image_size < 64:
        raise ValueError(f"image_size must be >= 64, got {image_size}")
    if len(ct_fractions) > sites or not all(0.0 <= f <= 1.0 for f in ct_fractions):
        raise ValueError("ct_fractions: at most one value per site, each in [0, 1]")
    if radiographs not in RADIOGRAPH_SOURCES:
        raise ValueError(f"radiographs must be one of {RADIOGRAPH_SOURCES}, got {radiographs!r}")
    if not 0.0 <= history <= 1.0:
        raise ValueError(f"history must be in [0, 1], got {history}")
    fractions = [*ct_fractions, *[0.0] * (sites - len(ct_fractions))]
    workers = workers or os.cpu_count() or 1
    counts = [studies_for_site(i, studies_per_site) for i in range(sites)]
    acc_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
    numbers = acc_rng.choice(90_000_000, size=sum(counts), replace=False) + 10_000_000
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks: list[StudyTask] = []
    offset = 0
    for i, n in enumerate(counts):
        accessions = [f"A{x}" for x in numbers[offset : offset + n]]
        offset += n
        tasks += _plan_site(
            out_dir,
            i,
            n,
            accessions,
            seed=seed,
            image_size=image_size,
            ct_fraction=fractions[i],
            radiographs=radiographs,
            history=history,
        )
    logger.info("generating %d studies at %d sites with %d workers", len(tasks), sites, workers)

    started = time.perf_counter()
    results: list[list[StudyResult]] = [[] for _ in range(sites)]
    for res in _run(tasks, min(workers, len(tasks))):
        results[res.site_index].append(res)
        if progress is not None:
            progress(1)
    elapsed = time.perf_counter() - started

    summary_sites: dict[str, Any] = {}
    timing: dict[str, Any] = {"elapsed_s": round(elapsed, 3), "workers": workers, "per_site": {}}
    for i, res_list in enumerate(results):
        site_id = f"site_{i + 1}"
        site_dir = out_dir / site_id
        _write_csv(site_dir / "reports.csv", REPORT_COLUMNS, [r.report_row for r in res_list])
        columns = GROUND_TRUTH_COLUMNS + (HISTORY_COLUMNS if history > 0 else ())
        _write_csv(site_dir / "ground_truth.csv", columns, [r.truth_row for r in res_list])
        prof = tasks[sum(counts[:i])].profile
        summary_sites[site_id] = _site_summary(prof, tasks[sum(counts[:i])], res_list)
        if history > 0:
            summary_sites[site_id].update(_history_summary(res_list))
        n = len(res_list)
        timing["per_site"][site_id] = {
            "transfer_syntax": UID(prof.transfer_syntax).name,
            "render_ms": round(1000 * sum(r.render_s for r in res_list) / n, 1),
            "encode_write_ms": round(1000 * sum(r.encode_s for r in res_list) / n, 1),
            "mean_file_kb": round(sum(r.nbytes for r in res_list) / n / 1024, 1),
        }
    timing["studies_per_s"] = round(len(tasks) / max(elapsed, 1e-9), 2)
    config = {
        "sites": sites,
        "studies_per_site": studies_per_site,
        "seed": seed,
        "image_size": image_size,
        **({"ct_fractions": [float(f) for f in fractions]} if any(fractions) else {}),
        **({"radiographs": radiographs} if radiographs != "drawn" else {}),
        **({"history": float(history)} if history > 0 else {}),
    }
    cohort = {
        "format": COHORT_FORMAT,
        "generator": __name__,
        "config": config,
        "sites": summary_sites,
    }
    (out_dir / "cohort.json").write_text(
        json.dumps(cohort, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    logger.info(
        "cohort written: %d studies in %.1f s (%.1f studies/s)",
        len(tasks),
        elapsed,
        timing["studies_per_s"],
    )
    return {**cohort, "timing": timing}


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(
            fh, fieldnames=list(columns), quoting=csv.QUOTE_MINIMAL, lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)


def _history_summary(res: list[StudyResult]) -> dict[str, Any]:
    """Followed patients and studies, and per finding how often each change occurred over
    their later visits."""
    later = [dict(r.changes) for r in res if r.changes]
    return {
        "followed_patients": len({r.truth_row["patient_course"] for r in res if r.course}),
        "followed_studies": sum(r.course for r in res),
        "interval_changes": {
            f: {c: k for c in CHANGES if (k := sum(v[f] == c for v in later))} for f in FINDINGS
        },
    }


def _site_summary(prof: SiteProfile, task: StudyTask, res: list[StudyResult]) -> dict[str, Any]:
    n = len(res)
    return {
        "profile": prof.name,
        "institution": prof.institution,
        "studies": n,
        "prevalence": {f: round(sum(f in r.findings for r in res) / n, 4) for f in FINDINGS},
        "no_finding": round(sum(not r.findings for r in res) / n, 4),
        "ap_fraction": round(sum(r.view == "AP" for r in res) / n, 4),
        **({"ct_studies": k} if (k := sum(r.view == "CT" for r in res)) else {}),
        "modality": prof.modality,
        "transfer_syntax": UID(prof.transfer_syntax).name,
        "photometric": prof.photometric,
        "bits_stored": prof.detector.bits_stored,
        "rows": task.rows,
        "cols": task.cols,
        "pixel_spacing_mm": task.spacing_mm,
        "manufacturer": prof.manufacturer,
    }


__all__ = ["GROUND_TRUTH_COLUMNS", "HISTORY_COLUMNS", "REPORT_COLUMNS", "generate_cohort"]
