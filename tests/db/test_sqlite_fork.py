"""A process forked while another of its parent's threads is inside an SQLite transaction.

Celery forks its pool processes and beat from a main process whose threads (the metrics
server answering a scrape, the heartbeat) use the database meanwhile. SQLite keeps a
process's locks on a file in memory, shared by all its connections to that file: a child
forked in the middle of such a transaction inherited the bookkeeping of a write lock it did
not hold, and every write it tried after waited out the busy timeout and failed ("database is
locked"), for ever: a worker whose pool never ticked nor polled; or, the parent's connection
still open at the fork, a checkpoint at its close lost what the child wrote (worker.db.ForkGuard).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import text

from worker.db import FORK_GUARD, make_engine


def test_a_child_forked_while_a_thread_is_in_a_transaction_can_write(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fork.sqlite'}"
    engine = make_engine(url, pooled=False)  # as the metrics server's
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    inside = threading.Event()
    forked = threading.Event()

    def transaction() -> None:  # a scrape or a heartbeat in the main process
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))
            inside.set()
            # Until the fork happened, or waits for this transaction to end.
            while not (forked.is_set() or FORK_GUARD.forking):
                time.sleep(0.01)

    thread = threading.Thread(target=transaction)
    thread.start()
    inside.wait()
    pid = os.fork()
    if pid == 0:  # the child: its own engine, as a pool process builds after the fork
        code = 1
        try:
            with make_engine(url).begin() as conn:
                conn.execute(text("INSERT INTO t VALUES (2)"))
            code = 0
        except BaseException as exc:  # said on stderr, for the failure's output
            print(f"the child: {exc!r}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)
    forked.set()
    thread.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child could not write"
    with engine.connect() as conn:
        assert sorted(conn.scalars(text("SELECT x FROM t"))) == [1, 2]
    engine.dispose()
