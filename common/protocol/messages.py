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
from fedrad.common.model.parts import PART_METRIC_KEYS
from fedrad.common.privacy.defaults import DEFAULT_DELTA, DEFAULT_EPSILON
from fedrad.common.privacy.ledger_head import head_is_valid

ARRAYS_KEY: Final[str] = "arrays"  # Flower strategies' default ArrayRecord key
CONFIG_KEY: Final[str] = "config"  # Flower strategies' default ConfigRecord key
METRICS_KEY: Final[str] = "metrics"
SITE_KEY: Final[str] = "site"  # ConfigRecord in replies naming the site
SITE_ID_FIELD: Final[str] = "site-id"
# A site id as site.toml, the coordinator's registry and the ledgers name it. Always used with
# fullmatch: `$` would accept a trailing newline ("site_9\n").
SITE_ID_PATTERN: Final[re.Pattern[str]] = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
WEIGHT_KEY: Final[str] = "num-examples"  # Flower strategies weight averages by this key
# The sites' local AdamW learning rate unless a run sets one (LoRA adapters take a quarter
# of it): high enough for DP-SGD's few noisy steps to get somewhere, at no cost without DP
# (measurements: docs/results/training.md).
DEFAULT_LR: Final[float] = 5e-3

# A training reply's metrics: the example count (the weight FedAvg needs; a site's training
# split size is declared public) and the mechanism's public parameters. Nothing computed on
# records: the training loss stays at the site.
# Beside them, which modality parts the site trained (`common/model/parts.py`): public as the
# split's size is (a coordinator plans which sites hold CT), and needed to average each part.
TRAIN_METRIC_KEYS: Final[frozenset[str]] = frozenset(
    {WEIGHT_KEY, "epsilon", "steps", "noise_multiplier", "sample_rate", *PART_METRIC_KEYS}
)
# What an evaluation may release, by family: each figure is computed from counts that carry
# Gaussian noise charged to the site's ledger (client/training/private_evaluation.py). A round
# config names the families it asks for; a site's policy names those it releases.
EVAL_FAMILIES: Final[dict[str, frozenset[str]]] = {
    "auroc": frozenset({"macro_auroc", *(f"auroc_{finding}" for finding in FINDINGS)}),
    "report": frozenset(
        {
            "ce_f1",
            "ce_macro_f1",
            "ce_precision",
            "ce_recall",
            "rouge_l",
            "report_head_agreement",
            "repeated_4gram",
            "placeholders",
        }
    ),
    "qa": frozenset(
        {"qa_accuracy", "qa_presence_accuracy", "qa_side_accuracy", "qa_size_accuracy"}
    ),
}
# Public beside them: the held-out split's size (as the training split's) and the release's
# own mechanism (its epsilon alone and its noise multiplier).
EVAL_PUBLIC_KEYS: Final[frozenset[str]] = frozenset(
    {WEIGHT_KEY, "n_studies", "eval_epsilon", "eval_noise_multiplier"}
)
EVAL_METRIC_KEYS: Final[frozenset[str]] = EVAL_PUBLIC_KEYS.union(*EVAL_FAMILIES.values())
ALL_EVAL_FAMILIES: Final[str] = ",".join(EVAL_FAMILIES)
NO_EVAL_FAMILIES: Final[str] = "none"  # a plan that asks for no figures: nothing to account
# What one evaluation release spends unless a run sets it: with evaluation every round, ten
# rounds compose to about epsilon 1.75 at delta 1e-5 (docs/results/privacy.md).
DEFAULT_EVAL_EPSILON: Final[float] = 0.5
# The site's ledger head after the round, "<lines>:<sha256 of the last line>": a hash of the
# site's own signed record of public mechanism parameters, declared public. The coordinator
# keeps the last one per site and sends it back as the round config's ledger-head, so that a
# site whose ledger was cut short or replaced refuses (`common/privacy/ledger_anchor.py`).
LEDGER_HEAD_FIELD: Final[str] = "ledger-head"
SITE_FIELDS: Final[frozenset[str]] = frozenset({SITE_ID_FIELD, LEDGER_HEAD_FIELD})


# Names a plan could use to steer a site's DP randomness; refused by name (as is any key
# holding "seed" other than the public `seed`).
RANDOMNESS_REQUESTS: Final[frozenset[str]] = frozenset(
    {"insecure_reproducible", "reproducible", "noise_generator", "secure_mode", "rng"}
)


def claimed_site_id(value: object) -> str | None:
    """`value` when it is a site id, else None. A reply's claimed id is the sender's word: one
    that is not a site id (a newline in it, 10 KB of text, not a string) names no site, and is
    never turned into one by str() or cut short."""
    if isinstance(value, str) and SITE_ID_PATTERN.fullmatch(value):
        return value
    return None


def eval_families(eval_metrics: str) -> tuple[str, ...]:
    """The evaluation families an `eval-metrics` value asks for, in order, without repeats
    (none: no figures)."""
    if eval_metrics == NO_EVAL_FAMILIES:
        return ()
    names = (part.strip() for part in eval_metrics.split(","))
    return tuple(dict.fromkeys(name for name in names if name))


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
    seed: int  # public randomness only (task prompts); never a site's DP noise or sampling
    dp: bool = True
    target_epsilon: float = DEFAULT_EPSILON  # for the planned schedule at `delta`
    delta: float = DEFAULT_DELTA
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    proximal_mu: float = 0.0  # FedProx: Flower's FedProx strategy injects "proximal-mu"
    eval_reports: int = 64
    eval_questions: int = 128
    eval_metrics: str = ALL_EVAL_FAMILIES  # comma-separated EVAL_FAMILIES the plan asks for
    eval_epsilon: float = DEFAULT_EVAL_EPSILON  # one evaluation release's spend (a site caps it)
    # the coordinator's last acknowledged ledger head of the site receiving this config, as
    # that site reported it ("" = none known): per site, never a run setting, sent when known
    ledger_head: str = ""

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
        unknown = [f for f in self.eval_families if f not in EVAL_FAMILIES]
        if unknown or (not self.eval_families and self.eval_metrics != NO_EVAL_FAMILIES):
            problems.append(
                f"eval_metrics names families among {', '.join(EVAL_FAMILIES)}, or is "
                f"{NO_EVAL_FAMILIES!r}"
            )
        if not (0 < self.eval_epsilon < float("inf")):
            problems.append("eval_epsilon must be positive and finite")
        if self.ledger_head and not head_is_valid(self.ledger_head):
            problems.append("ledger_head must be <lines>:<sha256 hex> or empty")
        if problems:
            raise ProtocolError("invalid round config: " + "; ".join(problems))

    @property
    def eval_families(self) -> tuple[str, ...]:
        return eval_families(self.eval_metrics)

    def to_record(self) -> dict[str, int | float | str | bool]:
        """Hyphenated keys, as Flower's own config keys are spelled; ledger-head only when
        known (the coordinator sets it per site)."""
        record = {name.replace("_", "-"): value for name, value in asdict(self).items()}
        if not self.ledger_head:
            del record[LEDGER_HEAD_FIELD]
        return record

    @staticmethod
    def from_record(record: Mapping[str, object]) -> RoundConfig:
        """Parses a received ConfigRecord; unknown keys and wrong types are refused."""
        types = {f.name: f.type for f in fields(RoundConfig)}
        values: dict[str, object] = {}
        unknown = []
        for key, value in record.items():
            name = str(key).replace("-", "_")
            if name != "seed" and ("seed" in name or name in RANDOMNESS_REQUESTS):
                raise ProtocolError(
                    f"the round config asks for {str(key)[:40]!r}: a site draws its DP noise "
                    "and sampling from its own CSPRNG and takes no seed or switch for them"
                )
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
