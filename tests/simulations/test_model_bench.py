"""The model benchmark's batches are the batches training builds, for each kind of site."""

from __future__ import annotations

import pytest

from fedrad.simulations.benchmarks.model import BATCH_KINDS, BenchError, _batch, run_bench
from tests.model_fixtures import micro_model


@pytest.mark.parametrize("kind", BATCH_KINDS)
def test_a_bench_batch_runs_through_the_model(kind: str) -> None:
    model = micro_model(freeze_encoder=True, max_positions=128)  # the bench's 96 tokens + prefix
    batch = _batch(model.config, len(model.tokenizer), 4, 0, kind)
    lm_loss, finding_loss, logits = model(*batch)
    assert lm_loss.shape == finding_loss.shape == (4,) and logits.shape == (4, 6)
    expected = {"radiograph": {0}, "CT": {1}, "mixed": {0, 1}}[kind]
    assert set(batch[2].tolist()) == expected


def test_an_unknown_batch_kind_is_refused() -> None:
    with pytest.raises(BenchError, match="unknown batch kind"):
        run_bench(["tiny"], kind="MR")
