"""The Redis control store with a real redis-server: a change made through one process reaches
another through pub/sub, values stay cached when Redis is down, and changes made after it comes
back propagate."""

from __future__ import annotations

import time

import pytest

from cascade_server.errors import ServiceUnavailable
from cascade_server.gateway.control import ThresholdStore
from cascade_server.gateway.stores import RedisBackend

from ..redis_server import RedisServer
from ..unit.test_bundle import make_calibration


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()


def wait_for(predicate, timeout_s: float = 1.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.01)
    raise TimeoutError("not within the time")


def stores(url, health=None):
    cal = make_calibration()
    backend = RedisBackend(url, on_health=health)
    return backend, ThresholdStore(
        backend, "toy", default_threshold=cal.threshold, calibration=cal, student_version="v1"
    )


def test_a_change_reaches_the_other_replica_within_a_second(redis_server):
    a_backend, a = stores(redis_server.url)
    b_backend, b = stores(redis_server.url)
    try:
        wait_for(lambda: a_backend.healthy() and b_backend.healthy(), 3)
        assert b.current().source == "bundle"
        a.set(threshold=0.42, actor="alice")
        took = wait_for(lambda: b.current().threshold == 0.42)
        assert took < 1.0
        assert b.current().updated_by == "alice"
        a.reset(actor="bob")
        wait_for(lambda: b.current().source == "bundle")
    finally:
        a_backend.close()
        b_backend.close()


def test_redis_down_keeps_the_last_value_and_changes_after_restart_propagate(redis_server):
    health: list[bool] = []
    a_backend, a = stores(redis_server.url)
    b_backend, b = stores(redis_server.url, health.append)
    try:
        wait_for(lambda: a_backend.healthy() and b_backend.healthy(), 3)
        a.set(threshold=0.33, actor="alice")
        wait_for(lambda: b.current().threshold == 0.33)
        redis_server.kill()
        wait_for(lambda: not b_backend.healthy(), 5)
        assert b.current().threshold == 0.33  # the last known value, no network needed
        with pytest.raises(ServiceUnavailable, match="nothing was changed"):
            a.set(threshold=0.5, actor="alice")  # an admin change fails loudly: 503
        redis_server.start()  # same port, same data directory
        wait_for(lambda: a_backend.healthy() and b_backend.healthy(), 10)
        a.set(threshold=0.55, actor="carol")
        wait_for(lambda: b.current().threshold == 0.55)
        assert health[:2] == [True, False] and health[-1] is True
    finally:
        a_backend.close()
        b_backend.close()


def test_a_password_protected_redis_by_url(tmp_path):
    """What the Helm chart deploys: Redis with requirepass, the password in the URL."""
    server = RedisServer(tmp_path / "redis-auth", password="pw-from-a-secret").start()
    good_backend, good = stores(server.url)
    bad_backend, _ = stores(server.url.replace("pw-from-a-secret", "wrong"))
    try:
        wait_for(good_backend.healthy, 3)
        good.set(threshold=0.37, actor="ops")
        assert good.current().threshold == 0.37
        time.sleep(0.5)
        assert not bad_backend.healthy()
    finally:
        good_backend.close()
        bad_backend.close()
        server.kill()
