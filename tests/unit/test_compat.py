"""Messages of optrack 0.1.0, as it published them (tests/fixtures/messages_0_1_0.json): each
binds to today's task, or ``worker.compat`` translates it; anything else is left to the task.

Through a real broker and worker: tests/e2e/test_old_messages.py.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest

from worker import celery_app, compat, ops_tasks, tasks
from worker.celery_app import POLL_TASK, app

FIXTURE = Path(__file__).parents[1] / "fixtures" / "messages_0_1_0.json"
MESSAGES: list[dict[str, Any]] = json.loads(FIXTURE.read_text())["messages"]
ID = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"
TASK_MODULES = (tasks, ops_tasks)  # imported, they register their tasks with the app
TASK_NAMES = {v for k, v in vars(celery_app).items() if k.endswith("_TASK")}


def test_the_fixture_holds_protocol_2_messages_of_every_task() -> None:
    assert {m["headers"]["task"] for m in MESSAGES} == TASK_NAMES
    for message in MESSAGES:
        headers, (args, kwargs, embed) = message["headers"], message["body"]
        assert message["content-type"] == "application/json"
        assert headers["id"] == message["properties"]["correlation_id"]
        assert headers["lang"] == "py" and isinstance(args, list) and isinstance(kwargs, dict)
        assert set(embed) == {"callbacks", "errbacks", "chain", "chord"}


@pytest.mark.parametrize("message", MESSAGES, ids=[m["name"] for m in MESSAGES])
def test_every_message_of_0_1_0_binds_today_or_is_translated(message: dict[str, Any]) -> None:
    name = message["headers"]["task"]
    args, kwargs, _ = message["body"]
    work = compat.translate(name, args, kwargs)
    if name == POLL_TASK:
        ids = args[0] if args else kwargs["operation_ids"]
        assert work == compat.OldPoll(tuple(ids))
        with pytest.raises(TypeError):  # today's body could not take it: hence the translation
            inspect.signature(app.tasks[name].run).bind(*args, **kwargs)
    else:
        assert work is None
        inspect.signature(app.tasks[name].run).bind(*args, **kwargs)  # as it is


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ([7, "token"], {}),  # today's poll
        ([], {"group_id": 7, "claim_token": "token"}),  # today's, by keyword
        ([7], {}),  # neither: one argument of two
        ([[ID], 5, "fetch"], {}),  # a token that is no string
        ([[ID], None, "carrier-pigeon"], {}),  # a strategy 0.1.0 never had
        ([[ID], None, "fetch", "more"], {}),  # more than 0.1.0 took
        ([], {"operation_ids": [ID], "group_id": 7}),  # a keyword 0.1.0 never had
        (["comms_operation_01h9krwprkeee8fzqspvwy6nq8"], {}),  # a string, not a list
    ],
)
def test_only_0_1_0_shapes_are_translated(args: list[Any], kwargs: dict[str, Any]) -> None:
    assert compat.translate(POLL_TASK, args, kwargs) is None


def test_tasks_that_kept_their_signature_are_never_translated() -> None:
    for name in TASK_NAMES - {POLL_TASK}:
        assert compat.translate(name, [[ID], None, "fetch"], {}) is None
