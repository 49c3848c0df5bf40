"""Task messages of older releases, read as today's work.

A task's signature only grows (docs/architecture.md, "Task messages"): a message an older
release left in the broker still binds. Where a signature changed anyway, the old shape is
recognized here and translated, for at least one release after the change:

    task           shape of 0.1.0                         today
    optrack.poll   (operation_ids, claim_token=None,      operations are polled by poll groups:
                   strategy="fetch"), by position or      their groups are made due now, and
                   keyword                                the next tick polls them

``optrack.tick``, ``discover``, ``deliver_notices`` and ``prune`` take no argument and
``optrack.track`` takes ``operation_ids``, as in 0.1.0, then (since 0.3.0) an optional
``account``, last: their older messages bind as they are (no account: ``default``).
tests/fixtures/messages_0_1_0.json holds 0.1.0's messages as it published them. A message that
is neither today's shape nor an older one is left to the task: rejected or a dead letter.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from worker import sweep
from worker.celery_app import POLL_TASK
from worker.operation import validate_operation_id
from worker.runtime import Runtime

log = logging.getLogger(__name__)

# Today's work for a message of an older release, given this process's runtime.
Work = Callable[[Runtime], Any]


@dataclass(frozen=True)
class OldPoll:
    """``optrack.poll`` as 0.1.0 sent it: claimed operations, not a poll group."""

    operation_ids: tuple[Any, ...]

    def __call__(self, rt: Runtime) -> dict[str, int]:
        """Make the operations' groups due now: the next tick polls them (0.1.0's claim is
        gone with its columns, so nothing else is owed to it)."""
        ids = [validate_operation_id(op_id) for op_id in self.operation_ids]
        hastened = sweep.hasten(rt.sessions, ids, rt.clock.now(), rt.poll_policy)
        log.info(
            "poll: a message of optrack 0.1.0 for %d operation(s): their %d group(s) due now "
            "(%d not placed yet)",
            len(ids),
            hastened.groups,
            hastened.waiting,
        )
        return {"groups": hastened.groups, "waiting": hastened.waiting}


def _poll_0_1_0(
    operation_ids: list[str], claim_token: str | None = None, strategy: str = "fetch"
) -> None:
    """0.1.0's signature of ``optrack.poll`` (bound, never called)."""


_POLL_0_1_0 = inspect.signature(_poll_0_1_0)
_STRATEGIES_0_1_0 = ("fetch", "list")


def old_poll(args: Sequence[Any], kwargs: Mapping[str, Any]) -> OldPoll | None:
    """The 0.1.0 poll these arguments are, or None (today's shape, or not a poll at all)."""
    try:
        bound = _POLL_0_1_0.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    ids, token, strategy = (bound.arguments[name] for name in _POLL_0_1_0.parameters)
    if not isinstance(ids, list) or not (token is None or isinstance(token, str)):
        return None
    if strategy not in _STRATEGIES_0_1_0:
        return None
    return OldPoll(tuple(ids))


# Per task name: what reads its older shapes. A task without an entry kept its signature.
_READERS: Mapping[str, Callable[[Sequence[Any], Mapping[str, Any]], Work | None]] = {
    POLL_TASK: old_poll,
}


def translate(task: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Work | None:
    """Today's work for a message of an older release, or None: run the task as it is."""
    reader = _READERS.get(task)
    return None if reader is None else reader(args, kwargs)
