"""Settings read from the environment: defaults, bounds, and the messages of refused values."""

from __future__ import annotations

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


@pytest.mark.parametrize("raw", ["0", "0.5", "301", "-1", "soon", "inf", "nan"])
def test_a_request_deadline_out_of_bounds_is_refused(raw: str) -> None:
    with pytest.raises(ConfigError, match="OPTRACK_REQUEST_DEADLINE"):
        load_settings({"OPTRACK_REQUEST_DEADLINE": raw})
