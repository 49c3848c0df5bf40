"""Settings read from the environment: defaults, bounds, and the messages of refused values."""

from __future__ import annotations

from dataclasses import fields
from datetime import timedelta
from pathlib import Path

import pytest

from worker import ops_tasks, tasks
from worker.celery_app import app, celery_config, visibility_timeout
from worker.errors import ConfigError
from worker.runtime import Runtime
from worker.settings import BOUNDS, Settings, load_settings


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


def test_every_task_has_time_limits_within_the_claims_lease() -> None:
    settings = load_settings({})
    config = celery_config(settings)
    assert config["task_soft_time_limit"] == 120.0 == settings.claim_lease
    assert config["task_time_limit"] == 132.0  # a tenth later, at least 5 s
    short = celery_config(load_settings({"OPTRACK_POLL_TIME_LIMIT": "90"}))
    assert (short["task_soft_time_limit"], short["task_time_limit"]) == (90.0, 99.0)
    # Retention runs in batches for longer, with limits of its own.
    assert ops_tasks.prune.soft_time_limit == ops_tasks.PRUNE_SOFT_TIME_LIMIT
    assert ops_tasks.prune.time_limit == ops_tasks.PRUNE_TIME_LIMIT


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OPTRACK_CLAIM_LEASE": "3600"},
        {"OPTRACK_CLAIM_LEASE": "86400", "OPTRACK_POLL_TIME_LIMIT": "86400"},  # both at most
    ],
)
def test_redis_never_redelivers_a_message_a_worker_still_runs(env: dict[str, str]) -> None:
    """Redis's visibility timeout outlasts every task's hard time limit (and a minute's retry
    countdown): before, it was 600 s whatever the lease, and retention's own limit was 1,860."""
    settings = load_settings({"OPTRACK_BROKER_URL": "redis://127.0.0.1:6379/0", **env})
    config = celery_config(settings)
    timeout = config["broker_transport_options"]["visibility_timeout"]
    every = [tasks.tick, tasks.poll, tasks.track, ops_tasks.discover, ops_tasks.prune]
    assert {t.name for t in every} | {ops_tasks.deliver_notices.name} == {
        name for name in app.tasks if name.startswith("optrack.")
    }
    for task in [*every, ops_tasks.deliver_notices]:
        limit = task.time_limit or config["task_time_limit"]
        assert timeout >= limit + 60, f"{task.name} runs up to {limit:g} s"


@pytest.mark.parametrize(
    ("url", "kombu_url", "transport"),
    [
        (
            "sqla+sqlite:////var/lib/optrack/broker.sqlite",
            "sqlite:////var/lib/optrack/broker.sqlite",
            "worker.broker:Transport",
        ),
        ("sqla+postgresql+psycopg://u:p@db/b", "postgresql://u:p@db/b", "worker.broker:Transport"),
        ("sqla+mysql://u:p@db/b", "sqla+mysql://u:p@db/b", None),  # kombu's own transport
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", None),
    ],
)
def test_the_embedded_broker_runs_on_optracks_transport(
    url: str, kombu_url: str, transport: str | None
) -> None:
    """A `sqla+` URL on SQLite or PostgreSQL is carried by worker.broker (kombu reads the
    transport from the URL's prefix, so the prefix goes); its older release's leftovers are
    settled within the longest a message may be held."""
    settings = load_settings({"OPTRACK_BROKER_URL": url})
    config = celery_config(settings)
    assert (config["broker_url"], config.get("broker_transport")) == (kombu_url, transport)
    if transport is not None:
        options = config["broker_transport_options"]
        assert options == {"legacy_window": visibility_timeout(settings)}
        assert options["legacy_window"] >= config["task_time_limit"] + 60


def test_a_message_stops_calling_while_one_request_still_fits_in_its_claim() -> None:
    policy = Runtime(load_settings({})).poll_policy
    # 30 s deadline + 5 s in-place wait: more than the lease's last quarter (30 s).
    assert policy.deadline_margin == timedelta(seconds=35)
    policy = Runtime(load_settings({"OPTRACK_CLAIM_LEASE": "600"})).poll_policy
    assert policy.deadline_margin == timedelta(seconds=150)


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"OPTRACK_CLAIM_LEASE": "60"}, ("OPTRACK_REQUEST_DEADLINE", "OPTRACK_CLAIM_LEASE")),
        (
            {"OPTRACK_CLAIM_LEASE": "20", "OPTRACK_REQUEST_DEADLINE": "8"},
            ("OPTRACK_MAX_INPLACE_WAIT", "OPTRACK_CLAIM_LEASE"),
        ),
        ({"OPTRACK_POLL_TIME_LIMIT": "121"}, ("OPTRACK_POLL_TIME_LIMIT", "OPTRACK_CLAIM_LEASE")),
        (
            {"OPTRACK_POLL_TIME_LIMIT": "20"},
            ("OPTRACK_POLL_TIME_LIMIT", "OPTRACK_REQUEST_DEADLINE"),
        ),
        ({"OPTRACK_POLL_TIME_LIMIT": "1"}, ("OPTRACK_POLL_TIME_LIMIT",)),
    ],
)
def test_deadlines_and_time_limits_that_do_not_fit_the_lease_are_refused(
    env: dict[str, str], names: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    for name in names:
        assert name in str(info.value)


def test_deadlines_that_fit_the_lease_are_accepted() -> None:
    settings = load_settings(
        {
            "OPTRACK_CLAIM_LEASE": "20",
            "OPTRACK_REQUEST_DEADLINE": "8",
            "OPTRACK_MAX_INPLACE_WAIT": "2",
        }
    )
    assert settings.task_soft_time_limit == 20.0


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_ranges() -> dict[str, str]:
    """The configuration table of the README: variable -> its range cell."""
    rows = {}
    in_table = False
    for line in README.read_text().splitlines():
        if line.startswith("| variable | default | range | meaning |"):
            in_table = True
        elif in_table and line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells[2].strip("`")
        elif in_table and not line.startswith("|"):
            break
    return rows


def test_the_readme_range_column_is_the_bounds_table() -> None:
    ranges = readme_ranges()
    assert ranges, "the README's configuration table has no range column"
    for name, bound in BOUNDS.items():
        assert ranges.get(name) == bound.text(), name
    assert {n for n, r in ranges.items() if r != "—"} == set(BOUNDS)


def test_every_number_setting_has_a_bound() -> None:
    """Every duration or count field of Settings is read through BOUNDS, by its variable."""
    kinds = ("float", "int", "float | None", "int | None", "timedelta", "timedelta | None")
    numbers = [f.name for f in fields(Settings) if f.type in kinds]
    assert len(numbers) > 15
    assert [n for n in numbers if f"OPTRACK_{n.upper()}" not in BOUNDS] == []


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("OPTRACK_POLL_MAX_INTERVAL", "1e12"),
        ("OPTRACK_CLAIM_LEASE", "1e15"),
        ("OPTRACK_POLL_INTERVAL", "1e300"),
        ("OPTRACK_MAX_RETRY_AFTER", "1e12"),
        ("OPTRACK_TICK_INTERVAL", "1e9"),
        ("OPTRACK_PENDING_LOOKBACK", "1e20"),
        ("OPTRACK_INTAKE_LOOKBACK", "0"),
        ("OPTRACK_INTAKE_LOOKBACK", "86400"),
        ("OPTRACK_DISCOVERY_INTERVAL", "1e18"),
        ("OPTRACK_READ_TIMEOUT", "inf"),
        ("OPTRACK_CONNECT_TIMEOUT", "nan"),
        ("OPTRACK_MAX_REQUESTS_PER_SECOND", "1e9"),
        ("OPTRACK_BATCH_SIZE", "0"),
        ("OPTRACK_MAX_DUE_PER_TICK", "1000001"),
        ("OPTRACK_DISCOVERY_WINDOW", "99999999999999999999d"),
        ("OPTRACK_PRUNE_OLDER_THAN", "1e6w"),
        ("OPTRACK_PRUNE_OLDER_THAN", "10s"),
    ],
)
def test_absurd_values_are_refused_naming_the_variable_and_the_bound(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=name) as info:
        load_settings({name: raw})
    message = str(info.value)
    bound = BOUNDS[name]
    if "longer than any" not in message and "not a duration" not in message:
        assert bound.show(bound.maximum) in message and bound.show(bound.minimum) in message


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_each_bound_itself_is_accepted(name: str) -> None:
    """Both ends of every range load, and a DB-free runtime builds its policies from them."""
    bound = BOUNDS[name]
    for value in (bound.minimum, bound.maximum):
        raw = f"{value:.15g}"
        env = {name: raw + ("s" if name in DURATIONS else "")}
        if name == "OPTRACK_METRICS_PORT":
            env["PROMETHEUS_MULTIPROC_DIR"] = "/tmp/optrack-test-metrics-unused"
        env.update(NEEDS.get(name, {}))
        settings = load_settings(env)
        runtime = Runtime(settings)
        runtime.poll_policy  # noqa: B018 - builds timedeltas from every duration
        runtime.close()


DURATIONS = ("OPTRACK_DISCOVERY_WINDOW", "OPTRACK_PRUNE_OLDER_THAN")
# A short request, so the lease's smallest end holds one (deadline + in-place wait ≤ lease/2).
SHORT_REQUEST = {"OPTRACK_REQUEST_DEADLINE": "1", "OPTRACK_MAX_INPLACE_WAIT": "0"}
# What each end of a range needs of the others to be a consistent configuration.
NEEDS: dict[str, dict[str, str]] = {
    "OPTRACK_CLAIM_LEASE": SHORT_REQUEST,
    "OPTRACK_RESEND_AFTER": {"OPTRACK_CLAIM_LEASE": "10", **SHORT_REQUEST},  # ≥ the lease
    "OPTRACK_POLL_TIME_LIMIT": {"OPTRACK_CLAIM_LEASE": "86400", **SHORT_REQUEST},  # ≤ the lease
    "OPTRACK_REQUEST_DEADLINE": {"OPTRACK_CLAIM_LEASE": "1200"},  # 300 + 5 ≤ 1200 / 2
}


def test_the_resend_interval_is_at_least_the_lease() -> None:
    assert load_settings({}).resend_after == 600.0
    assert load_settings({"OPTRACK_CLAIM_LEASE": "900"}).resend_after == 900.0  # follows it
    lease = load_settings(
        {"OPTRACK_CLAIM_LEASE": "30", "OPTRACK_RESEND_AFTER": "30", **SHORT_REQUEST}
    )
    assert Runtime(lease).poll_policy.resend_after.total_seconds() == 30
    with pytest.raises(ConfigError, match="OPTRACK_RESEND_AFTER=60 is shorter than OPTRACK_CLAIM"):
        load_settings({"OPTRACK_CLAIM_LEASE": "120", "OPTRACK_RESEND_AFTER": "60"})
    assert load_settings({}).max_deliveries == 5
    with pytest.raises(ConfigError, match="OPTRACK_MAX_DELIVERIES='0' must be between 1 and 100"):
        load_settings({"OPTRACK_MAX_DELIVERIES": "0"})


def test_the_intake_lookback_is_read_once_into_the_policy() -> None:
    """A minute by default; set, it reaches the poll policy the planner and poller read."""
    assert load_settings({}).intake_lookback == 60.0
    runtime = Runtime(load_settings({"OPTRACK_INTAKE_LOOKBACK": "90"}))
    assert runtime.poll_policy.intake_lookback == timedelta(seconds=90)
