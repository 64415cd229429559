"""The held-out split: deterministic, and never empty on either side for a site of two or more."""

from __future__ import annotations

import numpy as np
import pytest

from fedrad.client.ingest.dataset import SiteStudies, side_targets, split_held_out
from fedrad.client.ingest.site_data import CachedStudy
from fedrad.common.findings import FINDINGS


def _studies(ids: list[str]) -> SiteStudies:
    studies = [
        CachedStudy(
            study_id=i,
            image_file=f"images/{i}.npy",
            report="",
            indication="",
            labels={},
            sides={},
            nodule_size_mm=None,
            view="PA",
        )
        for i in ids
    ]
    return SiteStudies(studies, [np.zeros((1, 4, 4), np.float32) for _ in ids])


def _ids(part: SiteStudies) -> set[str]:
    return {s.study_id for s in part.studies}


@pytest.mark.parametrize("n", [2, 3, 5, 12, 40])
def test_both_sides_are_non_empty_for_every_small_site(n: int) -> None:
    for trial in range(50):
        ids = [f"s{trial}-{k}" for k in range(n)]
        train, held = split_held_out(_studies(ids), fraction=0.2)
        assert len(train) >= 1 and len(held) >= 1
        assert _ids(train) | _ids(held) == set(ids)
        assert not _ids(train) & _ids(held)


def test_split_is_by_study_id_not_by_order() -> None:
    ids = [f"study-{k}" for k in range(200)]
    _, held = split_held_out(_studies(ids), fraction=0.2)
    _, held_reversed = split_held_out(_studies(ids[::-1]), fraction=0.2)
    assert _ids(held) == _ids(held_reversed)
    assert 20 < len(held) < 60  # about a fifth


def test_a_single_study_trains() -> None:
    for name in ("a", "b", "c", "d", "e", "f", "g", "h"):
        train, held = split_held_out(_studies([name]), fraction=0.9)
        assert len(train) == 1 and len(held) == 0


def test_side_targets_are_the_stated_sides_of_findings_not_absent() -> None:
    labels = dict.fromkeys(FINDINGS, 0) | {"nodule": 1, "pleural_effusion": -1, "fracture": 1}
    sides = dict.fromkeys(FINDINGS) | {"nodule": "right", "pleural_effusion": "bilateral"}
    sides["pneumothorax"] = "left"  # absent: its side is not a target
    # LATERAL_ORDER: nodule, effusion, pneumothorax, consolidation, fracture (no side stated)
    assert side_targets(labels, sides).tolist() == [1, 2, -1, -1, -1]
