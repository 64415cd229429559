"""`fedrad-sim`: the researcher's command line (cohorts, simulations, baselines, benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedrad.common.cli_support import emit_json, fail, not_yet, setup_logging

app = typer.Typer(
    name="fedrad-sim",
    help="Researcher tools: synthetic cohorts, federated simulation, baselines, benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Measurements written as JSON.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Cohort directory to create (must be new or empty).")],
    sites: Annotated[int, typer.Option(help="Number of hospital sites.")] = 3,
    studies_per_site: Annotated[int, typer.Option(help="Mean studies per site.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives identical files.")] = 0,
    workers: Annotated[int, typer.Option(help="Processes (0 = one per core).", min=0)] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Write a synthetic multi-hospital cohort of real DICOM files, reports and ground truth."""
    from fedrad.simulations.synth import generate_cohort

    setup_logging(verbose)
    from fedrad.common.cli_support import progress_bar

    try:
        with progress_bar("synthesising") as bar:
            summary = generate_cohort(
                out,
                sites=sites,
                studies_per_site=studies_per_site,
                seed=seed,
                workers=workers,
                progress=bar.update,
            )
    except ValueError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write the cohort at {out}: {exc.strerror}")
    if json_out:
        emit_json(summary)
    else:
        typer.echo(json.dumps(summary, indent=1))
        typer.echo(f"cohort written to {out}")


@app.command()
def run() -> None:
    """Federated simulation on Flower's simulation engine."""
    not_yet("fedrad-sim run")


@app.command()
def centralized() -> None:
    """Centralized baseline on all sites pooled."""
    not_yet("fedrad-sim centralized")


@app.command()
def local() -> None:
    """Local-only baseline: each site alone."""
    not_yet("fedrad-sim local")


@bench_app.command("labeler")
def bench_labeler(
    data: Annotated[
        Path | None, typer.Option(help="A synthetic cohort (with ground_truth.csv per site).")
    ] = None,
    radlabels: Annotated[
        bool, typer.Option(help="Also score the 1,000 radlabels reports (real prose).")
    ] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the full JSON.")] = False,
) -> None:
    """Labeler accuracy: on a cohort's ground truth and on radlabels' independent labels."""
    from fedrad.simulations.labeler_bench import run_cohort_bench, run_radlabels_bench

    if data is None and not radlabels:
        fail("nothing to measure: give --data COHORT and/or --radlabels")
    result: dict[str, object] = {}
    try:
        if data is not None:
            if not data.is_dir():
                fail(f"not a directory: {data}")
            result["cohort"] = run_cohort_bench(data)
        if radlabels:
            result["radlabels"] = run_radlabels_bench()
    except FileNotFoundError as exc:
        fail(str(exc))
    if json_out:
        emit_json(result)
        return
    for name, block in result.items():
        assert isinstance(block, dict)
        views = (
            [
                ("vs report labels", block["vs_report_labels"]),
                ("vs image truth", block["vs_image_truth"]),
            ]
            if name == "cohort"
            else [("vs radlabels", block)]
        )
        for title, scores in views:
            typer.echo(f"{name} {title}: {_labeler_line(scores)}")


def _labeler_line(scores: dict) -> str:
    m = scores["macro"]
    return (
        f"n={scores['n']} macro accuracy {m['accuracy']:.3f}, "
        f"macro positive F1 {m['f1']:.3f} (P {m['precision']:.3f}, R {m['recall']:.3f})"
    )


@bench_app.command("model")
def bench_model() -> None:
    """Step time and memory, DP vs non-DP."""
    not_yet("fedrad-sim bench model")


def main() -> None:
    app()
