"""A site's data directory -> usable studies (image + report), what was skipped and why, and cache.

The walk decodes every file in a process pool (decoding is the slow part), joins images to the
report export by AccessionNumber, de-identifies, scrubs and labels the reports, and writes the
preprocessed tensors with pseudonymous names to an on-disk cache so training never touches the
raw files again. Nothing here logs a path, a header value or report text.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
from pydicom.dataset import Dataset

from fedrad.client.ingest.decode_pool import WORKER_ENDED, map_isolated
from fedrad.client.ingest.deid import (
    PhiValues,
    PseudonymKey,
    collect_phi,
    header_date,
    load_or_create_key,
    scrub_text,
)
from fedrad.client.ingest.dicom_io import (
    RADIOGRAPH_MODALITIES,
    READ_ERRORS,
    DicomFile,
    UnusableError,
    decode_radiograph,
    read_dicom_handle,
)
from fedrad.client.ingest.report_export import (
    REPORTS_FILE,
    ReportRow,
    row_problem,
    site_report_rows,
)
from fedrad.client.ingest.series import (
    Frame,
    assemble_series,
    is_volume_candidate,
    read_frames,
)
from fedrad.client.ingest.site_files import (
    CACHE_DIRNAME,
    RefusedFileError,
    SiteFile,
    SiteListing,
    open_site_file,
    site_file,
    walk_site,
)
from fedrad.common.findings import FINDINGS
from fedrad.common.interval import stated_sizes
from fedrad.common.labeling.labeler import label_report
from fedrad.common.modality import RADIOGRAPH, VOLUME_MODALITIES
from fedrad.common.model.preprocess import PreprocessConfig, preprocess, preprocess_volume

logger = logging.getLogger(__name__)

NON_IMAGE_FILES: Final[frozenset[str]] = frozenset(
    {REPORTS_FILE, "ground_truth.csv", "cohort.json"}
)
FRONTAL_VIEWS: Final[tuple[str, ...]] = ("PA", "AP")
ACCEPTED_MODALITIES: Final[frozenset[str]] = RADIOGRAPH_MODALITIES | VOLUME_MODALITIES
"""What a site reads by default: projection radiographs and CT / MR series."""
SERIES_CPU_SECONDS: Final[int] = 600
"""CPU time one series may take to read and resample (a 500-slice CT decodes in a minute)."""


class SiteDataError(Exception):
    """A fatal problem with the whole directory (missing, empty, unreadable report export)."""


@dataclass(frozen=True)
class Skipped:
    path: str  # relative to the data directory
    reason: str


@dataclass
class FileResult:
    """What the pool returns for one file; `image` only when a cache entry was requested."""

    rel_path: str
    decoded: bool = False
    reason: str | None = None
    accession: str = ""
    view: str = ""
    sop_uid: str = ""
    phi: PhiValues = field(default_factory=PhiValues.empty)
    image: np.ndarray | None = None
    frames: list[Frame] | None = None  # a CT/MR file: its frames' geometry (pixels dropped)
    patient: str = ""  # PatientID, in memory only: links a patient's studies at the site
    study_date: dt.date | None = None


@dataclass
class SeriesResult:
    """What the pool returns for one series: the resampled volume, or why it is not one."""

    key: tuple[str, str]
    volume: np.ndarray | None = None
    reason: str | None = None
    slices: int = 0
    modality: str = ""
    set_aside: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Study:
    """One usable study; raw identifiers stay in memory at the site and are never written."""

    accession: str
    image_path: str
    report: str  # scrubbed of header PHI
    indication: str  # scrubbed of header PHI
    labels: dict[str, int]
    sides: dict[str, str | None]
    nodule_size_mm: float | None
    view: str
    modality: str = RADIOGRAPH
    slices: int = 0  # a volume's slice count (0 for a radiograph)
    patient: str = ""  # PatientID as the header states it (memory only; the cache keys it)
    study_date: dt.date | None = None
    sizes: dict[str, float] = field(default_factory=dict)  # what the report grades


@dataclass
class SiteScan:
    files_seen: int = 0
    images_decoded: int = 0
    series_seen: int = 0
    series_usable: int = 0
    reports_rows: int = 0
    reports_file: bool = True
    studies: list[Study] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        """The JSON that `fedrad-site check --json` prints (site-local: it names files)."""
        positives = {f: sum(1 for s in self.studies if s.labels[f] == 1) for f in FINDINGS}
        uncertain = {f: sum(1 for s in self.studies if s.labels[f] == -1) for f in FINDINGS}
        return {
            "files_seen": self.files_seen,
            "images_decoded": self.images_decoded,
            "reports": self.reports_rows,
            "reports_file": self.reports_file,
            "usable": len(self.studies),
            "series": {"seen": self.series_seen, "usable": self.series_usable},
            "usable_by_modality": {
                m: sum(1 for s in self.studies if s.modality == m)
                for m in sorted({s.modality for s in self.studies})
            },
            "labels_present": positives,
            "labels_uncertain": uncertain,
            "skipped": [asdict(s) for s in sorted(self.skipped, key=lambda s: s.path)],
        }


def list_site(data_dir: Path) -> SiteListing:
    """The image files a scan reads, and every entry refused on the way (`site_files.py`)."""
    return walk_site(data_dir, skip_names=NON_IMAGE_FILES)


def _inspect_file(
    entry: SiteFile,
    modalities: frozenset[str],
    config: PreprocessConfig | None,
) -> FileResult:
    """Runs in a worker process: open, read, check, decode, optionally preprocess one file."""
    result = FileResult(rel_path=entry.rel_path)
    try:
        with open_site_file(entry) as handle:
            dicom = read_dicom_handle(handle, entry.size)
        ds = dicom.dataset
        volume_kinds = modalities & VOLUME_MODALITIES
        if volume_kinds and is_volume_candidate(ds):
            return _inspect_series_file(result, dicom, volume_kinds)
        image = decode_radiograph(
            dicom, modalities=modalities, on_decoded=lambda: setattr(result, "decoded", True)
        )
        try:
            result.accession = str(ds.get("AccessionNumber", "") or "").strip()
            result.view = str(ds.get("ViewPosition", "") or "").strip().upper()
            result.sop_uid = str(ds.get("SOPInstanceUID", "") or "")
            result.phi = collect_phi(ds)
            result.patient, result.study_date = patient_and_date(ds)
        except READ_ERRORS as exc:
            raise UnusableError(f"malformed header ({type(exc).__name__})") from exc
        if not result.accession:
            raise UnusableError("no AccessionNumber in header (cannot join to a report)")
        if config is not None:
            result.image = preprocess(image.pixels, config).numpy().astype(np.float16)
    except (UnusableError, RefusedFileError) as exc:
        result.reason = str(exc)
        result.image = None
    except MemoryError:
        result.reason = "reading it needs more memory than a file may use (worker memory limit)"
        result.image = None
    except Exception as exc:
        logger.warning("a file could not be read: %s (a fedrad bug; reported)", type(exc).__name__)
        result.reason = f"could not be read ({type(exc).__name__} in fedrad; please report it)"
        result.image = None
    return result


def patient_and_date(ds: Dataset) -> tuple[str, dt.date | None]:
    """PatientID and StudyDate as the header states them (None for a missing or malformed
    date): what links a patient's studies in order at the site."""
    return str(ds.get("PatientID", "") or "").strip(), header_date(ds, "StudyDate")


def _inspect_series_file(
    result: FileResult, dicom: DicomFile, modalities: frozenset[str]
) -> FileResult:
    """A CT/MR file: its frames are read (so an undecodable one is found now) and only their
    geometry kept; the series is assembled once all its files are known."""
    frames = read_frames(dicom, rel_path=result.rel_path, modalities=modalities)
    result.decoded = True
    ds = dicom.dataset
    try:
        result.accession = str(ds.get("AccessionNumber", "") or "").strip()
        result.sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        result.phi = collect_phi(ds)
        result.patient, result.study_date = patient_and_date(ds)
    except READ_ERRORS as exc:
        raise UnusableError(f"malformed header ({type(exc).__name__})") from exc
    if not result.accession:
        raise UnusableError("no AccessionNumber in header (cannot join to a report)")
    empty = np.zeros((0, 0), dtype=np.float32)
    result.frames = [dataclasses.replace(f, pixels=empty) for f in frames]
    return result


def _read_series(
    job: tuple[tuple[str, str], list[SiteFile], PreprocessConfig | None, frozenset[str]],
) -> SeriesResult:
    """Runs in a worker process: reads every file of one series, assembles the volume (the
    geometry checks of `series.py`) and resamples it to the model's grid."""
    key, entries, config, modalities = job
    result = SeriesResult(key=key)
    try:
        frames: list[Frame] = []
        for entry in entries:
            with open_site_file(entry) as handle:
                dicom = read_dicom_handle(handle, entry.size)
            frames.extend(read_frames(dicom, rel_path=entry.rel_path, modalities=modalities))
        volume = assemble_series(frames)
        result.slices = int(volume.voxels.shape[0])
        result.modality = volume.modality
        result.set_aside = volume.set_aside
        if config is not None:
            try:
                tensor = preprocess_volume(
                    volume.voxels, volume.orientation, volume.modality, config
                )
            except ValueError as exc:
                raise UnusableError(str(exc)) from exc
            result.volume = tensor.numpy().astype(np.float16)
    except (UnusableError, RefusedFileError) as exc:
        result.reason = str(exc)
    except MemoryError:
        result.reason = "reading it needs more memory than a series may use (worker memory limit)"
    except Exception as exc:
        logger.warning(
            "a series could not be read: %s (a fedrad bug; reported)", type(exc).__name__
        )
        result.reason = f"could not be read ({type(exc).__name__} in fedrad; please report it)"
    return result


def _series_crashed(
    job: tuple[tuple[str, str], list[SiteFile], PreprocessConfig | None, frozenset[str]],
) -> SeriesResult:
    return SeriesResult(key=job[0], reason=WORKER_ENDED)


def _inspect_star(args: tuple[SiteFile, frozenset[str], PreprocessConfig | None]) -> FileResult:
    return _inspect_file(*args)


def _crashed(args: tuple[SiteFile, frozenset[str], PreprocessConfig | None]) -> FileResult:
    return FileResult(
        rel_path=args[0].rel_path,
        reason=WORKER_ENDED,
    )


def _study_patient(candidates: list[FileResult]) -> tuple[str, dt.date | None]:
    """The study's patient and date when its files agree on them; a study whose files name
    two patients (or two dates) links to no one: a comparison is never made across patients."""
    patients = {c.patient for c in candidates}
    dates = {c.study_date for c in candidates}
    patient = patients.pop() if len(patients) == 1 else ""
    day = dates.pop() if len(dates) == 1 else None
    return patient, day


def _pick_image(candidates: list[FileResult]) -> FileResult:
    """A frontal view if there is one, else the first file in path order."""
    for view in FRONTAL_VIEWS:
        for cand in candidates:
            if cand.view == view:
                return cand
    return candidates[0]


def _assemble_reported_series(
    series_files: dict[tuple[str, str], list[FileResult]],
    reports: dict[str, ReportRow],
    listing: SiteListing,
    config: PreprocessConfig | None,
    modalities: frozenset[str],
    workers: int,
    scan: SiteScan,
) -> dict[tuple[str, str], SeriesResult]:
    """Every series of a study with a report, read whole in a worker (the volume, or why it
    is not one); series of studies without a report are not read again."""
    entries = {entry.rel_path: entry for entry in listing.files}
    jobs = []
    for key, files in sorted(series_files.items()):
        if not any(f.accession in reports for f in files):
            continue
        paths = sorted({f.rel_path for f in files})
        jobs.append((key, [entries[p] for p in paths], config, modalities & VOLUME_MODALITIES))
    results = map_isolated(
        _read_series,
        jobs,
        workers=workers or min(os.cpu_count() or 1, 8),
        on_crash=_series_crashed,
        cpu_seconds=SERIES_CPU_SECONDS,
    )
    out = {result.key: result for result in results}
    scan.series_usable = sum(1 for r in results if r.reason is None)
    return out


def _pick_series(
    candidates: list[FileResult], volumes: dict[tuple[str, str], SeriesResult]
) -> tuple[str, str] | None:
    """The study's usable series (those its own files belong to) with the most slices (the
    thinnest reconstruction)."""
    keys = {(f.study_uid, f.series_uid) for c in candidates for f in c.frames or ()}
    usable = [k for k in keys if k in volumes and volumes[k].reason is None]
    return max(usable, key=lambda k: (volumes[k].slices, k), default=None)


def _series_failed(cand: FileResult, volumes: dict[tuple[str, str], SeriesResult]) -> bool:
    keys = {(f.study_uid, f.series_uid) for f in cand.frames or ()}
    return any(k in volumes and volumes[k].reason is not None for k in keys)


def _series_reason(cand: FileResult, volumes: dict[tuple[str, str], SeriesResult]) -> str:
    """Why a file of a study's series was not used: its series' own refusal."""
    for frame_key in {(f.study_uid, f.series_uid) for f in cand.frames or ()}:
        result = volumes.get(frame_key)
        if result is not None and result.reason is not None:
            return f"series not used: {result.reason}"
    return "series not used"


def _reports_entry(data_dir: Path) -> tuple[SiteFile | None, Skipped | None]:
    """The report export if present and a regular file inside the directory; a refusal
    otherwise (a link to a file elsewhere is refused like any other link). Its header is read
    here: a broken export is fatal (SiteDataError), said before minutes of decoding."""
    path = data_dir.resolve() / REPORTS_FILE
    if not os.path.lexists(path):
        return None, None
    try:
        entry = site_file(path, data_dir.resolve())
        rows = _report_rows(entry)
        try:
            next(rows, None)
        finally:
            rows.close()
    except RefusedFileError as exc:
        return None, Skipped(REPORTS_FILE, f"report export refused: {exc}")
    return entry, None


def _report_rows(entry: SiteFile) -> Iterator[ReportRow]:
    """The export's rows, streamed from the same file the walk listed."""
    with open_site_file(entry) as handle:
        yield from site_report_rows(handle, entry.path, SiteDataError)


def scan_site(
    data_dir: Path,
    *,
    modalities: frozenset[str] = ACCEPTED_MODALITIES,
    config: PreprocessConfig | None = None,
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> tuple[SiteScan, dict[str, np.ndarray]]:
    """Walks, decodes, joins and labels; with `config`, also returns preprocessed images by path."""
    if not data_dir.exists():
        raise SiteDataError(f"data directory does not exist: {data_dir}")
    if not data_dir.is_dir():
        raise SiteDataError(f"not a directory: {data_dir}")
    listing = list_site(data_dir)
    reports_entry, reports_refused = _reports_entry(data_dir)
    if not (listing.files or listing.refused or reports_entry or reports_refused):
        raise SiteDataError(f"data directory is empty: {data_dir}")
    if reports_entry is not None:
        no_report_reason = "study has no report in reports.csv"
    elif reports_refused is not None:
        no_report_reason = "study has no report (reports.csv was refused)"
    else:
        no_report_reason = "study has no report (no reports.csv in the data directory)"
    if on_total:
        on_total(len(listing.files))
    jobs = [(entry, modalities, config) for entry in listing.files]
    results = map_isolated(
        _inspect_star,
        jobs,
        workers=workers or min(os.cpu_count() or 1, 8),
        on_crash=_crashed,
        progress=progress,
    )

    scan = SiteScan(files_seen=len(listing.files) + len(listing.refused))
    scan.reports_file = reports_entry is not None
    scan.skipped.extend(Skipped(path, reason) for path, reason in listing.refused)
    if reports_refused is not None:
        scan.skipped.append(reports_refused)
    scan.images_decoded = sum(r.decoded for r in results)
    by_accession: dict[str, list[FileResult]] = {}
    series_files: dict[tuple[str, str], list[FileResult]] = {}
    for res in results:
        if res.reason is not None:
            scan.skipped.append(Skipped(res.rel_path, res.reason))
        else:
            by_accession.setdefault(res.accession, []).append(res)
            for frame_key in {(f.study_uid, f.series_uid) for f in res.frames or ()}:
                series_files.setdefault(frame_key, []).append(res)
    scan.series_seen = len(series_files)

    report_by_accession: dict[str, ReportRow] = {}
    seen: set[str] = set()
    if reports_entry is not None:
        try:
            for row in _report_rows(reports_entry):
                scan.reports_rows += 1
                where = f"{REPORTS_FILE}:{row.line}"
                problem = row_problem(row)
                if problem is not None:
                    scan.skipped.append(Skipped(where, problem))
                elif row.accession in seen:
                    scan.skipped.append(
                        Skipped(where, "duplicate report for an accession (first kept)")
                    )
                elif row.accession not in by_accession:
                    seen.add(row.accession)
                    scan.skipped.append(Skipped(where, "report has no matching DICOM study"))
                else:
                    seen.add(row.accession)
                    report_by_accession[row.accession] = row
        except RefusedFileError as exc:
            raise SiteDataError(f"{REPORTS_FILE}: {exc}") from exc

    volumes = _assemble_reported_series(
        series_files, report_by_accession, listing, config, modalities, workers, scan
    )
    images: dict[str, np.ndarray] = {}
    for accession, candidates in by_accession.items():
        row = report_by_accession.get(accession)
        if row is None:
            for cand in candidates:
                scan.skipped.append(Skipped(cand.rel_path, no_report_reason))
            continue
        chosen_series = _pick_series(candidates, volumes)
        volume_files = {c.rel_path for c in candidates if c.frames}
        if chosen_series is not None:
            series = volumes[chosen_series]
            used = {r.rel_path for r in series_files[chosen_series]}
            aside = dict(series.set_aside)
            for cand in candidates:
                if cand.rel_path in aside:
                    scan.skipped.append(Skipped(cand.rel_path, aside[cand.rel_path]))
                elif cand.rel_path not in used and _series_failed(cand, volumes):
                    scan.skipped.append(Skipped(cand.rel_path, _series_reason(cand, volumes)))
                elif cand.rel_path not in used:
                    scan.skipped.append(
                        Skipped(cand.rel_path, "another image or series of a study (one is used)")
                    )
            chosen_path = min(used - set(aside)) if used - set(aside) else min(used)
            view, modality, slices = "", series.modality, series.slices
            image = series.volume
        else:
            radiographs = [c for c in candidates if c.rel_path not in volume_files]
            for cand in candidates:
                if cand.rel_path in volume_files:
                    scan.skipped.append(Skipped(cand.rel_path, _series_reason(cand, volumes)))
            if not radiographs:
                continue
            chosen = _pick_image(radiographs)
            for cand in radiographs:
                if cand is not chosen:
                    scan.skipped.append(
                        Skipped(
                            cand.rel_path, "additional image of a study (one frontal view is used)"
                        )
                    )
            chosen_path, view, modality, slices = chosen.rel_path, chosen.view, RADIOGRAPH, 0
            image = chosen.image
        phi = PhiValues.empty()
        for cand in candidates:
            phi = phi.merge(cand.phi)
        report = scrub_text(row.report, phi)
        labels = label_report(report)
        patient, study_date = _study_patient(candidates)
        scan.studies.append(
            Study(
                accession=accession,
                image_path=chosen_path,
                report=report,
                indication=scrub_text(row.indication, phi),
                labels=dict(labels.labels),
                sides=dict(labels.sides),
                nodule_size_mm=labels.nodule_size_mm,
                view=view,
                modality=modality,
                slices=slices,
                patient=patient,
                study_date=study_date,
                sizes=stated_sizes(report, labels),
            )
        )
        if image is not None:
            images[chosen_path] = image
    scan.studies.sort(key=lambda s: s.image_path)
    logger.info(
        "site scan: %d files, %d decoded, %d usable studies, %d skipped",
        scan.files_seen,
        scan.images_decoded,
        len(scan.studies),
        len(scan.skipped),
    )
    return scan, images


# ---------------------------------------------------------------------------------------------
# Cache


@dataclass(frozen=True)
class CachedStudy:
    """What training reads: pseudonymous id, tensor file, scrubbed text and derived labels."""

    study_id: str
    image_file: str
    report: str
    indication: str
    labels: dict[str, int]
    sides: dict[str, str | None]
    nodule_size_mm: float | None
    view: str
    modality: str = RADIOGRAPH  # manifests written before volumes hold radiographs only
    patient: str = ""  # keyed pseudonym of PatientID ("" unknown): links a patient's studies
    day: int | None = None  # study date as a day number, shifted by a keyed per-patient offset
    sizes: dict[str, float] = field(default_factory=dict)  # `interval.stated_sizes`


def default_cache_dir(data_dir: Path) -> Path:
    return data_dir / CACHE_DIRNAME


def site_cache_dir(data_dir: Path, cache_dir: Path | None = None) -> Path:
    """Where a site's prepared data lives: the cache it named, else inside its data directory."""
    return cache_dir if cache_dir is not None else default_cache_dir(data_dir)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cache_link_problem(data_dir: Path, cache: Path) -> str | None:
    """Why `cache` is not written: it is the default cache inside the data directory and a
    link. The export may hold a planted `.fedrad-cache` link that would send the de-identified
    copy and the pseudonym key elsewhere; a cache the site named may be a link (its choice)."""
    if cache == default_cache_dir(data_dir) and cache.is_symlink():
        return (
            f"{cache} is a symbolic link: the prepared-data cache inside the data directory "
            "is never written through a link"
        )
    return None


def _check_cache_paths(data_dir: Path, cache_dir: Path, folders: list[Path]) -> None:
    """The cache is written only where it is: not through a linked default cache, and nothing
    inside it may lead out of it."""
    problem = _cache_link_problem(data_dir, cache_dir)
    if problem is not None:
        raise SiteDataError(f"{problem} (remove it, or set cache_dir in site.toml)")
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        if not folder.resolve().is_relative_to(cache_dir.resolve()):
            raise SiteDataError(f"{folder} leads out of the cache at {cache_dir} (a link)")


def prepare_site(
    data_dir: Path,
    cache_dir: Path,
    *,
    config: PreprocessConfig,
    modalities: frozenset[str] = ACCEPTED_MODALITIES,
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> tuple[SiteScan, Path]:
    """Scans and writes the de-identified cache; returns the scan and the manifest path."""
    root = cache_dir / config.fingerprint()
    _check_cache_paths(data_dir, cache_dir, [root, root / "images"])
    try:
        key = load_or_create_key(cache_dir / "pseudonym.key")
    except ValueError as exc:
        raise SiteDataError(str(exc)) from exc
    scan, images = scan_site(
        data_dir,
        modalities=modalities,
        config=config,
        workers=workers,
        progress=progress,
        on_total=on_total,
    )
    entries = []
    for study in scan.studies:
        study_id = key.token(study.accession, namespace="accession")
        image_file = f"images/{study_id}.npy"
        buffer = _npy_bytes(images[study.image_path])
        _atomic_write(root / image_file, buffer)
        entries.append(
            CachedStudy(
                study_id=study_id,
                image_file=image_file,
                report=study.report,
                indication=study.indication,
                labels=study.labels,
                sides=study.sides,
                nodule_size_mm=study.nodule_size_mm,
                view=study.view,
                modality=study.modality,
                patient=key.token(study.patient, namespace="patient") if study.patient else "",
                day=_shifted_day(key, study.patient, study.study_date),
                sizes=study.sizes,
            )
        )
    manifest = {
        "preprocess": asdict(config),
        "studies": [asdict(e) for e in sorted(entries, key=lambda e: e.study_id)],
    }
    manifest_path = root / "manifest.json"
    _atomic_write(manifest_path, json.dumps(manifest, indent=1).encode())
    logger.info("cache written: %d studies", len(entries))
    return scan, manifest_path


DATE_SHIFT_DAYS: Final[int] = 3650


def _shifted_day(key: PseudonymKey, patient: str, day: dt.date | None) -> int | None:
    """A study's date as a day number moved by an offset keyed on the patient: a patient's
    studies keep their order and spacing, and the cache holds no calendar date."""
    if day is None or not patient:
        return None
    offset = int(key.token(patient, namespace="date-shift", length=8), 16) % DATE_SHIFT_DAYS
    return day.toordinal() - offset


def cache_is_fresh(manifest: Path, data_dir: Path) -> bool:
    """A cache is reused only if it is newer than every file of the site and its reports (as
    `lstat` sees them: a link is judged, never what it points at)."""
    if not manifest.is_file():
        return False
    built = manifest.stat().st_mtime
    reports = data_dir / REPORTS_FILE
    return all(entry.mtime <= built for entry in list_site(data_dir).files) and (
        not os.path.lexists(reports) or os.lstat(reports).st_mtime <= built
    )


def manifest_path(
    data_dir: Path, *, config: PreprocessConfig, cache_dir: Path | None = None
) -> Path:
    """Where the site's cache (by default inside its data directory) keeps the manifest for
    this preprocessing."""
    return site_cache_dir(data_dir, cache_dir) / config.fingerprint() / "manifest.json"


def prepared_manifest(
    data_dir: Path, *, config: PreprocessConfig, workers: int = 0, cache_dir: Path | None = None
) -> Path:
    """The site's manifest in its cache, (re)built when missing or stale."""
    manifest = manifest_path(data_dir, config=config, cache_dir=cache_dir)
    if not cache_is_fresh(manifest, data_dir):
        cache = site_cache_dir(data_dir, cache_dir)
        _, manifest = prepare_site(data_dir, cache, config=config, workers=workers)
    return manifest


def cache_write_problem(
    data_dir: Path, cache_dir: Path | None = None, *, fix: str = "set cache_dir in site.toml"
) -> str | None:
    """Why the prepared-data cache cannot be created (a read-only export, or a planted link in
    place of the default cache), or None; `fix` says how to name another place. A cache that
    already exists is not judged: one prepared elsewhere may be read-only."""
    cache = site_cache_dir(data_dir, cache_dir)
    link = _cache_link_problem(data_dir, cache)
    if link is not None:
        return f"{link}; remove it, or {fix}"
    if cache.is_dir():
        return None
    existing = cache
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"cache location {cache} is under a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        hint = "" if cache_dir is not None else f"; {fix} to a writable place"
        return f"cannot write the prepared-data cache at {cache} ({existing} is read-only){hint}"
    return None


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def load_manifest(manifest_path: Path) -> list[CachedStudy]:
    data = json.loads(manifest_path.read_text())
    return [CachedStudy(**entry) for entry in data["studies"]]


def load_cached_image(manifest_path: Path, study: CachedStudy) -> np.ndarray:
    return np.load(manifest_path.parent / study.image_file, allow_pickle=False)
