"""The SecAgg+ ClientApp's gate: at each protocol stage only that stage's own fields leave
(public keys, encrypted key shares, masked integer vectors shaped like the declared trainable
arrays, key shares), a training message outside SecAgg+ is refused before anything trains,
and an update SecAgg+ would clip silently is refused instead."""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from fedrad.client.federation import secure_aggregation as client_secagg
from fedrad.client.federation import site_agent
from fedrad.client.federation.privacy_mod import (
    PrivacyViolationError,
    SecureRequest,
    check_secure_reply,
)
from fedrad.client.federation.secure_aggregation import (
    check_secagg_range,
    simulation_secure_client_app,
)
from fedrad.client.federation.site_agent import SiteSpec, SiteUpdate, cached_model, trainable_arrays
from fedrad.common.protocol.messages import WEIGHT_KEY
from fedrad.common.protocol.secagg import SECAGG_RECORD
from fedrad.server.participation import RoundGrid
from fedrad.server.rounds import ServerPlan
from fedrad.server.secure_aggregation import SecureRounds
from tests.fl_fixtures import (
    InProcessGrid,
    micro_foundation,
    micro_site,
    round_config,
    set_task_identity,
)

GOOD_METRICS = {WEIGHT_KEY: 10.0, "epsilon": 1.0, "steps": 5.0}


@pytest.fixture(autouse=True)
def _setup() -> Iterator[None]:
    set_task_identity()
    site_agent.clear_caches()
    yield


def _fake_training(monkeypatch: pytest.MonkeyPatch, metrics: dict[str, float]) -> None:
    def fake_train(spec: SiteSpec, arrays: dict[str, np.ndarray], plan: object) -> SiteUpdate:
        moved = {k: (v + 0.001).astype(v.dtype) for k, v in arrays.items()}
        return SiteUpdate(moved, 10, dict(metrics))

    monkeypatch.setattr(client_secagg, "train_site", fake_train)


def _round(tmp_path: Path) -> tuple[InProcessGrid, frozenset[str]]:
    foundation = micro_foundation(tmp_path)
    specs = [micro_site(tmp_path, f"site_{i}", foundation, seed=i) for i in range(3)]
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    plan = ServerPlan(
        run_dir=run_dir,
        foundation_dir=foundation,
        num_sites=3,
        rounds=1,
        round_config=round_config(planned_rounds=1),
        secagg=True,
        secagg_clip=0.01,
        secagg_max_weight=100.0,
    )
    grid = InProcessGrid(simulation_secure_client_app(specs), 3)
    arrays = trainable_arrays(cached_model(foundation))
    SecureRounds(plan).train(
        RoundGrid(grid, [1, 2, 3], round_no=1), 1, arrays, plan.config_for(1).to_record()
    )
    return grid, site_agent.declared_trainable(foundation)


@pytest.fixture
def exchange(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, tuple[SecureRequest, Message]], frozenset[str]]:
    """Node 1's four SecAgg+ requests (as read before the app ran) and genuine replies."""
    _fake_training(monkeypatch, GOOD_METRICS)
    grid, declared = _round(tmp_path)
    requests = [m for m in grid.sent if m.metadata.dst_node_id == 1]
    replies = [r for r in grid.replies if r.metadata.src_node_id == 1]
    assert len(requests) == len(replies) == 4
    out = {}
    for request, reply in zip(requests, replies, strict=True):
        expected = SecureRequest.read(request)
        assert expected.stage is not None and not reply.has_error()
        out[expected.stage] = (expected, reply)
    return out, declared


def test_every_genuine_stage_reply_passes(exchange: tuple[dict, frozenset[str]]) -> None:
    stages, declared = exchange
    assert list(stages) == list(Stage.all())
    for expected, reply in stages.values():
        check_secure_reply(expected, reply, declared)


def _npy(array: np.ndarray) -> bytes:
    return ndarray_to_bytes(array)


def _pickled_object_array() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"patient": "Quackenbush"}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def _edit_secagg(reply: Message, field: str, value: object) -> None:
    reply.content[SECAGG_RECORD][field] = value  # type: ignore[index]


@pytest.mark.parametrize(
    ("stage", "edit", "match"),
    [
        (Stage.SETUP, lambda r: _edit_secagg(r, "note", "hello"), "hold exactly"),
        (Stage.SETUP, lambda r: _edit_secagg(r, Key.PUBLIC_KEY_1, b"MRN7730912"), "not a PEM"),
        (
            Stage.SETUP,
            lambda r: r.content.__setitem__("extra", ConfigRecord({"x": 1})),
            "records not allowed",
        ),
        (
            Stage.SHARE_KEYS,
            lambda r: _edit_secagg(r, Key.DESTINATION_LIST, [2, 99]),
            "names nodes the request did not",
        ),
        (
            Stage.SHARE_KEYS,
            lambda r: _edit_secagg(r, Key.CIPHERTEXT_LIST, [b"x" * 5000, b"y"]),
            "over 1024 bytes",
        ),
        (
            Stage.SHARE_KEYS,
            lambda r: _edit_secagg(r, Key.CIPHERTEXT_LIST, [b"x"]),
            "one encrypted share per destination",
        ),
        (
            Stage.COLLECT_MASKED_VECTORS,
            lambda r: _edit_secagg(
                r,
                Key.MASKED_PARAMETERS,
                [
                    _npy(np.array([1])),
                    *[
                        _npy(np.full(np.load(io.BytesIO(b)).shape, 0.001))
                        for b in r.content[SECAGG_RECORD][Key.MASKED_PARAMETERS][1:]
                    ],
                ],
            ),
            "is not integer",
        ),
        (
            Stage.COLLECT_MASKED_VECTORS,
            lambda r: _edit_secagg(
                r,
                Key.MASKED_PARAMETERS,
                [*r.content[SECAGG_RECORD][Key.MASKED_PARAMETERS][:-1], _npy(np.zeros(7, int))],
            ),
            "does not have its array's shape",
        ),
        (
            Stage.COLLECT_MASKED_VECTORS,
            lambda r: _edit_secagg(
                r, Key.MASKED_PARAMETERS, r.content[SECAGG_RECORD][Key.MASKED_PARAMETERS][:-1]
            ),
            "masked vectors for",
        ),
        (
            Stage.COLLECT_MASKED_VECTORS,
            lambda r: _edit_secagg(
                r,
                Key.MASKED_PARAMETERS,
                [_pickled_object_array(), *r.content[SECAGG_RECORD][Key.MASKED_PARAMETERS][1:]],
            ),
            "not a plain numeric array",
        ),
        (
            Stage.COLLECT_MASKED_VECTORS,
            lambda r: r.content["fitres.metrics"].__setitem__("per_study_loss", 0.3),
            "not whitelisted: per_study_loss",
        ),
        (
            Stage.COLLECT_MASKED_VECTORS,
            lambda r: r.content["fitres.metrics"].__setitem__("epsilon", "8.0 for MRN7730912"),
            "not a number",
        ),
        (
            Stage.COLLECT_MASKED_VECTORS,
            lambda r: r.content["fitres.status"].__setitem__("message", "Quackenbush^Theodora"),
            "Flower's own message",
        ),
        (
            Stage.COLLECT_MASKED_VECTORS,
            lambda r: r.content["fitres.parameters"].__setitem__(
                "0", Array(np.full(3, 0.001, np.float32))
            ),
            "plain arrays may not travel",
        ),
        (
            Stage.UNMASK,
            lambda r: _edit_secagg(r, Key.NODE_ID_LIST, [1, 2, 3, 42]),
            "names nodes the request did not",
        ),
        (
            Stage.UNMASK,
            lambda r: _edit_secagg(r, Key.SHARE_LIST, [b"s" * 2048] * 3),
            "over 1024 bytes",
        ),
    ],
)
def test_anything_a_stage_does_not_send_is_refused(
    exchange: tuple[dict, frozenset[str]], stage: str, edit: object, match: str
) -> None:
    stages, declared = exchange
    expected, reply = stages[stage]
    bad = copy.deepcopy(reply)
    edit(bad)  # type: ignore[operator]
    with pytest.raises(PrivacyViolationError, match=match):
        check_secure_reply(expected, bad, declared)


def test_the_masked_vectors_must_cover_exactly_the_declared_arrays(
    exchange: tuple[dict, frozenset[str]],
) -> None:
    stages, declared = exchange
    expected, reply = stages[Stage.COLLECT_MASKED_VECTORS]
    fewer = frozenset(sorted(declared)[:-1])  # a foundation that declares one array less
    with pytest.raises(PrivacyViolationError, match=f"not the {len(fewer)} declared"):
        check_secure_reply(expected, reply, fewer)


def _context(node: int = 1) -> Context:
    return Context(
        run_id=0,
        node_id=node,
        node_config={"partition-id": node - 1},
        state=RecordDict(),
        run_config={},
    )


def test_a_training_message_outside_secagg_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator cannot ask a SecAgg+ site for a plain update."""
    called: list[str] = []

    def must_not_train(*_args: object) -> SiteUpdate:
        called.append("trained")
        raise AssertionError("trained")

    monkeypatch.setattr(client_secagg, "train_site", must_not_train)
    foundation = micro_foundation(tmp_path)
    app = simulation_secure_client_app([micro_site(tmp_path, "site_0", foundation)])
    for kind, content in [
        (MessageType.TRAIN, RecordDict({"fitins.config": ConfigRecord({"x": 1})})),
        ("get_parameters", RecordDict({"getparametersins.config": ConfigRecord({})})),
        (MessageType.QUERY, RecordDict()),
    ]:
        message = Message(content, dst_node_id=1, message_type=kind)
        with pytest.raises(PrivacyViolationError, match=r"SecAgg\+ stage|not served"):
            app(message, _context())
    assert called == []


def test_a_leaky_update_never_leaves_and_failures_carry_no_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_training(monkeypatch, {**GOOD_METRICS, "max_pixel": 4095.0})
    grid, _ = _round(tmp_path)
    collect = [r for r in grid.replies if r.has_error()]
    assert len(collect) == 3 and all("max_pixel" in str(r.error.reason) for r in collect)
    assert not any(
        SECAGG_RECORD in r.content and Key.MASKED_PARAMETERS in r.content[SECAGG_RECORD]
        for r in grid.replies
        if not r.has_error()
    )

    def crash(*_args: object) -> SiteUpdate:
        raise ValueError("cannot read /data/Quackenbush^Theodora/img.dcm")

    monkeypatch.setattr(client_secagg, "train_site", crash)
    site_agent.clear_caches()
    grid, _ = _round(tmp_path / "again")
    errors = [str(r.error.reason) for r in grid.replies if r.has_error()]
    assert errors and all("Quackenbush" not in e and "ValueError" in e for e in errors)


# -- the range check before masking ------------------------------------------------------------

STATE = {"clipping_range": 0.1, "max_weight": 100.0, "target_range": 2**20}


def test_an_update_within_the_range_passes_and_reports_its_share() -> None:
    share = check_secagg_range([np.full(4, 0.15), np.full(2, -0.05)], 50, STATE)
    assert share == pytest.approx(0.75, rel=1e-5)  # 0.15 x 50 / 100 of 0.1


@pytest.mark.parametrize(
    ("updates", "weight", "state", "match"),
    [
        ([np.full(3, 0.25)], 50, STATE, "reaches 0.125 per value.*secagg-clip"),
        ([np.full(3, 0.01)], 150, STATE, "weight 150 exceeds the SecAgg\\+ max weight 100"),
        ([np.array([0.01, np.nan])], 50, STATE, "not finite"),
        ([np.full(3, 0.01)], 50, {}, "no SecAgg\\+ setup"),
    ],
)
def test_an_update_secagg_would_clip_is_refused(
    updates: list[np.ndarray], weight: int, state: dict, match: str
) -> None:
    with pytest.raises(site_agent.SiteRefusalError, match=match):
        check_secagg_range(updates, weight, state)
