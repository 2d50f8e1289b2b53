"""The gateway's FastAPI routes besides prediction: probes, the cascade listing, metrics."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from .serving import gateway_of

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={503: {"description": "not ready (details per cascade), starting or draining"}},
)
async def readyz(
    request: Request, teacher: Literal["required", "optional"] = "required"
) -> Response:
    """Every cascade's student is loaded and its teacher model is ready on Triton (as last
    seen by a background check: this route never waits on the network). `?teacher=optional`
    only requires the students: for a load balancer that should keep routing (degraded answers)
    while the teacher is down, and for start-up probes."""
    gateway = gateway_of(request)
    if gateway is None:
        return Response(orjson.dumps({"ready": False}), 503, media_type="application/json")
    if gateway.drain.draining:
        body = {"ready": False, "draining": True}
        return Response(orjson.dumps(body), 503, media_type="application/json")
    detail: dict[str, dict[str, Any]] = {
        name: dict(c.readiness()) for name, c in gateway.cascades.items()
    }
    # Tiers on Triton (`tier:<name>`) are required as the teacher is.
    required = teacher == "required"
    ready = all(
        v for parts in detail.values() for k, v in parts.items() if required or k == "student"
    )
    for name, c in gateway.cascades.items():
        if c.students.follow_error is not None:  # reported; the configured bundle serves
            detail[name]["rollout_error"] = c.students.follow_error
    store: dict[str, Any] | None = None
    if gateway.store is not None:
        # Down is reported, not required: the last known values stay in force. Never read
        # (a replica started while Redis was down) is required: bundle defaults may be stale.
        store = {
            "kind": gateway.store.name,
            "up": gateway.store.healthy(),
            "synced": gateway.store.synced(),
        }
        ready = ready and store["synced"]
    return Response(
        orjson.dumps({"ready": ready, "cascades": detail, "control_store": store}),
        200 if ready else 503,
        media_type="application/json",
    )


@router.get("/cascades")
async def cascades(request: Request) -> dict[str, Any]:
    """The cascades served, with their classes and current thresholds."""
    gateway = gateway_of(request)
    return {
        "cascades": [
            {
                "name": c.name,
                "modality": c.modality,
                "classes": list(c.classes),
                "threshold": c.threshold(),
                "policy": c.thresholds.current().mode,
                "versions": c.versions,
                # The two numbers an operator weighs: what the cascade saves and how far its
                # answers stay with the teacher's (live, when shadow sampling is on).
                **c.controller.describe(c.manifest.calibration),
            }
            for c in (gateway.cascades.values() if gateway else ())
        ]
    }


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
        503: {"description": "starting"},
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics, aggregated over every worker process."""
    gateway = gateway_of(request)
    if gateway is None:
        return Response(b"", 503)
    for cascade in gateway.cascades.values():
        cascade.threshold()  # a change made through another worker shows on every scrape
    body, content_type = gateway.metrics.render()
    return Response(body, media_type=content_type)
