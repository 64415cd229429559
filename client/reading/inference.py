"""One scan in, a report, finding probabilities and an answer out: the site's inference path.

The scan goes through exactly the steps training data went through: decode, header checks,
keep-list de-identification, display conversion, MONAI preprocessing at the model's size. A
scan is a radiograph (one file) or a volume: a CT or MR series (a directory of files, or one
multi-frame file), assembled and checked as ingestion does (`client/ingest/series.py`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydicom.dataset import Dataset

from fedrad.client.ingest.dataset import encode_context, encode_prompt
from fedrad.client.ingest.decode_pool import WORKER_ENDED, map_isolated
from fedrad.client.ingest.deid import PseudonymKey, deidentify_dataset
from fedrad.client.ingest.dicom_io import (
    RADIOGRAPH_MODALITIES,
    DicomFile,
    UnusableError,
    decode_pixels,
    decode_radiograph,
    read_dicom,
    read_dicom_handle,
    to_display,
)
from fedrad.client.ingest.series import (
    Frame,
    assemble_series,
    group_series,
    is_volume_candidate,
    read_frames,
)
from fedrad.client.ingest.site_data import patient_and_date
from fedrad.client.ingest.site_files import RefusedFileError, open_site_file, walk_site
from fedrad.client.reading.comparison import Comparison, Identity, Scan, compare
from fedrad.client.reading.consistency import answer_notes, report_notes
from fedrad.common.findings import DISPLAY_NAMES, FINDINGS
from fedrad.common.grounding import CANDIDATES, ground_answer, ground_report, needs_language_model
from fedrad.common.interval import interval_question
from fedrad.common.labeling.labeler import label_report
from fedrad.common.modality import RADIOGRAPH, VOLUME_MODALITIES
from fedrad.common.model.config import ModelConfig
from fedrad.common.model.preprocess import PreprocessConfig, preprocess, preprocess_volume
from fedrad.common.model.radiology_model import RadiologyModel
from fedrad.common.tasks import (
    Thresholds,
    head_sides,
    qa_prompt,
    report_prompt,
    side_table,
    suggestions,
)


@dataclass(frozen=True)
class ScanAnswer:
    report: str
    findings: dict[str, float]
    decisions: dict[str, int]  # the head's decision per finding, at the site's thresholds
    sides: dict[str, str | None]  # the side head's side per lateral finding not absent
    side_probabilities: dict[str, dict[str, float]]  # per lateral finding, left/right/bilateral
    report_source: str  # where the report's text came from (`GroundedReport.describe`)
    answer: str | None  # the answer as the reader sees it, probability included
    answer_value: str | None = None  # the short answer ("yes", "left", "cannot answer")
    notes: tuple[str, ...] = ()  # where the report or answer still disagrees with the head
    comparison: Comparison | None = None  # with the prior; None when none was given


def scan_tensor(
    path: Path,
    image_size: int,
    *,
    modalities: frozenset[str] = RADIOGRAPH_MODALITIES,
    key: PseudonymKey | None = None,
) -> torch.Tensor:
    """(1, 1, S, S) model input from a DICOM file; UnusableError with a reason otherwise. The
    file is read in a worker process under the ingestion limits, so a decoder that aborts or
    loops on it ends that worker, not the command."""
    return radiograph_scan(path, image_size, modalities=modalities, key=key)[0]


def radiograph_scan(
    path: Path,
    image_size: int,
    *,
    modalities: frozenset[str] = RADIOGRAPH_MODALITIES,
    key: PseudonymKey | None = None,
) -> tuple[torch.Tensor, Identity]:
    """The model input and the scan's identity (pseudonym under `key`, a fresh one if None)."""
    key = key or PseudonymKey(secrets.token_bytes(32))
    [result] = map_isolated(
        _scan_pixels, [(path, image_size, modalities, key)], workers=1, on_crash=_scan_crashed
    )
    if isinstance(result, str):
        raise UnusableError(result)
    pixels, identity = result
    return torch.from_numpy(pixels).unsqueeze(0), identity


def _scan_pixels(
    job: tuple[Path, int, frozenset[str], PseudonymKey],
) -> tuple[np.ndarray, Identity] | str:
    """Runs in the worker: the preprocessed image and its identity, or the reason it cannot
    be read."""
    path, image_size, modalities, key = job
    try:
        dicom = read_dicom(path)
        decode_radiograph(dicom, modalities=modalities)
        # The pixels are re-derived from the de-identified header so that nothing the keep-list
        # dropped can influence the model input.
        clean = deidentify_dataset(dicom.dataset, key)
        pixels = to_display(decode_pixels(dicom), clean)
        image = preprocess(pixels, PreprocessConfig(image_size=image_size)).numpy()
        return image, _identity(dicom.dataset, key)
    except UnusableError as exc:
        return str(exc)


def _identity(ds: Dataset, key: PseudonymKey) -> Identity:
    patient, day = patient_and_date(ds)
    return Identity(key.token(patient, namespace="patient") if patient else "", day)


def _scan_crashed(job: tuple[Path, int, frozenset[str], PseudonymKey]) -> str:
    return WORKER_ENDED


VOLUME_CPU_SECONDS = 600  # one series read, assembled and resampled in a worker


@dataclass(frozen=True)
class VolumeScan:
    """The model input from a series, and what was read to make it (no header values)."""

    tensor: torch.Tensor  # (1, 1, D, H, W)
    modality: str
    slices: int
    series_found: int  # series in the directory (the one with most slices is read)
    set_aside: int  # files or frames left out of the volume (localizers), with reasons logged
    identity: Identity = field(default_factory=lambda: Identity("", None))


def is_volume_path(path: Path) -> bool:
    """A directory (a series or a study), or one file whose header says CT or MR."""
    if path.is_dir():
        return True
    try:
        return is_volume_candidate(read_dicom(path).dataset)
    except UnusableError:
        return False


def volume_scan(
    path: Path,
    config: ModelConfig,
    *,
    modalities: frozenset[str],
    key: PseudonymKey | None = None,
) -> VolumeScan:
    """The (1, 1, D, H, W) input from a series directory or a multi-frame file, read in a
    worker under the ingestion limits; UnusableError with the reason when no series in it is
    one clean volume of a modality the model reads."""
    key = key or PseudonymKey(secrets.token_bytes(32))
    [result] = map_isolated(
        _volume_job,
        [(path, config.volume_shape, modalities, key)],
        workers=1,
        on_crash=_volume_crashed,
        cpu_seconds=VOLUME_CPU_SECONDS,
    )
    if isinstance(result, str):
        raise UnusableError(result)
    array, modality, slices, found, aside, identity = result
    readable = set(config.volume_modalities)
    if modality not in readable:
        raise UnusableError(
            f"a {modality} volume: this model was not trained on {modality} (it reads "
            f"radiographs and {', '.join(sorted(readable))} volumes)"
        )
    return VolumeScan(
        torch.from_numpy(array).unsqueeze(0), modality, slices, found, aside, identity
    )


def _volume_job(
    job: tuple[Path, tuple[int, int, int], frozenset[str], PseudonymKey],
) -> tuple[np.ndarray, str, int, int, int, Identity] | str:
    """Runs in the worker: every CT/MR file under `path` read from its de-identified header
    (nothing the keep-list drops reaches the model), grouped into series; the series with the
    most slices that assembles cleanly is resampled. Its files must agree on the patient and
    date for the volume to carry an identity."""
    path, shape, modalities, key = job
    try:
        frames: list[Frame] = []
        identities: set[Identity] = set()
        refused: list[str] = []
        entries = walk_site(path, skip_names=frozenset()).files if path.is_dir() else None
        sources = [(e.rel_path, e) for e in entries] if entries is not None else [(path.name, None)]
        for rel, entry in sources:
            try:
                if entry is None:
                    dicom = read_dicom(path)
                else:
                    with open_site_file(entry) as handle:
                        dicom = read_dicom_handle(handle, entry.size)
                if not is_volume_candidate(dicom.dataset):
                    refused.append("not a CT or MR image")
                    continue
                clean = deidentify_dataset(dicom.dataset, key)
                clean_file = DicomFile(clean, dicom.transfer_syntax)
                frames.extend(read_frames(clean_file, rel_path=rel, modalities=modalities))
                identities.add(_identity(dicom.dataset, key))
            except (UnusableError, RefusedFileError) as exc:
                refused.append(str(exc))
        if not frames:
            why = f" ({refused[0]})" if refused else ""
            return f"no CT or MR image to read{why}"
        groups = group_series(frames)
        reasons = []
        for _, series in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            try:
                volume = assemble_series(series)
            except UnusableError as exc:
                reasons.append(str(exc))
                continue
            try:
                tensor = preprocess_volume(
                    volume.voxels,
                    volume.orientation,
                    volume.modality,
                    PreprocessConfig(volume_shape=shape),
                )
            except ValueError as exc:
                reasons.append(str(exc))
                continue
            return (
                tensor.numpy(),
                volume.modality,
                int(volume.voxels.shape[0]),
                len(groups),
                len(volume.set_aside),
                identities.pop() if len(identities) == 1 else Identity("", None),
            )
        return "no series is one clean volume: " + "; ".join(dict.fromkeys(reasons))
    except UnusableError as exc:
        return str(exc)


def _volume_crashed(job: tuple[Path, tuple[int, int, int], frozenset[str], PseudonymKey]) -> str:
    return WORKER_ENDED


def read_scan(
    path: Path, config: ModelConfig, *, modalities: frozenset[str], key: PseudonymKey
) -> Scan:
    """A radiograph file, or a CT series (a directory or a multi-frame file), read as the
    model reads it; UnusableError with the reason otherwise. Two scans read with one `key`
    can be told to be the same patient or not."""
    if is_volume_path(path):
        volume = volume_scan(path, config, modalities=modalities & VOLUME_MODALITIES, key=key)
        described = f"{volume.modality} volume of {volume.slices} slices"
        if volume.series_found > 1:
            described += f" (the longest clean series of {volume.series_found})"
        return Scan(volume.tensor, volume.modality, described, volume.identity)
    tensor, identity = radiograph_scan(path, config.image_size, modalities=modalities, key=key)
    return Scan(tensor, RADIOGRAPH, "radiograph", identity)


def answer_scan(
    model: RadiologyModel,
    image: torch.Tensor,
    *,
    indication: str = "",
    question: str | None = None,
    num_beams: int = 1,
    candidates: int = CANDIDATES,
    thresholds: Thresholds | None = None,
    current: Scan | None = None,
    prior: Scan | str | None = None,
) -> ScanAnswer:
    """The heads decide each finding and its side; the report is written from those
    decisions and kept to them (`common/grounding.py`); a question is answered from the same
    decisions and report. With a `prior` (a Scan of `current`'s patient, or the reason the
    prior could not be read) the report states the comparison and interval questions are
    answered from it."""
    tok = model.tokenizer
    limit = model.config.max_prompt_tokens
    context = [encode_context(tok, indication, limit)]
    presence, by_side = model.diagnose(image, context)
    shown = {f: round(float(p), 4) for f, p in zip(FINDINGS, presence[0], strict=True)}
    decided = suggestions(shown, thresholds)  # decisions from what is shown, to the digit
    comparison = None
    if isinstance(prior, str):
        comparison = Comparison.left_out(prior)
    elif prior is not None:
        if current is None:
            raise ValueError("a prior is compared with the current Scan: pass current=")
        [before] = model.diagnose(prior.tensor, context)[0].tolist()
        comparison = compare(
            model,
            current,
            prior,
            shown=shown,
            decided=decided,
            prior_shown={f: round(p, 4) for f, p in zip(FINDINGS, before, strict=True)},
            thresholds=thresholds or Thresholds(),
        )
    side_probs = {
        f: {side: round(p, 4) for side, p in row.items()}
        for f, row in side_table(by_side[0].tolist()).items()
    }
    sides = head_sides(side_probs, decided)
    prompt, _ = encode_prompt(tok, indication, report_prompt(decided, sides), limit)
    [written] = model.generate_candidates(
        image,
        [prompt],
        max_new_tokens=model.config.max_target_tokens,
        candidates=candidates,
        num_beams=num_beams,
    )
    grounded = ground_report(written, decided, sides)
    text = grounded.text
    if comparison is not None and comparison.compared:
        text = f"{text}\n\nCOMPARISON: {comparison.statement}"  # the labeler reads past it
    read = label_report(text)
    notes = report_notes(read, decided, shown, sides)
    answer = value = None
    asked_change = interval_question(question) if question is not None else None
    if asked_change is not None:
        answer, value = _interval_answer(asked_change, comparison)
    elif question is not None:
        said = None
        if needs_language_model(question, decided, read, side_probs):
            q_prompt, _ = encode_prompt(tok, indication, qa_prompt(decided, question, sides), limit)
            [said] = model.generate(image, [q_prompt], max_new_tokens=16, num_beams=num_beams)
        grounded_answer = ground_answer(question, decided, shown, read, said, side_probs)
        answer, value = grounded_answer.text, grounded_answer.value
        notes += answer_notes(grounded_answer, decided, read)
    return ScanAnswer(
        report=text,
        findings=shown,
        decisions=decided,
        sides=sides,
        side_probabilities=side_probs,
        report_source=grounded.describe(len(written)),
        answer=answer,
        answer_value=value,
        notes=tuple(notes),
        comparison=comparison,
    )


def _interval_answer(finding: str, comparison: Comparison | None) -> tuple[str, str]:
    """(answer as shown, short answer) to "is the <finding> new, larger, ... since the
    prior?", from the interval head; "cannot answer" without a comparison."""
    if comparison is None:
        return "cannot answer: no prior study was given to compare with", "cannot answer"
    if not comparison.compared:
        return f"cannot answer: the comparison was left out ({comparison.reason})", "cannot answer"
    change = comparison.changes[finding]
    p = comparison.probabilities[finding][change]
    name = DISPLAY_NAMES[finding]
    said = "absent in both studies" if change == "absent" else change
    return f"{said} ({name}, probability {p:.3f} from the interval head)", change
