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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import CascadeError, Overloaded, PayloadTooLarge, UnknownCascade
from .http_errors import JSON
from .http_errors import error_body as http_error_body
from .kserve import HEADER_LENGTH, encode_response, error_body, parse_infer, split_body
from .logs import REQUEST_ID, request_id
from .options import RequestOptions, parse_options
from .parsing import (
    RequestHead,
    body_limit_message,
    limited_receive,
    options_of,
    parse_request,
    read_request_body,
    refuse_encoded_body,
)

if TYPE_CHECKING:
    from .answers import Predictions
    from .cascade import Cascade
    from .serving import Gateway
    from .tracing import RequestTrace

log = logging.getLogger(__name__)
_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
_JSON_HEADER = (b"content-type", JSON.encode())
# A handled request: status, body, headers.
Answered = tuple[int, bytes, list[tuple[bytes, bytes]]]


@dataclass(slots=True)
class Call:
    """One prediction call as the handlers see it."""

    gateway: Gateway
    started: float  # perf_counter at arrival
    request_id: str
    trace: RequestTrace | None
    cascade: Cascade | None = None  # once the request names one
    items: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[Call], Awaitable[Answered]]


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
                allow = [(b"allow", b"POST"), _request_id_header(scope)]
                await self._error(send, 405, "method_not_allowed", "use POST", False, allow)
                return

            async def predict(call: Call) -> Answered:
                return await self._predict(scope, receive, call)

            await self._serve(scope, receive, send, predict, protocol=False)
            return
        match = _INFER.match(path) if path.startswith("/v2/models/") else None
        if match is not None:
            if scope["method"] != "POST":
                allow = [(b"allow", b"POST"), _request_id_header(scope)]
                await self._error(send, 405, "method_not_allowed", "use POST", True, allow)
                return
            name, version = match.group(1), match.group(2)

            async def infer(call: Call) -> Answered:
                return await self._infer(scope, receive, call, name, version)

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
        # Every answer of these routes, refusals included, carries the request id.
        rid = request_id(scope["headers"])
        rid_header = (b"x-request-id", rid.encode())
        gateway = self.gateway
        if gateway is None:
            retry = [(b"retry-after", str(self.retry_after_s).encode()), rid_header]
            await self._error(send, 503, "not_ready", "the gateway is starting", protocol, retry)
            return
        metrics = gateway.metrics
        if self.in_flight >= self.max_in_flight:
            metrics.shed(gateway.label_for_rejection(None))
            message = (
                f"the gateway is at its limit of {self.max_in_flight} requests in flight; "
                f"retry after {self.retry_after_s}s"
            )
            retry = [(b"retry-after", str(self.retry_after_s).encode()), rid_header]
            await self._error(send, 503, "overloaded", message, protocol, retry)
            return
        started = time.perf_counter()
        self.in_flight += 1
        metrics.request_started()
        rid_token = REQUEST_ID.set(rid)
        trace = None
        if gateway.tracing.enabled:
            trace = gateway.tracing.request(f"POST {scope['path']}", scope["headers"], rid)
        call = Call(gateway, started, rid, trace)
        status = 500
        try:
            status, body, headers = await handle(call)
            await send_body(send, status, body, [*headers, rid_header])
        except Overloaded as exc:
            status = exc.status
            metrics.shed(gateway.label_for_rejection(call.cascade))
            retry_after = (b"retry-after", str(exc.retry_after_s).encode())
            await self._error(
                send, status, exc.code, exc.message, protocol, [retry_after, rid_header]
            )
        except CascadeError as exc:
            status = exc.status
            metrics.rejected(gateway.label_for_rejection(call.cascade))
            extra = [(b"www-authenticate", b"Bearer")] if exc.status == 401 else []
            await self._error(
                send, exc.status, exc.code, exc.message, protocol, [*extra, rid_header]
            )
        except Exception:
            log.exception("unhandled error on POST %s", scope["path"])
            metrics.failed(gateway.label_for_rejection(call.cascade))
            await self._error(send, 500, "internal_error", "internal error", protocol, [rid_header])
        finally:
            self.in_flight -= 1
            metrics.request_finished()
            REQUEST_ID.reset(rid_token)
            if trace is not None:
                cascade = call.cascade.name if call.cascade is not None else "none"
                trace.finish(status, **{"cascade.name": cascade, "cascade.items": call.items})

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

    async def _predict(self, scope: Scope, receive: Receive, call: Call) -> Answered:
        gateway = call.gateway
        head = RequestHead.from_scope(scope)
        parsed = await parse_request(scope, receive, head, gateway.body_limits)
        if call.trace is not None:
            call.trace.mark("parsed")
        cascade = call.cascade = gateway.resolve(parsed.cascade, parsed.modality)
        call.items = len(parsed.items)
        options = None
        if parsed.options:
            options = parse_options(parsed.options, gateway.overrides, call.started)
        predictions, total = await _answer(call, cascade, parsed.items, options)
        outputs = predictions.outputs(parsed.top_k or gateway.body_limits.default_top_k, total)
        body = orjson.dumps({"outputs": outputs} if parsed.batched else outputs[0])
        return 200, body, self._headers

    async def _infer(
        self, scope: Scope, receive: Receive, call: Call, name: str, version: str | None
    ) -> Answered:
        gateway = call.gateway
        cascade = call.cascade = gateway.resolve(name)
        if version is not None and version != cascade.versions["student"]:
            raise UnknownCascade(f"model {name!r} has no version {version!r}")
        limits = gateway.body_limits
        body = await read_request_body(receive, RequestHead.from_scope(scope), limits)
        header_length = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == HEADER_LENGTH.encode()),
            None,
        )
        request = parse_infer(*split_body(body, header_length), cascade.modality, limits.max_batch)
        if call.trace is not None:
            call.trace.mark("parsed")
        call.items = len(request.items)
        given = options_of(request.options, RequestHead.from_scope(scope))
        options = parse_options(given, gateway.overrides, call.started)
        predictions, _ = await _answer(call, cascade, request.items, options)
        payload, json_length = encode_response(request, predictions, predictions.version.version)
        headers = list(self._headers)
        if json_length is not None:
            headers[0] = (b"content-type", b"application/octet-stream")
            headers.append((HEADER_LENGTH.encode(), str(json_length).encode()))
        return 200, payload, headers


async def _answer(
    call: Call, cascade: Cascade, items: list[Any], options: RequestOptions | None
) -> tuple[Predictions, float]:
    """Runs the cascade on a request's inputs and records the request's latencies."""
    if options is not None:
        call.gateway.metrics.overridden(cascade.name, options.labels())
    predictions = await cascade.predict(items, call.trace, options)
    total = time.perf_counter() - call.started
    a = predictions.answer
    call.gateway.metrics.request_done(
        cascade.name, predictions.preprocess_s, a.queue_s, total, a.student_s + a.teacher_s
    )
    return predictions, total


def _request_id_header(scope: Scope) -> tuple[bytes, bytes]:
    return (b"x-request-id", request_id(scope["headers"]).encode())
