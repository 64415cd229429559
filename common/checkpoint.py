"""Building the model and saving/loading it as one self-contained directory.

Layout: `config.json` (ModelConfig), `lm_config.json` (the LM's own transformers config),
tokenizer files, `model.safetensors` (weights), `metadata.json` (versions, round, privacy summary,
format version). Loading uses safetensors only: no pickle ever runs from a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Final

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from fedrad.common.language_model import add_lora, build_from_config
from fedrad.common.model_config import ModelConfig
from fedrad.common.radiology_model import RadiologyModel
from fedrad.common.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

FORMAT_VERSION: Final[int] = 1
REQUIRED_FILES: Final[tuple[str, ...]] = (
    "config.json",
    "lm_config.json",
    "model.safetensors",
    "metadata.json",
    "tokenizer.json",
)


class CheckpointError(Exception):
    """A directory that is not a loadable fedrad checkpoint; the message says why."""


def build_model(config: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> RadiologyModel:
    """A fresh model: GPT-2 from config, LoRA added, encoder/projector/head initialised."""
    lm = build_from_config(config, tokenizer)
    return RadiologyModel(config, add_lora(lm, config), tokenizer)


def save_checkpoint(
    model: RadiologyModel, directory: Path, *, metadata: dict[str, Any] | None = None
) -> Path:
    """Writes to a temporary sibling and renames: a crash never leaves half a checkpoint."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        (tmp / "config.json").write_text(model.config.to_json())
        base = model.lm.get_base_model()
        (tmp / "lm_config.json").write_text(base.config.to_json_string())
        model.tokenizer.save_pretrained(str(tmp))
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        meta = {
            "format_version": FORMAT_VERSION,
            "torch": torch.__version__,
            "trainable": sorted(model.trainable_state()),
            **(metadata or {}),
        }
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_metadata(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "metadata.json").read_text())


def load_checkpoint(directory: Path) -> RadiologyModel:
    """Rebuilds the exact model; CheckpointError with a one-line reason when it cannot."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"not a checkpoint directory: {directory}")
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{directory}: missing {', '.join(missing)}")
    try:
        meta = read_metadata(directory)
        config = ModelConfig.from_dict(json.loads((directory / "config.json").read_text()))
    except (json.JSONDecodeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{directory}: unreadable config or metadata ({exc})") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory}: checkpoint format {meta.get('format_version')!r}, "
            f"this fedrad reads format {FORMAT_VERSION}"
        )
    try:
        tokenizer = load_tokenizer(directory)
        lm_fields = json.loads((directory / "lm_config.json").read_text())
        lm_config = AutoConfig.for_model(**lm_fields)
        lm = AutoModelForCausalLM.from_config(lm_config)
        model = RadiologyModel(config, add_lora(lm, config), tokenizer)
        state = load_file(str(directory / "model.safetensors"))
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{directory}: cannot rebuild the model ({exc})") from exc
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{directory}: weights do not match the config "
            f"({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected)"
        )
    model.eval()
    return model
