"""The teacher's circuit breaker as a state machine, on a fake clock: every call holds a ticket
and reports on it once."""

import pytest
from pydantic import ValidationError

from cascade_server.gateway.breaker import BreakerConfig, CircuitBreaker, State


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(**knobs):
    clock, changes = Clock(), []
    breaker = CircuitBreaker(
        BreakerConfig(**knobs), on_change=lambda old, new: changes.append((old, new)), clock=clock
    )
    return breaker, clock, changes


def fail(breaker):
    ticket = breaker.allow()
    assert ticket is not None
    breaker.failure(ticket)


def test_opens_after_consecutive_failures_only():
    breaker, _, changes = make(failures=3)
    for _ in range(2):
        fail(breaker)
    breaker.success(breaker.allow())  # the count is of consecutive failures
    for _ in range(2):
        fail(breaker)
    assert breaker.state is State.CLOSED and breaker.allow() is not None
    fail(breaker)
    assert breaker.state is State.OPEN and breaker.allow() is None
    assert changes == [(State.CLOSED, State.OPEN)]


def test_half_open_lets_probes_through_then_closes_on_success():
    breaker, clock, changes = make(failures=1, open_s=2.0, probes=2)
    fail(breaker)
    clock.now += 1.9
    assert breaker.allow() is None
    clock.now += 0.2
    first, second = breaker.allow(), breaker.allow()  # two probes
    assert first is not None and second is not None
    assert breaker.allow() is None  # no third while they are out
    assert breaker.state is State.HALF_OPEN
    breaker.success(first)
    assert breaker.state is State.CLOSED and breaker.allow() is not None
    assert [new for _, new in changes] == [State.OPEN, State.HALF_OPEN, State.CLOSED]


def test_a_failed_probe_reopens_for_a_full_period():
    breaker, clock, _ = make(failures=1, open_s=2.0)
    fail(breaker)
    clock.now += 2.5
    fail(breaker)  # the probe
    assert breaker.state is State.OPEN
    clock.now += 1.0
    assert breaker.allow() is None
    clock.now += 1.1
    assert breaker.allow() is not None


def test_a_cancelled_probe_gives_its_slot_back():
    """A probe that ends with no outcome (its task cancelled) must not leave the breaker
    half-open with every probe slot taken, refusing the teacher for good."""
    breaker, clock, _ = make(failures=1, open_s=1.0, probes=1)
    fail(breaker)
    clock.now += 1.5
    probe = breaker.allow()
    assert probe is not None and breaker.allow() is None
    breaker.release(probe)
    assert breaker.state is State.HALF_OPEN
    again = breaker.allow()
    assert again is not None
    breaker.success(again)
    assert breaker.state is State.CLOSED


def test_a_late_success_from_before_the_circuit_opened_does_not_close_it():
    breaker, clock, _ = make(failures=2, open_s=1.0)
    slow = breaker.allow()  # a call started while the teacher was healthy
    fail(breaker)
    fail(breaker)
    assert breaker.state is State.OPEN
    breaker.success(slow)  # ... answers after the failures opened the circuit
    assert breaker.state is State.OPEN
    clock.now += 1.5
    probe = breaker.allow()  # half-open: the old ticket still counts for nothing
    breaker.success(slow)
    assert breaker.state is State.HALF_OPEN
    breaker.failure(probe)
    assert breaker.state is State.OPEN


def test_a_late_failure_from_before_does_not_reopen_a_recovered_circuit():
    breaker, clock, _ = make(failures=1, open_s=1.0)
    old = breaker.allow()
    fail(breaker)
    clock.now += 1.5
    breaker.success(breaker.allow())
    assert breaker.state is State.CLOSED
    breaker.failure(old)
    assert breaker.state is State.CLOSED


def test_a_ticket_reports_once():
    breaker, _, _ = make(failures=2)
    ticket = breaker.allow()
    breaker.failure(ticket)
    breaker.failure(ticket)
    assert breaker.state is State.CLOSED


@pytest.mark.parametrize("knobs", [{"failures": 0}, {"open_s": 0}, {"probes": 0}, {"x": 1}])
def test_knobs_are_validated(knobs):
    with pytest.raises(ValidationError):
        BreakerConfig(**knobs)
