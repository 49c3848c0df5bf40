"""Logs: one JSON line per event with the Celery task ID and operation ID bound, set up through
Celery's own signals, and never the auth token."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import worker.celery_app  # noqa: F401  (connects the logging signals, as the worker does)
from tests.support.services import SID, TOKEN
from worker import logs
from worker.sandbox import SandboxServer
from worker.settings import load_settings

SECRET = "whsec-" + "l0g" * 6
BASE = {"OPTRACK_DATABASE_URL": "sqlite:///x.sqlite", "TWILIO_ACCOUNT_SID": SID}


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    settings = load_settings(
        {
            **BASE,
            "TWILIO_AUTH_TOKEN": TOKEN,
            "OPTRACK_LOG_FORMAT": "json",
            "OPTRACK_WEBHOOK_URL": "https://hooks.example.com/optrack",
            "OPTRACK_WEBHOOK_SECRET": SECRET,
        }
    )
    stream = io.StringIO()
    logger = logging.getLogger("tests.logs")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logs.make_handler(settings, stream)
    logger.addHandler(handler)
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_task_and_operation_ids_are_bound_while_a_task_runs(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    app = Celery("logs-test")

    @app.task(name="tests.logs.work")
    def work(op_id: str) -> None:
        logger.info("starting")
        with logs.bound_operation(op_id):
            logger.info("polled %s", op_id)
        logger.info("by extra", extra={"operation_id": "comms_operation_x"})

    work.apply(args=["comms_operation_a"], task_id="task-1")  # fires task_prerun/postrun
    logger.info("outside any task")

    first, polled, extra, outside = lines(stream)
    assert first["task_id"] == "task-1" and first["task_name"] == "tests.logs.work"
    assert "operation_id" not in first
    assert polled["operation_id"] == "comms_operation_a" and polled["task_id"] == "task-1"
    assert polled["message"] == "polled comms_operation_a" and polled["level"] == "INFO"
    assert extra["operation_id"] == "comms_operation_x"
    assert "task_id" not in outside and "operation_id" not in outside


def test_secrets_are_redacted_everywhere(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    basic = load_settings({**BASE, "TWILIO_AUTH_TOKEN": TOKEN})
    header = logs.secret_variants(basic)[-1]  # the Basic auth value that embeds the token
    logger.info("token %s in args", TOKEN)
    logger.warning(f"token {TOKEN} in the message, secret {SECRET}")
    logger.info("header Authorization: Basic %s", header)
    try:
        raise RuntimeError(f"failed with {TOKEN}")
    except RuntimeError:
        logger.exception("boom")
    out = stream.getvalue()
    assert TOKEN not in out and SECRET not in out and header not in out
    entries = lines(stream)
    assert entries[0]["message"] == "token *** in args"
    assert entries[1]["message"] == "token *** in the message, secret ***"
    assert "RuntimeError: failed with ***" in entries[3]["error"]


def test_text_format_shows_the_bound_ids() -> None:
    settings = load_settings({**BASE, "TWILIO_AUTH_TOKEN": TOKEN})
    stream = io.StringIO()
    handler = logs.make_handler(settings, stream)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "polled with %s", (TOKEN,), None)
    logs.bind_task("task-9", "optrack.poll")
    try:
        with logs.bound_operation("comms_operation_b"):
            handler.handle(record)
    finally:
        logs.bind_task(None, None)
    text = stream.getvalue()
    assert "task=task-9 op=comms_operation_b polled with ***" in text


CELERY_PROCESS = """
import logging, sys
from worker.celery_app import app
app.log.setup(loglevel="INFO")  # what `celery worker` does: fires setup_logging
app.loader.import_default_modules()
result = app.tasks["optrack.discover"].apply(task_id="task-discover")
assert result.successful(), result.traceback
logging.getLogger("worker").info("the token is %s", sys.argv[1])
"""


@pytest.mark.slow
def test_a_celery_task_logs_json_lines_through_celery_setup(
    sandbox: SandboxServer, sqlite_url: str, tmp_path: Path
) -> None:
    ops = {sandbox.add_operation(total=5, duration=3600).id for _ in range(2)}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env.update(
        OPTRACK_HOME=str(tmp_path / "home"),
        OPTRACK_DATABASE_URL=sqlite_url,
        OPTRACK_API_BASE_URL=sandbox.base_url,
        OPTRACK_LOG_FORMAT="json",
        TWILIO_ACCOUNT_SID=SID,
        TWILIO_AUTH_TOKEN=TOKEN,
    )
    done = subprocess.run(
        [sys.executable, "-c", CELERY_PROCESS, TOKEN],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stderr + done.stdout
    entries = [json.loads(line) for line in done.stderr.splitlines()]  # every line is JSON
    discovered = [e for e in entries if e["message"].startswith("discovered ")]
    assert {e["operation_id"] for e in discovered} == ops
    assert {e["task_id"] for e in discovered} == {"task-discover"}
    assert entries[-1]["message"] == "the token is ***" and "task_id" not in entries[-1]
