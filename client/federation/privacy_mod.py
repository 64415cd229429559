"""The last gate before anything leaves a site: a Flower mod that inspects every reply.

Independent of the training code on purpose: it checks what is actually in the outgoing
message against what is declared (the foundation checkpoint's trainable parameter names and
the metric whitelists in `fedrad.common.protocol.messages`), so a bug or a change elsewhere cannot
widen what a site sends. Anything unexpected raises and the reply never leaves (fail closed);
failure messages carry no data either. The SecAgg+ ClientApp has its own gate,
`make_secure_privacy_mod`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from fedrad.client.federation.site_agent import SiteRefusalError
from fedrad.common.protocol.messages import (
    ARRAYS_KEY,
    EVAL_METRIC_KEYS,
    SITE_FIELDS,
    SITE_KEY,
    TRAIN_METRIC_KEYS,
    ProtocolError,
)
from fedrad.common.protocol.secagg import (
    EVALUATE_RES_RECORDS,
    FIT_RES_RECORDS,
    MAX_SECRET_BYTES,
    MODULUS_RANGE,
    SECAGG_RECORD,
    SECAGG_REPLY_FIELDS,
    STAGE_FIELD,
)

logger = logging.getLogger(__name__)

MAX_LISTED = 5  # names shown in a refusal (the names are the model's, never data)
FIT_INS_ARRAYS: Final[str] = "fitins.parameters"  # legacy FitIns: the global arrays, in order
STATUS_MESSAGES: Final[frozenset[str]] = frozenset({"Success", ""})  # Flower's own


class PrivacyViolationError(Exception):
    """A reply held something that may not leave the site; it was not sent."""


def _category(message_type: str) -> str:
    return message_type.split(".", 1)[0]


def _names(keys: set[str]) -> str:
    shown = sorted(keys)[:MAX_LISTED]
    more = len(keys) - len(shown)
    return ", ".join(shown) + (f" (+{more} more)" if more > 0 else "")


def check_reply(request: Message, reply: Message, declared_trainable: frozenset[str]) -> None:
    """Raises PrivacyViolationError unless the reply holds only what a site may send."""
    category = _category(reply.metadata.message_type)
    if category not in (MessageType.TRAIN, MessageType.EVALUATE):
        raise PrivacyViolationError(
            f"replies of type {reply.metadata.message_type!r} are not allowed"
        )
    content = reply.content
    arrays, metrics, configs = (
        content.array_records,
        content.metric_records,
        content.config_records,
    )
    if len(arrays) + len(metrics) + len(configs) != len(content):
        raise PrivacyViolationError("reply holds a record of an unknown kind")
    if category == MessageType.EVALUATE and arrays:
        raise PrivacyViolationError("an evaluation reply may not carry arrays")
    if len(arrays) > 1 or (arrays and ARRAYS_KEY not in arrays):
        raise PrivacyViolationError(
            f"a training reply carries one ArrayRecord named {ARRAYS_KEY!r}"
        )
    incoming = request.content.array_records.get(ARRAYS_KEY) if request.has_content() else None
    for record in arrays.values():
        extra = set(record.keys()) - declared_trainable
        if extra:
            raise PrivacyViolationError(f"arrays not declared trainable: {_names(extra)}")
        for name, array in record.items():
            if not np.issubdtype(np.dtype(array.dtype), np.floating):
                raise PrivacyViolationError(f"array {name} is not floating point ({array.dtype})")
            if (
                incoming is not None
                and name in incoming
                and tuple(incoming[name].shape) != tuple(array.shape)
            ):
                raise PrivacyViolationError(f"array {name} changed shape")
    allowed = TRAIN_METRIC_KEYS if category == MessageType.TRAIN else EVAL_METRIC_KEYS
    for record in metrics.values():
        extra = set(record.keys()) - allowed
        if extra:
            raise PrivacyViolationError(f"metrics not whitelisted: {_names(extra)}")
        for key, value in record.items():
            if isinstance(value, list):  # a list could carry per-record values
                raise PrivacyViolationError(f"metric {key} is a list; only scalars may leave")
    for name, record in configs.items():
        if name != SITE_KEY:
            raise PrivacyViolationError(f"config record {name!r} is not allowed in a reply")
        extra = set(record.keys()) - SITE_FIELDS
        if extra:
            raise PrivacyViolationError(f"config fields not allowed: {_names(extra)}")
        if any(not isinstance(v, str) for v in record.values()):
            raise PrivacyViolationError("site fields must be strings")


def _run_safely(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Runs the app; whatever goes wrong goes back as an error that carries no data: an
    exception's type name only (details stay in the site's own log), except the agent's own
    refusals, whose messages are written to be safe to send."""
    try:
        reply = call_next(message, context)
    except (SiteRefusalError, ProtocolError) as exc:
        logger.warning("round refused: %s", exc)
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"refused: {exc}"),
            reply_to=message,
        )
    except Exception as exc:
        # The type only by default: exception texts can quote file paths (names, MRNs).
        # The traceback is written at DEBUG, for a site operator who asks for it.
        logger.error("the site agent failed: %s", type(exc).__name__)
        logger.debug("site agent failure details", exc_info=True)
        return Message(
            Error(
                code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                reason=f"site agent failed: {type(exc).__name__} (details in the site log)",
            ),
            reply_to=message,
        )
    if reply.has_error():
        return Message(
            Error(code=reply.error.code, reason="site agent error (details in the site log)"),
            reply_to=message,
        )
    return reply


def make_privacy_mod(declared: Callable[[Context], frozenset[str]]) -> Mod:
    """A mod that runs the app, then lets the reply out only if `check_reply` passes.

    `declared(context)` gives the trainable names the site's foundation checkpoint declares.
    """

    def privacy_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = _run_safely(message, context, call_next)
        if not reply.has_error():
            check_reply(message, reply, declared(context))
        return reply

    return privacy_mod


# -- the SecAgg+ ClientApp (Flower's legacy API) ---------------------------------------------


@dataclass(frozen=True)
class SecureRequest:
    """What a request to the SecAgg+ ClientApp allows its reply to hold, read before the app
    runs (secaggplus_mod consumes parts of the request as it goes)."""

    message_type: str
    stage: str | None  # the SecAgg+ stage of a training message
    peers: frozenset[int]  # node ids the reply may name (neighbours, active and dropped)
    shapes: tuple[tuple[int, ...], ...]  # the global arrays the site received, in order

    @staticmethod
    def read(request: Message) -> SecureRequest:
        kind = request.metadata.message_type
        if kind == MessageType.EVALUATE:
            return SecureRequest(kind, None, frozenset(), ())
        if kind != MessageType.TRAIN:
            raise PrivacyViolationError(f"messages of type {kind!r} are not served")
        record = request.content.config_records.get(SECAGG_RECORD)
        stage = None if record is None else record.get(STAGE_FIELD)
        if stage not in SECAGG_REPLY_FIELDS:
            raise PrivacyViolationError(
                "a training message without a SecAgg+ stage is refused: this app sends "
                "updates only masked"
            )
        assert record is not None and isinstance(stage, str)
        peers: set[int] = set()
        if stage == Stage.SHARE_KEYS:
            peers = {int(key) for key in record if key != STAGE_FIELD}
        elif stage == Stage.UNMASK:
            for key in (Key.ACTIVE_NODE_ID_LIST, Key.DEAD_NODE_ID_LIST):
                peers.update(int(n) for n in record.get(key, []))  # type: ignore[union-attr]
        shapes: tuple[tuple[int, ...], ...] = ()
        if stage == Stage.COLLECT_MASKED_VECTORS:
            arrays = request.content.array_records.get(FIT_INS_ARRAYS)
            if arrays is None:
                raise PrivacyViolationError("a SecAgg+ training message without global arrays")
            shapes = tuple(tuple(_npy(a.data).shape) for a in arrays.values())
        return SecureRequest(kind, stage, frozenset(peers), shapes)


def _npy(data: bytes) -> np.ndarray:
    """An array from its .npy bytes; never unpickles (object arrays are refused)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise PrivacyViolationError(f"not a plain numeric array ({type(exc).__name__})") from exc


def _only_records(content: RecordDict, allowed: frozenset[str]) -> None:
    extra = set(content.keys()) - allowed
    if extra:
        raise PrivacyViolationError(f"records not allowed in this reply: {_names(extra)}")
    missing = allowed - set(content.keys())
    if missing:
        raise PrivacyViolationError(f"reply lacks {_names(missing)}")


def _scalar_metrics(record: object, allowed: frozenset[str]) -> None:
    """A legacy metrics ConfigRecord: whitelisted keys, numbers, and the site id as text."""
    if not isinstance(record, ConfigRecord):
        raise PrivacyViolationError("legacy metrics must be a ConfigRecord")
    extra = set(record.keys()) - allowed - SITE_FIELDS
    if extra:
        raise PrivacyViolationError(f"metrics not whitelisted: {_names(extra)}")
    for key, value in record.items():
        if key in SITE_FIELDS:
            if not isinstance(value, str):
                raise PrivacyViolationError("site fields must be strings")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise PrivacyViolationError(f"metric {key} is not a number; only scalars may leave")


def _single_number(record: object, key: str) -> None:
    if not isinstance(record, MetricRecord) or set(record.keys()) != {key}:
        raise PrivacyViolationError(f"a legacy {key} record holds exactly {key!r}")
    if isinstance(record[key], list):
        raise PrivacyViolationError(f"{key} is a list; only scalars may leave")


def _status(record: object) -> None:
    if not isinstance(record, ConfigRecord) or set(record.keys()) != {"code", "message"}:
        raise PrivacyViolationError("a legacy status holds exactly a code and a message")
    if not isinstance(record["code"], int) or record["message"] not in STATUS_MESSAGES:
        raise PrivacyViolationError("a legacy status may carry only Flower's own message")


def _byte_list(values: object, what: str) -> list[bytes]:
    if not isinstance(values, list) or any(not isinstance(v, bytes) for v in values):
        raise PrivacyViolationError(f"{what} must be a list of bytes")
    return values


def _secrets(values: object, what: str) -> list[bytes]:
    """Keys and key shares: short byte strings (a model-sized payload cannot hide in them)."""
    values = _byte_list(values, what)
    if any(len(v) > MAX_SECRET_BYTES for v in values):
        raise PrivacyViolationError(f"{what} holds an item over {MAX_SECRET_BYTES} bytes")
    return values


def _node_ids(values: object, peers: frozenset[int], what: str) -> list[int]:
    if not isinstance(values, list) or any(
        isinstance(v, bool) or not isinstance(v, int) for v in values
    ):
        raise PrivacyViolationError(f"{what} must be a list of node ids")
    if not set(values) <= peers:
        raise PrivacyViolationError(f"{what} names nodes the request did not")
    return values


def _public_key(value: object) -> None:
    if not isinstance(value, bytes) or len(value) > MAX_SECRET_BYTES:
        raise PrivacyViolationError("a SecAgg+ public key must be a short byte string")
    try:
        key = serialization.load_pem_public_key(value)
    except ValueError as exc:
        raise PrivacyViolationError("a SecAgg+ public key is not a PEM public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PrivacyViolationError("a SecAgg+ public key is not an elliptic-curve key")


def _masked_vectors(values: object, expected: SecureRequest, declared: frozenset[str]) -> None:
    """The masked weight factor and one masked integer vector per declared trainable array."""
    vectors = _byte_list(values, "masked vectors")
    if len(expected.shapes) != len(declared):
        raise PrivacyViolationError(
            f"the round sent {len(expected.shapes)} arrays, not the {len(declared)} declared"
        )
    shapes = ((1,), *expected.shapes)
    if len(vectors) != len(shapes):
        raise PrivacyViolationError(
            f"{len(vectors)} masked vectors for {len(shapes) - 1} declared arrays"
        )
    for index, (data, shape) in enumerate(zip(vectors, shapes, strict=True)):
        array = _npy(data)
        if not np.issubdtype(array.dtype, np.integer):
            raise PrivacyViolationError(f"masked vector {index} is not integer ({array.dtype})")
        if tuple(array.shape) != tuple(shape):
            raise PrivacyViolationError(f"masked vector {index} does not have its array's shape")
        if array.size and (int(array.min()) < 0 or int(array.max()) >= MODULUS_RANGE):
            raise PrivacyViolationError(f"masked vector {index} is outside the modulus")


def check_secure_reply(
    expected: SecureRequest, reply: Message, declared_trainable: frozenset[str]
) -> None:
    """Raises PrivacyViolationError unless the reply holds only what the SecAgg+ protocol stage
    (or a legacy evaluation) sends: public keys, encrypted key shares, masked integer vectors
    of the declared trainable set, key shares for unmasking, whitelisted scalar metrics."""
    if reply.metadata.message_type != expected.message_type:
        raise PrivacyViolationError("the reply's type differs from the request's")
    content = reply.content
    if expected.message_type == MessageType.EVALUATE:
        _only_records(content, EVALUATE_RES_RECORDS)
        _scalar_metrics(content["evaluateres.metrics"], EVAL_METRIC_KEYS)
        _single_number(content["evaluateres.loss"], "loss")
        _single_number(content["evaluateres.num_examples"], "num_examples")
        _status(content["evaluateres.status"])
        return
    assert expected.stage is not None
    collect = expected.stage == Stage.COLLECT_MASKED_VECTORS
    _only_records(content, frozenset({SECAGG_RECORD}) | (FIT_RES_RECORDS if collect else set()))
    record = content[SECAGG_RECORD]
    if not isinstance(record, ConfigRecord):
        raise PrivacyViolationError("the SecAgg+ record must be a ConfigRecord")
    fields = SECAGG_REPLY_FIELDS[expected.stage]
    if set(record.keys()) != fields:
        raise PrivacyViolationError(
            f"SecAgg+ {expected.stage} replies hold exactly {_names(set(fields))}"
        )
    if expected.stage == Stage.SETUP:
        _public_key(record[Key.PUBLIC_KEY_1])
        _public_key(record[Key.PUBLIC_KEY_2])
    elif expected.stage == Stage.SHARE_KEYS:
        targets = _node_ids(record[Key.DESTINATION_LIST], expected.peers, "destinations")
        shares = _secrets(record[Key.CIPHERTEXT_LIST], "encrypted shares")
        if len(shares) != len(targets):
            raise PrivacyViolationError("one encrypted share per destination")
    elif expected.stage == Stage.UNMASK:
        owners = _node_ids(record[Key.NODE_ID_LIST], expected.peers, "share owners")
        shares = _secrets(record[Key.SHARE_LIST], "key shares")
        if len(shares) != len(owners):
            raise PrivacyViolationError("one key share per node")
    else:
        _masked_vectors(record[Key.MASKED_PARAMETERS], expected, declared_trainable)
        if len(content["fitres.parameters"]) != 0:  # type: ignore[arg-type]
            raise PrivacyViolationError("plain arrays may not travel beside the masked ones")
        _scalar_metrics(content["fitres.metrics"], TRAIN_METRIC_KEYS)
        _single_number(content["fitres.num_examples"], "num_examples")
        _status(content["fitres.status"])


def make_secure_privacy_mod(declared: Callable[[Context], frozenset[str]]) -> Mod:
    """The SecAgg+ ClientApp's gate, outermost: it reads what the request allows before the
    protocol runs, then lets the reply out only if `check_secure_reply` passes. At each stage a
    reply may hold only that stage's own fields (`fedrad.common.protocol.secagg`), checked for
    type, size and the node ids the request named; the update may leave only as masked integer
    vectors shaped like the declared trainable arrays, never as floats; and a training message
    that is not part of SecAgg+ is refused outright."""

    def secure_privacy_mod(
        message: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        expected = SecureRequest.read(message)
        reply = _run_safely(message, context, call_next)
        if not reply.has_error():
            check_secure_reply(expected, reply, declared(context))
        return reply

    return secure_privacy_mod
