"""What the routes share: the cascades by name, the settings and the metrics."""

from __future__ import annotations

from starlette.requests import Request

from ..config.tracing import TracingConfig
from ..errors import InvalidInput, UnknownCascade
from ..settings import Settings
from .cascade import Cascade
from .drain import Drain
from .metrics import UNROUTED, Metrics
from .stores import ControlStore
from .tracing import Tracing


def gateway_of(request: Request) -> Gateway | None:
    """The app's Gateway, or None while the lifespan has not set it up (starting, stopped)."""
    return getattr(request.app.state, "gateway", None)


class Gateway:
    def __init__(
        self,
        settings: Settings,
        cascades: dict[str, Cascade],
        metrics: Metrics,
        store: ControlStore | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.store = store
        self.tracing = tracing or Tracing(TracingConfig())  # off unless configured
        self.settings = settings
        self.body_limits = settings.body_limits  # built once: the hot path reads it
        self.overrides = settings.overrides
        self.cascades = cascades
        self.metrics = metrics
        self.drain = Drain(settings.drain_s)

    def resolve(self, name: str | None, modality: str | None = None) -> Cascade:
        """The cascade named, or the only one that fits the modality."""
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

    def label_for_rejection(self, cascade: Cascade | None) -> str:
        """The cascade label of a refused request: its cascade when one was chosen (or only one
        is served), else a label of its own that no delegation ratio is computed for."""
        if cascade is not None:
            return cascade.name
        if len(self.cascades) == 1:
            return next(iter(self.cascades))
        return UNROUTED
