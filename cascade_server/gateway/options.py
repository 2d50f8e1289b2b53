"""What a request may ask for itself, within the operator's limits (CASCADE_OVERRIDES__*): who
should answer (`delegate: auto | never | always`), its own threshold, and a deadline
(`deadline_ms`, or the `x-request-timeout-ms` header), after which the teacher is skipped
when its observed p95 latency does not fit in what is left. Off unless enabled: a request
that asks while they are off, or outside the limits, is refused with a 422 saying so."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config.delegation import OverridesConfig
from ..errors import InvalidInput
from .routing import Mode

FIELDS = ("delegate", "threshold", "deadline_ms")
HEADER = b"x-request-timeout-ms"
_MODES = {"auto": Mode.AUTO, "never": Mode.NEVER, "always": Mode.ALWAYS}


@dataclass(frozen=True)
class RequestOptions:
    mode: Mode = Mode.AUTO
    threshold: float | None = None
    deadline: float | None = None  # perf_counter by which the answer is due

    def labels(self) -> list[str]:
        """What was overridden, for the metrics."""
        out = []
        if self.mode != Mode.AUTO:
            out.append(f"delegate_{self.mode.name.lower()}")
        if self.threshold is not None:
            out.append("threshold")
        if self.deadline is not None:
            out.append("deadline")
        return out


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidInput(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise InvalidInput(f"{name} must be a number, got {value!r}") from None


def parse_options(
    given: dict[str, Any], config: OverridesConfig, started: float
) -> RequestOptions | None:
    """`given`: the request's `delegate`, `threshold`, `deadline_ms` (from the body, the query
    or the header; absent ones left out). None when nothing was asked."""
    if not given:
        return None
    if not config.enabled:
        raise InvalidInput(
            f"per-request {', '.join(sorted(given))} is not enabled on this gateway "
            "(CASCADE_OVERRIDES__ENABLED)"
        )
    mode = Mode.AUTO
    if "delegate" in given:
        name = given["delegate"]
        if not isinstance(name, str) or name not in _MODES:
            raise InvalidInput(f"delegate must be one of auto, never, always; got {name!r}")
        mode = _MODES[name]
        if mode == Mode.NEVER and not config.allow_never:
            raise InvalidInput("delegate: never is not allowed on this gateway")
        if mode == Mode.ALWAYS and not config.allow_always:
            raise InvalidInput("delegate: always is not allowed on this gateway")
    threshold = None
    if "threshold" in given:
        threshold = _number(given["threshold"], "threshold")
        if not config.min_threshold <= threshold <= config.max_threshold:
            raise InvalidInput(
                f"threshold {threshold} is outside the allowed "
                f"[{config.min_threshold}, {config.max_threshold}]"
            )
    deadline = None
    if "deadline_ms" in given:
        ms = _number(given["deadline_ms"], "deadline_ms")
        if not 0 < ms <= config.max_deadline_ms:
            raise InvalidInput(f"deadline_ms must be in (0, {config.max_deadline_ms}]")
        deadline = started + ms / 1e3
    return RequestOptions(mode, threshold, deadline)
