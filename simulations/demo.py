"""`make demo`: a small synthetic 3-hospital cohort taken through the whole product.

Each step calls the same CLI a user would, so the demo shows the product, not a private path:
synthesise -> check each site -> federated DP training on Flower's simulation engine -> the
final model's exact held-out figures -> verify every site's signed ledger and recompute its
epsilon -> a report from the final model.
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
        ],
    )  # fmt: skip
    for site in sorted(p for p in cohort.iterdir() if p.is_dir()):
        summary = json.loads(_invoke(site_app, ["check", str(site), "--json"]))
        sys.stdout.write(
            f"2. fedrad-site check {site.name}: files {summary['files_seen']}, usable "
            f"{summary['usable']}, skipped {len(summary['skipped'])}; labels present "
            f"{summary['labels_present']}\n"
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
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    _step(
        "4. the final model on every site's held-out split, exactly (a researcher's own "
        "cohort: fedrad-sim evaluate)"
    )
    evaluate = ["evaluate", "--data", str(cohort), "--model", str(checkpoint)]
    sys.stdout.write(
        _invoke(sim_app, [*evaluate, "--eval-reports", "24", "--eval-questions", "48"])
    )
    _step(
        "5. fedrad-audit: verify every signed, hash-chained ledger and recompute each epsilon "
        "with independent accountants"
    )
    sys.stdout.write(_invoke(ledger_app, [str(run_dir), "--budget", f"{EPSILON:g}"]))
    _step(
        "6. a report, finding probabilities and an answer from the final global model, "
        "written from the finding head's decisions"
    )
    scan = next(
        p for p in sorted((cohort / "site_1").rglob("*")) if p.is_file() and "dicom" in p.parts
    )
    sys.stdout.write(
        _invoke(
            site_app,
            [
                "report",
                str(scan),
                "--model",
                str(checkpoint),
                "--ask",
                "Is there a pleural effusion?",
            ],
        )
    )
    sys.stdout.write(
        f"\ndemo finished in {time.perf_counter() - start:.0f} s\n"
        f"plots:       {run_dir / 'plots'}\n"
        f"metrics:     {run_dir / 'metrics.jsonl'}\n"
        f"checkpoints: {run_dir / 'checkpoints'}\n"
        f"report again: .venv/bin/fedrad-site report {scan} --model {checkpoint}\n"
    )


if __name__ == "__main__":
    main()
