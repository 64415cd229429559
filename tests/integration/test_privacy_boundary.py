"""The privacy boundary end to end: a real ClientApp on a real (synthetic) hospital site, every
reply it sends for training and evaluation captured, plus every log line. None may contain a
header identifier, a report sentence, or an array outside the declared trainable set."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedrad.client.app import simulation_client_app
from fedrad.client.preprocess import PreprocessConfig
from fedrad.client.site_agent import SiteSpec, cached_model, declared_trainable, trainable_arrays
from fedrad.client.site_data import default_cache_dir, prepare_site
from fedrad.simulations.synth import generate_cohort
from tests.fl_fixtures import micro_foundation, round_config, set_task_identity

pytestmark = pytest.mark.integration


def _secrets(site: Path) -> set[str]:
    """Header identifiers and whole report sentences: what must never leave the site."""
    values: set[str] = set()
    for path in site.rglob("*"):
        if path.is_file() and "dicom" in path.parts:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            for key in ("PatientName", "PatientID", "AccessionNumber", "PatientBirthDate"):
                raw = str(ds.get(key, "") or "")
                values.update(p for p in raw.replace("^", " ").split() if len(p) > 3)
            values.add(str(ds.SOPInstanceUID))
    with (site / "reports.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            values.update(s.strip() for s in row["report"].split(".") if len(s.strip()) > 25)
    return values


def _message_text(message: Message) -> str:
    """Everything a reply carries, as text: record names, metric/config values, array bytes."""
    parts: list[str] = []
    content = message.content
    for name, record in content.items():
        parts.append(name)
        for key, value in record.items():
            parts.append(str(key))
            if isinstance(value, Array):
                parts.append(value.numpy().tobytes().decode("latin-1"))
            else:
                parts.append(str(value))
    return "\n".join(parts)


def test_replies_and_logs_hold_no_site_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    set_task_identity()
    caplog.set_level(logging.DEBUG)
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, sites=1, studies_per_site=12, seed=9, workers=1, image_size=128)
    site = cohort / "site_1"
    foundation = micro_foundation(tmp_path)
    config = PreprocessConfig(image_size=32)
    _, manifest = prepare_site(site, default_cache_dir(site), config=config, workers=1)
    spec = SiteSpec(
        site_id="site_1",
        foundation_dir=foundation,
        ledger_path=tmp_path / "state" / "ledger.jsonl",
        key_path=tmp_path / "state" / "ledger_key.pem",
        manifest=manifest,
        threads=1,
    )
    app = simulation_client_app([spec])
    model = cached_model(foundation)
    arrays = ArrayRecord({k: Array(v) for k, v in trainable_arrays(model).items()})
    replies = []
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        request = Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord(round_config().to_record())}),
            dst_node_id=1,
            message_type=kind,
        )
        context = Context(
            run_id=0,
            node_id=1,
            node_config={"partition-id": 0, "num-partitions": 1},
            state=RecordDict(),
            run_config={},
        )
        reply = app(request, context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        replies.append(reply)
    sent = replies[0].content["arrays"]
    assert set(sent.keys()) <= declared_trainable(foundation)
    assert all(np.isfinite(a.numpy()).all() for a in sent.values())
    secrets = _secrets(site)
    assert len(secrets) > 20
    haystacks = [_message_text(r) for r in replies] + [caplog.text]
    for text in haystacks:
        leaked = sorted(s for s in secrets if s in text)
        assert not leaked, leaked[:5]
