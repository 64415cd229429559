"""Report labeler: hand-written report prose the synthetic generator never produces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrad.common.findings import FINDINGS
from fedrad.common.labeling.labeler import ReportLabels, label_report, label_reports
from fedrad.common.labeling.radlabels import load_radlabels, radlabels_samples_dir
from fedrad.common.labeling.sections import section_spans
from fedrad.simulations.benchmarks.labeler import (
    DEFAULT_SUITE,
    HELDOUT_SUITE,
    evaluate,
    run_radlabels_bench,
    run_suite_bench,
)

RADLABELS_MACRO_F1_FLOOR = 0.90
"""On radlabels' held-out half: measured 0.928 (docs/results/labeler.md); the floor leaves room
for lexicon edits."""
SUITE_MACRO_F1_FLOOR = 0.95
"""On each phrase suite: measured 0.99 on the one read while building, see docs for the other."""

# (report text, finding, expected label). One line per behaviour, so a failure names it.
CASES: list[tuple[str, str, int]] = [
    # nodule
    ("A 9 mm nodule in the left upper lobe.", "nodule", 1),
    ("No pulmonary nodules or masses.", "nodule", 0),
    ("Possible nodule at the right base, possibly a nipple shadow.", "nodule", -1),
    ("Calcified granuloma in the right upper lobe.", "nodule", 0),
    ("Calcified nodule in the right upper lobe, likely a granuloma.", "nodule", 0),
    ("A densely calcified 5 mm nodule at the right base.", "nodule", 0),
    ("Non-calcified 6 mm nodule in the left upper lobe.", "nodule", 1),
    ("Granulomatous disease with calcified hilar nodes.", "nodule", 0),
    ("Stable calcified granulomas; no suspicious nodule.", "nodule", 0),
    ("Large right hilar mass.", "nodule", 1),
    ("The previously seen nodule is no longer visualized.", "nodule", 0),
    ("Soft tissue mass effect on the trachea.", "nodule", 0),
    ("Findings are suspicious for a right upper lobe mass.", "nodule", -1),
    ("Anterior mediastinal mass.", "nodule", 0),
    ("Healed rib fracture should not be mistaken for a lung nodule.", "nodule", 0),
    ("Heart size is normal.", "nodule", 0),
    # pleural effusion
    ("Small left pleural effusion.", "pleural_effusion", 1),
    ("No pleural effusion.", "pleural_effusion", 0),
    ("Pleural effusion cannot be excluded.", "pleural_effusion", -1),
    ("The left effusion has resolved.", "pleural_effusion", 0),
    ("Interval resolution of the right pleural effusion.", "pleural_effusion", 0),
    ("Decreased right pleural effusion.", "pleural_effusion", 1),
    ("Nearly resolved right pleural effusion.", "pleural_effusion", 1),
    ("Blunting of the right costophrenic angle.", "pleural_effusion", -1),
    ("No blunting of the costophrenic angles.", "pleural_effusion", 0),
    ("Left pleural thickening, no effusion.", "pleural_effusion", 0),
    ("Costophrenic angles are sharp.", "pleural_effusion", 0),
    ("Small pericardial effusion.", "pleural_effusion", 0),
    ("Small right hydrothorax.", "pleural_effusion", 1),
    ("Effusion is absent.", "pleural_effusion", 0),
    ("Probably unchanged bilateral pleural effusions.", "pleural_effusion", 1),
    ("Small effusions, if any.", "pleural_effusion", -1),
    ("Small pleural effusions are presumed.", "pleural_effusion", -1),
    ("The lungs are clear.", "pleural_effusion", 0),
    # cardiomegaly
    ("Moderate cardiomegaly.", "cardiomegaly", 1),
    ("The heart is enlarged.", "cardiomegaly", 1),
    ("Heart size is mildly increased.", "cardiomegaly", 1),
    ("Enlarged cardiac silhouette.", "cardiomegaly", 1),
    ("The heart size is at least mildly enlarged.", "cardiomegaly", 1),
    ("Heart size is normal.", "cardiomegaly", 0),
    ("Heart size is within normal limits.", "cardiomegaly", 0),
    ("Normal cardiac silhouette.", "cardiomegaly", 0),
    ("The heart is not enlarged.", "cardiomegaly", 0),
    ("No cardiomegaly.", "cardiomegaly", 0),
    ("Borderline cardiomegaly.", "cardiomegaly", -1),
    ("Top-normal heart size.", "cardiomegaly", -1),
    ("Heart size is at the upper limits of normal.", "cardiomegaly", -1),
    ("The heart is mildly enlarged?", "cardiomegaly", -1),
    ("There is probable mild cardiomegaly.", "cardiomegaly", -1),
    ("The cardiac silhouette is unchanged with increased pulmonary edema.", "cardiomegaly", 0),
    # pneumothorax
    ("Small right apical pneumothorax.", "pneumothorax", 1),
    ("No pneumothorax.", "pneumothorax", 0),
    ("Tiny left apical pneumothorax is not excluded.", "pneumothorax", -1),
    ("The right pneumothorax has resolved.", "pneumothorax", 0),
    ("Left PTX.", "pneumothorax", 1),
    ("Small left hydropneumothorax.", "pneumothorax", 1),
    (
        "Visceral pleural line at the right apex with absent lung markings beyond it.",
        "pneumothorax",
        1,
    ),
    ("No pneumothorax, although sensitivity to detect pneumothorax is limited.", "pneumothorax", 0),
    ("Extrapleural air simulating pneumothorax.", "pneumothorax", 0),
    ("Pneumothorax?", "pneumothorax", -1),
    ("Pneumothorax is no longer seen.", "pneumothorax", 0),
    ("Pneumothorax has been ruled out.", "pneumothorax", 0),
    ("Free of pneumothorax.", "pneumothorax", 0),
    ("No definite pneumothorax.", "pneumothorax", 0),
    # consolidation
    ("Right lower lobe consolidation.", "consolidation", 1),
    ("No focal consolidation.", "consolidation", 0),
    ("Right basilar opacity may represent pneumonia.", "consolidation", 0),
    ("Right basilar opacity may represent consolidation.", "consolidation", -1),
    ("The lungs are clear.", "consolidation", 0),
    ("Resolving right lower lobe pneumonia.", "consolidation", 0),
    ("Right lower lobe consolidation consistent with pneumonia.", "consolidation", 1),
    ("Atelectasis versus pneumonia at the left base.", "consolidation", 0),
    ("Atelectasis versus consolidation at the left base.", "consolidation", -1),
    ("No focal consolidation to suggest pneumonia.", "consolidation", 0),
    ("Left lower lobe airspace opacity with air bronchograms.", "consolidation", 0),
    ("Left basilar airspace disease, concerning for pneumonia.", "consolidation", 0),
    ("Interval clearing of the left lower lobe infiltrate.", "consolidation", 0),
    ("Questionable left lower lobe consolidation.", "consolidation", -1),
    ("Consolidation is likely.", "consolidation", -1),
    ("Bibasilar atelectasis, although consolidation cannot be excluded.", "consolidation", -1),
    ("Patchy opacity at the left base.", "consolidation", 0),
    # fracture
    ("Acute displaced fracture of the left 5th rib.", "fracture", 1),
    ("No acute fracture.", "fracture", 0),
    ("Old healed right rib fractures.", "fracture", 1),
    ("Possible nondisplaced right 7th rib fracture.", "fracture", -1),
    ("Fractured sternotomy wires are unchanged.", "fracture", 0),
    ("No new fracture. Old healed left 6th rib fracture.", "fracture", 1),
    ("Cortical break in the right 4th rib.", "fracture", 0),
    ("Rib deformity from a prior fracture.", "fracture", 1),
    ("Old right rib deformity.", "fracture", 0),
    ("Compression fracture of T8.", "fracture", 1),
    # global phrases, lists, pseudo-negation, double mentions
    ("No acute cardiopulmonary process.", "pneumothorax", 0),
    ("No acute cardiopulmonary process.", "consolidation", 0),
    ("No effusion, pneumothorax, or consolidation.", "consolidation", 0),
    ("No effusion, pneumothorax, or consolidation.", "pleural_effusion", 0),
    ("No effusion, pneumothorax, or consolidation.", "pneumothorax", 0),
    ("No pneumothorax, but there is a small left effusion.", "pleural_effusion", 1),
    ("No pneumothorax; small left effusion.", "pleural_effusion", 1),
    ("No change in the small left effusion.", "pleural_effusion", 1),
    ("Not only a right effusion but also a left pneumothorax.", "pneumothorax", 1),
    ("Not only a right effusion but also a left pneumothorax.", "pleural_effusion", 1),
    ("No pleural effusion. Large left pleural effusion.", "pleural_effusion", 1),
    ("Possible effusion. Definite right effusion.", "pleural_effusion", 1),
    ("Small left effusion, otherwise no acute process.", "pleural_effusion", 1),
    ("Cardiomegaly and small bilateral effusions; no pneumothorax.", "pneumothorax", 0),
    ("Cardiomegaly and small bilateral effusions; no pneumothorax.", "cardiomegaly", 1),
    # one negation governs a coordinated list, through items that name no finding
    (
        "The lungs are clear of focal airspace disease, pneumothorax, or pleural effusion.",
        "pneumothorax",
        0,
    ),
    (
        "The lungs are clear of focal airspace disease, pneumothorax, or pleural effusion.",
        "pleural_effusion",
        0,
    ),
    (
        "Lungs are free of focal airspace disease, pleural effusion or pneumothorax.",
        "pneumothorax",
        0,
    ),
    (
        "No focal consolidation, suspicious pulmonary opacity, large pleural effusion, or "
        "pneumothorax is identified.",
        "pleural_effusion",
        0,
    ),
    (
        "No focal consolidation, suspicious pulmonary opacity, large pleural effusion, or "
        "pneumothorax is identified.",
        "pneumothorax",
        0,
    ),
    ("No pneumonia, effusions, edema, pneumothorax, adenopathy, nodules or masses.", "nodule", 0),
    ("Negative for acute osseous abnormality, pneumothorax or effusion.", "pleural_effusion", 0),
    ("Focal consolidation, pleural effusion or pneumothorax is not seen.", "consolidation", 0),
    ("No pneumothorax or new pleural effusion.", "pleural_effusion", 0),
    ("No pneumothorax, stable small left pleural effusion.", "pleural_effusion", 1),
    ("There is no pneumothorax, there is a small left pleural effusion.", "pleural_effusion", 1),
    ("The study does not demonstrate a pneumothorax.", "pneumothorax", 0),
    ("No radiographic evidence of pneumothorax.", "pneumothorax", 0),
    ("Pneumothorax is unlikely.", "pneumothorax", 0),
    ("Heart size may be mildly enlarged.", "cardiomegaly", -1),
    ("No pneumothorax, pneumomediastinum or subcutaneous emphysema.", "pneumothorax", 0),
    ("Small pneumomediastinum.", "pneumothorax", 0),
    ("Widened mediastinum.", "cardiomegaly", 0),
    ("The cardiomediastinal silhouette is enlarged.", "cardiomegaly", 0),
    ("Stable post-operative cardiac and mediastinal enlargement.", "cardiomegaly", 1),
    # checklists, abbreviations, and cues that reach only what is next to them
    ("Pneumothorax: none.", "pneumothorax", 0),
    ("Nodules or masses: none identified.", "nodule", 0),
    ("Acute fracture: not seen.", "fracture", 0),
    ("Heart: enlarged. Lungs: clear.", "cardiomegaly", 1),
    ("Heart - enlarged. Lungs - clear.", "cardiomegaly", 1),
    ("Nil pleural effusion or pneumothorax.", "pneumothorax", 0),
    ("Cleared right lower lobe consolidation; small residual effusion.", "consolidation", 0),
    ("The effusion has resolved, small left pneumothorax persists.", "pneumothorax", 1),
    (
        "No further enlargement of the left pleural effusion, which remains moderate.",
        "pleural_effusion",
        1,
    ),
    ("w/o PTX or pleural effusion.", "pneumothorax", 0),
    ("LLL consol, improving.", "consolidation", 1),
    ("Heart size cannot be assessed on this rotated film.", "cardiomegaly", -1),
    ("Left lower lobe consolidation has almost completely resolved.", "consolidation", 1),
    ("Suggestion of a 6 mm nodule in the left upper zone.", "nodule", -1),
    (
        "No pneumothorax after line placement, and a small left effusion is again seen.",
        "pleural_effusion",
        1,
    ),
    (
        "Large effusions and consolidation, superimposed infection cannot be excluded.",
        "pleural_effusion",
        1,
    ),
    ("CHF, bilateral effusions, underlying collapse and/or consolidation.", "pleural_effusion", 1),
    ("CHF, bilateral effusions, underlying collapse and/or consolidation.", "consolidation", -1),
    # case and layout
    ("NO PNEUMOTHORAX. SMALL LEFT EFFUSION.", "pleural_effusion", 1),
    ("NO PNEUMOTHORAX. SMALL LEFT EFFUSION.", "pneumothorax", 0),
    ("no pneumothorax", "pneumothorax", 0),
    ("Small left\n   pleural effusion.", "pleural_effusion", 1),
]

SECTION_CASES: list[tuple[str, str, int]] = [
    ("INDICATION: Rule out pneumothorax.\nFINDINGS: No pneumothorax.", "pneumothorax", 0),
    (
        "INDICATION: ? pneumothorax after line placement.\nFINDINGS: Lungs are clear.",
        "pneumothorax",
        0,
    ),
    (
        "Indication: rule out pneumothorax. Findings: Small right apical pneumothorax.",
        "pneumothorax",
        1,
    ),
    ("History: fall, eval for rib fracture. Findings: No fracture seen.", "fracture", 0),
    (
        "CLINICAL HISTORY: pneumonia.\n\nCOMPARISON: None.\n\nIMPRESSION: Clear lungs.",
        "consolidation",
        0,
    ),
    ("INDICATION: cough.\n\nThe heart is enlarged.", "cardiomegaly", 1),
    (
        "FINDINGS: Possible small left effusion.\nIMPRESSION: Small left pleural effusion.",
        "pleural_effusion",
        1,
    ),
    (
        "FINDINGS: Small left effusion.\nIMPRESSION: Possible small left effusion.",
        "pleural_effusion",
        -1,
    ),
    ("FINDINGS: Small left effusion.\nIMPRESSION: No pneumothorax.", "pleural_effusion", 1),
    ("findings: no pneumothorax. impression: no acute process.", "pneumothorax", 0),
    ("PA AND LATERAL CHEST RADIOGRAPH: Moderate cardiomegaly.", "cardiomegaly", 1),
]


@pytest.mark.parametrize(("text", "finding", "expected"), CASES + SECTION_CASES)
def test_label(text: str, finding: str, expected: int) -> None:
    assert label_report(text).labels[finding] == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Small bilateral pleural effusions.", {"pleural_effusion": "bilateral"}),
        ("Left greater than right pleural effusions.", {"pleural_effusion": "bilateral"}),
        ("Pleural effusions bilaterally.", {"pleural_effusion": "bilateral"}),
        ("Pleural effusions.", {"pleural_effusion": "bilateral"}),
        ("Effusion on the left.", {"pleural_effusion": "left"}),
        ("Small L effusion.", {"pleural_effusion": "left"}),
        (
            "Right effusion and left pneumothorax.",
            {"pleural_effusion": "right", "pneumothorax": "left"},
        ),
        (
            "Left lower lobe consolidation and right pleural effusion.",
            {"consolidation": "left", "pleural_effusion": "right"},
        ),
        ("Fractures of the left 5th and 6th ribs.", {"fracture": "left"}),
        ("Left effusion. Right effusion.", {"pleural_effusion": "bilateral"}),
        ("Mass measuring 3.4 x 5.1 cm in the right lung.", {"nodule": "right"}),
        ("Nodules in both lungs.", {"nodule": "bilateral"}),
        ("Cardiomegaly on the left.", {}),
        ("No left pneumothorax.", {}),
        ("Left effusion has resolved. Right pneumothorax.", {"pneumothorax": "right"}),
    ],
)
def test_sides(text: str, expected: dict[str, str]) -> None:
    sides = label_report(text).sides
    assert set(sides) == set(FINDINGS)
    assert {k: v for k, v in sides.items() if v is not None} == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A 1.5 x 1.2 cm nodule in the right upper lobe.", 15.0),
        ("8mm left lower lobe nodule.", 8.0),
        ("12-mm nodule in the left lung.", 12.0),
        ("Nodule 2.5cm.", 25.0),
        ("Right nodule measuring 8 mm. A second 1.2 cm nodule on the left.", 12.0),
        ("Possible 6 mm right nodule.", 6.0),
        ("Mass measuring 3.4 x 5.1 x 2.0 cm in the right lung.", 51.0),
        ("No 8 mm nodule is seen.", None),
        ("Right upper lobe nodule. ET tube 5 cm above the carina.", None),
        ("FINDINGS: 2 cm right mass. IMPRESSION: No nodule.", None),
        ("Small left effusion measuring 2 cm.", None),
    ],
)
def test_nodule_size(text: str, expected: float | None) -> None:
    assert label_report(text).nodule_size_mm == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n\t ",
        "???",
        ". . . ;;; :::",
        "\x00\x01 lorem ipsum",
        "\u0130" * 50 + " effusion",  # lower-cases to two characters each
        "\ud800 lone surrogate",
        "FINDINGS:" * 200,
        "1.2.3.4 cm mm x x by",
        "9" * 2000 + " mm nodule",
        "no effusion, " * 1500,  # 20 kB without a sentence break
        "x" * 120_000,
    ],
)
def test_never_raises_and_shape_holds(text: str) -> None:
    result = label_report(text)
    assert list(result.labels) == list(FINDINGS)
    assert set(result.labels.values()) <= {-1, 0, 1}
    assert len(result.as_vector()) == len(FINDINGS)


def test_as_vector_follows_findings_order() -> None:
    result = label_report("Small left pleural effusion. Possible right lower lobe consolidation.")
    expected = {"pleural_effusion": 1, "consolidation": -1}
    assert result.as_vector() == [expected.get(f, 0) for f in FINDINGS]


def test_label_reports_is_ordered_and_deterministic() -> None:
    texts = ["Cardiomegaly.", "No pneumothorax.", "Possible left rib fracture.", ""]
    first, second = label_reports(texts), label_reports(iter(texts))
    assert first == second
    assert [r.labels["cardiomegaly"] for r in first] == [1, 0, 0, 0]
    assert first[2].labels["fracture"] == -1 and first[2].sides["fracture"] == "left"
    assert isinstance(first[0], ReportLabels)


def test_section_spans_drop_indication_until_blank_line() -> None:
    text = "INDICATION: ? ptx\n\nSmall effusion.\nIMPRESSION: Effusion."
    kinds = [(kind, text[a:b].strip()) for kind, a, b in section_spans(text)]
    assert kinds == [
        ("ignore", "? ptx"),
        ("findings", "Small effusion."),
        ("impression", "Effusion."),
    ]


# ------------------------------------------------------------------------------------------
# radlabels benchmark helpers
# ------------------------------------------------------------------------------------------


def _labels(**kw: int) -> ReportLabels:
    labels = {f: kw.get(f, 0) for f in FINDINGS}
    return ReportLabels(labels=labels, sides={f: None for f in FINDINGS}, nodule_size_mm=None)


def test_evaluate_counts() -> None:
    pred = [_labels(nodule=1), _labels(nodule=1), _labels(nodule=-1), _labels()]
    truth = [{"nodule": 1}, {"nodule": 0}, {"nodule": 1}, {"nodule": 0}]
    result = evaluate(pred, truth)
    nodule = result["per_finding"]["nodule"]  # type: ignore[index]
    assert result["n"] == 4
    assert nodule["accuracy"] == pytest.approx(0.5)
    assert nodule["precision"] == pytest.approx(0.5)
    assert nodule["recall"] == pytest.approx(0.5)
    assert nodule["f1"] == pytest.approx(0.5)
    assert result["per_finding"]["fracture"]["accuracy"] == 1.0  # type: ignore[index]
    with pytest.raises(ValueError, match="predictions"):
        evaluate(pred, truth[:2])


def test_load_radlabels_maps_and_drops_indication(tmp_path: Path) -> None:
    report = "INDICATION: ? consolidation\n\nFINDINGS: Patchy opacity. Small left effusion."
    (tmp_path / "synthetic_reports").mkdir()
    (tmp_path / "synthetic_reports" / "synth_0001.txt").write_text(report)
    tokens = "INDICATION : ? consolidation FINDINGS : Patchy opacity . Small left effusion ."
    matches = [
        {
            "disease": "consolidation",
            "alias": "consolidation",
            "label": "uncertain",
            "start_ix": [3],
        },
        {
            "disease": "air_space_opacity",
            "alias": "patchy opacity",
            "label": "definitely present",
            "start_ix": [6, 7],
        },
        {
            "disease": "pleural_effusion",
            "alias": "small effusion",
            "label": "definitely present",
            "start_ix": [9, 11],
        },
        {
            "disease": "atelectasis",
            "alias": "atelectasis",
            "label": "definitely present",
            "start_ix": [6],
        },
    ]
    (tmp_path / "synthetic_matches.json").write_text(
        json.dumps({"synth_0001": {"text": tokens, "matches": matches}})
    )
    [(text, labels)] = load_radlabels(tmp_path)
    assert text == report
    assert labels == {f: 0 for f in FINDINGS} | {"pleural_effusion": 1}
    [(_, shipped)] = load_radlabels(tmp_path, drop_ignored_sections=False)
    assert shipped["consolidation"] == -1


def test_radlabels_macro_f1_floor() -> None:
    try:
        samples = radlabels_samples_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"radlabels corpus not installed: {exc}")
    result = run_radlabels_bench(samples, split="heldout")
    assert result["n"] == 484
    macro = result["macro"]
    assert macro["f1"] >= RADLABELS_MACRO_F1_FLOOR, result["per_finding"]  # type: ignore[index]


@pytest.mark.parametrize("path", [DEFAULT_SUITE, HELDOUT_SUITE], ids=["suite", "heldout"])
def test_phrase_suite_macro_f1_floor(path: Path) -> None:
    result = run_suite_bench(path)
    macro = result["macro"]
    assert macro["f1"] >= SUITE_MACRO_F1_FLOOR, result["errors"]  # type: ignore[index]


def test_your_own_labelled_reports_are_scored_on_the_findings_they_label(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedrad.simulations.cli import app as sim_app

    labelled = tmp_path / "labelled.csv"
    labelled.write_text(
        "Report Text,Pleural Effusion,Pneumothorax,Edema\n"
        '"Small left pleural effusion. No pneumothorax.",1,0,1\n'
        '"No effusion. Possible tiny apical pneumothorax.",0,-1,\n'
        '"Clear lungs.",,,0\n'
        '"Moderate right effusion.",0,,\n'  # the reference disagrees: one false positive
    )
    runner = CliRunner()
    result = runner.invoke(
        sim_app,
        ["bench", "labeler", "--labels", str(labelled), "--no-radlabels", "--no-suite", "--json"],
    )
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)["labels"]
    assert scored["n"] == 4 and scored["findings"] == ["pleural_effusion", "pneumothorax"]
    effusion = scored["per_finding"]["pleural_effusion"]
    assert (effusion["accuracy"], effusion["precision"], effusion["recall"]) == (0.75, 0.5, 1.0)
    assert scored["per_finding"]["pneumothorax"]["accuracy"] == 1.0
    assert "nodule" not in scored["per_finding"]  # not labelled: not scored as absent

    text = runner.invoke(sim_app, ["bench", "labeler", "--labels", str(labelled), "--no-radlabels"])
    assert text.stdout.startswith("labels vs your labels: n=4 macro accuracy 0.875")

    for content, reason in (
        ("Report,Edema\nx,1\n", "no reference column"),
        ("Findings,Pneumothorax\nx,yes\n", "line 2, Pneumothorax = 'yes'"),
        ("Pneumothorax\n1\n", "no report column"),
        ("Report,Pneumothorax\n", "no rows"),
    ):
        labelled.write_text(content)
        bad = runner.invoke(
            sim_app, ["bench", "labeler", "--labels", str(labelled), "--no-radlabels"]
        )
        assert bad.exit_code == 2 and reason in bad.stderr, bad.output
