"""The SecAgg+ bench's bookkeeping: settings checked up front, figures read back from run
directories, and the comparison is SecAgg+ minus plain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrad.simulations.benchmarks.secagg import SecAggBenchConfig, arm_row, compare


def test_bad_settings_are_refused_and_arms_differ_only_in_secagg() -> None:
    with pytest.raises(ValueError, match="rounds must be >= 2"):
        SecAggBenchConfig(rounds=1)
    config = SecAggBenchConfig()
    plain, secure = config.federated(secagg=False), config.federated(secagg=True)
    assert not plain.secagg and secure.secagg
    assert {**vars(plain), "secagg": True} == vars(secure)


def _run(root: Path, rounds: list[float], nbytes: int, auroc: float, secagg: bool) -> Path:
    root.mkdir(parents=True)
    lines = [
        {
            "round": i + 1,
            "round_s": s,
            "update_bytes": nbytes,
            "macro_auroc": auroc,
            **({"secagg": {"error_bound": 3e-7}} if secagg else {}),
        }
        for i, s in enumerate(rounds)
    ]
    (root / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / "summary.json").write_text(json.dumps({"simulation_s": sum(rounds) + 5.0}))
    return root


def test_the_comparison_is_secagg_minus_plain_after_the_cold_round(tmp_path: Path) -> None:
    plain = arm_row(_run(tmp_path / "p", [20.0, 10.0, 10.0], 1000, 0.7, False))
    secure = arm_row(_run(tmp_path / "s", [25.0, 10.5, 10.5], 2000, 0.7001, True))
    assert plain["warm_round_s"] == 10.0 and secure["warm_round_s"] == 10.5
    result = compare({"plain": [plain], "secagg": [secure]})
    assert result["warm_round_overhead_s"] == pytest.approx(0.5)
    assert result["simulation_overhead_s"] == pytest.approx(6.0)
    assert result["bytes_ratio"] == 2.0 and result["error_bound"] == 3e-7
    assert result["max_auroc_difference"] == pytest.approx(1e-4)
