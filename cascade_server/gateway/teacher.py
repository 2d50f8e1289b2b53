"""The teacher: a model on Triton, called over gRPC with a deadline."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import numpy as np

from ..bundle import TeacherRef
from ..errors import TeacherUnavailable

log = logging.getLogger(__name__)


class Teacher(Protocol):
    name: str
    version: str

    async def setup(self) -> None: ...
    async def close(self) -> None: ...
    async def ready(self) -> bool: ...
    async def infer(
        self,
        feeds: dict[str, np.ndarray],
        headers: dict[str, str] | None = None,
        priority: int | None = None,
    ) -> np.ndarray: ...


class TritonTeacher:
    """One long-lived `tritonclient.grpc.aio` client per worker: the fastest hop measured."""

    def __init__(
        self,
        url: str,
        ref: TeacherRef,
        *,
        timeout_s: float,
        readiness_timeout_s: float,
        reconnect_backoff_ms: int,
    ) -> None:
        self.url = url
        self.ref = ref
        self.name = ref.model_name
        self.version = ref.model_version
        self.timeout_s = timeout_s
        self.readiness_timeout_s = readiness_timeout_s
        self.reconnect_backoff_ms = reconnect_backoff_ms
        self._client: Any = None

    async def setup(self) -> None:
        import tritonclient.grpc.aio as grpcclient

        # Created inside the running loop (grpc.aio binds to it); never at import.
        self._client = grpcclient.InferenceServerClient(
            self.url,
            channel_args=[
                ("grpc.initial_reconnect_backoff_ms", self.reconnect_backoff_ms // 2),
                ("grpc.min_reconnect_backoff_ms", self.reconnect_backoff_ms // 2),
                ("grpc.max_reconnect_backoff_ms", self.reconnect_backoff_ms),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def ready(self) -> bool:
        if self._client is None:
            return False
        try:
            async with asyncio.timeout(self.readiness_timeout_s):  # not wait_for (stores.py)
                return bool(await self._client.is_model_ready(self.name, self.version))
        except Exception as exc:  # any failure to answer means "not ready"
            log.debug("teacher readiness check failed: %s", exc)
            return False

    async def infer(
        self,
        feeds: dict[str, np.ndarray],
        headers: dict[str, str] | None = None,
        priority: int | None = None,
    ) -> np.ndarray:
        """Input tensors by Triton name -> teacher logits. Splits at the model's max batch
        size; Triton's dynamic batcher does the batching across requests. `headers` travel as
        gRPC metadata (the W3C trace context: Triton continues the trace when its
        OpenTelemetry tracing is on); `priority`: Triton's request priority (shadow calls; the
        model config needs priority_levels)."""
        import tritonclient.grpc.aio as grpcclient
        from tritonclient.utils import InferenceServerException

        if self._client is None:
            raise TeacherUnavailable("unavailable", "teacher client not set up")
        step = self.ref.max_batch_size
        n = len(next(iter(feeds.values())))
        chunks = [{k: v[i : i + step] for k, v in feeds.items()} for i in range(0, n, step)]
        try:
            # One chunk (the common case) is awaited directly: no task, no extra loop turn.
            if len(chunks) == 1:
                results = [await self._infer_one(grpcclient, chunks[0], headers, priority)]
            else:
                async with asyncio.timeout(self.timeout_s):
                    results = await asyncio.gather(
                        *(self._infer_one(grpcclient, c, headers, priority) for c in chunks)
                    )
        except TimeoutError:
            raise TeacherUnavailable("timeout", f"no answer within {self.timeout_s}s") from None
        except InferenceServerException as exc:
            raise _classify(exc) from None
        except TeacherUnavailable:
            raise
        except Exception as exc:  # a broken teacher must degrade, not fail the request
            raise TeacherUnavailable("error", repr(exc)) from None
        return np.concatenate(results) if len(results) > 1 else results[0]

    async def _infer_one(
        self,
        grpcclient: Any,
        chunk: dict[str, np.ndarray],
        headers: dict[str, str] | None,
        priority: int | None,
    ) -> np.ndarray:
        from tritonclient.utils import np_to_triton_dtype

        inputs = []
        for name, array in chunk.items():
            array = np.ascontiguousarray(array)
            inp = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            inp.set_data_from_numpy(array)
            inputs.append(inp)
        out = grpcclient.InferRequestedOutput(self.ref.output_name)
        assert self._client is not None
        # client_timeout is gRPC's deadline: Triton sees it too and drops work nobody awaits.
        result = await self._client.infer(
            self.name,
            inputs,
            model_version=self.version,
            outputs=[out],
            headers=headers,
            priority=priority or 0,
            client_timeout=self.timeout_s,
            # Triton's own request timeout (us): with the teacher config's queue policy, a
            # request still queued when the gateway has given up is dropped, not computed.
            timeout=int(self.timeout_s * 1e6),
        )
        logits = result.as_numpy(self.ref.output_name)
        if logits is None or logits.shape[0] != len(next(iter(chunk.values()))):
            raise TeacherUnavailable("error", "teacher returned no or misshapen logits")
        return np.asarray(logits)


def _classify(exc: Any) -> TeacherUnavailable:
    status = (exc.status() or "").upper()
    if "DEADLINE" in status:
        return TeacherUnavailable("timeout", exc.message())
    if "UNAVAILABLE" in status:
        return TeacherUnavailable("unavailable", exc.message())
    return TeacherUnavailable("error", f"{status}: {exc.message()}")
