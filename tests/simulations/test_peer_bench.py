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
from fedrad.simulations.benchmarks.labeler import SUITE_COLUMNS
from fedrad.simulations.benchmarks.peer import (
    CORPORA,
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


def _tiny_suite(tmp_path: Path) -> Path:
    suite = tmp_path / "suite.csv"
    suite.write_text(
        ",".join(SUITE_COLUMNS) + "\n"
        "pos-1,positive,s,Large right pleural effusion.,0,1,0,0,0,0\n"
        "neg-1,negation,s,No pneumothorax or fracture.,0,0,0,0,0,0\n"
        "look-1,related_term,s,Calcified granuloma.,0,0,0,0,0,0\n",
        encoding="utf-8",
    )
    return suite


def test_bench_with_a_fake_peer_on_every_corpus(tmp_path: Path) -> None:
    samples = _radlabels_or_skip()
    script = _fake_peer(
        tmp_path,
        "for r in rows:\n"
        "    print(json.dumps({'id': r['id'], 'labels': {f: 0 for f in FINDINGS}}))\n",
    )
    result = run_peer_bench(
        Path(sys.executable), samples_dir=samples, suite_path=_tiny_suite(tmp_path), script=script
    )
    corpora = result["corpora"]
    assert list(corpora) == list(CORPORA)
    heldout_cases = labeler_bench.load_phrase_suite(labeler_bench.HELDOUT_SUITE)
    heldout_kinds = len({case.kind for case in heldout_cases})
    assert [corpora[c]["n"] for c in CORPORA] == [484, 516, 3, len(heldout_cases)]
    for block in corpora.values():
        assert block["medspacy"]["macro"]["f1"] == 0.0
        assert block["reports_per_s"]["fedrad"] > 0
    assert corpora["radlabels_heldout"]["fedrad"]["macro"]["f1"] > 0.8
    suite = corpora["suite"]
    assert suite["per_kind"]["medspacy"]["positive"] == {"n": 1, "errors": 1, "cases_wrong": 1}
    assert suite["errors"]["medspacy"] == [
        {
            "case": "pos-1",
            "kind": "positive",
            "finding": "pleural_effusion",
            "expected": 1,
            "got": 0,
        }
    ]
    table = markdown_table(result)
    assert table.count("### ") == 4 and "### radlabels, held-out half (484 reports)" in table
    finding_rows = [line for line in table.splitlines() if line.startswith("| ")]
    # per corpus: header, findings, macro; each suite adds its kinds table (header + kinds)
    assert len(finding_rows) == 4 * (1 + len(FINDINGS) + 1) + (1 + 3) + (1 + heldout_kinds)
    assert table.count("**macro**") == 4
    assert table.count("reports/s") == 8


def test_markdown_table_shape_without_radlabels(tmp_path: Path) -> None:
    script = _fake_peer(
        tmp_path,
        "for r in rows:\n"
        "    print(json.dumps({'id': r['id'], 'labels': {f: 0 for f in FINDINGS}}))\n",
    )
    result = run_peer_bench(
        Path(sys.executable),
        suite_path=_tiny_suite(tmp_path),
        corpora=["suite"],
        script=script,
    )
    table = markdown_table(result).splitlines()
    assert table[0] == "### phrase suite (written definitions) (3 reports)"
    assert "| **macro** |" in "\n".join(table)
    assert "| related_term | 1 | 0 | 0 |" in table  # kind, cases, fedrad wrong, medspaCy wrong
    with pytest.raises(ValueError, match="unknown corpus"):
        run_peer_bench(Path(sys.executable), corpora=["mimic"], script=script)


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
def test_real_medspacy_peer_follows_the_written_definitions() -> None:
    cases = {
        "Calcified granuloma in the left upper lobe.": {},
        "Calcified nodule, likely granuloma.": {},
        "A 7 mm nodule in the left upper lobe.": {"nodule": 1},
        "Right lower lobe pneumonia. Patchy airspace opacity.": {},
        "Right lower lobe consolidation consistent with pneumonia.": {"consolidation": 1},
        "Blunting of the left costophrenic angle.": {"pleural_effusion": -1},
        "Blunting of the left costophrenic angle. Moderate right effusion.": {
            "pleural_effusion": 1
        },
        "Heart size is borderline.": {"cardiomegaly": -1},
        "Small left hydropneumothorax.": {"pleural_effusion": 1, "pneumothorax": 1},
        "Pneumomediastinum. Fractured sternotomy wires.": {},
    }
    labels, _ = run_peer_labeler(PEER_PYTHON, list(cases), timeout_s=300)
    for (text, expected), got in zip(cases.items(), labels, strict=True):
        assert got.labels == {f: 0 for f in FINDINGS} | expected, text


@needs_peer
@pytest.mark.slow
def test_real_medspacy_peer_on_every_corpus() -> None:
    samples = _radlabels_or_skip()
    result = run_peer_bench(PEER_PYTHON, samples_dir=samples, timeout_s=600)
    corpora = result["corpora"]
    assert [corpora[c]["n"] for c in ("radlabels_heldout", "radlabels_dev")] == [484, 516]
    for block in corpora.values():
        for who in ("fedrad", "medspacy"):
            assert 0.5 < block[who]["macro"]["f1"] <= 1.0
