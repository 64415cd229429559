"""One scan in, a report, finding probabilities and an answer out: the site's inference path.

The scan goes through exactly the steps training data went through: decode, header checks,
keep-list de-identification, display conversion, MONAI preprocessing at the model's size.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedrad.client.ingest.dataset import encode_context, encode_prompt
from fedrad.client.ingest.decode_pool import WORKER_ENDED, map_isolated
from fedrad.client.ingest.deid import PseudonymKey, deidentify_dataset
from fedrad.client.ingest.dicom_io import (
    RADIOGRAPH_MODALITIES,
    UnusableError,
    decode_pixels,
    decode_radiograph,
    read_dicom,
    to_display,
)
from fedrad.client.reading.consistency import answer_notes, report_notes
from fedrad.common.findings import FINDINGS
from fedrad.common.model.preprocess import PreprocessConfig, preprocess
from fedrad.common.model.radiology_model import RadiologyModel
from fedrad.common.tasks import qa_prompt, report_prompt, suggestions


@dataclass(frozen=True)
class ScanAnswer:
    report: str
    findings: dict[str, float]
    answer: str | None
    notes: tuple[str, ...] = ()  # where the report or answer disagrees with the finding head


def scan_tensor(
    path: Path, image_size: int, *, modalities: frozenset[str] = RADIOGRAPH_MODALITIES
) -> torch.Tensor:
    """(1, 1, S, S) model input from a DICOM file; UnusableError with a reason otherwise. The
    file is read in a worker process under the ingestion limits, so a decoder that aborts or
    loops on it ends that worker, not the command."""
    [pixels] = map_isolated(
        _scan_pixels, [(path, image_size, modalities)], workers=1, on_crash=_scan_crashed
    )
    if isinstance(pixels, str):
        raise UnusableError(pixels)
    return torch.from_numpy(pixels).unsqueeze(0)


def _scan_pixels(job: tuple[Path, int, frozenset[str]]) -> np.ndarray | str:
    """Runs in the worker: the preprocessed image, or the reason it cannot be read."""
    path, image_size, modalities = job
    try:
        dicom = read_dicom(path)
        decode_radiograph(dicom, modalities=modalities)
        # The pixels are re-derived from the de-identified header so that nothing the keep-list
        # dropped can influence the model input (the ephemeral key is never stored).
        clean = deidentify_dataset(dicom.dataset, PseudonymKey(secrets.token_bytes(32)))
        pixels = to_display(decode_pixels(dicom), clean)
        return preprocess(pixels, PreprocessConfig(image_size=image_size)).numpy()
    except UnusableError as exc:
        return str(exc)


def _scan_crashed(job: tuple[Path, int, frozenset[str]]) -> str:
    return WORKER_ENDED


def answer_scan(
    model: RadiologyModel,
    image: torch.Tensor,
    *,
    indication: str = "",
    question: str | None = None,
    num_beams: int = 1,
) -> ScanAnswer:
    tok = model.tokenizer
    limit = model.config.max_prompt_tokens
    probs = model.finding_probabilities(image, [encode_context(tok, indication, limit)])[0]
    findings = {f: float(p) for f, p in zip(FINDINGS, probs, strict=True)}
    suggested = suggestions(findings)
    prompt, _ = encode_prompt(tok, indication, report_prompt(suggested), limit)
    report = model.generate(
        image, [prompt], max_new_tokens=model.config.max_target_tokens, num_beams=num_beams
    )[0]
    answer = None
    shown = {f: round(p, 4) for f, p in findings.items()}  # notes quote what is shown
    notes = report_notes(report, shown)
    if question is not None:
        q_prompt, _ = encode_prompt(tok, indication, qa_prompt(suggested, question), limit)
        answer = model.generate(image, [q_prompt], max_new_tokens=16, num_beams=num_beams)[0]
        notes += answer_notes(question, answer, shown)
    return ScanAnswer(report=report, findings=shown, answer=answer, notes=tuple(notes))
