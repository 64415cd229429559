"""Building the model and saving/loading it as one self-contained directory.

Layout: `config.json` (ModelConfig), `lm_config.json` (the LM's own transformers config),
tokenizer files, `model.safetensors` (weights), `metadata.json` (versions, round, privacy summary,
format version). Loading uses safetensors only: no pickle ever runs from a checkpoint.

Over a pretrained base LM (`ModelConfig.pretrained_lm`) the checkpoint stays small: the frozen
base weights are left out, `metadata.json` names the base (`base_lm`: source, package, file,
path, sha256) and loading finds it on this machine and checks its hash (`common/model/base_lm.py`).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from fedrad.common.cache import staged_directory
from fedrad.common.model.base_lm import BaseLMError, load_base, load_base_tokenizer
from fedrad.common.model.config import ModelConfig
from fedrad.common.model.language_model import add_lora, build_from_config
from fedrad.common.model.radiology_model import RadiologyModel
from fedrad.common.model.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

FORMAT_VERSION: Final[int] = 5
"""2: checkpoints over a pretrained base omit its weights; 3: the language model was trained
on the findings prompt (`tasks.PROMPT_FORMAT` 2), which inference builds from the head; 4: a
volume encoder and projector (CT) beside the radiograph ones; 5: an interval head (the change
since the patient's prior study)."""
READABLE_FORMATS: Final[frozenset[int]] = frozenset({FORMAT_VERSION})
RETRAIN_HINT: Final[str] = (
    "it predates the parts this fedrad serves (the CT encoder and projector, the interval "
    "head that compares a study with the patient's prior), so its trainable set differs "
    "from a current federation's: train it again "
    "(fedrad-sim run, fedrad-sim centralized, or a federation with fedrad-coordinator)"
)
REQUIRED_FILES: Final[tuple[str, ...]] = (
    "config.json",
    "lm_config.json",
    "model.safetensors",
    "metadata.json",
    "tokenizer.json",
)


class CheckpointError(Exception):
    """A directory that is not a loadable fedrad checkpoint; the message says why."""


def build_model(
    config: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> RadiologyModel:
    """A fresh model with LoRA added and encoder/projector/head initialised: a GPT-2 from the
    config (which needs the public `tokenizer`), or the config's pretrained base with its own
    tokenizer (its verified hash is recorded in the model's config)."""
    if config.pretrained_lm:
        lm, config = load_base(config)
        return RadiologyModel(config, add_lora(lm, config), load_base_tokenizer(config))
    if tokenizer is None:
        raise ValueError("a from-config language model needs the public tokenizer")
    lm = build_from_config(config, tokenizer)
    return RadiologyModel(config, add_lora(lm, config), tokenizer)


def is_base_weight(name: str, config: ModelConfig) -> bool:
    """A frozen pretrained base weight: found on the machine, never stored in a checkpoint."""
    return config.pretrained_lm and name.startswith("lm.") and "lora_" not in name


def base_lm_metadata(config: ModelConfig) -> dict[str, str] | None:
    if not config.pretrained_lm:
        return None
    return {
        "source": config.lm_source,
        "package": config.lm_package,
        "file": config.lm_file,
        "path": config.lm_path,
        "sha256": config.lm_sha256,
    }


def save_checkpoint(
    model: RadiologyModel, directory: Path, *, metadata: dict[str, Any] | None = None
) -> Path:
    """Writes to a temporary sibling and renames: a crash never leaves half a checkpoint."""
    directory = Path(directory)
    with staged_directory(directory, replace=True) as tmp:
        (tmp / "config.json").write_text(model.config.to_json())
        base = model.lm.get_base_model()
        (tmp / "lm_config.json").write_text(base.config.to_json_string())
        model.tokenizer.save_pretrained(str(tmp))
        state = {
            k: v.detach().cpu().contiguous()
            for k, v in model.state_dict().items()
            if not is_base_weight(k, model.config)
        }
        save_file(state, str(tmp / "model.safetensors"))
        meta = {
            "format_version": FORMAT_VERSION,
            "torch": torch.__version__,
            "trainable": sorted(model.trainable_state()),
            "base_lm": base_lm_metadata(model.config),
            **(metadata or {}),
        }
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return directory


def read_metadata(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "metadata.json").read_text())


def read_model_config(directory: Path) -> ModelConfig:
    """A checkpoint's model config, without building the model."""
    return ModelConfig.from_dict(json.loads((Path(directory) / "config.json").read_text()))


def check_format(directory: Path, meta: dict[str, Any]) -> None:
    """CheckpointError unless this fedrad serves the checkpoint's format as it was trained."""
    version = meta.get("format_version")
    if version in READABLE_FORMATS:
        return
    if isinstance(version, int) and not isinstance(version, bool) and version < FORMAT_VERSION:
        raise CheckpointError(f"{directory}: checkpoint format {version}: {RETRAIN_HINT}")
    raise CheckpointError(
        f"{directory}: checkpoint format {version!r}, "
        f"this fedrad reads format {', '.join(map(str, sorted(READABLE_FORMATS)))}"
    )


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
        config = read_model_config(directory)
    except (json.JSONDecodeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{directory}: unreadable config or metadata ({exc})") from exc
    check_format(directory, meta)
    try:  # the weights file first: a corrupt one must not wait for a base LM to load
        state = load_file(str(directory / "model.safetensors"))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{directory}: unreadable model.safetensors ({exc})") from exc
    try:
        tokenizer = load_tokenizer(directory)
    except Exception as exc:  # the Rust tokenizers library raises a bare Exception
        raise CheckpointError(f"{directory}: unreadable tokenizer ({exc})") from exc
    try:
        if config.pretrained_lm:
            lm, config = load_base(config)  # checks the base's hash against config.json
        else:
            lm_fields = json.loads((directory / "lm_config.json").read_text())
            lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**lm_fields))
        model = RadiologyModel(config, add_lora(lm, config), tokenizer)
    except BaseLMError as exc:
        raise CheckpointError(f"{directory}: {exc}") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{directory}: cannot rebuild the model ({exc})") from exc
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor whose shape the config does not give
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{directory}: weights do not match the config ({first})") from exc
    missing = [k for k in result.missing_keys if not is_base_weight(k, config)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{directory}: weights do not match the config "
            f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected)"
        )
    model.eval()
    return model


def write_checkpoint_from(
    source: Path,
    arrays: Mapping[str, np.ndarray],
    directory: Path,
    *,
    metadata: dict[str, Any],
) -> Path:
    """`source` with its trainable tensors replaced by `arrays`, written without building
    the model: a coordinator checkpoints rounds without ever loading a pretrained base."""
    source, directory = Path(source), Path(directory)
    check_format(source, read_metadata(source))  # never relabel an old model as the new format
    state = load_file(str(source / "model.safetensors"))
    declared = set(read_metadata(source).get("trainable") or ())
    if set(arrays) != declared:
        raise CheckpointError("arrays do not match the checkpoint's declared trainable set")
    for name, value in arrays.items():
        if name not in state or tuple(state[name].shape) != tuple(np.shape(value)):
            raise CheckpointError(f"array {name} does not fit {source}")
        state[name] = torch.from_numpy(np.ascontiguousarray(value)).to(state[name].dtype)
    with staged_directory(directory, replace=True) as tmp:
        for item in source.iterdir():
            if item.is_file() and item.name not in ("model.safetensors", "metadata.json"):
                shutil.copy2(item, tmp / item.name)
        save_file(state, str(tmp / "model.safetensors"))
        meta = {**read_metadata(source), "torch": torch.__version__, **metadata}
        meta["format_version"] = FORMAT_VERSION
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return directory
