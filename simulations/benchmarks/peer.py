"""Side-by-side benchmark: fedrad's report labeler against medspaCy (ConText), same reports.

medspaCy pins spacy<3.8, whose thinc needs numpy<2, while fedrad runs on numpy 2.x, so the peer
cannot be imported here: it runs in its own venv (``make bench-labeler-peer`` creates
``.venv-medspacy``) as the script ``peer_labeler/medspacy_labeler.py``, fed JSON lines through a
pipe. Both labelers are scored by ``labeler_bench.evaluate`` against the same references, per
corpus: radlabels' held-out half (the figure to quote: fedrad was not developed against it), its
development half, and the phrase suite written to the finding definitions (with its errors by
kind). radlabels evidence from ignored sections such as INDICATION is dropped, as both labelers
ignore them.

    python -m fedrad.simulations.benchmarks.peer --out runs/peer_bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

from fedrad.common.findings import FINDINGS
from fedrad.common.labeling.labeler import ReportLabels
from fedrad.common.labeling.radlabels import load_radlabels, radlabels_samples_dir
from fedrad.simulations.benchmarks import labeler as labeler_bench

logger = logging.getLogger(__name__)

PEER_SCRIPT: Final[Path] = Path(__file__).resolve().parent / "peer_labeler" / "medspacy_labeler.py"
DEFAULT_PEER_PYTHON: Final[Path] = Path(".venv-medspacy") / "bin" / "python"
"""Relative to the repository root, where ``make bench-labeler-peer`` creates the peer venv."""
MAKE_TARGET: Final[str] = "make bench-labeler-peer"
_VALID: Final[frozenset[int]] = frozenset({1, 0, -1})
_ENV_DROP: Final[tuple[str, ...]] = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
"""Our interpreter's settings must not leak into the peer's (numpy 2 on its path breaks thinc)."""


class PeerVenvMissingError(FileNotFoundError):
    """The medspaCy venv (or its script) is not there; the message names the make target."""


class PeerLabelerError(RuntimeError):
    """The peer process failed or wrote output that does not describe every report."""


def wrap_peer_labels(lines: Iterable[str], n_reports: int) -> list[ReportLabels]:
    """Peer JSON lines ``{"id": i, "labels": {...}}`` -> ReportLabels in report order 0..n-1.

    The peer labels neither sides nor sizes, so those are None; ``evaluate`` reads labels only.
    """
    by_id: dict[int, dict[str, int]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            rid, raw = int(record["id"]), record["labels"]
            labels = {f: int(raw[f]) for f in FINDINGS}
        except (ValueError, KeyError, TypeError) as exc:
            raise PeerLabelerError(f"peer output line {number} is malformed: {exc!r}") from exc
        bad = {f: v for f, v in labels.items() if v not in _VALID}
        if bad:
            raise PeerLabelerError(f"peer output line {number}: labels outside 1/0/-1: {bad}")
        if rid in by_id:
            raise PeerLabelerError(f"peer output repeats report id {rid}")
        by_id[rid] = labels
    missing = [i for i in range(n_reports) if i not in by_id]
    extra = sorted(set(by_id) - set(range(n_reports)))
    if missing or extra:
        raise PeerLabelerError(
            f"peer labelled {len(by_id)} reports for {n_reports}: "
            f"missing ids {missing[:5]}, unexpected ids {extra[:5]}"
        )
    return [
        ReportLabels(labels=by_id[i], sides={f: None for f in FINDINGS}, nodule_size_mm=None)
        for i in range(n_reports)
    ]


def _parse_timing(stderr: str) -> dict[str, float]:
    """The peer's own split of its run time (pipeline load vs labelling), if it reported one."""
    for line in reversed(stderr.splitlines()):
        if line.startswith('{"peer_timing"'):
            try:
                timing = json.loads(line)["peer_timing"]
                return {k: float(v) for k, v in timing.items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                break
    return {}


def run_peer_labeler(
    peer_python: Path,
    texts: Sequence[str],
    *,
    script: Path = PEER_SCRIPT,
    peer_args: Sequence[str] = (),
    timeout_s: float = 600.0,
) -> tuple[list[ReportLabels], dict[str, float]]:
    """Label ``texts`` with the peer script in its own interpreter; (labels, seconds).

    ``peer_args`` go to the script (``--hypothetical=absent``, ``--keep-colon-rules``,
    ``--sections-to-next-header``); none gives its documented defaults.
    """
    if not Path(peer_python).is_file():
        raise PeerVenvMissingError(
            f"medspaCy peer venv not found ({peer_python}); create it with `{MAKE_TARGET}`"
        )
    if not script.is_file():
        raise PeerVenvMissingError(f"peer labeler script not found: {script}")
    payload = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts))
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [str(peer_python), str(script), *peer_args],
            input=payload,
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=timeout_s,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PeerLabelerError(f"peer labeler exceeded {timeout_s:.0f} s") from exc
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise PeerLabelerError(f"peer labeler exited {proc.returncode}:\n{tail}")
    labels = wrap_peer_labels(proc.stdout.splitlines(), len(texts))
    seconds = {"wall": wall, **_parse_timing(proc.stderr)}
    return labels, seconds


CORPORA: Final[dict[str, str]] = {
    "radlabels_heldout": "radlabels, held-out half",
    "radlabels_dev": "radlabels, development half",
    "suite": "phrase suite (written definitions)",
    "suite_heldout": "held-out phrase suite (whole reports, written definitions)",
}
"""Corpus name -> its title in the tables, in the order they are run and shown."""


@dataclass(frozen=True)
class _Corpus:
    texts: list[str]
    truth: list[dict[str, int]]
    cases: list[labeler_bench.SuiteCase] | None = None


def _load_corpus(name: str, samples_dir: Path | None, suite_path: Path) -> _Corpus:
    if name in ("suite", "suite_heldout"):
        path = suite_path if name == "suite" else labeler_bench.HELDOUT_SUITE
        cases = labeler_bench.load_phrase_suite(path)
        return _Corpus([c.report for c in cases], [c.labels for c in cases], cases)
    split = "heldout" if name == "radlabels_heldout" else "dev"
    rows = load_radlabels(samples_dir or radlabels_samples_dir(), split=split)
    return _Corpus([text for text, _ in rows], [labels for _, labels in rows])


def _per_s(n: int, seconds: float | None) -> float | None:
    return n / seconds if seconds else None


def run_peer_bench(
    peer_python: Path,
    *,
    samples_dir: Path | None = None,
    suite_path: Path = labeler_bench.DEFAULT_SUITE,
    corpora: Sequence[str] = tuple(CORPORA),
    script: Path = PEER_SCRIPT,
    peer_args: Sequence[str] = (),
    timeout_s: float = 600.0,
) -> dict[str, object]:
    """Score fedrad and medspaCy on each corpus: {"corpora": {name: {"n", "fedrad", "medspacy",
    "seconds", "reports_per_s"} (the suite adds "per_kind" and "errors", both labelers')},
    "medspacy_args"}. medspaCy runs once per corpus; its pipeline load is timed apart."""
    if not Path(peer_python).is_file():
        # Before the corpus loads: the usual failure should cost nothing and say what to run.
        raise PeerVenvMissingError(
            f"medspaCy peer venv not found ({peer_python}); create it with `{MAKE_TARGET}`"
        )
    unknown = [c for c in corpora if c not in CORPORA]
    if unknown:
        raise ValueError(f"unknown corpus {unknown} (choose from {', '.join(CORPORA)})")
    out: dict[str, object] = {}
    for name in corpora:
        corpus = _load_corpus(name, samples_dir, suite_path)
        n = len(corpus.texts)
        ours, ours_s = labeler_bench.timed_labels(corpus.texts)
        peer, peer_s = run_peer_labeler(
            peer_python, corpus.texts, script=script, peer_args=peer_args, timeout_s=timeout_s
        )
        logger.info(
            "%s: labelled %d reports: fedrad %.2f s, medspaCy %.2f s",
            name,
            n,
            ours_s,
            peer_s["wall"],
        )
        block: dict[str, object] = {
            "n": n,
            "fedrad": labeler_bench.evaluate(ours, corpus.truth),
            "medspacy": labeler_bench.evaluate(peer, corpus.truth),
            "seconds": {
                "fedrad": ours_s,
                "medspacy_wall": peer_s["wall"],
                "medspacy_load": peer_s.get("load_s"),
                "medspacy_label": peer_s.get("label_s"),
            },
            "reports_per_s": {
                "fedrad": _per_s(n, ours_s),
                "medspacy_label": _per_s(n, peer_s.get("label_s")),
                "medspacy_wall": _per_s(n, peer_s["wall"]),
            },
        }
        if corpus.cases is not None:
            ours_kind, ours_errors = labeler_bench.suite_errors(corpus.cases, ours)
            peer_kind, peer_errors = labeler_bench.suite_errors(corpus.cases, peer)
            block["per_kind"] = {"fedrad": ours_kind, "medspacy": peer_kind}
            block["errors"] = {"fedrad": ours_errors, "medspacy": peer_errors}
        out[name] = block
    return {"corpora": out, "medspacy_args": list(peer_args)}


def _corpus_table(title: str, block: dict[str, Any]) -> list[str]:
    """One corpus: per finding F1 (present, and mentioned at all) and 3-class accuracy for
    both labelers, macro, speed."""
    ours, peer = block["fedrad"], block["medspacy"]
    rows = [
        f"### {title} ({block['n']} reports)",
        "",
        "| finding | n present | fedrad F1 | medspaCy F1 | fedrad mentioned F1 "
        "| medspaCy mentioned F1 | fedrad acc | medspaCy acc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for finding in FINDINGS:
        o, p = ours["per_finding"][finding], peer["per_finding"][finding]
        rows.append(
            f"| {finding} | {o['n_positive']} | {o['f1']:.3f} | {p['f1']:.3f} "
            f"| {o['f1_mentioned']:.3f} | {p['f1_mentioned']:.3f} "
            f"| {o['accuracy']:.3f} | {p['accuracy']:.3f} |"
        )
    om, pm = ours["macro"], peer["macro"]
    rows.append(
        f"| **macro** | | **{om['f1']:.3f}** | **{pm['f1']:.3f}** "
        f"| **{om['f1_mentioned']:.3f}** | **{pm['f1_mentioned']:.3f}** "
        f"| **{om['accuracy']:.3f}** | **{pm['accuracy']:.3f}** |"
    )
    sec, rate = block["seconds"], block["reports_per_s"]
    timing = f"fedrad: {rate['fedrad']:.0f} reports/s ({sec['fedrad']:.2f} s). medspaCy: "
    if rate.get("medspacy_label") is not None and sec.get("medspacy_load") is not None:
        timing += (
            f"{rate['medspacy_label']:.0f} reports/s labelling ({sec['medspacy_label']:.2f} s; "
            f"{sec['medspacy_wall']:.2f} s wall with a {sec['medspacy_load']:.2f} s pipeline load)."
        )
    else:
        timing += f"{rate['medspacy_wall']:.0f} reports/s wall ({sec['medspacy_wall']:.2f} s)."
    rows += ["", timing]
    if "per_kind" in block:
        rows += [
            "",
            "| kind | cases | fedrad cases wrong | medspaCy cases wrong |",
            "|---|---:|---:|---:|",
        ]
        peer_kind = block["per_kind"]["medspacy"]
        for kind, o in block["per_kind"]["fedrad"].items():
            rows.append(
                f"| {kind} | {o['n']} | {o['cases_wrong']} | {peer_kind[kind]['cases_wrong']} |"
            )
    return rows


def markdown_table(result: dict[str, object]) -> str:
    """One table per corpus (per finding F1 and 3-class accuracy for both labelers, macro,
    reports/s), and for the suite the cases each gets wrong per kind."""
    corpora = cast(dict[str, Any], result["corpora"])
    parts = [_corpus_table(CORPORA.get(name, name), block) for name, block in corpora.items()]
    return "\n\n".join("\n".join(rows) for rows in parts)


def main(argv: list[str] | None = None) -> int:
    """CLI: print the markdown tables; write the full result as JSON with ``--out``."""
    parser = argparse.ArgumentParser(description="fedrad labeler vs medspaCy, same reports")
    parser.add_argument("--peer-python", type=Path, default=DEFAULT_PEER_PYTHON)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    parser.add_argument(
        "--corpus",
        action="append",
        choices=tuple(CORPORA),
        default=None,
        help="score this corpus, repeatable (default: all of them)",
    )
    parser.add_argument(
        "--peer-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="passed to the peer script, repeatable: --peer-arg=--hypothetical=absent, "
        "--peer-arg=--keep-colon-rules, --peer-arg=--sections-to-next-header",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="peer time limit, seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_peer_bench(
            args.peer_python,
            corpora=args.corpus or tuple(CORPORA),
            peer_args=args.peer_arg,
            timeout_s=args.timeout,
        )
    except (
        PeerVenvMissingError,
        PeerLabelerError,
        FileNotFoundError,
        labeler_bench.LabelledReportsError,
    ) as exc:
        print(f"error: {exc}")
        return 2
    print(markdown_table(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
