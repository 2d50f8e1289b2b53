"""The teacher stage on its own: its bounds, and a cancelled call that gives its probe back."""

import asyncio

import numpy as np

from cascade_server.config.breaker import BreakerConfig
from cascade_server.config.teacher import TeacherConfig
from cascade_server.gateway.breaker import State
from cascade_server.gateway.delegation import TeacherStage
from cascade_server.gateway.metrics import Metrics


class Hanging:
    name, version = "hang", "1"

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def setup(self): ...
    async def close(self): ...
    async def ready(self):
        return True

    async def infer(self, feeds, headers=None, priority=None):
        self.started.set()
        await asyncio.sleep(3600)


def test_a_cancelled_half_open_probe_does_not_leave_the_teacher_refused():
    async def main():
        teacher = Hanging()
        config = TeacherConfig(breaker=BreakerConfig(failures=1, open_s=0.01, probes=1))
        stage = TeacherStage("c", teacher, config, Metrics(), n_classes=2)
        ticket = stage.breaker.allow()
        stage.breaker.failure(ticket)  # open
        await asyncio.sleep(0.02)
        _, probe = stage.load()  # half-open: the one probe
        assert probe is not None and stage.breaker.state is State.HALF_OPEN
        outcomes = []
        stage.call({"x": np.zeros((1, 2))}, 1, probe, lambda *a: outcomes.append(a))
        await teacher.started.wait()
        assert stage.load()[1] is None  # the probe is out: nobody else may call
        await stage.close()  # shutdown cancels the call: no breaker outcome
        return stage, outcomes

    stage, outcomes = asyncio.run(main())
    # The requests waiting on it are answered (by the student: no probabilities), not left.
    assert outcomes == [(None, "cancelled", None)]
    again = stage.breaker.allow()
    assert again is not None  # the slot came back
    stage.breaker.success(again)
    assert stage.breaker.state is State.CLOSED


def test_a_call_cancelled_before_it_starts_still_answers_and_gives_its_probe_back():
    async def main():
        teacher = Hanging()
        config = TeacherConfig(breaker=BreakerConfig(failures=1, open_s=0.01, probes=1))
        stage = TeacherStage("c", teacher, config, Metrics(), n_classes=2)
        stage.breaker.failure(stage.breaker.allow())  # open
        await asyncio.sleep(0.02)
        _, probe = stage.load()
        assert probe is not None and stage.breaker.state is State.HALF_OPEN
        outcomes = []
        stage.call({"x": np.zeros((1, 2))}, 1, probe, lambda *a: outcomes.append(a))
        await stage.close()  # before the call's task ran a step
        assert not teacher.started.is_set()
        return stage, outcomes

    stage, outcomes = asyncio.run(main())
    assert outcomes == [(None, "cancelled", None)]
    assert stage.breaker.allow() is not None  # the probe slot came back


def test_a_closed_stage_gives_no_room():
    async def main():
        stage = TeacherStage("c", Hanging(), TeacherConfig(), Metrics(), n_classes=2)
        await stage.close()
        return stage.load()

    load, ticket = asyncio.run(main())
    assert load.room == 0 and ticket is None and not load.circuit_open


def test_calls_in_flight_are_bounded_in_load():
    async def main():
        teacher = Hanging()
        stage = TeacherStage("c", teacher, TeacherConfig(max_in_flight=1), Metrics(), n_classes=2)
        load, ticket = stage.load()
        assert load.room == 512 and ticket is not None  # the items bound, unused yet
        stage.call({"x": np.zeros((1, 2))}, 1, ticket, lambda *a: None)
        await teacher.started.wait()
        busy, none = stage.load()
        await stage.close()
        return busy, none

    busy, none = asyncio.run(main())
    assert busy.room == 0 and not busy.circuit_open and none is None


def test_the_item_limit_follows_the_teachers_latency_against_the_slo():
    from cascade_server.config.delegation import LoadConfig

    load = LoadConfig(
        slo_s=0.1,
        initial_items_in_flight=32,
        max_items_in_flight=64,
        min_items_in_flight=2,
        backoff=0.5,
    )
    stage = TeacherStage("c", Hanging(), TeacherConfig(), Metrics(), n_classes=2, load=load)
    assert stage.limit == 32  # with an SLO it starts low, not at the maximum
    for _ in range(3):
        stage._observed(0.3, 8, ok=True)  # slower than the SLO: halves
    assert stage.limit == 4
    for _ in range(10):
        stage._observed(0.3, 8, ok=True)
    assert stage.limit == 2  # never below the minimum
    for _ in range(600):
        stage._observed(0.01, 8, ok=True)  # within the SLO: grows by a batch per limit's worth
    assert stage.limit == 64  # never above the maximum
    stage._observed(0.01, 8, ok=False)  # a failed call counts as slow
    assert stage.limit == 32
    assert stage.load()[0].room == 32
