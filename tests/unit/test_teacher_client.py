"""The real TritonTeacher against servers that misbehave: deadline and refusal become
TeacherUnavailable of the right kind, quickly."""

import asyncio
import time

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2_grpc

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
        took = time.monotonic() - started
        assert not await t.ready()
        return info.value, took
    finally:
        await t.close()


class Hanging(service_pb2_grpc.GRPCInferenceServiceServicer):
    """A gRPC server that speaks Triton's protocol and takes every call, and never answers."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def _hang(self, method: str) -> None:
        self.calls.append(method)
        await asyncio.Event().wait()  # until the client's deadline cancels the call

    async def ModelInfer(self, request, context):
        await self._hang("ModelInfer")

    async def ModelReady(self, request, context):
        await self._hang("ModelReady")


async def call_hanging(timeout_s: float) -> tuple[TeacherUnavailable, float, list[str]]:
    server = grpc.aio.server()
    hanging = Hanging()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(hanging, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        err, took = await call(teacher(f"127.0.0.1:{port}", timeout_s=timeout_s))
    finally:
        await server.stop(None)
    return err, took, hanging.calls


def test_a_silent_server_hits_the_deadline():
    # A raw TCP socket is no such server: gRPC gives up on it before any call is sent (no HTTP/2
    # SETTINGS), which is "unavailable", not a deadline.
    err, took, calls = asyncio.run(call_hanging(timeout_s=0.5))
    assert calls[0] == "ModelInfer"  # the call reached the server, which then said nothing
    assert err.kind == "timeout"
    assert 0.5 <= took < 2.0  # waited for the deadline, and not much longer


def test_nothing_listening_is_unavailable_fast():
    err, took = asyncio.run(call(teacher(f"127.0.0.1:{free_port()}", timeout_s=2.0)))
    assert err.kind == "unavailable"
    assert took < 2.0
