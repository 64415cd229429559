"""`make demo`: a small synthetic 3-hospital cohort taken through the whole product.

Each step calls the same CLI a user would, so the demo shows the product, not a private path:
synthesise -> check each site -> federated DP training on Flower's simulation engine -> each
round's model on the held-out studies per modality -> verify every site's signed ledger and
recompute its epsilon -> a report from the final model on a radiograph and on a CT series, and
a followed patient's latest radiograph compared with its prior, written as the page a
clinician opens.
The federation mixes modalities: site_1 holds radiographs only, site_2 both, site_3 chest CT
only; each trains the parts its data reach and each part is averaged over those sites.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from fedrad.client.cli import app as site_app
from fedrad.common.run_dir import read_metrics
from fedrad.simulations.audit_cli import ledger_app
from fedrad.simulations.cli import app as sim_app

DEMO_DIR = Path("runs/demo")
SITES, STUDIES, SEED = 3, 150, 7
CT_FRACTIONS = "0,0.3,1"  # radiographs only, mixed, CT only
HISTORY = 0.5  # the share of patients followed over 2-4 visits (the interval head's data)
ROUNDS, LOCAL_STEPS, EPSILON = 4, 40, 8.0
FOUNDATION_STEPS = 300  # a quicker public LM than the default 600: the demo must fit 10 minutes


def _step(title: str) -> None:
    sys.stdout.write(f"\n== {title}\n")
    sys.stdout.flush()


def _invoke(app, args: list[str]) -> str:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        sys.stderr.write(result.output)
        raise SystemExit(f"demo step failed: {' '.join(args)} (exit {result.exit_code})")
    return result.stdout


def main() -> None:
    start = time.perf_counter()
    if DEMO_DIR.exists():
        shutil.rmtree(DEMO_DIR)
    cohort = DEMO_DIR / "cohort"
    _step(f"1. synthesise a {SITES}-hospital cohort of real DICOM files (seed {SEED})")
    _invoke(
        sim_app,
        [
            "synth", "--out", str(cohort), "--sites", str(SITES),
            "--studies-per-site", str(STUDIES), "--seed", str(SEED),
            "--ct-fractions", CT_FRACTIONS, "--history", str(HISTORY),
        ],
    )  # fmt: skip
    for site in sorted(p for p in cohort.iterdir() if p.is_dir()):
        summary = json.loads(_invoke(site_app, ["check", str(site), "--json"]))
        sys.stdout.write(
            f"2. fedrad-site check {site.name}: files {summary['files_seen']}, series "
            f"{summary['series']['usable']} of {summary['series']['seen']}, usable "
            f"{summary['usable']} {summary['usable_by_modality']}, skipped "
            f"{len(summary['skipped'])}; labels present {summary['labels_present']}\n"
        )
    _step(
        f"3. federated training: {ROUNDS} rounds, DP-SGD at every site (epsilon {EPSILON:g}), "
        "FedAvg on Flower's simulation engine"
    )
    sys.stdout.flush()
    # A child process with inherited stdout, so each round's line shows as it finishes.
    runs_root = DEMO_DIR / "runs"
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "fedrad-sim"),
            "run", "--data", str(cohort), "--rounds", str(ROUNDS), "--out", str(runs_root),
            "--epsilon", str(EPSILON), "--local-steps", str(LOCAL_STEPS), "--seed", str(SEED),
            "--eval-reports", "24", "--foundation-steps", str(FOUNDATION_STEPS),
        ],
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"demo step failed: fedrad-sim run (exit {done.returncode})")
    run_dir = max(runs_root.iterdir(), key=lambda p: p.stat().st_mtime)
    records = read_metrics(run_dir)
    first, last = records[0], records[-1]
    auroc = (first.get("macro_auroc") or 0.0, last.get("macro_auroc") or 0.0)
    ce = (first.get("ce_f1") or 0.0, last.get("ce_f1") or 0.0)
    agree = (first.get("report_head_agreement") or 0.0, last.get("report_head_agreement") or 0.0)
    sys.stdout.write(
        f"macro AUROC {auroc[0]:.3f} -> {auroc[1]:.3f}, CE F1 {ce[0]:.3f} -> {ce[1]:.3f}, "
        f"report-head agreement {agree[0]:.3f} -> {agree[1]:.3f} over {len(records)} rounds "
        "(figures the sites released as noised counts, charged to their budgets: on a few "
        "dozen held-out studies per site, mostly noise)\n"
    )
    checkpoints = sorted(p for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    checkpoint = checkpoints[-1]
    _step(
        "4. every round's model on the held-out studies of all sites, per modality, exactly "
        "(a researcher's own cohort: fedrad-sim evaluate --by-modality)"
    )
    per_round = run_dir / "per_modality.jsonl"
    with per_round.open("w", encoding="utf-8") as out:
        for round_dir in checkpoints:
            evaluate = [
                "evaluate", "--data", str(cohort), "--model", str(round_dir), "--by-modality",
                "--eval-reports", "16", "--eval-questions", "32", "--json",
            ]  # fmt: skip
            figures = json.loads(_invoke(sim_app, evaluate))["per_modality"]
            out.write(json.dumps({"checkpoint": round_dir.name, **figures}) + "\n")
            line = "; ".join(
                f"{kind} ({m['n_studies']}): macro AUROC {_num(m['macro_auroc'])}, CE F1 "
                f"{_num(m['ce_f1'])}, QA side {_num(m['qa_side_accuracy'])}, size "
                f"{_num(m['qa_size_accuracy'])}"
                for kind, m in figures.items()
            )
            sys.stdout.write(f"{round_dir.name}: {line}\n")
    _step(
        "5. fedrad-audit: verify every signed, hash-chained ledger and recompute each epsilon "
        "with independent accountants"
    )
    sys.stdout.write(_invoke(ledger_app, [str(run_dir), "--budget", f"{EPSILON:g}"]))
    _step(
        "6. a report, finding probabilities and an answer from the final global model on a "
        "radiograph (site_1) and a CT series (site_3), written from the finding head's decisions"
    )
    scan = next(
        p for p in sorted((cohort / "site_1").rglob("*")) if p.is_file() and "dicom" in p.parts
    )
    series = next(p.parent for p in sorted((cohort / "site_3").rglob("*.dcm")))
    asked = ((scan, "Is there a pleural effusion?"), (series, "Is there a nodule?"))
    for target, question in asked:
        sys.stdout.write(
            _invoke(
                site_app,
                ["report", str(target), "--model", str(checkpoint), "--ask", question],
            )
            + "\n"
        )
    _step(
        "7. a followed patient's latest radiograph (site_1) beside its prior: the change per "
        "finding, and the page a clinician opens (an explanation map per suggested finding)"
    )
    current, prior = _followed_patient(cohort / "site_1")
    page = DEMO_DIR / "reading.html"
    change = "Is the effusion new, larger, smaller, stable or resolved since the prior?"
    reading = [
        "report", str(current), "--model", str(checkpoint), "--prior", str(prior),
        "--ask", change, "--html", str(page),
    ]  # fmt: skip
    sys.stdout.write(_invoke(site_app, reading) + "\n")
    sys.stdout.write(
        f"\ndemo finished in {time.perf_counter() - start:.0f} s\n"
        f"reading:     {page} (open it in a browser; it loads nothing from the network)\n"
        f"plots:       {run_dir / 'plots'}\n"
        f"metrics:     {run_dir / 'metrics.jsonl'}, per modality: {per_round}\n"
        f"checkpoints: {run_dir / 'checkpoints'}\n"
        f"report again: .venv/bin/fedrad-site report {scan} --model {checkpoint}\n"
    )


def _followed_patient(site: Path) -> tuple[Path, Path]:
    """A followed patient's latest radiograph and the one before it: one whose effusion changed
    between them if the site has one (the generator's truth, which a researcher's demo may
    read), else any followed patient's; found by the accession numbers in the headers."""
    import csv

    import pydicom

    with (site / "ground_truth.csv").open(newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("prior_accession")]
    rows.sort(key=lambda r: r["pleural_effusion_change"] in ("absent", ""))
    if not rows:
        raise SystemExit(f"demo: no followed patient in {site}")
    files = {}
    for path in sorted(p for p in (site / "dicom").rglob("*") if p.is_file()):
        files[str(pydicom.dcmread(path, stop_before_pixels=True).AccessionNumber)] = path
    return files[rows[0]["accession_number"]], files[rows[0]["prior_accession"]]


def _num(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) and value == value else "n/a"


if __name__ == "__main__":
    main()
