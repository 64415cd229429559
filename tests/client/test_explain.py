"""Explanation maps: shapes and range on radiographs and volumes, the model left as found, the
pictures, the faithfulness measures on hand-made cases, and a deletion test whose answer is
known."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from fedrad.client.ingest.dataset import encode_context
from fedrad.client.reading import explain
from fedrad.client.reading.explain import (
    LABEL_HEIGHT,
    VOLUME_GAP,
    FindingMap,
    content_mask,
    deletion_test,
    energy_inside,
    explain_findings,
    image_png,
    overlay_png,
    pointing_hit,
    random_regions,
    target_layer,
    top_overlap,
    top_region,
    volume_overlay_png,
    volume_png,
)
from fedrad.common.findings import FINDINGS
from fedrad.common.model.radiology_model import RadiologyModel
from tests.model_fixtures import micro_model


@pytest.fixture(scope="module")
def model() -> RadiologyModel:
    return micro_model(seed=3).eval()


def _context(model: RadiologyModel) -> list[int]:
    return encode_context(model.tokenizer, "cough", model.config.max_prompt_tokens)


def _scan(model: RadiologyModel, *, volume: bool = False, seed: int = 0) -> torch.Tensor:
    shape = model.config.volume_shape if volume else (model.config.image_size,) * 2
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((1, 1, *shape))).float()


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_radiograph_maps_are_on_the_input_grid_in_unit_range(
    model: RadiologyModel, method: str
) -> None:
    scan = _scan(model)
    maps = explain_findings(model, scan, _context(model), FINDINGS, method=method)
    presence, _ = model.diagnose(scan, [_context(model)])
    assert [m.finding for m in maps] == list(FINDINGS)
    for i, found in enumerate(maps):
        assert isinstance(found, FindingMap) and found.method == method
        assert found.heat.shape == (32, 32) and found.heat.dtype == np.float32
        assert found.heat.min() >= 0.0
        assert found.heat.max() == pytest.approx(1.0) or not found.heat.any()
        # the map's probability is the one diagnose() reports: same computation, with grad
        assert found.probability == pytest.approx(float(presence[0, i]), abs=1e-5)
    assert any(m.heat.any() for m in maps)
    assert len({m.heat.tobytes() for m in maps}) > 1  # each finding gets its own map


def test_volume_maps_are_on_the_volume_grid(model: RadiologyModel) -> None:
    scan = _scan(model, volume=True)
    maps = explain_findings(model, scan, _context(model), ["pleural_effusion", "nodule"])
    presence, _ = model.diagnose(scan, [_context(model)])
    for found in maps:
        assert found.heat.shape == model.config.volume_shape
        assert found.heat.min() >= 0.0 and found.heat.max() <= 1.0
        index = FINDINGS.index(found.finding)
        assert found.probability == pytest.approx(float(presence[0, index]), abs=1e-5)


def test_target_layer_is_the_stage_the_encoder_pools(model: RadiologyModel) -> None:
    assert target_layer(model, volume=False) == "model.encoder.stages.1"
    assert target_layer(model, volume=True) == "model.volume_encoder.stages.1"
    wrapper = explain.FindingLogits(model, _context(model))
    layer = dict(wrapper.named_modules())[target_layer(model, volume=False)]
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            scan = _scan(model)
            wrapper(scan)
            _, pooled = model.encoder(scan)
    finally:
        handle.remove()
    # the layer's output is exactly the feature map the encoder's mean/max pooling reads
    fmap = seen[0]
    assert torch.allclose(torch.cat([fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))], 1), pooled)


def test_target_layer_refuses_an_encoder_it_does_not_know() -> None:
    model = micro_model(seed=5)
    model.encoder.stages.append(torch.nn.Identity())  # a stage that is not the pooled map
    with pytest.raises(LookupError, match="no convolution, not Conv2d"):
        target_layer(model, volume=False)


def test_model_flags_modes_grads_and_hooks_come_back_as_found() -> None:
    model = micro_model(seed=4, freeze_encoder=True)
    model.train()
    model.lm.eval()  # a mix of modes, as a half-set-up training loop may leave it
    model.head.weight.grad = torch.ones_like(model.head.weight)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    layer = model.encoder.stages[-1]
    explain_findings(model, _scan(model), _context(model), ["nodule", "fracture"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(model.head.weight.grad, torch.ones_like(model.head.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")
    assert not layer._forward_hooks and not layer._backward_hooks
    assert layer._is_full_backward_hook is None
    assert not any(p.requires_grad for p in model.encoder.parameters())  # still frozen


def test_model_is_restored_when_the_map_fails(
    model: RadiologyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = [p.requires_grad for p in model.parameters()]
    layer = model.encoder.stages[-1]

    def broken(self: explain.FindingLogits, scan: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(explain.FindingLogits, "forward", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        explain_findings(model, _scan(model), _context(model), ["nodule"])
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not layer._forward_hooks and not layer._backward_hooks


def test_bad_input_is_refused_with_a_reason(model: RadiologyModel) -> None:
    ctx = _context(model)
    with pytest.raises(ValueError, match="unknown finding 'effusion'"):
        explain_findings(model, _scan(model), ctx, ["effusion"])
    with pytest.raises(ValueError, match=r"\(1, 1, S, S\) radiograph"):
        explain_findings(model, torch.zeros(1, 32, 32), ctx, ["nodule"])
    with pytest.raises(ValueError, match="does not fit this model"):
        explain_findings(model, torch.zeros(1, 1, 64, 64), ctx, ["nodule"])
    with pytest.raises(ValueError, match="unknown method"):
        explain_findings(model, _scan(model), ctx, ["nodule"], method="lime")
    with pytest.raises(ValueError, match="unknown finding"):
        deletion_test(
            model, _scan(model), ctx, "mass", np.zeros((32, 32)), rng=np.random.default_rng(0)
        )


# -- pictures -----------------------------------------------------------------------------------


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_pngs_decode_to_the_input_size() -> None:
    image = np.random.default_rng(0).standard_normal((1, 32, 24)).astype(np.float32)
    grey = _decode(image_png(image))
    assert grey.mode == "L" and grey.size == (24, 32)
    assert np.asarray(grey).min() == 0 and np.asarray(grey).max() == 255
    heat = np.zeros((32, 24), dtype=np.float32)
    heat[4:8, 10:14] = 1.0
    over = np.asarray(_decode(overlay_png(image, heat)))
    assert over.shape == (32, 24, 3)
    cold = over[20:, :]  # no heat: the grey image, untouched
    assert np.array_equal(cold[..., 0], cold[..., 1]) and np.array_equal(cold[..., 1], cold[..., 2])
    assert np.array_equal(cold[..., 0], np.asarray(grey)[20:, :])
    hot = over[4:8, 10:14].astype(int)
    assert np.abs(hot[..., 0] - hot[..., 2]).max() > 20  # coloured where the map is
    with pytest.raises(ValueError, match="differ in shape"):
        overlay_png(image, np.zeros((8, 8)))


def test_volume_pngs_show_three_labelled_planes_through_the_peak() -> None:
    d, h, w = 8, 16, 20
    volume = np.random.default_rng(1).standard_normal((d, h, w)).astype(np.float32)
    size = (w + w + h + 2 * VOLUME_GAP, max(h, d) + LABEL_HEIGHT)
    plain = _decode(volume_png(volume[None]))
    assert plain.size == size
    heat = np.zeros((d, h, w), dtype=np.float32)
    heat[2, 5, 7] = 1.0
    over = np.asarray(_decode(volume_overlay_png(volume, heat)))
    assert over.shape == (size[1], size[0], 3)
    # the axial panel is slice z=2 and carries the peak's colour at (row 5, column 7)
    pixel = over[LABEL_HEIGHT + 5, 7].astype(int)
    assert abs(pixel[0] - pixel[2]) > 20
    assert np.asarray(plain)[:LABEL_HEIGHT].any()  # the panel names are drawn


# -- faithfulness measures ----------------------------------------------------------------------


def test_pointing_game_hits_misses_and_tolerance() -> None:
    truth = np.zeros((20, 20), dtype=bool)
    truth[5:8, 5:8] = True
    heat = np.zeros((20, 20), dtype=np.float32)
    heat[6, 6] = 1.0
    assert pointing_hit(heat, truth)
    heat = np.zeros((20, 20), dtype=np.float32)
    heat[7, 9] = 1.0  # two pixels right of the truth
    assert pointing_hit(heat, truth, tolerance=2)
    assert not pointing_hit(heat, truth, tolerance=1)
    heat = np.zeros((20, 20), dtype=np.float32)
    heat[15, 15] = 1.0
    assert not pointing_hit(heat, truth)
    assert not pointing_hit(np.zeros((20, 20)), truth)  # an empty map points nowhere
    with pytest.raises(ValueError, match="differ in shape"):
        pointing_hit(np.zeros((10, 10)), truth)


def test_top_overlap_and_energy_on_known_arrays() -> None:
    truth = np.zeros((10, 10), dtype=bool)
    truth[0, :5] = True  # 5 pixels
    heat = np.zeros((10, 10), dtype=np.float32)
    heat[0, :5] = 1.0
    assert top_overlap(heat, truth, 0.05) == pytest.approx(1.0)
    assert top_overlap(heat, truth, 0.10) == pytest.approx(0.5)  # 10 top pixels, 5 in truth
    assert top_overlap(1.0 - heat, truth, 0.05) == 0.0
    assert energy_inside(heat, truth) == pytest.approx(1.0)
    assert energy_inside(np.ones((10, 10)), truth) == pytest.approx(0.05)  # the area share
    assert energy_inside(np.zeros((10, 10)), truth) == 0.0
    assert top_region(np.zeros((10, 10)), 0.07).sum() == 7  # ties still give the exact count


def test_random_regions_are_blobs_of_the_exact_size_inside_the_content() -> None:
    image = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    image[:, :8] = image[:, -8:] = -1.0  # padding columns, as a non-square radiograph gets
    allowed = content_mask(image)
    assert not allowed[:, :8].any() and not allowed[:, -8:].any() and allowed[:, 8:-8].all()
    regions = random_regions(
        (64, 64), 300, 5, cell=8, allowed=allowed, rng=np.random.default_rng(1)
    )
    assert len(regions) == 5 and len({r.tobytes() for r in regions}) == 5
    for region in regions:
        assert region.sum() == 300 and not region[~allowed].any()
        _, pieces = ndimage.label(region)
        assert pieces <= 12  # a few contiguous blobs; 300 scattered pixels make ~250 pieces


def test_deletion_of_the_evidence_beats_deleting_elsewhere(model: RadiologyModel) -> None:
    """A bright patch on a faint background: blurring the patch away is what moves the head,
    blurring background blobs of the same size barely does."""
    rng = np.random.default_rng(5)
    image = (0.05 * rng.standard_normal((32, 32))).astype(np.float32)
    image[3:9, 3:9] += 6.0
    scan = torch.from_numpy(image)[None, None]
    ctx = _context(model)
    patch = np.zeros((32, 32), dtype=np.float32)
    patch[3:9, 3:9] = 1.0
    soft = explain.blurred(image, sigma=2.0)
    without = torch.from_numpy(np.where(patch > 0, soft, image))[None, None]
    with_p, _ = model.diagnose(scan, [ctx])
    without_p, _ = model.diagnose(without, [ctx])
    finding = FINDINGS[int(torch.argmax(with_p[0] - without_p[0]))]  # what the patch raises
    result = deletion_test(
        model, scan, ctx, finding, patch, fractions=(36 / 1024,), random_draws=6, rng=rng
    )
    assert result.top_probability[0] == pytest.approx(float(without_p[0, FINDINGS.index(finding)]))
    assert result.top_drop[0] > 0.0
    assert result.top_drop[0] > 5 * abs(result.random_drop[0])
    assert result.beats_random == (True,)
    assert result.random_at_least_top == (0.0,)
    # a map pointing at empty background explains nothing: masking it drops (almost) nothing
    corner = np.zeros((32, 32), dtype=np.float32)
    corner[-6:, -6:] = 1.0
    away = deletion_test(model, scan, ctx, finding, corner, fractions=(36 / 1024,), rng=rng)
    assert abs(away.top_drop[0]) < result.top_drop[0] / 5
