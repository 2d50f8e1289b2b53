"""Image and text users posting labelled payloads to /predict; accuracy is measured under load.

Configured through the environment (loadtests/run.py sets it): LOADTEST_IMAGE_DATA and
LOADTEST_TEXT_DATA (payload sources, see payloads.py; empty: no such users), LOADTEST_IMAGE_CASCADE
and LOADTEST_TEXT_CASCADE (cascade names, optional), LOADTEST_LIMIT (payloads per source),
LOADTEST_SUMMARY (where the per-user-class accuracy and outcome counts are written at the end).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections import Counter
from typing import ClassVar

from locust import HttpUser, constant, events, task

from loadtests.payloads import labelled

LIMIT = int(os.environ.get("LOADTEST_LIMIT", "1000"))
_counts: dict[str, Counter] = {}
_lock = threading.Lock()


def _count(kind: str, **deltas: int) -> None:
    with _lock:
        _counts.setdefault(kind, Counter()).update(deltas)


class _CascadeUser(HttpUser):
    abstract = True
    wait_time = constant(0)
    kind = ""
    data_env = ""
    cascade_env = ""
    _payloads: ClassVar[list] = []
    _cycle = None

    @classmethod
    def _load(cls) -> None:
        if not cls._payloads:
            cls._payloads = labelled(os.environ[cls.data_env], LIMIT)
            cls._cycle = itertools.cycle(range(len(cls._payloads)))

    def on_start(self) -> None:
        self._load()
        self.cascade = os.environ.get(self.cascade_env) or None

    @task
    def predict(self) -> None:
        payload, label = self._payloads[next(self._cycle)]
        body = {**payload, "top_k": 1}
        if self.cascade:
            body["cascade"] = self.cascade
        with self.client.post(
            "/predict", json=body, name=f"/predict [{self.kind}]", catch_response=True
        ) as response:
            if response.status_code != 200:
                _count(self.kind, errors=1)
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            answer = response.json()
            _count(
                self.kind,
                answered=1,
                correct=int(answer["label"] == label),
                delegated=int(answer["delegated"]),
                degraded=int(answer["degraded"]),
                by_teacher=int(answer["answered_by"] == "teacher"),
            )


class ImageUser(_CascadeUser):
    kind, data_env, cascade_env = "image", "LOADTEST_IMAGE_DATA", "LOADTEST_IMAGE_CASCADE"
    weight = int(os.environ.get("LOADTEST_IMAGE_WEIGHT", "1"))


class TextUser(_CascadeUser):
    kind, data_env, cascade_env = "text", "LOADTEST_TEXT_DATA", "LOADTEST_TEXT_CASCADE"
    weight = int(os.environ.get("LOADTEST_TEXT_WEIGHT", "1"))


# A kind with no data source has no users.
for _user in (ImageUser, TextUser):
    if not os.environ.get(_user.data_env):
        _user.abstract = True
del _user  # locust collects every user class bound at module level


@events.quitting.add_listener
def _write_summary(environment, **_kwargs) -> None:
    path = os.environ.get("LOADTEST_SUMMARY")
    if path:
        with _lock, open(path, "w") as fh:
            json.dump({kind: dict(c) for kind, c in _counts.items()}, fh)
