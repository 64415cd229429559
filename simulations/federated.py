"""Federated simulation on Flower's simulation engine, and the local-only baseline. One
virtual site per usable cohort folder (its cache, ledger and key under
`runs/<run_id>/sites/<site_id>/`) runs the ClientApp and site agent a hospital runs, against
the ServerApp round loop and plan parser a deployment uses; output follows the run directory
contract."""

from __future__ import annotations

import logging
import os
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

import numpy as np

from fedrad.client.federation.site_agent import (
    SiteSpec,
    cached_model,
    clear_caches,
    evaluate_site,
    train_site,
    trainable_arrays,
)
from fedrad.common.devices import release_host_memory
from fedrad.common.flower_process import FLOWER_ENV
from fedrad.common.model.checkpoint import load_checkpoint, read_model_config, save_checkpoint
from fedrad.common.model.config import ModelConfig, model_config_for
from fedrad.common.model.foundation import FoundationRecipe, build_foundation
from fedrad.common.model.preprocess import PreprocessConfig
from fedrad.common.privacy.coordinator_ledger import CoordinatorLedger
from fedrad.common.privacy.defaults import DEFAULT_DELTA, DEFAULT_EPSILON
from fedrad.common.privacy.ledger import (
    LedgerError,
    load_or_create_signing_key,
    load_public_key,
    public_key_path,
    verify_ledger,
)
from fedrad.common.protocol.messages import (
    ALL_EVAL_FAMILIES,
    DEFAULT_EVAL_EPSILON,
    DEFAULT_LR,
    RoundConfig,
)
from fedrad.common.protocol.run_config import RunValue, settings_among
from fedrad.common.run_dir import (
    append_metrics,
    new_run_dir,
    plot_run,
    read_metrics,
    write_config,
    write_summary,
)
from fedrad.server.rounds import (
    SECAGG_STRATEGIES,
    RunBook,
    ServerPlan,
    checkpoint_dir,
    plan_summary,
)
from fedrad.server.strategies import STRATEGIES, weighted_metrics
from fedrad.simulations.cohort_data import CohortError, SiteSplit, load_cohort

logger = logging.getLogger(__name__)

OnRound = Callable[[dict[str, Any]], None]
SIMULATION_ENV: Final[dict[str, str]] = {
    **FLOWER_ENV,
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # CPU only: silences Ray's future-change notice
}

__all__ = [
    "CohortError",
    "FederatedConfig",
    "resume_federated",
    "run_federated",
    "run_local_only",
]


@dataclass(frozen=True)
class FederatedConfig:
    preset: str = "tiny"  # model preset (ignored when `foundation` is given)
    lm: str | None = None  # a local HF causal-LM directory or GGUF file instead of the preset's
    rounds: int = 5  # federated rounds
    local_steps: int = 50  # DP-SGD steps per site per round
    batch_size: int = 16  # expected batch size (Poisson sampling)
    lr: float = DEFAULT_LR  # local AdamW learning rate
    strategy: str = "fedavg"  # fedavg, fedprox or fedadam
    proximal_mu: float = 0.01  # fedprox only: weight of the proximal term
    server_lr: float = 1e-2  # fedadam only: server learning rate (eta)
    dp: bool = True  # DP-SGD at every site (off only for baselines)
    epsilon: float = DEFAULT_EPSILON  # each site's target for the whole planned schedule
    delta: float = DEFAULT_DELTA
    max_grad_norm: float = 1.0  # per-sample clipping bound
    accountant: str = "rdp"  # rdp or prv
    seed: int = 0
    eval_reports: int = 64  # reports generated per site per evaluation (the slow part)
    eval_questions: int = 128  # questions answered per site per evaluation
    eval_metrics: str = ALL_EVAL_FAMILIES  # evaluation families asked of every site
    eval_epsilon: float = DEFAULT_EVAL_EPSILON  # what one evaluation release spends per site
    # INSECURE, simulation only: every site's DP noise and sampling derived from the seed, so
    # a run repeats draw for draw; logged loudly, never sent to a site, never in deployment.
    insecure_reproducible: bool = False
    held_out_fraction: float = 0.2  # per site, by hashed study id
    cpus_per_site: float = 1.0  # Ray resources per virtual site: 2 cores -> 2 in parallel
    central_noise: float | None = None  # central DP on the coordinator: sigma (None = off)
    central_clip: float = 1.0  # central DP: L2 bound on one site's whole update per round
    central_delta: float = DEFAULT_DELTA  # central DP: delta of the coordinator's epsilon
    secagg: bool = False  # SecAgg+: the coordinator sees only the sum of masked updates
    secagg_shares: int | None = None  # SecAgg+ key shares per site (None: every site)
    secagg_threshold: int | None = None  # SecAgg+ shares that unmask (None: a majority, >= 2)
    min_sites: int | None = None  # sites a round goes on with (None: 1; SecAgg+: threshold)
    foundation: FoundationRecipe = field(default_factory=FoundationRecipe)  # public LM recipe
    initial_checkpoint: str | None = None  # a fedrad checkpoint to start from instead (tests)

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem:
            raise ValueError(problem)

    def run_config(
        self, run_dir: Path, foundation_dir: Path, *, num_sites: int
    ) -> dict[str, RunValue]:
        """These settings as a run config (`run_config.RUN_SETTINGS`, each field named as its
        key): the proximal term goes out with fedprox only, central DP's bounds with it only."""
        values: dict[str, RunValue] = {
            "run-dir": str(run_dir),
            "foundation-dir": str(foundation_dir),
            "num-sites": num_sites,
            "num-rounds": self.rounds,
            **settings_among({f.name: getattr(self, f.name) for f in fields(self)}),
            "proximal-mu": self.proximal_mu if self.strategy == "fedprox" else 0.0,
        }
        if self.central_noise is None:
            del values["central-clip"], values["central-delta"]
        return values

    def round_config(self, run_id: str) -> RoundConfig:
        return RoundConfig(
            server_round=1,
            run_id=run_id,
            planned_rounds=self.rounds,
            local_steps=self.local_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=self.seed,
            dp=self.dp,
            target_epsilon=self.epsilon,
            delta=self.delta,
            max_grad_norm=self.max_grad_norm,
            accountant=self.accountant,
            proximal_mu=self.proximal_mu if self.strategy == "fedprox" else 0.0,
            eval_reports=self.eval_reports,
            eval_questions=self.eval_questions,
            eval_metrics=self.eval_metrics,
            eval_epsilon=self.eval_epsilon,
        )


def _problem(c: FederatedConfig) -> str | None:
    checks = [
        (c.rounds >= 1, "rounds must be >= 1"),
        (c.local_steps >= 1, "local_steps must be >= 1"),
        (c.batch_size >= 1, "batch_size must be >= 1"),
        (c.lr > 0, "lr must be positive"),
        (c.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}"),
        (c.strategy != "fedprox" or c.proximal_mu > 0, "fedprox needs proximal_mu > 0"),
        (c.proximal_mu >= 0, "proximal_mu must be >= 0"),
        (c.server_lr > 0, "server_lr must be positive"),
        (not c.dp or c.epsilon > 0, "epsilon must be positive"),
        (0 < c.delta < 1, "delta must be in (0, 1)"),
        (c.max_grad_norm > 0, "max_grad_norm must be positive"),
        (c.accountant in ("rdp", "prv"), "accountant must be rdp or prv"),
        (c.eval_reports >= 0 and c.eval_questions >= 0, "eval counts must be >= 0"),
        (0 < c.held_out_fraction < 1, "held_out_fraction must be in (0, 1)"),
        (c.cpus_per_site > 0, "cpus_per_site must be positive"),
        (c.central_noise is None or c.central_noise > 0, "central_noise must be positive"),
        (c.central_clip > 0, "central_clip must be positive"),
        (0 < c.central_delta < 1, "central_delta must be in (0, 1)"),
        (
            c.central_noise is None or c.strategy != "fedadam",
            "central DP cannot be used with fedadam (noise would follow the Adam step)",
        ),
        (
            not c.secagg or c.strategy in SECAGG_STRATEGIES,
            f"SecAgg+ supports {' and '.join(SECAGG_STRATEGIES)}, not {c.strategy}",
        ),
        (
            c.secagg or (c.secagg_shares is None and c.secagg_threshold is None),
            "secagg_shares and secagg_threshold need secagg",
        ),
        (c.min_sites is None or c.min_sites >= 1, "min_sites must be >= 1"),
    ]
    return next((message for ok, message in checks if not ok), None)


def config_from_toml(path: Path) -> FederatedConfig:
    """The FederatedConfig a run directory's config.toml was written from."""
    stored = dict(tomllib.loads(Path(path).read_text()).get("federated", {}))
    known = {f.name for f in fields(FederatedConfig)}
    unknown = set(stored) - known
    if unknown:
        raise ValueError(f"{path}: unknown federated setting(s) {', '.join(sorted(unknown))}")
    if "foundation" in stored:
        stored["foundation"] = FoundationRecipe(**stored["foundation"])
    return FederatedConfig(**stored)


# -- shared set-up ---------------------------------------------------------------------------


def _flower_env() -> None:
    for key, value in SIMULATION_ENV.items():
        os.environ.setdefault(key, value)
    # Ray's socket paths must stay short: a short temp dir, not the run directory.
    os.environ.setdefault("RAY_TMPDIR", str(Path(tempfile.gettempdir()) / "fedrad-ray"))
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)


def _model_config(config: FederatedConfig, run_dir: Path | None) -> ModelConfig:
    """The model's config without building it: from the run's initial model when resuming."""
    if run_dir is not None:
        source = checkpoint_dir(run_dir, 0)
    elif config.initial_checkpoint is not None:
        source = Path(config.initial_checkpoint)
    else:
        return model_config_for(config.preset, config.lm)
    return read_model_config(source)


def _initial_model(config: FederatedConfig, run_dir: Path) -> Path:
    """The run's starting global model as `checkpoints/round_000`, which every site and the
    coordinator load: built once (public LM + LoRA + a seeded image side), reused on resume."""
    directory = checkpoint_dir(run_dir, 0)
    if not (directory / "metadata.json").is_file():
        if config.initial_checkpoint is not None:
            model = load_checkpoint(Path(config.initial_checkpoint))
            source = str(config.initial_checkpoint)
        else:
            model, lm_dir = build_foundation(
                model_config_for(config.preset, config.lm),
                recipe=config.foundation,
                seed=config.seed,
            )
            source = str(lm_dir)
        save_checkpoint(model, directory, metadata={"kind": "initial", "source": source})
        del model
        release_host_memory()  # the coordinator never needs the model again
    return directory


def client_cpus(config: FederatedConfig, model_config: ModelConfig) -> float:
    """Ray CPUs per virtual site. Over a pretrained base every core goes to one site at a
    time: the simulation then runs one worker process, which holds the frozen base once and
    serves every site in turn (`site_agent.cached_model`), instead of one LLM copy per
    parallel worker."""
    if model_config.pretrained_lm:
        return max(config.cpus_per_site, float(os.cpu_count() or 1))
    return config.cpus_per_site


def _site_threads(config: FederatedConfig, model_config: ModelConfig) -> int:
    return max(1, int(client_cpus(config, model_config)))


def _site_specs(
    cohort: Path,
    splits: list[SiteSplit],
    run_dir: Path,
    foundation_dir: Path,
    config: FederatedConfig,
    model_config: ModelConfig,
) -> list[SiteSpec]:
    """One spec per usable site; keys are created here, before any worker could race."""
    from fedrad.client.ingest.site_data import manifest_path

    preprocess = PreprocessConfig(
        image_size=model_config.image_size, volume_shape=model_config.volume_shape
    )
    threads = _site_threads(config, model_config)
    specs = []
    for split in splits:
        state = run_dir / "sites" / split.site_id
        key_path = state / "ledger_key.pem"
        load_or_create_signing_key(key_path)
        specs.append(
            SiteSpec(
                site_id=split.site_id,
                foundation_dir=foundation_dir,
                ledger_path=state / "ledger.jsonl",
                key_path=key_path,
                manifest=manifest_path(cohort / split.site_id, config=preprocess),
                held_out_fraction=config.held_out_fraction,
                threads=threads,
                insecure_reproducible=config.insecure_reproducible,
            )
        )
    return specs


def _check_ledgers(specs: list[SiteSpec]) -> None:
    """A resumed run goes on only with intact ledgers (chain, signatures, epsilons)."""
    for spec in specs:
        if not spec.ledger_path.exists():
            continue
        problems = verify_ledger(spec.ledger_path, load_public_key(public_key_path(spec.key_path)))
        if problems:
            raise LedgerError(f"site {spec.site_id} ledger: {problems[0]}")


def _ledger_epsilons(specs: list[SiteSpec], delta: float) -> dict[str, float | None]:
    from fedrad.common.privacy.ledger import Ledger

    out: dict[str, float | None] = {}
    for spec in specs:
        if spec.ledger_path.exists():
            spent = Ledger(spec.ledger_path, load_or_create_signing_key(spec.key_path)).spent(delta)
            out[spec.site_id] = spent if np.isfinite(spent) else None
    return out


def _run_config(
    kind: str,
    cohort: Path,
    config: FederatedConfig,
    splits: list[SiteSplit],
    dropped: dict[str, str],
    foundation_dir: Path,
    model_config: ModelConfig,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "cohort": str(cohort.resolve()),
        "sites": [s.site_id for s in splits],
        "sites_left_out": dropped,
        "foundation_dir": str(foundation_dir),
        "federated": asdict(config),
        "model": asdict(model_config),
    }


# -- federated -------------------------------------------------------------------------------


def server_plan(
    config: FederatedConfig, run_dir: Path, foundation_dir: Path, *, num_sites: int
) -> ServerPlan:
    """The coordinator's plan for this simulation, read by the parser a deployment's run config
    goes through; ValueError for settings that cannot work."""
    return ServerPlan.from_run_config(
        config.run_config(run_dir, foundation_dir, num_sites=num_sites)
    )


def run_federated(
    cohort: Path,
    runs_root: Path,
    config: FederatedConfig,
    *,
    resume: Path | None = None,
    on_round: OnRound | None = None,
) -> Path:
    """Runs (or resumes) a federated simulation and returns its run directory.

    With `resume`, `config` must equal the one the run was started with (see
    `resume_federated`, which reads it back); committed rounds are kept and the rest run.
    Raises CohortError when no site is usable, ValueError on a mismatching resume.
    """
    _flower_env()
    from flwr.simulation import run_simulation

    from fedrad.client.federation.app import simulation_client_app
    from fedrad.client.federation.secure_aggregation import simulation_secure_client_app
    from fedrad.server.app import simulation_server_app

    cohort = Path(cohort)
    if resume is not None:
        run_dir = Path(resume)
        stored = config_from_toml(run_dir / "config.toml")
        if stored != config:
            diff = [
                f.name for f in fields(config) if getattr(stored, f.name) != getattr(config, f.name)
            ]
            raise ValueError(
                f"run {run_dir.name} was started with other settings: {', '.join(diff)}"
            )
        if not (checkpoint_dir(run_dir, 0) / "metadata.json").is_file():
            raise ValueError(f"run {run_dir.name} has no initial model (checkpoints/round_000)")
    model_config = _model_config(config, resume)
    splits, dropped = load_cohort(
        cohort,
        image_size=model_config.image_size,
        volume_shape=model_config.volume_shape,
        held_out_fraction=config.held_out_fraction,
    )
    # Settings that cannot work with this many sites (SecAgg+ on two) fail before anything
    # is written.
    server_plan(config, runs_root / "probe", runs_root / "probe", num_sites=len(splits))
    if resume is not None:
        sites = tomllib.loads((run_dir / "config.toml").read_text()).get("sites", [])
        if sites != [s.site_id for s in splits]:
            raise ValueError(
                f"run {run_dir.name} had sites {sites}; the cohort now gives "
                f"{[s.site_id for s in splits]}"
            )
        foundation_dir = checkpoint_dir(run_dir, 0)
    else:
        run_dir = new_run_dir(runs_root, "federated")
        foundation_dir = _initial_model(config, run_dir)
        model_config = _model_config(config, run_dir)  # with the base LM's verified hash
        write_config(
            run_dir,
            _run_config("federated", cohort, config, splits, dropped, foundation_dir, model_config),
        )
    for site, reason in dropped.items():
        logger.warning("site %s left out of the federation: %s", site, reason)
    if config.insecure_reproducible:
        logger.warning(
            "--insecure-reproducible: every site's DP noise and sampling follow from seed %d; "
            "this run's DP guarantee does not hold against anyone who knows the seed",
            config.seed,
        )
    specs = _site_specs(cohort, splits, run_dir, foundation_dir, config, model_config)
    _check_ledgers(specs)
    plan = server_plan(config, run_dir, foundation_dir, num_sites=len(specs))
    seen: list[dict[str, Any]] = []

    def round_done(record: dict[str, Any]) -> None:
        seen.append(record)
        if on_round is not None:
            on_round(record)

    completed = RunBook(run_dir, foundation_dir).completed
    if plan.central_dp:  # its key is made here, and a damaged ledger stops a resume here
        CoordinatorLedger(run_dir, run_id=run_dir.name, delta=config.central_delta).check_covers(
            completed
        )
    started = time.perf_counter()
    simulation_s = 0.0
    if completed < config.rounds:
        client_app = (simulation_secure_client_app if config.secagg else simulation_client_app)(
            specs
        )
        run_simulation(
            server_app=simulation_server_app(plan, on_round=round_done),
            client_app=client_app,
            num_supernodes=len(specs),
            backend_config={"client_resources": {"num_cpus": client_cpus(config, model_config)}},
        )
        simulation_s = time.perf_counter() - started
    else:
        logger.info("all %d rounds of %s are already committed", config.rounds, run_dir.name)
    records = read_metrics(run_dir)
    if len(records) < config.rounds:
        raise RuntimeError(
            f"the simulation ended after round {len(records)} of {config.rounds}; "
            f"resume with the run directory {run_dir}"
        )
    plot_run(run_dir)
    write_summary(
        run_dir,
        {
            "kind": "federated",
            "strategy": config.strategy,
            "secagg": config.secagg,
            "rounds": config.rounds,
            "sites": [s.site_id for s in specs],
            "sites_left_out": dropped,
            "train_studies": {s.site_id: len(s.train) for s in splits},
            "held_out_studies": {s.site_id: len(s.held_out) for s in splits},
            "final": records[-1],
            "epsilon": _ledger_epsilons(specs, config.delta),
            "central_epsilon": records[-1].get("central_epsilon"),  # None: central DP off
            # Timings of this invocation. Round 1 includes the workers' cold start (imports,
            # model load); the rest of simulation_s is the engine's start and stop.
            "simulation_s": simulation_s,
            "round_s": [r["round_s"] for r in records],
            "outside_rounds_s": simulation_s - sum(r["round_s"] for r in seen) if seen else None,
            "resumed": resume is not None,
            "checkpoint": str(checkpoint_dir(run_dir, config.rounds)),
            "plan": plan_summary(plan),
        },
    )
    return run_dir


def resume_federated(run_dir: Path, *, on_round: OnRound | None = None) -> Path:
    """Continues an interrupted run with the settings and cohort it was started with."""
    run_dir = Path(run_dir)
    path = run_dir / "config.toml"
    if not path.is_file():
        raise ValueError(f"not a run directory (no config.toml): {run_dir}")
    stored = tomllib.loads(path.read_text())
    if stored.get("kind") != "federated":
        raise ValueError(f"{run_dir} is not a federated run")
    return run_federated(
        Path(stored["cohort"]),
        run_dir.parent,
        config_from_toml(path),
        resume=run_dir,
        on_round=on_round,
    )


# -- local only ------------------------------------------------------------------------------


def run_local_only(
    cohort: Path,
    runs_root: Path,
    config: FederatedConfig,
    *,
    on_round: OnRound | None = None,
) -> Path:
    """Each site trains alone (same DP, same budget, same ledgers) and is evaluated on its own
    held-out split; metrics.jsonl holds the n-weighted mean over sites and each site's own.
    Runs in this process: there is nothing to federate, so no simulation engine."""
    cohort = Path(cohort)
    model_config = _model_config(config, None)
    splits, dropped = load_cohort(
        cohort,
        image_size=model_config.image_size,
        volume_shape=model_config.volume_shape,
        held_out_fraction=config.held_out_fraction,
    )
    run_dir = new_run_dir(runs_root, "local")
    foundation_dir = _initial_model(config, run_dir)
    model_config = _model_config(config, run_dir)
    write_config(
        run_dir, _run_config("local", cohort, config, splits, dropped, foundation_dir, model_config)
    )
    specs = [
        replace(s, threads=0)
        for s in _site_specs(cohort, splits, run_dir, foundation_dir, config, model_config)
    ]
    clear_caches()
    model = cached_model(foundation_dir)
    start_arrays = trainable_arrays(model)
    arrays = {spec.site_id: start_arrays for spec in specs}
    started = time.perf_counter()
    record: dict[str, Any] = {}
    template = config.round_config(run_dir.name)
    for round_no in range(1, config.rounds + 1):
        round_start = time.perf_counter()
        plan = replace(template, server_round=round_no, proximal_mu=0.0)
        per_site: dict[str, dict[str, float]] = {}
        train_metrics: list[dict[str, float]] = []
        for spec in specs:
            update = train_site(spec, arrays[spec.site_id], plan)
            arrays[spec.site_id] = update.arrays
            train_metrics.append(update.metrics)
            per_site[spec.site_id] = evaluate_site(spec, update.arrays, plan).metrics
            save_checkpoint(
                model,  # holds this site's evaluated weights: evaluate_site just loaded them
                run_dir / "checkpoints" / spec.site_id / f"round_{round_no:03d}",
                metadata={"kind": "local", "site": spec.site_id, "round": round_no},
            )
        record = _local_record(round_no, per_site, train_metrics, specs)
        record["round_s"] = time.perf_counter() - round_start
        record["wall_s"] = time.perf_counter() - started
        append_metrics(run_dir, record)
        if on_round is not None:
            on_round(record)
    plot_run(run_dir)
    write_summary(
        run_dir,
        {
            "kind": "local",
            "rounds": config.rounds,
            "sites": [s.site_id for s in specs],
            "sites_left_out": dropped,
            "final": record,
            "epsilon": _ledger_epsilons(specs, config.delta),
            "wall_s": time.perf_counter() - started,
            "checkpoints": {
                s.site_id: str(run_dir / "checkpoints" / s.site_id / f"round_{config.rounds:03d}")
                for s in specs
            },
        },
    )
    return run_dir


def _local_record(
    round_no: int,
    per_site: dict[str, dict[str, float]],
    train_metrics: list[dict[str, float]],
    specs: list[SiteSpec],
) -> dict[str, Any]:
    from flwr.app import MetricRecord, RecordDict

    def pooled(rows: list[dict[str, float]]) -> dict[str, float]:
        records = [RecordDict({"m": MetricRecord(dict(r))}) for r in rows]
        return dict(weighted_metrics(records, "num-examples"))  # type: ignore[arg-type]

    evaluation = pooled(list(per_site.values()))
    record: dict[str, Any] = {"round": round_no}
    record.update({k: (v if np.isfinite(v) else None) for k, v in evaluation.items()})
    record["epsilon"] = {
        spec.site_id: (m["epsilon"] if np.isfinite(m["epsilon"]) else None)
        for spec, m in zip(specs, train_metrics, strict=True)
    }
    record["per_site"] = {
        site: {k: (v if np.isfinite(v) else None) for k, v in metrics.items()}
        for site, metrics in per_site.items()
    }
    return record
