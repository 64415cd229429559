"""A site's part of a round, framework-free: load data and model, spend privacy, train, report.

The Flower ClientApp (`federation/app.py`) only converts messages to and from the types here, so
this module runs and tests without Flower (as MONAI's `ClientAlgo` does). Per process it keeps
one model per foundation checkpoint and a few sites' studies: in a simulation several virtual
sites share a worker process and must not each hold their own copy. What a round may spend is
decided by `common/privacy/budget.py` before any training step; a refusal is recorded in the
ledger and spends nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedrad.client.ingest.dataset import SiteStudies, TrainingExamples, split_held_out
from fedrad.client.ingest.site_data import prepared_manifest
from fedrad.client.site.config import SiteConfig, SiteConfigError, load_site_config
from fedrad.client.site.policy import (
    SitePolicy,
    check_evaluation,
    check_round,
    evaluation_epsilon,
    record_refusal,
)
from fedrad.client.training.evaluate import EvalConfig, study_outputs
from fedrad.client.training.private_evaluation import release
from fedrad.client.training.train import DPConfig, TrainConfig, train_local
from fedrad.common.model.checkpoint import load_checkpoint, read_metadata
from fedrad.common.model.config import VOLUME_MODALITIES, VOLUME_SHAPE
from fedrad.common.model.parts import part_metrics
from fedrad.common.model.preprocess import PreprocessConfig
from fedrad.common.model.radiology_model import RadiologyModel
from fedrad.common.privacy.accounting import (
    MechanismStep,
    cumulative_epsilon,
    poisson_sample_rate,
)
from fedrad.common.privacy.budget import (
    BudgetError,
    RoundBudget,
    budget_refusal,
    capped_target,
    evaluation_noise,
    evaluation_step,
)
from fedrad.common.privacy.ledger import Ledger
from fedrad.common.privacy.ledger_anchor import (
    LedgerContinuityError,
    ledger_head,
    open_site_ledger,
)
from fedrad.common.privacy.randomness import MechanismRandomness
from fedrad.common.protocol.messages import EVAL_METRIC_KEYS, WEIGHT_KEY, RoundConfig

logger = logging.getLogger(__name__)

MAX_CACHED_SITES: Final[int] = 16  # studies of this many sites stay in memory per process


class SiteRefusalError(Exception):
    """The site declines the round (budget, plan, data); the message is safe to send back."""


@dataclass(frozen=True)
class SiteSpec:
    """What a site agent needs, all of it the site's own (never sent by the coordinator).

    Exactly one of `manifest` (a prepared cache, as simulations use) or `data_dir` (the raw
    DICOM + reports export, prepared on first use) names the data.
    """

    site_id: str
    foundation_dir: Path  # the federation's starting checkpoint, the site's own copy
    ledger_path: Path
    key_path: Path  # Ed25519 ledger signing key (0600), created if absent
    manifest: Path | None = None
    data_dir: Path | None = None
    held_out_fraction: float = 0.2  # deterministic by study id (`split_held_out`)
    epsilon: float | None = None  # the site's own budget over its whole ledger (site.toml)
    delta: float | None = None  # the largest delta that budget holds at
    threads: int = 0  # torch threads (0 = leave as the process has it)
    cache_dir: Path | None = None  # where data_dir is prepared (default: inside it)
    policy: SitePolicy = field(default_factory=SitePolicy)  # what the site takes part in
    # Simulation only: DP noise and sampling derived from the plan seed, so a research run
    # can be repeated draw for draw (and replayed by anyone who knows the plan). No deployed
    # site sets it: `from_site_config` and `from_node_config` never do.
    insecure_reproducible: bool = False
    # the ledger's signed anchor (`common/privacy/ledger_anchor.py`); None: beside key_path
    ledger_anchor: Path | None = None

    def __post_init__(self) -> None:
        if (self.manifest is None) == (self.data_dir is None):
            raise ValueError("give exactly one of manifest or data_dir")
        if not 0 < self.held_out_fraction < 1:
            raise ValueError("held_out_fraction must be in (0, 1)")
        if self.epsilon is not None and self.epsilon <= 0:
            raise ValueError("epsilon must be positive")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError("delta must be in (0, 1)")

    @staticmethod
    def from_site_config(config: SiteConfig, foundation_dir: Path | None = None) -> SiteSpec:
        """A deployed site: data, ledger, key and budget all from the site's own site.toml."""
        foundation = foundation_dir or config.foundation_dir
        if foundation is None:
            raise SiteRefusalError(
                f"site {config.site_id} has no foundation_dir in its config or node config"
            )
        return SiteSpec(
            site_id=config.site_id,
            foundation_dir=Path(foundation),
            ledger_path=config.ledger,
            key_path=config.ledger_key,
            data_dir=config.data_dir,
            epsilon=config.epsilon,
            delta=config.delta,
            cache_dir=config.cache_dir,
            policy=config.policy,
            ledger_anchor=config.ledger_anchor,
        )

    @staticmethod
    def from_node_config(node_config: Mapping[str, Any]) -> SiteSpec:
        """A deployed SuperNode's `--node-config`: site-id, data-dir, foundation-dir, and
        optionally ledger, signing-key (default under <data-dir>/.fedrad-site/), cache-dir
        and epsilon-budget; or `site-config` (the site's own site.toml, which then names all of
        them and the budget) with an optional foundation-dir."""
        steering = [k for k in node_config if "seed" in str(k) or "reproducible" in str(k)]
        if steering:
            raise SiteRefusalError(
                f"node config key {str(steering[0])[:40]!r} refused: a deployed site draws its "
                "DP noise and sampling from its own CSPRNG"
            )
        if "site-config" in node_config:
            try:
                config = load_site_config(Path(str(node_config["site-config"])))
            except SiteConfigError as exc:
                raise SiteRefusalError(str(exc)) from exc
            foundation = node_config.get("foundation-dir")
            return SiteSpec.from_site_config(
                config, None if foundation is None else Path(str(foundation))
            )
        missing = [k for k in ("site-id", "data-dir", "foundation-dir") if k not in node_config]
        if missing:
            raise SiteRefusalError(f"node config lacks {', '.join(missing)}")
        data_dir = Path(str(node_config["data-dir"]))
        state = data_dir / ".fedrad-site"
        epsilon = node_config.get("epsilon-budget")
        cache = node_config.get("cache-dir")
        return SiteSpec(
            site_id=str(node_config["site-id"]),
            foundation_dir=Path(str(node_config["foundation-dir"])),
            ledger_path=Path(str(node_config.get("ledger", state / "ledger.jsonl"))),
            key_path=Path(str(node_config.get("signing-key", state / "ledger_key.pem"))),
            data_dir=data_dir,
            epsilon=None if epsilon is None else float(epsilon),  # type: ignore[arg-type]
            cache_dir=None if cache is None else Path(str(cache)),
        )


@dataclass(frozen=True)
class SiteUpdate:
    """A site's reply to a training round: new trainable values and whitelisted aggregates."""

    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]
    ledger_head: str = ""  # "<lines>:<sha256>" after this round's entry (public)


# -- per-process caches ----------------------------------------------------------------------

_MODELS: dict[str, RadiologyModel] = {}
_STUDIES: OrderedDict[tuple[str, float, tuple[str, ...]], tuple[SiteStudies, SiteStudies]] = (
    OrderedDict()
)
_DECLARED: dict[str, frozenset[str]] = {}


def cached_model(foundation_dir: Path) -> RadiologyModel:
    """One model per foundation checkpoint per process, shared by every site it serves."""
    key = str(Path(foundation_dir).resolve())
    if key not in _MODELS:
        _MODELS.clear()  # a process serves one federation: never hold two models
        _MODELS[key] = load_checkpoint(Path(key))
        logger.info("loaded the foundation model in this process")
    return _MODELS[key]


def declared_trainable(foundation_dir: Path) -> frozenset[str]:
    """Names of the parameters that may leave a site, as the checkpoint declares them."""
    key = str(Path(foundation_dir).resolve())
    if key not in _DECLARED:
        names = read_metadata(Path(key)).get("trainable")
        if not isinstance(names, list) or not names:
            raise SiteRefusalError("the foundation checkpoint declares no trainable parameters")
        _DECLARED[key] = frozenset(str(n) for n in names)
    return _DECLARED[key]


def _manifest(
    spec: SiteSpec, image_size: int, volume_shape: tuple[int, int, int] = VOLUME_SHAPE
) -> Path:
    if spec.manifest is not None:
        return spec.manifest
    assert spec.data_dir is not None
    return prepared_manifest(
        spec.data_dir,
        config=PreprocessConfig(image_size=image_size, volume_shape=volume_shape),
        cache_dir=spec.cache_dir,
    )


def site_studies(
    spec: SiteSpec,
    image_size: int,
    volume_shape: tuple[int, int, int] = VOLUME_SHAPE,
    modalities: tuple[str, ...] = VOLUME_MODALITIES,
) -> tuple[SiteStudies, SiteStudies]:
    """(train, held-out) of the modalities the model reads (radiographs and `modalities`),
    cached per process for the last few sites served."""
    manifest = _manifest(spec, image_size, volume_shape)
    key = (str(manifest.resolve()), spec.held_out_fraction, modalities)
    if key in _STUDIES:
        _STUDIES.move_to_end(key)
        return _STUDIES[key]
    everything = SiteStudies.from_manifest(manifest)
    studies = everything.of_modalities(modalities)
    if len(studies) < len(everything):
        logger.info(
            "site %s: %d studies of a modality the model does not read are left out",
            spec.site_id,
            len(everything) - len(studies),
        )
    train, held = split_held_out(studies, fraction=spec.held_out_fraction)
    if len(train) == 0:
        raise SiteRefusalError(f"site {spec.site_id} has no training studies")
    _STUDIES[key] = (train, held)
    while len(_STUDIES) > MAX_CACHED_SITES:
        _STUDIES.popitem(last=False)
    return train, held


def clear_caches() -> None:
    """For tests and long-lived processes that switch federations."""
    _MODELS.clear()
    _STUDIES.clear()
    _DECLARED.clear()


# -- model state ---------------------------------------------------------------------------


def load_global(model: RadiologyModel, arrays: Mapping[str, np.ndarray]) -> None:
    """Sets every trainable parameter from the global arrays; anything else is refused."""
    own = model.trainable_state()
    if set(arrays) != set(own):
        extra, missing = set(arrays) - set(own), set(own) - set(arrays)
        raise SiteRefusalError(
            f"global arrays do not match the model's trainable parameters "
            f"({len(missing)} missing, {len(extra)} unexpected)"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in arrays.items():
            target = params[name]
            if tuple(value.shape) != tuple(target.shape):
                raise SiteRefusalError(f"global array {name} has shape {tuple(value.shape)}")
            target.copy_(torch.from_numpy(np.asarray(value)).to(target.dtype))


def trainable_arrays(model: RadiologyModel) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.trainable_state().items()}


# -- training ------------------------------------------------------------------------------


@contextlib.contextmanager
def proximal_term(model: RadiologyModel, mu: float) -> Iterator[None]:
    """FedProx: adds mu * (w - w_global) to each trainable gradient just before the inner
    optimizer steps, i.e. after DP clipping and noise (it does not touch the data, so it costs
    no privacy and must not be clipped). `train_local` owns its optimizer, so this hooks every
    optimizer step for the duration and skips Opacus' DPOptimizer wrapper."""
    if mu <= 0:
        yield
        return
    anchors = {p: p.detach().clone() for p in model.parameters() if p.requires_grad}

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if isinstance(optimizer, DPOptimizer):
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                anchor = anchors.get(p)
                if anchor is not None and p.grad is not None:
                    p.grad.add_(p.detach() - anchor, alpha=mu)

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _site_seed(site_id: str, seed: int, server_round: int) -> int:
    """The public seed of a site's round (task prompts, dropout): from the plan, on purpose."""
    salt = int(hashlib.sha256(site_id.encode()).hexdigest()[:8], 16)
    return (seed * 1_000_003 + server_round * 7919 + salt) % (2**31)


def mechanism_randomness(spec: SiteSpec, plan: RoundConfig, purpose: str) -> MechanismRandomness:
    """The randomness of this round's DP mechanism: the OS CSPRNG, unless a simulation built
    the site with `insecure_reproducible` (then derived from the plan, and logged loudly)."""
    if not spec.insecure_reproducible:
        return MechanismRandomness()
    return MechanismRandomness.reproducible(
        f"{spec.site_id}/{plan.run_id}/{plan.seed}/{plan.server_round}/{purpose}"
    )


# -- the round -----------------------------------------------------------------------------


def check_round_against_budget(spec: SiteSpec, plan: RoundConfig) -> None:
    """Refusals that need no arithmetic: a round the site's budget can never allow."""
    reason = budget_refusal(
        spec.site_id, epsilon=spec.epsilon, delta=spec.delta, dp=plan.dp, round_delta=plan.delta
    )
    if reason is not None:
        raise SiteRefusalError(reason)


def open_ledger(spec: SiteSpec, plan: RoundConfig) -> Ledger:
    """The site's ledger, checked against its anchor and against the coordinator's last
    acknowledged head (`plan.ledger_head`); appends keep the anchor current. A ledger found
    missing, cut short or replaced is a refusal (one line naming the recovery command), not
    a fresh budget."""
    try:
        return open_site_ledger(
            spec.ledger_path,
            spec.key_path,
            spec.ledger_anchor,
            plan.ledger_head,
            site_id=spec.site_id,
        )
    except LedgerContinuityError as exc:
        raise SiteRefusalError(str(exc)) from None


def release_noise(spec: SiteSpec, plan: RoundConfig) -> float:
    """The noise multiplier of one evaluation release: the plan's eval_epsilon, capped by the
    site's policy, spent by one Gaussian step."""
    try:
        return evaluation_noise(
            evaluation_epsilon(spec.policy, plan.eval_epsilon),
            delta=plan.delta,
            accountant=plan.accountant,  # type: ignore[arg-type]
        )
    except BudgetError as exc:
        raise SiteRefusalError(str(exc)) from None


def planned_evaluations(spec: SiteSpec, plan: RoundConfig) -> list[MechanismStep]:
    """The evaluation releases still planned, this round's included, each at `release_noise`;
    none when the plan asks for no figures."""
    if not plan.eval_families:
        return []
    step = evaluation_step(release_noise(spec, plan))
    return [step] * (plan.planned_rounds - plan.server_round + 1)


def admit_plan(spec: SiteSpec, plan: RoundConfig, n: int, split: str) -> None:
    """What training and evaluation both refuse before any arithmetic: a delta not below 1/N
    for the `split` they read, the budget's plain refusals, and a plan without DP where the
    policy caps privacy."""
    if plan.dp and plan.delta >= 1 / n:
        # delta is the chance the guarantee fails outright; at 1/N that is one record's worth
        raise SiteRefusalError(
            f"delta {plan.delta:g} is not below 1/N for this site's {n} {split} studies"
        )
    check_round_against_budget(spec, plan)
    if not plan.dp:
        reason = check_round(spec.policy, noise_multiplier=None, round_epsilon=0, run_epsilon=0)
        if reason is not None:
            raise SiteRefusalError(reason)


def check_recorded_spend(
    plan: RoundConfig, entry: Mapping[str, Any], target: float, what: str
) -> None:
    """Fail closed after the ledger's append: where its own recomputation disagrees with the
    calibration and passes the target, the spend is on record but nothing leaves."""
    spent = entry["epsilon"]
    if plan.dp and (spent is None or spent > target * (1 + 1e-6)):
        raise SiteRefusalError(f"{what} spent epsilon {spent} past the target {target:.3f}")


@dataclass(frozen=True)
class Admission:
    """A round the site has agreed to: how it trains and what it may spend."""

    dp: DPConfig
    target_epsilon: float  # cumulative epsilon the round must stay within (plan capped by budget)


def admit_round(spec: SiteSpec, plan: RoundConfig, ledger: Ledger, n_train: int) -> Admission:
    """The privacy decisions of a round, all before any training step, in this order: delta
    below 1/N; the budget's plain refusals; the noise, calibrated to the plan's target capped
    by the site's budget (whole ledger) and by its policy's max_epsilon_per_run (this run's
    entries); then the policy's round rules. Raises SiteRefusalError with a one-line reason."""
    n = n_train
    admit_plan(spec, plan, n, "training")
    if not plan.dp:
        return Admission(DPConfig(enabled=False), plan.target_epsilon)
    target_epsilon = capped_target(plan.target_epsilon, spec.epsilon)
    policy = spec.policy
    budget = RoundBudget(
        history=ledger.history(),
        run_history=ledger.history(plan.run_id),
        sample_rate=poisson_sample_rate(plan.batch_size, n),  # what train_local samples at
        local_steps=plan.local_steps,
        remaining_steps=(plan.planned_rounds - plan.server_round + 1) * plan.local_steps,
        delta=plan.delta,
        accountant=plan.accountant,  # type: ignore[arg-type]
        reserved=planned_evaluations(spec, plan),
    )
    try:
        noise = budget.noise(target_epsilon, max_epsilon_per_run=policy.max_epsilon_per_run)
    except BudgetError as exc:
        raise SiteRefusalError(str(exc)) from None
    reason = check_round(  # each epsilon only where the policy caps it (docs/results/privacy.md)
        policy,
        noise_multiplier=noise,
        round_epsilon=0.0 if policy.max_epsilon_per_round is None else budget.round_epsilon(noise),
        run_epsilon=0.0 if policy.max_epsilon_per_run is None else budget.run_epsilon(noise),
    )
    if reason is not None:
        raise SiteRefusalError(reason)
    dp = DPConfig(
        enabled=True,
        target_epsilon=None,
        noise_multiplier=noise,
        delta=plan.delta,
        max_grad_norm=plan.max_grad_norm,
        accountant=plan.accountant,  # type: ignore[arg-type]
    )
    return Admission(dp, target_epsilon)


def train_site(
    spec: SiteSpec, global_arrays: Mapping[str, np.ndarray], plan: RoundConfig
) -> SiteUpdate:
    """One local round: admit it (budget, policy), train under DP-SGD, append the ledger,
    return the update. A round refused for privacy reasons is recorded in the ledger as a
    refusal (spending nothing) and logged before the refusal is raised."""
    model = cached_model(spec.foundation_dir)
    train, _ = site_studies(
        spec, model.config.image_size, model.config.volume_shape, model.config.volume_modalities
    )
    load_global(model, global_arrays)
    ledger = open_ledger(spec, plan)
    n = len(train)
    try:
        admitted = admit_round(spec, plan, ledger, n)
    except SiteRefusalError as exc:
        record_refusal(spec, plan.run_id, plan.server_round, str(exc))
        raise
    seed = _site_seed(spec.site_id, plan.seed, plan.server_round)
    examples = TrainingExamples(train, model.tokenizer, model.config, seed=seed)
    with proximal_term(model, plan.proximal_mu):
        result = train_local(
            model,
            examples,
            TrainConfig(
                steps=plan.local_steps,
                batch_size=plan.batch_size,
                lr=plan.lr,
                seed=seed,
                threads=spec.threads,
            ),
            admitted.dp,
            randomness=mechanism_randomness(spec, plan, "train"),
        )
    entry = ledger.append(  # what actually ran, recorded before any check can stop the reply
        site_id=spec.site_id,
        run_id=plan.run_id,
        round=plan.server_round,
        sample_rate=result.sample_rate,
        noise_multiplier=result.noise_multiplier,
        steps=result.steps,
        max_grad_norm=result.max_grad_norm,
        delta=plan.delta,
        accountant=plan.accountant,  # type: ignore[arg-type]
        trained=result.parts,
    )
    check_recorded_spend(plan, entry, admitted.target_epsilon, "round")
    epsilon = entry["epsilon"]
    return SiteUpdate(
        arrays=trainable_arrays(model),
        num_examples=n,
        metrics={  # public: the split's size and the mechanism (the loss stays here)
            WEIGHT_KEY: float(n),
            "epsilon": float("inf") if epsilon is None else float(epsilon),
            "steps": float(result.steps),
            "noise_multiplier": float(result.noise_multiplier),
            "sample_rate": float(result.sample_rate),
            **part_metrics(result.parts),
        },
        ledger_head=ledger_head(ledger),
    )


@dataclass(frozen=True)
class EvalRelease:
    """A site's reply to an evaluation: the figures of the families asked for (NaN where
    undefined) and the public values, released under the mechanism its ledger entry records."""

    num_examples: int  # the held-out split's size (public, as the training split's)
    metrics: dict[str, float]
    ledger_head: str  # "<lines>:<sha256>" after this release's entry (public)


@dataclass(frozen=True)
class EvalAdmission:
    """An evaluation the site has agreed to release, and what it may spend."""

    families: tuple[str, ...]  # () : no figures, the public sizes only
    noise_multiplier: float  # 0.0: released exactly (a run without DP)
    epsilon: float  # the release on its own (inf without noise)
    target_epsilon: float  # cumulative epsilon the ledger must stay within


def admit_evaluation(
    spec: SiteSpec, plan: RoundConfig, ledger: Ledger, n_held: int
) -> EvalAdmission:
    """The privacy decisions of an evaluation, before the model sees a held-out study: the
    families asked for against the policy's release_metrics, what training refuses too
    (`admit_plan`), the noise of one release, and the whole ledger, this run and this release
    against the same caps as training."""
    families = plan.eval_families
    target = capped_target(plan.target_epsilon, spec.epsilon)
    if not families:  # only the public split size leaves: nothing to admit
        return EvalAdmission(families, 0.0, 0.0, target)
    reason = check_evaluation(spec.policy, families)
    if reason is not None:
        raise SiteRefusalError(reason)
    admit_plan(spec, plan, n_held, "held-out")
    if not plan.dp:  # a run without DP: released exactly, recorded as unbounded
        return EvalAdmission(families, 0.0, math.inf, target)
    noise = release_noise(spec, plan)
    step = evaluation_step(noise)

    def spend(history: list[MechanismStep]) -> float:
        return cumulative_epsilon(history, delta=plan.delta, accountant=plan.accountant)  # type: ignore[arg-type]

    after = spend([*ledger.history(), step])
    if after > target * (1 + 1e-9):
        raise SiteRefusalError(
            f"an evaluation would take this site's ledger to epsilon {after:.3g}, past {target:.3g}"
        )
    own = spend([step])
    reason = check_round(  # the same per-round and per-run caps as a training round
        spec.policy,
        noise_multiplier=noise,
        round_epsilon=own,
        run_epsilon=spend([*ledger.history(plan.run_id), step]),
    )
    if reason is not None:
        raise SiteRefusalError(reason)
    return EvalAdmission(families, noise, own, target)


def evaluate_site(
    spec: SiteSpec, global_arrays: Mapping[str, np.ndarray], plan: RoundConfig
) -> EvalRelease:
    """The global model on the site's held-out split, released as noised figures: admitted
    (policy, budget) before any study is read, recorded in the ledger before the reply can
    leave. A refusal is recorded like a training round's and spends nothing."""
    model = cached_model(spec.foundation_dir)
    _, held = site_studies(
        spec, model.config.image_size, model.config.volume_shape, model.config.volume_modalities
    )
    if len(held) == 0:
        raise SiteRefusalError(f"site {spec.site_id} has no held-out studies")
    ledger = open_ledger(spec, plan)
    try:
        admitted = admit_evaluation(spec, plan, ledger, len(held))
    except SiteRefusalError as exc:
        record_refusal(spec, plan.run_id, plan.server_round, f"evaluation: {exc}")
        raise
    if not admitted.families:  # the plan asked for no figures: the public sizes only, nothing spent
        sizes = {WEIGHT_KEY: float(len(held)), "n_studies": float(len(held))}
        return EvalRelease(len(held), sizes, ledger_head(ledger))
    load_global(model, global_arrays)
    outputs = study_outputs(
        model,
        held,
        EvalConfig(max_reports=plan.eval_reports, max_questions=plan.eval_questions),
    )
    released = release(
        outputs,
        admitted.families,
        noise_multiplier=admitted.noise_multiplier,
        randomness=mechanism_randomness(spec, plan, "evaluate"),
    )
    entry = ledger.append(  # on record before the figures can leave
        site_id=spec.site_id,
        run_id=plan.run_id,
        round=plan.server_round,
        sample_rate=1.0,
        noise_multiplier=admitted.noise_multiplier,
        steps=1,
        max_grad_norm=released.sensitivity,
        delta=plan.delta,
        accountant=plan.accountant,  # type: ignore[arg-type]
    )
    check_recorded_spend(plan, entry, admitted.target_epsilon, "evaluation")
    metrics = {  # the families asked for (NaN where a figure is undefined) and public values
        **released.metrics,
        WEIGHT_KEY: float(len(held)),
        "n_studies": float(len(held)),
        "eval_epsilon": admitted.epsilon,
        "eval_noise_multiplier": admitted.noise_multiplier,
    }
    assert set(metrics) <= EVAL_METRIC_KEYS
    return EvalRelease(
        num_examples=len(held),
        metrics={key: float(metrics[key]) for key in sorted(metrics)},
        ledger_head=ledger_head(ledger),
    )
