"""The starting model every run shares: a language model and an image encoder trained on public
data only.

Nothing can be downloaded here, so a from-config model would start as noise. The coordinator
trains both once, non-privately, on public material (radlabels' shipped reports, the open
generator's prose and labelled images in a seed namespace no cohort uses), as a real federation
starts from a public LLM and a public CXR encoder: DP training then only grounds the language in
the image (projector, head, LoRA) while the encoder stays frozen and never travels. Each part is
cached by content hash. What each part buys: docs/results/model.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedrad.common.cache import cache_root, publish_once
from fedrad.common.grounding import report_target, tidy_report
from fedrad.common.labeling.labeler import label_report
from fedrad.common.model.base_lm import locate
from fedrad.common.model.checkpoint import build_model
from fedrad.common.model.config import ModelConfig
from fedrad.common.model.language_model import add_lora, build_from_config, load_pretrained
from fedrad.common.model.public_images import PUBLIC_SEED_NAMESPACE, EncoderRecipe, pretrain_encoder
from fedrad.common.model.public_volumes import VolumeRecipe, pretrain_volume_encoder
from fedrad.common.model.radiology_model import RadiologyModel
from fedrad.common.model.tokenizer import load_tokenizer, train_tokenizer
from fedrad.common.stage_progress import stage_reporter
from fedrad.common.tasks import (
    DETAIL_PROBABILITY,
    context_text,
    qa_prompt,
    report_prompt,
    sample_question,
)

logger = logging.getLogger(__name__)

FOUNDATION_VERSION = 7  # bump when the LM recipe below changes: invalidates LM caches
ENCODER_VERSION = 1  # bump when the public image set or encoder pretraining changes


@dataclasses.dataclass(frozen=True)
class FoundationRecipe:
    corpus_reports: int = 6000  # synthetic public reports
    steps: int = 600  # LM pretraining steps
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    public_images: int = 4000  # labelled public images the encoder is pretrained on
    encoder_steps: int = 1200  # encoder pretraining steps; 0 = encoder from scratch, trainable
    # A pretrained base LM (small, --lm) keeps its weights; its LoRA warms up on the same public
    # report and question text, so DP training starts from a model that writes the format
    base_lm_steps: int = 120  # 0 = LoRA starts at zero (the base LM as shipped)
    base_lm_batch_size: int = 16
    base_lm_lr: float = 5e-3
    # The volume (CT) encoder, pretrained on public chest CTs drawn from the real anatomy the
    # generator ships with (`public_volumes.py`); 0 steps = a random volume encoder, frozen.
    public_volumes: int = 480
    volume_steps: int = 400

    def __post_init__(self) -> None:
        if self.steps < 1 or self.encoder_steps < 0 or self.public_images < 20:
            raise ValueError("foundation steps must be >= 1, encoder steps >= 0, images >= 20")
        if self.base_lm_steps < 0 or self.base_lm_batch_size < 1:
            raise ValueError("base LM warm-up steps must be >= 0 and its batch size >= 1")

    def encoder_recipe(self) -> EncoderRecipe:
        return EncoderRecipe(images=self.public_images, steps=self.encoder_steps, seed=self.seed)

    def volume_recipe(self) -> VolumeRecipe:
        return VolumeRecipe(volumes=self.public_volumes, steps=self.volume_steps, seed=self.seed)


def public_reports(n: int, seed: int) -> list[tuple[str, str]]:
    """(indication, report) pairs from the open generator, no PHI echoed, no images drawn."""
    import datetime as dt

    from fedrad.common.synthetic.cxr_image import sample_finding
    from fedrad.common.synthetic.report_text import HeaderPHI, write_indication, write_report
    from fedrad.common.synthetic.site_profiles import BASE_PROFILES

    out = []
    for i in range(n):
        rng = np.random.default_rng(
            np.random.SeedSequence(seed, spawn_key=(PUBLIC_SEED_NAMESPACE, i))
        )
        profile = BASE_PROFILES[i % len(BASE_PROFILES)]
        style = dataclasses.replace(profile.style, phi_rate=0.0)
        findings = tuple(sample_finding(name, rng) for name in profile.draw_findings(rng))
        view = "AP" if rng.random() < profile.ap_fraction else "PA"
        phi = HeaderPHI(
            "Anon", "Anon", "X", "Anon", dt.date(2020, 1, 1), "0000", dt.date(2019, 1, 1)
        )
        report = write_report(findings, view=view, devices=(), style=style, phi=phi, rng=rng)
        sex = "M" if rng.random() < 0.5 else "F"
        age = int(rng.integers(20, 89))
        indication = write_indication(findings, kind=profile.kind, age=age, sex=sex, rng=rng)
        out.append((indication, report.text))
    return out


def radlabels_reports() -> list[str]:
    """The shipped real-style reports; empty (with a log line) if radlabels is not installed."""
    from fedrad.common.labeling.radlabels import load_radlabels, radlabels_samples_dir

    try:
        return [text for text, _ in load_radlabels(radlabels_samples_dir())]
    except FileNotFoundError:
        logger.warning("radlabels not installed: foundation corpus uses synthetic text only")
        return []


def training_texts(
    pairs: list[tuple[str, str]], extra_reports: list[str], rng: random.Random
) -> list[str]:
    """The same prompt formats the model is fine-tuned with: reports and question answering,
    with sides and sizes in the prompt as often as fine-tuning puts them there."""
    texts = []
    for indication, report in pairs:
        labels = label_report(report)
        sides = labels.sides
        size = labels.nodule_size_mm if rng.random() < DETAIL_PROBABILITY else None
        prompt = report_prompt(labels.labels, sides, size)
        texts.append(f"{context_text(indication)}{prompt} {report_target(report)}")
        qa = sample_question(labels.labels, labels.sides, labels.nodule_size_mm, rng)
        texts.append(
            f"{context_text(indication)}{qa_prompt(labels.labels, qa.question, sides, size)} "
            f"{qa.answer}"
        )
    for report in extra_reports:
        if not tidy_report(report):
            continue  # no findings or impression (a truncated export): nothing to learn
        prompt = report_prompt(label_report(report).labels)
        texts.append(f"{context_text('')}{prompt} {report_target(report)}")
    return texts


def _prefixed_loss(
    lm: nn.Module,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    prefix_tokens: int,
) -> torch.Tensor:
    """LM loss with `prefix_tokens` random vectors in front of the text, where the visual prefix
    will sit: the LM learns to read text that starts after K foreign embeddings at positions
    K.., so fine-tuning does not have to unlearn a text-at-position-0 habit and stays faithful
    to the prompt's suggestions (docs/results/model.md)."""
    embed = lm.get_input_embeddings()
    text = embed(input_ids)
    scale = float(embed.weight.detach().std())
    noise = torch.randn(input_ids.shape[0], prefix_tokens, text.shape[-1]) * scale
    embeds = torch.cat([noise, text], dim=1)
    full_mask = torch.cat(
        [torch.ones(input_ids.shape[0], prefix_tokens, dtype=mask.dtype), mask], 1
    )
    ignore = torch.full((input_ids.shape[0], prefix_tokens), -100, dtype=labels.dtype)
    full_labels = torch.cat([ignore, labels], dim=1)
    return lm(inputs_embeds=embeds, attention_mask=full_mask, labels=full_labels).loss


def _pretrain(
    lm: nn.Module,
    ids: list[list[int]],
    *,
    recipe: FoundationRecipe,
    pad_id: int,
    max_len: int,
    prefix_tokens: int,
    progress: Callable[[int], None] | None,
) -> list[float]:
    torch.manual_seed(recipe.seed)
    order = np.random.default_rng(recipe.seed)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=recipe.lr, weight_decay=0.01)
    warmup = max(1, recipe.steps // 10)

    def factor(step: int) -> float:  # linear warm-up, then cosine decay to 5%
        if step < warmup:
            return (step + 1) / warmup
        progress_frac = (step - warmup) / max(1, recipe.steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress_frac))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    lm.train()
    losses = []
    for step in range(recipe.steps):
        batch = [ids[i][:max_len] for i in order.integers(0, len(ids), recipe.batch_size)]
        width = max(len(b) for b in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, seq in enumerate(batch):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        loss = _prefixed_loss(lm, input_ids, mask, labels, prefix_tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1)
    lm.eval()
    return losses


LM_FIELDS = ("vocab_size", "lm_layers", "lm_heads", "lm_dim", "max_positions", "dropout")


def _lm_recipe(recipe: FoundationRecipe) -> dict[str, object]:
    """The recipe fields that shape the LM: the encoder's own never invalidate its cache."""
    fields = dataclasses.asdict(recipe)
    return {
        k: v
        for k, v in fields.items()
        if k not in ("public_images", "encoder_steps", "public_volumes", "volume_steps")
        and not k.startswith("base_lm_")
    }


def foundation_key(config: ModelConfig, recipe: FoundationRecipe) -> str:
    """Depends only on what shapes the language model, so image-side changes reuse the cache."""
    lm_fields = {name: getattr(config, name) for name in LM_FIELDS}
    lm_fields["prefix"] = config.num_prefix_tokens
    blob = json.dumps(
        {"lm": lm_fields, "recipe": _lm_recipe(recipe), "v": FOUNDATION_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    return cache_root() / "foundation"


def build_foundation_lm(
    config: ModelConfig,
    *,
    recipe: FoundationRecipe | None = None,
    cache_root: Path | None = None,
) -> Path:
    """A local Hugging Face causal-LM directory (tokenizer + weights) pretrained on public text."""
    recipe = recipe or FoundationRecipe()
    key = foundation_key(config, recipe)
    directory = (cache_root or default_cache_root()) / f"lm-{key}"
    if (directory / "fedrad_foundation.json").is_file():
        return directory
    rng = random.Random(recipe.seed)
    pairs = public_reports(recipe.corpus_reports, recipe.seed)
    extra = radlabels_reports()
    texts = training_texts(pairs, extra, rng)
    tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size)
    torch.manual_seed(recipe.seed)
    lm = build_from_config(config, tokenizer)
    eos = tokenizer.eos_token_id
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    max_len = config.max_positions - config.num_prefix_tokens
    losses = _pretrain(
        lm,
        ids,
        recipe=recipe,
        pad_id=tokenizer.pad_token_id,
        max_len=max_len,
        prefix_tokens=config.num_prefix_tokens,
        progress=stage_reporter("public language model (once, cached)", recipe.steps),
    )
    with publish_once(directory) as tmp:
        lm.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "fedrad_foundation.json").write_text(
            json.dumps(
                {
                    "recipe": _lm_recipe(recipe),
                    "corpus": {"synthetic_reports": len(pairs), "radlabels_reports": len(extra)},
                    "pretrain_loss": {"first": losses[0], "last": float(np.mean(losses[-20:]))},
                    "version": FOUNDATION_VERSION,
                },
                indent=1,
            )
        )
    logger.info("foundation LM built: loss %.2f -> %.2f", losses[0], np.mean(losses[-20:]))
    return directory


def _base_lora_recipe(recipe: FoundationRecipe) -> dict[str, object]:
    """The recipe fields the warm-up reads: the public corpus, its seed and its own steps."""
    fields = dataclasses.asdict(recipe)
    return {k: fields[k] for k in ("corpus_reports", "seed")} | {
        k: v for k, v in fields.items() if k.startswith("base_lm_")
    }


def base_lora_key(config: ModelConfig, recipe: FoundationRecipe) -> str:
    """The base's hash, the adapter's shape, the text budget and the warm-up recipe."""
    fields = {
        name: getattr(config, name)
        for name in (
            "lm_sha256",
            "lora_rank",
            "lora_alpha",
            "lora_targets",
            "num_prefix_tokens",
            "max_prompt_tokens",
            "max_target_tokens",
        )
    }
    blob = json.dumps(
        {"lm": fields, "recipe": _base_lora_recipe(recipe), "v": FOUNDATION_VERSION},
        sort_keys=True,
        default=list,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def warm_up_base_lora(
    model: RadiologyModel, recipe: FoundationRecipe, *, cache_root: Path | None = None
) -> Path:
    """Trains a pretrained base's LoRA (base frozen) on the public report and question text the
    from-config LM pretrains on, once per base and recipe (cached), and loads it into `model`.
    Without it a base that never saw the report format spends a site's whole DP budget
    learning it (docs/results/model.md)."""
    config = model.config
    key = base_lora_key(config, recipe)
    directory = (cache_root or default_cache_root()) / f"base-lora-{key}"
    weights = directory / "lora.safetensors"
    params = dict(model.lm.named_parameters())
    lora_names = [n for n in params if "lora_" in n]
    if not weights.is_file():
        rng = random.Random(recipe.seed)
        pairs = public_reports(recipe.corpus_reports, recipe.seed)
        texts = training_texts(pairs, radlabels_reports(), rng)
        tokenizer = model.tokenizer
        eos = tokenizer.eos_token_id
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
        steps = dataclasses.replace(
            recipe,
            steps=recipe.base_lm_steps,
            batch_size=recipe.base_lm_batch_size,
            lr=recipe.base_lm_lr,
        )
        logger.info("warming up the base LM's LoRA on %d public texts", len(texts))
        losses = _pretrain(
            model.lm,
            ids,
            recipe=steps,
            pad_id=tokenizer.pad_token_id,  # load_base_tokenizer pads with eos when unset
            max_len=config.max_prompt_tokens + config.max_target_tokens,
            prefix_tokens=config.num_prefix_tokens,
            progress=stage_reporter(
                "public-text LoRA warm-up of the base LM (once, cached)", recipe.base_lm_steps
            ),
        )
        with publish_once(directory) as tmp:
            lora = {n: params[n].detach().cpu().contiguous() for n in lora_names}
            save_file(lora, str(tmp / weights.name))
            (tmp / "fedrad_foundation.json").write_text(
                json.dumps(
                    {
                        "base_lm_sha256": config.lm_sha256,
                        "recipe": _base_lora_recipe(recipe),
                        "texts": len(texts),
                        "warm_up_loss": {
                            "first": losses[0],
                            "last": float(np.mean(losses[-20:])),
                        },
                        "version": FOUNDATION_VERSION,
                    },
                    indent=1,
                )
            )
        logger.info("base LM LoRA warmed up: loss %.2f -> %.2f", losses[0], np.mean(losses[-20:]))
    stored = load_file(str(weights))
    if sorted(stored) != sorted(lora_names):
        raise ValueError(f"{weights} does not hold this model's LoRA tensors")
    with torch.no_grad():
        for name, tensor in stored.items():
            params[name].copy_(tensor.to(params[name].device))
    return directory


ENCODER_FIELDS = ("image_size", "encoder_channels", "encoder_strides", "encoder_subunits")


def encoder_key(config: ModelConfig, recipe: EncoderRecipe) -> str:
    fields = {name: getattr(config, name) for name in ENCODER_FIELDS}
    fields["norm_groups"] = config.norm_groups
    blob = json.dumps(
        {"encoder": fields, "recipe": dataclasses.asdict(recipe), "v": ENCODER_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_foundation_encoder(
    config: ModelConfig,
    recipe: EncoderRecipe,
    *,
    cache_root: Path | None = None,
) -> Path:
    """A directory with the public image encoder's weights and what it measured (cached)."""
    key = encoder_key(config, recipe)
    directory = (cache_root or default_cache_root()) / f"encoder-{key}"
    if (directory / "fedrad_encoder.json").is_file():
        return directory
    logger.info("pretraining the image encoder on %d public images (once)", recipe.images)
    encoder, measured = pretrain_encoder(
        config,
        recipe,
        drawing=stage_reporter("public images drawn (once, cached)", recipe.images),
        progress=stage_reporter("public image encoder (once, cached)", recipe.steps),
    )
    _publish_encoder(directory, encoder, recipe, ENCODER_VERSION, measured)
    return directory


def _publish_encoder(
    directory: Path, encoder: nn.Module, recipe: object, version: int, measured: dict[str, object]
) -> None:
    """A pretrained public encoder's cache entry: its weights and what it measured."""
    with publish_once(directory) as tmp:
        state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
        save_file(state, str(tmp / "encoder.safetensors"))
        info = {"recipe": dataclasses.asdict(recipe), "version": version, **measured}  # type: ignore[call-overload]
        (tmp / "fedrad_encoder.json").write_text(json.dumps(info, indent=1))


VOLUME_ENCODER_VERSION = 1  # bump when the public volume set or its pretraining changes


def volume_encoder_key(config: ModelConfig, recipe: VolumeRecipe) -> str:
    fields = {name: getattr(config, name) for name in ENCODER_FIELDS if name != "image_size"}
    fields["volume_shape"] = list(config.volume_shape)
    fields["norm_groups"] = config.norm_groups
    fields["tokens"] = config.num_prefix_tokens
    blob = json.dumps(
        {
            "encoder": fields,
            "recipe": dataclasses.asdict(recipe),
            "v": VOLUME_ENCODER_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_foundation_volume_encoder(
    config: ModelConfig, recipe: VolumeRecipe, *, cache_root: Path | None = None
) -> Path:
    """A directory with the public volume encoder's weights and what it measured (cached)."""
    key = volume_encoder_key(config, recipe)
    directory = (cache_root or default_cache_root()) / f"volume-encoder-{key}"
    if (directory / "fedrad_encoder.json").is_file():
        return directory
    logger.info("pretraining the volume encoder on %d public chest CTs (once)", recipe.volumes)
    encoder, measured = pretrain_volume_encoder(
        config,
        recipe,
        drawing=stage_reporter("public CT volumes drawn (once, cached)", recipe.volumes),
        progress=stage_reporter("public volume encoder (once, cached)", recipe.steps),
    )
    _publish_encoder(directory, encoder, recipe, VOLUME_ENCODER_VERSION, measured)
    return directory


def build_foundation(
    config: ModelConfig,
    *,
    recipe: FoundationRecipe | None = None,
    cache_root: Path | None = None,
    seed: int = 0,
) -> tuple[RadiologyModel, Path]:
    """The starting model: the public LM (cached; or the config's pretrained base LM) with
    LoRA, the public image encoder (cached, frozen) and a fresh projector and head from
    `seed`. Returns the model and where its language model came from."""
    recipe = recipe or FoundationRecipe()
    if config.pretrained_lm:  # a real pretrained LLM: nothing to pretrain on the text side
        directory = locate(config).weights
    else:
        directory = build_foundation_lm(config, recipe=recipe, cache_root=cache_root)
    encoder_dir = None
    if recipe.encoder_steps:
        encoder_dir = build_foundation_encoder(
            config, recipe.encoder_recipe(), cache_root=cache_root
        )
        measured = json.loads((encoder_dir / "fedrad_encoder.json").read_text())
        note = {
            "public_encoder": encoder_dir.name,
            "public_encoder_held_out_auroc": measured.get("held_out_macro_auroc"),
        }
        config = dataclasses.replace(config, freeze_encoder=True, extra={**config.extra, **note})
    volume_dir = None
    if recipe.volume_steps:
        volume_dir = build_foundation_volume_encoder(
            config, recipe.volume_recipe(), cache_root=cache_root
        )
        measured = json.loads((volume_dir / "fedrad_encoder.json").read_text())
        note = {
            "public_volume_encoder": volume_dir.name,
            "public_volume_encoder_held_out_auroc": measured.get("held_out_macro_auroc"),
        }
        config = dataclasses.replace(config, extra={**config.extra, **note})
    if config.pretrained_lm:
        torch.manual_seed(seed)
        model = build_model(config)
        if recipe.base_lm_steps:
            warm_up_base_lora(model, recipe, cache_root=cache_root)
    else:
        tokenizer = load_tokenizer(directory)
        lm = load_pretrained(directory)
        torch.manual_seed(seed)
        model = RadiologyModel(config, add_lora(lm, config), tokenizer)
    if encoder_dir is not None:
        model.encoder.load_state_dict(load_file(str(encoder_dir / "encoder.safetensors")))
    if volume_dir is not None:
        model.volume_encoder.load_state_dict(load_file(str(volume_dir / "encoder.safetensors")))
    return model, directory
