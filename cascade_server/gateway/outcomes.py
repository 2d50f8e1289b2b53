"""Why each item was answered as it was: one outcome per item, decided by the router
(routing.py), completed by the teacher call, and carried unchanged to the JSON answer, the
Open Inference Protocol outputs and the metrics (`cascade_items_total{outcome}`)."""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Outcome(IntEnum):
    # The student answered: its margin was at or above the threshold.
    CONFIDENT = 0
    # The teacher answered an item the policy delegated (margin below the threshold, the
    # student's abstain or out-of-domain class, non-finite student logits).
    DELEGATED = 1
    # The teacher answered because the request asked for it (`delegate: always`).
    FORCED_TEACHER = 2
    # The student answered because the request asked for it (`delegate: never`).
    FORCED_STUDENT = 3
    # Delegated, and the teacher was asked and failed (timeout, unavailable, error): the
    # student's answer, marked degraded.
    TEACHER_FAILED = 4
    # Delegated, but the teacher's circuit is open (it has been failing): not asked, the
    # student's answer, marked degraded.
    CIRCUIT_OPEN = 5
    # Delegated, but the teacher had no room (its in-flight bound or latency objective): the
    # student's answer. Not degraded: the teacher did not fail, the gateway chose.
    TEACHER_BUSY = 6
    # Delegated, but the request's deadline could not cover the teacher's observed latency.
    DEADLINE = 7


NAMES: tuple[str, ...] = tuple(o.name.lower() for o in Outcome)


def _mask(*members: Outcome) -> np.ndarray:
    mask = np.zeros(len(Outcome), dtype=bool)
    mask[list(members)] = True
    return mask


# Lookup tables indexed by outcome code: `BY_TEACHER[outcomes]` is a bool array per item.
BY_TEACHER = _mask(Outcome.DELEGATED, Outcome.FORCED_TEACHER)
# The teacher was asked, or is known to be failing: the answer is the student's stand-in.
DEGRADED = _mask(Outcome.TEACHER_FAILED, Outcome.CIRCUIT_OPEN)
# The policy wanted the teacher (what a delegation rate counts and a target is set for).
DELEGATED = ~_mask(Outcome.CONFIDENT, Outcome.FORCED_STUDENT)
# Sent to the teacher: its load.
SENT = _mask(Outcome.DELEGATED, Outcome.FORCED_TEACHER, Outcome.TEACHER_FAILED)

ANSWERED_BY = np.array(["teacher" if t else "student" for t in BY_TEACHER], dtype=object)


def counts(outcomes: np.ndarray) -> np.ndarray:
    """Items per outcome code (length len(Outcome))."""
    return np.bincount(outcomes, minlength=len(Outcome))
