"""Webhook signature verification: Standard Webhooks, and the PMS's own HMAC scheme.

Pure functions over the raw body bytes (never re-serialised JSON: one changed
space breaks the HMAC). Each refusal is a distinct type so the receiver can
answer and count them apart: a bad signature is an attacker or a wrong
secret, a stale timestamp is a replay or a sender's clock, and the operator
fixes each differently.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE = 300
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"


class SignatureError(Exception):
    """Base of every refusal; the message never contains a secret or a signature."""


class MissingHeaders(SignatureError):
    pass


class BadSignature(SignatureError):
    pass


class StaleTimestamp(SignatureError):
    """Signed too long ago: a replay, or a sender whose retries outlived the tolerance."""


class FutureTimestamp(SignatureError):
    """Signed in the future beyond the tolerance: a skewed clock or a forged timestamp."""


@functools.cache
def secret_key(secret: str) -> bytes:
    """The HMAC key: the base64 after an optional ``whsec_`` prefix.

    Exactly what the reference Standard Webhooks library does, so a secret
    works the same in the sender (the PMS, the sandbox) and here. Cached: a
    process has a handful of secrets and checks every webhook against each.
    """
    try:
        # Unpadded base64 is common in the wild; extra padding is ignored.
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX) + "==", validate=False)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret must be base64, optionally after whsec_") from None
    if not key:
        raise ValueError("a webhook secret may not be empty")
    return key


def _digest(key: bytes, msg_id: str, timestamp: str, body: bytes) -> bytes:
    return hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value (``v1,<base64>``) for one message."""
    digest = _digest(secret_key(secret), msg_id, str(timestamp), body)
    return "v1," + base64.b64encode(digest).decode()


def _offered_signatures(header: str) -> list[bytes]:
    """The decoded ``v1`` signatures of the header; other versions and garbage are skipped."""
    offered = []
    for entry in header.split():
        version, _, encoded = entry.partition(",")
        if version != "v1" or not encoded:
            continue
        try:
            offered.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    return offered


def _parse_timestamp(value: str) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 12:
        raise BadSignature("webhook-timestamp is not integer seconds")
    return int(value)


def verify(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: int = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> str:
    """Check a Standard Webhooks request; return its ``webhook-id``.

    Any configured secret may match (rotation: old and new both live for a
    while). The signature is checked before the timestamp so that a stale or
    future error always means "genuine, but outside the window", which is
    worth an operator's attention, while a forgery is always BadSignature.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get(ID_HEADER, "")
    raw_timestamp = lowered.get(TIMESTAMP_HEADER, "")
    header = lowered.get(SIGNATURE_HEADER, "")
    if not (msg_id and raw_timestamp and header):
        raise MissingHeaders("webhook-id, webhook-timestamp and webhook-signature are required")
    timestamp = _parse_timestamp(raw_timestamp)
    offered = _offered_signatures(header)
    expected = [_digest(secret_key(s), msg_id, raw_timestamp, body) for s in secrets]
    # Compare every pair: no early exit that would time which secret matched.
    matched = False
    for want in expected:
        for got in offered:
            matched |= hmac.compare_digest(want, got)
    if not matched:
        raise BadSignature("no signature matches a configured secret")
    current = time.time() if now is None else now
    if timestamp < current - tolerance:
        raise StaleTimestamp(f"signed {int(current - timestamp)} s ago (tolerance {tolerance} s)")
    if timestamp > current + tolerance:
        raise FutureTimestamp(f"signed {int(timestamp - current)} s ahead (tolerance {tolerance} s)")
    return msg_id


def verify_dentally(secret: str, body: bytes, signature_hex: str) -> None:
    """The PMS's own scheme: hex HMAC-SHA256 of the raw body (``X-Dentally-Signature``).

    It signs no timestamp and no id, so a captured request verifies forever:
    replays are stopped only by the inbox's id dedupe downstream.
    """
    if not secret:
        raise BadSignature("no signing secret configured")
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature_hex.strip().lower().encode()):
        raise BadSignature("X-Dentally-Signature does not match")
