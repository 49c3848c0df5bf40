"""schemathesis against a live `optrack serve` (issue 19): every answer matches the document.

The server is a real process on a real socket, on a migrated database (SQLite and PostgreSQL)
holding operations tracked and polled the real way (the sandbox API, the real poller) and a
dead letter. schemathesis reads the document from the server, with the token, and sends what
its examples, coverage and fuzzing phases make of every operation (valid and invalid input),
checking: no 5xx (/healthz's documented 503 aside), every status documented, every content
type documented, every body valid against its schema. Examples are bounded and the seed fixed,
so a run takes seconds and a failure repeats.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.processes import base_env, serve_process
from worker import dead_letters, intake
from worker.clock import FakeClock
from worker.runtime import Runtime
from worker.sandbox import SandboxServer
from worker.settings import load_settings

HTTP_TOKEN = "schema-" + "t0k3n" * 6
# Examples per operation and phase, the seed fixed: about 5 s a backend, a failure repeats.
CONFIG = """
seed = 19
workers = 1
request-timeout = 30
phases.stateful.enabled = false
generation.max-examples = 15
# A long poll would hold an example up to 60 s (the wait is tested end to end in
# tests/e2e/test_wait_http.py): every example asks with no wait.
parameters = { "query.wait" = "0s" }

[checks]
enabled = false
not_a_server_error.enabled = true
status_code_conformance.enabled = true
content_type_conformance.enabled = true
response_schema_conformance.enabled = true

# The event stream never ends; its frames are tested in tests/e2e/test_wait_http.py.
[[operations]]
include-path = "/api/v1/events"
enabled = false

# /healthz's 503 is its documented answer (unhealthy, with the reasons), not a server error.
[[operations]]
include-path = "/healthz"
checks.not_a_server_error.expected-statuses = ["2XX", "4XX", 503]
"""


def seed(env: dict[str, str], sandbox: SandboxServer, clock: FakeClock) -> list[str]:
    """Operations in every kind of state, with history, and one dead letter."""
    rt = Runtime(load_settings(env), clock=clock)
    try:
        ops = [sandbox.add_operation(total=6, duration=10) for _ in range(3)]
        ops.append(sandbox.add_operation(total=400, duration=600))
        ids = [op.id for op in ops]
        intake.track(rt.sessions, ids, clock.now())
        rt.poller.refresh(ids)
        clock.advance(5)
        rt.poller.refresh(ids)
        clock.advance(20)
        rt.poller.refresh(ids[:2])  # two ended, two still processing
        with rt.sessions.begin() as session:
            dead_letters.bury(
                session,
                task_id="dead-1",
                task="optrack.track",
                args=[[ids[0]]],
                reason="gave up after 5 deliveries",
                deliveries=5,
                now=clock.now(),
            )
    finally:
        rt.close()
    return ids


def test_every_answer_of_a_live_server_matches_the_document(
    db_url: str, sandbox: SandboxServer, clock: FakeClock, tmp_path: Path
) -> None:
    env = base_env(
        tmp_path,
        OPTRACK_DATABASE_URL=db_url,
        OPTRACK_API_BASE_URL=sandbox.base_url,
        OPTRACK_HTTP_TOKEN=HTTP_TOKEN,
    )
    seed(env, sandbox, clock)
    schemathesis = Path(sys.executable).with_name("schemathesis")
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    with serve_process(env, tmp_path / "serve.log", "--loglevel", "WARNING") as served:
        run = subprocess.run(
            [
                str(schemathesis),
                "--config-file",
                str(config),
                "run",
                f"{served.url}/api/v1/openapi.json",
                "--header",
                f"Authorization: Bearer {HTTP_TOKEN}",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=tmp_path,  # its reports and cassettes stay out of the repository
        )
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert "No issues found" in run.stdout or "passed" in run.stdout, report
