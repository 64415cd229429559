"""A pretrained base's LoRA warms up on public text once (cached by base hash and recipe): only
the adapter moves, the loss falls, and a second foundation reuses the stored adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedrad.common.model.checkpoint import build_model
from fedrad.common.model.foundation import FoundationRecipe, build_foundation
from tests.common.test_base_lm import llama_dir, path_config

RECIPE = FoundationRecipe(
    corpus_reports=40,
    encoder_steps=0,
    volume_steps=0,
    base_lm_steps=12,
    base_lm_batch_size=4,
    base_lm_lr=1e-2,
)


def test_base_lora_warms_up_on_public_text_once(tmp_path: Path) -> None:
    config = path_config(llama_dir(tmp_path / "llama", vocab=300))
    fresh = build_model(config)
    model, _ = build_foundation(config, recipe=RECIPE, cache_root=tmp_path / "cache")
    before = dict(fresh.lm.named_parameters())
    after = dict(model.lm.named_parameters())
    moved = [n for n in after if not torch.equal(after[n], before[n])]
    assert moved and all("lora_" in n for n in moved)  # the base stayed as shipped
    (stored,) = (tmp_path / "cache").glob("base-lora-*")
    record = json.loads((stored / "fedrad_foundation.json").read_text())
    assert record["warm_up_loss"]["last"] < record["warm_up_loss"]["first"]
    assert record["base_lm_sha256"] == model.config.lm_sha256

    again, _ = build_foundation(config, recipe=RECIPE, cache_root=tmp_path / "cache", seed=3)
    for name, tensor in again.lm.named_parameters():
        if "lora_" in name:
            assert torch.equal(tensor, after[name])
    assert len(list((tmp_path / "cache").glob("base-lora-*"))) == 1


def test_warm_up_can_be_turned_off_and_bad_recipes_are_refused(tmp_path: Path) -> None:
    config = path_config(llama_dir(tmp_path / "llama", vocab=300))
    off = FoundationRecipe(encoder_steps=0, volume_steps=0, base_lm_steps=0)
    model, _ = build_foundation(config, recipe=off, cache_root=tmp_path / "cache")
    assert all(
        not p.any() for n, p in model.lm.named_parameters() if "lora_B" in n
    )  # LoRA as peft starts it: B = 0
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("base-lora-*"))
    with pytest.raises(ValueError, match="warm-up"):
        FoundationRecipe(base_lm_steps=-1)
