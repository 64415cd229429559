"""Draws chest-radiograph-like images carrying the cohort's findings, fast and deterministically.

Why this exists: the federation needs images whose findings a small model can learn at 128x128,
with per-site acquisition differences, without shipping real patient data. Everything is drawn
with vectorised numpy on a canvas of at most ``MAX_CANVAS`` pixels a side, then upsampled
bilinearly to the site's matrix; quantum noise is added at full resolution by ``to_stored``.

Frame: millimetres in the patient frame, origin near the image centre. ``x`` grows to the image
right, which is the patient's LEFT (standard radiographic display, PA and AP alike); ``y`` grows
downwards (caudal). So a "left" finding appears on the image's right half: never flip images
horizontally in augmentation.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
from scipy import ndimage

from fedrad.common.findings import FINDINGS, LATERAL_FINDINGS

MAX_CANVAS: Final[int] = 512
"""Longest side (pixels) of the drawing canvas; larger matrices are upsampled from it."""

ZONES: Final[tuple[str, ...]] = ("upper", "middle", "lower")
SIZES: Final[tuple[str, ...]] = ("small", "moderate", "large")
CARDIAC_DEGREES: Final[tuple[str, ...]] = ("mild", "moderate", "marked")
CTR_BANDS: Final[dict[str, tuple[float, float]]] = {
    "mild": (0.56, 0.595),
    "moderate": (0.60, 0.645),
    "marked": (0.65, 0.68),
}
"""Cardiothoracic ratios drawn for each degree of cardiomegaly (`cardiac_degree` inverts them);
a margin below each cut-off, so a ratio rounded to 3 decimals keeps its degree."""
CONSOLIDATION_RADII_MM: Final[dict[str, tuple[float, float]]] = {
    "small": (26.0, 22.0),
    "moderate": (37.0, 32.0),
    "large": (50.0, 43.0),
}
"""(horizontal, vertical) radius of a consolidation of each extent; without an extent the radii
are drawn in 28-46 x 24-40 mm, a moderate one on average."""
DEVICES: Final[tuple[str, ...]] = (
    "ecg_leads",
    "central_line",
    "endotracheal_tube",
    "nasogastric_tube",
)

View = Literal["PA", "AP"]
_ZONE_BANDS: Final[dict[str, tuple[float, float]]] = {
    "upper": (0.14, 0.36),
    "middle": (0.38, 0.6),
    "lower": (0.6, 0.78),
}
"""Craniocaudal lung fractions a nodule of each zone is placed in."""
_ZONE_CENTRES: Final[dict[str, float]] = {"upper": 0.28, "middle": 0.52, "lower": 0.78}
"""Craniocaudal lung fraction a consolidation of each zone is centred on."""
_SIGN: Final[dict[str, float]] = {"right": -1.0, "left": 1.0}
_F32 = np.float32
_RIB_WARP: Final[float] = 0.012


@dataclass(frozen=True)
class Finding:
    """One finding as drawn in the image (the truth that ground_truth.csv records)."""

    name: str  # one of FINDINGS
    side: str | None = None  # "left"/"right"/"bilateral" (patient side) for lateral findings
    size: str | None = None  # "small"/"moderate"/"large": effusion, pneumothorax
    size_mm: float | None = None  # nodule diameter
    zone: str | None = None  # "upper"/"middle"/"lower": nodule, consolidation
    rib: int | None = None  # fracture: rib number (4..9) counted from the apex
    chronic: bool = False  # fracture: old and healed (callus, little step-off)
    ctr: float | None = None  # cardiomegaly: cardiothoracic ratio on a PA view
    extent: str | None = None  # consolidation: "small"/"moderate"/"large"; None: drawn
    centre: tuple[float, float] | None = None
    """Where a nodule or consolidation sits, as (lateral, craniocaudal) fractions of its lung:
    0 at the medial edge / apex, 1 at the lateral edge / dome. A fracture uses the lateral one
    (its rib fixes the height). Relative to the lung, so it stays put when a later visit's
    positioning or inspiration differs; None: drawn afresh at each rendering."""

    def __post_init__(self) -> None:
        if self.name not in FINDINGS:
            raise ValueError(f"unknown finding {self.name!r}")
        if self.name in LATERAL_FINDINGS and self.side not in ("left", "right", "bilateral"):
            raise ValueError(f"{self.name} needs a side, got {self.side!r}")
        if self.extent is not None and self.extent not in SIZES:
            raise ValueError(f"extent must be one of {SIZES}, got {self.extent!r}")

    @property
    def sides(self) -> tuple[str, ...]:
        """The patient sides the finding occupies."""
        if self.side == "bilateral":
            return ("right", "left")
        return (self.side,) if self.side else ()


@dataclass(frozen=True)
class Anatomy:
    """One patient's geometry and tissue densities (mm, display units 0..1)."""

    shift_x: float  # positioning offset of the midline
    shift_y: float
    rotation_deg: float  # small in-plane rotation
    half_width: float  # midline to lateral lung edge (half the internal thoracic width)
    medial: float  # midline to the lung's medial edge
    apex_y: float  # top of the lungs
    dome_right_y: float  # top of the right hemidiaphragm (patient right, image left)
    dome_left_y: float
    ctr: float  # normal cardiothoracic ratio (PA)
    heart_tilt_deg: float
    soft_tissue: float  # body density
    lung_depth: float  # how much darker aerated lung is than soft tissue
    rib_spacing: float
    rib_width: float
    rib_drop: float  # how far the posterior ribs sweep down laterally
    vessel_gain: float
    breast: float  # breast shadow density (0 for men)


def sample_anatomy(rng: np.random.Generator, *, sex: str, view: View) -> Anatomy:
    """Draw a plausible adult; AP (portable, often supine) views inspire less."""
    male = sex == "M"
    half = rng.normal(140.0 if male else 128.0, 7.0)
    apex = rng.normal(-138.0, 7.0)
    dome_r = apex + rng.normal(192.0 if view == "PA" else 172.0, 10.0)
    return Anatomy(
        shift_x=float(rng.normal(0.0, 6.0)),
        shift_y=float(rng.normal(0.0, 8.0)),
        rotation_deg=float(rng.normal(0.0, 1.5)),
        half_width=float(np.clip(half, 112.0, 160.0)),
        medial=float(rng.uniform(20.0, 26.0)),
        apex_y=float(apex),
        dome_right_y=float(dome_r),
        dome_left_y=float(dome_r + rng.uniform(6.0, 22.0)),
        ctr=float(rng.uniform(0.40, 0.48)),
        heart_tilt_deg=float(rng.uniform(30.0, 42.0)),
        soft_tissue=float(rng.uniform(0.40, 0.48)),
        lung_depth=float(rng.uniform(0.25, 0.32)),
        rib_spacing=float(rng.uniform(21.0, 25.0)),
        rib_width=float(rng.uniform(9.0, 11.5)),
        rib_drop=float(rng.uniform(38.0, 52.0)),
        vessel_gain=float(rng.uniform(0.7, 1.2)),
        breast=0.0 if male else float(rng.uniform(0.02, 0.07)),
    )


def reposition(anatomy: Anatomy, *, view: View, rng: np.random.Generator) -> Anatomy:
    """The same patient on another day: positioning (shift, rotation) drawn afresh and the
    inspiration a little different, an AP (portable, often supine) film inspiring less as in
    `sample_anatomy`. ``anatomy`` is the patient's own, drawn once for a PA view."""
    depth = float(rng.normal(0.0, 4.0)) - (20.0 if view == "AP" else 0.0)
    return dataclasses.replace(
        anatomy,
        shift_x=float(rng.normal(0.0, 6.0)),
        shift_y=float(rng.normal(0.0, 8.0)),
        rotation_deg=float(rng.normal(0.0, 1.5)),
        dome_right_y=anatomy.dome_right_y + depth,
        dome_left_y=anatomy.dome_left_y + depth,
    )


def cardiac_degree(ctr: float) -> str:
    """The degree of cardiomegaly a cardiothoracic ratio is reported as."""
    return "mild" if ctr < 0.6 else ("moderate" if ctr < 0.65 else "marked")


def _pick(rng: np.random.Generator, options: tuple[str, ...], p: tuple[float, ...]) -> str:
    return options[int(rng.choice(len(options), p=np.asarray(p) / sum(p)))]


def sample_finding(name: str, rng: np.random.Generator) -> Finding:
    """Draw the details (side, size, zone) of one finding."""
    lr = ("left", "right")
    if name == "nodule":
        size = 6.0 + 24.0 * rng.beta(1.3, 3.0)
        zone = _pick(rng, ZONES, (0.45, 0.30, 0.25))
        return Finding(name, side=_pick(rng, lr, (1, 1)), size_mm=round(size, 1), zone=zone)
    if name == "pleural_effusion":
        side = _pick(rng, ("left", "right", "bilateral"), (0.32, 0.38, 0.30))
        return Finding(name, side=side, size=_pick(rng, SIZES, (0.45, 0.35, 0.20)))
    if name == "cardiomegaly":
        return Finding(name, ctr=round(float(rng.uniform(0.56, 0.68)), 3))
    if name == "pneumothorax":
        return Finding(name, side=_pick(rng, lr, (1, 1)), size=_pick(rng, SIZES, (0.5, 0.3, 0.2)))
    if name == "consolidation":
        side = _pick(rng, ("left", "right", "bilateral"), (0.38, 0.50, 0.12))
        return Finding(name, side=side, zone=_pick(rng, ZONES, (0.25, 0.25, 0.50)))
    if name == "fracture":
        return Finding(
            name,
            side=_pick(rng, lr, (1, 1)),
            rib=int(rng.integers(4, 10)),
            chronic=bool(rng.random() < 0.3),
        )
    raise ValueError(f"unknown finding {name!r}")


def anchor_finding(
    finding: Finding,
    anatomy: Anatomy,
    rng: np.random.Generator,
    *,
    fit_mm: float | None = None,
) -> Finding:
    """The finding with its place in this patient's lungs fixed (``centre``), so that every
    visit of a followed patient draws it in the same place: a nodule where a ``fit_mm`` nodule
    (the largest it will grow to) lies inside the lung and clear of a moderately enlarged heart,
    a consolidation in its zone, a fracture on the lateral arc of its rib. Other findings, and
    ones already placed, come back unchanged."""
    if finding.centre is not None:
        return finding
    if finding.name == "nodule":
        sg = _SIGN[finding.side or "right"]
        r = 0.5 * (fit_mm or finding.size_mm or 10.0)
        hx, hy, ha, _, _ = _heart_ellipse(anatomy, 0.62)
        zone = finding.zone or "upper"
        placed = _place_fractions(anatomy, sg, zone, r, hx, hy, ha, rng)
        lo, hi = _ZONE_BANDS[zone]
        return dataclasses.replace(finding, centre=placed or (0.6, 0.5 * (lo + hi)))
    if finding.name == "consolidation":
        zf = _ZONE_CENTRES[finding.zone or "lower"]
        vertical = zf + float(rng.normal(0.0, 0.03))
        return dataclasses.replace(finding, centre=(float(rng.uniform(0.35, 0.65)), vertical))
    if finding.name == "fracture":
        return dataclasses.replace(finding, centre=(float(rng.uniform(0.55, 0.85)), 0.5))
    return finding


def sample_devices(rng: np.random.Generator, *, rate: float) -> tuple[str, ...]:
    """Support devices seen on ICU portable films; each device appears with ``rate``."""
    return tuple(d for d in DEVICES if rng.random() < rate)


# --------------------------------------------------------------------------------------------
# geometry helpers


def _ramp(v: np.ndarray, width: float) -> np.ndarray:
    """A soft step from 0 to 1 over ``width`` (cheaper than a sigmoid, same look)."""
    return np.clip(v * _F32(1.0 / width) + _F32(0.5), 0.0, 1.0)


def _sq(v: np.ndarray) -> np.ndarray:
    return v * v


def _dist(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Euclidean norm; np.hypot is several times slower on float32."""
    return np.sqrt(dx * dx + dy * dy)


@functools.lru_cache(maxsize=16)
def _axes(rows: int, cols: int, px: float) -> tuple[np.ndarray, np.ndarray]:
    ys = ((np.arange(rows, dtype=_F32) - (rows - 1) / 2) * px)[:, None]
    xs = ((np.arange(cols, dtype=_F32) - (cols - 1) / 2) * px)[None, :]
    ys.flags.writeable = False
    xs.flags.writeable = False
    return ys, xs


class _Frame:
    """The canvas grid in the patient frame, and the way back to pixels for local windows."""

    def __init__(self, rows: int, cols: int, px: float, a: Anatomy) -> None:
        ys, xs = _axes(rows, cols, px)
        th = math.radians(a.rotation_deg)
        self.c, self.s = math.cos(th), math.sin(th)
        self.rows, self.cols, self.px, self.a = rows, cols, px, a
        dx, dy = xs - _F32(a.shift_x), ys - _F32(a.shift_y)
        self.gx = _F32(self.c) * dx + _F32(self.s) * dy
        self.gy = _F32(-self.s) * dx + _F32(self.c) * dy

    def window(self, x: float, y: float, r: float) -> tuple[slice, slice]:
        """Pixel slices covering a disc of radius ``r`` mm around patient point (x, y)."""
        cx = self.c * x - self.s * y + self.a.shift_x
        cy = self.s * x + self.c * y + self.a.shift_y
        col, row = cx / self.px + (self.cols - 1) / 2, cy / self.px + (self.rows - 1) / 2
        rp = r / self.px + 2
        r0, r1 = max(0, int(row - rp)), min(self.rows, int(row + rp) + 1)
        c0, c1 = max(0, int(col - rp)), min(self.cols, int(col + rp) + 1)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _dome(a: Anatomy, sg: float) -> float:
    return a.dome_left_y if sg > 0 else a.dome_right_y


def _lung_shape(x: np.ndarray, y: np.ndarray, a: Anatomy, sg: float) -> np.ndarray:
    """Soft mask of one lung's outline (apex to deep costophrenic sulcus), ignoring the dome."""
    top, base = a.apex_y, _dome(a, sg) + 62.0
    v = np.clip((y - _F32(top)) * _F32(1.7 / (base - top)), 0.0, 1.0)
    half = _F32(0.5 * (a.half_width - a.medial)) * (_F32(0.62) + _F32(0.38) * np.sqrt(v))
    u = (x * _F32(sg) - _F32(a.medial) - half) / half
    w = (y - _F32(0.5 * (top + base))) * _F32(2.0 / (base - top))
    w2 = w * w
    f = u * u + _F32(0.35) * w2 + _F32(0.65) * w2 * w2
    return _ramp(_F32(1.0) - f, 0.08)


def _dome_y(x: np.ndarray, a: Anatomy, sg: float) -> np.ndarray:
    """The hemidiaphragm contour: highest mid-lung, dropping into the costophrenic sulci."""
    peak = a.medial + 0.42 * (a.half_width - a.medial)
    k = 46.0 / (a.half_width - peak) ** 2
    d = x * _F32(sg) - _F32(peak)
    return _F32(_dome(a, sg)) + _F32(k) * d * d


def _lung_mask(x: np.ndarray, y: np.ndarray, a: Anatomy, sg: float) -> np.ndarray:
    return _lung_shape(x, y, a, sg) * _ramp(_dome_y(x, a, sg) - y, 3.0)


def _seg_dist(x: np.ndarray, y: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Distance (mm) from each point to a polyline."""
    out = np.full(np.broadcast_shapes(x.shape, y.shape), np.inf, dtype=_F32)
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        vx, vy = x1 - x0, y1 - y0
        t = np.clip(
            ((x - _F32(x0)) * _F32(vx) + (y - _F32(y0)) * _F32(vy)) / (vx * vx + vy * vy), 0, 1
        )
        dx, dy = x - _F32(x0) - t * _F32(vx), y - _F32(y0) - t * _F32(vy)
        np.minimum(out, np.sqrt(dx * dx + dy * dy), out=out)
    return out


def _smooth_noise(rng: np.random.Generator, rows: int, cols: int, cell: int) -> np.ndarray:
    """Band-limited noise with unit-ish std, generated coarse and upsampled (cheap)."""
    small = rng.standard_normal((rows // cell + 3, cols // cell + 3), dtype=_F32)
    small = ndimage.gaussian_filter(small, 0.7)
    small *= _F32(1.0 / (small.std() + 1e-6))
    return ndimage.zoom(small, cell, order=1)[:rows, :cols]


def _vessels(
    rng: np.random.Generator,
    gx: np.ndarray,
    gy: np.ndarray,
    hil_y: float,
    rows: int,
    cols: int,
    px: float,
) -> np.ndarray:
    """Lung markings: tapering, gently bending rays from each hilum, plus fine mottle."""
    left = gx >= 0  # one pass for both lungs; each side reads its own half of the knots
    dx, dy = np.abs(gx) - _F32(40.0), gy - _F32(hil_y)
    rho = np.sqrt(dx * dx + dy * dy) + _F32(1.0)
    p0, p1 = rng.uniform(0.0, 6.0, size=2)
    bend = np.sin(rho * _F32(1 / 35.0) + (_F32(p0) + _F32(p1 - p0) * left))
    ang = np.arctan2(dy, dx) + _F32(0.25) * bend
    knots = rng.standard_normal(224).astype(_F32)
    pos = ang * _F32(96 / (2 * math.pi)) + _F32(56.0) + _F32(112.0) * left  # ~96 knots a turn
    i0 = pos.astype(np.intp)
    w1 = pos - i0
    n = knots[i0] * (_F32(1.0) - w1) + knots[i0 + 1] * w1
    inv_w = rho * np.exp(rho * _F32(1 / 110.0)) * _F32(1 / 9.0)  # 1/width: vessels taper outwards
    out = np.clip(_F32(1.0) - np.abs(n) * inv_w, 0.0, 1.0) * _ramp(rho - _F32(22.0), 14.0)
    mottle = _smooth_noise(rng, rows, cols, max(2, round(5.0 / px)))
    return out * _F32(0.8) + np.clip(mottle, 0.0, None) * _F32(0.18)


def _upsample(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear upsampling to the site matrix; a fast exact path for the common 2x case."""
    if img.shape == (rows, cols):
        return img
    h, w = img.shape
    if (rows, cols) == (2 * h, 2 * w):
        p = np.pad(img, 1, mode="edge")
        c, out = p[1:-1, 1:-1], np.empty((rows, cols), dtype=_F32)
        for r, v in ((0, 0.75 * c + 0.25 * p[:-2, 1:-1]), (1, 0.75 * c + 0.25 * p[2:, 1:-1])):
            vp = np.pad(v, ((0, 0), (1, 1)), mode="edge")
            out[r::2, 0::2] = 0.75 * v + 0.25 * vp[:, :-2]
            out[r::2, 1::2] = 0.75 * v + 0.25 * vp[:, 2:]
        return out
    return ndimage.zoom(img, (rows / h, cols / w), order=1, grid_mode=True, mode="nearest")


# --------------------------------------------------------------------------------------------
# the drawing


def render_chest(
    anatomy: Anatomy,
    findings: tuple[Finding, ...] | list[Finding],
    *,
    rows: int,
    cols: int,
    spacing_mm: float,
    view: View,
    rng: np.random.Generator,
    devices: tuple[str, ...] = (),
    texture_rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Draw one frontal chest radiograph, display brightness in about [0, 1] (float32).

    The anatomy's texture is drawn from one child stream and the findings from another, so the
    same ``rng`` state with and without a finding gives images that differ only by the finding.
    ``texture_rng`` replaces the texture's stream: a followed patient's visits pass the same
    one, so the lung markings are the patient's own rather than new at every visit.
    """
    tex_rng, find_rng = rng.spawn(2)
    if texture_rng is not None:
        tex_rng = texture_rng
    f = max(1, math.ceil(max(rows, cols) / MAX_CANVAS))
    crow, ccol = math.ceil(rows / f), math.ceil(cols / f)
    fr = _Frame(crow, ccol, spacing_mm * f, anatomy)
    a, gx, gy = anatomy, fr.gx, fr.gy
    found = {fd.name: fd for fd in findings}
    ap = view == "AP"
    top, tw = a.apex_y, a.half_width

    lungs = {s: _lung_mask(gx, gy, a, sg) for s, sg in _SIGN.items()}
    lung = lungs["right"] + lungs["left"]
    dome_r = _dome_y(gx, a, -1.0)
    dome_c = dome_r + (_dome_y(gx, a, 1.0) - dome_r) * (gx >= 0)
    abdomen = _ramp(gy - dome_c, 3.0)

    # heart: a tilted ellipse sitting on the left hemidiaphragm, 2/3 of it left of the midline
    cm = found.get("cardiomegaly")
    ctr = (cm.ctr if cm is not None and cm.ctr else a.ctr) * (1.07 if ap else 1.0)
    hx, hy, ha, hb, th = _heart_ellipse(a, ctr)
    dx, dy = gx - _F32(hx), gy - _F32(hy)
    xr = dx * _F32(math.cos(th)) + dy * _F32(math.sin(th))
    yr = -dx * _F32(math.sin(th)) + dy * _F32(math.cos(th))
    heart = _ramp(_F32(1.0) - (xr * xr) * _F32(1 / ha**2) - (yr * yr) * _F32(1 / hb**2), 0.07)

    # mediastinum (with aortic knob), trachea, spine
    knob_y = top + 48.0
    med_w = _F32(27.0) + _F32(8.0) * np.clip((gy - _F32(top)) / _F32(120.0), 0.0, 1.0)
    med = _ramp(med_w - np.abs(gx - _F32(4.0)), 4.0) * _ramp(gy - _F32(top - 60.0), 6.0)
    kd = _dist(gx - _F32(30.0), gy - _F32(knob_y))
    med = np.maximum(med, _ramp(_F32(17.0) - kd, 3.0))
    med = np.maximum(med, heart)
    trachea = _ramp(_F32(8.0) - np.abs(gx), 4.0) * _ramp(_F32(top + 55.0) - gy, 20.0)
    spine = _ramp(_F32(20.0) - np.abs(gx), 3.0)
    spine = spine * (_F32(0.85) + _F32(0.15) * np.cos(gy * _F32(2 * math.pi / 24.0)))

    bx, by = _sq(gx * _F32(1 / (tw + 38.0))), _sq((gy - _F32(70.0)) * _F32(1 / 300.0))
    body = _ramp(_F32(1.0) - bx * bx - by * by, 0.05)
    neck = _ramp(_F32(62.0) - np.abs(gx), 8.0)
    shoulder = _ramp(gy - _F32(top - 20.0) + np.abs(gx) * _F32(0.25) - _F32(10.0), 20.0)
    body = body * np.maximum(neck, shoulder)

    # aerated lung fraction: what makes lung dark
    vprof = np.clip((gy - _F32(top)) / _F32(a.dome_right_y - top), 0.0, 1.0)
    air = lung * (_F32(1.0) - med) * (_F32(0.72) + _F32(0.28) * np.sin(vprof * _F32(math.pi)))
    vessel_ok = lung * (_F32(1.0) - med)

    # bones: posterior and anterior ribs as one periodic pattern in a warped coordinate
    u = np.abs(gx) * _F32(1.0 / tw)
    t_post = gy + _F32(12.0) * u - _F32(a.rib_drop) * u**2.4
    phase = (t_post - _F32(top - 14.0)) * _F32(1.0 / a.rib_spacing)
    phase = phase - _F32(_RIB_WARP) * phase * phase  # intercostal spaces widen caudally
    frac = phase - np.floor(phase)
    hw_frac = 0.5 * a.rib_width / a.rib_spacing
    fx = found.get("fracture")
    if fx is not None:
        k = (fx.rib or 6) - 1
        sg = _SIGN[fx.side or "right"]
        if fx.centre is None:
            uf = float(find_rng.uniform(0.6, 0.88))
        else:  # the lateral fraction of the lung, as a fraction of the half-width
            uf = _lung_point(a, sg, fx.centre[0], 0.0)[0] * sg / tw
        step = (0.25 if fx.chronic else find_rng.uniform(0.6, 0.9)) * a.rib_width
        gap = 1.5 if fx.chronic else find_rng.uniform(4.5, 6.5)
        in_rib = (np.floor(phase) == k) & (gx * _F32(sg) > 0)
        lateral = in_rib & (u > _F32(uf))
        frac = np.where(lateral, np.clip(frac - _F32(step / a.rib_spacing), 0.0, 1.0), frac)
        gap_mask = in_rib & (np.abs(u - _F32(uf)) * _F32(tw) < _F32(gap / 2))
    band = _ramp(_F32(hw_frac) - np.abs(frac - _F32(0.5)), 0.06)
    if fx is not None:
        band = np.where(gap_mask, _F32(0.0), band)
    ribs_n = (phase >= 0) & (phase < 11)
    thorax = _ramp(_F32(1.03) - u, 0.05) * (u > 0.09) * ribs_n
    post = band * thorax * (_F32(0.25) + _F32(0.75) * lung * (_F32(1.0) - med))
    t_ant = gy + _F32(55.0) * u**1.3
    aphase = (t_ant - _F32(top + 30.0)) * _F32(1.0 / (a.rib_spacing * 1.15))
    afrac = aphase - np.floor(aphase)
    ant = _ramp(_F32(hw_frac * 1.2) - np.abs(afrac - _F32(0.5)), 0.08) * (aphase >= 0)
    ant = ant * (aphase < 7) * lung * _ramp(u - _F32(0.35), 0.2)
    clav_y = _F32(top + (2.0 if ap else 18.0)) - _F32(0.17) * (np.abs(gx) - _F32(20.0))
    clav_y = clav_y + _F32(5.0) * np.sin(np.abs(gx) * _F32(math.pi / 70.0))
    clav = _ramp(_F32(5.0) - np.abs(gy - clav_y), 2.0) * _ramp(np.abs(gx) - _F32(16.0), 4.0)
    clav = clav * _ramp(_F32(tw + 12.0) - np.abs(gx), 6.0)

    # lung markings: vessel-like ridges of band-limited noise, dense near the hila
    hil_y = top + 0.48 * (a.dome_right_y - top)
    hil_d = _dist(np.abs(gx) - _F32(46.0), gy - _F32(hil_y))
    hila = _ramp(_F32(18.0) - hil_d, 12.0)
    vessels = _vessels(tex_rng, gx, gy, hil_y, crow, ccol, fr.px)
    vessels = vessels * (_F32(0.3) + _F32(0.7) * np.exp(-hil_d * _F32(1 / 80.0)))
    vessels = vessels * _F32(0.1 * a.vessel_gain)

    # finding layers
    extra = np.zeros((crow, ccol), dtype=_F32)  # added density
    no_mark = np.zeros((crow, ccol), dtype=_F32)  # where lung markings vanish
    fluid_all = np.zeros((crow, ccol), dtype=_F32)

    ef = found.get("pleural_effusion")
    if ef is not None:
        for i, side in enumerate(ef.sides):
            sg = _SIGN[side]
            size = ef.size or "small"
            if i == 1 and find_rng.random() < 0.5:  # bilateral: the second side often smaller
                size = SIZES[max(0, SIZES.index(size) - 1)]
            h = {"small": 38.0, "moderate": 85.0, "large": 135.0}[size] * find_rng.uniform(0.9, 1.1)
            lat = np.clip((gx * _F32(sg) - _F32(a.medial)) / _F32(tw - a.medial), 0.0, 1.0)
            level = _dome(a, sg) + 46.0 - h
            surf = _F32(level) + _F32(0.45 * h) * _sq(_F32(1.0) - lat)
            fl = _lung_shape(gx, gy, a, sg) * _ramp(gy - surf, 9.0)
            fl = fl * (gx * _F32(sg) > 0)
            fluid_all = np.maximum(fluid_all, fl)

    px_ = found.get("pneumothorax")
    ptx_line = None
    if px_ is not None:
        sg = _SIGN[px_.side or "right"]
        scale = {"small": 0.86, "moderate": 0.74, "large": 0.58}[px_.size or "small"]
        ax_, ay_ = sg * (a.medial + 8.0), _dome(a, sg) + 10.0
        xc = _F32(ax_) + (gx - _F32(ax_)) * _F32(1 / scale)
        yc = _F32(ay_) + (gy - _F32(ay_)) * _F32(1 / scale)
        top_c = _lung_shape(xc, yc, a, sg)
        own = lungs["left" if sg > 0 else "right"] * (_F32(1.0) - med)
        region = own * (_F32(1.0) - top_c)
        no_mark = np.maximum(no_mark, region)
        air = air + region * _F32(0.22)  # air without lung tissue: darker
        ptx_line = _ramp(_F32(0.12) - np.abs(top_c - _F32(0.5)), 0.1) * own
        air = air - top_c * own * _F32(0.3 * (1 - scale))  # the collapsed lung is denser

    co = found.get("consolidation")
    if co is not None:
        for side in co.sides:
            sg = _SIGN[side]
            if co.centre is None:
                zf = _ZONE_CENTRES[co.zone or "lower"]
                cy = top + zf * (_dome(a, sg) - top) + find_rng.normal(0, 6)
                cx = sg * (a.medial + find_rng.uniform(0.35, 0.65) * (tw - a.medial))
            else:
                cx, cy = _lung_point(a, sg, *co.centre)
            if co.extent is None:
                rx, ry = find_rng.uniform(28, 46), find_rng.uniform(24, 40)
            else:
                rx, ry = CONSOLIDATION_RADII_MM[co.extent]
            sl = fr.window(cx, cy, 2.2 * max(rx, ry))
            x, y = gx[sl], gy[sl]
            env = np.exp(-_sq((x - _F32(cx)) * _F32(1 / rx)) - _sq((y - _F32(cy)) * _F32(1 / ry)))
            n2 = _smooth_noise(find_rng, x.shape[0], x.shape[1], max(2, round(7 / fr.px)))
            op = np.clip((env * (_F32(0.85) + _F32(0.35) * n2) - _F32(0.28)) * _F32(2.4), 0, 1)
            op = op * lungs[side][sl]
            bro = np.zeros_like(op)
            for _ in range(int(find_rng.integers(1, 4))):
                ang = find_rng.uniform(-0.9, 0.9) + (math.pi if sg < 0 else 0.0)
                x0, y0 = sg * 50.0, top + 100.0
                length = math.hypot(cx - x0, cy - y0) + rx
                pts = [
                    (x0, y0),
                    (x0 + length * math.cos(ang) * 0.5 + (cx - x0) * 0.5, y0 + (cy - y0)),
                ]
                bro = np.maximum(bro, _ramp(_F32(1.3) - _seg_dist(x, y, pts), 1.0))
            no_mark[sl] = np.maximum(no_mark[sl], op)
            air[sl] = air[sl] * (_F32(1.0) - _F32(0.85) * op) + bro * op * _F32(0.25)

    if fluid_all.any():
        fluid_all *= _F32(1.0) - abdomen  # fluid behind the dome is already soft-tissue dense
        air = air * (_F32(1.0) - _F32(0.92) * fluid_all)
        no_mark = np.maximum(no_mark, fluid_all)
        extra += fluid_all * _F32(0.06)  # as dense as the liver: the dome's silhouette is lost

    nd = found.get("nodule")
    if nd is not None:
        sg = _SIGN[nd.side or "right"]
        r = 0.5 * (nd.size_mm or 10.0)
        if nd.centre is None:
            cx, cy = _place_in_lung(a, sg, nd.zone or "upper", r, hx, hy, ha, find_rng)
        else:
            cx, cy = _lung_point(a, sg, *nd.centre)
        sl = fr.window(cx, cy, r + 3.0)
        d = _dist(gx[sl] - _F32(cx), gy[sl] - _F32(cy))
        core = np.sqrt(np.clip(_F32(1.0) - _sq(d * _F32(1 / r)), 0.0, 1.0))
        disc = _ramp(_F32(r) - d, 1.2) * (_F32(0.75) + _F32(0.25) * core)
        extra[sl] += disc * _F32(a.lung_depth * find_rng.uniform(0.75, 0.95))

    if fx is not None:
        # old fracture: callus bump on the rib; acute: an extrapleural haematoma at the chest wall
        k = (fx.rib or 6) - 1
        sg = _SIGN[fx.side or "right"]
        xm = sg * uf * tw
        p_lin = (1.0 - math.sqrt(1.0 - 4 * _RIB_WARP * (k + 0.5))) / (2 * _RIB_WARP)
        ym = top - 14.0 + p_lin * a.rib_spacing + a.rib_drop * uf**2.4 - 12.0 * uf
        if fx.chronic:
            sl = fr.window(xm, ym, 12.0)
            d = _dist(gx[sl] - _F32(xm), (gy[sl] - _F32(ym)) * _F32(1.4))
            extra[sl] += _ramp(_F32(8.0) - d, 4.0) * _F32(0.10)
        else:
            xw = sg * (tw - 4.0)
            sl = fr.window(xw, ym, 30.0)
            d = _dist((gx[sl] - _F32(xw)) * _F32(1.8), gy[sl] - _F32(ym))
            extra[sl] += _ramp(_F32(22.0) - d, 14.0) * lung[sl] * _F32(0.07)

    # compose the display image
    base = _F32(0.04)
    thick = np.clip((gy - _F32(top)) / _F32(260.0), 0.0, 1.0)
    img = base + body * (_F32(a.soft_tissue - 0.04) + _F32(0.05) * thick)
    img = img - air * _F32(a.lung_depth)
    img += vessel_ok * (_F32(1.0) - no_mark) * (vessels + hila * _F32(0.06))
    img += heart * _F32(0.035) + med * _F32(0.03) - trachea * _F32(0.05) + spine * _F32(0.06)
    img += abdomen * body * (_F32(0.05) + _F32(0.03) * (gx < 0))
    gb = _sq((gx - _F32(62.0)) * _F32(1 / 26.0)) + _sq(
        (gy - _F32(a.dome_left_y + 24.0)) * _F32(1 / 13.0)
    )
    img -= _ramp(_F32(1.0) - gb, 0.3) * abdomen * _F32(0.10)
    img += (post * _F32(0.05) + ant * _F32(0.025) + clav * _F32(0.10)) * body
    if a.breast > 0:
        for sg in (-1.0, 1.0):
            bd = _sq((gx * _F32(sg) - _F32(0.62 * tw)) * _F32(1 / (0.5 * tw)))
            bd = bd + _sq((gy - _F32(a.dome_right_y - 5.0)) * _F32(1 / 60.0))
            img += _ramp(_F32(1.0) - bd, 0.5) * _F32(a.breast)
    img += extra
    if ptx_line is not None:
        img += ptx_line * _F32(0.09)
    if devices:
        img += _devices(fr, a, devices, find_rng)
    return _upsample(img.astype(_F32, copy=False), rows, cols)


def _place_in_lung(
    a: Anatomy,
    sg: float,
    zone: str,
    r: float,
    hx: float,
    hy: float,
    ha: float,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """A nodule centre well inside the aerated lung and clear of the heart."""
    placed = _place_fractions(a, sg, zone, r, hx, hy, ha, rng)
    if placed is None:
        return sg * (a.medial + 0.6 * (a.half_width - a.medial)), a.apex_y + 0.45 * 200.0
    cx, cy = _lung_point(a, sg, *placed)
    return float(cx), float(cy)


def _place_fractions(
    a: Anatomy,
    sg: float,
    zone: str,
    r: float,
    hx: float,
    hy: float,
    ha: float,
    rng: np.random.Generator,
) -> tuple[float, float] | None:
    """(lateral, craniocaudal) lung fractions of a radius-``r`` nodule well inside the aerated
    lung and clear of the heart; None when 40 draws found no such place."""
    lo, hi = _ZONE_BANDS[zone]
    for _ in range(40):
        vertical = rng.uniform(lo, hi)
        lateral = rng.uniform(0.2, 0.85)
        cx, cy = _lung_point(a, sg, lateral, vertical)
        pts_x = np.array([cx, cx - r, cx + r, cx, cx], dtype=_F32)
        pts_y = np.array([cy, cy, cy, cy - r, cy + r], dtype=_F32)
        inside = _lung_mask(pts_x, pts_y, a, sg).min() > 0.95
        clear = math.hypot(cx - hx, cy - hy) > ha + r + 4.0
        if inside and clear:
            return float(lateral), float(vertical)
    return None


def _lung_point(a: Anatomy, sg: float, lateral: float, vertical: float) -> tuple[float, float]:
    """Patient-frame (x, y) mm of a point given as fractions of one lung (see Finding.centre)."""
    cx = sg * (a.medial + lateral * (a.half_width - a.medial))
    cy = a.apex_y + vertical * (_dome(a, sg) - a.apex_y)
    return cx, cy


def _heart_ellipse(a: Anatomy, ctr: float) -> tuple[float, float, float, float, float]:
    """(centre x, centre y, semi-axes a and b, tilt in radians) of the heart drawn for this
    cardiothoracic ratio (already scaled for an AP view)."""
    width = ctr * 2.0 * a.half_width
    th = math.radians(a.heart_tilt_deg)
    ha, hb = 1.0, 0.64 - 0.4 * (ctr - 0.45)
    hw = math.hypot(ha * math.cos(th), hb * math.sin(th))
    ha, hb = ha * width / 2 / hw, hb * width / 2 / hw
    hv = math.hypot(ha * math.sin(th), hb * math.cos(th))
    return width / 5.0, a.dome_left_y - 0.5 * hv, ha, hb, th


def _devices(
    fr: _Frame, a: Anatomy, devices: tuple[str, ...], rng: np.random.Generator
) -> np.ndarray:
    """Lines, tubes and ECG electrodes of a portable ICU film (confounders, not findings)."""
    out = np.zeros_like(fr.gx)
    gx, gy, top = fr.gx, fr.gy, a.apex_y
    carina = top + 62.0
    for dev in devices:
        if dev == "ecg_leads":
            for _ in range(3):
                cx = rng.uniform(-0.8, 0.8) * a.half_width
                cy = rng.uniform(top - 20.0, a.dome_right_y + 10.0)
                sl = fr.window(cx, cy, 12.0)
                d = _dist(gx[sl] - _F32(cx), gy[sl] - _F32(cy))
                out[sl] += _ramp(_F32(1.6) - np.abs(d - _F32(6.5)), 1.0) * _F32(0.3)
                out[sl] += _ramp(_F32(2.0) - d, 1.0) * _F32(0.35)
            continue
        if dev == "central_line":
            sg = -1.0 if rng.random() < 0.7 else 1.0
            pts = [
                (sg * 70.0, top - 60.0),
                (sg * 40.0, top - 5.0),
                (sg * 14.0, top + 40.0),
                (10.0, carina + rng.uniform(5.0, 30.0)),
            ]
            width, amp = 1.1, 0.22
        elif dev == "endotracheal_tube":
            pts = [(0.0, top - 110.0), (0.0, carina - rng.uniform(25.0, 55.0))]
            width, amp = 2.2, 0.16
        else:  # nasogastric tube: down the oesophagus into the stomach
            pts = [
                (-4.0, top - 110.0),
                (6.0, carina),
                (12.0, a.dome_left_y),
                (55.0, a.dome_left_y + 30.0),
            ]
            width, amp = 1.4, 0.2
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
        r = 0.5 * math.hypot(max(xs) - min(xs), max(ys) - min(ys)) + 5.0
        sl = fr.window(cx, cy, r)
        out[sl] += _ramp(_F32(width) - _seg_dist(gx[sl], gy[sl], pts), 1.0) * _F32(amp)
    return out


# --------------------------------------------------------------------------------------------
# detector model


@dataclass(frozen=True)
class Detector:
    """How a site's equipment turns display brightness into stored pixel values."""

    gain: float = 1.0
    offset: float = 0.0
    gamma: float = 1.0
    noise: float = 0.012  # quantum noise std (display units, at mid-grey)
    heel: float = 0.0  # top-to-bottom exposure gradient (anode heel effect)
    bits_stored: int = 12
    monochrome1: bool = False  # store inverted values (bright = low number)
    collimation_mm: float = 0.0  # unexposed border width (bright in display)


def to_stored(
    img: np.ndarray, det: Detector, *, spacing_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """Apply the site's response, noise, collimation and quantisation -> uint16 stored values."""
    v = np.clip(img, 0.0, None).astype(_F32, copy=False)  # a fresh array, modified in place below
    if det.gamma != 1.0:
        np.power(v, _F32(det.gamma), out=v)
    v *= _F32(det.gain)
    v += _F32(det.offset)
    rows, cols = v.shape
    if det.heel:
        v *= (_F32(1.0) + _F32(det.heel) * np.linspace(-0.5, 0.5, rows, dtype=_F32))[:, None]
    sd = np.clip(v, 0.0, 1.0)
    sd *= _F32(0.9 * det.noise)
    sd += _F32(0.55 * det.noise)  # quantum noise grows with exposure in log-domain images
    noise = rng.standard_normal(v.shape, dtype=_F32)
    noise *= sd
    v += noise
    if det.collimation_mm > 0:
        m = int(det.collimation_mm / spacing_mm)
        if 0 < m < min(rows, cols) // 4:
            v[:m, :] = v[-m:, :] = 0.92
            v[:, :m] = v[:, -m:] = 0.92
    maxval = (1 << det.bits_stored) - 1
    np.clip(v, 0.0, 1.0, out=v)
    v *= _F32(maxval)
    np.rint(v, out=v)
    q = v.astype(np.uint16)
    if det.monochrome1:
        np.subtract(np.uint16(maxval), q, out=q)
    return q


def with_finding(findings: tuple[Finding, ...], f: Finding) -> tuple[Finding, ...]:
    """Findings with ``f`` added or replacing one of the same name (handy in tests)."""
    return (*(x for x in findings if x.name != f.name), f)


__all__ = [
    "CARDIAC_DEGREES",
    "CONSOLIDATION_RADII_MM",
    "CTR_BANDS",
    "DEVICES",
    "MAX_CANVAS",
    "SIZES",
    "ZONES",
    "Anatomy",
    "Detector",
    "Finding",
    "anchor_finding",
    "cardiac_degree",
    "render_chest",
    "reposition",
    "sample_anatomy",
    "sample_devices",
    "sample_finding",
    "to_stored",
    "with_finding",
]
