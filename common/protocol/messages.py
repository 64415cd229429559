"""What travels between coordinator and sites in a round, defined once for both sides.

`client` and `server` never import each other, so the round configuration the coordinator
sends and the whitelists of what a site may send back live here. The whitelists are the
privacy contract of a reply: trainable arrays (names declared by the foundation checkpoint),
aggregate metrics under these keys, and the site's id. Nothing else may leave a site.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Final

from fedrad.common.findings import FINDINGS
from fedrad.common.privacy.defaults import DEFAULT_DELTA, DEFAULT_EPSILON

ARRAYS_KEY: Final[str] = "arrays"  # Flower strategies' default ArrayRecord key
CONFIG_KEY: Final[str] = "config"  # Flower strategies' default ConfigRecord key
METRICS_KEY: Final[str] = "metrics"
SITE_KEY: Final[str] = "site"  # ConfigRecord in replies naming the site
SITE_ID_FIELD: Final[str] = "site-id"
# A site id as site.toml, the coordinator's registry and the ledgers name it.
SITE_ID_PATTERN: Final[re.Pattern[str]] = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
WEIGHT_KEY: Final[str] = "num-examples"  # Flower strategies weight averages by this key
# The sites' local AdamW learning rate unless a run sets one (LoRA adapters take a quarter
# of it): high enough for DP-SGD's few noisy steps to get somewhere, at no cost without DP
# (measurements: docs/results/training.md).
DEFAULT_LR: Final[float] = 5e-3

TRAIN_METRIC_KEYS: Final[frozenset[str]] = frozenset(
    {WEIGHT_KEY, "train_loss", "epsilon", "steps", "noise_multiplier", "sample_rate"}
)
EVAL_METRIC_KEYS: Final[frozenset[str]] = frozenset(
    {
        WEIGHT_KEY,
        "n_studies",
        "n_reports",
        "n_questions",
        "macro_auroc",
        *(f"auroc_{finding}" for finding in FINDINGS),
        "ce_f1",
        "ce_macro_f1",
        "ce_precision",
        "ce_recall",
        "bleu4",
        "rouge_l",
        "qa_accuracy",
        "eval_seconds",
    }
)
SITE_FIELDS: Final[frozenset[str]] = frozenset({SITE_ID_FIELD})


class ProtocolError(ValueError):
    """A round configuration that a site cannot act on; one line, safe to send back."""


@dataclass(frozen=True)
class RoundConfig:
    """The coordinator's plan for one round, as sent in the message's ConfigRecord.

    The DP target is the federation's plan; a site caps it with its own budget, which never
    comes from the coordinator.
    """

    server_round: int  # 1-based; Flower's strategies also inject it as "server-round"
    run_id: str  # recorded in every ledger entry
    planned_rounds: int  # the whole schedule: noise is calibrated for all of it
    local_steps: int  # DP-SGD steps per site per round
    batch_size: int  # expected batch size (Poisson sampling: q = batch_size / N)
    lr: float
    seed: int
    dp: bool = True
    target_epsilon: float = DEFAULT_EPSILON  # for the planned schedule at `delta`
    delta: float = DEFAULT_DELTA
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    proximal_mu: float = 0.0  # FedProx: Flower's FedProx strategy injects "proximal-mu"
    eval_reports: int = 64
    eval_questions: int = 128

    def __post_init__(self) -> None:
        problems = []
        if self.server_round < 1 or self.planned_rounds < 1:
            problems.append("rounds must be >= 1")
        if self.server_round > self.planned_rounds:
            problems.append(f"round {self.server_round} is past the plan of {self.planned_rounds}")
        if self.local_steps < 1 or self.batch_size < 1:
            problems.append("local_steps and batch_size must be >= 1")
        if self.lr <= 0:
            problems.append("lr must be positive")
        if self.dp and self.target_epsilon <= 0:
            problems.append("target_epsilon must be positive")
        if not 0 < self.delta < 1:
            problems.append("delta must be in (0, 1)")
        if self.max_grad_norm <= 0:
            problems.append("max_grad_norm must be positive")
        if self.accountant not in ("rdp", "prv"):
            problems.append(f"unknown accountant {self.accountant!r}")
        if self.proximal_mu < 0:
            problems.append("proximal_mu must be >= 0")
        if self.eval_reports < 0 or self.eval_questions < 0:
            problems.append("eval_reports and eval_questions must be >= 0")
        if problems:
            raise ProtocolError("invalid round config: " + "; ".join(problems))

    def to_record(self) -> dict[str, int | float | str | bool]:
        """Hyphenated keys, as Flower's own config keys are spelled."""
        return {name.replace("_", "-"): value for name, value in asdict(self).items()}

    @staticmethod
    def from_record(record: Mapping[str, object]) -> RoundConfig:
        """Parses a received ConfigRecord; unknown keys and wrong types are refused."""
        types = {f.name: f.type for f in fields(RoundConfig)}
        values: dict[str, object] = {}
        unknown = []
        for key, value in record.items():
            name = str(key).replace("-", "_")
            if name not in types:
                unknown.append(str(key))
                continue
            values[name] = _coerce(name, types[name], value)
        if unknown:
            raise ProtocolError(f"unknown round config key(s): {', '.join(sorted(unknown))}")
        try:
            return RoundConfig(**values)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ProtocolError(f"incomplete round config ({exc})") from exc


def _coerce(name: str, type_name: object, value: object) -> object:
    """Strict: ints for int fields (no bools), floats accept ints, bool only for bool."""
    expected = str(type_name)
    if expected == "bool":
        if isinstance(value, bool):
            return value
    elif expected == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected == "float":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif expected == "str" and isinstance(value, str):
        return value
    raise ProtocolError(f"round config {name!r} must be {expected}, got {type(value).__name__}")
