"""Hostile files: every file decodes or is skipped with a one-line reason, in bounded memory.

`fedrad-site check` and `prepare` run as real subprocesses (as a site runs them) over a
directory of good studies plus the mutation corpus of `tests/client/dicom_mutations.py`; a small
wrapper process runs the CLI as its child and reads `getrusage(RUSAGE_CHILDREN).ru_maxrss`, the
peak resident set of the largest process in the CLI's tree (the CLI and its decoding workers),
and polls the summed RSS of the tree for the record. Run with `pytest -s` to see the numbers.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Final

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from fedrad.client.ingest.dicom_io import Radiograph, UnusableError, load_radiograph
from tests.client.dicom_mutations import build_corpus, deflate_bomb
from tests.conftest import write_radiograph, write_reports

CORPUS_SEED: Final[int] = 20240611
N_GOOD: Final[int] = 4
PEAK_RSS_BOUND_MIB: Final[int] = 1536
"""Largest single process of `check`/`prepare --workers 2` over the whole corpus. The CLI
imports torch and transformers (about 510 MiB resident before it reads a file, measured on the
2-core dev box), so this leaves about 1 GiB for one worker decoding one hostile file."""
BOMB_GROWTH_BOUND_MIB: Final[int] = 64
"""How far the deflate bomb (288 MB once inflated) may raise the largest process's peak above
the same command on four good studies: refused from its header, it adds nothing measurable."""
CLI_TIMEOUT_S: Final[float] = 300.0
"""The wrapper kills the CLI's whole process group after this long."""

_MEASURE: Final[str] = r"""
import json, os, resource, signal, subprocess, sys, time
import psutil
out_path, err_path, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
start = time.monotonic()
tree_peak = 0
timed_out = False
with open(out_path, "wb") as out, open(err_path, "wb") as err:
    child = subprocess.Popen(sys.argv[4:], stdout=out, stderr=err, start_new_session=True)
    while child.poll() is None:
        if time.monotonic() - start > timeout:
            os.killpg(child.pid, signal.SIGKILL)
            timed_out = True
            child.wait()
            break
        total = 0
        try:
            procs = [psutil.Process(child.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.Error:
            procs = []
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        tree_peak = max(tree_peak, total)
        time.sleep(0.05)
print(json.dumps({
    "rc": child.returncode,
    "timed_out": timed_out,
    "wall_s": time.monotonic() - start,
    "maxrss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    "tree_peak_mib": tree_peak / 2**20,
}))
"""


def cli_command() -> list[str]:
    """The `fedrad-site` console script next to this interpreter. (`python -m fedrad.client.cli`
    does not run the app: the module has no `__main__` block.)"""
    script = Path(sys.executable).parent / "fedrad-site"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from fedrad.client.cli import main; main()"]


@dataclass(frozen=True)
class CliRun:
    rc: int
    stdout: str
    stderr: str
    wall_s: float
    maxrss_mib: float
    tree_peak_mib: float
    timed_out: bool

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads(self.stdout)

    def describe(self) -> str:
        return f"rc={self.rc}; stderr tail:\n{self.stderr[-3000:]}"


def run_cli(*args: str, timeout: float = CLI_TIMEOUT_S) -> CliRun:
    """`fedrad-site ARGS` as the only child of a fresh measuring process."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        wrapper = [sys.executable, "-c", _MEASURE, str(out), str(err), str(timeout)]
        measured = subprocess.run(
            [*wrapper, *cli_command(), *args],
            capture_output=True,
            text=True,
            timeout=timeout + 60,
            check=True,
        )
        stats = json.loads(measured.stdout)
        return CliRun(
            rc=stats["rc"],
            stdout=out.read_text(errors="replace"),
            stderr=err.read_text(errors="replace"),
            wall_s=stats["wall_s"],
            maxrss_mib=stats["maxrss_mib"],
            tree_peak_mib=stats["tree_peak_mib"],
            timed_out=stats["timed_out"],
        )


def _record(label: str, run: CliRun, detail: str) -> None:
    print(
        f"\n[hostile-files] {label}: {detail}; rc {run.rc}, wall {run.wall_s:.1f} s, "
        f"peak RSS {run.maxrss_mib:.0f} MiB (largest process), "
        f"summed tree RSS peak {run.tree_peak_mib:.0f} MiB"
    )


GOOD_REPORTS: Final[tuple[str, ...]] = (
    "Lungs are clear. No pleural effusion.",
    "Small right pneumothorax.",
    "Cardiomegaly without edema.",
    "Left lower lobe consolidation.",
)


def write_good_site(site: Path) -> list[str]:
    """Four valid CR studies with reports; returns their image paths relative to `site`."""
    rows = []
    rel = []
    for i in range(1, N_GOOD + 1):
        accession = f"GOOD-{i}"
        pixels = np.random.default_rng(i).integers(0, 4000, (96, 80), dtype=np.uint16)
        write_radiograph(site / f"good{i}.dcm", accession=accession, pixels=pixels)
        rows.append((accession, GOOD_REPORTS[i - 1]))
        rel.append(f"good{i}.dcm")
    write_reports(site / "reports.csv", rows)
    return rel


def usable_images(summary: dict[str, Any], files: set[str]) -> set[str]:
    """The image files a scan used: every file it saw, less those it skipped."""
    return files - {item["path"] for item in summary["skipped"]}


def assert_one_line_reasons(summary: dict[str, Any]) -> None:
    bad = [i for i in summary["skipped"] if not i["reason"].strip() or "\n" in i["reason"]]
    assert not bad, f"reasons must be one non-empty line: {bad[:10]}"


@dataclass(frozen=True)
class GoodSite:
    root: Path  # the good studies alone
    good: set[str]  # their image paths, relative to `root`
    baseline: CliRun  # `check --json --workers 2` on `root`


@dataclass(frozen=True)
class HostileSite:
    site: Path  # the same good studies + mutants/
    good: set[str]
    mutants: set[str]  # mutant paths relative to `site`
    baseline: CliRun


@pytest.fixture(scope="module")
def good_site(tmp_path_factory: pytest.TempPathFactory) -> GoodSite:
    root = tmp_path_factory.mktemp("good_only")
    good = set(write_good_site(root))
    baseline = run_cli("check", str(root), "--json", "--workers", "2")
    assert baseline.rc == 0, baseline.describe()
    assert usable_images(baseline.summary, good) == good
    _record("check, good studies only", baseline, f"{N_GOOD} good studies")
    return GoodSite(root, good, baseline)


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory: pytest.TempPathFactory, good_site: GoodSite) -> HostileSite:
    site = tmp_path_factory.mktemp("hostile") / "site"
    shutil.copytree(good_site.root, site)
    started = time.perf_counter()
    corpus = build_corpus(site / "mutants", seed=CORPUS_SEED)
    size_mib = sum(p.stat().st_size for p in corpus) / 2**20
    print(
        f"\n[hostile-files] corpus: {len(corpus)} mutants, {size_mib:.1f} MiB, "
        f"built in {time.perf_counter() - started:.1f} s (seed {CORPUS_SEED})"
    )
    mutants = {p.relative_to(site).as_posix() for p in corpus}
    return HostileSite(site, good_site.good, mutants, good_site.baseline)


def _assert_corpus_result(run: CliRun, hs: HostileSite) -> dict[str, Any]:
    assert not run.timed_out, f"CLI still running after {CLI_TIMEOUT_S:.0f} s"
    assert "Traceback" not in run.stderr, run.describe()
    assert run.rc == 0, run.describe()
    summary = run.summary
    assert summary["files_seen"] == len(hs.good) + len(hs.mutants)
    assert_one_line_reasons(summary)
    skipped = {item["path"] for item in summary["skipped"]}
    missing = sorted(hs.mutants - skipped)
    assert not missing, f"{len(missing)} mutants neither skipped nor usable: {missing[:20]}"
    used = usable_images(summary, hs.good | hs.mutants)
    assert used == usable_images(hs.baseline.summary, hs.good)
    assert summary["usable"] == hs.baseline.summary["usable"] == N_GOOD
    return summary


@pytest.mark.slow
@pytest.mark.integration
def test_check_over_mutation_corpus(hostile_site: HostileSite) -> None:
    """`check --json --workers 2` over good studies plus the corpus: exit 0, no traceback, each
    mutant skipped with a one-line reason, the same usable studies as the good studies alone,
    and no process of the CLI's tree above PEAK_RSS_BOUND_MIB (1536 MiB) resident."""
    hs = hostile_site
    run = run_cli("check", str(hs.site), "--json", "--workers", "2")
    _record("check, corpus", run, f"{len(hs.mutants)} mutants + {N_GOOD} good studies")
    _assert_corpus_result(run, hs)
    assert run.maxrss_mib < PEAK_RSS_BOUND_MIB


EVERY_MODALITY: Final[str] = "CR,CT,DX,DR,MG,MR,NM,OT,PT,RF,RG,SC,US,XA"
"""Accepting the corpus' seeds' modalities sends every mutant's pixels to a decoder (gdcm,
pylibjpeg, openjpeg, pyjpegls), where a crafted header makes some of them abort or panic."""


@pytest.mark.slow
@pytest.mark.integration
def test_check_sends_mutants_to_every_decoder_and_survives(hostile_site: HostileSite) -> None:
    """The same corpus with every seed's modality accepted: decoders that abort their process
    cost their own file (skipped as crashed), and the good studies are unchanged."""
    hs = hostile_site
    run = run_cli("check", str(hs.site), "--json", "--workers", "2", "--modalities", EVERY_MODALITY)
    _record("check, corpus, every modality", run, f"{len(hs.mutants)} mutants + {N_GOOD} good")
    summary = _assert_corpus_result(run, hs)
    reasons = [item["reason"] for item in summary["skipped"]]
    crashed = sum("decoder crashed" in r for r in reasons)
    print(f"[hostile-files] every modality: {summary['images_decoded']} decoded, {crashed} crashed")
    assert summary["images_decoded"] > N_GOOD  # mutants did reach the decoders
    assert run.maxrss_mib < PEAK_RSS_BOUND_MIB


@pytest.mark.slow
@pytest.mark.integration
def test_prepare_over_mutation_corpus(hostile_site: HostileSite, tmp_path: Path) -> None:
    """`prepare` over the same directory into a fresh cache: the same studies as `check` on the
    good studies alone, each cached, no traceback, the same PEAK_RSS_BOUND_MIB (1536 MiB)."""
    hs = hostile_site
    cache_dir = tmp_path / "cache"
    run = run_cli(
        "prepare", str(hs.site), "--json", "--workers", "2", "--cache-dir", str(cache_dir)
    )
    _record("prepare, corpus", run, f"{len(hs.mutants)} mutants + {N_GOOD} good studies")
    summary = _assert_corpus_result(run, hs)
    manifest = json.loads(Path(summary["manifest"]).read_text())
    assert Path(summary["manifest"]).is_relative_to(cache_dir)
    assert sorted(s["report"] for s in manifest["studies"]) == sorted(GOOD_REPORTS)
    assert run.maxrss_mib < PEAK_RSS_BOUND_MIB


@pytest.mark.slow
@pytest.mark.integration
def test_deflate_bomb_is_refused_in_bounded_memory(good_site: GoodSite, tmp_path: Path) -> None:
    """A ~280 KB deflated file whose header claims 12000x12000 16-bit pixels and whose dataset
    inflates to 288 MB: skipped with a reason before it is decoded (its report is there, so a
    decoded bomb would count as usable), its largest process at most BOMB_GROWTH_BOUND_MIB
    (64 MiB) above `check` on good studies."""
    site = tmp_path / "site"
    bomb = deflate_bomb(site / "bomb.dcm")
    write_reports(site / "reports.csv", [("BOMB-1", "Lungs are clear.")])
    size_kib = bomb.stat().st_size / 1024
    assert 200 < size_kib < 400
    run = run_cli("check", str(site), "--json", "--workers", "2")
    _record("check, deflate bomb", run, f"{size_kib:.0f} KiB file claiming 12000x12000x16 bit")
    assert not run.timed_out
    assert "Traceback" not in run.stderr, run.describe()
    assert run.rc == 1, run.describe()
    summary = run.summary
    assert_one_line_reasons(summary)
    reasons = {item["path"]: item["reason"] for item in summary["skipped"]}
    assert "bomb.dcm" in reasons
    assert summary["usable"] == 0 and summary["images_decoded"] == 0, reasons["bomb.dcm"]
    baseline = good_site.baseline.maxrss_mib
    growth = run.maxrss_mib - baseline
    print(f"[hostile-files] deflate bomb: reason {reasons['bomb.dcm']!r}; growth {growth:.0f} MiB")
    peaks = f"largest process {run.maxrss_mib:.0f} MiB; {baseline:.0f} MiB on good studies"
    assert growth < BOMB_GROWTH_BOUND_MIB, peaks


# ----------------------------------------------------------------------------- in process


@cache
def _valid_radiograph() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        pixels = np.random.default_rng(7).integers(0, 4000, (64, 48), dtype=np.uint16)
        return write_radiograph(Path(tmp) / "v.dcm", accession="PROP-1", pixels=pixels).read_bytes()


HEADER_SPAN: Final[int] = 1024
"""Most edits land here: in the header (the valid file's pixel data starts near byte 900)."""

offsets = st.one_of(st.integers(0, HEADER_SPAN), st.integers(0, 2**31))
edits = st.lists(
    st.tuples(
        offsets,
        st.sampled_from(["xor", "set", "delete", "insert", "huge-length"]),
        st.integers(1, 255),
    ),
    min_size=1,
    max_size=8,
)


def mutate(data: bytes, changes: list[tuple[int, str, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for raw_offset, op, value in changes:
        if not out:
            break
        at = raw_offset % len(out)
        if op == "xor":
            out[at] ^= value
        elif op == "set":
            out[at] = (0x00, 0xFF, value)[value % 3]
        elif op == "delete":
            del out[at : at + value % 16 + 1]
        elif op == "insert":
            out[at:at] = bytes([value]) * (value % 16 + 1)
        elif at + 4 <= len(out):  # a 32-bit length field (or anything there) made huge
            struct.pack_into("<I", out, at, 0xFFFFFFF0 - value)
    if cut is not None and out:
        del out[cut % len(out) :]
    return bytes(out)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=edits, cut=st.one_of(st.none(), st.integers(0, 2**31)))
def test_mutated_radiograph_loads_or_is_unusable(
    changes: list[tuple[int, str, int]], cut: int | None
) -> None:
    """Whatever bytes change, `load_radiograph` returns a radiograph or raises UnusableError
    with a one-line reason; nothing else escapes."""
    data = mutate(_valid_radiograph(), changes, cut)
    note(f"{len(data)} bytes after {changes}, cut {cut}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.dcm"
        path.write_bytes(data)
        try:
            image = load_radiograph(path)
        except UnusableError as exc:
            reason = str(exc)
            assert reason.strip() and "\n" not in reason
        else:
            assert isinstance(image, Radiograph)
            assert image.pixels.ndim == 2
