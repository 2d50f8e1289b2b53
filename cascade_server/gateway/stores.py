"""Where runtime control state lives (the threshold and the student version of each cascade),
behind one small interface, so that every worker and every replica sees an admin change:

- `file`: one JSON file per key in CASCADE_STATE_DIR, replaced atomically under a lock, with an
  audit log beside it (rotated past `audit_max_entries`). One host (or a ReadWriteMany volume);
  zero dependencies. Readers check the file's identity with one stat per use.
- `redis`: keys in Redis, audit lists in Redis (trimmed to `audit_max_entries`), and a pub/sub
  channel that announces each change; every process keeps the values in memory (no network
  call on the request path) and a background thread follows the channel, PINGs it (a silent
  partition, where nothing errors but nothing arrives, is noticed within three intervals) and
  re-reads every key now and then (a missed announcement heals). Updates are compare-and-set
  (WATCH/MULTI), so two admins racing cannot lose one's change. Redis down: the last known
  values stay in force, the store reports itself down (readiness details,
  `cascade_control_store_up`), and it reconnects and re-reads every key. A process that has
  never read its keys reports itself unsynced: readiness stays 503 rather than serving bundle
  defaults that an operator may have changed.

`read` is cheap and never waits on the network once a key is known; `update` (admin calls only)
does the I/O, bounded by `timeout_s` in all, and runs off the event loop through `ControlStore`.
Credentials in a store's URL are never shown: `redact` is used wherever a URL is logged or
returned.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..config.control import ControlConfig
from ..errors import ServiceUnavailable

log = logging.getLogger(__name__)
_RACY_NS = 100_000_000
CHANNEL = "cascade:control"
_SECRET_PARAMS = {"password", "pass", "pwd", "token", "secret"}
_STAMP = struct.Struct(">d")  # a live value's publication time, ahead of its bytes
# change(current value) -> (new value or None to delete, audit entry or None for no audit)
Update = Callable[[bytes | None], tuple[bytes | None, dict[str, Any] | None]]
T = TypeVar("T")


def redact(url: str) -> str:
    """`url` with any password (and user) replaced, in the authority and in the query string
    (redis-py reads `?password=`): safe to log and to answer with."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparseable url>"
    if parts.password is not None or parts.username is not None:
        host = parts.hostname or ""
        if ":" in host:  # IPv6: the brackets the authority needs
            host = f"[{host}]"
        if port is not None:
            host = f"{host}:{port}"
        parts = parts._replace(netloc=f"***@{host}")
    if parts.query:
        query = [
            (k, "***" if k.lower() in _SECRET_PARAMS else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


@contextmanager
def locked(path: Path, timeout_s: float) -> Iterator[None]:
    """An exclusive lock between worker processes (and hosts sharing the directory), waited for
    at most `timeout_s`: a process stuck holding it must not hang every admin call."""
    with open(path, "a") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ServiceUnavailable(
                        f"the control store's lock {path.name} is held by another process; "
                        f"nothing was changed (waited {timeout_s}s)"
                    ) from None
                time.sleep(0.005)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def replace_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class StateBackend(Protocol):
    name: str

    def read(self, key: str) -> tuple[object, bytes | None]:
        """(a stamp that changes when the value does, the value or None). Never blocks on
        the network: a key not read yet answers None until the background has read it."""
        ...

    def prime(self, keys: list[str]) -> None:
        """Reads `keys` now (start-up, off the event loop): until each has been read once the
        store is not `synced`. Blocking."""
        ...

    def update(self, key: str, change: Update) -> bytes | None:
        """Applies `change(current) -> (new value or None to delete, audit entry or None)`
        atomically (compare-and-set), records the audit entry, tells the other processes;
        returns the new value. Blocking: call it through `ControlStore`."""
        ...

    def publish(self, group: str, member: str, value: bytes, ttl_s: float) -> None:
        """A short-lived value of this process (a worker's window) in `group`, replaced on
        every call and ignored after `ttl_s` unless refreshed. Blocking."""
        ...

    def collect(self, group: str, ttl_s: float) -> list[bytes]:
        """Every live value of `group` (one per member published within `ttl_s`). Blocking."""
        ...

    def healthy(self) -> bool: ...
    def synced(self) -> bool: ...
    def close(self) -> None: ...


class FileBackend:
    name = "file"

    def __init__(
        self, state_dir: Path, *, timeout_s: float = 2.0, audit_max_entries: int = 10_000
    ) -> None:
        self.state_dir = state_dir
        self.timeout_s = timeout_s
        # An audit file past this size is rotated to `<name>.1` (one older generation kept).
        self.audit_max_bytes = audit_max_entries * 512
        state_dir.mkdir(parents=True, exist_ok=True)
        self._seen: dict[str, tuple[tuple[int, int, int], bytes]] = {}

    def _path(self, key: str, suffix: str = ".json") -> Path:
        return self.state_dir / f"{key}{suffix}"

    def read(self, key: str) -> tuple[object, bytes | None]:
        """One stat per call; the file is read only when its identity changed. The value is
        its own stamp: a few hundred bytes compared, and equal contents are not re-parsed."""
        path = self._path(key)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None, None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        seen = self._seen.get(key)
        # File timestamps tick coarsely (jiffies), so two quick writes can leave the same stamp:
        # a file modified in the last moment is re-read regardless (git's "racy" rule).
        if seen is None or seen[0] != stamp or time.time_ns() - st.st_mtime_ns < _RACY_NS:
            try:
                seen = self._seen[key] = (stamp, path.read_bytes())
            except FileNotFoundError:
                return None, None
        return seen[1], seen[1]

    def update(self, key: str, change: Update) -> bytes | None:
        path = self._path(key)
        try:
            with locked(self._path(key, ".lock"), self.timeout_s):
                try:
                    current: bytes | None = path.read_bytes()
                except FileNotFoundError:
                    current = None
                new, audit = change(current)
                if new is None:
                    path.unlink(missing_ok=True)
                else:
                    replace_atomically(path, new.decode())
                if audit is not None:
                    try:
                        self._append_audit(self._path(key, ".audit.jsonl"), audit)
                    except OSError as exc:  # the change is made: say so, loudly
                        log.error(
                            "control store: %s changed, but its audit entry was "
                            "not written: %s (%s)",
                            key,
                            exc,
                            audit,
                        )
        except OSError as exc:  # a full disk, a read-only volume: the change did not happen
            raise ServiceUnavailable(
                f"the control store ({self.state_dir}) cannot be written; nothing was "
                f"changed: {exc.strerror or exc}"
            ) from None
        return new

    def prime(self, keys: list[str]) -> None:
        for key in keys:
            self.read(key)

    def publish(self, group: str, member: str, value: bytes, ttl_s: float) -> None:
        path = self.state_dir / "live" / group / f"{member}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(value)
        os.replace(tmp, path)

    def collect(self, group: str, ttl_s: float) -> list[bytes]:
        live = self.state_dir / "live" / group
        out = []
        horizon = time.time() - ttl_s
        for path in live.glob("*.bin") if live.is_dir() else ():
            try:
                if path.stat().st_mtime < horizon:
                    if path.stat().st_mtime < horizon - 10 * ttl_s:
                        path.unlink(missing_ok=True)  # a worker long gone
                    continue
                out.append(path.read_bytes())
            except FileNotFoundError:  # replaced or removed meanwhile
                continue
        return out

    def _append_audit(self, path: Path, entry: dict[str, Any]) -> None:
        with open(path, "a") as audit:
            audit.write(json.dumps(entry) + "\n")
            size = audit.tell()
        if size > self.audit_max_bytes:
            os.replace(path, path.with_name(path.name + ".1"))

    def healthy(self) -> bool:
        return True

    def synced(self) -> bool:
        return True

    def close(self) -> None:
        return None


class RedisBackend:
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "cascade:",
        on_health: Callable[[bool], None] | None = None,
        timeout_s: float = 2.0,
        audit_max_entries: int = 10_000,
        health_interval_s: float = 1.0,
        resync_s: float = 30.0,
    ) -> None:
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        self._redis = redis
        self.url = redact(url)  # the only form of the URL this object keeps for showing
        self.prefix = prefix
        self.audit_max_entries = audit_max_entries
        self.health_interval_s = health_interval_s
        self.resync_s = resync_s
        # One attempt and one retry, each bounded by a quarter of the budget: an operation
        # (connect + command, twice) ends within timeout_s.
        socket_s = timeout_s / 4
        self._client: Any = redis.Redis.from_url(
            url,
            socket_timeout=socket_s,
            socket_connect_timeout=socket_s,
            retry=Retry(ExponentialBackoff(cap=socket_s / 4, base=0.01), 1),
        )
        self._cache: dict[str, tuple[int, bytes | None]] = {}
        self._unread: set[str] = set()  # primed keys never read from Redis yet
        self._wanted: set[str] = set()  # keys first used on the loop: the follower reads them
        self._generation = 0
        self._lock = threading.Lock()
        self._on_health = on_health
        self.up = False
        self._tried = threading.Event()  # the follower finished its first attempt
        self._synced_once = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="control-store", daemon=True)
        self._thread.start()
        # Start-up reads the keys with Redis's answer when it answers soon, not the defaults.
        self._tried.wait(timeout_s)

    def read(self, key: str) -> tuple[object, bytes | None]:
        entry = self._cache.get(key)
        if entry is None:  # first use: never a network call here (this is the event loop)
            with self._lock:
                entry = self._cache.setdefault(key, (0, None))
                self._wanted.add(key)
        return entry

    def prime(self, keys: list[str]) -> None:
        for key in keys:
            with self._lock:
                self._cache.setdefault(key, (0, None))
                self._unread.add(key)
            if self.up:
                self._fetch(key)

    def _fetch(self, key: str) -> None:
        try:
            value = self._get(key)
        except (self._redis.RedisError, OSError) as exc:
            log.warning("control store %s: cannot read %s: %s", self.url, key, exc)
            with self._lock:
                self._wanted.add(key)  # the follower tries again within a poll
            return
        self._store(key, value)

    def _fetch_wanted(self) -> None:
        with self._lock:
            wanted, self._wanted = self._wanted, set()
        pending = list(wanted)
        try:
            while pending:
                self._store(pending[0], self._get(pending[0]))
                pending.pop(0)
        finally:
            if pending:  # the connection failed part way: the rest wait for the next try
                with self._lock:
                    self._wanted.update(pending)

    def _get(self, key: str) -> bytes | None:
        value = self._client.get(self.prefix + key)
        return value if value is None or isinstance(value, bytes) else str(value).encode()

    def _store(self, key: str, value: bytes | None) -> None:
        with self._lock:
            self._unread.discard(key)
            self._wanted.discard(key)
            old = self._cache.get(key)
            if old is None or old[1] != value:
                self._generation += 1
                self._cache[key] = (self._generation, value)

    def update(self, key: str, change: Update) -> bytes | None:
        name = self.prefix + key
        try:
            with self._client.pipeline() as pipe:
                for _ in range(16):  # compare-and-set: retried while others change the key
                    try:
                        pipe.watch(name)
                        current = pipe.get(name)
                        new, audit = change(current)
                        pipe.multi()
                        if new is None:
                            pipe.delete(name)
                        else:
                            pipe.set(name, new)
                        if audit is not None:
                            pipe.rpush(f"{name}:audit", json.dumps(audit))
                            pipe.ltrim(f"{name}:audit", -self.audit_max_entries, -1)
                        pipe.publish(CHANNEL, key)
                        pipe.execute()
                        break
                    except self._redis.WatchError:
                        continue
                else:
                    raise ServiceUnavailable(
                        f"{key} kept changing under this update; nothing was changed, retry"
                    )
        except (self._redis.RedisError, OSError) as exc:
            raise ServiceUnavailable(
                f"the control store ({self.url}) is unreachable; nothing was changed: "
                f"{type(exc).__name__}"
            ) from None
        self._store(key, new)
        return new

    def publish(self, group: str, member: str, value: bytes, ttl_s: float) -> None:
        """One hash per group (a field per worker, stamped with its time): collecting is one
        HGETALL of the group's workers, never a scan of a shared keyspace. Fields of workers
        gone are removed by `collect`; the hash itself expires when nobody publishes."""
        name = f"{self.prefix}live:{group}"
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.hset(name, member, _STAMP.pack(time.time()) + value)
            pipe.pexpire(name, max(int(ttl_s * 10_000), 1))
            pipe.execute()
        except (self._redis.RedisError, OSError) as exc:
            raise ServiceUnavailable(f"control store ({self.url}): {type(exc).__name__}") from None

    def collect(self, group: str, ttl_s: float) -> list[bytes]:
        name = f"{self.prefix}live:{group}"
        try:
            fields = self._client.hgetall(name)
            horizon = time.time() - ttl_s
            out, gone = [], []
            for member, raw in fields.items():
                if len(raw) < _STAMP.size:
                    gone.append(member)
                    continue
                (at,) = _STAMP.unpack_from(raw)
                if at >= horizon:
                    out.append(raw[_STAMP.size :])
                elif at < horizon - 10 * ttl_s:
                    gone.append(member)  # a worker long gone
            if gone:
                self._client.hdel(name, *gone)
        except (self._redis.RedisError, OSError) as exc:
            raise ServiceUnavailable(f"control store ({self.url}): {type(exc).__name__}") from None
        return out

    def healthy(self) -> bool:
        return self.up

    def synced(self) -> bool:
        """Every primed key (the state a replica serves from) has been read from Redis."""
        return self._synced_once and not self._unread

    def _set_up(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            (log.info if up else log.warning)(
                "control store %s is %s", self.url, "up" if up else "down (last values kept)"
            )
            if self._on_health is not None:
                self._on_health(up)

    def _resync(self) -> None:
        for key in list(self._cache):
            self._store(key, self._get(key))

    def _follow(self) -> None:
        """Subscribes to change announcements; after every (re)connection, and every
        `resync_s`, re-reads every key in use, so changes made while the connection was down
        (or an announcement lost) arrive too. A PING every `health_interval_s` that goes
        unanswered for three intervals counts as the store being down."""
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CHANNEL)
                self._resync()
                self._synced_once = True
                self._set_up(True)
                self._tried.set()
                backoff = 0.1
                self._listen(pubsub)
            except (self._redis.RedisError, OSError, TimeoutError) as exc:
                self._set_up(False)
                self._tried.set()
                log.debug("control store %s: %s", self.url, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception:  # a bug here must not leave the store "up" and followed by no one
                log.exception("control store %s: the follower failed; reconnecting", self.url)
                self._set_up(False)
                self._tried.set()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                try:
                    pubsub.close()
                except Exception:  # closing a broken connection
                    pass

    def _listen(self, pubsub: Any) -> None:
        interval = self.health_interval_s
        last_pong = next_ping = time.monotonic()
        next_resync = last_pong + self.resync_s
        while not self._stop.is_set():
            message = pubsub.get_message(timeout=min(0.25, interval))
            clock = time.monotonic()
            if message is not None:
                last_pong = clock  # anything from the server proves the link
                if message["type"] == "message":
                    self._store(message["data"].decode(), self._get(message["data"].decode()))
            if clock >= next_ping:
                pubsub.ping()
                next_ping = clock + interval
            if clock - last_pong > 3 * interval:
                raise TimeoutError(f"no answer to PING for {clock - last_pong:.1f}s")
            if clock >= next_resync:
                self._resync()
                next_resync = clock + self.resync_s
            if self._wanted:
                self._fetch_wanted()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._client.close()


def make_backend(
    config: ControlConfig, on_health: Callable[[bool], None] | None = None
) -> StateBackend:
    if config.kind == "redis":
        return RedisBackend(
            config.redis_url.get_secret_value(),
            on_health=on_health,
            timeout_s=config.timeout_s,
            audit_max_entries=config.audit_max_entries,
            health_interval_s=config.health_interval_s,
            resync_s=config.resync_s,
        )
    return FileBackend(
        config.state_dir, timeout_s=config.timeout_s, audit_max_entries=config.audit_max_entries
    )


class ControlStore:
    """The backend as the event loop uses it: reads inline (in-process views), updates on a
    thread within `timeout_s` so that an admin call during a store outage never stalls the
    predictions sharing its worker."""

    def __init__(self, backend: StateBackend, timeout_s: float) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        self.name = backend.name

    def read(self, key: str) -> tuple[object, bytes | None]:
        return self.backend.read(key)

    async def prime(self, keys: list[str]) -> None:
        """Start-up: the state this replica serves from, read once (bounded, off the loop). A
        store that does not answer leaves it unsynced (readiness 503), not the loop stalled."""
        try:
            await self.call(self.backend.prime, keys)
        except ServiceUnavailable as exc:
            log.warning("control store: start-up read did not finish: %s", exc.message)

    async def update(self, key: str, change: Update) -> bytes | None:
        return await self.call(self.backend.update, key, change)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a thread; 503 if it has not answered within the bound (the backend's
        own timeouts end it soon after; the caller is told the outcome is unknown)."""
        try:
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for swallows a cancellation
            # that arrives as the thread's result does, and a controller step cancelled at
            # shutdown then ran on (its loop never ended: the shutdown hung).
            async with asyncio.timeout(self.timeout_s * 1.5):
                return await asyncio.to_thread(fn, *args)
        except TimeoutError:
            raise ServiceUnavailable(
                f"the control store ({self.backend.name}) did not answer within "
                f"{self.timeout_s * 1.5:.1f}s; the change may not have been applied: read it back"
            ) from None

    def healthy(self) -> bool:
        return self.backend.healthy()

    def synced(self) -> bool:
        return self.backend.synced()

    async def close(self) -> None:
        """The follower stopped and joined off the loop (it may sit in a socket read)."""
        await asyncio.to_thread(self.backend.close)
