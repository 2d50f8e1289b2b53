"""Admin API: the delegation threshold at runtime. Bearer token from CASCADE_ADMIN_TOKEN."""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import Forbidden, InvalidInput, Unauthorized, format_validation_errors
from .parsing import one_value
from .schemas import ErrorResponse, documented_errors

if TYPE_CHECKING:
    from .cascade import Cascade

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    responses=documented_errors(
        ErrorResponse,
        {
            401: "no bearer token",
            403: "wrong token, or the admin API is disabled",
            404: "no such cascade",
            413: "body over the limit",
            422: "invalid update, or the cascade is ambiguous (name it)",
            503: "the control store is unreachable: nothing was changed",
        },
    ),
)


def require_admin(request: Request) -> str:
    """Returns who is calling (for the audit log) or raises 401/403."""
    token = request.app.state.gateway.settings.admin_token
    if token is None:
        raise Forbidden("the admin API is disabled: no CASCADE_ADMIN_TOKEN is configured")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("admin calls need `Authorization: Bearer <token>`")
    expected = token.get_secret_value()
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise Forbidden("the admin token is not valid")
    fingerprint = hashlib.sha256(expected.encode()).hexdigest()[:8]
    client = request.client.host if request.client else "?"
    who = f"token {fingerprint} from {client}"
    # The header is the caller's own word, recorded as such, never as the identity.
    claimed = "".join(c for c in request.headers.get("x-cascade-actor", "")[:64] if c.isprintable())
    return f"{who} (says: {claimed.strip()})" if claimed.strip() else who


Admin = Annotated[str, Depends(require_admin)]


# Strict numbers: `true` or "0.5" are not thresholds; NaN and infinities are refused as such.
Unit = Annotated[float, Field(strict=True, ge=0.0, le=1.0, allow_inf_nan=False)]


class ThresholdUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cascade: str | None = None
    threshold: Unit | None = Field(default=None, description="a fixed threshold")
    target_delegation_rate: Unit | None = Field(
        default=None, description="a share of traffic for the teacher, held online"
    )
    max_student_error: Unit | None = Field(
        default=None,
        description="the error accepted on what the student answers alone (upper confidence "
        "bound), held online with shadow samples",
    )
    target_accuracy: Unit | None = Field(
        default=None,
        description="the cascade accuracy to reach at the least expected cost: every stage's "
        "threshold from the calibrated accuracy-vs-cost frontier",
    )
    cost_budget: Annotated[
        float | None, Field(strict=True, ge=0.0, le=1e6, allow_inf_nan=False)
    ] = Field(
        default=None,
        description="the expected cost per item to stay within (the teacher alone = 1.0) at the "
        "highest accuracy: every stage's threshold from the frontier",
    )
    min_threshold: Unit = Field(default=0.0, description="bound on the controller's moves")
    max_threshold: Unit = Field(default=1.0, description="bound on the controller's moves")

    @model_validator(mode="after")
    def _one(self) -> ThresholdUpdate:
        given = (
            self.threshold,
            self.target_delegation_rate,
            self.max_student_error,
            self.target_accuracy,
            self.cost_budget,
        )
        if sum(v is not None for v in given) != 1:
            raise ValueError(
                "give exactly one of `threshold`, `target_delegation_rate`, `max_student_error`, "
                "`target_accuracy` and `cost_budget`"
            )
        if self.min_threshold > self.max_threshold:
            raise ValueError("min_threshold must not exceed max_threshold")
        return self


def _describe(cascade: Cascade) -> dict[str, Any]:
    state = cascade.thresholds.current()
    calibration = cascade.manifest.calibration
    in_force = cascade.threshold()
    return {
        "cascade": cascade.name,
        **state.model_dump(),
        # The policy's own start (`threshold` above) and what is served now: the controller's
        # while it holds an online policy.
        "threshold_in_force": in_force,
        "default_threshold": cascade.manifest.default_threshold,
        # N-stage cascades: the stages in order and each tier's threshold in force.
        "stages": list(cascade.active.stage_names),
        "tier_thresholds_in_force": list(cascade.tier_thresholds()),
        # What the calibration split says this threshold delegates.
        "expected_delegation_rate": calibration.rate_for_threshold(in_force),
        **cascade.controller.describe(calibration),
    }


@router.get("/threshold")
async def get_threshold(request: Request, _: Admin, cascade: str | None = None) -> dict:
    """The current threshold, where it came from (bundle calibration or an admin), and when."""
    return _describe(request.app.state.gateway.resolve(cascade))


def _one_cascade(in_body: str | None, in_query: str | None) -> str | None:
    return one_value("cascade", in_body, in_query)


def _documented_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a JSON body that the route reads itself (after the token is checked)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


B = TypeVar("B", bound=BaseModel)


async def _read_body(request: Request, model: type[B]) -> B:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise InvalidInput(format_validation_errors(exc.errors())) from None


@router.put("/threshold", openapi_extra=_documented_body(ThresholdUpdate))
async def put_threshold(
    request: Request, actor: Admin, cascade: str | None = None
) -> dict[str, Any]:
    """Set the delegation policy: a fixed threshold; a target delegation rate (started from the
    calibration table, then held online on live margins); or a bound on the student's error on
    what it answers alone (started from the calibration's upper confidence bound, then checked
    live with shadow samples; a target the student cannot reach is refused, naming the best);
    or a target accuracy or cost budget, which sets every stage's threshold from the calibrated
    frontier (a two-stage bundle's is its threshold table), refused when out of reach. Applies
    to every worker and replica and survives restarts. The body is read after the token is
    checked: an unauthenticated caller learns nothing about what a valid body is."""
    update = await _read_body(request, ThresholdUpdate)
    target = request.app.state.gateway.resolve(_one_cascade(update.cascade, cascade))
    old, _ = await target.thresholds.set(
        threshold=update.threshold,
        target_delegation_rate=update.target_delegation_rate,
        max_student_error=update.max_student_error,
        target_accuracy=update.target_accuracy,
        cost_budget=update.cost_budget,
        min_threshold=update.min_threshold,
        max_threshold=update.max_threshold,
        actor=actor,
    )
    target.metrics.threshold_changed(target.name)
    target.threshold()
    return {**_describe(target), "previous_threshold": old.threshold}


@router.delete("/threshold")
async def reset_threshold(request: Request, actor: Admin, cascade: str | None = None) -> dict:
    """Back to the student bundle's calibrated default."""
    target = request.app.state.gateway.resolve(cascade)
    old, _ = await target.thresholds.reset(actor=actor)
    target.metrics.threshold_changed(target.name)
    target.threshold()
    return {**_describe(target), "previous_threshold": old.threshold}


class StudentUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cascade: str | None = None
    bundle: str = Field(min_length=1, description="a bundle directory the gateway can read")


def _student(cascade: Cascade) -> dict[str, Any]:
    state = cascade.students.rollout.read()
    return {
        "cascade": cascade.name,
        "version": cascade.active.version,
        "bundle": str(cascade.active.bundle.path),
        "previous": state.previous if state else None,
        "updated_at": state.updated_at if state else None,
        "updated_by": state.updated_by if state else None,
        # Set when the version recorded in the control store cannot be served here.
        "rollout_error": cascade.students.follow_error,
    }


@router.get("/student")
async def get_student(request: Request, _: Admin, cascade: str | None = None) -> dict[str, Any]:
    """The student version a cascade serves, and the one a rollback returns to."""
    return _student(request.app.state.gateway.resolve(cascade))


@router.put("/student", openapi_extra=_documented_body(StudentUpdate))
async def put_student(request: Request, actor: Admin, cascade: str | None = None) -> dict[str, Any]:
    """Hot swap: load the bundle beside the served version, warm it, flip to it between two
    requests, and retire the old version once its in-flight requests are answered. Every worker
    follows within CASCADE_READINESS_INTERVAL_S; the choice survives restarts. The threshold
    follows the new calibration when a target delegation rate is set. The bundle already
    served changes nothing (`changed: false`; the rollback target stays)."""
    update = await _read_body(request, StudentUpdate)
    target = request.app.state.gateway.resolve(_one_cascade(update.cascade, cascade))
    _, changed = await target.swap(update.bundle, actor)
    return {**_student(target), "threshold": target.threshold(), "changed": changed}


@router.post("/student/rollback")
async def rollback_student(
    request: Request, actor: Admin, cascade: str | None = None
) -> dict[str, Any]:
    """Back to the student version before the last swap."""
    target = request.app.state.gateway.resolve(cascade)
    await target.rollback(actor)
    return {**_student(target), "threshold": target.threshold()}
