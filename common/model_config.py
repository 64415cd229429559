"""The model's configuration: one frozen dataclass, every default explained, presets by name.

nanoGPT's GPTConfig style: the config is the single source of truth for shapes, so a checkpoint
directory's `config.json` rebuilds exactly the same modules.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

PresetName = Literal["tiny", "base"]


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
    lm_source: str = "config"  # "config" = GPT-2 built from the fields below; else a local path
    vocab_size: int = 2048  # BPE vocabulary trained on a public report corpus
    lm_layers: int = 2  # GPT-2 blocks
    lm_heads: int = 4  # attention heads
    lm_dim: int = 128  # hidden width
    max_positions: int = 192  # prefix + prompt + target tokens
    max_prompt_tokens: int = 48  # indication + suggestions or question, truncated beyond
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
        for value in (self.image_size, self.lora_rank, self.vocab_size):
            if value <= 0:
                raise ValueError("sizes must be positive")

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
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return replace(PRESETS[name], **overrides)
