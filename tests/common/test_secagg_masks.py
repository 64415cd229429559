"""SecAgg+ masks at the strength of their seeds: deterministic, every seed byte matters (where
Flower's 32-bit fold ignores most of them), uniform, shaped as Flower's; short seeds and bad
ranges refused; installed in Flower's mod and workflow by fedrad's SecAgg+ apps; and a real
round through both still unmasks to the FedAvg mean, while a seed too short for them, shared
by a malicious site, stops the round with one line."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

# importing fedrad's SecAgg+ apps installs the masks on both sides
from fedrad.client.federation import secure_aggregation as client_secagg
from fedrad.client.federation import site_agent
from fedrad.client.federation.secure_aggregation import simulation_secure_client_app
from fedrad.client.federation.site_agent import SiteSpec, SiteUpdate, cached_model, trainable_arrays
from fedrad.common.protocol import secagg_masks
from fedrad.common.protocol.messages import WEIGHT_KEY
from fedrad.common.protocol.secagg_masks import (
    FLOWER_MODULES,
    STREAM_LABEL,
    MaskRangeError,
    MaskSeedError,
    expand_masks,
    full_strength_masks_installed,
    install_full_strength_masks,
)
from fedrad.server.participation import FederationError, RoundGrid
from fedrad.server.rounds import ServerPlan, TrainOutcome
from fedrad.server.secure_aggregation import SecureRounds
from tests.fl_fixtures import (
    InProcessGrid,
    micro_foundation,
    micro_site,
    round_config,
    set_task_identity,
)

# the modules themselves (the packages above them export functions of the same names)
flower_mod, flower_workflow = (importlib.import_module(name) for name in FLOWER_MODULES)
SEED = bytes(range(32))
SHAPES = [(2, 3), (), (5,), (0,), (1, 1, 4)]


def reference(seed: bytes, num_range: int, count: int) -> np.ndarray:
    """The construction written out plainly: HKDF-SHA256 of the seed keys AES-256-CTR."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=STREAM_LABEL)
    encryptor = Cipher(algorithms.AES(hkdf.derive(seed)), modes.CTR(bytes(16))).encryptor()
    words = np.frombuffer(encryptor.update(bytes(8 * count)), dtype="<u8")
    return (words % np.uint64(num_range)).astype(np.int64)


# -- the expansion ---------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_masks_and_another_seed_others() -> None:
    first = expand_masks(SEED, 2**32, SHAPES)
    again = expand_masks(bytearray(SEED), 2**32, SHAPES)
    other = expand_masks(SEED[:-1] + b"\xff", 2**32, SHAPES)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0]) and not np.array_equal(first[2], other[2])


@pytest.mark.parametrize("count", [7, 100_003])  # one cipher call; several, the last partial
def test_the_stream_is_hkdf_keyed_aes_ctr_over_the_arrays_in_order(count: int) -> None:
    shapes = [(count - 5,), (), (2, 2)]
    masks = expand_masks(SEED, 1000, shapes)  # not a power of two: reduced modulo
    assert np.array_equal(np.concatenate([m.ravel() for m in masks]), reference(SEED, 1000, count))
    power = expand_masks(SEED, 2**20, shapes)  # a power of two: the low bits
    assert np.array_equal(np.concatenate([m.ravel() for m in power]), reference(SEED, 2**20, count))


def test_seeds_flower_folds_together_give_different_masks() -> None:
    """XOR the same 4 bytes into two 4-byte words: Flower's 32-bit fold cannot tell the seeds
    apart (nor a 44-byte pairwise key from its altered twin); the full-strength masks can."""
    rng = np.random.default_rng(7)
    for size in (32, 44):
        seed = rng.bytes(size)
        delta = b"\x5a\x0f\xc3\x81"
        twin = bytearray(seed)
        for at in (0, 4):
            twin[at : at + 4] = bytes(x ^ d for x, d in zip(twin[at : at + 4], delta, strict=True))
        twin = bytes(twin)
        assert twin != seed
        flower = [pseudo_rand_gen(s, 2**32, [(64,)])[0] for s in (seed, twin)]
        ours = [expand_masks(s, 2**32, [(64,)])[0] for s in (seed, twin)]
        assert np.array_equal(flower[0], flower[1])
        assert not np.array_equal(ours[0], ours[1])
        assert np.count_nonzero(ours[0] == ours[1]) <= 1  # unrelated, not nearly equal


@pytest.mark.parametrize("num_range", [2**32, 2**29, 1000, 3, 2**63])
def test_values_are_uniform_over_the_range(num_range: int) -> None:
    n = 1_000_000
    (values,) = expand_masks(os.urandom(32), num_range, [(n,)])
    assert values.min() >= 0 and values.max() < num_range
    if num_range <= 1000:  # every value occurs, about equally often
        counts = np.bincount(values, minlength=num_range)
        expected = n / num_range
        assert np.all(np.abs(counts - expected) < 6 * np.sqrt(expected))
    else:  # the range is spanned
        assert values.min() < num_range * 1e-4 and values.max() > num_range * (1 - 1e-4)
    sigma = num_range / np.sqrt(12 * n)  # of the mean of n uniform values
    assert abs(float(values.mean(dtype=np.float64)) - (num_range - 1) / 2) < 6 * sigma


def test_shapes_and_dtypes_are_flowers() -> None:
    ours = expand_masks(SEED, 2**32, SHAPES)
    flower = pseudo_rand_gen(SEED, 2**32, SHAPES)
    assert [m.shape for m in ours] == [m.shape for m in flower] == SHAPES
    assert all(m.dtype == np.int64 for m in ours + flower)
    assert ours[1].ndim == 0 and isinstance(ours[1], np.ndarray)
    assert expand_masks(SEED, 2**32, []) == []


@pytest.mark.parametrize("size", [0, 4, 16, 31])
def test_a_short_seed_is_refused_with_one_line(size: int) -> None:
    with pytest.raises(MaskSeedError, match=f"^SecAgg\\+ mask seed of {size} bytes refused") as e:
        expand_masks(SEED[:size], 2**32, [(3,)])
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


@pytest.mark.parametrize("num_range", [-1, 0, 1, 2**63 + 1, 2**64])
def test_a_range_outside_2_to_2_63_is_refused(num_range: int) -> None:
    with pytest.raises(MaskRangeError, match="must be in \\[2, 2\\*\\*63\\]") as e:
        expand_masks(SEED, num_range, [(3,)])
    assert isinstance(e.value, ValueError)


def test_the_smallest_seeds_and_the_range_limits_pass() -> None:
    for seed in (SEED, SEED + bytes(12)):  # a private seed, a pairwise key's length
        for num_range in (2, 2**63):
            (values,) = expand_masks(seed, num_range, [(100,)])
            assert values.min() >= 0 and values.max() < num_range


# -- installed in Flower's SecAgg+ ---------------------------------------------------------


def test_fedrads_secagg_apps_install_the_masks_in_flowers_mod_and_workflow() -> None:
    assert full_strength_masks_installed()
    assert flower_mod.pseudo_rand_gen is expand_masks
    assert flower_workflow.pseudo_rand_gen is expand_masks


def test_install_is_idempotent_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(flower_mod, "pseudo_rand_gen", pseudo_rand_gen)
    monkeypatch.setattr(flower_workflow, "pseudo_rand_gen", pseudo_rand_gen)
    monkeypatch.setattr(secagg_masks, "_logged", False)
    assert not full_strength_masks_installed()
    with caplog.at_level(logging.INFO, logger=secagg_masks.__name__):
        install_full_strength_masks()
        install_full_strength_masks()
    assert full_strength_masks_installed()
    lines = [r for r in caplog.records if r.name == secagg_masks.__name__]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO


# -- a real SecAgg+ round: Flower's secaggplus_mod at 3 sites, its workflow at the coordinator --


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[tuple[Path, list[SiteSpec]]]:
    set_task_identity()
    site_agent.clear_caches()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    foundation = micro_foundation(tmp_path)
    sites = [
        dataclasses.replace(micro_site(tmp_path, f"site_{i}", foundation, seed=i, n=12))
        for i in range(3)
    ]
    yield foundation, sites
    torch.set_num_threads(threads)


OFFSETS, EXAMPLES, CLIP = [0.9 * 0.05, -0.3 * 0.05, 0.01 * 0.05], [5, 50, 500], 0.05


def _signs(value: np.ndarray) -> np.ndarray:
    return np.where(np.arange(value.size) % 2, 1.0, -1.0).reshape(value.shape)


def fake_train(spec: SiteSpec, arrays: dict[str, np.ndarray], plan: object) -> SiteUpdate:
    """Site i moves every value by OFFSETS[i] (alternating sign) and weighs EXAMPLES[i]."""
    i = int(spec.site_id.split("_")[1])
    new = {k: (v + OFFSETS[i] * _signs(v)).astype(v.dtype) for k, v in arrays.items()}
    return SiteUpdate(new, EXAMPLES[i], {WEIGHT_KEY: float(EXAMPLES[i]), "epsilon": 1.0})


def secure_round(tmp_path: Path, foundation: Path, sites: list[SiteSpec]) -> TrainOutcome:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    plan = ServerPlan(
        run_dir=tmp_path / "run",
        foundation_dir=foundation,
        num_sites=3,
        rounds=1,
        round_config=round_config(planned_rounds=1, run_id="run"),
        secagg=True,
        secagg_clip=CLIP,
        secagg_max_weight=1000.0,
        connect_timeout_s=1.0,
        round_timeout_s=5.0,
    )
    grid = InProcessGrid(simulation_secure_client_app(sites), 3)
    arrays = trainable_arrays(cached_model(foundation))
    config = plan.config_for(1).to_record()
    return SecureRounds(plan).train(RoundGrid(grid, [1, 2, 3], round_no=1), 1, arrays, config)


def test_a_secagg_round_with_full_strength_masks_unmasks_to_the_fedavg_mean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, federation: tuple[Path, list[SiteSpec]]
) -> None:
    assert full_strength_masks_installed()
    calls: dict[str, list[int]] = {"site": [], "coordinator": []}

    def spy(side: str) -> Callable[..., list[np.ndarray]]:
        def expand(seed: bytes, num_range: int, dims: list[tuple[int, ...]]) -> list[np.ndarray]:
            calls[side].append(len(seed))
            return expand_masks(seed, num_range, dims)

        return expand

    monkeypatch.setattr(flower_mod, "pseudo_rand_gen", spy("site"))
    monkeypatch.setattr(flower_workflow, "pseudo_rand_gen", spy("coordinator"))
    monkeypatch.setattr(client_secagg, "train_site", fake_train)
    foundation, sites = federation
    outcome = secure_round(tmp_path, foundation, sites)
    # each site: its private mask and one pairwise mask per other site; the coordinator: the
    # three private masks (nobody dropped)
    assert sorted(calls["site"]) == [32] * 3 + [44] * 6
    assert calls["coordinator"] == [32] * 3
    assert outcome.arrays is not None and outcome.secagg is not None and outcome.failures == []
    arrays = trainable_arrays(cached_model(foundation))
    moved = sum(n * o for n, o in zip(EXAMPLES, OFFSETS, strict=True)) / sum(EXAMPLES)
    bound = outcome.secagg["error_bound"]
    for name, value in arrays.items():
        expected = value.astype(np.float64) + moved * _signs(value)
        assert np.abs(outcome.arrays[name] - expected).max() <= bound + 1e-7, name


def test_a_short_seed_shared_by_a_site_stops_the_round_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, federation: tuple[Path, list[SiteSpec]]
) -> None:
    """A malicious site hands out key shares of a 16-byte private seed (and masks with
    something else): the coordinator reconstructs the seed from the shares and refuses it."""
    handed_out = [os.urandom(16)]

    def urandom(size: int) -> bytes:  # the first site to share keys draws the short seed
        return handed_out.pop() if handed_out else os.urandom(size)

    def site_masks(seed: bytes, num_range: int, dims: list[tuple[int, ...]]) -> list[np.ndarray]:
        return expand_masks(seed * (-(-32 // len(seed))), num_range, dims)

    monkeypatch.setattr(flower_mod, "os", types.SimpleNamespace(urandom=urandom))
    monkeypatch.setattr(flower_mod, "pseudo_rand_gen", site_masks)
    monkeypatch.setattr(client_secagg, "train_site", fake_train)
    foundation, sites = federation
    with pytest.raises(
        FederationError, match=r"SecAgg\+ refused: SecAgg\+ mask seed of 16 bytes"
    ) as e:
        secure_round(tmp_path, foundation, sites)
    assert not handed_out and "\n" not in str(e.value)
