"""How well the model tells the change since a patient's prior study, against the rule that
compares the two studies' finding probabilities.

References are the site's own: the change its two reports state (`interval.report_changes`).
The model's change is the interval head's, kept to the finding head's decisions on the two
studies as the reading does (`client/reading/comparison.py`); the rule reads each study alone.
Only aggregate figures come out.
"""

from __future__ import annotations

import numpy as np
import torch

from fedrad.client.ingest.dataset import SiteStudies, encode_context, interval_targets
from fedrad.common.findings import FINDINGS
from fedrad.common.interval import CHANGES, decide_change, rule_change
from fedrad.common.model.radiology_model import RadiologyModel
from fedrad.common.tasks import Thresholds, suggestions


def interval_evaluation(
    model: RadiologyModel,
    studies: SiteStudies,
    *,
    thresholds: Thresholds | None = None,
    batch_size: int = 32,
) -> dict[str, object]:
    """Per finding and overall: the share of the studies with a prior (and a known change)
    whose change the model gets right, and the rule's; n counts those studies."""
    t = thresholds or Thresholds()
    priors = studies.priors()
    pairs = [(i, p) for i, p in enumerate(priors) if p is not None]
    truth = {i: interval_targets(studies.studies[p], studies.studies[i]) for i, p in pairs}
    pairs = [(i, p) for i, p in pairs if bool((truth[i] >= 0).any())]
    empty: dict[str, object] = {"pairs": 0, "model": None, "rule": None, "by_finding": {}}
    if not pairs:
        return empty
    rows = sorted({i for i, _ in pairs} | {p for _, p in pairs})
    probs, pooled = _read(model, studies, rows, batch_size)
    hits_model = {f: 0 for f in FINDINGS}
    hits_rule = {f: 0 for f in FINDINGS}
    counts = {f: 0 for f in FINDINGS}
    by_change = {c: [0, 0, 0] for c in CHANGES}  # n, model right, rule right
    for i, p in pairs:
        with torch.no_grad():
            logits = model.interval_logits(pooled[i][None], pooled[p][None])
        [table] = logits.float().softmax(-1).tolist()
        now = dict(zip(FINDINGS, map(float, probs[i]), strict=True))
        before = dict(zip(FINDINGS, map(float, probs[p]), strict=True))
        decided, earlier = suggestions(now, t), suggestions(before, t)
        for k, f in enumerate(FINDINGS):
            target = int(truth[i][k])
            if target < 0:
                continue
            said = decide_change(dict(zip(CHANGES, table[k], strict=True)), decided[f], earlier[f])
            ruled = rule_change(before[f], now[f], t.present)
            want = CHANGES[target]
            counts[f] += 1
            hits_model[f] += said == want
            hits_rule[f] += ruled == want
            by_change[want][0] += 1
            by_change[want][1] += said == want
            by_change[want][2] += ruled == want
    total = sum(counts.values())
    return {
        "pairs": len(pairs),
        "decisions": total,
        "model": sum(hits_model.values()) / total,
        "rule": sum(hits_rule.values()) / total,
        **present_in_either(by_change),
        "by_finding": {
            f: {
                "n": counts[f],
                "model": hits_model[f] / counts[f],
                "rule": hits_rule[f] / counts[f],
            }
            for f in FINDINGS
            if counts[f]
        },
        "by_change": {
            c: {"n": n, "model": m / n, "rule": r / n} for c, (n, m, r) in by_change.items() if n
        },
    }


def present_in_either(by_change: dict[str, list[int]]) -> dict[str, float | int | None]:
    """The same figures over the decisions about a finding present in either study (every
    change but "absent"): the overall figures are mostly "absent at both", which a model
    that never sees a finding gets right."""
    n = sum(v[0] for c, v in by_change.items() if c != "absent")
    model = sum(v[1] for c, v in by_change.items() if c != "absent")
    rule = sum(v[2] for c, v in by_change.items() if c != "absent")
    return {
        "decisions_present": n,
        "model_present": model / n if n else None,
        "rule_present": rule / n if n else None,
    }


def _read(
    model: RadiologyModel, studies: SiteStudies, rows: list[int], batch_size: int
) -> tuple[dict[int, np.ndarray], dict[int, torch.Tensor]]:
    """Finding probabilities and pooled features of each row, one kind of scan per batch."""
    tok, limit = model.tokenizer, model.config.max_prompt_tokens
    probs: dict[int, np.ndarray] = {}
    pooled: dict[int, torch.Tensor] = {}
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i in rows:
        by_shape.setdefault(studies.images[i].shape, []).append(i)
    model.eval()
    for group in by_shape.values():
        for lo in range(0, len(group), batch_size):
            chunk = group[lo : lo + batch_size]
            scans = torch.from_numpy(
                np.stack([studies.images[i] for i in chunk]).astype(np.float32)
            )
            contexts = [encode_context(tok, studies.studies[i].indication, limit) for i in chunk]
            presence, _ = model.diagnose(scans, contexts)
            features = model.pooled_features(scans)
            for k, i in enumerate(chunk):
                probs[i] = presence[k].numpy()
                pooled[i] = features[k]
    return probs, pooled
