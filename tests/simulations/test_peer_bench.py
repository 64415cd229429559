"""Tests of the fedrad-vs-medspaCy benchmark. The wrapping and the subprocess plumbing run
everywhere (a fake peer script stands in for medspaCy); the real peer runs only where
``make bench-labeler-peer`` has created .venv-medspacy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fedrad.common.findings import FINDINGS
from fedrad.common.labeling.labeler import ReportLabels
from fedrad.common.labeling.radlabels import radlabels_samples_dir
from fedrad.simulations.benchmarks import labeler as labeler_bench
from fedrad.simulations.benchmarks import peer as peer_bench
from fedrad.simulations.benchmarks.peer import (
    PeerLabelerError,
    PeerVenvMissingError,
    markdown_table,
    run_peer_bench,
    run_peer_labeler,
    wrap_peer_labels,
)

REPO = Path(__file__).resolve().parents[2]
PEER_PYTHON = REPO / ".venv-medspacy" / "bin" / "python"
needs_peer = pytest.mark.skipif(
    not PEER_PYTHON.is_file(),
    reason="medspaCy peer venv .venv-medspacy not found (make bench-labeler-peer creates it)",
)


def _line(rid: int, **labels: int) -> str:
    return json.dumps({"id": rid, "labels": {f: labels.get(f, 0) for f in FINDINGS}})


def _radlabels_or_skip() -> Path:
    try:
        return radlabels_samples_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_wrap_orders_by_id_and_leaves_sides_empty() -> None:
    lines = [_line(1, pneumothorax=-1), "", _line(0, nodule=1, fracture=1)]
    wrapped = wrap_peer_labels(lines, 2)
    assert [r.labels["nodule"] for r in wrapped] == [1, 0]
    assert wrapped[1].labels["pneumothorax"] == -1
    assert all(r.sides == {f: None for f in FINDINGS} for r in wrapped)
    assert all(r.nodule_size_mm is None for r in wrapped)


def test_wrapped_peer_labels_score_like_ours() -> None:
    truth = [{f: 0 for f in FINDINGS} | {"nodule": 1}, {f: 0 for f in FINDINGS}]
    peer = wrap_peer_labels([_line(0, nodule=1), _line(1, nodule=1)], 2)
    ours = [
        ReportLabels(labels=t, sides={f: None for f in FINDINGS}, nodule_size_mm=None)
        for t in truth
    ]
    peer_scores = labeler_bench.evaluate(peer, truth)
    assert peer_scores["per_finding"]["nodule"]["precision"] == 0.5
    assert peer_scores["per_finding"]["nodule"]["recall"] == 1.0
    assert labeler_bench.evaluate(ours, truth)["per_finding"]["nodule"]["f1"] == 1.0


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        ([_line(0)], "missing ids \\[1\\]"),
        ([_line(0), _line(1), _line(2)], "unexpected ids \\[2\\]"),
        ([_line(0), _line(0), _line(1)], "repeats report id 0"),
        ([_line(0), _line(1, cardiomegaly=2)], "outside 1/0/-1"),
        ([_line(0), '{"id": 1, "labels": {"nodule": 1}}'], "malformed"),
        ([_line(0), "not json"], "malformed"),
    ],
)
def test_wrap_rejects_incomplete_or_invalid_output(lines: list[str], match: str) -> None:
    with pytest.raises(PeerLabelerError, match=match):
        wrap_peer_labels(lines, 2)


def test_missing_peer_venv_names_the_make_target(tmp_path: Path) -> None:
    with pytest.raises(PeerVenvMissingError, match="make bench-labeler-peer"):
        run_peer_bench(tmp_path / "nowhere" / "python")
    assert peer_bench.main(["--peer-python", str(tmp_path / "python")]) == 2


def _fake_peer(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake_peer.py"
    script.write_text(
        "import json, sys\n"
        f"FINDINGS = {list(FINDINGS)!r}\n"
        "rows = [json.loads(x) for x in sys.stdin if x.strip()]\n" + body,
        encoding="utf-8",
    )
    return script


def test_subprocess_plumbing_with_a_fake_peer(tmp_path: Path) -> None:
    script = _fake_peer(
        tmp_path,
        "for r in rows:\n"
        "    hit = 1 if 'fracture' in r['text'] else 0\n"
        "    print(json.dumps({'id': r['id'], 'labels': {f: hit if f == 'fracture' else 0"
        " for f in FINDINGS}}))\n"
        "print(json.dumps({'peer_timing': {'load_s': 0.5, 'label_s': 0.25, 'n': len(rows)}}),"
        " file=sys.stderr)\n",
    )
    labels, seconds = run_peer_labeler(
        Path(sys.executable), ["Old rib fracture.", "Lungs are clear."], script=script
    )
    assert [r.labels["fracture"] for r in labels] == [1, 0]
    assert seconds["load_s"] == 0.5 and seconds["label_s"] == 0.25 and seconds["wall"] > 0


def test_failing_peer_reports_its_stderr(tmp_path: Path) -> None:
    script = _fake_peer(tmp_path, "sys.exit('thinc wants numpy<2')\n")
    with pytest.raises(PeerLabelerError, match="thinc wants numpy<2"):
        run_peer_labeler(Path(sys.executable), ["x"], script=script)


def test_bench_with_a_fake_peer_on_radlabels(tmp_path: Path) -> None:
    samples = _radlabels_or_skip()
    script = _fake_peer(
        tmp_path,
        "for r in rows:\n"
        "    print(json.dumps({'id': r['id'], 'labels': {f: 0 for f in FINDINGS}}))\n",
    )
    result = run_peer_bench(Path(sys.executable), samples_dir=samples, script=script)
    assert result["n"] == 1000
    assert result["medspacy"]["macro"]["f1"] == 0.0
    assert result["fedrad"]["macro"]["f1"] > 0.8
    table = markdown_table(result)
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(FINDINGS) + 1  # header, separator, findings, macro
    assert "**macro**" in table


@needs_peer
def test_real_medspacy_peer_on_handwritten_reports() -> None:
    texts = [
        "INDICATION: Rule out pneumonia.\n\nFINDINGS: No pneumothorax. Heart is mildly enlarged.",
        "Small pericardial effusion. Possible left upper lobe nodule.",
        "COMPARISON: Chest radiograph ___.\n\nThere is a right pleural effusion. No fracture.",
    ]
    labels, seconds = run_peer_labeler(PEER_PYTHON, texts, timeout_s=300)
    first, second, third = (r.labels for r in labels)
    assert first["consolidation"] == 0  # the indication is not read
    assert first["pneumothorax"] == 0 and first["cardiomegaly"] == 1
    assert second["pleural_effusion"] == 0 and second["nodule"] == -1
    assert third["pleural_effusion"] == 1 and third["fracture"] == 0
    assert seconds["label_s"] >= 0


@needs_peer
@pytest.mark.slow
def test_real_medspacy_peer_on_radlabels() -> None:
    samples = _radlabels_or_skip()
    result = run_peer_bench(PEER_PYTHON, samples_dir=samples, timeout_s=600)
    assert result["n"] == 1000
    for who in ("fedrad", "medspacy"):
        assert 0.5 < result[who]["macro"]["f1"] <= 1.0
