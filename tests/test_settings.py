"""Settings read from the environment: defaults, bounds, and the messages of refused values."""

from __future__ import annotations

from datetime import timedelta

import pytest

from worker.errors import ConfigError
from worker.runtime import Runtime
from worker.settings import load_settings


def test_the_request_deadline_defaults_to_30_seconds_and_reaches_the_client() -> None:
    assert load_settings({}).request_deadline == 30.0
    settings = load_settings({"OPTRACK_REQUEST_DEADLINE": "12.5"})
    runtime = Runtime(settings)
    assert runtime.client.timeouts.deadline == 12.5
    runtime.close()


def test_the_clock_allowance_defaults_to_a_minute_and_reaches_the_policy() -> None:
    assert load_settings({}).clock_allowance == 60.0
    runtime = Runtime(load_settings({"OPTRACK_CLOCK_ALLOWANCE": "5"}))
    assert runtime.poll_policy.clock_allowance == timedelta(seconds=5)
    runtime.close()


@pytest.mark.parametrize("raw", ["-1", "3601", "soon", "inf"])
def test_a_clock_allowance_out_of_bounds_is_refused(raw: str) -> None:
    with pytest.raises(ConfigError, match="OPTRACK_CLOCK_ALLOWANCE"):
        load_settings({"OPTRACK_CLOCK_ALLOWANCE": raw})


@pytest.mark.parametrize("raw", ["0", "0.5", "301", "-1", "soon", "inf", "nan"])
def test_a_request_deadline_out_of_bounds_is_refused(raw: str) -> None:
    with pytest.raises(ConfigError, match="OPTRACK_REQUEST_DEADLINE"):
        load_settings({"OPTRACK_REQUEST_DEADLINE": raw})


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://comms.twilio.com/v1", "https://comms.twilio.com/v1"),
        ("https://comms.twilio.com/v1/", "https://comms.twilio.com/v1"),  # a trailing slash
        ("https://proxy.example/twilio/v1", "https://proxy.example/twilio/v1"),
        ("https://comms.twilio.com:443/v1", "https://comms.twilio.com:443/v1"),
        ("http://127.0.0.1:8900/v1", "http://127.0.0.1:8900/v1"),
    ],
)
def test_the_api_root_is_accepted(url: str, expected: str) -> None:
    assert load_settings({"OPTRACK_API_BASE_URL": url}).api_base_url == expected


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://comms.twilio.com", "ending with /v1"),  # every route would answer 404
        ("https://comms.twilio.com/", "ending with /v1"),
        ("https://comms.twilio.com/v2", "ending with /v1"),
        ("https://comms.twilio.com/v1/SenderPools", "ending with /v1"),
        ("https://comms.twilio.com/x/../v1", "ending with /v1"),
        ("https://comms.twilio.com/V1", "ending with /v1"),
        ("https://comms.twilio.com/v1?region=us", "query or fragment"),
        ("https://comms.twilio.com/v1?", "query or fragment"),
        ("https://comms.twilio.com/v1#top", "query or fragment"),
        ("https://comms.twilio.com:99999/v1", "is not a URL"),
        ("https://comms.twilio.com:port/v1", "is not a URL"),
        ("https://[::1/v1", "is not a URL"),
        ("https://comms.twilio.com/v1 ", "spaces or control characters"),
        ("https://comms.twilio.com/v1\n", "spaces or control characters"),
        ("ftp://comms.twilio.com/v1", "http(s) URL"),
        ("https:///v1", "http(s) URL"),
        ("comms.twilio.com/v1", "http(s) URL"),
    ],
)
def test_a_base_url_that_is_not_the_api_root_is_refused(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match="OPTRACK_API_BASE_URL") as info:
        load_settings({"OPTRACK_API_BASE_URL": url})
    assert reason in str(info.value)


SECRET = "tok-n0t-for-your-eyes"


@pytest.mark.parametrize(
    "url",
    [
        f"https://AC{'1' * 32}:{SECRET}@comms.twilio.com/v1",
        f"https://{SECRET}@comms.twilio.com/v1",
        f"https://:{SECRET}@comms.twilio.com/v1",
        f"http://user:{SECRET}@127.0.0.1:8900/v1",
        f"https://user:{SECRET}@comms.twilio.com/v1?token={SECRET}",
        f"https://a@{SECRET}@comms.twilio.com/v1",
    ],
)
def test_credentials_in_the_base_url_are_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(ConfigError, match="holds credentials") as info:
        load_settings({"OPTRACK_API_BASE_URL": url})
    assert SECRET not in str(info.value) and "1" * 32 not in str(info.value)
    assert "***@" in str(info.value)


@pytest.mark.parametrize(
    "url", [f"https://comms.twilio.com/v1?token={SECRET}", f"https://comms.twilio.com/#{SECRET}"]
)
def test_a_query_or_fragment_is_not_echoed_either(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"OPTRACK_API_BASE_URL": url})
    assert SECRET not in str(info.value)


def test_the_not_found_grace_defaults_to_a_minute_and_reaches_the_policy() -> None:
    assert load_settings({}).not_found_grace == 60.0
    runtime = Runtime(load_settings({"OPTRACK_NOT_FOUND_GRACE": "0"}))
    assert runtime.poll_policy.not_found_grace == timedelta(0)
    runtime.close()


@pytest.mark.parametrize("raw", ["-1", "86401", "soon", "nan"])
def test_a_not_found_grace_out_of_bounds_is_refused(raw: str) -> None:
    with pytest.raises(ConfigError, match="OPTRACK_NOT_FOUND_GRACE"):
        load_settings({"OPTRACK_NOT_FOUND_GRACE": raw})
