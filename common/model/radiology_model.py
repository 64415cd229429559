"""Image encoder + projector + causal LM + diagnosis head: one model for reports, findings, answers.

The LM reads `[visual prefix ; indication ; findings line ; task prompt ; target]` through
`inputs_embeds`. The diagnosis head (presence per finding) and the side head (left, right or
bilateral per lateral finding) read the pooled image features together with the LM's hidden
state at the last context token (image + indication, before any task text), so findings use the
same cross-modal context as the report while staying independent of which task a training
example asked for, and never see the findings line that training fills from the labels.

The interval head reads the pooled features of the current study and of the same patient's
prior (encoded without gradient) and gives, per finding, the change between them (CHANGES).

Radiographs and volumes (CT) each have an encoder and a projector to the same number of prefix
tokens; a batch may mix them (`modality` per row) and every row takes its own modality's
prefix and pooled features. The volume encoder is always frozen (pretrained on public volumes):
it runs on the volume rows only, so a DP step's per-sample gradients stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedrad.common.findings import FINDINGS, LATERAL_ORDER, SIDES
from fedrad.common.interval import CHANGES
from fedrad.common.modality import MODALITIES, RADIOGRAPH
from fedrad.common.model.config import ModelConfig
from fedrad.common.model.encoder import ImageEncoder, VolumeEncoder

_LAST_ONLY = 1  # logits_to_keep: the diagnosis head needs hidden states, not a vocabulary
NO_REPEAT_NGRAM = 4
"""Small LMs fall into loops ("2. 2. 2. ..."); reports never repeat a 4-gram verbatim."""


@dataclass(frozen=True)
class LossParts:
    loss: torch.Tensor  # what backward() runs on: batch mean of per-example losses
    lm_loss: float
    finding_loss: float


class RadiologyModel(nn.Module):
    def __init__(
        self, config: ModelConfig, lm: PeftModel, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.encoder = ImageEncoder(config)
        if config.freeze_encoder:  # pretrained on public images; nothing of it trains or travels
            self.encoder.requires_grad_(False)
        hidden = lm.get_input_embeddings().embedding_dim
        self.projector = nn.Sequential(
            nn.Linear(self.encoder.out_channels, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
        )
        self.lm = lm
        features = self.encoder.pooled_channels + hidden
        self.head = nn.Linear(features, len(FINDINGS))
        self.side_head = nn.Linear(features, len(LATERAL_ORDER) * len(SIDES))
        # last, so a seed initialises the radiograph side as it did before volumes existed
        self.volume_encoder = VolumeEncoder(config)
        self.volume_encoder.requires_grad_(False)
        self.volume_projector = nn.Sequential(
            nn.Linear(self.volume_encoder.out_channels, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
        )
        # after the volume side, for the same reason: [current ; prior ; current - prior]
        self.interval_head = nn.Linear(
            3 * self.encoder.pooled_channels, len(FINDINGS) * len(CHANGES)
        )

    # -- shared pieces -------------------------------------------------------------------------

    def visual_prefix(
        self,
        images: torch.Tensor,
        volumes: torch.Tensor | None = None,
        modality: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, hidden) prefix and (B, pooled) features. `images` alone: (B, 1, S, S)
        radiographs, or (B, 1, D, H, W) volumes; a mixed batch passes both, with `modality`
        (B,) codes (index into MODALITIES) saying which one each row is."""
        k = self.config.num_prefix_tokens
        if volumes is None and images.dim() == 5:  # volumes alone: the 2-D side has no input
            tokens, pooled = self.volume_encoder(images.to(self.device))
            return self.volume_projector(tokens), pooled
        rows = images.shape[0]
        if modality is None:
            modality = torch.full((rows,), MODALITIES.index(RADIOGRAPH))
        is_volume = modality.to(self.device) != MODALITIES.index(RADIOGRAPH)
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if bool((~is_volume).any()) or _trains(self.projector):
            tokens, pooled = _encode(self.encoder, images, ~is_volume, self.device, k)
            parts.append((~is_volume, self.projector(tokens), pooled))
        if bool(is_volume.any()) or _trains(self.volume_projector):
            if volumes is None:
                raise ValueError("a volume row needs the volumes tensor")
            tokens, pooled = _encode(self.volume_encoder, volumes, is_volume, self.device, k)
            parts.append((is_volume, self.volume_projector(tokens), pooled))
        (_, prefix, pooled), *others = parts
        for chosen, other_prefix, other_pooled in others:
            prefix = torch.where(chosen[:, None, None], other_prefix, prefix)
            pooled = torch.where(chosen[:, None], other_pooled, pooled)
        return prefix, pooled

    def pooled_features(
        self,
        images: torch.Tensor,
        volumes: torch.Tensor | None = None,
        modality: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, pooled) encoder features, without gradient: what the interval head reads of a
        prior study (a constant input, so per-sample gradients stay exact). `rows` (B,) bool
        picks the rows to encode; the others are zeros."""
        count = images.shape[0]
        if rows is None:
            rows = torch.ones(count, dtype=torch.bool)
        rows = rows.cpu()
        if modality is None:
            code = MODALITIES.index(RADIOGRAPH) if images.dim() == 4 else 1
            modality = torch.full((count,), code)
        is_volume = modality.cpu() != MODALITIES.index(RADIOGRAPH)
        out = torch.zeros(count, self.encoder.pooled_channels, device=self.device)
        k = self.config.num_prefix_tokens
        with torch.no_grad():
            flat = rows & ~is_volume
            if bool(flat.any()):
                source = images if images.dim() == 4 else None
                if source is None:
                    raise ValueError("a radiograph row needs the images tensor")
                out = out + _encode(self.encoder, source, flat, self.device, k)[1].float()
            deep = rows & is_volume
            if bool(deep.any()):
                source = volumes if volumes is not None else images
                if source.dim() != 5:
                    raise ValueError("a volume row needs the volumes tensor")
                out = out + _encode(self.volume_encoder, source, deep, self.device, k)[1].float()
        return out

    def interval_logits(self, current: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """(B, findings, changes) logits of the change from the prior to the current study,
        from their pooled features, standardised per row (no parameters): the raw features'
        norm is in the hundreds, and a per-sample gradient that size would take most of each
        DP clip from the parts the other tasks train."""
        features = torch.cat([current, prior, current - prior], dim=1)
        features = F.layer_norm(features, features.shape[1:])
        return self.interval_head(features).view(-1, len(FINDINGS), len(CHANGES))

    @torch.no_grad()
    def interval_change(self, current: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """(B, findings, changes) probabilities of each change between two scans of one
        kind (both (B, 1, S, S) radiographs or both (B, 1, D, H, W) volumes)."""
        if current.dim() != prior.dim() or current.shape[1:] != prior.shape[1:]:
            raise ValueError("the prior must be the same kind of scan as the current study")
        logits = self.interval_logits(self.pooled_features(current), self.pooled_features(prior))
        return torch.softmax(logits.float(), dim=-1).cpu()

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def _lm_forward(
        self, embeds: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor | int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, last hidden state). With `keep` (B, L) bool, logits only at those
        positions, flattened in (row, position) order: a 49k-token vocabulary over every
        position of a batch is most of a pretrained LM's training memory."""
        # Explicit, contiguous per-example position ids: the default has batch dim 1, which
        # breaks per-sample gradients when anything position-dependent trains.
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0).contiguous()
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            output_hidden_states=True,
            use_cache=False,
            **({} if keep is None else {"logits_to_keep": keep}),
        )
        return out.logits, out.hidden_states[-1]

    # -- training ------------------------------------------------------------------------------

    def forward(
        self,
        images: torch.Tensor,
        volumes: torch.Tensor,
        modality: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        target_mask: torch.Tensor,
        ctx_index: torch.Tensor,
        findings: torch.Tensor,
        findings_mask: torch.Tensor,
        side_targets: torch.Tensor,
        prior_images: torch.Tensor | None = None,
        prior_volumes: torch.Tensor | None = None,
        interval_targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-example LM loss, per-example finding loss (presence BCE, plus side cross-entropy
        where the report states a side, plus interval cross-entropy where the two reports
        state a change) and finding logits."""
        prefix, pooled = self.visual_prefix(images, volumes, modality)
        k = prefix.shape[1]
        text = self.lm.get_input_embeddings()(input_ids)
        embeds = torch.cat([prefix, text], dim=1)
        ones = torch.ones(prefix.shape[:2], dtype=attention_mask.dtype, device=prefix.device)
        mask = torch.cat([ones, attention_mask], dim=1)
        # position k-1+t predicts text token t: logits only where t is a target token
        targets = target_mask.bool()
        keep = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
        keep[:, k - 1 : k - 1 + targets.shape[1]] = targets
        logits, hidden = self._lm_forward(embeds, mask, keep)
        ce = F.cross_entropy(logits.float(), input_ids[targets], reduction="none")
        rows = targets.nonzero()[:, 0]  # the example each target token belongs to
        per_example = torch.zeros(input_ids.shape[0], dtype=ce.dtype, device=ce.device)
        per_example = per_example.index_add(0, rows, ce)
        lm_loss = per_example / targets.sum(dim=1).clamp(min=1).to(ce.dtype)
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        features = torch.cat([pooled, hidden[batch, k + ctx_index]], dim=1)
        finding_logits = self.head(features)
        bce = F.binary_cross_entropy_with_logits(finding_logits, findings, reduction="none")
        fmask = findings_mask.to(bce.dtype)
        finding_loss = (bce * fmask).sum(dim=1) / fmask.sum(dim=1).clamp(min=1.0)
        side_logits = self.side_head(features).view(-1, len(SIDES)).float()
        side_ce = F.cross_entropy(
            side_logits, side_targets.reshape(-1).clamp(min=0), reduction="none"
        ).view(side_targets.shape)
        smask = (side_targets >= 0).to(side_ce.dtype)
        side_loss = (side_ce * smask).sum(dim=1) / smask.sum(dim=1).clamp(min=1.0)
        finding_loss = finding_loss + side_loss.to(finding_loss.dtype)
        if interval_targets is not None and prior_images is not None:
            known = interval_targets >= 0
            has_prior = known.any(dim=1)
            prior = self.pooled_features(prior_images, prior_volumes, modality, has_prior.cpu())
            logits = self.interval_logits(pooled.float(), prior).float()
            ce_change = F.cross_entropy(
                logits.reshape(-1, len(CHANGES)),
                interval_targets.reshape(-1).clamp(min=0),
                reduction="none",
            ).view(interval_targets.shape)
            cmask = known.to(ce_change.dtype)
            change_loss = (ce_change * cmask).sum(dim=1) / cmask.sum(dim=1).clamp(min=1.0)
            finding_loss = finding_loss + change_loss.to(finding_loss.dtype)
        return lm_loss, finding_loss, finding_logits

    def loss(self, *batch: torch.Tensor) -> LossParts:
        lm_loss, finding_loss, _ = self(*batch)
        total = (lm_loss + self.config.finding_loss_weight * finding_loss).mean()
        return LossParts(total, float(lm_loss.mean()), float(finding_loss.mean()))

    # -- inference -----------------------------------------------------------------------------

    def _left_padded(
        self, prefix: torch.Tensor, prompts: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[pad ; prefix ; prompt] per row: generation continues from the right edge."""
        embed = self.lm.get_input_embeddings()
        k = prefix.shape[1]
        longest = max(len(p) for p in prompts)
        rows, masks = [], []
        for i, ids in enumerate(prompts):
            pad = longest - len(ids)
            text = embed(torch.tensor(ids, dtype=torch.long, device=prefix.device))
            filler = torch.zeros(pad, prefix.shape[2], dtype=prefix.dtype, device=prefix.device)
            rows.append(torch.cat([filler, prefix[i], text], dim=0))
            masks.append(torch.cat([torch.zeros(pad), torch.ones(k + len(ids))]))
        return torch.stack(rows), torch.stack(masks).to(device=prefix.device, dtype=torch.long)

    @torch.no_grad()
    def diagnose(
        self, images: torch.Tensor, contexts: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, findings) presence probabilities and (B, lateral findings, sides) side
        probabilities; contexts are the token ids of each study's indication text."""
        prefix, pooled = self.visual_prefix(images)
        embeds, mask = self._left_padded(prefix, contexts)
        _, hidden = self._lm_forward(embeds, mask, keep=_LAST_ONLY)
        context = hidden[:, -1]  # left padding puts every row's last context token at the end
        features = torch.cat([pooled, context], dim=1)
        presence = torch.sigmoid(self.head(features).float()).cpu()
        sides = self.side_head(features).float().view(-1, len(LATERAL_ORDER), len(SIDES))
        return presence, torch.softmax(sides, dim=-1).cpu()

    @torch.no_grad()
    def finding_probabilities(
        self, images: torch.Tensor, contexts: list[list[int]]
    ) -> torch.Tensor:
        """(B, findings) presence probabilities."""
        return self.diagnose(images, contexts)[0]

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        num_beams: int = 1,
    ) -> list[str]:
        """Greedy (num_beams=1) or beam search with the LM's KV cache, from the visual prefix."""
        return [
            best
            for best, *_ in self.generate_candidates(
                images, prompts, max_new_tokens=max_new_tokens, candidates=1, num_beams=num_beams
            )
        ]

    @torch.no_grad()
    def generate_candidates(
        self,
        images: torch.Tensor,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        candidates: int,
        num_beams: int = 1,
    ) -> list[list[str]]:
        """Per row, the `candidates` best beams (best first); at least that many beams run."""
        if candidates < 1:
            raise ValueError("candidates must be >= 1")
        prefix, _ = self.visual_prefix(images)
        embeds, mask = self._left_padded(prefix, prompts)
        # generate() derives position ids from the attention mask, so left padding is safe.
        out = self.lm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            num_beams=max(num_beams, candidates),
            num_return_sequences=candidates,
            do_sample=False,
            no_repeat_ngram_size=NO_REPEAT_NGRAM,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        texts = [
            self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out.tolist()
        ]
        return [texts[i : i + candidates] for i in range(0, len(texts), candidates)]

    # -- parameters that train and travel ------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Exactly the parameters with requires_grad: encoder, projector, heads, LoRA."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}


def _trains(module: nn.Module) -> bool:
    """Whether a backward pass will need this module's per-row outputs (inference never)."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())


def _encode(
    encoder: ImageEncoder | VolumeEncoder,
    scans: torch.Tensor,
    rows: torch.Tensor,
    device: torch.device,
    tokens_per_row: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's (tokens, pooled) for every row of the batch. A frozen encoder runs on
    `rows` only (the others get zeros, which their projector's output never reaches, and may
    hold a placeholder of any shape); one that trains runs on the whole batch, as per-sample
    gradients need."""
    if _trains(encoder):
        return encoder(scans.to(device))
    with torch.no_grad():
        if bool(rows.all()):
            return encoder(scans.to(device))
        count = rows.shape[0]
        full_tokens = torch.zeros(count, tokens_per_row, encoder.out_channels, device=device)
        full_pooled = torch.zeros(count, encoder.pooled_channels, device=device)
        picked = rows.nonzero()[:, 0]
        if picked.numel():
            tokens, pooled = encoder(scans[picked.cpu()].to(device))
            full_tokens[picked] = tokens.to(full_tokens.dtype)
            full_pooled[picked] = pooled.to(full_pooled.dtype)
    return full_tokens, full_pooled
