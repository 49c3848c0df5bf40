"""The fault tests' stack and their one check.

``fault_stack`` starts the sandbox API, workers and beat as real processes on a broker and a
database chosen by the test (shared Redis/PostgreSQL, or private ones the test may break).
``check_history`` is the proof every fault test ends with: each tracked operation's final
state equals the API's final answer, and its history has no duplicate and no lost change.
Its counts are collected as ``Figures`` (see docs/reliability.md): printed at the end of the
run, and appended as JSON lines to ``$OPTRACK_FAULT_FIGURES`` if set.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tests.support.private_services import PrivateRedis, private_redis
from tests.support.processes import (
    Sandbox,
    base_env,
    beat_args,
    celery_process,
    sandbox_process,
    stop,
    wait_for,
    worker_args,
)
from worker.db import HistoryEntry, TrackedOperation, make_engine, make_sessionmaker
from worker.tracking import ENDED_STATES

FIGURES_ENV = "OPTRACK_FAULT_FIGURES"
# Figures of this run, printed by tests/conftest.py's terminal summary.
COLLECTED: list[Figures] = []


@dataclass(frozen=True)
class Spec:
    """How the sandbox was told to run an operation: enough to know every state it can show."""

    total: int
    duration: float
    fail_ratio: float = 0.0
    outcome: str = "COMPLETED"


@dataclass
class Figures:
    """What one fault test injected and checked."""

    test: str
    faults: int
    operations: int = 0
    history_rows: int = 0
    lost: int = 0
    duplicates: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class FaultStack:
    """The running processes of one fault test, and what it needs to drive and inspect them."""

    tmp: Path
    env: dict[str, str]
    sandbox: Sandbox
    db_url: str
    exits: ExitStack
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    specs: dict[str, Spec] = field(default_factory=dict)
    frozen_log: list[dict[str, Any]] | None = None

    # --- processes ---------------------------------------------------------------------

    def start_worker(self, name: str, concurrency: int = 1) -> subprocess.Popen[bytes]:
        """Start ``celery worker`` named ``name``, logging to ``<tmp>/<name>.log``."""
        return self._start(name, worker_args(name, concurrency))

    def start_beat(self, name: str = "beat") -> subprocess.Popen[bytes]:
        """Start ``celery beat`` with its own schedule file."""
        return self._start(name, beat_args(self.tmp / f"{name}-schedule"))

    def _start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        process = self.exits.enter_context(celery_process(args, self.env, self.tmp / f"{name}.log"))
        self.processes[name] = process
        return process

    def children(self, name: str) -> list[int]:
        """PIDs of the pool processes of worker ``name``."""
        return _children(self.processes[name].pid)

    def kill(self, name: str) -> None:
        """SIGKILL worker ``name`` and its pool processes, the parent first (no hand-back)."""
        process = self.processes[name]
        pool = self.children(name)
        process.send_signal(signal.SIGKILL)
        for pid in pool:
            _signal(pid, signal.SIGKILL)
        process.wait(timeout=10)
        wait_for(lambda: not any(_alive(pid) for pid in pool), 10, f"{name}'s pool to die")

    def stop(self, name: str, timeout: float = 60) -> int:
        """SIGTERM (warm shutdown) and wait; return the exit code."""
        process = self.processes[name]
        stop(process, timeout=timeout)
        return int(process.returncode)

    def stop_all(self) -> None:
        """Warm-shut every process down at once (the exit stack then finds them stopped)."""
        running = [p for p in self.processes.values() if p.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        for process in running:
            stop(process)

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        """Every worker's and beat's log, concatenated."""
        return "\n".join(self.log(name) for name in self.processes)

    # --- operations ----------------------------------------------------------------------

    def create(self, **spec: Any) -> str:
        """Create an operation in the sandbox and remember how it runs."""
        op_id = self.sandbox.create(**spec)
        self.specs[op_id] = Spec(
            total=spec["total"],
            duration=spec["duration"],
            fail_ratio=spec.get("fail_ratio", 0.0),
            outcome=spec.get("outcome", "COMPLETED"),
        )
        return op_id

    def track(self, ids: Sequence[str]) -> None:
        """``optrack track ID...`` as a user would."""
        result = subprocess.run(
            [sys.executable, "-m", "worker", "track", *ids],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr

    def rows(self) -> dict[str, TrackedOperation]:
        engine = make_engine(self.db_url)
        try:
            with make_sessionmaker(engine)() as session:
                return {row.id: row for row in session.scalars(select(TrackedOperation))}
        finally:
            engine.dispose()

    def history(self) -> dict[str, list[HistoryEntry]]:
        engine = make_engine(self.db_url)
        try:
            with make_sessionmaker(engine)() as session:
                stmt = select(HistoryEntry).order_by(HistoryEntry.operation_id, HistoryEntry.seq)
                entries = list(session.scalars(stmt))
        finally:
            engine.dispose()
        return {
            op_id: list(group)
            for op_id, group in itertools.groupby(entries, key=lambda e: e.operation_id)
        }

    def all_ended(self) -> bool:
        rows = self.rows()
        return bool(rows) and all(row.status in ENDED_STATES for row in rows.values())

    def wait_until_all_ended(self, timeout: float) -> None:
        wait_for(self.all_ended, timeout, "every tracked operation to end", interval=0.5)

    def api_log(self) -> list[dict[str, Any]]:
        """The sandbox's request log, without the requests of ``final_answers`` (the check's)."""
        if self.frozen_log is not None:
            return self.frozen_log
        return self.sandbox.requests()

    def requests_for(self, op_id: str) -> list[dict[str, Any]]:
        return [r for r in self.api_log() if r["path"].endswith("/" + op_id)]

    def pending_faults(self) -> list[dict[str, Any]]:
        response = self.sandbox.http.get(f"{self.sandbox.root}/_sandbox/faults", timeout=5)
        response.raise_for_status()
        return list(response.json()["faults"])

    def final_answers(self) -> dict[str, dict[str, Any]]:
        """The API's answer for every tracked operation, after clearing any fault left."""
        self.frozen_log = self.sandbox.requests()
        (self.tmp / "requests.json").write_text(json.dumps(self.frozen_log, indent=1))
        self.sandbox.http.delete(f"{self.sandbox.root}/_sandbox/faults", timeout=5)
        answers = {}
        for op_id in self.specs:
            url = f"{self.sandbox.base_url}/SenderPools/Operations/{op_id}"
            response = self.sandbox.http.get(url, timeout=5)
            response.raise_for_status()
            answers[op_id] = response.json()
        return answers


@contextmanager
def fault_stack(
    tmp: Path,
    *,
    db_url: str,
    redis: PrivateRedis | None = None,
    workers: Sequence[str] = ("w1", "w2"),
    beats: Sequence[str] = ("beat",),
    **settings: str,
) -> Iterator[FaultStack]:
    """The sandbox, then ``workers`` and ``beats``; every process is stopped at exit.

    The broker is a private Redis (``redis``, or one started for the test): the shared one
    is flushed by other tests and read by other people's workers.
    """
    with ExitStack() as exits:
        if redis is None:
            redis = exits.enter_context(private_redis(tmp / "redis"))
        with _stack(tmp, db_url, redis.url(), workers, beats, settings) as stack:
            yield stack


@contextmanager
def _stack(
    tmp: Path,
    db_url: str,
    broker_url: str,
    workers: Sequence[str],
    beats: Sequence[str],
    settings: dict[str, str],
) -> Iterator[FaultStack]:
    env = base_env(
        tmp,
        OPTRACK_DATABASE_URL=db_url,
        OPTRACK_BROKER_URL=broker_url,
        OPTRACK_POLL_INTERVAL="1",
        OPTRACK_TICK_INTERVAL="0.5",
        OPTRACK_BATCH_SIZE="5",
        # One GET per operation: the sandbox's request log then says which operation was
        # asked when (the List strategy would poll many with one request).
        OPTRACK_POLL_STRATEGY="fetch",
    )
    env.update(settings)
    with ExitStack() as exits, sandbox_process(env, tmp / "sandbox.log") as api:
        env["OPTRACK_API_BASE_URL"] = api.base_url
        stack = FaultStack(tmp, env, api, db_url, exits)
        try:
            for name in workers:
                stack.start_worker(name)
            for name in beats:
                stack.start_beat(name)
            yield stack
        finally:
            stack.stop_all()


def check_history(stack: FaultStack, test: str, faults: int) -> Figures:
    """Assert that every operation ended right with a true, duplicate-free history; record it.

    For each tracked operation: its final state equals the API's final answer; its history
    rows have unique states, increasing ``seq``, never-decreasing ``created``/``failed`` and
    ``remote_updated_at``, every row but the last PROCESSING, the last equal to the final state,
    and every row is a state the sandbox really showed (nothing invented by a broken answer).
    """
    rows = stack.rows()
    answers = stack.final_answers()
    history = stack.history()
    figures = Figures(test=test, faults=faults, operations=len(rows))
    unknown = set(rows) - set(stack.specs)
    if unknown:
        figures.problems.append(f"tracked operations nobody asked for: {sorted(unknown)}")
    for op_id, spec in stack.specs.items():
        row, answer = rows.get(op_id), answers[op_id]
        entries = history.get(op_id, [])
        figures.history_rows += len(entries)
        problems = _check_operation(op_id, row, answer, entries, spec)
        if any(p.startswith("duplicate") for p in problems):
            figures.duplicates += 1
        if any(not p.startswith("duplicate") for p in problems):
            figures.lost += 1
        figures.problems += problems
    record(figures)
    assert not figures.problems, "\n".join(figures.problems)
    return figures


def _check_operation(
    op_id: str,
    row: TrackedOperation | None,
    answer: dict[str, Any],
    entries: list[HistoryEntry],
    spec: Spec,
) -> list[str]:
    if row is None:
        return [f"{op_id}: not tracked"]
    final = (
        answer["status"],
        *(answer["stats"][k] for k in ("total", "queued", "created", "failed")),
    )
    problems = []
    known = (row.status, row.total, row.queued, row.created, row.failed)
    if known != final:
        problems.append(f"{op_id}: known state {known} != the API's final answer {final}")
    states = [(e.status, e.total, e.queued, e.created, e.failed) for e in entries]
    if not states or states[-1] != final:
        problems.append(f"{op_id}: history does not end in the final state {final}: {states}")
    if len(states) != len(set(states)):
        problems.append(f"duplicate: {op_id}: a state was recorded twice: {states}")
    pairs = list(itertools.pairwise(entries))
    if not all(a.seq < b.seq for a, b in pairs):
        problems.append(f"{op_id}: seq does not increase: {[e.seq for e in entries]}")
    if not all(a.created <= b.created and a.failed <= b.failed for a, b in pairs):
        problems.append(f"{op_id}: created/failed went backwards: {states}")
    if not all(a.remote_updated_at <= b.remote_updated_at for a, b in pairs):
        problems.append(f"{op_id}: updatedAt went backwards")
    if any(s[0] != "PROCESSING" for s in states[:-1]):
        problems.append(f"{op_id}: a row after an end state: {states}")
    for state in states[:-1]:
        if not _possible(state, spec):
            problems.append(f"{op_id}: {state} is a state the API never showed")
    return problems


def _possible(state: tuple[Any, ...], spec: Spec) -> bool:
    """True if the sandbox shows ``state`` while PROCESSING (see worker/sandbox/simulation.py)."""
    status, total, queued, created, failed = state
    processed = int(created + failed)
    expected_failed = min(processed, math.floor(processed * spec.fail_ratio + 1e-9))
    return bool(
        status == "PROCESSING"
        and total == spec.total
        and 0 <= processed <= total - 1
        and queued == total - processed
        and failed == expected_failed
    )


def record(figures: Figures) -> None:
    """Keep the figures for the run's summary, and append them to $OPTRACK_FAULT_FIGURES."""
    COLLECTED.append(figures)
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a") as out:
            out.write(json.dumps(asdict(figures)) + "\n")


def summary_lines(figures: Sequence[Figures] = ()) -> list[str]:
    """The totals of the fault tests, as printed at the end of a run."""
    figures = list(figures) or COLLECTED
    if not figures:
        return []
    total = {
        name: sum(getattr(f, name) for f in figures)
        for name in ("faults", "operations", "history_rows", "lost", "duplicates")
    }
    return [
        f"fault tests: {len(figures)} run, {total['faults']} faults survived, "
        f"{total['operations']} operations and {total['history_rows']} history rows checked, "
        f"lost = {total['lost']}, duplicates = {total['duplicates']}"
    ]


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def main(argv: Sequence[str]) -> None:
    """``python -m tests.support.fault_stack FIGURES.jsonl``: per-test figures and the totals."""
    figures = [
        Figures(**json.loads(line))
        for path in argv
        for line in Path(path).read_text().split("\n")
        if line.strip()
    ]
    print("| test | faults | operations | history rows | lost | duplicates |")
    print("|---|---:|---:|---:|---:|---:|")
    for f in figures:
        print(
            f"| `{f.test}` | {f.faults} | {f.operations} | {f.history_rows} | {f.lost} "
            f"| {f.duplicates} |"
        )
    for line in summary_lines(figures):
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
