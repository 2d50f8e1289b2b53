"""Where runtime control state lives (the threshold and the student version of each cascade),
behind one small interface, so that every worker and every replica sees an admin change:

- `file`: one JSON file per key in CASCADE_STATE_DIR, replaced atomically under a lock, with an
  audit log beside it. One host (or a ReadWriteMany volume); zero dependencies. Readers check the
  file's identity with one stat per use.
- `redis`: keys in Redis, audit lists in Redis, and a pub/sub channel that announces each change;
  every process keeps the values in memory (no network call on the request path) and a
  background thread follows the channel. Redis down: the last known values stay in force, the
  store reports itself down (readiness details, `cascade_control_store_up`), and it reconnects
  and re-reads every key, so changes made meanwhile arrive.

`read` is cheap and never waits on the network once a key is known; `update` (admin calls only)
does the I/O.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from ..errors import ServiceUnavailable

log = logging.getLogger(__name__)
_RACY_NS = 100_000_000
CHANNEL = "cascade:control"
Update = Callable[[bytes | None], tuple[bytes | None, dict[str, Any]]]


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock between worker processes (and hosts sharing the directory)."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def replace_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def append_audit(path: Path, entry: dict[str, Any]) -> None:
    with open(path, "a") as audit:
        audit.write(json.dumps(entry) + "\n")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class StateBackend(Protocol):
    name: str

    def read(self, key: str) -> tuple[object, bytes | None]:
        """(a stamp that changes when the value does, the value or None)."""
        ...

    def update(self, key: str, change: Update) -> bytes | None:
        """Applies `change(current) -> (new value or None to delete, audit entry)`, records the
        audit entry, tells the other processes; returns the new value."""
        ...

    def healthy(self) -> bool: ...
    def close(self) -> None: ...


class FileBackend:
    name = "file"

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
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
        with locked(self._path(key, ".lock")):
            try:
                current: bytes | None = path.read_bytes()
            except FileNotFoundError:
                current = None
            new, audit = change(current)
            if new is None:
                path.unlink(missing_ok=True)
            else:
                replace_atomically(path, new.decode())
            append_audit(self._path(key, ".audit.jsonl"), audit)
        return new

    def healthy(self) -> bool:
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
        timeout_s: float = 1.0,
    ) -> None:
        import redis

        self._redis = redis
        self.url = url
        self.prefix = prefix
        self._client: Any = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._cache: dict[str, tuple[int, bytes | None]] = {}
        self._generation = 0
        self._lock = threading.Lock()
        self._on_health = on_health
        self.up = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="control-store", daemon=True)
        self._thread.start()

    def read(self, key: str) -> tuple[object, bytes | None]:
        entry = self._cache.get(key)
        if entry is None:  # first use of a key (start-up): one fetch, then the cache
            self._fetch(key)
            entry = self._cache.get(key, (0, None))
        return entry

    def _fetch(self, key: str) -> None:
        try:
            value = self._get(key)
        except self._redis.RedisError as exc:
            log.warning("control store %s: cannot read %s: %s", self.url, key, exc)
            self._cache.setdefault(key, (0, None))
            return
        self._store(key, value)

    def _get(self, key: str) -> bytes | None:
        value = self._client.get(self.prefix + key)
        return value if value is None or isinstance(value, bytes) else str(value).encode()

    def _store(self, key: str, value: bytes | None) -> None:
        with self._lock:
            old = self._cache.get(key)
            if old is None or old[1] != value:
                self._generation += 1
                self._cache[key] = (self._generation, value)

    def update(self, key: str, change: Update) -> bytes | None:
        try:
            current = self._get(key)
            new, audit = change(current)
            pipe = self._client.pipeline()
            if new is None:
                pipe.delete(self.prefix + key)
            else:
                pipe.set(self.prefix + key, new)
            pipe.rpush(f"{self.prefix}{key}:audit", json.dumps(audit))
            pipe.publish(CHANNEL, key)
            pipe.execute()
        except (self._redis.RedisError, OSError) as exc:
            raise ServiceUnavailable(
                f"the control store ({self.url}) is unreachable; nothing was changed: {exc}"
            ) from None
        self._store(key, new)
        return new

    def healthy(self) -> bool:
        return self.up

    def _set_up(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            (log.info if up else log.warning)(
                "control store %s is %s", self.url, "up" if up else "down (last values kept)"
            )
            if self._on_health is not None:
                self._on_health(up)

    def _follow(self) -> None:
        """Subscribes to change announcements; after every (re)connection, re-reads every key
        in use, so changes made while the connection was down arrive too."""
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CHANNEL)
                for key in list(self._cache):
                    self._store(key, self._get(key))
                self._set_up(True)
                backoff = 0.1
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message["type"] == "message":
                        key = message["data"].decode()
                        self._store(key, self._get(key))
            except (self._redis.RedisError, OSError) as exc:
                self._set_up(False)
                log.debug("control store %s: %s", self.url, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                try:
                    pubsub.close()
                except Exception:  # closing a broken connection
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._client.close()


def make_backend(
    kind: str, state_dir: Path, redis_url: str, on_health: Callable[[bool], None] | None = None
) -> StateBackend:
    if kind == "redis":
        return RedisBackend(redis_url, on_health=on_health)
    return FileBackend(state_dir)
