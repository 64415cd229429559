"""How faithful the explanation maps are, measured on held-out scans whose truth is known.

Why: a map over the image looks convincing whether or not it shows what drove the finding.
Here every scan carries exactly one finding, drawn in a seed namespace nothing trains on, with
the region the generator put it in (`common/synthetic/finding_regions.py`); each map is scored
by the pointing game, the overlap of its top pixels with the truth, the share of its mass
inside the truth, and a deletion test against random regions of the same size
(`client/reading/explain.py`). Each measure comes with what a map carrying no information
would score, so the numbers can be read.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from fedrad.client.ingest.dataset import encode_context
from fedrad.client.reading.explain import (
    DELETION_FRACTIONS,
    METHODS,
    POINTING_TOLERANCE,
    deletion_test,
    energy_inside,
    explain_findings,
    pointing_hit,
    top_overlap,
    within,
)
from fedrad.common.findings import DISPLAY_NAMES, FINDINGS
from fedrad.common.model.radiology_model import RadiologyModel
from fedrad.common.synthetic.finding_regions import (
    CT_STREAM,
    RADIOGRAPH_STREAM,
    draw_ct_with_region,
    draw_with_region,
    region_rng,
)
from fedrad.common.tasks import SUGGEST_THRESHOLD

logger = logging.getLogger(__name__)

RESULT_FILE: Final[str] = "explain.json"
TABLE_FILE: Final[str] = "explain.md"
DELETION_STREAM: Final[int] = 3  # the random regions' draws, apart from the scans' streams


def _draw(
    model: RadiologyModel, finding: str, seed: int, index: int, *, ct: bool
) -> tuple[torch.Tensor, np.ndarray]:
    if ct:
        rng = region_rng(seed, finding, index, stream=CT_STREAM)
        volume, mask = draw_ct_with_region(finding, rng, shape=model.config.volume_shape)
        return torch.from_numpy(volume)[None], mask
    rng = region_rng(seed, finding, index, stream=RADIOGRAPH_STREAM)
    image, mask = draw_with_region(finding, rng, image_size=model.config.image_size)
    return torch.from_numpy(image)[None], mask


def _case(
    model: RadiologyModel,
    finding: str,
    index: int,
    *,
    seed: int,
    ct: bool,
    method: str,
    context: list[int],
    fractions: Sequence[float],
    random_draws: int,
    half_cell: float,
) -> dict[str, Any]:
    """Every measure of one scan's map for its one finding, and what chance would score."""
    scan, truth = _draw(model, finding, seed, index, ct=ct)
    started = time.perf_counter()
    [found] = explain_findings(model, scan, context, [finding], method=method)
    seconds = time.perf_counter() - started
    rng = region_rng(seed, finding, index, stream=DELETION_STREAM)
    deletion = deletion_test(
        model,
        scan,
        context,
        finding,
        found.heat,
        fractions=fractions,
        random_draws=random_draws,
        rng=rng,
    )
    area = float(truth.mean())
    return {
        "probability": found.probability,
        "seconds": seconds,
        "empty_map": bool(found.heat.max() <= 0.0),
        "truth_share": area,
        "hit": pointing_hit(found.heat, truth),
        "hit_chance": float(within(truth, POINTING_TOLERANCE).mean()),
        "hit_half_cell": pointing_hit(found.heat, truth, tolerance=half_cell),
        "hit_half_cell_chance": float(within(truth, half_cell).mean()),
        "iou": [top_overlap(found.heat, truth, f) for f in fractions],
        # a random region of share f against a truth of share a: IoU fa / (f + a - fa)
        "iou_chance": [f * area / (f + area - f * area) for f in fractions],
        "energy_inside": energy_inside(found.heat, truth),
        "top_drop": list(deletion.top_drop),
        "random_drop": list(deletion.random_drop),
        "beats_random": list(deletion.beats_random),
    }


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _summary(cases: list[dict[str, Any]], fractions: Sequence[float]) -> dict[str, Any]:
    """Per-finding means; the pointing game also over the scans the head suggests it on."""
    suggested = [c for c in cases if c["probability"] >= SUGGEST_THRESHOLD]

    def column(key: str, i: int | None = None, rows: list[dict[str, Any]] = cases) -> list[float]:
        return [float(c[key] if i is None else c[key][i]) for c in rows]

    return {
        "n": len(cases),
        "mean_probability": _mean(column("probability")),
        "suggested": len(suggested),
        "empty_maps": sum(c["empty_map"] for c in cases),
        "truth_share": _mean(column("truth_share")),
        "pointing_hit_rate": _mean(column("hit")),
        "pointing_chance": _mean(column("hit_chance")),
        "pointing_hit_rate_suggested": _mean(column("hit", rows=suggested)),
        "pointing_hit_rate_half_cell": _mean(column("hit_half_cell")),
        "pointing_chance_half_cell": _mean(column("hit_half_cell_chance")),
        "top_iou": [_mean(column("iou", i)) for i in range(len(fractions))],
        "top_iou_chance": [_mean(column("iou_chance", i)) for i in range(len(fractions))],
        "energy_inside": _mean(column("energy_inside")),
        # deletion over suggested scans only: a probability near 0 has nothing to drop
        "deletion_top_drop": [
            _mean(column("top_drop", i, suggested)) for i in range(len(fractions))
        ],
        "deletion_random_drop": [
            _mean(column("random_drop", i, suggested)) for i in range(len(fractions))
        ],
        "deletion_beats_random": [
            _mean(column("beats_random", i, suggested)) for i in range(len(fractions))
        ],
        "seconds_per_map": _mean(column("seconds")),
    }


def run_explain_bench(
    model: RadiologyModel,
    *,
    per_finding: int,
    seed: int,
    fractions: Sequence[float] = DELETION_FRACTIONS,
    random_draws: int = 8,
    progress: Callable[[int], None] | None = None,
    method: str = "gradcam",
    ct_per_finding: int = 0,
) -> dict[str, Any]:
    """`per_finding` held-out radiographs per finding (and `ct_per_finding` chest CTs), each
    explained for its one finding with an empty indication; per finding, the measures'
    means next to their chance levels. `progress` gets the number of scans done."""
    if per_finding < 1 or ct_per_finding < 0 or random_draws < 1:
        raise ValueError("per_finding and random_draws must be >= 1, ct_per_finding >= 0")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
        raise ValueError("fractions must be a non-empty list of shares in (0, 1]")
    config = model.config
    context = encode_context(model.tokenizer, "", config.max_prompt_tokens)
    half_cell = math.prod(config.encoder_strides) / 2
    result: dict[str, Any] = {
        "method": method,
        "seed": seed,
        "per_finding": per_finding,
        "ct_per_finding": ct_per_finding,
        "fractions": [float(f) for f in fractions],
        "random_draws": random_draws,
        "tolerance_px": POINTING_TOLERANCE,
        "half_cell_px": half_cell,
        "suggest_threshold": SUGGEST_THRESHOLD,
    }
    done = 0
    for kind, count, grid in (
        ("radiograph", per_finding, [config.image_size] * 2),
        ("ct", ct_per_finding, list(config.volume_shape)),
    ):
        if count == 0:
            continue
        summaries = {}
        for finding in FINDINGS:
            cases = []
            for index in range(count):
                cases.append(
                    _case(
                        model,
                        finding,
                        index,
                        seed=seed,
                        ct=kind == "ct",
                        method=method,
                        context=context,
                        fractions=fractions,
                        random_draws=random_draws,
                        half_cell=half_cell,
                    )
                )
                done += 1
                if progress is not None:
                    progress(done)
            summaries[finding] = _summary(cases, fractions)
            logger.info(
                "%s %s: pointing %.2f (chance %.2f), deletion beats random %s",
                kind,
                finding,
                summaries[finding]["pointing_hit_rate"],
                summaries[finding]["pointing_chance"],
                summaries[finding]["deletion_beats_random"],
            )
        seconds = [s["seconds_per_map"] for s in summaries.values()]
        result[kind] = {"grid": grid, "seconds_per_map": _mean(seconds), "findings": summaries}
    return result


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """Markdown: per modality, a localisation table and a deletion table (chance in brackets)."""
    fractions = result["fractions"]
    tol, half = result["tolerance_px"], result["half_cell_px"]
    lines: list[str] = []
    for kind, title in (("radiograph", "Radiographs"), ("ct", "Chest CT")):
        if kind not in result:
            continue
        block = result[kind]
        grid = " x ".join(str(g) for g in block["grid"])
        lines += [
            f"### {title} ({result['method']}, {grid} grid, "
            f"{block['seconds_per_map']:.3f} s per map)",
            "",
            "Localisation: chance level in brackets (a uniformly random point, a random "
            "region of the same share, a uniform map).",
            "",
            f"| finding | n | mean p | suggested | pointing ±{tol:g} px | suggested only "
            f"| pointing ±{half:g} px | "
            + " | ".join(f"IoU top {100 * f:g}%" for f in fractions)
            + " | mass in truth |",
            "|---|---|---|---|---|---|---|" + "---|" * len(fractions) + "---|",
        ]
        for finding, s in block["findings"].items():
            ious = " | ".join(
                f"{_num(v)} ({_num(c)})"
                for v, c in zip(s["top_iou"], s["top_iou_chance"], strict=True)
            )
            lines.append(
                f"| {DISPLAY_NAMES[finding]} | {s['n']} | {_num(s['mean_probability'])} "
                f"| {s['suggested']} | {_pct(s['pointing_hit_rate'])} "
                f"({_pct(s['pointing_chance'])}) | {_pct(s['pointing_hit_rate_suggested'])} "
                f"| {_pct(s['pointing_hit_rate_half_cell'])} "
                f"({_pct(s['pointing_chance_half_cell'])}) | {ious} "
                f"| {_num(s['energy_inside'])} ({_num(s['truth_share'])}) |"
            )
        lines += [
            "",
            "Deletion, over the scans where the head suggests the finding: mean drop of its "
            "probability when the map's top pixels are blurred away vs random blobs of the "
            "same size, and the share of scans where the map's region drops it more.",
            "",
            "| finding | "
            + " | ".join(f"top {100 * f:g}%: map vs random | map wins" for f in fractions)
            + " |",
            "|---|" + "---|---|" * len(fractions),
        ]
        for finding, s in block["findings"].items():
            cells = " | ".join(
                f"{_num(t)} vs {_num(r)} | {_pct(w)}"
                for t, r, w in zip(
                    s["deletion_top_drop"],
                    s["deletion_random_drop"],
                    s["deletion_beats_random"],
                    strict=True,
                )
            )
            lines.append(f"| {DISPLAY_NAMES[finding]} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def explain_bench_command(
    model_path: Path, per_finding: int, seed: int, out: Path | None
) -> dict[str, Any]:
    """`fedrad-sim explain-bench`: load a checkpoint, run the bench on radiographs (and CT
    for a model that reads it), write `out/explain.json` and `out/explain.md` when asked."""
    from fedrad.common.model.checkpoint import load_checkpoint

    model = load_checkpoint(Path(model_path))
    ct = per_finding if "CT" in model.config.volume_modalities else 0
    total = (per_finding + ct) * len(FINDINGS)
    step = max(1, total // 20)

    def progress(done: int) -> None:
        if done % step == 0 or done == total:
            logger.info("explain bench: %d/%d scans", done, total)

    result = run_explain_bench(
        model, per_finding=per_finding, seed=seed, progress=progress, ct_per_finding=ct
    )
    result["model"] = str(Path(model_path).resolve())
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULT_FILE).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        (out / TABLE_FILE).write_text(format_table(result), encoding="utf-8")
        logger.info("explain bench: wrote %s and %s", out / RESULT_FILE, out / TABLE_FILE)
    return result
