"""A TypeScript client generated from the live OpenAPI document (issue 19), as a service's
authors make one: `openapi-typescript` writes the types from `/api/v1/openapi.json`,
`openapi-fetch` sends the requests, `tsc --strict` compiles, Node runs it against a real
`optrack serve`.

Two proofs: every JSON answer of the document is a type, not ``unknown`` (a file of type
assertions, one per answer, generated from the document itself, must compile); and the client
in tests/clients/typescript tracks, reads, lists and gets its errors typed, with the answers
the server gave.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.processes import base_env, serve_process
from tests.support.services import IN_CI
from worker.sandbox import SandboxServer

pytestmark = pytest.mark.slow
CLIENT = Path(__file__).parents[1] / "clients" / "typescript"
HTTP_TOKEN = "ts-client-" + "t0k3n" * 6
JSON = "application/json"
# Answers that are not 2xx yet not errors: /healthz's 503 is the health report (unhealthy).
OWN_ERROR_SHAPES = {("/healthz", "503")}


def run(args: list[str], cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def answer_assertions(doc: dict[str, Any]) -> tuple[str, int]:
    """TypeScript that compiles only if every JSON answer (2xx and errors) has a known type,
    and every error answer is the one ``Errors`` model; and how many answers it checks."""
    lines = [
        'import type { components, paths } from "./api.js";',
        "type Known<T> = unknown extends T ? false : true;",
        "type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;",
        "function holds<T extends true>(): void {}",
        'type Errors = components["schemas"]["Errors"];',
    ]
    count = 0
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if JSON not in response.get("content", {}):
                    continue
                body = f'paths["{path}"]["{method}"]["responses"][{status}]["content"]["{JSON}"]'
                lines.append(f"holds<Known<{body}>>();")
                if not status.startswith("2") and (path, status) not in OWN_ERROR_SHAPES:
                    lines.append(f"holds<Same<{body}, Errors>>();")
                count += 1
    return "\n".join(lines) + "\n", count


@pytest.fixture(scope="module")
def npm_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client's folder with its packages installed (once for the module)."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        if IN_CI:
            pytest.fail("Node.js and npm are missing (CI=true)")
        pytest.skip("no Node.js/npm")
    project = tmp_path_factory.mktemp("ts") / "client"
    shutil.copytree(CLIENT, project, ignore=shutil.ignore_patterns("node_modules", "out"))
    run(["npm", "install", "--no-audit", "--no-fund", "--no-package-lock"], project)
    return project


def compile_against(project: Path, doc: dict[str, Any], sources: list[str]) -> tuple[int, str]:
    """Generate api.d.ts from ``doc``, write the answer assertions, compile ``sources`` with
    them: tsc's exit code and output."""
    (project / "openapi.json").write_text(json.dumps(doc))
    run(["node_modules/.bin/openapi-typescript", "openapi.json", "-o", "api.d.ts"], project)
    (project / "answers.ts").write_text(answer_assertions(doc)[0])
    args = (
        ["node_modules/.bin/tsc", "-p", "."]
        if not sources
        else [
            "node_modules/.bin/tsc",
            "--strict",
            "--noEmit",
            "--skipLibCheck",
            "--module",
            "NodeNext",
            "--moduleResolution",
            "NodeNext",
            *sources,
        ]
    )
    done = subprocess.run(args, cwd=project, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def test_a_generated_typescript_client_types_every_answer(
    npm_project: Path, sandbox: SandboxServer, tmp_path: Path
) -> None:
    env = base_env(
        tmp_path,
        OPTRACK_DATABASE_URL=f"sqlite:///{tmp_path / 'optrack.sqlite'}",
        OPTRACK_API_BASE_URL=sandbox.base_url,
        OPTRACK_HTTP_TOKEN=HTTP_TOKEN,
    )
    ids = [sandbox.add_operation(total=5, duration=30).id for _ in range(2)]
    with serve_process(env, tmp_path / "serve.log", "--loglevel", "WARNING") as served:
        doc = requests.get(
            f"{served.url}/api/v1/openapi.json",
            headers={"Authorization": f"Bearer {HTTP_TOKEN}"},
            timeout=30,
        ).json()
        code, output = compile_against(npm_project, doc, [])
        assert code == 0, output
        printed = run(["node", "out/client.js", served.url, HTTP_TOKEN, *ids], npm_project)

    assert answer_assertions(doc)[1] >= 60, "fewer JSON answers in the document than today"
    said = json.loads(printed)
    assert said["added"] == ids
    assert said["statuses"] == ["PENDING", "PENDING"]
    assert all(isinstance(due, str) for due in said["next_poll_at"])
    assert sorted(said["listed"]) == sorted(ids)
    assert said["bad"]["status"] == 422
    assert (said["bad"]["index"], said["bad"]["id"]) == (0, "not-an-operation")
    assert "comms_operation_" in said["bad"]["reasons"][0]
    assert said["unknown"]["status"] == 404 and said["unknown"]["reason"]
    assert said["health"] in (200, 503)


def test_an_untyped_answer_does_not_compile(npm_project: Path) -> None:
    """The check can fail: a document whose answer has an empty schema (what FastAPI wrote
    before issue 19) gives ``unknown``, and the assertions refuse it."""
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "untyped", "version": "1"},
        "paths": {
            "/x": {
                "get": {
                    "responses": {
                        "200": {
                            "description": "OK",
                            "content": {JSON: {"schema": {}}},
                        }
                    }
                }
            },
        },
    }
    code, output = compile_against(npm_project, doc, ["answers.ts"])
    assert code != 0
    assert "answers.ts" in output and "true" in output, output
