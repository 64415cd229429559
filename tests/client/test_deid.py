"""De-identification: the keep-list removes header PHI, pseudonyms are keyed and consistent."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from fedrad.client.ingest.deid import (
    PhiValues,
    PseudonymKey,
    collect_phi,
    deidentify_dataset,
    load_or_create_key,
    scrub_text,
)
from tests.conftest import PHI, write_radiograph


def _phi_strings() -> list[str]:
    parts = []
    for value in PHI.values():
        parts.extend(p for p in value.split("^") if len(p) > 2)
    return parts


def test_deidentified_dataset_has_no_header_phi(tmp_path: Path) -> None:
    path = write_radiograph(tmp_path / "a.dcm", accession="ACC1234567")
    ds = pydicom.dcmread(path)
    key = PseudonymKey(b"k" * 32)
    out = deidentify_dataset(ds, key)
    saved = tmp_path / "out.dcm"
    out.save_as(saved, enforce_file_format=False)
    blob = saved.read_bytes()
    for value in [*_phi_strings(), "ACC1234567", "19520417", "20230311"]:
        assert value.encode() not in blob, value
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert out.SOPInstanceUID != ds.SOPInstanceUID
    assert out.SOPInstanceUID.startswith("2.25.")
    assert out.PixelData == ds.PixelData
    assert out.PatientAge == "071Y"


def test_uid_and_id_remapping_is_consistent_and_keyed() -> None:
    a, b = PseudonymKey(b"a" * 32), PseudonymKey(b"b" * 32)
    assert a.uid("1.2.3") == a.uid("1.2.3")
    assert a.uid("1.2.3") != a.uid("1.2.4")
    assert a.uid("1.2.3") != b.uid("1.2.3")
    assert len(a.uid("1.2.3")) <= 64
    assert a.token("MRN1", namespace="patient") != a.token("MRN1", namespace="accession")


def test_old_ages_are_capped(tmp_path: Path) -> None:
    path = write_radiograph(tmp_path / "a.dcm", accession="A1", extra={"PatientAge": "097Y"})
    out = deidentify_dataset(pydicom.dcmread(path), PseudonymKey(b"k" * 32))
    assert out.PatientAge == "090Y"


def test_private_tags_and_unknown_attributes_are_dropped(tmp_path: Path) -> None:
    path = write_radiograph(
        tmp_path / "a.dcm", accession="A1", extra={"ImageComments": "pt Quackenbush, bed 4"}
    )
    ds = pydicom.dcmread(path)
    block = ds.private_block(0x0011, "ACME", create=True)
    block.add_new(0x01, "LO", "Theodora Quackenbush")
    out = deidentify_dataset(ds, PseudonymKey(b"k" * 32))
    assert "ImageComments" not in out
    assert not any(elem.tag.is_private for elem in out)


def test_key_file_is_created_owner_only_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "pseudonym.key"
    first = load_or_create_key(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert load_or_create_key(path) == first


def test_short_key_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"short")
    path.chmod(0o600)
    with pytest.raises(ValueError, match="too short"):
        load_or_create_key(path)


def test_a_planted_key_is_refused(tmp_path: Path) -> None:
    """A key someone else could have written (readable by others, or a link to a file whose
    bytes they know) would make the site's pseudonyms computable by them."""
    known = tmp_path / "known"
    known.write_bytes(b"k" * 64)
    with pytest.raises(ValueError, match="mode 0600"):
        load_or_create_key(known)
    known.chmod(0o600)
    link = tmp_path / "link.key"
    link.symlink_to(known)
    with pytest.raises(ValueError, match="cannot be opened"):
        load_or_create_key(link)
    assert load_or_create_key(known).secret == b"k" * 32


def test_report_text_is_scrubbed_of_header_phi(tmp_path: Path) -> None:
    path = write_radiograph(tmp_path / "a.dcm", accession="ACC1234567")
    phi = collect_phi(pydicom.dcmread(path))
    text = (
        "FINDINGS: Compared with prior study of QUACKENBUSH, Theodora (MRN7730912) from 04/17/1952 "
        "at Saint Hildegard Memorial Hospital. Small left pleural effusion. The lungs are clear "
        "otherwise.\nIMPRESSION: Effusion. Discussed with Dr. Vandermeer on March 11, 2023, "
        "accession ACC1234567, call 555-201-3344."
    )
    out = scrub_text(text, phi)
    for value in [*_phi_strings(), "QUACKENBUSH", "MRN7730912", "ACC1234567", "555-201-3344"]:
        assert value not in out, value
    assert "1952" not in out and "2023" not in out
    assert "Small left pleural effusion" in out
    assert "lungs are clear" in out


def test_a_name_is_scrubbed_as_a_word_never_inside_one() -> None:
    """Every alternative of the name pattern keeps its word boundaries, whatever order the set
    of names iterates in (it changed with the hash seed): "Der" is not cut out of
    "Borderline", and the names themselves still go."""
    phi = PhiValues(
        names=frozenset({"Der", "Ann", "Lee", "Van"}),
        identifiers=frozenset(),
        places=frozenset(),
        dates=frozenset(),
    )
    text = "Borderline cardiac enlargement. Annular calcification. Seen by Der Lee, Van Ann."
    assert scrub_text(text, phi) == (
        "Borderline cardiac enlargement. Annular calcification. Seen by [NAME] [NAME], "
        "[NAME] [NAME]."
    )


def test_scrub_keeps_clinical_text_and_sizes() -> None:
    text = "8 mm nodule in the right upper lobe. Heart size normal. 1.2 x 0.9 cm opacity at T12."
    assert scrub_text(text, collect_phi(pydicom.Dataset())) == text


def test_titled_names_not_in_header_are_removed() -> None:
    out = scrub_text("Findings called to Dr. Rosalind Okafor.", collect_phi(pydicom.Dataset()))
    assert "Okafor" not in out and "Rosalind" not in out


def test_ages_over_89_in_text_are_aggregated() -> None:
    phi = collect_phi(pydicom.Dataset())
    assert scrub_text("93 y/o F, fall.", phi) == "90+ y/o F, fall."
    assert "96" not in scrub_text("A 96-year-old man aged 96.", phi)
    assert scrub_text("45 y/o M, cough.", phi) == "45 y/o M, cough."
