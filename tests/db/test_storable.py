"""Text the database cannot store (issue 18): an API error message holding NUL (PostgreSQL
refuses it), lone surrogates (neither database can encode them) or no end, over the sandbox
on SQLite and PostgreSQL; and a write the database refuses costs only its own operation."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.db.test_tracking import POLICY, history_count, make_poller, poll_all, row, tick
from worker import intake
from worker.account import DbGate
from worker.clock import FakeClock
from worker.db import PollGroup
from worker.errors import ApiErrorDetail, ServerError
from worker.recorder import Recorder, Result
from worker.sandbox import Fault, SandboxServer
from worker.tracking import Outcome

# NUL, a lone high and a lone low surrogate, and more text than any column of ours should hold.
BAD_TEXT = "upstream said \x00 then \ud800 and \udfff " + "and on " * 2000
LIST_POLICY = replace(POLICY, strategy="list", list_threshold=1)


def assert_storable(text: str | None, limit: int) -> None:
    assert text is not None and "upstream said" in text
    assert "\x00" not in text and "then \ufffd and \ufffd and on" in text
    assert len(text) <= limit
    text.encode("utf-8")  # no lone surrogate left


def test_an_error_message_the_database_cannot_store_costs_no_answer_of_its_group(
    sessions: sessionmaker[Session],
    sandbox: SandboxServer,
    make_client,  # type: ignore[no-untyped-def]
    db_gate: DbGate,
    clock: FakeClock,
) -> None:
    ops = [sandbox.add_operation(total=4, duration=3600) for _ in range(3)]
    intake.track(sessions, [o.id for o in ops], clock.now())
    poller = make_poller(sessions, make_client(gate=db_gate))
    sandbox.add_fault(Fault(kind="status", status=500, match=ops[0].id, message=BAD_TEXT))

    counts = poll_all(poller, tick(sessions, clock))

    assert (counts.outcomes[Outcome.CHANGED], counts.outcomes[Outcome.ERROR]) == (2, 1)
    for op in ops[1:]:  # the rest of the group is recorded
        assert row(sessions, op.id).status == "PROCESSING" and history_count(sessions, op.id) == 1
    bad = row(sessions, ops[0].id)  # its own operation backs off, the text made storable
    assert bad.consecutive_errors == 1 and bad.not_before is not None
    assert_storable(bad.last_error, 1000)
    # The next poll asks again: nothing repeats for ever.
    clock.current = bad.not_before
    poll_all(poller, tick(sessions, clock))
    assert row(sessions, ops[0].id).consecutive_errors == 0
    assert history_count(sessions, ops[0].id) == 1


def test_a_list_page_error_the_database_cannot_store_backs_off_its_window(
    sessions: sessionmaker[Session],
    sandbox: SandboxServer,
    make_client,  # type: ignore[no-untyped-def]
    db_gate: DbGate,
    clock: FakeClock,
) -> None:
    ops = [sandbox.add_operation(total=4, duration=3600) for _ in range(3)]
    intake.track(sessions, [o.id for o in ops], clock.now())
    poller = make_poller(sessions, make_client(gate=db_gate), LIST_POLICY)
    # Only the List request has a query: the fault is its.
    sandbox.add_fault(Fault(kind="status", status=500, match="Operations?", message=BAD_TEXT))

    counts = poll_all(poller, tick(sessions, clock, policy=LIST_POLICY))

    assert counts.outcomes[Outcome.ERROR] == 3
    for op in ops:
        assert_storable(row(sessions, op.id).last_error, 1000)
    with sessions() as session:
        group = session.scalars(select(PollGroup)).one()
    assert group.claim_token is None and group.consecutive_errors == 1  # its schedule written
    assert_storable(group.last_error, 1000)


def test_a_429_whose_message_the_database_cannot_store_still_pauses_every_process(
    sessions: sessionmaker[Session],
    sandbox: SandboxServer,
    make_client,  # type: ignore[no-untyped-def]
    db_gate: DbGate,
    clock: FakeClock,
) -> None:
    ops = [sandbox.add_operation(total=4, duration=3600) for _ in range(2)]
    intake.track(sessions, [o.id for o in ops], clock.now())
    poller = make_poller(sessions, make_client(gate=db_gate))
    sandbox.add_fault(Fault(kind="status", status=429, retry_after="60", message=BAD_TEXT))

    counts = poll_all(poller, tick(sessions, clock))

    assert counts.outcomes[Outcome.DEFERRED] == 2
    until = clock.now() + timedelta(seconds=60)
    other = DbGate(sessions.kw["bind"], db_gate.account_sid, clock)  # another process
    paused = other.paused_until(clock.now())
    assert paused is not None and paused[0] == until
    pause = other.current()
    assert pause is not None and pause.status_code == 429
    assert_storable(pause.reason, 1000)
    assert len(sandbox.requests_log()) == 1  # nobody called during the pause


def test_a_write_the_database_refuses_costs_only_its_own_operation(
    sessions: sessionmaker[Session],
    sandbox: SandboxServer,
    make_client,  # type: ignore[no-untyped-def]
    clock: FakeClock,
) -> None:
    """Whatever the edge lets through: an error built here (the client would have cleaned its
    text) that neither database can encode, among true answers of the sandbox."""
    ops = [sandbox.add_operation(total=4, duration=3600) for _ in range(5)]
    intake.track(sessions, [o.id for o in ops], clock.now())
    client = make_client()
    results: dict[str, Result] = {o.id: client.fetch(o.id) for o in ops}
    refused = ServerError(500, (ApiErrorDetail(20500, "lone \ud800"),), sandbox.base_url)
    results[ops[2].id] = refused

    recorded = Recorder(sessions, POLICY).record(results, clock.now())

    assert recorded.outcomes == {
        o.id: Outcome.ERROR if o is ops[2] else Outcome.CHANGED for o in ops
    }
    assert recorded.history == 4 and recorded.rows == 5
    for op in ops:
        if op is not ops[2]:
            assert row(sessions, op.id).status == "PROCESSING"
            assert history_count(sessions, op.id) == 1
    bad = row(sessions, ops[2].id)  # backed off, as after any failed poll
    assert (bad.status, bad.consecutive_errors) == ("PENDING", 1)
    assert bad.not_before == clock.now() + POLICY.interval
    assert bad.last_error is not None and bad.last_error.startswith(
        "UnstorableAnswer: the database refused the answer (UnicodeEncodeError"
    )
    # Refused again: the operation keeps backing off, nothing else is touched.
    clock.current = bad.not_before
    again = Recorder(sessions, POLICY).record({ops[2].id: refused}, clock.now())
    assert again.outcomes == {ops[2].id: Outcome.ERROR}
    assert row(sessions, ops[2].id).consecutive_errors == 2
