"""The privacy mod: only declared trainable arrays and whitelisted aggregates leave a site;
anything else raises before sending, and failure messages carry no data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedrad.client.federation import app as client_app_module
from fedrad.client.federation import site_agent
from fedrad.client.federation.app import build_client_app
from fedrad.client.federation.privacy_mod import PrivacyViolationError, check_reply
from fedrad.client.federation.site_agent import SiteRefusalError, SiteSpec, SiteUpdate
from tests.fl_fixtures import round_config, set_task_identity


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity()


DECLARED = frozenset({"encoder.w", "head.b"})
GOOD_METRICS = {"num-examples": 10.0, "steps": 5.0, "epsilon": 0.5}


def _arrays(**shapes: tuple[int, ...]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.zeros(v, np.float32)) for k, v in shapes.items()})


def _request(message_type: str = MessageType.TRAIN) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(
                {
                    "encoder.w": Array(np.zeros((2, 2), np.float32)),
                    "head.b": Array(np.zeros(3, np.float32)),
                }
            ),
            "config": ConfigRecord(round_config().to_record()),
        }
    )
    return Message(content, dst_node_id=1, message_type=message_type)


def _reply(request: Message, **records: object) -> Message:
    return Message(RecordDict(records), reply_to=request)  # type: ignore[arg-type]


def _train_reply(request: Message, **over: object) -> Message:
    records: dict[str, object] = {
        "arrays": ArrayRecord(
            {
                "encoder.w": Array(np.ones((2, 2), np.float32)),
                "head.b": Array(np.ones(3, np.float32)),
            }
        ),
        "metrics": MetricRecord(GOOD_METRICS),
        "site": ConfigRecord({"site-id": "site_a"}),
    }
    records.update(over)
    return _reply(request, **{k: v for k, v in records.items() if v is not None})


def test_a_proper_reply_passes() -> None:
    request = _request()
    check_reply(request, _train_reply(request), DECLARED)
    evaluation = _request(MessageType.EVALUATE)
    check_reply(
        evaluation,
        _reply(evaluation, metrics=MetricRecord({"num-examples": 4.0, "macro_auroc": 0.7})),
        DECLARED,
    )


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"metrics": MetricRecord({**GOOD_METRICS, "per_study_loss": 0.3})}, "not whitelisted"),
        # the training loss is computed on private records and no mechanism covers it
        ({"metrics": MetricRecord({**GOOD_METRICS, "train_loss": 0.3})}, "not whitelisted"),
        ({"metrics": MetricRecord({**GOOD_METRICS, "steps": [1.0, 2.0]})}, "list"),
        (
            {"arrays": _arrays(**{"encoder.w": (2, 2), "head.b": (3,), "lm.wte": (5, 2)})},
            "not declared trainable: lm.wte",
        ),
        ({"arrays": _arrays(**{"encoder.w": (4,), "head.b": (3,)})}, "changed shape"),
        ({"site": ConfigRecord({"site-id": "a", "data-dir": "/data/Quackenbush"})}, "not allowed"),
        ({"extra": ConfigRecord({"note": "x"})}, "not allowed"),
    ],
)
def test_anything_else_is_refused(override: dict[str, object], match: str) -> None:
    request = _request()
    with pytest.raises(PrivacyViolationError, match=match):
        check_reply(request, _train_reply(request, **override), DECLARED)


@pytest.mark.parametrize("key", ["bleu4", "n_questions", "eval_seconds", "n_reports"])
def test_evaluation_figures_outside_the_noised_families_are_refused(key: str) -> None:
    """Figures no noised count stands behind (and a timing) do not leave."""
    request = _request(MessageType.EVALUATE)
    reply = _reply(request, metrics=MetricRecord({"num-examples": 4.0, key: 0.5}))
    with pytest.raises(PrivacyViolationError, match="not whitelisted"):
        check_reply(request, reply, DECLARED)


def test_evaluation_replies_carry_no_arrays_and_only_eval_metrics() -> None:
    request = _request(MessageType.EVALUATE)
    with pytest.raises(PrivacyViolationError, match="may not carry arrays"):
        check_reply(request, _train_reply(request), DECLARED)
    with pytest.raises(PrivacyViolationError, match="not whitelisted"):
        check_reply(request, _reply(request, metrics=MetricRecord({"noise_x": 1.0})), DECLARED)


def test_other_message_types_are_refused() -> None:
    request = _request("query")
    with pytest.raises(PrivacyViolationError, match="not allowed"):
        check_reply(request, _reply(request, metrics=MetricRecord({"num-examples": 1.0})), DECLARED)


# -- wired into the ClientApp ------------------------------------------------------------------


@pytest.fixture
def app_and_spec(tmp_path: Path) -> tuple[object, SiteSpec]:
    site_agent.clear_caches()
    foundation = tmp_path / "foundation"
    foundation.mkdir()
    (foundation / "metadata.json").write_text(json.dumps({"trainable": sorted(DECLARED)}))
    spec = SiteSpec(
        site_id="site_a",
        foundation_dir=foundation,
        ledger_path=tmp_path / "ledger.jsonl",
        key_path=tmp_path / "key.pem",
        manifest=tmp_path / "manifest.json",
    )
    return build_client_app(lambda _context: spec), spec


def _context() -> Context:
    return Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_the_client_app_refuses_to_send_a_leaky_update(
    app_and_spec: tuple[object, SiteSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, _ = app_and_spec
    arrays = {"encoder.w": np.ones((2, 2), np.float32), "head.b": np.ones(3, np.float32)}

    def leaky(spec: SiteSpec, global_arrays: object, plan: object) -> SiteUpdate:
        return SiteUpdate(arrays, 10, {**GOOD_METRICS, "max_pixel": 4095.0})

    monkeypatch.setattr(client_app_module, "train_site", leaky)
    with pytest.raises(PrivacyViolationError, match="max_pixel"):
        app(_request(), _context())  # type: ignore[operator]

    def honest(spec: SiteSpec, global_arrays: object, plan: object) -> SiteUpdate:
        return SiteUpdate(arrays, 10, dict(GOOD_METRICS))

    monkeypatch.setattr(client_app_module, "train_site", honest)
    reply = app(_request(), _context())  # type: ignore[operator]
    assert not reply.has_error()
    assert set(reply.content["arrays"].keys()) == DECLARED


def test_failures_go_back_without_data(
    app_and_spec: tuple[object, SiteSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, _ = app_and_spec

    def crash(*_args: object) -> SiteUpdate:
        raise ValueError("cannot read /data/Quackenbush^Theodora/img.dcm")

    monkeypatch.setattr(client_app_module, "train_site", crash)
    reply = app(_request(), _context())  # type: ignore[operator]
    assert reply.has_error()
    assert "Quackenbush" not in str(reply.error.reason)
    assert "ValueError" in str(reply.error.reason)

    def refuse(*_args: object) -> SiteUpdate:
        raise SiteRefusalError("privacy budget exhausted: epsilon 8.000 spent of 8.000")

    monkeypatch.setattr(client_app_module, "train_site", refuse)
    reply = app(_request(), _context())  # type: ignore[operator]
    assert reply.has_error()
    assert str(reply.error.reason).startswith("refused: privacy budget exhausted")
