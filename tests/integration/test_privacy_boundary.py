"""The privacy boundary end to end: a real ClientApp on a real (synthetic) hospital site, every
reply it sends for training and evaluation captured, plus every log line. None may contain a
header identifier, a report sentence, or an array outside the declared trainable set. Under
SecAgg+ the same holds for every protocol message, and the coordinator cannot read one site's
update from what it receives."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import Key

from fedrad.client.federation import secure_aggregation as client_secagg
from fedrad.client.federation import site_agent
from fedrad.client.federation.app import simulation_client_app
from fedrad.client.federation.secure_aggregation import simulation_secure_client_app
from fedrad.client.federation.site_agent import (
    SiteSpec,
    SiteUpdate,
    cached_model,
    declared_trainable,
    trainable_arrays,
)
from fedrad.client.ingest.site_data import default_cache_dir, prepare_site
from fedrad.common.model.preprocess import PreprocessConfig
from fedrad.common.protocol.secagg import SECAGG_RECORD, array_order
from fedrad.common.run_dir import read_metrics
from fedrad.common.synthetic.cohort import generate_cohort
from fedrad.server.app import run_server
from fedrad.server.rounds import RunBook, ServerPlan
from tests.fl_fixtures import InProcessGrid, micro_foundation, round_config, set_task_identity

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


def test_secagg_messages_hold_no_site_data_and_no_site_update(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three synthetic hospitals in one SecAgg+ round (training and evaluation): every message
    their ClientApps send, and every log line, holds no header identifier or report sentence;
    no training message holds a float array or a site's update in any form; and what the
    coordinator holds of one site (its masked vectors) says nothing about that site's update,
    while the sum of all of them unmasks to their weighted mean."""
    set_task_identity()
    site_agent.clear_caches()
    caplog.set_level(logging.DEBUG)
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, sites=3, studies_per_site=12, seed=9, workers=1, image_size=128)
    foundation = micro_foundation(tmp_path)
    specs = []
    for index in (1, 2, 3):
        site = cohort / f"site_{index}"
        _, manifest = prepare_site(
            site, default_cache_dir(site), config=PreprocessConfig(image_size=32), workers=1
        )
        specs.append(
            SiteSpec(
                site_id=f"site_{index}",
                foundation_dir=foundation,
                ledger_path=tmp_path / f"state_{index}" / "ledger.jsonl",
                key_path=tmp_path / f"state_{index}" / "ledger_key.pem",
                manifest=manifest,
                threads=1,
            )
        )
    updates: dict[str, dict[str, np.ndarray]] = {}
    weights: dict[str, int] = {}
    real_train = client_secagg.train_site

    def spy(spec: SiteSpec, arrays: dict[str, np.ndarray], plan: object) -> SiteUpdate:
        update = real_train(spec, arrays, plan)  # type: ignore[arg-type]
        updates[spec.site_id] = {k: update.arrays[k] - arrays[k] for k in arrays}
        weights[spec.site_id] = update.num_examples
        return update

    monkeypatch.setattr(client_secagg, "train_site", spy)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    plan = ServerPlan(
        run_dir=run_dir,
        foundation_dir=foundation,
        num_sites=3,
        rounds=1,
        round_config=round_config(planned_rounds=1, run_id="boundary"),
        secagg=True,
    )
    grid = InProcessGrid(simulation_secure_client_app(specs), 3)
    assert run_server(grid, plan) == 1
    [record] = read_metrics(run_dir)
    assert record["failures"] == [] and record["secagg"]["sites_summed"] == 3
    assert len(grid.replies) == 3 * 5  # four SecAgg+ stages and one evaluation per site

    secrets = set().union(*(_secrets(cohort / f"site_{i}") for i in (1, 2, 3)))
    assert len(secrets) > 60
    for text in [_message_text(r) for r in grid.replies] + [caplog.text]:
        leaked = sorted(s for s in secrets if s in text)
        assert not leaked, leaked[:5]

    order = array_order(declared_trainable(foundation))
    clip = record["secagg"]["clipping_range"]
    levels = int(record["secagg"]["quantization_range"])
    masked: dict[int, list[np.ndarray]] = {}
    for reply in grid.replies:
        assert all(len(a) == 0 for a in reply.content.array_records.values())  # no floats
        if reply.metadata.message_type != MessageType.TRAIN:
            continue
        raw = b"".join(
            item
            for record_ in reply.content.config_records.values()
            for value in record_.values()
            for item in (value if isinstance(value, list) else [value])
            if isinstance(item, bytes)
        )
        for update in updates.values():
            for name in order[:3]:  # the update's bytes, as float32 or float64, are nowhere
                assert update[name].astype(np.float32).tobytes()[:64] not in raw
                assert update[name].astype(np.float64).tobytes()[:64] not in raw
        secagg = reply.content.config_records[SECAGG_RECORD]
        if Key.MASKED_PARAMETERS in secagg:
            vectors = [np.load(io.BytesIO(b)) for b in secagg[Key.MASKED_PARAMETERS]]
            masked[reply.metadata.src_node_id] = vectors
    assert sorted(masked) == [1, 2, 3]
    for node, vectors in masked.items():
        update = updates[f"site_{node}"]
        true = np.concatenate([update[name].ravel() for name in order])
        seen = np.concatenate([v.ravel() for v in vectors[1:]]).astype(np.float64)
        assert np.all((vectors[1] >= 0) & (vectors[1] < 2**32))
        # decoded as the coordinator would decode a sum, one site's vector is noise
        decoded = seen * (2 * clip / levels) - clip
        assert abs(np.corrcoef(decoded, true)[0, 1]) < 0.1
        # off by several times the whole range (a uniform mask), not by a quantization step
        assert np.median(np.abs(decoded - true)) > 3 * clip > 3 * np.abs(true).max()
    # all of them together unmask to the weighted mean of the sites' updates
    start = RunBook(run_dir, foundation)._load_arrays(foundation)
    after = RunBook(run_dir, foundation).resume_point().arrays
    total = sum(weights.values())
    for name in order:
        mean = sum(weights[s] * updates[s][name].astype(np.float64) for s in updates) / total
        slack = record["secagg"]["error_bound"] + 2 * np.spacing(np.abs(after[name]))
        assert np.all(np.abs(after[name] - start[name] - mean) <= slack), name
