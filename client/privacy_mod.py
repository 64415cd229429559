"""The last gate before anything leaves a site: a Flower mod that inspects every reply.

Independent of the training code on purpose: it checks what is actually in the outgoing
message against what is declared (the foundation checkpoint's trainable parameter names and
the metric whitelists in `fedrad.common.fl_protocol`), so a bug or a change elsewhere cannot
widen what a site sends. Anything unexpected raises and the reply never leaves (fail closed).

It also keeps failure messages from carrying data: an exception from the site agent goes back
as its type name only (details stay in the site's own log), except the agent's own refusals,
whose messages are written to be safe to send.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from fedrad.client.site_agent import SiteRefusalError
from fedrad.common.fl_protocol import (
    ARRAYS_KEY,
    EVAL_METRIC_KEYS,
    SITE_FIELDS,
    SITE_KEY,
    TRAIN_METRIC_KEYS,
    ProtocolError,
)

logger = logging.getLogger(__name__)

MAX_LISTED = 5  # names shown in a refusal (the names are the model's, never data)


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


def make_privacy_mod(declared: Callable[[Context], frozenset[str]]) -> Mod:
    """A mod that runs the app, then lets the reply out only if `check_reply` passes.

    `declared(context)` gives the trainable names the site's foundation checkpoint declares.
    """

    def privacy_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
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
        check_reply(message, reply, declared(context))
        return reply

    return privacy_mod
