"""`create_app(settings)` builds the gateway's ASGI app; nothing happens at import.

The app is `PredictEndpoints` (the two prediction endpoints as plain ASGI) in front of a FastAPI
app with everything else. The lifespan loads every bundle, sets up each cascade's stages and
hands the cascades to both.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .. import __version__
from ..bundle import Bundle, TeacherRef
from ..settings import Settings
from . import admin, kserve, routes
from .cascade import Cascade
from .docs import install_docs
from .http_errors import install_handlers
from .logs import configure_logging
from .metrics import Metrics
from .openapi import install_openapi
from .predict import PredictEndpoints
from .serving import Gateway
from .stores import ControlStore, make_backend
from .teacher import Teacher, TritonTeacher
from .tracing import Tracing

log = logging.getLogger(__name__)
TeacherFactory = Callable[[Settings, Bundle], Teacher]


def build_teacher(settings: Settings, bundle: Bundle) -> Teacher:
    return build_tier(settings, bundle.manifest.teacher)


def build_tier(settings: Settings, ref: TeacherRef) -> Teacher:
    """A Triton client for the teacher, or for a tier on the teacher's Triton."""
    config = settings.cascade.teacher
    return TritonTeacher(
        config.url,
        ref,
        timeout_s=config.timeout_s,
        readiness_timeout_s=config.readiness_timeout_s,
        reconnect_backoff_ms=config.reconnect_backoff_ms,
    )


def load_cascades(
    settings: Settings,
    metrics: Metrics,
    teacher_factory: TeacherFactory,
    store: ControlStore,
    tracing: Tracing | None = None,
) -> dict[str, Cascade]:
    cascades: dict[str, Cascade] = {}
    config = settings.cascade
    for path in settings.bundles:
        bundle = Bundle.load(path.resolve())  # the path the rollout state records
        name = bundle.manifest.name
        if name in cascades:
            raise ValueError(f"two bundles are named {name!r}: {path}")
        cascades[name] = Cascade(
            bundle,
            config,
            metrics,
            teacher_factory(settings, bundle),
            store,
            retry_after_s=settings.retry_after_s,
            tracing=tracing,
            tiers=functools.partial(build_tier, settings),
        )
    return cascades


def create_app(
    settings: Settings | None = None, *, teacher_factory: TeacherFactory = build_teacher
) -> PredictEndpoints:
    settings = settings or Settings()
    metrics = Metrics()
    front: PredictEndpoints

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        control = settings.control
        # The backend's first contact (Redis) waits on the network: off the event loop.
        backend = await asyncio.to_thread(make_backend, control, metrics.control_store)
        store = ControlStore(backend, control.timeout_s)
        metrics.control_store(store.healthy())
        tracing = Tracing(settings.tracing)
        tracing.setup()
        cascades: dict[str, Cascade] = {}
        try:
            cascades = await asyncio.to_thread(
                load_cascades, settings, metrics, teacher_factory, store, tracing
            )
            for cascade in cascades.values():
                await cascade.setup()
            gateway = Gateway(settings, cascades, metrics, store, tracing)
            gateway.drain.install()
            api.state.gateway = front.gateway = gateway
            log.info("serving cascades: %s", ", ".join(cascades))
            yield
        finally:
            front.gateway = None
            for cascade in cascades.values():
                await cascade.close()
            await store.close()
            tracing.shutdown()
            metrics.mark_process_dead()

    api = FastAPI(title="cascade-server", version=__version__, lifespan=lifespan)
    install_handlers(api)
    api.include_router(routes.router)
    api.include_router(admin.router)
    api.include_router(kserve.router)
    install_openapi(api)
    install_docs(api)
    front = PredictEndpoints(
        api,
        max_body_bytes=settings.max_body_bytes,
        expose_worker_id=settings.expose_worker_id,
        max_in_flight=settings.max_in_flight,
        retry_after_s=settings.retry_after_s,
    )
    return front


def create_app_from_env() -> PredictEndpoints:
    """uvicorn factory for worker processes: settings from the environment."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)
