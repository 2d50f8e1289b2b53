"""The prediction endpoints as plain ASGI, in front of the FastAPI app.

`POST /predict` and `POST /v2/models/{cascade}[/versions/{v}]/infer` are the hot path: served
here without FastAPI's routing, dependency injection and middleware stack (measured: a bare
FastAPI echo costs about 3x a plain ASGI echo on this kind of machine). Everything else (admin,
probes, metrics, OpenAPI docs, OIP metadata) goes to the FastAPI app, which also documents the
two endpoints (openapi.py). Body limits and the error mapping apply here as everywhere.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import CascadeError, Overloaded, PayloadTooLarge, UnknownCascade
from .http_errors import JSON
from .http_errors import error_body as http_error_body
from .kserve import HEADER_LENGTH, encode_response, error_body, parse_infer, split_body
from .parsing import (
    RequestHead,
    body_limit_message,
    limited_receive,
    parse_request,
    read_request_body,
    refuse_encoded_body,
)

if TYPE_CHECKING:
    from .answers import Predictions
    from .cascade import Cascade
    from .serving import Gateway

log = logging.getLogger(__name__)
_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
_JSON_HEADER = (b"content-type", JSON.encode())
# A handled request: status, body, headers.
Answered = tuple[int, bytes, list[tuple[bytes, bytes]]]
Handler = Callable[["Gateway", "list[Cascade]", float], Awaitable[Answered]]


async def send_body(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class PredictEndpoints:
    """ASGI app: the two prediction endpoints, else `api` (the FastAPI app)."""

    def __init__(
        self,
        api: ASGIApp,
        *,
        max_body_bytes: int,
        expose_worker_id: bool,
        max_in_flight: int,
        retry_after_s: int,
    ) -> None:
        self.api = api
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self._headers = [_JSON_HEADER]
        if expose_worker_id:
            self._headers.append((b"x-cascade-worker", str(os.getpid()).encode()))
        self.gateway: Gateway | None = None  # set by the app's lifespan
        self.state = getattr(api, "state", None)  # the FastAPI app's state, for tests and tools

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        path = scope["path"]
        if path == "/predict":
            if scope["method"] != "POST":
                allow = [(b"allow", b"POST")]
                await self._error(send, 405, "method_not_allowed", "use POST", False, allow)
                return

            async def predict(gateway: Gateway, chosen: list[Cascade], started: float) -> Answered:
                return await self._predict(scope, receive, gateway, chosen, started)

            await self._serve(scope, receive, send, predict, protocol=False)
            return
        match = _INFER.match(path) if path.startswith("/v2/models/") else None
        if match is not None:
            if scope["method"] != "POST":
                allow = [(b"allow", b"POST")]
                await self._error(send, 405, "method_not_allowed", "use POST", True, allow)
                return
            name, version = match.group(1), match.group(2)

            async def infer(gateway: Gateway, chosen: list[Cascade], started: float) -> Answered:
                return await self._infer(scope, receive, gateway, chosen, started, name, version)

            await self._serve(scope, receive, send, infer, protocol=True)
            return
        # Other routes: the declared size is checked up front, the streamed one as it comes;
        # a compressed body is refused as on the prediction routes.
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                message = body_limit_message(self.max_body_bytes)
                await self._error(send, 413, PayloadTooLarge.code, message, False)
                return
            if name == b"content-encoding":
                try:
                    refuse_encoded_body(value)
                except CascadeError as exc:
                    await self._error(send, exc.status, exc.code, exc.message, False)
                    return
        await self.api(scope, limited_receive(receive, self.max_body_bytes), send)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        handle: Handler,
        *,
        protocol: bool,
    ) -> None:
        """What both prediction endpoints share: shedding past max_in_flight (503 with
        Retry-After, an explicit refusal the client can retry, not a queue that grows), the
        in-flight count, and the one mapping of errors to answers and metrics. `protocol`: errors
        in the Open Inference Protocol's shape instead of ours."""
        gateway = self.gateway
        if gateway is None:
            await self._error(send, 503, "not_ready", "the gateway is starting", protocol)
            return
        metrics = gateway.metrics
        if self.in_flight >= self.max_in_flight:
            metrics.shed(gateway.label_for_rejection(None))
            message = (
                f"the gateway is at its limit of {self.max_in_flight} requests in flight; "
                f"retry after {self.retry_after_s}s"
            )
            retry = [(b"retry-after", str(self.retry_after_s).encode())]
            await self._error(send, 503, "overloaded", message, protocol, retry)
            return
        started = time.perf_counter()
        self.in_flight += 1
        metrics.request_started()
        chosen: list[Cascade] = []  # the cascade, once the request names one
        try:
            status, body, headers = await handle(gateway, chosen, started)
            await send_body(send, status, body, headers)
        except Overloaded as exc:
            metrics.shed(gateway.label_for_rejection(chosen[0] if chosen else None))
            retry = [(b"retry-after", str(exc.retry_after_s).encode())]
            await self._error(send, exc.status, exc.code, exc.message, protocol, retry)
        except CascadeError as exc:
            metrics.rejected(gateway.label_for_rejection(chosen[0] if chosen else None))
            auth = [(b"www-authenticate", b"Bearer")] if exc.status == 401 else []
            await self._error(send, exc.status, exc.code, exc.message, protocol, auth)
        except Exception:
            log.exception("unhandled error on POST %s", scope["path"])
            metrics.failed(gateway.label_for_rejection(chosen[0] if chosen else None))
            await self._error(send, 500, "internal_error", "internal error", protocol)
        finally:
            self.in_flight -= 1
            metrics.request_finished()

    async def _error(
        self,
        send: Send,
        status: int,
        code: str,
        message: str,
        protocol: bool,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        body = error_body(message) if protocol else http_error_body(code, message)
        await send_body(send, status, body, [_JSON_HEADER, *(headers or [])])

    async def _predict(
        self,
        scope: Scope,
        receive: Receive,
        gateway: Gateway,
        chosen: list[Cascade],
        started: float,
    ) -> Answered:
        head = RequestHead.from_scope(scope)
        parsed = await parse_request(scope, receive, head, gateway.body_limits)
        cascade = gateway.resolve(parsed.cascade, parsed.modality)
        chosen.append(cascade)
        predictions, total = await _answer(gateway, cascade, parsed.items, started)
        outputs = predictions.outputs(parsed.top_k or gateway.body_limits.default_top_k, total)
        body = orjson.dumps({"outputs": outputs} if parsed.batched else outputs[0])
        return 200, body, self._headers

    async def _infer(
        self,
        scope: Scope,
        receive: Receive,
        gateway: Gateway,
        chosen: list[Cascade],
        started: float,
        name: str,
        version: str | None,
    ) -> Answered:
        cascade = gateway.resolve(name)
        chosen.append(cascade)
        if version is not None and version != cascade.versions["student"]:
            raise UnknownCascade(f"model {name!r} has no version {version!r}")
        limits = gateway.body_limits
        body = await read_request_body(receive, RequestHead.from_scope(scope), limits)
        header_length = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == HEADER_LENGTH.encode()),
            None,
        )
        request = parse_infer(*split_body(body, header_length), cascade.modality, limits.max_batch)
        predictions, _ = await _answer(gateway, cascade, request.items, started)
        payload, json_length = encode_response(request, predictions, predictions.version.version)
        headers = list(self._headers)
        if json_length is not None:
            headers[0] = (b"content-type", b"application/octet-stream")
            headers.append((HEADER_LENGTH.encode(), str(json_length).encode()))
        return 200, payload, headers


async def _answer(
    gateway: Gateway, cascade: Cascade, items: list[Any], started: float
) -> tuple[Predictions, float]:
    """Runs the cascade on a request's inputs and records the request's latencies."""
    predictions = await cascade.predict(items)
    total = time.perf_counter() - started
    a = predictions.answer
    gateway.metrics.request_done(
        cascade.name, predictions.preprocess_s, a.queue_s, total, a.student_s + a.teacher_s
    )
    return predictions, total
