"""Request bodies -> inputs, one parser per content type.

JSON is parsed with orjson and checked by hand for the shapes the schema allows; anything else
goes through the pydantic models of schemas.py, which then say what is wrong (the schema stays
the single definition of what is valid, and valid requests never pay for building models).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl

import orjson
from pydantic import ValidationError
from starlette.types import Message, Receive, Scope

from ..config.limits import BodyLimits
from ..errors import (
    BadRequest,
    CascadeError,
    InvalidInput,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
    format_validation_errors,
)
from .schemas import PredictRequest

Modality = Literal["image", "text"]


@dataclass
class RequestHead:
    """What the parsers need from the ASGI scope, read once."""

    content_type: str  # lower case, without parameters
    charset: str | None
    content_length: int | None
    query: dict[str, str]
    timeout_ms: str | None = None  # the x-request-timeout-ms header: a deadline

    @classmethod
    def from_scope(cls, scope: Scope) -> RequestHead:
        content_type, charset, length, timeout = "application/json", None, None, None
        for name, value in scope["headers"]:
            if name == b"content-encoding":
                refuse_encoded_body(value)
            elif name == b"x-request-timeout-ms":
                timeout = value.decode("latin-1")
            elif name == b"content-type":
                mime, _, params = value.decode("latin-1").partition(";")
                content_type = mime.strip().lower()
                for param in params.split(";"):
                    key, _, val = param.partition("=")
                    if key.strip().lower() == "charset":
                        charset = val.strip().strip('"').lower()
            elif name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise BadRequest("content-length is not a number") from None
        raw_query = scope.get("query_string", b"")
        query = dict(parse_qsl(raw_query.decode("latin-1"))) if raw_query else {}
        return cls(content_type, charset, length, query, timeout)


@dataclass
class ParsedRequest:
    items: list[Any]  # bytes (encoded images) or str (texts), in request order
    modality: Modality
    cascade: str | None
    top_k: int | None
    batched: bool
    # The request's own options (delegate, threshold, deadline_ms) as sent, checked against
    # the operator's limits later (options.py).
    options: dict[str, Any] = field(default_factory=dict)


OPTION_KEYS = ("delegate", "threshold", "deadline_ms")


def options_of(given: dict[str, Any], head: RequestHead) -> dict[str, Any]:
    """A request's options from its body (or form), its query and the deadline header; the
    same option in two places must agree."""
    out: dict[str, Any] = {}
    header = {"deadline_ms": head.timeout_ms} if head.timeout_ms is not None else {}
    sources = (("body", given), ("query", head.query), ("header", header))
    for key in OPTION_KEYS:
        values = [(where, src[key]) for where, src in sources if src.get(key) is not None]
        if not values:
            continue
        first = values[0][1]
        for where, value in values[1:]:
            if str(value) != str(first):
                raise InvalidInput(f"{key} differs between the {values[0][0]} and the {where}")
        out[key] = first
    return out


def refuse_encoded_body(value: bytes) -> None:
    """A compressed body is refused by name (415) rather than parsed as if it were plain, which
    gave a confusing 400; decoding it would need its own bound on the decompressed size, and the
    payloads here (base64 of compressed images) gain little from it."""
    encoding = value.decode("latin-1").strip().lower()
    if encoding and encoding != "identity":
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not accepted: send the body uncompressed"
        )


def limited_receive(receive: Receive, max_bytes: int) -> Receive:
    """`receive` that refuses a body growing past `max_bytes` while it streams in."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                raise PayloadTooLarge(body_limit_message(max_bytes))
        return message

    return wrapped


def body_limit_message(max_bytes: int) -> str:
    return f"request body is larger than the limit of {max_bytes} bytes"


async def read_body(receive: Receive, timeout_s: float) -> bytes:
    """The whole body, within `timeout_s` (a client trickling a body, slowloris-style, is cut
    off with 408 instead of holding a slot forever)."""
    chunks = []
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise BadRequest("client disconnected before the body was complete")
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s}s") from None


def decode_base64(value: str, where: str) -> bytes:
    if value.startswith("data:"):
        _, _, value = value.partition(",")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # `base64` on the command line wraps lines; tolerate whitespace, nothing else
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{where} is not valid base64") from None


def int_param(value: object, name: str) -> int | None:
    """An integer from the query string or a form field (text), or None when absent."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):  # a file part in a form, say: never its repr
        raise InvalidInput(f"{name} must be a plain form field holding an integer, not a file")
    try:
        parsed = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be an integer, got {value!r}") from None
    if parsed < 1:
        raise InvalidInput(f"{name} must be at least 1")
    return parsed


def one_value(name: str, in_body: str | None, in_query: str | None) -> str | None:
    """A parameter given in the body and the query must agree (as on the admin API), not have
    the body win silently."""
    if in_body is not None and in_query is not None and in_body != in_query:
        raise InvalidInput(f"?{name}={in_query} and the body's {name} {in_body!r} differ")
    return in_body if in_body is not None else in_query


def top_k_of(in_body: int | None, head: RequestHead) -> int | None:
    if not head.query:
        return in_body
    in_query = int_param(head.query.get("top_k"), "top_k")
    if in_body is not None and in_query is not None and in_body != in_query:
        raise InvalidInput(f"?top_k={in_query} and the body's top_k {in_body} differ")
    return in_body if in_body is not None else in_query


def check_batch(n: int, limits: BodyLimits) -> None:
    if n == 0:
        raise InvalidInput("inputs is empty: send at least one")
    if n > limits.max_batch:
        raise PayloadTooLarge(f"batch of {n} inputs; the limit is {limits.max_batch}")


_TOP_LEVEL = frozenset(("image", "text", "inputs", "cascade", "top_k"))
_OPTIONS = frozenset(OPTION_KEYS)


def _fast_shape(payload: dict[str, Any]) -> bool:
    """True when the payload is one of the valid shapes, checked without building models."""
    if not payload.keys() <= _TOP_LEVEL:
        return False  # options included: pydantic checks their types
    if sum(k in payload for k in ("image", "text", "inputs")) != 1:
        return False
    cascade, top_k = payload.get("cascade"), payload.get("top_k")
    if cascade is not None and not isinstance(cascade, str):
        return False
    if top_k is not None and (type(top_k) is not int or top_k < 1):
        return False
    if "inputs" in payload:
        inputs = payload["inputs"]
        return isinstance(inputs, list) and all(
            type(x) is dict
            and len(x) == 1
            and isinstance(next(iter(x.values())), str)
            and ("image" in x or "text" in x)
            for x in inputs
        )
    value = payload.get("image", payload.get("text"))
    return isinstance(value, str)


def json_object(raw: bytes, invalid: str, what: str) -> dict[str, Any]:
    """`raw` parsed as a JSON object: 400 `invalid: <reason>` when it is not JSON, 422 when it
    is JSON but not an object."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{invalid}: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def parse_json(raw: bytes, head: RequestHead, limits: BodyLimits) -> ParsedRequest:
    if not raw:
        raise BadRequest('request body is empty; send JSON like {"image": "<base64>"}')
    payload = json_object(raw, "body is not valid JSON (or not UTF-8)", "body")
    fast = _fast_shape(payload)
    if not fast:
        try:
            payload = PredictRequest.model_validate(payload).model_dump(exclude_none=True)
        except ValidationError as exc:
            raise InvalidInput(format_validation_errors(exc.errors())) from None
    if head.query:
        cascade = one_value("cascade", payload.get("cascade"), head.query.get("cascade"))
    else:
        cascade = payload.get("cascade")
    top_k = top_k_of(payload.get("top_k"), head)
    # A payload of the fast shape holds no option; only then may the body be skipped.
    asked = head.query or head.timeout_ms is not None or not fast or _OPTIONS & payload.keys()
    options = options_of(payload, head) if asked else {}
    if "inputs" in payload:
        inputs = payload["inputs"]
        check_batch(len(inputs), limits)
        kinds = {"text" if "text" in x else "image" for x in inputs}
        if len(kinds) > 1:
            raise InvalidInput("a batch mixes images and texts; send one modality per request")
        if kinds == {"text"}:
            texts = [x["text"] for x in inputs]
            return ParsedRequest(texts, "text", cascade, top_k, True, options)
        items = [decode_base64(x["image"], f"inputs[{i}].image") for i, x in enumerate(inputs)]
        return ParsedRequest(items, "image", cascade, top_k, True, options)
    if "text" in payload:
        return ParsedRequest([payload["text"]], "text", cascade, top_k, False, options)
    image = decode_base64(payload["image"], "image")
    return ParsedRequest([image], "image", cascade, top_k, False, options)


def parse_text(raw: bytes, head: RequestHead, limits: BodyLimits) -> ParsedRequest:
    if head.charset not in (None, "utf-8", "utf8"):
        raise UnsupportedMediaType(
            f"charset {head.charset!r} is not accepted: send text/plain in UTF-8"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"body is not valid UTF-8 (the only charset accepted): {exc}") from None
    return _one_input(text, "text", head)


def parse_image(raw: bytes, head: RequestHead, limits: BodyLimits) -> ParsedRequest:
    return _one_input(raw, "image", head)


def _one_input(item: bytes | str, modality: Modality, head: RequestHead) -> ParsedRequest:
    """A raw body is one input; the cascade and top_k come from the query."""
    top_k = int_param(head.query.get("top_k"), "top_k")
    options = options_of({}, head)
    return ParsedRequest([item], modality, head.query.get("cascade"), top_k, False, options)


async def parse_multipart(
    scope: Scope, receive: Receive, head: RequestHead, limits: BodyLimits
) -> ParsedRequest:
    """Streams through Starlette's form parser (files spooled to disk past 1 MB), within the
    body's time limit like every other body: a stalled upload (a content-length larger than
    what is sent, or chunks without the last one) is cut off with 408 instead of holding its
    request slot."""
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            return await _parse_form(scope, receive, head, limits)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {limits.body_timeout_s}s"
        ) from None


async def _parse_form(
    scope: Scope, receive: Receive, head: RequestHead, limits: BodyLimits
) -> ParsedRequest:
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    try:
        form = await Request(scope, receive).form(max_files=limits.max_batch + 1, max_fields=16)
    except CascadeError:
        raise
    except Exception as exc:  # python-multipart's errors for malformed bodies
        raise BadRequest(f"malformed multipart body: {exc}") from None
    try:
        parts = form.getlist("file")
        if not parts:
            raise InvalidInput("multipart body has no `file` field")
        if not all(isinstance(v, UploadFile) for v in parts):
            # A part without a filename arrives as a text field, not an upload.
            raise InvalidInput(
                "the `file` field must be a file upload (a part with a filename), not text"
            )
        files = [v for v in parts if isinstance(v, UploadFile)]
        check_batch(len(files), limits)
        blobs = [await f.read() for f in files]
        name = form.get("cascade")
        if name is not None and not isinstance(name, str):
            raise InvalidInput("cascade must be a plain form field, not a file")
        form_top_k = int_param(form.get("top_k"), "top_k")
        fields = {k: form.get(k) for k in OPTION_KEYS if form.get(k) is not None}
        if not all(isinstance(v, str) for v in fields.values()):
            raise InvalidInput("options must be plain form fields, not files")
    finally:
        await form.close()  # spooled temporary files, on every path
    return ParsedRequest(
        blobs,
        "image",
        one_value("cascade", name, head.query.get("cascade")),
        top_k_of(form_top_k, head),
        len(files) > 1,
        options_of(fields, head),
    )


BodyParser = Callable[[bytes, RequestHead, BodyLimits], ParsedRequest]
# Content types whose body is read whole, then parsed; multipart streams through Starlette.
BODY_PARSERS: dict[str, BodyParser] = {
    "application/json": parse_json,
    "text/plain": parse_text,
}
ACCEPTED = "application/json, multipart/form-data, image/* or text/plain"


def check_declared_length(head: RequestHead, limits: BodyLimits) -> None:
    """A body declared larger than the limit is refused before a byte of it is read."""
    if head.content_length is not None and head.content_length > limits.max_body_bytes:
        raise PayloadTooLarge(body_limit_message(limits.max_body_bytes))


async def read_request_body(receive: Receive, head: RequestHead, limits: BodyLimits) -> bytes:
    """The whole body within the size limit (declared and streamed) and the time limit."""
    check_declared_length(head, limits)
    receive = limited_receive(receive, limits.max_body_bytes)
    return await read_body(receive, limits.body_timeout_s)


async def parse_request(
    scope: Scope, receive: Receive, head: RequestHead, limits: BodyLimits
) -> ParsedRequest:
    """The request's inputs, their modality, the cascade named, top_k, and whether it was a
    batch. Every input is checked here or in the cascade's preprocessor before any model runs."""
    if head.content_type == "multipart/form-data":
        check_declared_length(head, limits)
        limited = limited_receive(receive, limits.max_body_bytes)
        return await parse_multipart(scope, limited, head, limits)
    parser = BODY_PARSERS.get(head.content_type)
    if parser is None and head.content_type.startswith("image/"):
        parser = parse_image
    if parser is None:
        raise UnsupportedMediaType(
            f"content type {head.content_type!r} is not accepted: send {ACCEPTED}"
        )
    return parser(await read_request_body(receive, head, limits), head, limits)
