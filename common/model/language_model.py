"""The causal language model: built from a GPT-2 config, or loaded from a local directory.

Architecture-agnostic on purpose: the multimodal model only uses `get_input_embeddings`,
`inputs_embeds`, hidden states and `generate`, which every transformers causal LM provides.
LoRA targets are chosen per architecture from the module names the model actually has.
"""

from __future__ import annotations

import logging
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedrad.common.model.config import ModelConfig

logger = logging.getLogger(__name__)

LORA_TARGETS_BY_ARCH: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt_neox": ("query_key_value", "dense"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense"),
}


def build_from_config(config: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> GPT2LMHeadModel:
    """A GPT-2 with untied embeddings (Opacus ghost clipping refuses tied ones)."""
    lm_config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.max_positions,
        n_embd=config.lm_dim,
        n_layer=config.lm_layers,
        n_head=config.lm_heads,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return GPT2LMHeadModel(lm_config)


def load_pretrained(path: Path) -> PreTrainedModel:
    """Loads a local Hugging Face causal-LM directory; never reaches the network."""
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)


def lora_targets(model: PreTrainedModel, requested: tuple[str, ...]) -> list[str]:
    """The requested target names that exist in this model, or the architecture's defaults."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [t for t in requested if t in names]
    if found:
        return found
    arch = getattr(model.config, "model_type", "")
    defaults = [t for t in LORA_TARGETS_BY_ARCH.get(arch, ()) if t in names]
    if not defaults:
        raise ValueError(f"no LoRA target modules found for architecture {arch!r}")
    return defaults


def add_lora(model: PreTrainedModel, config: ModelConfig) -> PeftModel:
    """Freezes the base LM and adds LoRA adapters: the only LM weights that train and travel."""
    targets = lora_targets(model, config.lora_targets)
    is_gpt2 = getattr(model.config, "model_type", "") == "gpt2"
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=targets,
        fan_in_fan_out=is_gpt2,  # GPT-2's Conv1D stores weights transposed
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    logger.info("LoRA on %s", ",".join(targets))
    return peft_model
