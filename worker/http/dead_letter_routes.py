"""Dead letters over HTTP, as `optrack dead-letters` has them: list (GET), replay (POST).

A replay changes state, so it is a POST with a JSON body behind the token, like tracking
(``guards``: 415 for any other Content-Type). The letters are sent again on the broker of
this process's settings (``celery_app.publisher``), built at the first replay.
"""

from __future__ import annotations

import logging
from typing import Annotated, TypedDict

import msgspec
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from worker import dead_letters, replay
from worker.db import MAX_ROW_ID
from worker.errors import BrokerError, NotWaiting
from worker.http.openapi import answer, body, error
from worker.http.problems import Problem
from worker.http.routes import runtime

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1")

LetterId = Annotated[int, msgspec.Meta(ge=1, le=MAX_ROW_ID)]


class ReplayRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The letters to send again: their ``ids``, or ``all`` of those waiting."""

    ids: list[LetterId] | None = None
    all: bool = False


class ReplayedRecord(TypedDict):
    """A dead letter sent again, and the task id of the new message."""

    id: int
    task: str
    task_id: str


class ReplayAnswer(TypedDict):
    """The letters sent again, in the order they came (empty: none was waiting)."""

    replayed: list[ReplayedRecord]


async def replay_request(request: Request) -> ReplayRequest:
    """The body, JSON of ``ReplayRequest`` with its ids or all (not both, not neither)."""
    try:
        given = msgspec.json.decode(await request.body() or b"null", type=ReplayRequest)
    except msgspec.DecodeError as exc:  # ValidationError too: it says which field and why
        reason = f'body must be {{"ids": [...]}} or {{"all": true}}: {exc}'
        raise Problem(422, [{"reason": reason}]) from None
    if (given.ids is None) == (not given.all) or given.ids == []:
        raise Problem(422, [{"reason": 'give the letters\' "ids", or "all": true (not both)'}])
    return given


@router.get(
    "/dead-letters",
    summary="List the dead letters",
    responses=answer(dead_letters.LettersRecord, "The dead letters in the order they came"),
)
def list_dead_letters(
    request: Request,
    replayed: Annotated[bool, Query(description="Also the letters replayed already")] = False,
) -> JSONResponse:
    """`optrack dead-letters --json`: the task messages optrack gave up on."""
    with runtime(request).sessions() as session:
        letters = dead_letters.letters(session, replayed=replayed)
    listed: dead_letters.LettersRecord = {
        "dead_letters": [dead_letters.as_json(x) for x in letters]
    }
    return JSONResponse(listed)


@router.post(
    "/dead-letters/replay",
    summary="Replay dead letters",
    responses={
        **answer(ReplayAnswer, "The letters sent again, each under a new task id"),
        **error(404, "A letter named is unknown or replayed already; nothing was sent"),
    },
    openapi_extra=body(ReplayRequest, '{"ids": [1, 2]} or {"all": true}'),
)
def replay_dead_letters(
    given: Annotated[ReplayRequest, Depends(replay_request)], request: Request
) -> JSONResponse:
    """`optrack dead-letters replay ID... | --all`: each letter sent again as a new message.

    Every id is checked first: one not waiting and nothing is sent (404).
    """
    rt = runtime(request)
    state = request.app.state
    if getattr(state, "send_task", None) is None:
        from worker.celery_app import publisher  # Celery only once a letter is replayed

        state.send_task = publisher(rt.settings)
    done: list[ReplayedRecord] = []
    try:
        for sent in replay.replay(rt.sessions, given.ids, state.send_task, rt.clock):
            done.append({"id": sent.letter_id, "task": sent.task, "task_id": sent.task_id})
    except NotWaiting as exc:
        raise Problem(
            404,
            [
                {"reason": f"no dead letter waiting with id {i}", "index": given.ids.index(i)}
                for i in exc.letter_ids
                if given.ids is not None
            ],
        ) from None
    except BrokerError as exc:
        # The driver's message may name hosts: the log gets it, the caller what to do.
        log.warning("http: %s", exc)
        sent_ids = ", ".join(str(x["id"]) for x in done) or "none"
        reason = f"the broker did not take a message; replayed before it: {sent_ids}; try again"
        raise Problem(503, [{"reason": reason}]) from None
    replayed: ReplayAnswer = {"replayed": done}
    return JSONResponse(replayed)
