"""What a clinician's page shows for one reading: the scan and its maps, the head's
probabilities at the site's thresholds, the report, the comparison with the prior, the answer.

Assembled from what the reading already produced (`inference.ScanAnswer`) plus one explanation
map per finding the head suggests (`explain.py`); rendered by `page.py`. Only de-identified
pixels (the model's own input) and derived values reach the page: no header value is read here.
"""

from __future__ import annotations

import datetime as dt
import logging

import numpy as np

from fedrad.client.ingest.dataset import encode_context
from fedrad.client.reading.comparison import Comparison, Scan
from fedrad.client.reading.explain import (
    explain_findings,
    image_png,
    overlay_png,
    volume_overlay_png,
    volume_png,
)
from fedrad.client.reading.inference import ScanAnswer
from fedrad.client.reading.page import PageContent, PageFinding, PriorComparison
from fedrad.common.findings import DISPLAY_NAMES, FINDINGS
from fedrad.common.model.checkpoint import FORMAT_VERSION
from fedrad.common.model.radiology_model import RadiologyModel
from fedrad.common.tasks import Thresholds

logger = logging.getLogger(__name__)


def scan_png(scan: Scan) -> bytes:
    """The de-identified model input as a picture (three planes for a volume)."""
    array = scan.tensor[0, 0].numpy()
    return volume_png(array) if array.ndim == 3 else image_png(array)


def page_content(
    model: RadiologyModel,
    current: Scan,
    prior: Scan | str | None,
    result: ScanAnswer,
    *,
    question: str | None,
    thresholds: Thresholds,
    indication: str = "",
) -> PageContent:
    """The page for one reading; a map is drawn for each finding decided present or possible."""
    suggested = [f for f in FINDINGS if result.decisions[f] != 0]
    context = encode_context(model.tokenizer, indication, model.config.max_prompt_tokens)
    maps = {m.finding: m for m in explain_findings(model, current.tensor, context, suggested)}
    array = current.tensor[0, 0].numpy()
    findings = []
    for f in FINDINGS:
        found = maps.get(f)
        png = None
        if found is not None:
            png = _overlay(array, found.heat)
        findings.append(
            PageFinding(
                name=_title(DISPLAY_NAMES[f]),
                probability=result.findings[f],
                threshold=thresholds.present,
                suggested=result.decisions[f] != 0,
                side=result.sides.get(f),
                map_png=png,
                map_note=_map_note(found.method, array.ndim) if found is not None else None,
                possible_threshold=thresholds.possible,
            )
        )
    return PageContent(
        scan_description=current.description,
        image_png=scan_png(current),
        findings=tuple(findings),
        report=result.report,
        report_source=result.report_source,
        prior=_prior(result.comparison, prior),
        question=question,
        answer=result.answer,
        notes=result.notes,
        model_description=f"{model.config.preset} preset, checkpoint format {FORMAT_VERSION}",
        generated=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )


def _overlay(array: np.ndarray, heat: np.ndarray) -> bytes:
    return volume_overlay_png(array, heat) if array.ndim == 3 else overlay_png(array, heat)


METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++"}


def _map_note(method: str, dims: int) -> str:
    where = "axial, coronal and sagittal planes through the map's peak; " if dims == 3 else ""
    return (
        f"{METHOD_NAMES.get(method, method)} at the image encoder's last stage ({where}coarse: "
        "a region, not an outline; see the model card on where maps are not faithful)"
    )


def _prior(comparison: Comparison | None, prior: Scan | str | None) -> PriorComparison | None:
    if comparison is None:
        return None
    if not comparison.compared:
        return PriorComparison(
            compared=False,
            reason=comparison.reason,
            days_before=None,
            changes=(),
            statement="",
        )
    changes = tuple(
        (_title(DISPLAY_NAMES[f]), c, comparison.probabilities[f][c])
        for f in FINDINGS
        if (c := comparison.changes[f]) != "absent"
    )
    return PriorComparison(
        compared=True,
        reason=None,
        days_before=comparison.days_before,
        changes=changes,
        statement=comparison.statement,
        prior_png=scan_png(prior) if isinstance(prior, Scan) else None,
    )


def _title(name: str) -> str:
    return name[:1].upper() + name[1:]
