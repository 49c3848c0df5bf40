"""The compose file: the production stack, secrets from the environment, no public databases."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.services import IN_CI

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def test_stack_has_every_service(compose: dict[str, Any]) -> None:
    assert {"redis", "postgres", "migrate", "worker", "beat", "api"} <= set(compose["services"])
    worker = compose["services"]["worker"]["command"]
    beat = compose["services"]["beat"]["command"]
    assert worker[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert beat[:4] == ["celery", "-A", "worker.celery_app", "beat"]


def test_databases_publish_no_ports_and_secrets_come_from_env(compose: dict[str, Any]) -> None:
    for name in ("redis", "postgres"):
        assert "ports" not in compose["services"][name]
    text = (ROOT / "docker-compose.yml").read_text()
    assert "${TWILIO_AUTH_TOKEN:?" in text and "${POSTGRES_PASSWORD:?" in text


def test_api_service_needs_a_token_and_is_published_on_loopback(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert api["command"][:2] == ["optrack", "serve"]
    assert api["ports"] == ["127.0.0.1:${OPTRACK_HTTP_PORT:-8080}:8080"]
    assert api["environment"]["OPTRACK_HTTP_TOKEN"].startswith("${OPTRACK_HTTP_TOKEN:?")
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert "profiles" not in api  # part of the default stack


def test_rabbitmq_is_an_optional_profile_the_workers_wait_for(compose: dict[str, Any]) -> None:
    rabbit = compose["services"]["rabbitmq"]
    assert rabbit["profiles"] == ["rabbitmq"] and "ports" not in rabbit
    assert rabbit["environment"]["RABBITMQ_DEFAULT_PASS"].startswith("${RABBITMQ_PASSWORD")
    for name in ("worker", "beat"):
        wait = compose["services"][name]["depends_on"]["rabbitmq"]
        assert wait == {"condition": "service_healthy", "required": False}
    broker = compose["services"]["worker"]["environment"]["OPTRACK_BROKER_URL"]
    assert broker == "${OPTRACK_BROKER_URL:-redis://redis:6379/0}"


def test_docker_compose_config_validates() -> None:
    if (
        shutil.which("docker") is None
        or subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False
        ).returncode
    ):
        if IN_CI:
            pytest.skip("no docker compose client on this machine; YAML checks above still ran")
        pytest.skip("no docker compose client")
    env = {
        "POSTGRES_PASSWORD": "x",
        "TWILIO_ACCOUNT_SID": "AC",
        "TWILIO_AUTH_TOKEN": "x",
        "OPTRACK_HTTP_TOKEN": "x" * 32,
    }
    result = subprocess.run(
        ["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        env={**env, "PATH": "/usr/bin:/bin:/usr/local/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
