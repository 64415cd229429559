"""Empirical privacy audit: a canary membership-inference test giving a LOWER bound on epsilon.

The accountant's epsilon is an upper bound proved for the mechanism; this measures from the
other side in one training run, as in Steinke, Nasr and Jagielski, "Privacy auditing with one (1)
training run" (NeurIPS 2023): canaries each included with probability 1/2 (`make_canaries`), the
site's model trained from one start with its DP-SGD settings and without DP, each canary scored
by how far its own loss fell, and the largest epsilon its guesses refute at confidence 1 - beta
(`audit_p_value`, `best_guess`). The DP run's bound must stay below its claim (else the
implementation or the accounting is broken), and far below is expected: ~100 canaries in one
run cannot certify more than a few units of epsilon, and DP-SGD's analysis assumes an adversary
who sees every step. The non-private run's bound shows the audit has power. Canaries are
synthetic, so this audits the mechanism, not any real study; their scores and inclusion bits
never leave this module, and the result holds only counts.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats
import torch
from torch.utils.data import DataLoader

from fedrad.client.ingest.dataset import SiteStudies, TrainingExamples, split_held_out
from fedrad.client.ingest.site_data import CachedStudy, SiteDataError, prepared_manifest
from fedrad.client.training.train import DPConfig, TrainConfig, train_local
from fedrad.common.findings import FINDINGS
from fedrad.common.labeling.labeler import label_report
from fedrad.common.model.checkpoint import CheckpointError, load_checkpoint
from fedrad.common.model.config import PRESETS, preset
from fedrad.common.model.preprocess import PreprocessConfig, preprocess
from fedrad.common.model.radiology_model import RadiologyModel
from fedrad.common.privacy.defaults import DEFAULT_DELTA, DEFAULT_EPSILON

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
ScoreKind = Literal["finding_loss_drop", "loss_drop"]

MIN_SITE_STUDIES: Final[int] = 8  # training studies a site needs for a meaningful audit
CANARY_SEED_NAMESPACE: Final[int] = 7_301  # spawn key: canaries never share a stream with a cohort
DEFAULT_GUESS_GRID: Final[tuple[tuple[float, float], ...]] = (
    (0.125, 0.125),
    (0.25, 0.25),
    (0.375, 0.375),
    (0.5, 0.5),
)
"""(k+ / m, k- / m) pairs, symmetric because both tails separate (an included canary's loss
falls, a left-out one's rises as the model fits the included canaries' random labels); few, so
the Bonferroni split of beta costs little."""


class EmpiricalAuditError(Exception):
    """Bad input for an audit (cohort, site, parameters); the message is one line."""


@dataclass(frozen=True)
class EmpiricalAuditConfig:
    """One audit of one site; the DP settings are those the site would train with."""

    site_id: str | None = None  # site folder in the cohort; None = the first in sorted order
    preset: str = "tiny"  # model preset (ignored when `checkpoint` is given)
    checkpoint: Path | None = None  # starting checkpoint dir; None = the public foundation
    foundation_steps: int = 600  # pretraining steps of the public foundation LM (cached)
    canaries: int = 128  # m: canary records, each included with probability 1/2
    steps: int = 200  # optimizer steps of each training run (DP and non-private)
    batch_size: int = 16  # expected batch size (Poisson rate q = batch_size / N under DP)
    lr: float = 1e-3  # learning rate of both runs (train_local's AdamW)
    epsilon: float = DEFAULT_EPSILON  # DP target for the whole `steps` schedule at `delta`
    delta: float = DEFAULT_DELTA  # DP delta, also the delta of the audited (eps, delta) claim
    max_grad_norm: float = 1.0  # per-sample clipping bound
    accountant: Literal["rdp", "prv"] = "rdp"  # how the DP run's noise is calibrated
    beta: float = 0.05  # the bound holds with confidence 1 - beta
    score: ScoreKind = "loss_drop"  # canary statistic (fixed before the run)
    guess_grid: tuple[tuple[float, float], ...] = DEFAULT_GUESS_GRID  # (k+/m, k-/m) tried
    held_out_fraction: float = 0.2  # the site's own held-out split, left out of training
    seed: int = 0  # canaries, inclusion, image side of the foundation, public training draws
    threads: int = 0  # torch CPU threads (0 = leave as the process has it)

    def __post_init__(self) -> None:
        problems = []
        if self.preset not in PRESETS:
            problems.append(f"unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})")
        if self.canaries < 2:
            problems.append("canaries must be >= 2")
        if self.steps < 1 or self.batch_size < 1 or self.foundation_steps < 1:
            problems.append("steps, batch_size and foundation_steps must be >= 1")
        if not self.lr > 0:
            problems.append("lr must be positive")
        if not self.epsilon > 0:
            problems.append("epsilon must be positive")
        if not 0 < self.delta < 1:
            problems.append("delta must be in (0, 1)")
        if not self.max_grad_norm > 0:
            problems.append("max_grad_norm must be positive")
        if not 0 < self.beta < 1:
            problems.append("beta must be in (0, 1)")
        if not 0 < self.held_out_fraction < 1:
            problems.append("held_out_fraction must be in (0, 1)")
        if not self.guess_grid:
            problems.append("guess_grid must not be empty")
        for plus, minus in self.guess_grid:
            if plus < 0 or minus < 0 or plus + minus > 1 or plus + minus == 0:
                problems.append(f"bad guess fractions ({plus}, {minus}): need 0 < k+ + k- <= m")
                break
        if self.threads < 0:
            problems.append("threads must be >= 0")
        if self.score not in ("finding_loss_drop", "loss_drop"):
            problems.append(f"score must be finding_loss_drop or loss_drop, got {self.score!r}")
        if self.accountant not in ("rdp", "prv"):
            problems.append(f"accountant must be rdp or prv, got {self.accountant!r}")
        if problems:
            raise EmpiricalAuditError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# The bound


def audit_p_value(
    *, epsilon: float, correct: int, guesses: int, canaries: int, delta: float
) -> float:
    """P[at least `correct` right out of `guesses`] under an (epsilon, delta)-DP hypothesis.

    The paper's approximate-DP result, with the same p-value as its reference code and as
    jax_privacy's `epsilon_one_run` (the delta-aware form, not the pure-eps one); W counts the
    correct guesses among r = `guesses`, m = `canaries`::

        P[W >= v] <= P[Binomial(r, q) >= v] + 2 m delta alpha,   q = e^eps / (1 + e^eps),
        alpha = max_{1 <= i <= v} P[v - i <= Binomial(r, q) < v] / i.
    """
    q = float(scipy.special.expit(epsilon))
    tail = float(scipy.stats.binom.sf(correct - 1, guesses, q))
    if delta == 0 or correct == 0:
        return min(tail, 1.0)
    shifts = np.arange(1, correct + 1)
    below = scipy.stats.binom.cdf(correct - 1, guesses, q)
    # P[correct - i <= W < correct] for i = 1..correct
    window = below - scipy.stats.binom.cdf(correct - 1 - shifts, guesses, q)
    alpha = float(np.max(window / shifts))
    return min(tail + 2.0 * canaries * delta * alpha, 1.0)


def epsilon_lower_bound(
    *, correct: int, guesses: int, canaries: int, delta: float, beta: float
) -> float:
    """The largest epsilon that `correct` right guesses out of `guesses` refute at level beta.

    0.0 when no epsilon >= 0 is refuted. `canaries` is m, the number of canaries that were
    each included with probability 1/2 (abstentions included); it only enters the delta term.
    """
    if not 0 <= correct <= guesses <= canaries:
        raise EmpiricalAuditError(
            f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}"
        )
    if not 0 <= delta < 1:
        raise EmpiricalAuditError(f"delta must be in [0, 1), got {delta}")
    if not 0 < beta < 1:
        raise EmpiricalAuditError(f"beta must be in (0, 1), got {beta}")

    def excess(eps: float) -> float:  # < 0 where the (eps, delta) claim is refuted
        p = audit_p_value(
            epsilon=eps, correct=correct, guesses=guesses, canaries=canaries, delta=delta
        )
        return p - beta

    if guesses == 0 or excess(0.0) >= 0:
        return 0.0
    low, high = 0.0, 1.0
    while excess(high) < 0:
        low, high = high, 2 * high
        if high > 1e4:  # cannot happen for finite counts; guards a broken scipy
            raise EmpiricalAuditError("epsilon bound search diverged")
    return float(scipy.optimize.brentq(excess, low, high, xtol=1e-9))


@dataclass(frozen=True)
class GuessOutcome:
    k_plus: int  # canaries guessed included (top scores)
    k_minus: int  # canaries guessed left out (bottom scores)
    guesses: int
    correct: int
    bound: float  # epsilon lower bound at the Bonferroni-split level


def count_correct(
    scores: np.ndarray, included: np.ndarray, *, k_plus: int, k_minus: int
) -> tuple[int, int]:
    """(guesses, correct) when the top `k_plus` are called members, the bottom `k_minus` not."""
    m = len(scores)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise EmpiricalAuditError(f"need 0 <= k+ + k- <= {m}, got {k_plus} + {k_minus}")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    members = included[order[:k_plus]]
    outsiders = included[order[m - k_minus :]] if k_minus else np.zeros(0, dtype=bool)
    return k_plus + k_minus, int(members.sum()) + int((~outsiders).sum())


def best_guess(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    grid: tuple[tuple[float, float], ...],
    delta: float,
    beta: float,
) -> GuessOutcome:
    """The grid point with the largest bound, each tested at beta / len(grid) (Bonferroni), so
    the maximum is still a bound at confidence 1 - beta; the grid is fixed in the config, never
    tuned on the run being audited."""
    m = len(scores)
    level = beta / len(grid)
    best: GuessOutcome | None = None
    for plus, minus in grid:
        k_plus, k_minus = round(plus * m), round(minus * m)
        if k_plus + k_minus == 0:
            continue
        guesses, correct = count_correct(scores, included, k_plus=k_plus, k_minus=k_minus)
        bound = epsilon_lower_bound(
            correct=correct, guesses=guesses, canaries=m, delta=delta, beta=level
        )
        if best is None or bound > best.bound:
            best = GuessOutcome(k_plus, k_minus, guesses, correct, bound)
    if best is None:
        raise EmpiricalAuditError(f"no guess in the grid is non-empty for {m} canaries")
    return best


def auc(scores: np.ndarray, included: np.ndarray) -> float:
    """Probability that an included canary outscores a left-out one (ties count 1/2)."""
    pos, neg = int(included.sum()), int((~included).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = scipy.stats.rankdata(scores)
    return float((ranks[included].sum() - pos * (pos + 1) / 2) / (pos * neg))


# ---------------------------------------------------------------------------------------------
# Canaries


@dataclass(frozen=True)
class Canaries:
    """Canary records (shaped like a site's cached studies) and which ones were trained on."""

    studies: SiteStudies
    included: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.studies)

    @property
    def mask(self) -> np.ndarray:
        return np.asarray(self.included, dtype=bool)

    def members(self) -> SiteStudies:
        return self.studies.subset([i for i, inc in enumerate(self.included) if inc])


def canary_pixels(rng: np.random.Generator, size: int) -> np.ndarray:
    """A raw image no radiograph resembles, distinct from every other canary at every scale the
    encoder pools over: a coarse random block pattern (survives the visual prefix's pooling), an
    oriented grating of random frequency (survives global pooling as texture) and fine noise."""
    cells = int(rng.integers(3, 9))
    coarse = rng.standard_normal((cells, cells))
    reps = math.ceil(size / cells)
    blocks = np.kron(coarse, np.ones((reps, reps)))[:size, :size]
    y, x = np.mgrid[0:size, 0:size] / size
    theta = rng.uniform(0.0, math.pi)
    freq = rng.uniform(3.0, max(4.0, size / 6))  # cycles per image
    phase = rng.uniform(0.0, 2 * math.pi)
    grating = np.sin(2 * math.pi * freq * (x * math.cos(theta) + y * math.sin(theta)) + phase)
    fine = rng.standard_normal((size, size))
    return (blocks + rng.uniform(0.5, 1.5) * grating + 0.3 * fine).astype(np.float32)


def _canary_report(present: tuple[str, ...], rng: np.random.Generator) -> str:
    """Report prose for exactly these findings, in a plain style (no hedging, no misses)."""
    import datetime as dt

    from fedrad.common.synthetic.cxr_image import sample_finding
    from fedrad.common.synthetic.report_text import HeaderPHI, ReportStyle, write_report

    style = ReportStyle(hedge_rate=0.0, miss_rate=0.0, comparison_rate=0.0, phi_rate=0.0)
    phi = HeaderPHI("Anon", "Anon", "X", "Anon", dt.date(2020, 1, 1), "0000", dt.date(2019, 1, 1))
    findings = tuple(sample_finding(name, rng) for name in present)
    return write_report(findings, view="PA", devices=(), style=style, phi=phi, rng=rng).text


def make_canaries(m: int, *, image_size: int, seed: int) -> Canaries:
    """`m` independent canaries, each included with probability 1/2; identical for one seed.

    A canary is an image no real study resembles (a seeded random pattern, preprocessed like
    every cached image) with findings drawn independently (p = 1/2 each) and a report for
    exactly those: nothing about one canary helps the model fit another, so a model only fits
    a canary it memorised.
    """
    if m < 1:
        raise EmpiricalAuditError("need at least one canary")
    root = np.random.SeedSequence(seed, spawn_key=(CANARY_SEED_NAMESPACE,))
    included = np.random.default_rng(root.spawn(1)[0]).random(m) < 0.5
    preprocess_config = PreprocessConfig(image_size=image_size)
    studies: list[CachedStudy] = []
    images: list[np.ndarray] = []
    for i, child in enumerate(root.spawn(m)):
        rng = np.random.default_rng(child)
        present = tuple(f for f in FINDINGS if rng.random() < 0.5)
        report = _canary_report(present, rng)
        labels = label_report(report)  # as the site labels every report
        studies.append(
            CachedStudy(
                study_id=f"canary-{i:04d}",
                image_file=f"canary/{i:04d}.npy",  # never on disk: images stay in memory
                report=report,
                indication="",
                labels=dict(labels.labels),
                sides=dict(labels.sides),
                nodule_size_mm=labels.nodule_size_mm,
                view="PA",
            )
        )
        pixels = canary_pixels(rng, image_size)
        images.append(preprocess(pixels, preprocess_config).numpy().astype(np.float16))
    return Canaries(SiteStudies(studies, images), tuple(bool(v) for v in included))


# ---------------------------------------------------------------------------------------------
# Scoring


class _ReportTaskOnly:
    """Stands in for TrainingExamples' task draw so every scoring example is the report task."""

    def random(self) -> float:
        return 0.0


@torch.no_grad()
def canary_losses(
    model: RadiologyModel, studies: SiteStudies, *, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Per-canary (finding loss, report LM loss) under the model, deterministic."""
    examples = TrainingExamples(studies, model.tokenizer, model.config, seed=0)
    examples.rng = _ReportTaskOnly()  # type: ignore[assignment]
    model.eval()
    finding_parts, lm_parts = [], []
    for batch in DataLoader(examples, batch_size=batch_size, shuffle=False):
        lm_loss, finding_loss, _ = model(*batch)
        finding_parts.append(finding_loss.double().numpy())
        lm_parts.append(lm_loss.double().numpy())
    return np.concatenate(finding_parts), np.concatenate(lm_parts)


def canary_scores(
    before: tuple[np.ndarray, np.ndarray],
    after: tuple[np.ndarray, np.ndarray],
    *,
    kind: ScoreKind,
    finding_weight: float,
) -> np.ndarray:
    """Higher = more likely trained on: how far the canary's own loss fell during training."""
    if kind == "finding_loss_drop":
        return before[0] - after[0]
    return (before[1] + finding_weight * before[0]) - (after[1] + finding_weight * after[0])


# ---------------------------------------------------------------------------------------------
# Runs and result


@dataclass(frozen=True)
class RunAudit:
    """One training run (DP or not) and what the auditor got out of it."""

    private: bool
    claimed_epsilon: float | None  # the accountant's epsilon for this run (None without DP)
    empirical_epsilon_lower_bound: float
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    auc: float  # diagnostic only: the bound does not use it
    noise_multiplier: float
    sample_rate: float
    steps: int
    examples: int  # training set size: site studies + included canaries
    final_loss: float  # mean training loss over the last 20 steps
    train_seconds: float
    score_seconds: float


@dataclass(frozen=True)
class EmpiricalAuditResult:
    site_id: str
    preset: str
    canaries: int
    canaries_included: int
    site_studies: int  # the site's training studies (canaries not counted)
    steps: int
    batch_size: int
    lr: float
    target_epsilon: float
    delta: float
    beta: float
    seed: int
    score: str
    guess_grid: tuple[tuple[float, float], ...]
    dp: RunAudit
    non_private: RunAudit
    setup_seconds: float  # data, model and canaries
    wall_seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def claimed_epsilon(self) -> float:
        assert self.dp.claimed_epsilon is not None
        return self.dp.claimed_epsilon

    @property
    def empirical_epsilon_lower_bound(self) -> float:
        return self.dp.empirical_epsilon_lower_bound

    @property
    def non_private_epsilon_lower_bound(self) -> float:
        return self.non_private.empirical_epsilon_lower_bound

    @property
    def consistent(self) -> bool:
        """The DP run's empirical bound does not exceed what its accountant claims."""
        return self.empirical_epsilon_lower_bound <= self.claimed_epsilon

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: counts and bounds only, never a score or an inclusion bit."""
        data = dataclasses.asdict(self)
        data["guess_grid"] = [list(pair) for pair in self.guess_grid]
        data["notes"] = list(self.notes)
        for run in ("dp", "non_private"):
            if not math.isfinite(data[run]["auc"]):
                data[run]["auc"] = None
        data["claimed_epsilon"] = self.claimed_epsilon
        data["empirical_epsilon_lower_bound"] = self.empirical_epsilon_lower_bound
        data["non_private_epsilon_lower_bound"] = self.non_private_epsilon_lower_bound
        data["consistent"] = self.consistent
        return data


def render_table(result: EmpiricalAuditResult) -> str:
    """A short human summary: one row per run, then the verdict."""
    conf = round(100 * (1 - result.beta))
    lines = [
        f"empirical privacy audit, site {result.site_id}: {result.canaries} canaries "
        f"({result.canaries_included} trained on) + {result.site_studies} studies, "
        f"{result.steps} steps, seed {result.seed}",
        f"{'run':<12} {'claimed eps':>11} {f'lower bound ({conf}%)':>18} {'correct/guesses':>15}"
        f" {'AUC':>5} {'train s':>8}",
    ]
    for name, run in (("DP-SGD", result.dp), ("non-private", result.non_private)):
        claimed = f"{run.claimed_epsilon:.2f}" if run.claimed_epsilon is not None else "inf"
        auc_text = f"{run.auc:.2f}" if math.isfinite(run.auc) else "-"
        lines.append(
            f"{name:<12} {claimed:>11} {run.empirical_epsilon_lower_bound:>18.2f} "
            f"{f'{run.correct}/{run.guesses}':>15} {auc_text:>5} {run.train_seconds:>8.1f}"
        )
    verdict = (
        "consistent: the DP run's empirical bound is within its claimed epsilon"
        if result.consistent
        else "INCONSISTENT: the DP run leaked more than its claimed epsilon allows"
    )
    lines.append(f"{verdict} (delta {result.delta:g}; wall {result.wall_seconds:.0f} s)")
    return "\n".join(lines)


def _combine(site: SiteStudies, extra: SiteStudies) -> SiteStudies:
    return SiteStudies([*site.studies, *extra.studies], [*site.images, *extra.images])


def _run(
    start: RadiologyModel,
    site: SiteStudies,
    canaries: Canaries,
    before: tuple[np.ndarray, np.ndarray],
    config: EmpiricalAuditConfig,
    *,
    private: bool,
    progress: Progress | None,
) -> RunAudit:
    name = "DP-SGD" if private else "non-private"
    model = copy.deepcopy(start)
    # Poisson sampling's q = batch_size / N counts the members: N moves by one with each
    # canary, treated as public, as every DP-SGD accountant does.
    train = _combine(site, canaries.members())
    examples = TrainingExamples(train, model.tokenizer, model.config, seed=config.seed)
    dp = (
        DPConfig(
            enabled=True,
            target_epsilon=config.epsilon,
            delta=config.delta,
            max_grad_norm=config.max_grad_norm,
            planned_steps=config.steps,
            accountant=config.accountant,
        )
        if private
        else DPConfig(enabled=False)
    )
    every = max(1, config.steps // 10)

    def on_step(done: int, loss: float) -> None:
        if progress is not None and (done % every == 0 or done == config.steps):
            progress(f"{name}: step {done}/{config.steps}, loss {loss:.3f}")

    result = train_local(
        model,
        examples,
        TrainConfig(
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
            threads=config.threads,
        ),
        dp,
        progress=on_step,
    )
    started = time.perf_counter()
    after = canary_losses(model, canaries.studies)
    scores = canary_scores(
        before, after, kind=config.score, finding_weight=model.config.finding_loss_weight
    )
    outcome = best_guess(
        scores, canaries.mask, grid=config.guess_grid, delta=config.delta, beta=config.beta
    )
    finite = [v for v in result.losses if math.isfinite(v)][-20:]
    run = RunAudit(
        private=private,
        claimed_epsilon=result.epsilon,
        empirical_epsilon_lower_bound=outcome.bound,
        guesses=outcome.guesses,
        correct=outcome.correct,
        k_plus=outcome.k_plus,
        k_minus=outcome.k_minus,
        auc=auc(scores, canaries.mask),
        noise_multiplier=result.noise_multiplier,
        sample_rate=result.sample_rate,
        steps=result.steps,
        examples=result.examples,
        final_loss=float(np.mean(finite)) if finite else float("nan"),
        train_seconds=result.seconds,
        score_seconds=time.perf_counter() - started,
    )
    logger.info(
        "%s run: %d/%d correct guesses, epsilon lower bound %.3f (claimed %s)",
        name,
        run.correct,
        run.guesses,
        run.empirical_epsilon_lower_bound,
        f"{run.claimed_epsilon:.3f}" if run.claimed_epsilon is not None else "n/a",
    )
    return run


def audit_studies(
    site: SiteStudies,
    start: RadiologyModel,
    config: EmpiricalAuditConfig,
    *,
    site_id: str = "site",
    progress: Progress | None = None,
) -> EmpiricalAuditResult:
    """The audit on studies already loaded and a starting model (left untouched)."""
    started = time.perf_counter()
    if len(site) < MIN_SITE_STUDIES:
        raise EmpiricalAuditError(
            f"site {site_id} has {len(site)} training studies; the audit needs at least "
            f"{MIN_SITE_STUDIES}"
        )
    if config.threads:
        torch.set_num_threads(config.threads)
    canaries = make_canaries(config.canaries, image_size=start.config.image_size, seed=config.seed)
    if progress is not None:
        progress(f"{len(canaries)} canaries built, {sum(canaries.included)} go into training")
    before = canary_losses(start, canaries.studies)
    setup = time.perf_counter() - started
    dp_run = _run(start, site, canaries, before, config, private=True, progress=progress)
    plain_run = _run(start, site, canaries, before, config, private=False, progress=progress)
    notes = []
    if config.delta >= 1 / dp_run.examples:
        notes.append(f"delta {config.delta:g} >= 1/N for N={dp_run.examples}: a weak guarantee")
    return EmpiricalAuditResult(
        site_id=site_id,
        preset=start.config.preset,
        canaries=len(canaries),
        canaries_included=sum(canaries.included),
        site_studies=len(site),
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        target_epsilon=config.epsilon,
        delta=config.delta,
        beta=config.beta,
        seed=config.seed,
        score=config.score,
        guess_grid=config.guess_grid,
        dp=dp_run,
        non_private=plain_run,
        setup_seconds=setup,
        wall_seconds=time.perf_counter() - started,
        notes=tuple(notes),
    )


def _choose_site(cohort: Path, site_id: str | None) -> str:
    """Cheap checks first: a wrong path or site name must not wait for a model to load."""
    if not cohort.is_dir():
        raise EmpiricalAuditError(f"cohort directory does not exist: {cohort}")
    sites = sorted(p.name for p in cohort.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not sites:
        raise EmpiricalAuditError(f"no site folders in {cohort}")
    chosen = site_id if site_id is not None else sites[0]
    if chosen not in sites:
        raise EmpiricalAuditError(f"unknown site {chosen!r} (cohort has {', '.join(sites)})")
    return chosen


def _site_training_studies(
    cohort: Path, chosen: str, *, image_size: int, held_out_fraction: float
) -> SiteStudies:
    """The training split of a site `_choose_site` already accepted."""
    try:
        manifest = prepared_manifest(cohort / chosen, config=PreprocessConfig(image_size))
        studies = SiteStudies.from_manifest(manifest)
    except SiteDataError as exc:
        raise EmpiricalAuditError(f"site {chosen}: {exc}") from exc
    train, _ = split_held_out(studies, fraction=held_out_fraction)
    return train


def run_empirical_audit(
    cohort: Path, config: EmpiricalAuditConfig, *, progress: Progress | None = None
) -> EmpiricalAuditResult:
    """Audits one site of a cohort folder from the public foundation (or `config.checkpoint`)."""
    started = time.perf_counter()
    site_id = _choose_site(cohort, config.site_id)
    if config.checkpoint is not None:
        try:
            start = load_checkpoint(config.checkpoint)
        except CheckpointError as exc:
            raise EmpiricalAuditError(str(exc)) from exc
    else:
        from fedrad.common.model.foundation import FoundationRecipe, build_foundation

        if progress is not None:
            progress("loading the public foundation (built once, then cached)")
        start, _ = build_foundation(
            preset(config.preset),
            recipe=FoundationRecipe(steps=config.foundation_steps),
            seed=config.seed,
        )
    site = _site_training_studies(
        cohort,
        site_id,
        image_size=start.config.image_size,
        held_out_fraction=config.held_out_fraction,
    )
    if progress is not None:
        progress(f"site {site_id}: {len(site)} training studies")
    result = audit_studies(site, start, config, site_id=site_id, progress=progress)
    loading = time.perf_counter() - started - result.wall_seconds
    return dataclasses.replace(
        result,
        setup_seconds=result.setup_seconds + loading,
        wall_seconds=time.perf_counter() - started,
    )
