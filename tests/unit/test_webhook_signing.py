"""Standard Webhooks signatures (worker.webhook_signing): the specification's own test vector,
the ``standardwebhooks`` library verifying what we sign (whsec_ and legacy secrets, rotation),
and the secrets OPTRACK_WEBHOOK_SECRET takes, refused without ever being shown."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from worker import webhook_signing as signing
from worker.errors import ConfigError
from worker.settings import load_settings

NEW = "whsec_" + base64.b64encode(b"n" * 32).decode()
OLD = "whsec_" + base64.b64encode(b"o" * 24).decode()
LEGACY = "whsec-" + "k3y" * 6  # optrack 0.1's form: any string
BODY = b'{"event":"operation.ended","notice_id":7}'


def test_the_specifications_test_vector() -> None:
    key = signing.key_of("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signed = signing.signature(
        key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    )
    assert signed == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_library_verifies_each_secret_of_a_rotation_and_a_legacy_one() -> None:
    now = int(datetime.now(UTC).timestamp())  # the library checks against its own clock
    keys = [signing.key_of(s) for s in (NEW, OLD, LEGACY)]
    headers = dict(signing.headers(keys, "42", now, BODY))
    assert headers["webhook-id"] == "42" and headers["webhook-timestamp"] == str(now)
    assert len(headers["webhook-signature"].split(" ")) == 3
    for receiver in (Webhook(NEW), Webhook(OLD), Webhook(LEGACY.encode())):
        assert receiver.verify(BODY, headers) == {"event": "operation.ended", "notice_id": 7}
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(NEW).verify(BODY.replace(b"7", b"8"), headers)  # a tampered body
    moved = {**headers, "webhook-id": "43"}  # the id is signed too
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(NEW).verify(BODY, moved)


@pytest.mark.parametrize(
    ("raw", "secrets"),
    [
        ("", ()),
        (LEGACY, (LEGACY,)),
        ("a legacy, secret, with commas ", ("a legacy, secret, with commas ",)),  # whole
        (NEW, (NEW,)),
        (f"{NEW},{OLD}", (NEW, OLD)),
        (f" {NEW} , {OLD} ,", (NEW, OLD)),
        (f"{NEW},{LEGACY}", (NEW, LEGACY)),  # moving from a legacy secret to a whsec_ one
        (NEW.rstrip("=") + ",", (NEW.rstrip("="),)),  # padding may be left out
    ],
)
def test_the_secrets_optrack_webhook_secret_holds(raw: str, secrets: tuple[str, ...]) -> None:
    assert signing.split_secrets(raw) == secrets


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("whsec_not*base64*at*all*!!", "not base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "key is 5 bytes; use 24 to 64"),
        ("whsec_" + base64.b64encode(b"l" * 65).decode(), "key is 65 bytes"),
        (f"{NEW},whsec_%%%%", "secret 2 of 2: a whsec_ secret is not base64"),
    ],
)
def test_a_bad_secret_is_refused_without_being_shown(raw: str, reason: str) -> None:
    with pytest.raises(signing.BadSecret, match=reason) as caught:
        signing.split_secrets(raw)
    assert raw.split(",")[-1] not in str(caught.value)
    env = {"OPTRACK_WEBHOOK_URL": "https://hooks.example.com/x", "OPTRACK_WEBHOOK_SECRET": raw}
    with pytest.raises(ConfigError, match="OPTRACK_WEBHOOK_SECRET: ") as refused:
        load_settings(env)
    assert raw.split(",")[-1] not in str(refused.value)


def test_every_secret_is_redacted_and_none_is_in_the_settings_repr() -> None:
    env = {
        "OPTRACK_WEBHOOK_URL": "https://hooks.example.com/x",
        "OPTRACK_WEBHOOK_SECRET": f"{NEW},{OLD}",
    }
    settings = load_settings(env)
    assert settings.webhook_secrets == (NEW, OLD)
    assert {NEW, OLD, NEW.removeprefix("whsec_"), OLD.removeprefix("whsec_")} <= set(
        settings.secrets
    )
    assert "whsec" not in repr(settings) and NEW[6:] not in repr(settings)


@pytest.mark.parametrize(("msg_id", "timestamp"), [("4.2", 1), ("4 2", 1), ("", 1), ("42", -1)])
def test_headers_refuse_an_id_or_time_that_cannot_be_signed_unambiguously(
    msg_id: str, timestamp: int
) -> None:
    with pytest.raises(ValueError):
        signing.headers([signing.key_of(NEW)], msg_id, timestamp, BODY)
