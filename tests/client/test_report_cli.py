"""`fedrad-site report`: JSON contract on a synthetic scan and the real chest radiograph, and a
one-line error for every kind of bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from fedrad.client.cli import app
from fedrad.client.reading.consistency import answer_notes, report_notes
from fedrad.common.findings import FINDINGS
from fedrad.common.model.checkpoint import save_checkpoint
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
    assert set(data) == {"report", "findings", "answer", "notes"}
    assert set(data["findings"]) == set(FINDINGS)
    assert all(0.0 <= p <= 1.0 for p in data["findings"].values())
    assert isinstance(data["report"], str) and isinstance(data["answer"], str)
    assert data["notes"] == report_notes(data["report"], data["findings"]) + answer_notes(
        "Is there a pleural effusion?", data["answer"], data["findings"]
    )


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
