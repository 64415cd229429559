"""Per-site profiles of the synthetic cohort: what makes the hospitals non-IID.

Why: federated learning is only interesting when sites differ. Each profile fixes a hospital's
case mix (finding prevalence, normal share, AP share), its equipment (matrix, pixel spacing,
bit depth, response curve, noise, MONOCHROME1/2, CR/DX, transfer syntax, vendor), its size, and
its radiologists' report style.

Site sizes: site ``i`` (0-based) gets ``max(1, round(studies_per_site * SIZE_MULTIPLIERS[i % 4]))``
studies, multipliers (1.4, 1.0, 0.6, 1.0), so 3 sites keep the requested mean exactly. Beyond the
four base profiles, site ``i`` reuses profile ``i % 4`` with deterministic perturbations (keyed by
``i`` only, not by the cohort seed): prevalences and size scaled by factors in [0.8, 1.25], detector
gain/offset/noise nudged, and a different hospital name and vendor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from fedrad.common.findings import FINDINGS

from .cxr_image import Detector
from .report_text import ReportStyle

SiteKind = Literal["outpatient", "icu", "trauma", "community"]

SIZE_MULTIPLIERS: Final[tuple[float, ...]] = (1.4, 1.0, 0.6, 1.0)


@dataclass(frozen=True)
class SiteProfile:
    """One hospital: case mix, equipment, report style. Frozen and picklable (sent to workers)."""

    name: str  # profile name, recorded in cohort.json
    kind: SiteKind  # drives the indication pool
    institution: str
    address: str
    station_prefix: str  # StationName prefix, e.g. "ALDRIC-DX"
    manufacturer: str
    model: str
    modality: Literal["CR", "DX"]
    transfer_syntax: str  # a transfer syntax UID
    rows: int
    cols: int
    pixel_spacing_mm: float
    detector: Detector
    normal_fraction: float  # share of studies with no finding
    finding_rates: tuple[float, ...]  # per FINDINGS: chance among abnormal studies (>=1 forced)
    ap_fraction: float  # share of AP (portable) views
    device_rate: float  # chance of each support device on an AP film
    age_mean: float
    age_sd: float
    female_fraction: float
    size_multiplier: float
    file_name: str  # the image file name inside each study folder
    private_phi_tag: bool  # vendor private tag carrying the patient name (a de-id trap)
    style: ReportStyle
    first_year: int = 2016
    last_year: int = 2024

    def __post_init__(self) -> None:
        if len(self.finding_rates) != len(FINDINGS):
            raise ValueError("finding_rates must have one rate per finding")
        if not 0.0 <= self.normal_fraction < 1.0:
            raise ValueError("normal_fraction must be in [0, 1)")

    @property
    def photometric(self) -> str:
        return "MONOCHROME1" if self.detector.monochrome1 else "MONOCHROME2"

    def draw_findings(self, rng: np.random.Generator) -> tuple[str, ...]:
        """Which findings one study carries; correlated the way disease is (CHF -> effusion)."""
        if rng.random() < self.normal_fraction:
            return ()
        rates = np.asarray(self.finding_rates)
        for _ in range(100):
            hit = rng.random(len(FINDINGS)) < rates
            if hit.any():
                break
        else:  # pathological rates: fall back to the most likely finding
            hit = rates == rates.max()
        names = {f for f, h in zip(FINDINGS, hit, strict=True) if h}
        if "cardiomegaly" in names and rng.random() < 0.25:
            names.add("pleural_effusion")
        if "fracture" in names and rng.random() < 0.15:
            names.add("pneumothorax")
        if "consolidation" in names and rng.random() < 0.12:
            names.add("pleural_effusion")
        return tuple(f for f in FINDINGS if f in names)


def _rates(**kw: float) -> tuple[float, ...]:
    return tuple(kw[f] for f in FINDINGS)


BASE_PROFILES: Final[tuple[SiteProfile, ...]] = (
    SiteProfile(
        name="outpatient_academic",
        kind="outpatient",
        institution="St. Aldric General Hospital",
        address="1100 Harbor Road, Westbridge, WB 20417",
        station_prefix="ALDRIC-DX",
        manufacturer="Carestream Health",
        model="DRX-Evolution Plus",
        modality="DX",
        transfer_syntax=ExplicitVRLittleEndian,
        rows=1024,
        cols=1024,
        pixel_spacing_mm=0.35,
        detector=Detector(gain=0.95, offset=0.03, gamma=1.0, noise=0.010, bits_stored=14),
        normal_fraction=0.45,
        finding_rates=_rates(
            nodule=0.50,
            pleural_effusion=0.15,
            cardiomegaly=0.25,
            pneumothorax=0.04,
            consolidation=0.22,
            fracture=0.06,
        ),
        ap_fraction=0.05,
        device_rate=0.05,
        age_mean=58,
        age_sd=14,
        female_fraction=0.55,
        size_multiplier=SIZE_MULTIPLIERS[0],
        file_name="IM00001.dcm",
        private_phi_tag=False,
        style=ReportStyle(
            hedge_rate=0.08, negate_rate=0.75, numbered_impression=True, comparison_rate=0.4
        ),
    ),
    SiteProfile(
        name="icu_tertiary",
        kind="icu",
        institution="Mercy Lakeside Medical Center",
        address="45 Lakeshore Drive, Port Elms, PE 30981",
        station_prefix="MLMC-CR",
        manufacturer="Agfa",
        model="CR 85-X",
        modality="CR",
        transfer_syntax=JPEG2000Lossless,
        rows=768,
        cols=768,
        pixel_spacing_mm=0.46,
        detector=Detector(
            gain=0.85,
            offset=0.08,
            gamma=0.85,
            noise=0.016,
            bits_stored=12,
            monochrome1=True,
            heel=0.06,
            collimation_mm=8.0,
        ),
        normal_fraction=0.25,
        finding_rates=_rates(
            nodule=0.06,
            pleural_effusion=0.55,
            cardiomegaly=0.35,
            pneumothorax=0.30,
            consolidation=0.40,
            fracture=0.05,
        ),
        ap_fraction=0.85,
        device_rate=0.45,
        age_mean=66,
        age_sd=13,
        female_fraction=0.42,
        size_multiplier=SIZE_MULTIPLIERS[1],
        file_name="IMG0001",
        private_phi_tag=True,
        style=ReportStyle(
            hedge_rate=0.13, negate_rate=0.55, sentence_per_line=True, comparison_rate=0.5
        ),
    ),
    SiteProfile(
        name="trauma_center",
        kind="trauma",
        institution="Harborview Regional Trauma Centre",
        address="9 Quarry Lane, North Fallow, NF 11902",
        station_prefix="HRTC-DR",
        manufacturer="Philips Medical Systems",
        model="DigitalDiagnost C90",
        modality="DX",
        transfer_syntax=RLELossless,
        rows=1024,
        cols=896,
        pixel_spacing_mm=0.40,
        detector=Detector(gain=1.05, offset=0.0, gamma=1.15, noise=0.012, bits_stored=16),
        normal_fraction=0.35,
        finding_rates=_rates(
            nodule=0.05,
            pleural_effusion=0.15,
            cardiomegaly=0.06,
            pneumothorax=0.35,
            consolidation=0.12,
            fracture=0.60,
        ),
        ap_fraction=0.5,
        device_rate=0.15,
        age_mean=41,
        age_sd=17,
        female_fraction=0.32,
        size_multiplier=SIZE_MULTIPLIERS[2],
        file_name="1.dcm",
        private_phi_tag=False,
        style=ReportStyle(hedge_rate=0.10, negate_rate=0.5),
    ),
    SiteProfile(
        name="community_clinic",
        kind="community",
        institution="Pinecrest Community Hospital",
        address="310 Birchwood Avenue, Millbrook, MB 60552",
        station_prefix="PINE-CR",
        manufacturer="FUJIFILM Corporation",
        model="FCR Capsula XLII",
        modality="CR",
        transfer_syntax=JPEGLSLossless,
        rows=576,
        cols=512,
        pixel_spacing_mm=0.70,
        detector=Detector(
            gain=0.9, offset=0.05, gamma=1.25, noise=0.02, bits_stored=12, heel=-0.05
        ),
        normal_fraction=0.35,
        finding_rates=_rates(
            nodule=0.12,
            pleural_effusion=0.25,
            cardiomegaly=0.30,
            pneumothorax=0.06,
            consolidation=0.50,
            fracture=0.08,
        ),
        ap_fraction=0.15,
        device_rate=0.05,
        age_mean=55,
        age_sd=20,
        female_fraction=0.5,
        size_multiplier=SIZE_MULTIPLIERS[3],
        file_name="IM00001.dcm",
        private_phi_tag=True,
        style=ReportStyle(hedge_rate=0.12, negate_rate=0.45, comparison_rate=0.15),
    ),
)

_EXTRA_HOSPITALS: Final[tuple[tuple[str, str, str], ...]] = (
    ("Bellhaven University Hospital", "2 College Green, Bellhaven, BH 44120", "BELL"),
    ("Northgate Memorial Hospital", "780 Northgate Road, Ashford, AF 51003", "NGM"),
    ("Saint Cordelia Medical Centre", "15 Abbey Street, Carrow, CW 70021", "CORD"),
    ("Riverside Valley Hospital", "400 Mill Race Way, Elmsford, EF 22830", "RVH"),
    ("Kingsmere District General", "61 Station Road, Kingsmere, KM 38400", "KDG"),
    ("Oakhurst Children's and Adult Hospital", "5 Oakhurst Parade, Linden, LD 19045", "OAK"),
    ("Coastal Plains Regional Medical Center", "1200 Dune Boulevard, Saltmarsh, SM 90312", "CPR"),
    ("Greyfriars Infirmary", "33 Greyfriars Wynd, Dunmore, DM 10477", "GREY"),
)
_EXTRA_VENDORS: Final[tuple[tuple[str, str], ...]] = (
    ("GE Healthcare", "Definium 656"),
    ("SIEMENS", "Ysio Max"),
    ("Konica Minolta", "AeroDR"),
    ("Canon Medical Systems", "CXDI-710C"),
)


def profile_for_site(index: int) -> SiteProfile:
    """Profile of site ``index`` (0-based): a base profile, perturbed after the first cycle."""
    if index < 0:
        raise ValueError("site index must be >= 0")
    base = BASE_PROFILES[index % len(BASE_PROFILES)]
    cycle = index // len(BASE_PROFILES)
    if cycle == 0:
        return base
    rng = np.random.default_rng(np.random.SeedSequence(20_240_601, spawn_key=(index,)))
    scale = rng.uniform(0.8, 1.25, size=len(FINDINGS))
    rates = tuple(float(min(0.9, r * s)) for r, s in zip(base.finding_rates, scale, strict=True))
    hosp, addr, code = _EXTRA_HOSPITALS[(index - len(BASE_PROFILES)) % len(_EXTRA_HOSPITALS)]
    campus = (index - len(BASE_PROFILES)) // len(_EXTRA_HOSPITALS)
    if campus:
        hosp = f"{hosp}, Campus {campus + 1}"
    vendor, model = _EXTRA_VENDORS[index % len(_EXTRA_VENDORS)]
    det = dataclasses.replace(
        base.detector,
        gain=float(base.detector.gain * rng.uniform(0.9, 1.1)),
        offset=float(np.clip(base.detector.offset + rng.normal(0, 0.02), 0.0, 0.12)),
        noise=float(base.detector.noise * rng.uniform(0.8, 1.3)),
    )
    return dataclasses.replace(
        base,
        name=f"{base.name}_{cycle + 1}",
        institution=hosp,
        address=addr,
        station_prefix=f"{code}-{base.modality}",
        manufacturer=vendor,
        model=model,
        detector=det,
        finding_rates=rates,
        normal_fraction=float(np.clip(base.normal_fraction * rng.uniform(0.85, 1.15), 0.15, 0.6)),
        size_multiplier=float(base.size_multiplier * rng.uniform(0.85, 1.15)),
    )


def studies_for_site(index: int, studies_per_site: int) -> int:
    """Number of studies at site ``index``: the mean times the site's size multiplier, >= 1."""
    return max(1, round(studies_per_site * profile_for_site(index).size_multiplier))
