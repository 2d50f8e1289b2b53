"""The ASGI app in process, with a fake teacher standing in for Triton."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cascade_server.errors import TeacherUnavailable
from cascade_server.gateway.app import create_app
from cascade_server.settings import Settings

TOKEN = "test-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


class FakeTeacher:
    """Answers every item with `answer` (a class id), or fails as told."""

    def __init__(self, answer: int = 3, n_classes: int = 10) -> None:
        self.answer = answer
        self.n_classes = n_classes
        self.fail: str | None = None  # a TeacherUnavailable kind, or "crash"
        self.is_ready = True
        self.calls: list[int] = []
        self.name, self.version = "fake", "1"

    async def setup(self) -> None: ...
    async def close(self) -> None: ...

    async def ready(self) -> bool:
        return self.is_ready

    async def infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        batch = next(iter(feeds.values()))
        self.calls.append(len(batch))
        if self.fail == "crash":
            raise RuntimeError("secret internal detail")
        if self.fail:
            raise TeacherUnavailable(self.fail, "told to fail")
        logits = np.zeros((len(batch), self.n_classes), np.float32)
        logits[:, self.answer] = 8.0
        return logits


@pytest.fixture
def gateway(demo, tmp_path):
    """A factory: `with gateway(**settings) as (client, teacher): ...`"""

    @contextmanager
    def make(**overrides):
        teacher = FakeTeacher()
        fields = dict(bundles=[demo.bundle], state_dir=tmp_path / "state", admin_token=TOKEN)
        settings = Settings(**{**fields, **overrides})
        app = create_app(settings, teacher_factory=lambda s, b: teacher)
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, teacher

    return make
