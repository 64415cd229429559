"""Empirical privacy audit: the one-run bound (Steinke, Nasr, Jagielski 2023) against closed forms
and scipy, seeded independent canaries, and one micro end-to-end audit of both training runs."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from fedrad.common.findings import FINDINGS
from fedrad.common.labeling.labeler import label_report
from fedrad.common.synthetic.cohort import generate_cohort
from fedrad.simulations.empirical_audit import (
    MIN_SITE_STUDIES,
    EmpiricalAuditConfig,
    EmpiricalAuditError,
    auc,
    audit_p_value,
    audit_studies,
    best_guess,
    count_correct,
    epsilon_lower_bound,
    make_canaries,
    render_table,
    run_empirical_audit,
)
from tests.fl_fixtures import micro_foundation
from tests.model_fixtures import micro_model, micro_studies

# -- the bound -------------------------------------------------------------------------------


def test_all_correct_pure_dp_bound_matches_the_closed_form() -> None:
    # delta = 0: P[Bin(r, q) >= r] = q^r = beta  =>  eps = logit(beta^(1/r)), by hand for r=10:
    # 0.05^0.1 = 0.741134..., ln(0.741134 / 0.258866) = 1.05187...
    bound = epsilon_lower_bound(correct=10, guesses=10, canaries=10, delta=0.0, beta=0.05)
    assert bound == pytest.approx(1.05187, abs=1e-4)
    for r in (5, 20, 64):
        expected = float(scipy.special.logit(0.05 ** (1 / r)))
        got = epsilon_lower_bound(correct=r, guesses=r, canaries=r, delta=0.0, beta=0.05)
        assert got == pytest.approx(expected, abs=1e-7)


def test_bound_is_where_the_binomial_tail_reaches_beta() -> None:
    eps = epsilon_lower_bound(correct=45, guesses=60, canaries=128, delta=0.0, beta=0.05)
    assert eps > 0
    q = scipy.special.expit(eps)
    assert scipy.stats.binom.sf(44, 60, q) == pytest.approx(0.05, rel=1e-6)
    # just below the bound the claim is refuted, just above it is not
    assert scipy.stats.binom.sf(44, 60, scipy.special.expit(eps - 1e-3)) < 0.05
    assert scipy.stats.binom.sf(44, 60, scipy.special.expit(eps + 1e-3)) > 0.05


def test_all_correct_bound_is_positive_and_grows_with_the_number_of_guesses() -> None:
    bounds = [
        epsilon_lower_bound(correct=r, guesses=r, canaries=256, delta=1e-5, beta=0.05)
        for r in (8, 16, 32, 64, 128, 256)
    ]
    assert bounds[0] > 0
    assert all(a < b for a, b in itertools.pairwise(bounds))


def test_half_correct_gives_no_bound() -> None:
    for r in (10, 64, 200):
        assert epsilon_lower_bound(
            correct=r // 2, guesses=r, canaries=256, delta=1e-5, beta=0.05
        ) == pytest.approx(0.0, abs=1e-9)
    # a little better than chance is still not significant with few guesses
    assert epsilon_lower_bound(correct=6, guesses=10, canaries=10, delta=0, beta=0.05) == 0.0


def test_bound_is_monotone_in_correct_guesses_and_confidence() -> None:
    values = [
        epsilon_lower_bound(correct=v, guesses=64, canaries=128, delta=1e-5, beta=0.05)
        for v in range(0, 65)
    ]
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert values[32] == 0.0 and values[-1] > 2.0
    strict = epsilon_lower_bound(correct=60, guesses=64, canaries=128, delta=1e-5, beta=0.001)
    assert 0 < strict < values[60]


def test_delta_term_follows_the_paper_and_only_lowers_the_bound() -> None:
    correct, guesses, m, delta, eps = 18, 24, 64, 1e-3, 0.7
    q = scipy.special.expit(eps)
    alpha = max(
        sum(scipy.stats.binom.pmf(j, guesses, q) for j in range(correct - i, correct)) / i
        for i in range(1, correct + 1)
    )
    expected = scipy.stats.binom.sf(correct - 1, guesses, q) + 2 * m * delta * alpha
    got = audit_p_value(epsilon=eps, correct=correct, guesses=guesses, canaries=m, delta=delta)
    assert got == pytest.approx(expected, rel=1e-9)
    pure = epsilon_lower_bound(correct=40, guesses=40, canaries=64, delta=0.0, beta=0.05)
    approx = epsilon_lower_bound(correct=40, guesses=40, canaries=64, delta=1e-4, beta=0.05)
    assert 0 < approx < pure
    # with delta large enough that 2 m delta alone exceeds beta nothing can be refuted
    assert epsilon_lower_bound(correct=40, guesses=40, canaries=64, delta=0.1, beta=0.05) < 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(correct=5, guesses=4, canaries=10, delta=1e-5, beta=0.05),
        dict(correct=4, guesses=12, canaries=10, delta=1e-5, beta=0.05),
        dict(correct=-1, guesses=4, canaries=10, delta=1e-5, beta=0.05),
        dict(correct=2, guesses=4, canaries=10, delta=1.0, beta=0.05),
        dict(correct=2, guesses=4, canaries=10, delta=1e-5, beta=0.0),
    ],
)
def test_impossible_counts_are_refused(kwargs: dict) -> None:
    with pytest.raises(EmpiricalAuditError):
        epsilon_lower_bound(**kwargs)


def test_guesses_take_the_top_and_bottom_scores() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.8, -0.3, 0.0])
    included = np.array([True, False, True, False, False, True])
    # by score: 0 (in), 3 (out), 2 (in), 1 (out), 5 (in), 4 (out)
    # top 2 called in: 0 right, 3 wrong; bottom 2 called out: 5 wrong, 4 right
    assert count_correct(scores, included, k_plus=2, k_minus=2) == (4, 2)
    assert count_correct(scores, included, k_plus=3, k_minus=1) == (4, 3)
    assert count_correct(scores, included, k_plus=1, k_minus=0) == (1, 1)
    assert count_correct(scores, included, k_plus=0, k_minus=6) == (6, 3)
    with pytest.raises(EmpiricalAuditError):
        count_correct(scores, included, k_plus=4, k_minus=3)
    assert auc(scores, included) == pytest.approx(6 / 9)  # 3 + 2 + 1 of 9 pairs ordered right


def test_grid_choice_is_paid_for_with_bonferroni() -> None:
    rng = np.random.default_rng(0)
    included = rng.random(128) < 0.5
    scores = included * 2.0 + rng.standard_normal(128)  # a strong but imperfect attack
    one = best_guess(scores, included, grid=((0.25, 0.25),), delta=1e-5, beta=0.05)
    assert one.guesses == 64
    assert one.bound == pytest.approx(
        epsilon_lower_bound(correct=one.correct, guesses=64, canaries=128, delta=1e-5, beta=0.05)
    )
    grid = ((0.125, 0.125), (0.25, 0.25), (0.5, 0.5))
    best = best_guess(scores, included, grid=grid, delta=1e-5, beta=0.05)
    assert best.bound == pytest.approx(
        epsilon_lower_bound(
            correct=best.correct, guesses=best.guesses, canaries=128, delta=1e-5, beta=0.05 / 3
        )
    )
    # with scores unrelated to membership the audit finds nothing (seeded, so no flake)
    noise = rng.standard_normal(128)
    assert best_guess(noise, included, grid=grid, delta=1e-5, beta=0.05).bound < 0.3


# -- canaries --------------------------------------------------------------------------------


def test_canaries_are_seeded_shaped_like_cached_images_and_labelled_from_their_reports() -> None:
    first = make_canaries(24, image_size=32, seed=5)
    again = make_canaries(24, image_size=32, seed=5)
    other = make_canaries(24, image_size=32, seed=6)
    assert first.included == again.included
    assert first.studies.studies == again.studies.studies
    assert all(
        np.array_equal(a, b)
        for a, b in zip(first.studies.images, again.studies.images, strict=True)
    )
    assert first.included != other.included
    assert not np.array_equal(first.studies.images[0], other.studies.images[0])
    for study, image in zip(first.studies.studies, first.studies.images, strict=True):
        assert image.shape == (1, 32, 32) and image.dtype == np.float16
        assert abs(float(image.astype(np.float32).mean())) < 0.05  # z-normalised like the cache
        assert study.labels == dict(label_report(study.report).labels)
        assert set(study.labels.values()) <= {0, 1}  # no uncertain label: nothing is masked
    assert len({s.study_id for s in first.studies.studies}) == 24
    flat = [img.tobytes() for img in first.studies.images]
    assert len(set(flat)) == 24


def test_canaries_are_independent_of_how_many_are_drawn() -> None:
    small = make_canaries(8, image_size=16, seed=1)
    large = make_canaries(20, image_size=16, seed=1)
    assert large.included[:8] == small.included
    assert large.studies.studies[:8] == small.studies.studies
    assert all(
        np.array_equal(a, b)
        for a, b in zip(small.studies.images, large.studies.images[:8], strict=False)
    )


def test_inclusion_and_labels_are_fair_coins() -> None:
    canaries = make_canaries(400, image_size=16, seed=11)
    included = sum(canaries.included)
    assert 160 < included < 240  # Binomial(400, 1/2): 4 standard deviations
    positives = [s.labels[f] for s in canaries.studies.studies for f in FINDINGS]
    assert 0.42 < np.mean(positives) < 0.58
    # label vectors are not shared by many canaries (64 patterns, 400 draws)
    patterns = {tuple(s.labels[f] for f in FINDINGS) for s in canaries.studies.studies}
    assert len(patterns) > 50
    assert len(canaries.members()) == included


# -- configuration and input errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"canaries": 1}, "canaries must be >= 2"),
        ({"steps": 0}, "steps, batch_size and foundation_steps must be >= 1"),
        ({"epsilon": 0.0}, "epsilon must be positive"),
        ({"delta": 1.0}, "delta must be in (0, 1)"),
        ({"beta": 1.5}, "beta must be in (0, 1)"),
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"guess_grid": ((0.7, 0.5),)}, "bad guess fractions"),
        ({"score": "accuracy"}, "score must be finding_loss_drop or loss_drop"),
        ({"accountant": "gdp"}, "accountant must be rdp or prv"),
    ],
)
def test_bad_settings_fail_with_one_line(settings: dict, message: str) -> None:
    with pytest.raises(EmpiricalAuditError, match=re.escape(message)) as info:
        EmpiricalAuditConfig(**settings)
    assert "\n" not in str(info.value)


@pytest.fixture
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def micro_cohort(tmp_path: Path) -> tuple[Path, Path]:
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, sites=1, studies_per_site=16, seed=3, workers=1, image_size=64)
    return cohort, micro_foundation(tmp_path)


def test_bad_cohort_or_site_is_one_clear_error(
    tmp_path: Path, micro_cohort: tuple[Path, Path]
) -> None:
    cohort, foundation = micro_cohort
    config = EmpiricalAuditConfig(checkpoint=foundation)
    with pytest.raises(EmpiricalAuditError, match="cohort directory does not exist"):
        run_empirical_audit(tmp_path / "missing", config)
    with pytest.raises(EmpiricalAuditError, match=r"unknown site 'site_9' \(cohort has site_1\)"):
        run_empirical_audit(cohort, EmpiricalAuditConfig(checkpoint=foundation, site_id="site_9"))
    with pytest.raises(EmpiricalAuditError, match="not a checkpoint directory"):
        run_empirical_audit(cohort, EmpiricalAuditConfig(checkpoint=tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmpiricalAuditError, match="no site folders"):
        run_empirical_audit(tmp_path / "empty", config)


def test_a_site_with_too_few_studies_is_refused_before_training() -> None:
    studies = micro_studies(MIN_SITE_STUDIES - 1, 32)
    with pytest.raises(EmpiricalAuditError, match=r"site tiny has 7 training studies") as info:
        audit_studies(studies, micro_model(), EmpiricalAuditConfig(), site_id="tiny")
    assert "\n" not in str(info.value)


# -- end to end ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("_one_thread")
def test_micro_audit_end_to_end(micro_cohort: tuple[Path, Path]) -> None:
    cohort, foundation = micro_cohort
    config = EmpiricalAuditConfig(
        checkpoint=foundation, canaries=64, steps=100, batch_size=8, lr=1e-2, epsilon=4.0
    )
    messages: list[str] = []
    result = run_empirical_audit(cohort, config, progress=messages.append)

    assert result.site_id == "site_1" and result.canaries == 64
    assert 0 < result.canaries_included < 64
    assert result.dp.examples == result.site_studies + result.canaries_included
    assert result.dp.steps == result.non_private.steps == 100
    # the DP run spent what it was calibrated for, and the audit stays below it
    assert result.dp.noise_multiplier > 0 and result.non_private.noise_multiplier == 0
    assert 0 < result.claimed_epsilon <= 4.0 + 1e-6
    assert 0 <= result.empirical_epsilon_lower_bound < result.claimed_epsilon
    assert result.consistent
    # the audit has power: the micro model memorises its canaries without DP. 64 canaries and 100
    # steps, not fewer: with 32 x 60 the bound swung 0.31-1.61 between CPU instruction sets
    assert result.non_private.auc > 0.8
    assert result.non_private_epsilon_lower_bound > 0.5
    for run in (result.dp, result.non_private):
        assert 0 <= run.correct <= run.guesses == run.k_plus + run.k_minus <= 64
        assert run.train_seconds > 0
    assert any(m.startswith("DP-SGD: step 100/100") for m in messages)
    assert any(m.startswith("non-private: step 100/100") for m in messages)

    data = json.loads(json.dumps(result.to_dict()))
    for key in ("claimed_epsilon", "empirical_epsilon_lower_bound", "canaries", "delta", "beta"):
        assert key in data
    assert data["non_private"]["guesses"] == result.non_private.guesses
    assert data["non_private_epsilon_lower_bound"] == result.non_private_epsilon_lower_bound
    # counts and bounds only: no per-canary score or inclusion bit leaves the audit
    flat = json.dumps(data)
    assert "score" not in data["dp"] and len(flat) < 3000
    table = render_table(result)
    assert "DP-SGD" in table and "non-private" in table and "consistent" in table
    assert f"{result.claimed_epsilon:.2f}" in table

    # the seed fixes the canaries and the non-private run; the DP run draws its noise and
    # sampling from the site's CSPRNG, as a deployed site does, so it is not repeated
    again = run_empirical_audit(cohort, config)
    first, second = result.non_private, again.non_private
    assert (first.correct, first.guesses) == (second.correct, second.guesses)
    assert first.empirical_epsilon_lower_bound == second.empirical_epsilon_lower_bound
    assert math.isclose(first.final_loss, second.final_loss, rel_tol=1e-5)
    assert again.dp.claimed_epsilon == result.dp.claimed_epsilon  # the same mechanism
