"""The real TritonTeacher against sockets that misbehave: deadline and refusal become
TeacherUnavailable of the right kind, quickly."""

import asyncio
import socket
import time

import numpy as np
import pytest

from cascade_server.bundle import TeacherRef
from cascade_server.errors import TeacherUnavailable
from cascade_server.gateway.teacher import TritonTeacher
from cascade_server.triton import free_port


def teacher(url: str, timeout_s: float = 0.3) -> TritonTeacher:
    return TritonTeacher(
        url,
        TeacherRef(model_name="m"),
        timeout_s=timeout_s,
        readiness_timeout_s=0.3,
        reconnect_backoff_ms=200,
    )


async def call(t: TritonTeacher):
    await t.setup()
    try:
        started = time.monotonic()
        with pytest.raises(TeacherUnavailable) as info:
            await t.infer({"input": np.zeros((2, 1, 8, 8), np.float32)})
        assert not await t.ready()
        return info.value, time.monotonic() - started
    finally:
        await t.close()


def test_a_silent_server_hits_the_deadline():
    with socket.socket() as silent:  # accepts TCP, never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        err, took = asyncio.run(call(teacher(f"127.0.0.1:{silent.getsockname()[1]}")))
    assert err.kind in ("timeout", "unavailable")
    assert took < 2.0


def test_nothing_listening_is_unavailable_fast():
    err, took = asyncio.run(call(teacher(f"127.0.0.1:{free_port()}", timeout_s=2.0)))
    assert err.kind == "unavailable"
    assert took < 2.0
