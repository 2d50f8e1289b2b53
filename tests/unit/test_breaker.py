"""The teacher's circuit breaker as a state machine, on a fake clock."""

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


def test_opens_after_consecutive_failures_only():
    breaker, _, changes = make(failures=3)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    breaker.success()  # the count is of consecutive failures
    for _ in range(2):
        breaker.failure()
    assert breaker.state is State.CLOSED and breaker.allow()
    breaker.failure()
    assert breaker.state is State.OPEN and not breaker.allow()
    assert changes == [(State.CLOSED, State.OPEN)]


def test_half_open_lets_probes_through_then_closes_on_success():
    breaker, clock, changes = make(failures=1, open_s=2.0, probes=2)
    breaker.failure()
    clock.now += 1.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.allow() and breaker.allow()  # two probes
    assert not breaker.allow()  # no third while they are out
    assert breaker.state is State.HALF_OPEN
    breaker.success()
    assert breaker.state is State.CLOSED and breaker.allow()
    assert [new for _, new in changes] == [State.OPEN, State.HALF_OPEN, State.CLOSED]


def test_a_failed_probe_reopens_for_a_full_period():
    breaker, clock, _ = make(failures=1, open_s=2.0)
    breaker.failure()
    clock.now += 2.5
    assert breaker.allow()
    breaker.failure()
    assert breaker.state is State.OPEN
    clock.now += 1.0
    assert not breaker.allow()
    clock.now += 1.1
    assert breaker.allow()


@pytest.mark.parametrize("knobs", [{"failures": 0}, {"open_s": 0}, {"probes": 0}, {"x": 1}])
def test_knobs_are_validated(knobs):
    with pytest.raises(ValidationError):
        BreakerConfig(**knobs)
