"""`cascade-train publish BUNDLE --gateway URL`: a running gateway hot-swaps its student to
BUNDLE (the admin API's `PUT /admin/student`), and the rollout is followed until the gateway
reports the new version served.

The bundle path is read by the GATEWAY, not here: by default BUNDLE's absolute path (a gateway
on this machine, or one that mounts the same volume at the same place); `--path-on-gateway`
when it sees the directory elsewhere (a container's mount, another host's copy). BUNDLE itself
is read here for the version to wait for and the cascade to swap (its name, unless
`--cascade`). The admin token comes from CASCADE_ADMIN_TOKEN, as the gateway's own, and is
never printed. Only the standard library: no HTTP client to install in a training environment.

Every worker and replica follows a swap within CASCADE_READINESS_INTERVAL_S; a GET lands on
any one of them, so the rollout counts as done after `confirmations` consecutive reads that
report the new version without a rollout error.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bundle import Bundle

TOKEN_ENV = "CASCADE_ADMIN_TOKEN"
ACTOR = "cascade-train publish"
_BODY_CHARS = 400  # of a non-JSON error answer, quoted


class PublishError(Exception):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@dataclass(frozen=True)
class AdminClient:
    """The gateway's admin API over HTTP, each call bounded by the rollout's deadline."""

    base: str
    token: str
    deadline: float

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise PublishError(f"{method} {path}: out of time")
        request = urllib.request.Request(
            self.base + path,
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers={
                "authorization": f"Bearer {self.token}",
                "content-type": "application/json",
                "accept": "application/json",
                "x-cascade-actor": ACTOR,
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=remaining) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise PublishError(
                f"{method} {path}: the gateway answered {exc.code}: {_message(exc)}"
            ) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise PublishError(f"{method} {path}: no answer within {remaining:.1f}s") from None
            raise PublishError(f"gateway {self.base} unreachable: {reason}") from None
        except TimeoutError:
            raise PublishError(f"{method} {path}: no answer within {remaining:.1f}s") from None
        except (OSError, ValueError) as exc:  # a connection reset, an answer that is not JSON
            raise PublishError(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        if not isinstance(answer, dict):
            raise PublishError(f"{method} {path}: the answer is not a JSON object")
        return answer


def _message(exc: urllib.error.HTTPError) -> str:
    """The gateway's own message (its errors are `{"error": {"code", "message"}}`)."""
    raw = exc.read().decode("utf-8", "replace")
    try:
        error = json.loads(raw)["error"]
        return f"{error['message']} ({error['code']})"
    except (ValueError, KeyError, TypeError):
        return raw[:_BODY_CHARS] or str(exc.reason)


def publish(
    bundle: Path,
    gateway: str,
    *,
    token: str | None,
    cascade: str | None = None,
    path_on_gateway: str | None = None,
    timeout_s: float = 60.0,
    poll_s: float = 0.2,
    confirmations: int = 3,
) -> dict[str, Any]:
    """Swaps the gateway's student to `bundle` and waits until it is served. Returns the new
    version and the previous one; raises PublishError with the gateway's message."""
    if not token:
        raise PublishError(f"no admin token: set {TOKEN_ENV} (the gateway's)", exit_code=2)
    try:
        manifest = Bundle.load(bundle).manifest
    except (OSError, ValueError) as exc:
        raise PublishError(f"{bundle} is not a bundle: {exc}", exit_code=2) from None
    name = cascade or manifest.name
    client = AdminClient(gateway.rstrip("/"), token, time.monotonic() + timeout_s)
    query = "?" + urllib.parse.urlencode({"cascade": name})
    before = client.call("GET", "/admin/student" + query)
    sent = path_on_gateway or str(bundle.resolve())
    swapped = client.call("PUT", "/admin/student", {"cascade": name, "bundle": sent})
    if swapped.get("version") != manifest.version:
        raise PublishError(
            f"the gateway serves {swapped.get('version')!r} from {sent}, not this bundle's "
            f"{manifest.version!r}: does --path-on-gateway name this bundle?"
        )
    seen, last = 0, swapped
    while seen < confirmations:
        time.sleep(min(poll_s, max(client.deadline - time.monotonic(), 0.0)))
        if time.monotonic() >= client.deadline:
            raise PublishError(
                f"the rollout of {manifest.version} is not confirmed within {timeout_s}s: the "
                f"gateway last reported {last.get('version')!r}"
                + (f" ({last['rollout_error']})" if last.get("rollout_error") else "")
            )
        last = client.call("GET", "/admin/student" + query)
        ok = last.get("version") == manifest.version and not last.get("rollout_error")
        seen = seen + 1 if ok else 0
    return {
        "cascade": swapped.get("cascade", name),
        "version": manifest.version,
        "previous": before.get("version"),
        "bundle": swapped.get("bundle", sent),
        "changed": swapped.get("changed"),
        "threshold": swapped.get("threshold"),
    }


def command(
    bundle: Path,
    gateway: str,
    *,
    cascade: str | None,
    path_on_gateway: str | None,
    timeout_s: float,
) -> int:
    """The CLI: the result as JSON on stdout, or one line on stderr and a non-zero status
    (2: no token or no bundle; 1: the gateway refused, is unreachable, or out of time)."""
    try:
        result = publish(
            bundle,
            gateway,
            token=os.environ.get(TOKEN_ENV),
            cascade=cascade,
            path_on_gateway=path_on_gateway,
            timeout_s=timeout_s,
        )
    except PublishError as exc:
        print(f"cascade-train publish: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(result, indent=2))
    return 0
