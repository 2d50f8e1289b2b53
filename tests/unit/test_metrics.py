"""Metrics recorded per batch and per loop iteration equal what per-item recording gives."""

import asyncio

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from cascade_server.gateway.metrics import Metrics, observe_many


def _samples(text: bytes, prefix: str) -> dict[str, float]:
    out = {}
    for line in text.decode().splitlines():
        if line.startswith(prefix):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_observe_many_equals_a_loop_of_observe():
    values = np.concatenate([np.linspace(-0.1, 1.2, 257), [0.05, 0.05, 0.1, 1.0]])
    a, b = CollectorRegistry(), CollectorRegistry()
    buckets = tuple(round(0.05 * i, 2) for i in range(1, 21))
    ha = Histogram("h", "x", buckets=buckets, registry=a)
    hb = Histogram("h", "x", buckets=buckets, registry=b)
    for v in values:
        ha.observe(float(v))
    observe_many(hb, values)
    observe_many(hb, np.array([]))
    sa, sb = _samples(generate_latest(a), "h_"), _samples(generate_latest(b), "h_")
    for s in (sa, sb):
        del s["h_created"]
    assert sa.keys() == sb.keys() and len(sa) == 23  # 21 buckets (+Inf), count, sum
    assert abs(sa.pop("h_sum") - sb.pop("h_sum")) < 1e-9
    assert sa == sb


def test_per_request_observations_are_written_within_one_loop_iteration():
    metrics = Metrics()

    async def main():
        metrics.request_started()
        metrics.request_started()
        await asyncio.sleep(0)
        in_flight = metrics.in_flight._value.get()
        for total in (0.001, 0.002, 0.004):
            metrics.request_done("c", 0.0005, 0.0001, total, 0.0002)
        metrics.request_finished()
        metrics.request_finished()
        pending_before = metrics.latency.labels("c", "total")._sum.get()
        await asyncio.sleep(0)
        return in_flight, pending_before

    in_flight, pending_before = asyncio.run(main())
    assert in_flight == 2
    assert pending_before == 0  # buffered until the loop turns
    text = metrics.render()[0]
    s = _samples(text, "cascade_stage_seconds")
    assert s['cascade_stage_seconds_count{cascade="c",stage="total"}'] == 3
    assert abs(s['cascade_stage_seconds_sum{cascade="c",stage="total"}'] - 0.007) < 1e-12
    assert s['cascade_stage_seconds_count{cascade="c",stage="overhead"}'] == 3
    assert s['cascade_stage_seconds_count{cascade="c",stage="queue"}'] == 3
    # overhead = total - preprocess - queue - models
    overhead = sum(t - 0.0005 - 0.0001 - 0.0002 for t in (0.001, 0.002, 0.004))
    assert abs(s['cascade_stage_seconds_sum{cascade="c",stage="overhead"}'] - overhead) < 1e-12
    requests = _samples(text, "cascade_requests_total")
    assert requests['cascade_requests_total{cascade="c",status="ok"}'] == 3
    assert _samples(text, "cascade_in_flight_requests")["cascade_in_flight_requests"] == 0


def test_items_are_counted_by_outcome_and_requests_by_status_apart():
    """An HTTP call and an item are different things: a batch request of 3 is 1 request and 3
    items, in two families."""
    from cascade_server.gateway.outcomes import Outcome

    metrics = Metrics()
    metrics.prime("c")
    outcomes = np.array([Outcome.CONFIDENT, Outcome.DELEGATED, Outcome.TEACHER_BUSY], np.int8)
    metrics.items("c", outcomes)
    metrics.items("c", np.array([Outcome.TEACHER_FAILED], np.int8))
    metrics.rejected("c")
    text = metrics.render()[0]
    items = _samples(text, "cascade_items_total")
    assert items['cascade_items_total{cascade="c",outcome="confident"}'] == 1
    assert items['cascade_items_total{cascade="c",outcome="delegated"}'] == 1
    assert items['cascade_items_total{cascade="c",outcome="teacher_busy"}'] == 1
    assert items['cascade_items_total{cascade="c",outcome="teacher_failed"}'] == 1
    assert items['cascade_items_total{cascade="c",outcome="deadline"}'] == 0
    requests = _samples(text, "cascade_requests_total")
    assert requests['cascade_requests_total{cascade="c",status="rejected"}'] == 1
    assert requests['cascade_requests_total{cascade="c",status="ok"}'] == 0
    # delegated by the policy: 3 of 4 items (whoever then answered them)
    ratio = _samples(text, "cascade_delegation_ratio")
    assert ratio['cascade_delegation_ratio{cascade="c"}'] == 0.75


def test_recording_never_raises(caplog):
    metrics = Metrics()
    metrics.student_batch("c", "not an array", -1)  # type: ignore[arg-type]
    metrics.teacher_call("c", 1, 0.1, "no such kind label")  # fine: any label string
    metrics.set_threshold("c", "high")  # type: ignore[arg-type]  # not a number: logged
    assert "recording metrics failed" in caplog.text
