"""The ASGI app in process, with a fake teacher standing in for Triton."""

from __future__ import annotations

from contextlib import asynccontextmanager, contextmanager

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
        self.headers: list[dict[str, str] | None] = []  # gRPC metadata of each call
        self.name, self.version = "fake", "1"

    async def setup(self) -> None: ...
    async def close(self) -> None: ...

    async def ready(self) -> bool:
        return self.is_ready

    async def infer(
        self,
        feeds: dict[str, np.ndarray],
        headers: dict[str, str] | None = None,
        priority: int | None = None,
    ) -> np.ndarray:
        batch = next(iter(feeds.values()))
        self.calls.append(len(batch))
        self.headers.append(headers)
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


@asynccontextmanager
async def serving_in_process(app):
    """Runs the app's lifespan, then yields an async client over ASGI: for tests that need
    truly concurrent requests on one event loop (TestClient sends one at a time)."""
    import asyncio

    import httpx2

    inbox: asyncio.Queue = asyncio.Queue()
    outbox: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    await inbox.put({"type": "lifespan.startup"})
    started = await outbox.get()
    assert started["type"] == "lifespan.startup.complete", started
    try:
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task
