"""A cohort folder -> each site's prepared studies, split into train and held-out.

Each site is prepared exactly as `fedrad-site prepare` would (its own cache and pseudonym key),
so simulations and baselines read the same de-identified data a real site agent trains on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fedrad.client.ingest.dataset import SiteStudies, split_held_out
from fedrad.client.ingest.site_data import SiteDataError, prepared_manifest
from fedrad.common.model.config import VOLUME_MODALITIES, VOLUME_SHAPE
from fedrad.common.model.preprocess import PreprocessConfig

logger = logging.getLogger(__name__)


class CohortError(Exception):
    """The cohort cannot be used at all (no site folders, no usable site)."""


@dataclass(frozen=True)
class SiteSplit:
    site_id: str
    train: SiteStudies
    held_out: SiteStudies


def site_dirs(cohort: Path) -> list[Path]:
    if not cohort.is_dir():
        raise CohortError(f"cohort directory does not exist: {cohort}")
    sites = sorted(p for p in cohort.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not sites:
        raise CohortError(f"no site folders in {cohort}")
    return sites


def load_cohort(
    cohort: Path,
    *,
    image_size: int,
    volume_shape: tuple[int, int, int] = VOLUME_SHAPE,
    held_out_fraction: float = 0.2,
    workers: int = 0,
) -> tuple[list[SiteSplit], dict[str, str]]:
    """Usable sites and, for every site left out, the one-line reason."""
    config = PreprocessConfig(image_size=image_size, volume_shape=volume_shape)
    splits: list[SiteSplit] = []
    dropped: dict[str, str] = {}
    for site in site_dirs(cohort):
        try:
            manifest = prepared_manifest(site, config=config, workers=workers)
            studies = SiteStudies.from_manifest(manifest).of_modalities(VOLUME_MODALITIES)
        except SiteDataError as exc:
            dropped[site.name] = str(exc)
            continue
        train, held = split_held_out(studies, fraction=held_out_fraction)
        if len(train) < 2 or len(held) < 1:
            dropped[site.name] = f"too few usable studies ({len(studies)})"
            continue
        splits.append(SiteSplit(site.name, train, held))
    for name, reason in dropped.items():
        logger.warning("site %s left out: %s", name, reason)
    if not splits:
        raise CohortError(
            f"no usable site in {cohort}: " + "; ".join(f"{k}: {v}" for k, v in dropped.items())
        )
    return splits, dropped


def pooled(parts: list[SiteStudies]) -> SiteStudies:
    return SiteStudies(
        [s for p in parts for s in p.studies], [img for p in parts for img in p.images]
    )
