"""Webhook signatures: the reference library's signatures verify, every tampering is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook

from consumer.signing import (
    BadSignature,
    FutureTimestamp,
    MissingHeaders,
    StaleTimestamp,
    secret_key,
    sign,
    verify,
    verify_dentally,
)

OLD_SECRET = "whsec_" + base64.b64encode(b"old-secret-key-32-bytes-long....").decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"new-secret-key-32-bytes-long....").decode()
BODY = b'{"type":"appointment.updated","data":{"appointment":{"id":7,"state":"Pending"}}}'
MSG_ID = "msg_2Lx3kY"


def signed_headers(secret: str, *, msg_id: str = MSG_ID, at: float | None = None, body: bytes = BODY) -> dict[str, str]:
    """Headers as a Standard Webhooks sender makes them, by the reference library."""
    moment = datetime.fromtimestamp(time.time() if at is None else at, tz=UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, moment, body.decode()),
    }


def test_a_reference_signature_verifies_and_returns_the_id() -> None:
    assert verify([OLD_SECRET], signed_headers(OLD_SECRET), BODY) == MSG_ID


def test_header_names_are_case_insensitive() -> None:
    headers = {k.title(): v for k, v in signed_headers(OLD_SECRET).items()}
    assert verify([OLD_SECRET], headers, BODY) == MSG_ID


def test_our_sign_matches_the_reference_library() -> None:
    now = int(time.time())
    reference = signed_headers(NEW_SECRET, at=now)["webhook-signature"]
    assert sign(NEW_SECRET, MSG_ID, now, BODY) == reference


def test_both_secrets_verify_during_rotation() -> None:
    secrets = [OLD_SECRET, NEW_SECRET]
    assert verify(secrets, signed_headers(OLD_SECRET), BODY) == MSG_ID
    assert verify(secrets, signed_headers(NEW_SECRET), BODY) == MSG_ID


def test_a_signature_list_with_one_good_entry_verifies() -> None:
    headers = signed_headers(NEW_SECRET)
    old = signed_headers(OLD_SECRET)["webhook-signature"]
    headers["webhook-signature"] = f"v2,abc {old} {headers['webhook-signature']}"
    assert verify([NEW_SECRET], headers, BODY) == MSG_ID


def test_a_retired_secret_is_refused() -> None:
    with pytest.raises(BadSignature):
        verify([NEW_SECRET], signed_headers(OLD_SECRET), BODY)


def test_a_changed_body_is_refused() -> None:
    with pytest.raises(BadSignature):
        verify([OLD_SECRET], signed_headers(OLD_SECRET), BODY.replace(b"Pending", b"Confirmed"))


def test_re_serialised_json_is_refused() -> None:
    """Whitespace matters: verification is over the raw bytes as sent."""
    with pytest.raises(BadSignature):
        verify([OLD_SECRET], signed_headers(OLD_SECRET), BODY.replace(b",", b", "))


def test_a_changed_timestamp_is_refused() -> None:
    headers = signed_headers(OLD_SECRET)
    headers["webhook-timestamp"] = str(int(headers["webhook-timestamp"]) + 1)
    with pytest.raises(BadSignature):
        verify([OLD_SECRET], headers, BODY)


def test_a_changed_id_is_refused() -> None:
    headers = signed_headers(OLD_SECRET)
    headers["webhook-id"] = "msg_other"
    with pytest.raises(BadSignature):
        verify([OLD_SECRET], headers, BODY)


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "   ",
        "v1,",
        "v1,not base64!!",
        "v1," + base64.b64encode(b"x" * 32).decode(),
        "garbage",
    ],
)
def test_empty_or_garbled_signatures_are_refused(signature: str) -> None:
    headers = signed_headers(OLD_SECRET)
    headers["webhook-signature"] = signature
    with pytest.raises((BadSignature, MissingHeaders)):
        verify([OLD_SECRET], headers, BODY)


def test_a_correct_digest_under_another_version_is_refused() -> None:
    headers = signed_headers(OLD_SECRET)
    headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v1a,")
    with pytest.raises(BadSignature):
        verify([OLD_SECRET], headers, BODY)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_each_missing_header_is_refused(missing: str) -> None:
    headers = signed_headers(OLD_SECRET)
    del headers[missing]
    with pytest.raises(MissingHeaders):
        verify([OLD_SECRET], headers, BODY)


def test_a_non_integer_timestamp_is_refused() -> None:
    headers = signed_headers(OLD_SECRET)
    headers["webhook-timestamp"] = "1e9"
    with pytest.raises(BadSignature):
        verify([OLD_SECRET], headers, BODY)


def test_no_configured_secret_verifies_nothing() -> None:
    with pytest.raises(BadSignature):
        verify([], signed_headers(OLD_SECRET), BODY)


def test_a_stale_timestamp_is_its_own_error() -> None:
    headers = signed_headers(OLD_SECRET, at=time.time() - 301)
    with pytest.raises(StaleTimestamp):
        verify([OLD_SECRET], headers, BODY, tolerance=300)


def test_a_future_timestamp_is_its_own_error() -> None:
    headers = signed_headers(OLD_SECRET, at=time.time() + 301)
    with pytest.raises(FutureTimestamp):
        verify([OLD_SECRET], headers, BODY, tolerance=300)


def test_timestamps_inside_the_tolerance_verify() -> None:
    now = time.time()
    for offset in (-290, 290):
        headers = signed_headers(OLD_SECRET, at=now + offset)
        assert verify([OLD_SECRET], headers, BODY, tolerance=300, now=now) == MSG_ID


def test_a_forged_stale_message_is_a_bad_signature_not_a_stale_one() -> None:
    headers = signed_headers(OLD_SECRET, at=time.time() - 3600)
    with pytest.raises(BadSignature):
        verify([NEW_SECRET], headers, BODY)


def test_a_secret_without_prefix_is_base64_as_in_the_reference_library() -> None:
    raw = base64.b64encode(b"shared-key-bytes").decode()
    assert secret_key(raw) == secret_key("whsec_" + raw) == b"shared-key-bytes"
    now = datetime.now(UTC)
    signature = Webhook(raw).sign(MSG_ID, now, BODY.decode())
    headers = {"webhook-id": MSG_ID, "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": signature}
    assert verify([raw], headers, BODY) == MSG_ID


def test_a_secret_that_is_not_base64_is_a_configuration_error() -> None:
    with pytest.raises(ValueError):
        secret_key("plain shared string!")


def test_an_empty_secret_is_a_configuration_error() -> None:
    with pytest.raises(ValueError):
        secret_key("whsec_")


def test_the_dentally_scheme_verifies_a_hex_body_hmac() -> None:
    signature = hmac.new(b"dentally-secret", BODY, hashlib.sha256).hexdigest()
    verify_dentally("dentally-secret", BODY, signature)
    verify_dentally("dentally-secret", BODY, signature.upper())


@pytest.mark.parametrize(
    "secret, body, signature",
    [
        ("other-secret", BODY, hmac.new(b"dentally-secret", BODY, hashlib.sha256).hexdigest()),
        ("dentally-secret", BODY + b" ", hmac.new(b"dentally-secret", BODY, hashlib.sha256).hexdigest()),
        ("dentally-secret", BODY, ""),
        ("dentally-secret", BODY, "zz"),
    ],
)
def test_the_dentally_scheme_refuses_tampering(secret: str, body: bytes, signature: str) -> None:
    with pytest.raises(BadSignature):
        verify_dentally(secret, body, signature)
