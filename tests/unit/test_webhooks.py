"""Webhook signatures (worker.webhooks): the Stripe-shaped ``t=<unix>,v1=<hex>`` header, pinned
against an HMAC computed here, and every way ``verify`` must refuse a notice."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest

from worker.errors import OptrackError, WebhookSignatureError
from worker.webhooks import sign, signature, verify

SECRET = "whsec-test-secret"
OTHER = "whsec-other-secret"
BODY = b'{"event":"operation.ended","notice_id":7}'
T = 1_764_208_146
AT = datetime.fromtimestamp(T, UTC)


def hmac_of(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def test_the_header_signs_the_timestamp_a_dot_and_the_body() -> None:
    expected = hmac_of(SECRET, b"1764208146." + BODY)
    assert signature(SECRET, T, BODY) == expected
    assert sign(SECRET, BODY, T) == f"t={T},v1={expected}"
    assert sign((SECRET, OTHER), BODY, T) == (
        f"t={T},v1={expected},v1={hmac_of(OTHER, b'1764208146.' + BODY)}"
    )
    assert verify(SECRET, BODY, sign(SECRET, BODY, T), AT) == AT


@pytest.mark.parametrize("skew", [-300, -299.5, 0, 120, 300])
def test_a_timestamp_within_the_tolerance_either_way_passes(skew: float) -> None:
    now = AT + timedelta(seconds=skew)
    assert verify(SECRET, BODY, sign(SECRET, BODY, T), now) == AT


@pytest.mark.parametrize(
    ("skew", "tolerance", "reason"),
    [
        (301, 300, "301 s old"),
        (-301, 300, "301 s in the future"),
        (365 * 86400, 300, "s old"),
        (61, 60, "61 s old, beyond the 60 s tolerance"),
    ],
)
def test_a_timestamp_outside_the_tolerance_is_refused(
    skew: float, tolerance: float, reason: str
) -> None:
    now = AT + timedelta(seconds=skew)
    with pytest.raises(WebhookSignatureError, match=reason):
        verify(SECRET, BODY, sign(SECRET, BODY, T), now, tolerance=tolerance)


def test_a_captured_body_with_a_fresh_timestamp_is_refused() -> None:
    """The replay the old scheme let through: the body and its signature, a new time."""
    captured = sign(SECRET, BODY, T)
    fresh_t = T + 365 * 86400
    now = datetime.fromtimestamp(fresh_t, UTC)
    replayed = captured.replace(f"t={T}", f"t={fresh_t}")
    with pytest.raises(WebhookSignatureError, match="does not match"):
        verify(SECRET, BODY, replayed, now)
    old_scheme = "sha256=" + hmac_of(SECRET, BODY)  # what the old sender put in the header
    with pytest.raises(WebhookSignatureError, match="exactly one t="):
        verify(SECRET, BODY, old_scheme, now)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "no X-Optrack-Signature header"),
        ("", "no X-Optrack-Signature header"),
        ("garbage", "key=value"),
        (f"v1={signature(SECRET, T, BODY)}", "exactly one t="),
        (f"t={T},t={T},v1={signature(SECRET, T, BODY)}", "exactly one t="),
        (f"t=-{T},v1={signature(SECRET, T, BODY)}", "exactly one t="),
        (f"t=１７６４２０８１４６,v1={signature(SECRET, T, BODY)}", "exactly one t="),  # noqa: RUF001
        (f"t={T}.5,v1={signature(SECRET, T, BODY)}", "exactly one t="),
        (f"t={T}", "no v1 signature"),
        (f"t={T},v0={signature(SECRET, T, BODY)}", "no v1 signature"),
        (f"t={T},v1=", "does not match"),
        (f"t={T},v1={signature(SECRET, T, BODY).upper()}", "does not match"),
        (f"t={T},v1={signature(SECRET, T, BODY)[:-1]}", "does not match"),
        (f"t={T},v1={signature(SECRET, T, BODY)}é", "does not match"),
        (f"t={T},v1={signature(OTHER, T, BODY)}", "does not match"),
        (f"t={T},v1={signature(SECRET, T, BODY + b' ')}", "does not match"),
        (f"t={T},v1={'x' * 5000}", "longer than"),
    ],
)
def test_a_bad_header_is_refused_with_the_reason(header: str | None, reason: str) -> None:
    with pytest.raises(WebhookSignatureError, match=reason) as info:
        verify(SECRET, BODY, header, AT)
    assert isinstance(info.value, OptrackError)


def test_a_changed_body_is_refused() -> None:
    header = sign(SECRET, BODY, T)
    with pytest.raises(WebhookSignatureError, match="does not match"):
        verify(SECRET, BODY.replace(b"7", b"8"), header, AT)


def test_rotation_several_secrets_or_several_signatures() -> None:
    signed_old = sign(OTHER, BODY, T)
    assert verify((SECRET, OTHER), BODY, signed_old, AT) == AT  # the receiver holds both
    signed_both = sign((SECRET, OTHER), BODY, T)
    assert verify(SECRET, BODY, signed_both, AT) == AT  # the sender signs with both
    assert verify(OTHER, BODY, signed_both, AT) == AT
    unknown_keys = f"t={T},v0=abc,scheme2=zzz,v1={signature(SECRET, T, BODY)}"
    assert verify(SECRET, BODY, unknown_keys, AT) == AT  # other schemes are ignored
    with pytest.raises(WebhookSignatureError):
        verify("whsec-third", BODY, signed_both, AT)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"now": datetime(2026, 1, 1)}, "aware"),
        ({"tolerance": 0}, "tolerance"),
        ({"tolerance": float("nan")}, "tolerance"),
        ({"tolerance": float("inf")}, "tolerance"),
        ({"secret": ""}, "non-empty"),
        ({"secret": ()}, "non-empty"),
    ],
)
def test_misuse_is_a_value_error(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "secret": SECRET,
        "body": BODY,
        "header": sign(SECRET, BODY, T),
        "now": AT,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        verify(**args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unix seconds"):
        sign(SECRET, BODY, -1)
