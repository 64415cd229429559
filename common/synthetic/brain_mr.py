"""Synthetic brain MR on a real template: masses and infarcts in named lobes, as MR series.

Why: the CT generator's argument holds for MR too; a model should learn lesions on real brain
anatomy, not on phantoms. The anatomy is the MNI ICBM152 2009a symmetric template (T1 plus
grey / white matter probability maps) that ships offline inside the installed ``nilearn``
package (read, never imported). Lobes come from coarse landmark planes in MNI space (central
sulcus, Sylvian fissure, parieto-occipital sulcus, tentorium), which is enough to say "a mass in
the left frontal lobe" and mean it. Per patient the template is warped like the chest CT;
lesions are inserted with mass effect and vasogenic edema (masses) or as cortical-subcortical
wedges (infarcts); T1 or FLAIR contrast, bias field and Rician noise follow.

Arrays are (z, y, x) in DICOM LPS order like ``chest_ct``: slices inferior -> superior, rows
anterior -> posterior, columns patient right -> left.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from pydicom.uid import MRImageStorage
from scipy import ndimage

from .chest_ct import axis_weights, nearest_indices, resample_axis, smooth_field, warp_coordinates
from .ct_series import write_image_series

__all__ = [
    "MR_CONTRASTS",
    "MR_FINDINGS",
    "MRFinding",
    "ReferenceBrain",
    "RenderedMR",
    "brain_lobe_names",
    "nilearn_data_dir",
    "reference_brain",
    "render_mr",
    "render_mr_with_truth",
    "sample_mr_finding",
    "write_mr_series",
]

logger = logging.getLogger(__name__)

NILEARN_INSTALL: Final[str] = "pip install nilearn==0.14.1"
TEMPLATE_FILES: Final[dict[str, str]] = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
MR_FINDINGS: Final[tuple[str, ...]] = ("mass", "infarct")
MR_CONTRASTS: Final[tuple[str, ...]] = ("T1", "FLAIR")
LOBES: Final[tuple[str, ...]] = ("frontal", "parietal", "temporal", "occipital")
REGIONS: Final[dict[str, int]] = {
    **{
        f"{side} {lobe} lobe": 1 + 2 * i + j
        for i, lobe in enumerate(LOBES)
        for j, side in enumerate(("right", "left"))
    },
    "cerebellum": 9,
    "brainstem": 10,
}
"""Region name -> label id of ``ReferenceBrain.regions`` (0 outside the brain)."""

# relative signal per tissue, (T1, FLAIR); white matter ~0.86 on the template's T1 scale
_SIGNAL: Final[dict[str, tuple[float, float]]] = {
    "gm": (0.65, 0.62),
    "wm": (0.86, 0.50),
    "csf": (0.27, 0.08),
    "mass": (0.55, 0.72),
    "necrosis": (0.33, 0.35),
    "edema": (0.62, 0.92),
    "infarct": (0.45, 0.88),
}


def brain_lobe_names() -> tuple[str, ...]:
    """The eight cerebral lobes by name: "right frontal lobe", "left frontal lobe", ..."""
    return tuple(name for name in REGIONS if name.endswith("lobe"))


def nilearn_data_dir() -> Path:
    """nilearn's bundled ``datasets/data`` folder, located without importing nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the MNI brain template ships in nilearn, which is not installed; run "
            f"`{NILEARN_INSTALL}`"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [f for f in TEMPLATE_FILES.values() if not (data / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{data} lacks {', '.join(missing)}; reinstall `{NILEARN_INSTALL}`")
    return data


@dataclass(frozen=True, eq=False)
class ReferenceBrain:
    """The template and its tissue and lobe maps on a (z, y, x) LPS grid (read-only arrays)."""

    t1: np.ndarray
    """float32 T1 signal, template scale / 255 (white matter ~0.86, 0 outside the brain)."""
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    """float32 tissue fractions (CSF: the brain's remainder)."""
    regions: np.ndarray
    """int16 region ids (REGIONS); 0 outside the brain."""
    spacing_mm: tuple[float, float, float]
    origin_lps_mm: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.t1.shape
        return int(z), int(y), int(x)


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(z, y, x) LPS array scaled to [0, 1] and the RAS affine of its (x, y, z) form."""
    import nibabel as nib  # only needed when the reference is built

    img = nib.load(path)
    current = nib.orientations.io_orientation(img.affine)
    wanted = nib.orientations.axcodes2ornt(("L", "P", "S"))
    img = img.as_reoriented(nib.orientations.ornt_transform(current, wanted))
    data = np.asarray(img.dataobj, dtype=np.float32) / 255.0
    return np.ascontiguousarray(data.transpose(2, 1, 0)), np.asarray(img.affine, dtype=float)


def _regions(
    brain: np.ndarray, shape: tuple[int, ...], origin: np.ndarray, sp: np.ndarray
) -> np.ndarray:
    """Lobes from landmark planes in MNI (RAS) millimetres."""
    z = (origin[2] + np.arange(shape[0]) * sp[0])[:, None, None]
    y = (-(origin[1] + np.arange(shape[1]) * sp[1]))[None, :, None]  # MNI y (anterior +)
    x = (-(origin[0] + np.arange(shape[2]) * sp[2]))[None, None, :]  # MNI x (right +)
    cerebellum = (y < -40) & (z < -14 - 0.15 * (y + 40))
    brainstem = (np.abs(x) < 14) & (y > -44) & (y < -8) & (z < -10) & ~cerebellum
    occipital = (y < -72) & ~cerebellum
    temporal = (z < -0.35 * y) & (y >= -72) & (np.abs(x) > 28) & ((y < 0) | (z < -12)) & ~cerebellum
    frontal = (y > -15 - 0.25 * z) & ~temporal
    lobe = np.full(np.broadcast_shapes(z.shape, y.shape, x.shape), 1, np.int16)  # parietal
    lobe = np.where(frontal, 0, lobe)
    lobe = np.where(temporal, 2, lobe)
    lobe = np.where(occipital, 3, lobe)
    left = np.broadcast_to(x < 0, lobe.shape).astype(np.int16)
    regions = (1 + 2 * lobe + left).astype(np.int16)
    regions = np.where(cerebellum, REGIONS["cerebellum"], regions)
    regions = np.where(brainstem, REGIONS["brainstem"], regions)
    return np.where(brain, regions, 0).astype(np.int16)


@functools.lru_cache(maxsize=4)
def reference_brain(grid: tuple[int, int, int] = (64, 128, 128)) -> ReferenceBrain:
    """The MNI template resampled (box-averaged) to ``grid`` over its field of view; ~0.5 s
    the first time in a process, then the same read-only object."""
    data = nilearn_data_dir()
    maps = {}
    affine = np.eye(4)
    for key, name in TEMPLATE_FILES.items():
        maps[key], affine = _load(data / name)
    src_shape = maps["t1"].shape
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    src_sp = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
    extent = [n * d for n, d in zip(src_shape, src_sp, strict=True)]
    sp = tuple(e / n for e, n in zip(extent, grid, strict=True))
    out = {}
    for key, arr in maps.items():
        for axis in (2, 1, 0):
            arr = resample_axis(
                arr, axis, axis_weights(src_shape[axis], src_sp[axis], grid[axis], sp[axis])
            )
        out[key] = np.ascontiguousarray(arr, dtype=np.float32)
    brain_src = maps["t1"] > 0.04
    idx = [nearest_indices(src_shape[a], src_sp[a], grid[a], sp[a]) for a in range(3)]
    brain = brain_src[np.ix_(*idx)]
    ras0 = affine @ np.array([0.0, 0.0, 0.0, 1.0])
    shift = [(sp[a] - src_sp[a]) / 2 for a in range(3)]
    origin = np.array([-ras0[0] + shift[2], -ras0[1] + shift[1], ras0[2] + shift[0]])
    gm, wm = np.clip(out["gm"], 0, 1), np.clip(out["wm"], 0, 1)
    csf = np.where(brain, np.clip(1 - gm - wm, 0, 1), 0).astype(np.float32)
    regions = _regions(brain, grid, origin, np.asarray(sp))
    arrays = [out["t1"], gm, wm, csf, regions]
    for a in arrays:
        a.setflags(write=False)
    return ReferenceBrain(
        t1=arrays[0],
        gm=arrays[1],
        wm=arrays[2],
        csf=arrays[3],
        regions=arrays[4],
        spacing_mm=(float(sp[0]), float(sp[1]), float(sp[2])),
        origin_lps_mm=(float(origin[0]), float(origin[1]), float(origin[2])),
    )


@dataclass(frozen=True)
class MRFinding:
    """One brain lesion, as a report would name it."""

    name: str
    """Either "mass" or "infarct"."""
    side: str
    """Either "left" or "right"."""
    lobe: str
    """One of "frontal", "parietal", "temporal", "occipital"."""
    size_mm: float
    """Mass diameter, or the infarct's extent from cortex inward."""
    edema: bool = True
    """Mass: surrounding vasogenic edema."""
    necrotic: bool = False
    """Mass: a necrotic centre."""

    def __post_init__(self) -> None:
        if self.name not in MR_FINDINGS:
            raise ValueError(f"unknown MR finding {self.name!r}; expected one of {MR_FINDINGS}")
        if self.side not in ("left", "right") or self.lobe not in LOBES:
            raise ValueError(f"no {self.side!r} {self.lobe!r} lobe")
        if not 5.0 <= self.size_mm <= 80.0:
            raise ValueError(f"lesion size {self.size_mm} mm is outside 5-80 mm")

    @property
    def region(self) -> str:
        return f"{self.side} {self.lobe} lobe"


def sample_mr_finding(name: str, rng: np.random.Generator) -> MRFinding:
    """Masses 10-50 mm (median ~25), mostly with edema; infarcts in the middle cerebral artery
    lobes (frontal, parietal, temporal) more than the posterior cerebral's (occipital)."""
    side = "left" if rng.random() < 0.5 else "right"
    if name == "mass":
        size = float(np.clip(np.rint(rng.lognormal(np.log(25.0), 0.35)), 10, 50))
        lobe = LOBES[int(rng.choice(4, p=[0.35, 0.25, 0.25, 0.15]))]
        return MRFinding(
            name, side, lobe, size, edema=bool(rng.random() < 0.8), necrotic=size >= 25
        )
    if name == "infarct":
        lobe = LOBES[int(rng.choice(4, p=[0.3, 0.3, 0.25, 0.15]))]
        return MRFinding(name, side, lobe, float(np.rint(rng.uniform(15, 45))), edema=False)
    raise ValueError(f"unknown MR finding {name!r}; expected one of {MR_FINDINGS}")


@dataclass(frozen=True, eq=False)
class RenderedMR:
    """One synthetic brain MR: the image, this patient's regions, where each lesion went."""

    image: np.ndarray
    """float32 signal, white matter ~0.86 before bias and noise."""
    regions: np.ndarray
    findings: tuple[MRFinding, ...]
    masks: tuple[np.ndarray, ...]
    """bool per finding: the lesion itself (mass incl. necrosis, or the infarct)."""
    edema: tuple[np.ndarray, ...]
    """bool per finding: its vasogenic edema (empty for infarcts and masses without)."""
    contrast: str
    spacing_mm: tuple[float, float, float]
    origin_lps_mm: tuple[float, float, float]


@dataclass
class _Brain:
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    regions: np.ndarray
    sp: np.ndarray

    def mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z, y, x = (
            np.arange(n, dtype=np.float32) * d for n, d in zip(self.t1.shape, self.sp, strict=True)
        )
        return z[:, None, None], y[None, :, None], x[None, None, :]


def _centre_in(brain: _Brain, region: int, reach_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A voxel of ``region`` at least ``reach_mm`` inside it (or its deepest one), in mm."""
    inside = brain.regions == region
    if not inside.any():
        raise ValueError(f"region {region} is missing from this anatomy")
    pts = np.argwhere(inside)
    lo, hi = np.maximum(pts.min(axis=0) - 1, 0), pts.max(axis=0) + 2
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    depth = ndimage.distance_transform_edt(inside[box], sampling=brain.sp)
    candidates = np.flatnonzero(depth >= min(reach_mm, 0.8 * float(depth.max())))
    idx = np.unravel_index(int(rng.choice(candidates)), depth.shape)
    return (np.array(idx) + lo) * brain.sp


def _mass_effect(brain: _Brain, centre: np.ndarray, radius: float) -> None:
    """Push tissue radially away from the mass: r is sampled from r - a exp(-(r/L)^2), which is
    monotone in r, so nothing folds; the midline and ventricles shift with it."""
    a, length = 0.6 * radius, 2.2 * radius
    reach = 3.0 * length
    lo = np.floor((centre - reach) / brain.sp).astype(int).clip(0)
    hi = np.minimum(np.ceil((centre + reach) / brain.sp).astype(int) + 1, brain.t1.shape)
    win = tuple(slice(int(s), int(e)) for s, e in zip(lo, hi, strict=True))
    grid = np.meshgrid(*(np.arange(s, e) for s, e in zip(lo, hi, strict=True)), indexing="ij")
    d = np.stack([g * s - c for g, s, c in zip(grid, brain.sp, centre, strict=True)])
    r = np.sqrt((d**2).sum(axis=0)) + 1e-6
    r_src = r - a * np.exp(-((r / length) ** 2))
    src = np.stack([(centre[k] + d[k] * (r_src / r)) / brain.sp[k] for k in range(3)])
    for name in ("t1", "gm", "wm", "csf"):
        arr = getattr(brain, name)
        arr[win] = ndimage.map_coordinates(arr, src, order=1, mode="nearest")
    brain.regions[win] = ndimage.map_coordinates(brain.regions, src, order=0, mode="nearest")


def _insert_mass(
    brain: _Brain, f: MRFinding, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    radius = f.size_mm / 2
    centre = _centre_in(brain, REGIONS[f.region], radius + 4.0, rng)
    _mass_effect(brain, centre, radius)
    z, y, x = brain.mm()
    r = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    bumpy = radius * (1 + 0.12 * smooth_field(rng, r.shape, brain.sp, max(radius, 8.0)))
    brain_mask = brain.regions > 0
    lesion = (r <= bumpy) & brain_mask
    parts = {"mass": lesion}
    if f.necrotic:
        parts["necrosis"] = lesion & (r <= 0.45 * bumpy)
    edema = np.zeros_like(lesion)
    if f.edema:
        spread = rng.uniform(0.4, 1.0) * radius + 5.0
        hemisphere = (x > centre[2]) if f.side == "left" else (x < centre[2])
        hemisphere = hemisphere | (np.abs(x - centre[2]) < radius)
        rough = spread * (1 + 0.35 * smooth_field(rng, r.shape, brain.sp, 12.0))
        # vasogenic edema tracks along white matter, in fingers, sparing the cortex
        edema = (r > bumpy) & (r <= bumpy + rough) & (brain.wm > 0.5) & hemisphere & brain_mask
    return lesion, edema, parts


def _insert_infarct(
    brain: _Brain, f: MRFinding, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A wedge from the cortical surface inward (a territorial infarct), grey and white matter."""
    region = brain.regions == REGIONS[f.region]
    outside = ndimage.distance_transform_edt(brain.regions > 0, sampling=brain.sp)
    cortex = region & (outside <= 1.5 * float(brain.sp.max())) & (brain.gm > 0.3)
    if not cortex.any():
        cortex = region
    pts = np.argwhere(cortex)
    surface = pts[int(rng.integers(len(pts)))] * brain.sp
    centroid = np.argwhere(brain.regions > 0).mean(axis=0) * brain.sp
    axis = centroid - surface
    axis /= np.linalg.norm(axis)
    z, y, x = brain.mm()
    d = (z - surface[0], y - surface[1], x - surface[2])
    along = d[0] * axis[0] + d[1] * axis[1] + d[2] * axis[2]
    radial = np.sqrt(np.maximum(d[0] ** 2 + d[1] ** 2 + d[2] ** 2 - along**2, 0.0))
    depth = f.size_mm
    half_width = rng.uniform(0.45, 0.7) * depth * (1 - np.clip(along / depth, 0, 1))
    wedge = (along >= -4.0) & (along <= depth) & (radial <= half_width + 2.0)
    lesion = wedge & region & ((brain.gm + brain.wm) > 0.5)
    return lesion, {"infarct": lesion}


def _signal(brain: _Brain, contrast: str) -> np.ndarray:
    c = MR_CONTRASTS.index(contrast)
    if contrast == "T1":
        return brain.t1.copy()  # the real template's T1 contrast
    return (
        _SIGNAL["gm"][c] * brain.gm + _SIGNAL["wm"][c] * brain.wm + _SIGNAL["csf"][c] * brain.csf
    ).astype(np.float32)


def render_mr_with_truth(
    reference: ReferenceBrain,
    findings: Sequence[MRFinding],
    rng: np.random.Generator,
    *,
    contrast: str = "T1",
    noise: float = 0.03,
) -> RenderedMR:
    """One patient: warped template, lesions inserted, bias field and Rician noise (``noise``
    is sigma relative to the signal scale, white matter ~0.86). Same seed, same anatomy,
    whatever the findings."""
    if contrast not in MR_CONTRASTS:
        raise ValueError(f"contrast must be one of {MR_CONTRASTS}, got {contrast!r}")
    anatomy_rng, lesion_rng, noise_rng = rng.spawn(3)
    coords = warp_coordinates(
        reference.shape, reference.spacing_mm, anatomy_rng, scale=(0.92, 1.08)
    )

    def warp(a: np.ndarray, order: int) -> np.ndarray:
        return ndimage.map_coordinates(a, coords, order=order, mode="constant", cval=0)

    brain = _Brain(
        t1=warp(reference.t1, 1),
        gm=warp(reference.gm, 1),
        wm=warp(reference.wm, 1),
        csf=warp(reference.csf, 1),
        regions=warp(reference.regions, 0).astype(np.int16),
        sp=np.asarray(reference.spacing_mm),
    )
    painted: list[tuple[dict[str, np.ndarray], np.ndarray]] = []
    masks: list[np.ndarray] = []
    edemas: list[np.ndarray] = []
    for f in findings:
        if f.name == "mass":
            lesion, edema, parts = _insert_mass(brain, f, lesion_rng)
        else:
            lesion, parts = _insert_infarct(brain, f, lesion_rng)
            edema = np.zeros_like(lesion)
        masks.append(lesion)
        edemas.append(edema)
        painted.append((parts, edema))
    image = _signal(brain, contrast)
    c = MR_CONTRASTS.index(contrast)
    texture = 1 + 0.04 * smooth_field(lesion_rng, image.shape, brain.sp, 6.0)
    for parts, edema in painted:
        image[edema] = _SIGNAL["edema"][c] * texture[edema]
        for name, region in parts.items():  # mass before necrosis: the core wins
            image[region] = _SIGNAL[name][c] * texture[region]
    image *= np.exp(0.08 * smooth_field(noise_rng, image.shape, brain.sp, 120.0))  # bias field
    if noise > 0:
        n1 = noise_rng.standard_normal(image.shape, dtype=np.float32) * noise
        n2 = noise_rng.standard_normal(image.shape, dtype=np.float32) * noise
        image = np.sqrt((image + n1) ** 2 + n2**2)  # magnitude images: Rician
    return RenderedMR(
        image=image.astype(np.float32, copy=False),
        regions=brain.regions,
        findings=tuple(findings),
        masks=tuple(masks),
        edema=tuple(edemas),
        contrast=contrast,
        spacing_mm=reference.spacing_mm,
        origin_lps_mm=reference.origin_lps_mm,
    )


def render_mr(
    reference: ReferenceBrain,
    findings: Sequence[MRFinding],
    rng: np.random.Generator,
    *,
    contrast: str = "T1",
    noise: float = 0.03,
) -> np.ndarray:
    """The image of ``render_mr_with_truth`` alone."""
    return render_mr_with_truth(reference, findings, rng, contrast=contrast, noise=noise).image


_SEQUENCES: Final[dict[str, dict[str, object]]] = {
    "T1": {
        "ScanningSequence": ["GR", "IR"],
        "SequenceVariant": ["SP", "MP"],
        "ScanOptions": "IR",
        "MRAcquisitionType": "3D",
        "RepetitionTime": "2300",
        "EchoTime": "2.98",
        "InversionTime": "900",
        "FlipAngle": "9",
        "SequenceName": "*tfl3d1",
    },
    "FLAIR": {
        "ScanningSequence": ["SE", "IR"],
        "SequenceVariant": ["SK", "SP", "MP"],
        "ScanOptions": "IR",
        "MRAcquisitionType": "2D",
        "RepetitionTime": "9000",
        "EchoTime": "81",
        "InversionTime": "2500",
        "FlipAngle": "150",
        "SequenceName": "*tir2d1",
    },
}
_DESCRIPTIONS: Final[dict[str, str]] = {"T1": "AX T1 MPRAGE", "FLAIR": "AX T2 FLAIR"}
MR_SCALE: Final[float] = 2000.0
"""Stored value per unit of signal (white matter ~1700 of 4095)."""


def write_mr_series(
    image: np.ndarray,
    spacing_mm: Sequence[float],
    out_dir: Path,
    *,
    phi: Mapping[str, str],
    study_uid: str,
    series_uid: str,
    accession: str,
    rng: np.random.Generator,
    contrast: str = "T1",
    field_strength_t: float = 3.0,
    manufacturer: str = "",
    institution: str = "",
    file_prefix: str = "",
    origin_lps_mm: Sequence[float] | None = None,
    series_number: int = 2,
) -> list[Path]:
    """One MR Image Storage file per axial slice (uint16, 12 bits used, MONOCHROME2), with the
    sequence's parameters and the caller's PHI; geometry and UIDs as ``write_ct_series``."""
    if contrast not in _SEQUENCES:
        raise ValueError(f"contrast must be one of {MR_CONTRASTS}, got {contrast!r}")
    stored = np.rint(np.clip(image, 0, None) * MR_SCALE).clip(0, 4095).astype("<u2")
    lo, hi = np.percentile(stored[stored > 0], [1, 99.5]) if (stored > 0).any() else (0, 1)
    attributes: dict[str, object] = {
        **_SEQUENCES[contrast],
        "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
        "MagneticFieldStrength": f"{field_strength_t:g}",
        "ImagingFrequency": f"{42.577 * field_strength_t:.4f}",
        "BitsStored": 12,
        "HighBit": 11,
        "WindowCenter": f"{(lo + hi) / 2:.0f}",
        "WindowWidth": f"{max(hi - lo, 1):.0f}",
    }
    return write_image_series(
        stored,
        spacing_mm,
        out_dir,
        sop_class=MRImageStorage,
        modality="MR",
        phi=phi,
        study_uid=study_uid,
        series_uid=series_uid,
        accession=accession,
        rng=rng,
        attributes=attributes,
        manufacturer=manufacturer,
        institution=institution,
        file_prefix=file_prefix,
        origin_lps_mm=origin_lps_mm,
        series_number=series_number,
        series_description=_DESCRIPTIONS[contrast],
        study_description="MRI BRAIN WITHOUT CONTRAST",
        body_part="HEAD",
    )
