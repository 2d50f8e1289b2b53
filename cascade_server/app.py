"""The gateway: `create_app(settings)` builds the FastAPI app; nothing happens at import."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Literal

import orjson
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.datastructures import UploadFile
from starlette.responses import Response

from . import __version__
from .admin import router as admin_router
from .bundle import Bundle
from .cascade import Cascade
from .errors import (
    BadRequest,
    CascadeError,
    InvalidInput,
    PayloadTooLarge,
    UnknownCascade,
    UnsupportedMediaType,
    format_validation_errors,
    install_handlers,
)
from .limits import BodySizeLimit
from .metrics import Metrics
from .settings import Settings
from .teacher import Teacher, TritonTeacher

log = logging.getLogger(__name__)


class InputItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(default=None, description="base64 PNG/JPEG/... (data: URL ok)")
    text: str | None = Field(default=None, description="a text, for text cascades")

    @model_validator(mode="after")
    def _one_of(self) -> InputItem:
        if (self.image is None) == (self.text is None):
            raise ValueError("each input has exactly one of `image` and `text`")
        return self


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(default=None, description="one base64 image")
    text: str | None = Field(default=None, description="one text")
    inputs: list[InputItem] | None = Field(default=None, description="a batch, answered in order")
    cascade: str | None = Field(default=None, description="which cascade; optional if one fits")
    top_k: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> PredictRequest:
        if sum(x is not None for x in (self.image, self.text, self.inputs)) != 1:
            raise ValueError("give exactly one of `image`, `text` (one input) or `inputs` (a list)")
        return self


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


class Gateway:
    """What the routes need: the cascades by name, settings and metrics."""

    def __init__(self, settings: Settings, cascades: dict[str, Cascade], metrics: Metrics):
        self.settings = settings
        self.cascades = cascades
        self.metrics = metrics

    def resolve(self, name: str | None, modality: str | None = None) -> Cascade:
        if name is not None:
            try:
                cascade = self.cascades[name]
            except KeyError:
                raise UnknownCascade(
                    f"no cascade {name!r}; serving: {', '.join(sorted(self.cascades))}"
                ) from None
            if modality is not None and cascade.modality != modality:
                raise InvalidInput(f"cascade {name!r} takes {cascade.modality}, not {modality}")
            return cascade
        if modality is None:
            if len(self.cascades) == 1:
                return next(iter(self.cascades.values()))
            raise InvalidInput("several cascades are served; name one with `cascade`")
        fitting = [c for c in self.cascades.values() if c.modality == modality]
        if len(fitting) == 1:
            return fitting[0]
        if not fitting:
            raise InvalidInput(f"no cascade serves {modality} input")
        raise InvalidInput(
            f"several cascades serve {modality} input ({', '.join(c.name for c in fitting)}); "
            "name one with `cascade`"
        )


def build_teacher(settings: Settings, bundle: Bundle) -> Teacher:
    return TritonTeacher(
        settings.triton_url,
        bundle.manifest.teacher,
        timeout_s=settings.teacher_timeout_s,
        readiness_timeout_s=settings.readiness_timeout_s,
        reconnect_backoff_ms=settings.teacher_reconnect_backoff_ms,
    )


def create_app(settings: Settings | None = None, *, teacher_factory=build_teacher) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        cascades: dict[str, Cascade] = {}
        for path in settings.bundles:
            bundle = Bundle.load(path)
            name = bundle.manifest.name
            if name in cascades:
                raise ValueError(f"two bundles are named {name!r}: {path}")
            cascades[name] = Cascade(bundle, settings, metrics, teacher_factory(settings, bundle))
        try:
            for cascade in cascades.values():
                await cascade.setup()
            app.state.gateway = Gateway(settings, cascades, metrics)
            log.info("serving cascades: %s", ", ".join(cascades))
            yield
        finally:
            for cascade in cascades.values():
                await cascade.close()
            metrics.mark_process_dead()

    app = FastAPI(title="cascade-server", version=__version__, lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    install_handlers(app)
    app.include_router(admin_router)
    worker_header = {"x-cascade-worker": str(os.getpid())} if settings.expose_worker_id else {}

    @app.post(
        "/predict",
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {"schema": PredictRequest.model_json_schema()},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "file": {
                                    "type": "array",
                                    "items": {"type": "string", "format": "binary"},
                                },
                                "cascade": {"type": "string"},
                                "top_k": {"type": "integer"},
                            },
                        }
                    },
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                }
            }
        },
    )
    async def predict(request: Request) -> Response:
        """Classify one image or a batch. JSON (base64), multipart upload (`file` fields, one or
        more), or a raw image body. `cascade` and `top_k` may also be query parameters."""
        gateway: Gateway = request.app.state.gateway
        started = time.perf_counter()
        metrics.in_flight.inc()
        cascade = None
        try:
            parsed = await _read_inputs(request, gateway.settings)
            cascade = gateway.resolve(parsed.cascade, parsed.modality)
            outputs, timings = await cascade.predict(
                parsed.items, parsed.top_k or gateway.settings.default_top_k
            )
            total = time.perf_counter() - started
            for out in outputs:
                out["timings_ms"] = timings.as_ms(total)
            cascade.record_total(timings, total)
            body = {"outputs": outputs} if parsed.batched else outputs[0]
            return Response(
                orjson.dumps(body), media_type="application/json", headers=worker_header
            )
        except CascadeError:
            if cascade is None and len(gateway.cascades) == 1:
                cascade = next(iter(gateway.cascades.values()))
            label = cascade.name if cascade is not None else "unknown"
            Cascade._safe(metrics.requests.labels(label, "rejected").inc)
            raise
        finally:
            metrics.in_flight.dec()

    @app.get("/healthz")
    async def healthz() -> dict:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request, teacher: Literal["required", "optional"] = "required"):
        """Every cascade's student is loaded and its teacher model is ready on Triton.
        `?teacher=optional` only requires the students: a load balancer probe that should keep
        routing (degraded answers) while the teacher is down."""
        gateway: Gateway | None = getattr(request.app.state, "gateway", None)
        if gateway is None:
            return Response(orjson.dumps({"ready": False}), 503, media_type="application/json")
        detail = {name: await c.readiness() for name, c in gateway.cascades.items()}
        needed = ("student", "teacher") if teacher == "required" else ("student",)
        ready = all(parts[k] for parts in detail.values() for k in needed)
        return Response(
            orjson.dumps({"ready": ready, "cascades": detail}),
            200 if ready else 503,
            media_type="application/json",
        )

    @app.get("/cascades")
    async def cascades(request: Request) -> dict:
        """The cascades served, with their classes and current thresholds."""
        gateway: Gateway = request.app.state.gateway
        return {
            "cascades": [
                {
                    "name": c.name,
                    "modality": c.modality,
                    "classes": list(c.classes),
                    "threshold": c.threshold(),
                    "versions": c.versions,
                }
                for c in gateway.cascades.values()
            ]
        }

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        gateway: Gateway | None = getattr(request.app.state, "gateway", None)
        for cascade in gateway.cascades.values() if gateway else ():
            cascade.threshold()  # a change made through another worker shows on every scrape
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


@dataclass
class ParsedRequest:
    items: list  # bytes (encoded images) or str (texts), in request order
    modality: str
    cascade: str | None
    top_k: int | None
    batched: bool


async def _read_inputs(request: Request, settings: Settings) -> ParsedRequest:
    """The request's inputs, their modality, the cascade named, top_k, and whether it was a
    batch. Every input is checked here or in the cascade's preprocessor before any model runs."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    query = request.query_params
    cascade_name = query.get("cascade")
    top_k = _int_param(query.get("top_k"), "top_k")

    if content_type == "application/json":
        raw = await request.body()
        if not raw:
            raise BadRequest('request body is empty; send JSON like {"image": "<base64>"}')
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"body is not valid JSON (or not UTF-8): {exc}") from None
        if not isinstance(payload, dict):
            raise InvalidInput("body must be a JSON object")
        try:
            req = PredictRequest.model_validate(payload)
        except ValidationError as exc:
            raise InvalidInput(format_validation_errors(exc.errors())) from None
        if req.inputs is not None:
            _check_batch(len(req.inputs), settings)
            kinds = {"text" if x.text is not None else "image" for x in req.inputs}
            if len(kinds) > 1:
                raise InvalidInput("a batch mixes images and texts; send one modality per request")
            modality = kinds.pop()
            if modality == "text":
                items: list = [x.text for x in req.inputs]
            else:
                items = [
                    decode_base64(x.image, f"inputs[{i}].image") for i, x in enumerate(req.inputs)
                ]
        elif req.text is not None:
            modality, items = "text", [req.text]
        else:
            modality, items = "image", [decode_base64(req.image, "image")]
        return ParsedRequest(
            items, modality, req.cascade or cascade_name, req.top_k or top_k, req.inputs is not None
        )

    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=settings.max_batch + 1, max_fields=16)
        except CascadeError:
            raise
        except Exception as exc:  # python-multipart's errors for malformed bodies
            raise BadRequest(f"malformed multipart body: {exc}") from None
        try:
            files = [v for v in form.getlist("file") if isinstance(v, UploadFile)]
            if not files:
                raise InvalidInput("multipart body has no `file` field")
            _check_batch(len(files), settings)
            blobs = [await f.read() for f in files]
        finally:
            await form.close()  # spooled temporary files, on every path
        name = form.get("cascade")
        return ParsedRequest(
            blobs,
            "image",
            name if isinstance(name, str) else cascade_name,
            _int_param(form.get("top_k"), "top_k") or top_k,
            len(files) > 1,
        )

    if content_type.startswith("image/"):
        return ParsedRequest([await request.body()], "image", cascade_name, top_k, False)

    if content_type == "text/plain":
        try:
            text = (await request.body()).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest(f"body is not valid UTF-8: {exc}") from None
        return ParsedRequest([text], "text", cascade_name, top_k, False)

    raise UnsupportedMediaType(
        f"content type {content_type!r} is not accepted: send application/json, "
        "multipart/form-data, image/* or text/plain"
    )


def _check_batch(n: int, settings: Settings) -> None:
    if n == 0:
        raise InvalidInput("inputs is empty: send at least one")
    if n > settings.max_batch:
        raise PayloadTooLarge(f"batch of {n} inputs; the limit is {settings.max_batch}")


def _int_param(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        parsed = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be an integer, got {value!r}") from None
    if parsed < 1:
        raise InvalidInput(f"{name} must be at least 1")
    return parsed


def create_app_from_env() -> FastAPI:
    """uvicorn factory for worker processes: settings from the environment."""
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return create_app(settings)
