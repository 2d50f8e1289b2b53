"""The Redis control store with a real redis-server: a change made through one process reaches
another through pub/sub, values stay cached when Redis is down, and changes made after it comes
back propagate."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from cascade_server.errors import ServiceUnavailable
from cascade_server.gateway.control import ThresholdStore
from cascade_server.gateway.stores import ControlStore, RedisBackend

from ..redis_server import RedisServer
from ..unit.test_bundle import make_calibration
from ..unit.test_control import Sync


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


def stores(url, health=None, **knobs):
    cal = make_calibration()
    backend = RedisBackend(url, on_health=health, **knobs)
    thresholds = ThresholdStore(
        ControlStore(backend, timeout_s=2.0),
        "toy",
        default_threshold=cal.threshold,
        calibration=cal,
        student_version="v1",
    )
    return backend, Sync(thresholds)


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


def _increment(raw):
    count = int(raw or b"0") + 1
    return str(count).encode(), {"count": count}


def test_updates_are_compare_and_set_so_racing_writers_lose_nothing(redis_server):
    """Two replicas each apply 40 read-modify-write updates at once: with WATCH/MULTI every
    one lands (a read-then-write would lose some)."""
    backends = [RedisBackend(redis_server.url) for _ in range(2)]
    try:
        wait_for(lambda: all(b.healthy() for b in backends), 3)

        def writer(backend):
            for _ in range(40):
                backend.update("counter", _increment)

        threads = [threading.Thread(target=writer, args=(b,)) for b in backends]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert backends[0]._client.get("cascade:counter") == b"80"
        audit = backends[0]._client.lrange("cascade:counter:audit", 0, -1)
        assert sorted(json.loads(x)["count"] for x in audit) == list(range(1, 81))
    finally:
        for b in backends:
            b.close()


def test_audit_lists_are_trimmed(redis_server):
    backend = RedisBackend(redis_server.url, audit_max_entries=10)
    try:
        wait_for(backend.healthy, 3)
        for _ in range(25):
            backend.update("counter", _increment)
        audit = backend._client.lrange("cascade:counter:audit", 0, -1)
        assert [json.loads(x)["count"] for x in audit] == list(range(16, 26))  # the newest 10
    finally:
        backend.close()


def test_a_silent_partition_is_noticed_and_healed(redis_server):
    """A Redis that stops answering without closing anything (SIGSTOP: what a network partition
    looks like from here) must not leave the store reporting up while the replica is deaf."""
    health: list[bool] = []
    a_backend, a = stores(redis_server.url)
    b_backend, b = stores(redis_server.url, health.append, health_interval_s=0.2)
    try:
        wait_for(lambda: a_backend.healthy() and b_backend.healthy(), 3)
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            took = wait_for(lambda: not b_backend.healthy(), 5)
            assert took < 2.0  # three PING intervals and a socket timeout, not forever
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        wait_for(b_backend.healthy, 5)
        a.set(threshold=0.61, actor="alice")
        wait_for(lambda: b.current().threshold == 0.61)
        assert health[:2] == [True, False] and health[-1] is True
    finally:
        a_backend.close()
        b_backend.close()


def test_a_missed_announcement_heals_on_the_periodic_resync(redis_server):
    backend, thresholds = stores(redis_server.url, resync_s=0.3)
    try:
        wait_for(backend.healthy, 3)
        assert thresholds.current().source == "bundle"
        # A write that announces nothing (another tool, a lost message).
        state = {"threshold": 0.27, "source": "admin", "student_version": "v1"}
        backend._client.set("cascade:toy.threshold", json.dumps(state))
        wait_for(lambda: thresholds.current().threshold == 0.27, 3)
    finally:
        backend.close()


def test_a_store_never_read_is_unsynced_until_redis_answers(tmp_path):
    """A replica started while Redis is down must not claim to know the operator's values."""
    server = RedisServer(tmp_path / "late")
    backend, thresholds = stores(server.url)  # nothing listens on that port yet
    try:
        assert thresholds.current().source == "bundle"
        assert not backend.synced() and not backend.healthy()
        server.start()
        wait_for(backend.synced, 10)
        assert backend.healthy()
    finally:
        backend.close()
        server.kill()


def test_the_password_never_leaves_the_process(tmp_path, caplog):
    """What the chart puts in CASCADE_REDIS_URL must not reach a log line or an answer."""
    secret = "pw-that-must-not-leak"
    server = RedisServer(tmp_path / "redis-auth", password=secret).start()
    backend, thresholds = stores(server.url)
    try:
        wait_for(backend.healthy, 3)
        server.kill()
        wait_for(lambda: not backend.healthy(), 5)
        with pytest.raises(ServiceUnavailable) as refused:
            thresholds.set(threshold=0.5, actor="ops")
        assert secret not in refused.value.message and "***@127.0.0.1" in refused.value.message
        assert secret not in caplog.text and "127.0.0.1" in caplog.text
        assert secret not in backend.url
    finally:
        backend.close()


def test_a_key_first_read_on_the_loop_is_fetched_by_the_follower(redis_server):
    """`read` runs on the event loop: a key nobody primed answers at once (as unknown) and the
    follower thread fetches it, never the caller."""
    backend = RedisBackend(redis_server.url)
    try:
        wait_for(backend.healthy, 3)
        backend._client.set("cascade:late.key", b"written elsewhere")
        calls = []
        real_get = backend._client.get
        caller = threading.get_ident()

        def get(name):
            calls.append(threading.get_ident())
            return real_get(name)

        backend._client.get = get
        assert backend.read("late.key") == (0, None)  # unknown yet, and no wait
        wait_for(lambda: backend.read("late.key")[1] == b"written elsewhere", 3)
        assert calls and caller not in calls  # fetched on the follower's thread only
    finally:
        backend.close()


def test_primed_keys_hold_synced_until_each_is_read(tmp_path):
    server = RedisServer(tmp_path / "late")
    backend = RedisBackend(server.url)  # Redis not up yet
    try:
        backend.prime(["a.threshold", "a.controller"])
        assert not backend.synced()
        server.start()
        wait_for(backend.synced, 10)
        backend.read("b.other")  # a key first used later does not make the replica unsynced
        assert backend.synced()
    finally:
        backend.close()
        server.kill()


def test_live_windows_expire_and_gone_workers_are_removed(redis_server):
    backend = RedisBackend(redis_server.url)
    try:
        wait_for(backend.healthy, 3)
        backend.publish("toy.window", "w1", b"one", ttl_s=0.2)
        backend.publish("toy.window", "w2", b"two", ttl_s=0.2)
        assert sorted(backend.collect("toy.window", ttl_s=0.2)) == [b"one", b"two"]
        time.sleep(0.3)
        backend.publish("toy.window", "w2", b"two again", ttl_s=0.2)
        assert backend.collect("toy.window", ttl_s=0.2) == [b"two again"]  # w1 is stale
        assert backend._client.hexists("cascade:live:toy.window", "w1")  # kept a while
        # w2 goes on publishing (the hash itself never expires meanwhile) until w1 is past
        # 10 x ttl: then collect removes w1's field, not the hash's expiry.
        for _ in range(11):
            time.sleep(0.2)
            backend.publish("toy.window", "w2", b"two", ttl_s=0.2)
        assert backend._client.hexists("cascade:live:toy.window", "w1")  # not collected yet
        assert backend.collect("toy.window", ttl_s=0.2) == [b"two"]
        assert not backend._client.hexists("cascade:live:toy.window", "w1")
        assert backend._client.hexists("cascade:live:toy.window", "w2")
        assert 0 < backend._client.pttl("cascade:live:toy.window") <= 2000  # the hash expires
    finally:
        backend.close()
