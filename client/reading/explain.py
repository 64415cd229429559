"""Explanation maps per suggested finding, and the measures that say how far to trust them.

Why: a reader shown "pleural effusion 0.83" should be able to see what in the image drove it,
and a map is only worth showing if it is measured. Maps come from MONAI's Grad-CAM and
Grad-CAM++ (`monai.visualize`), not a hand-rolled variant, at the last residual stage of the
image (or volume) encoder: the gradient of one finding's head logit, taken through the whole
model (pooled features and the language model's context state alike), weights that stage's
channels. Faithfulness is measured with pure functions: the pointing game, the overlap of the
map's top pixels with the truth, and a deletion test against random regions of the same size
(`simulations/explain_bench.py` runs them on scans whose truth the generator knows).

Known limits, stated where they bite: the last stage is 1/16 of the input side (an 8 x 8 grid
for a 128 px radiograph), so a map cannot outline anything smaller than a cell; Grad-CAM keeps
only evidence FOR the finding (ReLU), so a map of a finding the head rejects may be empty.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import torch
from matplotlib import colormaps
from monai.visualize import GradCAM, GradCAMpp, ModelWithHooks
from monai.visualize.visualizer import default_upsampler
from PIL import Image, ImageDraw
from scipy import ndimage
from torch import nn

from fedrad.common.findings import FINDINGS
from fedrad.common.model.radiology_model import RadiologyModel

logger = logging.getLogger(__name__)

METHODS: Final[dict[str, type[GradCAM]]] = {"gradcam": GradCAM, "gradcampp": GradCAMpp}
POINTING_TOLERANCE: Final[int] = 2
"""Pixels (model grid) the map's peak may lie outside the truth and still count as a hit:
about 5 mm on a 128 px radiograph, the slack for where a 1 px truth border falls after area
resampling. Far below Grad-CAM's 16 px cell, on purpose: the pointing game should show that
coarseness, not forgive it (the bench also reports a half-cell tolerance beside it)."""
DELETION_FRACTIONS: Final[tuple[float, ...]] = (0.05, 0.1, 0.2)
PREDICT_CHUNK: Final[int] = 16  # masked copies scored per forward pass (volumes are large)
OVERLAY_COLORMAP: Final[str] = "turbo"


@dataclass(frozen=True)
class FindingMap:
    finding: str
    probability: float  # the head's presence probability for this scan and context
    heat: np.ndarray  # float32 in [0, 1] on the model input grid: (S, S) or (D, H, W)
    method: str  # "gradcam" or "gradcampp"


@dataclass(frozen=True)
class DeletionResult:
    """The finding's probability with the map's top pixels blurred away, against random
    regions of the same size blurred the same way (see `deletion_test`)."""

    finding: str
    probability: float  # on the untouched scan
    fractions: tuple[float, ...]
    top_probability: tuple[float, ...]  # per fraction: the map's top pixels masked
    random_probabilities: tuple[tuple[float, ...], ...]  # per fraction, per random region

    @property
    def top_drop(self) -> tuple[float, ...]:
        return tuple(self.probability - p for p in self.top_probability)

    @property
    def random_drop(self) -> tuple[float, ...]:
        """Mean drop over the random regions, per fraction."""
        return tuple(self.probability - float(np.mean(ps)) for ps in self.random_probabilities)

    @property
    def beats_random(self) -> tuple[bool, ...]:
        """Per fraction: masking the map's top pixels drops the probability more than the
        random regions do on average."""
        return tuple(t > r for t, r in zip(self.top_drop, self.random_drop, strict=True))

    @property
    def random_at_least_top(self) -> tuple[float, ...]:
        """Per fraction, the share of random regions that drop it at least as much as the
        map's top pixels (an empirical p-value: small means the map found what matters)."""
        return tuple(
            float(np.mean([self.probability - p >= top for p in ps]))
            for top, ps in zip(self.top_drop, self.random_probabilities, strict=True)
        )


# -- the maps ---------------------------------------------------------------------------------


class FindingLogits(nn.Module):
    """scan -> (B, findings) head logits for one fixed context, with gradients.

    The computation of `RadiologyModel.diagnose` for a batch of one modality, but calling the
    encoder and projector directly: `visual_prefix` runs a frozen 2-D encoder under no_grad
    (it has nothing to train), which would leave Grad-CAM no gradient to read."""

    def __init__(self, model: RadiologyModel, context_ids: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.context_ids = [int(i) for i in context_ids]

    def forward(self, scan: torch.Tensor) -> torch.Tensor:
        m = self.model
        if scan.dim() == 5:
            tokens, pooled = m.volume_encoder(scan)
            prefix = m.volume_projector(tokens)
        else:
            tokens, pooled = m.encoder(scan)
            prefix = m.projector(tokens)
        embeds, mask = m._left_padded(prefix, [self.context_ids] * scan.shape[0])
        _, hidden = m._lm_forward(embeds, mask, keep=1)
        features = torch.cat([pooled, hidden[:, -1]], dim=1)
        return m.head(features).float()


def target_layer(model: RadiologyModel, *, volume: bool) -> str:
    """Name (inside `FindingLogits`) of the encoder stage whose output is the feature map the
    encoder pools: the last residual unit of `encoder.stages` (or `volume_encoder.stages`).
    Found by identity, so a renamed or restructured encoder fails here instead of mapping a
    different layer."""
    encoder = model.volume_encoder if volume else model.encoder
    stages = getattr(encoder, "stages", None)
    if not isinstance(stages, nn.Sequential) or len(stages) == 0:
        raise LookupError(f"{type(encoder).__name__} has no `stages` sequence to map")
    last = stages[-1]
    convs = {type(m) for m in last.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))}
    expected = nn.Conv3d if volume else nn.Conv2d
    if convs != {expected}:
        found = sorted(c.__name__ for c in convs) or "no convolution"
        raise LookupError(f"the last encoder stage holds {found}, not {expected.__name__}")
    for name, module in model.named_modules():
        if module is last:
            return f"model.{name}"
    raise LookupError("the last encoder stage is not a submodule of the model")


class _Hooks(ModelWithHooks):
    """MONAI's activation and gradient hooks, registered with handles so that they come off
    the model afterwards (MONAI's own wrapper leaves them on for good)."""

    def __init__(self, module: nn.Module, layer: str) -> None:
        super().__init__(module, layer, register_forward=False, register_backward=False)
        target = self.get_layer(layer)
        self._target = target
        self._full_flag = target._is_full_backward_hook
        self._handles = [
            target.register_forward_hook(self.forward_hook(layer)),
            target.register_full_backward_hook(self.backward_hook(layer)),
        ]
        self.register_forward = self.register_backward = True

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        # torch leaves the module marked "has full backward hooks"; put back what it was
        self._target._is_full_backward_hook = self._full_flag


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """The model's requires_grad flags, .grad tensors and train/eval modes as found, however
    the block ends: explaining a scan must not change what training would do next."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    grads = [(p, p.grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for p, grad in grads:
            p.grad = grad
        for m, mode in modes:
            m.training = mode


def _check_scan(model: RadiologyModel, scan: torch.Tensor) -> None:
    config = model.config
    if scan.dim() == 4:
        expected: tuple[int, ...] = (1, 1, config.image_size, config.image_size)
    elif scan.dim() == 5:
        expected = (1, 1, *config.volume_shape)
    else:
        raise ValueError(
            f"scan must be a (1, 1, S, S) radiograph or a (1, 1, D, H, W) volume, got shape "
            f"{tuple(scan.shape)}"
        )
    if tuple(scan.shape) != expected:
        raise ValueError(f"scan shape {tuple(scan.shape)} does not fit this model: {expected}")


def _finding_index(finding: str) -> int:
    if finding not in FINDINGS:
        raise ValueError(f"unknown finding {finding!r}; expected one of {', '.join(FINDINGS)}")
    return FINDINGS.index(finding)


def _unit(raw: torch.Tensor) -> np.ndarray:
    """Divide by the peak: 0 stays 'no evidence for the finding' (MONAI's default normaliser
    maps max to 0 and min to 1, the reverse of what an overlay needs)."""
    heat = raw.detach().float().cpu().numpy()[0, 0]
    peak = float(heat.max())
    if not math.isfinite(peak) or peak <= 0.0:
        return np.zeros(heat.shape, dtype=np.float32)
    return np.clip(heat / peak, 0.0, 1.0).astype(np.float32)


def explain_findings(
    model: RadiologyModel,
    scan: torch.Tensor,
    context_ids: list[int],
    findings: Sequence[str],
    *,
    method: str = "gradcam",
) -> list[FindingMap]:
    """One map per finding (in the order asked), on the scan's own grid, normalised to [0, 1];
    all zeros where the method finds no evidence for the finding. The model comes back with
    its requires_grad flags, gradients, modes and hooks exactly as found."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    _check_scan(model, scan)
    indices = [_finding_index(f) for f in findings]
    volume = scan.dim() == 5
    layer = target_layer(model, volume=volume)
    wrapper = FindingLogits(model, context_ids)
    maps: list[FindingMap] = []
    with _untouched(model), torch.enable_grad():
        # Frozen or not, no parameter collects a gradient here; the input asks for one instead,
        # so the (frozen) encoder's activations are still differentiated.
        model.requires_grad_(False)
        wrapper.eval()
        hooks = _Hooks(wrapper, layer)
        try:
            cam = METHODS[method](
                nn_module=hooks,
                target_layers=layer,
                upsampler=default_upsampler,
                postprocessing=lambda x: x,
            )
            for finding, index in zip(findings, indices, strict=True):
                x = scan.detach().to(model.device, torch.float32).clone().requires_grad_(True)
                raw = cam(x, class_idx=index)
                assert hooks.score is not None  # set by the backward pass MONAI just ran
                probability = float(torch.sigmoid(hooks.score.detach().float()))
                maps.append(FindingMap(finding, probability, _unit(raw), method))
        finally:
            hooks.remove()
    return maps


# -- pictures ---------------------------------------------------------------------------------


def _grey(image: np.ndarray, *, dims: int) -> np.ndarray:
    """float in [0, 1] by the image's own range (the model input is z-normalised)."""
    array = np.asarray(image, dtype=np.float32)
    while array.ndim > dims and array.shape[0] == 1:
        array = array[0]
    if array.ndim != dims:
        raise ValueError(f"expected a {dims}-D image (leading 1s allowed), got {image.shape}")
    low, high = float(array.min()), float(array.max())
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _blend(grey: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    """RGB uint8: the colour map laid over the grey image with opacity alpha * heat, so cold
    regions show the image untouched and only the map's peaks cover it."""
    if heat.shape != grey.shape:
        raise ValueError(f"heat {heat.shape} and image {grey.shape} differ in shape")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be in [0, 1]")
    h = np.clip(np.nan_to_num(heat.astype(np.float32)), 0.0, 1.0)
    colour = colormaps[OVERLAY_COLORMAP](h)[..., :3].astype(np.float32)
    weight = (alpha * h)[..., None]
    rgb = grey[..., None] * (1.0 - weight) + colour * weight
    return np.round(rgb * 255.0).astype(np.uint8)


def image_png(image: np.ndarray) -> bytes:
    """The (S, S) model input (leading singleton axes allowed) as an 8-bit greyscale PNG."""
    return _png(np.round(_grey(image, dims=2) * 255.0).astype(np.uint8))


def overlay_png(image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.45) -> bytes:
    """The map over the grey image as an RGB PNG of the image's size."""
    return _png(_blend(_grey(image, dims=2), np.asarray(heat), alpha))


VOLUME_GAP: Final[int] = 2  # px between panels
LABEL_HEIGHT: Final[int] = 12  # px strip above the panels for their names


def _planes(volume: np.ndarray, centre: tuple[int, int, int]) -> list[tuple[str, np.ndarray]]:
    """Axial, coronal, sagittal slices in display orientation. The canonical axes are (slices
    inferior -> superior, rows anterior -> posterior, columns patient right -> left), so the
    axial slice is already as radiologists view it (patient right on the image left, anterior
    up); coronal and sagittal are flipped to put superior up (sagittal: anterior on the left).
    Panels keep the model grid, one pixel per voxel: its slices are usually thicker than its
    rows (32 slices over the same chest as 64 rows), so coronal and sagittal look squat."""
    z, y, x = centre
    return [
        (f"AX z{z}", volume[z]),
        (f"COR y{y}", volume[::-1, y, :]),
        (f"SAG x{x}", volume[::-1, :, x]),
    ]


def _panels(labelled: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """Panels side by side on black, top-aligned, each named in a strip above it."""
    height = max(p.shape[0] for _, p in labelled) + LABEL_HEIGHT
    width = sum(p.shape[1] for _, p in labelled) + VOLUME_GAP * (len(labelled) - 1)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    left = 0
    for _, panel in labelled:
        rgb = panel if panel.ndim == 3 else np.repeat(panel[..., None], 3, axis=2)
        canvas[LABEL_HEIGHT : LABEL_HEIGHT + rgb.shape[0], left : left + rgb.shape[1]] = rgb
        left += rgb.shape[1] + VOLUME_GAP
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    left = 0
    for name, panel in labelled:
        draw.text((left + 1, 0), name, fill=(255, 255, 255))
        left += panel.shape[1] + VOLUME_GAP
    return np.asarray(picture)


def _volume_array(volume: np.ndarray) -> np.ndarray:
    array = np.asarray(volume, dtype=np.float32)
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a (D, H, W) volume (leading 1s allowed), got {volume.shape}")
    return array


def volume_png(volume: np.ndarray) -> bytes:
    """Axial | coronal | sagittal slices through the volume's centre, labelled (see
    `_planes` for the orientation), one grey scale for all three."""
    grey = _grey(_volume_array(volume), dims=3)
    centre = (grey.shape[0] // 2, grey.shape[1] // 2, grey.shape[2] // 2)
    planes = [(n, np.round(p * 255.0).astype(np.uint8)) for n, p in _planes(grey, centre)]
    return _png(_panels(planes))


def volume_overlay_png(volume: np.ndarray, heat: np.ndarray, *, alpha: float = 0.45) -> bytes:
    """The three planes through the map's peak (the centre for an empty map), map laid over."""
    grey = _grey(_volume_array(volume), dims=3)
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != grey.shape:
        raise ValueError(f"heat {heat.shape} and volume {grey.shape} differ in shape")
    if float(heat.max()) > 0.0:
        peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
        centre = (int(peak[0]), int(peak[1]), int(peak[2]))
    else:
        centre = (grey.shape[0] // 2, grey.shape[1] // 2, grey.shape[2] // 2)
    planes = [
        (name, _blend(g, h, alpha))
        for (name, g), (_, h) in zip(_planes(grey, centre), _planes(heat, centre), strict=True)
    ]
    return _png(_panels(planes))


# -- faithfulness -----------------------------------------------------------------------------


def _same_shape(heat: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    heat, truth = np.asarray(heat, dtype=np.float32), np.asarray(truth, dtype=bool)
    if heat.shape != truth.shape:
        raise ValueError(f"heat {heat.shape} and truth {truth.shape} differ in shape")
    return heat, truth


def within(truth_mask: np.ndarray, tolerance: float) -> np.ndarray:
    """The truth grown by `tolerance` pixels (Euclidean distance on the model grid)."""
    truth = np.asarray(truth_mask, dtype=bool)
    if tolerance <= 0 or not truth.any():
        return truth
    return ndimage.distance_transform_edt(~truth) <= tolerance


def pointing_hit(
    heat: np.ndarray, truth_mask: np.ndarray, *, tolerance: float = POINTING_TOLERANCE
) -> bool:
    """Whether the map's peak (the first maximum in C order) lies within `tolerance` pixels
    of the truth. An empty map (no evidence anywhere) points nowhere: a miss."""
    heat, truth = _same_shape(heat, truth_mask)
    if float(heat.max()) <= 0.0:
        return False
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return bool(within(truth, tolerance)[peak])


def top_region(heat: np.ndarray, fraction: float) -> np.ndarray:
    """The round(fraction * size) highest pixels of the map (at least one); ties keep the
    earlier pixel, so the region always has exactly that many pixels."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat = np.asarray(heat, dtype=np.float32).ravel()
    count = max(1, round(fraction * flat.size))
    order = np.argsort(-flat, kind="stable")
    region = np.zeros(flat.size, dtype=bool)
    region[order[:count]] = True
    return region.reshape(np.shape(heat))


def top_overlap(heat: np.ndarray, truth_mask: np.ndarray, fraction: float) -> float:
    """IoU between the map's top `fraction` pixels and the truth region."""
    heat, truth = _same_shape(heat, truth_mask)
    top = top_region(heat, fraction)
    union = int((top | truth).sum())
    return float((top & truth).sum()) / union if union else 0.0


def energy_inside(heat: np.ndarray, truth_mask: np.ndarray) -> float:
    """Share of the map's total mass inside the truth (0 for an empty map); a uniform map
    scores the truth's area share."""
    heat, truth = _same_shape(heat, truth_mask)
    total = float(np.clip(heat, 0.0, None).sum())
    return float(np.clip(heat, 0.0, None)[truth].sum()) / total if total > 0 else 0.0


def blurred(scan: np.ndarray, sigma: float) -> np.ndarray:
    """The scan with detail finer than `sigma` pixels removed (Gaussian, reflecting edges)."""
    return ndimage.gaussian_filter(np.asarray(scan, dtype=np.float32), sigma=sigma, mode="reflect")


def content_mask(scan: np.ndarray) -> np.ndarray:
    """Pixels not in the constant padding preprocessing adds around a non-square radiograph
    (whole rows or columns of one value): random regions are drawn there only."""
    array = np.asarray(scan, dtype=np.float32)
    keep = np.ones(array.shape, dtype=bool)
    for axis in range(array.ndim):
        others = tuple(a for a in range(array.ndim) if a != axis)
        flat = np.ptp(array, axis=others) == 0
        index = [np.newaxis] * array.ndim
        index[axis] = slice(None)
        keep &= ~flat[tuple(index)]
    return keep if keep.any() else np.ones(array.shape, dtype=bool)


def random_regions(
    shape: tuple[int, ...],
    count: int,
    draws: int,
    *,
    cell: int,
    allowed: np.ndarray,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """`draws` random regions of exactly `count` pixels inside `allowed`, each the top pixels
    of a random field drawn on a grid `cell` times coarser and upsampled as Grad-CAM maps are:
    blobs as smooth as a map's top region, not scattered single pixels, so that the random
    baseline removes contiguous image content just as the map's region does."""
    coarse = tuple(max(1, math.ceil(s / cell)) for s in shape)
    upsample = default_upsampler(shape)
    regions = []
    for _ in range(draws):
        field = torch.from_numpy(rng.standard_normal(coarse).astype(np.float32))
        smooth = upsample(field[None, None])[0, 0].numpy()
        smooth = np.where(allowed, smooth, -np.inf)
        order = np.argsort(-smooth.ravel(), kind="stable")
        region = np.zeros(smooth.size, dtype=bool)
        region[order[: min(count, int(allowed.sum()))]] = True
        regions.append(region.reshape(shape))
    return regions


def _probabilities(
    model: RadiologyModel, scans: np.ndarray, context_ids: list[int], index: int
) -> list[float]:
    """The head's probability of one finding for each scan, through `diagnose` itself."""
    out: list[float] = []
    for start in range(0, len(scans), PREDICT_CHUNK):
        batch = torch.from_numpy(np.ascontiguousarray(scans[start : start + PREDICT_CHUNK]))
        presence, _ = model.diagnose(batch, [list(context_ids)] * len(batch))
        out.extend(float(p) for p in presence[:, index])
    return out


def deletion_test(
    model: RadiologyModel,
    scan: torch.Tensor,
    context_ids: list[int],
    finding: str,
    heat: np.ndarray,
    *,
    fractions: Sequence[float] = DELETION_FRACTIONS,
    random_draws: int = 8,
    rng: np.random.Generator,
) -> DeletionResult:
    """Blur away the map's top `fraction` of pixels and, as the baseline, `random_draws`
    random blobs of the same pixel count (`random_regions`); compare the finding's probability.

    Blurred, not mean-filled: a flat mean-grey patch in a dark lung is itself an opacity with
    sharp edges, which the head may read as effusion or consolidation, mixing "evidence removed"
    with "evidence added". A blur (sigma = half an encoder cell) removes edges, lines and small
    opacities and adds nothing; it leaves large smooth density (a big effusion, the heart's
    size) largely in place, so for those findings this test understates what the map found."""
    _check_scan(model, scan)
    index = _finding_index(finding)
    if random_draws < 1:
        raise ValueError("random_draws must be >= 1")
    image = scan.detach().float().cpu().numpy()[0, 0]
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != image.shape:
        raise ValueError(f"heat {heat.shape} does not match the scan grid {image.shape}")
    cell = math.prod(model.config.encoder_strides)  # one Grad-CAM cell, in input pixels
    soft = blurred(image, sigma=cell / 2)
    allowed = content_mask(image)
    scans = [image]
    for fraction in fractions:
        top = top_region(heat, fraction)
        others = random_regions(
            image.shape, int(top.sum()), random_draws, cell=cell, allowed=allowed, rng=rng
        )
        scans.extend(np.where(region, soft, image) for region in (top, *others))
    probs = _probabilities(model, np.stack(scans)[:, None], context_ids, index)
    base, rest = probs[0], probs[1:]
    step = 1 + random_draws
    chunks = [rest[i * step : (i + 1) * step] for i in range(len(fractions))]
    return DeletionResult(
        finding=finding,
        probability=base,
        fractions=tuple(float(f) for f in fractions),
        top_probability=tuple(c[0] for c in chunks),
        random_probabilities=tuple(tuple(c[1:]) for c in chunks),
    )
