"""`fedrad-site report --prior --html`: the comparison with the patient's prior (or why it is
left out), and the clinician's page opened in a real headless Chromium: it renders, every
image loads, nothing is requested from the network, and no header PHI appears anywhere."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrad.client.cli import app
from fedrad.common.interval import CHANGES
from fedrad.common.model.checkpoint import save_checkpoint
from tests.browser import embedded_pngs, open_page
from tests.conftest import PHI, write_radiograph
from tests.model_fixtures import micro_model

runner = CliRunner()
ACCESSION = "ACC55512345"
QUESTION = "Is the effusion new, larger, smaller, stable or resolved since the prior?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(micro_model(), tmp_path_factory.mktemp("m") / "ckpt")


def _scan(path: Path, date: str, **extra: object) -> Path:
    return write_radiograph(
        path, accession=f"{ACCESSION}{path.stem}", extra={"StudyDate": date, **extra}
    )


def _report(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["report", *args])


def test_a_prior_of_the_same_patient_is_compared(checkpoint: Path, tmp_path: Path) -> None:
    current = _scan(tmp_path / "now.dcm", "20230311")
    prior = _scan(tmp_path / "before.dcm", "20230101")
    result = _report(
        str(current), "--model", str(checkpoint), "--prior", str(prior), "--ask", QUESTION, "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    comparison = data["comparison"]
    assert comparison["compared"] is True and comparison["days_before"] == 69
    assert set(comparison["changes"].values()) <= set(CHANGES)
    assert "COMPARISON: Prior study 69 days earlier." in data["report"]
    assert data["answer_value"] == comparison["changes"]["pleural_effusion"]
    assert "20230101" not in result.stdout and "2023-01-01" not in result.stdout


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("other_patient", "the prior belongs to another patient"),
        ("newer", "the prior is newer than the current study (by 300 days)"),
        ("unreadable", "the prior could not be read"),
        ("no_date", "the prior's header has no study date"),
        ("no_patient", "the prior's header names no patient"),
    ],
)
def test_a_prior_that_cannot_be_compared_is_named_and_left_out(
    checkpoint: Path, tmp_path: Path, case: str, reason: str
) -> None:
    current = _scan(tmp_path / "now.dcm", "20230311")
    prior = tmp_path / "prior.dcm"
    if case == "other_patient":
        _scan(prior, "20230101", PatientID="MRN0000001")
    elif case == "newer":
        _scan(prior, "20240105")
    elif case == "unreadable":
        prior.write_bytes(b"\x00" * 300)
    elif case == "no_date":
        _scan(prior, "")
    else:
        _scan(prior, "20230101", PatientID="")
    result = _report(
        str(current), "--model", str(checkpoint), "--prior", str(prior), "--ask", QUESTION, "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["comparison"]["compared"] is False
    assert reason in data["comparison"]["reason"]
    assert "COMPARISON" not in data["report"]
    assert data["answer_value"] == "cannot answer"
    text = _report(str(current), "--model", str(checkpoint), "--prior", str(prior))
    assert text.exit_code == 0 and "comparison left out: " + reason in text.output


def _png_chunks(png: bytes) -> list[bytes]:
    """The chunk types of a PNG: pixel data only, or also text a header value could hide in."""
    types, pos = [], 8
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos : pos + 8])
        types.append(kind)
        pos += 12 + length
    return types


def _phi_strings() -> list[str]:
    values = [ACCESSION, "20230311", "2023-03-11", "20230101", "1952", "MRN7730912"]
    for value in PHI.values():
        values.append(value)
        values.extend(p for p in re.split(r"[\^ ]", value) if len(p) > 2)
    return values


def test_the_page_opens_offline_with_every_image_and_no_phi(
    checkpoint: Path, tmp_path: Path
) -> None:
    current = _scan(tmp_path / "now.dcm", "20230311")
    prior = _scan(tmp_path / "before.dcm", "20230101")
    page = tmp_path / "out" / "page.html"
    page.parent.mkdir()
    result = _report(
        str(current),
        "--model",
        str(checkpoint),
        "--prior",
        str(prior),
        "--ask",
        QUESTION,
        "--present-at",
        "0.4",
        "--possible-at",
        "0.2",
        "--html",
        str(page),
    )
    assert result.exit_code == 0, result.output
    assert f"page written: {page}" in result.output
    html = page.read_text(encoding="utf-8")
    opened = open_page(page)
    assert opened.network_requests == ()
    assert opened.images_loaded and all(opened.images_loaded)
    assert len(opened.images_loaded) >= 2  # the scan and the prior, plus any maps
    assert "Prior study 69 days earlier." in opened.text
    assert "0.40" in opened.text  # the site's threshold is shown
    assert not [c for c in opened.console if "Content Security Policy" in c]
    pngs = embedded_pngs(html)
    assert pngs and all(
        set(_png_chunks(png)) <= {b"IHDR", b"IDAT", b"IEND", b"PLTE"} for png in pngs
    )
    visible = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)
    for value in _phi_strings():
        assert value.lower() not in visible.lower(), value
        assert value.lower() not in opened.text.lower(), value
    assert opened.screenshot_png.startswith(b"\x89PNG")


SERIES = Path(__import__("pydicom").__file__).parent / "data" / "test_files" / "dicomdirtests"


def test_a_ct_page_shows_three_planes_and_refuses_a_radiograph_prior(
    checkpoint: Path, tmp_path: Path
) -> None:
    """pydicom's real 5-slice CT series as the current study, a radiograph as its "prior"."""
    prior = _scan(tmp_path / "before.dcm", "19900101")
    page = tmp_path / "ct.html"
    result = _report(
        str(SERIES / "98892001"),
        "--model",
        str(checkpoint),
        "--prior",
        str(prior),
        "--html",
        str(page),
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["scan"].startswith("CT volume of 5 slices")
    assert data["comparison"]["compared"] is False
    reason = data["comparison"]["reason"]
    assert reason.startswith("the prior is a radiograph and the current study a CT volume")
    opened = open_page(page)
    assert opened.network_requests == () and opened.images_loaded and all(opened.images_loaded)
    assert "CT volume of 5 slices" in opened.text
    assert "same kind of scan" in opened.text
    # the volume is drawn as three planes side by side: wider than tall
    from io import BytesIO

    from PIL import Image

    first = Image.open(BytesIO(embedded_pngs(page.read_text(encoding="utf-8"))[0]))
    assert first.width > first.height
