"""Held-out scans with one finding each and the region it occupies, for measuring explanations.

Why: an explanation map can only be scored against the truth of where a finding is, and only the
generator knows that. A radiograph's truth region is where rendering WITH the finding differs
from rendering WITHOUT it from the same random state (`render_chest` draws anatomy and findings
from separate child streams, so nothing else moves); a CT's is the voxel mask the CT generator
returns for the inserted finding. Exactly one finding per scan, so no other finding can explain
the head's output, and no support devices (they draw from the findings' stream and would move).

Scans come back exactly as the model sees them (`preprocess` / `preprocess_volume`), and the
masks on the same grid: the coverage of each model pixel by the finding, resampled by the very
geometry steps preprocessing uses, kept where at least `MIN_COVER` of the pixel is covered.

Seeds live in their own namespace (`REGION_SEED_NAMESPACE`): cohorts use spawn keys 0-3, the
public pretraining sets 99, the privacy audit's canaries 7301; nothing trained on can equal a
scan drawn here.
"""

from __future__ import annotations

import copy
from typing import Final

import numpy as np
from monai.transforms import Resize, SpatialPad

from fedrad.common.findings import FINDINGS
from fedrad.common.model.preprocess import (
    PreprocessConfig,
    build_transform,
    preprocess,
    preprocess_volume,
)
from fedrad.common.model.public_images import drawing_geometry

REGION_SEED_NAMESPACE: Final[int] = 4_242
"""Spawn key of the measurement split; unused by cohorts (0-3), public sets (99), canaries."""
RADIOGRAPH_STREAM: Final[int] = 1
CT_STREAM: Final[int] = 2
PROFILES_DRAWN: Final[int] = 8
"""Detector/anatomy profiles cycled through, as the public pretraining set does."""

DIFFERENCE_THRESHOLD: Final[float] = 0.02
"""Display units (image brightness about 0..1, before the detector): a finding's pixels are
where with/without renders differ by more than this. It is 1.7x the detector's quantum noise
(std 0.012 at mid-grey), so every pixel kept is a change a reader could see, and far below
every finding's contrast (nodule ~0.2, effusion ~0.25, fracture callus 0.10, pneumothorax
edge 0.09, so their bodies are all kept)."""
MIN_COVER: Final[float] = 0.25
"""A model pixel (voxel) is in the truth region when at least this share of it is covered by
the finding after area resampling. A finding smaller than that everywhere (a hairline
fracture on a coarse grid) keeps the pixels it covers most, so no mask is ever empty."""
CT_RENDER_GRID: Final[tuple[int, int, int]] = (64, 128, 128)
"""Where CT is drawn before resampling to the model grid: the public CT set's grid."""
CT_AXIAL: Final[tuple[float, ...]] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
"""The generator's volumes are already in canonical (LPS, axial) order."""


def region_rng(seed: int, finding: str, index: int, *, stream: int) -> np.random.Generator:
    """The generator of measurement scan `index` for `finding` (stream: radiograph or CT)."""
    return np.random.default_rng(
        np.random.SeedSequence(
            seed, spawn_key=(REGION_SEED_NAMESPACE, stream, _finding_index(finding), index)
        )
    )


def draw_with_region(
    finding: str, rng: np.random.Generator, *, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(1, S, S) float32 model input of a radiograph carrying `finding` alone, and the (S, S)
    bool mask of where the finding is. Drawn at twice the model side, as the public set is."""
    from fedrad.common.synthetic.cxr_image import (
        render_chest,
        sample_anatomy,
        sample_finding,
        to_stored,
    )
    from fedrad.common.synthetic.site_profiles import profile_for_site

    _finding_index(finding)
    profile = profile_for_site(int(rng.integers(PROFILES_DRAWN)))
    view = "AP" if rng.random() < profile.ap_fraction else "PA"
    anatomy = sample_anatomy(rng, sex="M" if rng.random() < 0.5 else "F", view=view)
    drawn = sample_finding(finding, rng)
    rows, cols, spacing, detector = drawing_geometry(profile, 2 * image_size)
    # render_chest spawns its streams from the generator's seed sequence: give each render its
    # own copy of the same state, so both see the same anatomy and texture streams
    state = copy.deepcopy(rng)
    renders = [
        render_chest(
            anatomy, found, rows=rows, cols=cols, spacing_mm=spacing, view=view,
            rng=copy.deepcopy(state), devices=(),
        )
        for found in ((drawn,), ())
    ]  # fmt: skip
    with_finding, without = renders
    pixels = to_stored(with_finding, detector, spacing_mm=spacing, rng=rng)
    config = PreprocessConfig(image_size=image_size)
    image = preprocess(pixels, config).numpy()
    changed = (np.abs(with_finding - without) > DIFFERENCE_THRESHOLD).astype(np.float32)
    geometry = [
        t for t in build_transform(config, low=0.0, high=1.0).transforms
        if isinstance(t, (Resize, SpatialPad))
    ]  # fmt: skip
    cover = changed[None]
    for step in geometry:  # the same resize and pad that made the image, on the coverage
        cover = np.asarray(step(cover))
    return image.astype(np.float32), _truth(cover[0])


def draw_ct_with_region(
    finding: str,
    rng: np.random.Generator,
    *,
    shape: tuple[int, int, int],
    render_grid: tuple[int, int, int] = CT_RENDER_GRID,
) -> tuple[np.ndarray, np.ndarray]:
    """(1, D, H, W) float32 model input of a chest CT carrying `finding` alone (the public CT
    set's noise range), and the (D, H, W) bool mask of the voxels it occupies."""
    from fedrad.common.synthetic.chest_ct import (
        reference_ct,
        render_ct_with_truth,
        sample_ct_finding,
    )

    _finding_index(finding)
    drawn = sample_ct_finding(finding, rng)
    noise = float(rng.uniform(8.0, 30.0))
    case = render_ct_with_truth(reference_ct(render_grid), (drawn,), rng, noise_hu=noise)
    volume = preprocess_volume(case.hu, CT_AXIAL, "CT", PreprocessConfig(volume_shape=shape))
    [mask] = case.masks
    cover = np.asarray(Resize(spatial_size=shape, mode="area")(mask[None].astype(np.float32)))
    return volume.numpy().astype(np.float32), _truth(cover[0])


def _truth(cover: np.ndarray) -> np.ndarray:
    """Pixels covered at least MIN_COVER; the best-covered ones when none is."""
    peak = float(cover.max())
    if peak <= 0.0:
        raise ValueError("the finding left no trace on the model grid")
    return cover >= min(MIN_COVER, peak)


def _finding_index(finding: str) -> int:
    if finding not in FINDINGS:
        raise ValueError(f"unknown finding {finding!r}; expected one of {', '.join(FINDINGS)}")
    return FINDINGS.index(finding)
