"""The labeler benchmark's data: radlabels' development / held-out split and its mapping under
the written finding definitions, the phrase suite's loader and scores, and `bench labeler`.

Fixtures stand in for radlabels and the suite, so these run without either installed."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrad.common.findings import ABSENT, FINDINGS, PRESENT, UNCERTAIN
from fedrad.common.labeling.radlabels import (
    load_radlabels,
    mapped_evidence,
    radlabels_half,
    radlabels_samples_dir,
)
from fedrad.simulations.benchmarks import labeler as labeler_bench
from fedrad.simulations.benchmarks.labeler import (
    DEFAULT_SUITE,
    SUITE_COLUMNS,
    LabelledReportsError,
    load_phrase_suite,
    run_suite_bench,
)
from fedrad.simulations.cli import app as sim_app

REPO = Path(__file__).resolve().parents[2]
RADLABELS_STEMS = [f"synth_{i:04d}" for i in range(1, 1001)]
"""radlabels 0.2.0's report ids; the split needs only the stems, not the corpus."""


# --- the split -------------------------------------------------------------------------------


def test_split_is_pinned_by_stem() -> None:
    # sha256("synth_0001") starts a1 (odd), "synth_0003" 2c (even): pinned once and for all
    assert [radlabels_half(s) for s in ("synth_0001", "synth_0002", "synth_0005")] == [
        "heldout"
    ] * 3
    assert [radlabels_half(s) for s in ("synth_0003", "synth_0004", "synth_0006")] == ["dev"] * 3


def test_split_halves_the_corpus() -> None:
    halves = [radlabels_half(s) for s in RADLABELS_STEMS]
    assert (halves.count("dev"), halves.count("heldout")) == (516, 484)


def _write_samples(root: Path, reports: dict[str, tuple[str, str, list[dict]]]) -> Path:
    """A radlabels-shaped samples dir: stem -> (report, RadGraph tokens, matches)."""
    (root / "synthetic_reports").mkdir(parents=True)
    for stem, (report, _, _) in reports.items():
        (root / "synthetic_reports" / f"{stem}.txt").write_text(report, encoding="utf-8")
    evidence = {s: {"text": tokens, "matches": m} for s, (_, tokens, m) in reports.items()}
    (root / "synthetic_matches.json").write_text(json.dumps(evidence), encoding="utf-8")
    return root


def _match(disease: str, alias: str, label: str, *ix: int) -> dict[str, object]:
    return {"disease": disease, "alias": alias, "label": label, "start_ix": list(ix)}


def test_split_is_disjoint_and_covers_every_report(tmp_path: Path) -> None:
    stems = RADLABELS_STEMS[:12]
    samples = _write_samples(tmp_path, {s: (f"Report {s}.", f"Report {s} .", []) for s in stems})
    texts = {
        split: [text for text, _ in load_radlabels(samples, split=split)]
        for split in ("all", "dev", "heldout")
    }
    assert not set(texts["dev"]) & set(texts["heldout"])
    assert sorted(texts["dev"] + texts["heldout"]) == sorted(texts["all"])
    assert len(texts["all"]) == 12
    assert f"Report {stems[0]}." in texts["heldout"]  # synth_0001 is held out
    with pytest.raises(ValueError, match="unknown radlabels split"):
        load_radlabels(samples, split="test")  # type: ignore[arg-type]


def test_the_installed_corpus_splits_516_484() -> None:
    try:
        samples = radlabels_samples_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert [len(load_radlabels(samples, split=s)) for s in ("dev", "heldout")] == [516, 484]


# --- the mapping under the written definitions -------------------------------------------------


@pytest.mark.parametrize(
    ("disease", "alias", "status", "expected"),
    [
        ("lung_nodule_or_mass", "nodular opacity", PRESENT, [("nodule", PRESENT)]),
        ("lung_nodule_or_mass", "calcified nodule", PRESENT, []),
        ("lung_nodule_or_mass", "non-calcified nodule", PRESENT, [("nodule", PRESENT)]),
        ("lung_nodule_or_mass", "calcified granuloma", PRESENT, []),
        ("lung_nodule_or_mass", "granuloma", PRESENT, []),
        ("lung_lesion", "cavitation", PRESENT, []),
        ("consolidation", "consolidative opacity", UNCERTAIN, [("consolidation", UNCERTAIN)]),
        ("air_space_opacity", "focal consolidation", ABSENT, [("consolidation", ABSENT)]),
        ("air_space_opacity", "pneumonia", PRESENT, []),
        ("air_space_opacity", "airspace opacity", PRESENT, []),
        ("air_space_opacity", "infiltrate", PRESENT, []),
        ("pneumonia", "pneumonia", PRESENT, []),
        ("infiltration", "infiltrate", PRESENT, []),
        ("pleural_effusion", "small effusion", PRESENT, [("pleural_effusion", PRESENT)]),
        ("pleural_effusion", "costophrenic blunting", PRESENT, [("pleural_effusion", UNCERTAIN)]),
        ("pleural_effusion", "blunting costophrenic angle", ABSENT, [("pleural_effusion", ABSENT)]),
        ("pleural_thickening", "pleural thickening", PRESENT, []),
        (
            "pneumothorax",
            "hydropneumothorax",
            PRESENT,
            [("pneumothorax", PRESENT), ("pleural_effusion", PRESENT)],
        ),
        ("pneumomediastinum", "pneumomediastinum", PRESENT, []),
        ("enlarged_cardiomediastinum", "widened mediastinum", PRESENT, []),
        ("non_acute_rib_fracture", "healed rib fracture", PRESENT, [("fracture", PRESENT)]),
        ("fracture_generic", "rib deformity", PRESENT, []),
    ],
)
def test_mapping_follows_the_written_definitions(
    disease: str, alias: str, status: int, expected: list[tuple[str, int]]
) -> None:
    assert mapped_evidence(disease, alias, status) == expected


def test_load_applies_the_mapping_and_drops_device_fractures(tmp_path: Path) -> None:
    report = (
        "FINDINGS: Calcified granuloma. Blunting of the costophrenic angle. Right lower lobe "
        "pneumonia. No evidence of lead fracture. Small hydropneumothorax."
    )
    tokens = (
        "FINDINGS : Calcified granuloma . Blunting of the costophrenic angle . Right lower lobe "
        "pneumonia . No evidence of lead fracture . Small hydropneumothorax ."
    )
    matches = [
        _match("lung_nodule_or_mass", "calcified granuloma", "definitely present", 2, 3),
        _match("pleural_effusion", "blunting costophrenic angle", "definitely present", 5, 8),
        _match("pneumonia", "pneumonia", "definitely present", 14),
        _match("air_space_opacity", "pneumonia", "definitely present", 14),
        _match("fracture_generic", "fracture", "definitely present", 20),
        _match("pneumothorax", "hydropneumothorax", "definitely present", 23),
    ]
    samples = _write_samples(tmp_path, {"synth_0001": (report, tokens, matches)})
    [(_, labels)] = load_radlabels(samples)
    # granuloma, pneumonia and the lead's fracture are look-alikes: all three stay 0
    assert labels == {f: ABSENT for f in FINDINGS} | {
        "pleural_effusion": PRESENT,  # the hydropneumothorax; blunting alone would be -1
        "pneumothorax": PRESENT,
    }
    matches = [m for m in matches if m["alias"] != "hydropneumothorax"]
    samples = _write_samples(tmp_path / "b", {"synth_0001": (report, tokens, matches)})
    [(_, labels)] = load_radlabels(samples)
    assert labels["pleural_effusion"] == UNCERTAIN


# --- the phrase suite ----------------------------------------------------------------------


HEADER = ",".join(SUITE_COLUMNS)


def _suite(tmp_path: Path, *rows: str, header: str = HEADER) -> Path:
    path = tmp_path / "suite.csv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_suite_loads_cases(tmp_path: Path) -> None:
    path = _suite(
        tmp_path,
        'neg-1,negation,NegEx,"No pneumothorax, effusion or consolidation.",0,0,0,0,0,0',
        "hedge-1,hedge,CheXpert,Possible small left effusion.,0,-1,0,0,0,0",
    )
    first, second = load_phrase_suite(path)
    assert (first.case, first.kind, first.source) == ("neg-1", "negation", "NegEx")
    assert first.report == "No pneumothorax, effusion or consolidation."
    assert second.labels == {f: ABSENT for f in FINDINGS} | {"pleural_effusion": UNCERTAIN}


@pytest.mark.parametrize(
    ("rows", "header", "reason"),
    [
        ([], HEADER, "no cases"),
        (["a,k,s,x,0,0,0,0,0"], HEADER.replace(",fracture", ""), "missing column(s) fracture"),
        (["a,k,s,x,0,0,0,0,0,yes"], HEADER, "line 2, fracture = 'yes' (expects 1, 0 or -1)"),
        (["a,k,s,x,0,0,0,0,0,"], HEADER, "line 2, fracture = ''"),
        (["a,k,s,x,0,0,0,0,0,0", "a,k,s,y,0,0,0,0,0,0"], HEADER, "line 3, case 'a' repeats"),
        (["a,k,s,,0,0,0,0,0,0"], HEADER, "line 2, report is empty"),
        (["a,,s,x,0,0,0,0,0,0"], HEADER, "line 2, kind is empty"),
        (["a,k,s,x,y,0,0,0,0,0,0"], HEADER, "line 2 has more fields than the header"),
    ],
)
def test_a_bad_suite_says_why(tmp_path: Path, rows: list[str], header: str, reason: str) -> None:
    with pytest.raises(LabelledReportsError) as caught:
        load_phrase_suite(_suite(tmp_path, *rows, header=header))
    assert reason in str(caught.value)


def test_a_missing_or_binary_suite_says_why(tmp_path: Path) -> None:
    with pytest.raises(LabelledReportsError, match="no such file"):
        load_phrase_suite(tmp_path / "absent.csv")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(HEADER.encode() + b"\n\xff\xfe,k,s,x,0,0,0,0,0,0\n")
    with pytest.raises(LabelledReportsError, match="not a UTF-8 CSV"):
        load_phrase_suite(binary)


def test_suite_bench_lists_the_errors_left_by_kind(tmp_path: Path) -> None:
    path = _suite(
        tmp_path,
        "pos-1,positive,s,Large right pleural effusion.,0,1,0,0,0,0",
        "neg-1,negation,s,No pneumothorax.,0,0,0,0,0,0",
        # a reference that disagrees with any labeler reading the words: one known error
        "neg-2,negation,s,No pneumothorax.,0,0,0,1,0,0",
    )
    result = run_suite_bench(path)
    assert result["n"] == 3
    assert result["per_kind"] == {
        "negation": {"n": 2, "errors": 1, "cases_wrong": 1},
        "positive": {"n": 1, "errors": 0, "cases_wrong": 0},
    }
    assert result["errors"] == [
        {"case": "neg-2", "kind": "negation", "finding": "pneumothorax", "expected": 1, "got": 0}
    ]
    assert result["per_finding"]["pleural_effusion"]["f1"] == 1.0
    assert result["per_finding"]["pneumothorax"]["recall"] == 0.0


def test_the_shipped_suite_loads_and_ships_as_package_data() -> None:
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["fedrad.simulations.benchmarks"]
    assert "*.csv" in package_data  # an installed (non-editable) fedrad finds the suite too
    if not DEFAULT_SUITE.is_file():
        pytest.skip(f"no phrase suite at {DEFAULT_SUITE} yet")
    cases = load_phrase_suite()
    assert len(cases) >= 50 and len({c.kind for c in cases}) >= 5


# --- `fedrad-sim bench labeler` --------------------------------------------------------------


@pytest.fixture
def bench_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A four-report radlabels stand-in (synth_0001/2 held out, synth_0003/4 dev) and a suite."""
    reports = {
        "synth_0001": ("Small left pleural effusion.", [("pleural_effusion", "small effusion")]),
        "synth_0002": ("Cardiomegaly.", [("cardiomegaly", "cardiomegaly")]),
        "synth_0003": ("Right apical pneumothorax.", [("pneumothorax", "apical pneumothorax")]),
        "synth_0004": ("Clear lungs.", []),
    }
    samples = _write_samples(
        tmp_path / "radlabels",
        {
            stem: (
                text,
                text.replace(".", " ."),
                [_match(d, a, "definitely present", 0) for d, a in found],
            )
            for stem, (text, found) in reports.items()
        },
    )
    suite = _suite(
        tmp_path,
        "pos-1,positive,s,Large right pleural effusion.,0,1,0,0,0,0",
        "neg-1,negation,s,No pneumothorax.,0,0,0,1,0,0",
    )
    monkeypatch.setattr(labeler_bench, "radlabels_samples_dir", lambda: samples)
    (tmp_path / "heldout").mkdir()
    heldout = _suite(
        tmp_path / "heldout",
        "ho-1,positive,s,Small right pneumothorax.,0,0,0,1,0,0",
    )
    monkeypatch.setattr(labeler_bench, "DEFAULT_SUITE", suite)
    monkeypatch.setattr(labeler_bench, "HELDOUT_SUITE", heldout)
    return tmp_path


def test_cli_scores_the_heldout_half_and_the_suite_by_default(bench_inputs: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(sim_app, ["bench", "labeler", "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert list(scored) == ["radlabels", "suite", "suite_heldout"]
    assert (scored["radlabels"]["split"], scored["radlabels"]["n"]) == ("heldout", 2)
    assert scored["suite"]["errors"][0]["case"] == "neg-1"
    assert scored["suite_heldout"]["n"] == 1 and scored["suite_heldout"]["errors"] == []

    text = runner.invoke(sim_app, ["bench", "labeler"]).stdout.splitlines()
    assert text[0].startswith(
        "radlabels (heldout half) vs its independent labels: n=2 macro accuracy"
    )
    assert text[1].startswith("  per finding F1: nodule n/a (none present), pleural_effusion 1.00")
    assert text[2].startswith("suite vs written definitions: n=2")
    assert text[4] == "  cases wrong per kind: negation 1/1, positive 0/1 (--json lists each error)"
    assert text[5].startswith("suite_heldout vs written definitions: n=1")


def test_cli_split_and_suite_options(bench_inputs: Path) -> None:
    runner = CliRunner()
    dev = runner.invoke(
        sim_app, ["bench", "labeler", "--radlabels-split", "dev", "--no-suite", "--json"]
    )
    assert dev.exit_code == 0, dev.output
    assert list(json.loads(dev.stdout)) == ["radlabels"]
    assert json.loads(dev.stdout)["radlabels"]["n"] == 2
    both = runner.invoke(sim_app, ["bench", "labeler", "--radlabels-split", "all", "--no-suite"])
    assert both.stdout.startswith("radlabels (all 1,000) vs its independent labels: n=4")
    suite_only = runner.invoke(sim_app, ["bench", "labeler", "--no-radlabels", "--json"])
    assert list(json.loads(suite_only.stdout)) == ["suite", "suite_heldout"]

    bad = runner.invoke(sim_app, ["bench", "labeler", "--radlabels-split", "test"])
    assert bad.exit_code == 2 and "choose from all, dev, heldout" in bad.stderr
    nothing = runner.invoke(sim_app, ["bench", "labeler", "--no-radlabels", "--no-suite"])
    assert nothing.exit_code == 2 and "nothing to measure" in nothing.stderr


def test_cli_reports_a_bad_suite(bench_inputs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labeler_bench, "HELDOUT_SUITE", bench_inputs / "absent.csv")
    result = CliRunner().invoke(sim_app, ["bench", "labeler", "--no-radlabels"])
    assert result.exit_code == 2 and "no such file" in result.stderr
