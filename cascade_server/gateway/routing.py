"""The one routing decision per item: who answers it and why.

`route` is pure given its inputs: the student's margins and what the policy wanted
(`policy.decide`), each item's request options (mode, threshold, deadline), and the teacher's
load as the gateway sees it now. It returns one `Outcome` per item, which items go to the
teacher (lowest margin first, as many as it has room for), and which must be refused because
answering them with the student alone would fall below the operator's accuracy floor. Every
policy the gateway has (fixed threshold, load-aware, deadlines, overrides) is a field here, not
a branch in the orchestrator.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from .outcomes import Outcome

_CONFIDENT, _DELEGATED = int(Outcome.CONFIDENT), int(Outcome.DELEGATED)
_FORCED_TEACHER, _FORCED_STUDENT = int(Outcome.FORCED_TEACHER), int(Outcome.FORCED_STUDENT)
_DEADLINE, _CIRCUIT_OPEN, _BUSY = (
    int(Outcome.DEADLINE),
    int(Outcome.CIRCUIT_OPEN),
    int(Outcome.TEACHER_BUSY),
)


class Mode(IntEnum):
    """A request's `delegate` option."""

    AUTO = 0
    NEVER = 1
    ALWAYS = 2


@dataclass(frozen=True)
class Load:
    """The teacher as the router sees it for one batch."""

    # Items the teacher may take now (0 when it has no room); None: no bound.
    room: int | None = None
    # No room because its circuit is open (the items are degraded, not just kept).
    circuit_open: bool = False
    # The teacher's observed p95 latency (seconds), for deadlines; None: not known yet.
    p95_s: float | None = None
    # Under load, items whose margin is below this are not answered by the student alone
    # (the accuracy floor): their requests are shed. 0: never shed.
    floor_threshold: float = 0.0


@dataclass
class Routes:
    outcome: np.ndarray  # (n,) int8 Outcome codes; teacher-bound items say what was planned
    send: np.ndarray  # indices of the items sent to the teacher, lowest margin first
    shed: np.ndarray  # (n,) bool: their requests are refused (503) rather than answered


def route(
    margins: np.ndarray,
    wanted: np.ndarray,
    load: Load,
    mode: np.ndarray | None = None,
    budget_s: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
) -> Routes:
    """`wanted`: the policy's delegation per item (margin below the item's threshold, or a
    class that delegates). `mode`: per-item Mode codes (None: all AUTO). `budget_s`: per-item
    time left before the request's deadline (None or inf: no deadline). `exclude`: items not to
    send whatever they want (their requests are refused), which take no room."""
    n = len(margins)
    outcome = np.where(wanted, _DELEGATED, _CONFIDENT).astype(np.int8)
    if mode is not None:
        outcome[mode == Mode.NEVER] = _FORCED_STUDENT
        outcome[mode == Mode.ALWAYS] = _FORCED_TEACHER
        bound = (outcome == _DELEGATED) | (outcome == _FORCED_TEACHER)
    else:
        bound = wanted.copy()
    if budget_s is not None and load.p95_s is not None:
        late = bound & (budget_s < load.p95_s)
        outcome[late] = _DEADLINE
        bound &= ~late
    if exclude is not None:
        bound &= ~exclude
    candidates = np.flatnonzero(bound)
    shed = np.zeros(n, dtype=bool)
    if not candidates.size:
        return Routes(outcome, candidates, shed)
    if load.circuit_open:
        outcome[candidates] = _CIRCUIT_OPEN
        return Routes(outcome, candidates[:0], shed)
    # Forced items first (the caller asked for the teacher), then the least sure.
    forced = outcome[candidates] == _FORCED_TEACHER
    order = candidates[np.lexsort((margins[candidates], ~forced))]
    room = len(order) if load.room is None else max(load.room, 0)
    send, kept = order[:room], order[room:]
    if kept.size:
        outcome[kept] = _BUSY
        shed[kept[margins[kept] < load.floor_threshold]] = True
    return Routes(outcome, np.sort(send), shed)
