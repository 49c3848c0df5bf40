"""Accounts' names, SIDs and secrets: checked at the edge, sealed at rest, never in a repr."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from worker.credentials import Vault, parse_secret_keys, validate_account_name, validate_secret
from worker.errors import AccountError, ConfigError
from worker.settings import load_settings

KEY = Fernet.generate_key().decode()
BASE = {"OPTRACK_DATABASE_URL": "sqlite://", "TWILIO_ACCOUNT_SID": "AC" + "a" * 32}


@pytest.mark.parametrize("name", ["acme", "customer-42", "a", "x_y", "9" * 63])
def test_good_names(name: str) -> None:
    assert validate_account_name(name) == name


@pytest.mark.parametrize("name", ["", "Acme", "-acme", "a b", "a/b", "é", "9" * 64, "acme\n"])
def test_bad_names(name: str) -> None:
    with pytest.raises(AccountError, match="is not an account name"):
        validate_account_name(name)


@pytest.mark.parametrize("secret", ["", "   \n", "a b", "tab\there", "x" * 513])
def test_bad_secrets_are_refused_without_being_shown(secret: str) -> None:
    with pytest.raises(AccountError) as info:
        validate_secret(secret)
    assert secret.strip() == "" or secret.strip() not in str(info.value)


def test_a_sealed_secret_opens_with_any_key_and_reseals_with_the_first() -> None:
    old, new = KEY, Fernet.generate_key().decode()
    sealed = Vault((old,)).seal("token-123")
    assert "token-123" not in sealed
    both = Vault((new, old))
    assert both.open(sealed) == "token-123"
    assert Vault((new,)).open(both.reseal(sealed)) == "token-123"
    with pytest.raises(ConfigError, match="cannot be decrypted") as info:
        Vault((new,)).open(sealed)
    assert new not in str(info.value)
    assert old not in repr(both) and new not in repr(both)


def test_no_key_no_vault() -> None:
    with pytest.raises(ConfigError, match="OPTRACK_SECRET_KEY is not set"):
        Vault(())


def test_secret_keys_are_checked_and_never_echoed() -> None:
    assert parse_secret_keys(f" {KEY} , ") == (KEY,)
    with pytest.raises(ConfigError, match="key 2 of 2 is not a Fernet key") as info:
        parse_secret_keys(f"{KEY},not-a-key-at-all")
    assert "not-a-key-at-all" not in str(info.value)


def test_the_default_account_may_use_an_api_key() -> None:
    key = "SK" + "b" * 32
    env = {**BASE, "TWILIO_API_KEY": key, "TWILIO_API_SECRET": "shh-123", "OPTRACK_SECRET_KEY": KEY}
    settings = load_settings(env)
    creds = settings.default_credentials
    assert (creds.account_sid, creds.username, creds.password) == (
        BASE["TWILIO_ACCOUNT_SID"],
        key,
        "shh-123",
    )
    assert creds.kind == "api key"
    for shown in (repr(settings), repr(creds)):
        assert "shh-123" not in shown and KEY not in shown
    assert {"shh-123", KEY} <= set(settings.secrets)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"TWILIO_API_KEY": "SK" + "b" * 32}, "TWILIO_API_KEY is set but TWILIO_API_SECRET is not"),
        ({"TWILIO_API_SECRET": "x"}, "TWILIO_API_SECRET is set but TWILIO_API_KEY is not"),
        ({"TWILIO_API_KEY": "AC" + "b" * 32, "TWILIO_API_SECRET": "x"}, "must be an API key SID"),
    ],
)
def test_half_an_api_key_is_a_configuration_error(extra: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({**BASE, **extra})
