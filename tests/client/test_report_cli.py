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
        "report",
        "report_source",
        "findings",
        "decisions",
        "sides",
        "side_probabilities",
        "thresholds",
        "answer",
        "answer_value",
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
        ("ct", "modality CT"),
        ("empty_question", "non-empty question"),
        ("no_model", "not a checkpoint directory"),
        ("missing_file", "no such file"),
        ("pipe", "named pipe (not a regular file)"),
        ("huge_header", "over the 67 megapixel limit"),
        ("old_model", "checkpoint format 2: it predates the findings prompt"),
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
