"""The multimodal model: shapes, generation, checkpoints, and what trains."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedrad.common.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedrad.common.model.config import ModelConfig, preset
from fedrad.common.tasks import REPORT_PROMPT
from tests.model_fixtures import micro_examples, micro_model


def _batch(model, n: int = 4):  # type: ignore[no-untyped-def]
    ex = micro_examples(model, n)
    return tuple(torch.stack(col) for col in zip(*(ex[i] for i in range(n)), strict=True))


def test_forward_returns_per_example_losses() -> None:
    model = micro_model()
    lm_loss, finding_loss, logits = model(*_batch(model))
    assert lm_loss.shape == (4,) and finding_loss.shape == (4,) and logits.shape == (4, 6)
    assert torch.isfinite(lm_loss).all() and torch.isfinite(finding_loss).all()


def test_only_encoder_projector_heads_and_lora_train() -> None:
    model = micro_model()
    names = list(model.trainable_state())
    assert names and all(
        n.startswith(
            ("encoder.", "projector.", "volume_projector.", "head.", "side_head.", "interval_head.")
        )
        or "lora_" in n
        for n in names
    )
    assert "side_head.weight" in names
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("wte" in n for n in frozen)


def test_batched_generation_matches_one_by_one() -> None:
    model = micro_model().eval()
    images = torch.randn(2, 1, 32, 32)
    tok = model.tokenizer
    a = tok("indication: cough\n" + REPORT_PROMPT)["input_ids"]
    b = tok("indication: none\n" + REPORT_PROMPT)["input_ids"][:5]
    both = model.generate(images, [a, b], max_new_tokens=6)
    assert both[0] == model.generate(images[:1], [a], max_new_tokens=6)[0]
    assert both[1] == model.generate(images[1:], [b], max_new_tokens=6)[0]
    probs = model.finding_probabilities(images, [a, b])
    single = model.finding_probabilities(images[1:], [b])
    assert torch.allclose(probs[1:], single, atol=1e-5)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = micro_model()
    save_checkpoint(model, tmp_path / "ckpt", metadata={"round": 3})
    loaded = load_checkpoint(tmp_path / "ckpt")
    for (n1, p1), (n2, p2) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2)
    assert json.loads((tmp_path / "ckpt" / "metadata.json").read_text())["round"] == 3


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("missing_weights", "missing model.safetensors"),
        ("bad_version", "checkpoint format 99"),
        ("not_dir", "not a checkpoint directory"),
        ("bad_config", "unreadable config"),
        ("corrupt_weights", "unreadable model.safetensors"),
        ("corrupt_tokenizer", "unreadable tokenizer"),
        ("wrong_shape", "weights do not match the config (size mismatch for head.bias"),
    ],
)
def test_bad_checkpoints_give_one_line_errors(tmp_path: Path, damage: str, reason: str) -> None:
    model = micro_model()
    path = save_checkpoint(model, tmp_path / "ckpt")
    if damage == "missing_weights":
        (path / "model.safetensors").unlink()
    elif damage == "bad_version":
        meta = json.loads((path / "metadata.json").read_text())
        meta["format_version"] = 99
        (path / "metadata.json").write_text(json.dumps(meta))
    elif damage == "not_dir":
        path = path / "config.json"
    elif damage == "bad_config":
        (path / "config.json").write_text(json.dumps({"no_such_key": 1}))
    elif damage == "corrupt_weights":
        (path / "model.safetensors").write_bytes(b"truncated by a full disk")
    elif damage == "corrupt_tokenizer":
        tokenizer = json.loads((path / "tokenizer.json").read_text())
        tokenizer["model"]["vocab"] = "not a map"
        (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    else:
        state = load_file(str(path / "model.safetensors"))
        state["head.bias"] = torch.zeros(3)
        save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape(reason)) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_config_rejects_unknown_keys_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({"image_size": 64, "colour": "red"})
    with pytest.raises(ValueError, match="max_positions"):
        preset("tiny", max_positions=20)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_a_frozen_encoder_neither_trains_nor_travels_and_stays_frozen_on_reload(
    tmp_path: Path,
) -> None:
    model = micro_model(freeze_encoder=True)
    names = set(model.trainable_state())
    assert names and not any(n.startswith("encoder.") for n in names)
    assert any(n.startswith("projector.") for n in names) and any("lora_" in n for n in names)
    save_checkpoint(model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "metadata.json").read_text())
    assert set(meta["trainable"]) == names
    assert set(load_checkpoint(tmp_path / "ckpt").trainable_state()) == names


def test_the_side_loss_counts_only_stated_sides() -> None:
    """Examples without a stated side add nothing; a stated side adds its cross-entropy."""
    model = micro_model()
    batch = list(_batch(model))
    batch[-1] = torch.full_like(batch[-1], -1)
    _, without, _ = model(*batch)
    batch[-1] = torch.zeros_like(batch[-1])
    batch[-1][:, 1] = 2  # every study: effusion bilateral, the rest left
    _, with_sides, _ = model(*batch)
    assert torch.all(with_sides > without)
    presence, sides = model.diagnose(batch[0], [[1, 2, 3]] * 4)
    assert presence.shape == (4, 6) and sides.shape == (4, 5, 3)
    assert torch.allclose(sides.sum(dim=-1), torch.ones(4, 5))


def test_a_mixed_batch_routes_each_row_to_its_own_projector_per_sample() -> None:
    """Per-sample gradients stay exact in a batch of radiographs and volumes: a radiograph
    row gives the CT projector exactly zero gradient and the other way round."""
    from opacus import GradSampleModule

    from tests.model_fixtures import micro_examples

    model = micro_model(freeze_encoder=True)
    examples = micro_examples(model, 4, ct_every=2)  # rows 0 and 2 are CT
    batch = tuple(torch.stack(col) for col in zip(*(examples[i] for i in range(4)), strict=True))
    module = GradSampleModule(model)
    lm, finding, _ = module(*batch)
    (lm + finding).sum().backward()
    ct_rows, xr_rows = [0, 2], [1, 3]
    for name, p in model.named_parameters():
        if not name.startswith(("projector.", "volume_projector.")):
            continue
        per_row = p.grad_sample.flatten(1).abs().sum(dim=1)
        zero, nonzero = (xr_rows, ct_rows) if name.startswith("volume_") else (ct_rows, xr_rows)
        assert torch.all(per_row[zero] == 0), name
        assert torch.all(per_row[nonzero] > 0), name
    module._close()


def test_volumes_alone_are_read_by_the_volume_encoder() -> None:
    model = micro_model()
    volumes = torch.randn(2, 1, *model.config.volume_shape)
    presence, sides = model.diagnose(volumes, [[1, 2], [3]])
    assert presence.shape == (2, 6) and sides.shape[0] == 2
    assert not any(p.requires_grad for p in model.volume_encoder.parameters())
    prefix, _ = model.visual_prefix(volumes)
    assert prefix.shape[1] == model.config.num_prefix_tokens
