"""cascade-serve: run the gateway (uvicorn, N workers), optionally with the bundled Triton.

Settings come from `CASCADE_*` variables; the flags here override them and are handed to the
worker processes through the environment, so every worker builds the same Settings.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("cascade_server.serve")
# What `cascade-train demo` writes under its --bundles directory.
DEMO_BUNDLES = ("digits", "intents")


def build_demos(repository: Path, bundles: Path) -> None:
    """The demo cascades, built (or found) by `cascade-train demo` in its own process: the
    gateway never imports training (nor torch)."""
    train = shutil.which("cascade-train", path=str(Path(sys.executable).parent)) or shutil.which(
        "cascade-train"
    )
    if train is None:
        raise SystemExit(
            "--demo builds the demo cascades with cascade-train: install cascade-server[train]"
        )
    cmd = [train, "--no-progress", "demo", "--repository", str(repository), "--bundles",
           str(bundles)]  # fmt: skip
    subprocess.run(cmd, check=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cascade-serve", description=__doc__)
    p.add_argument(
        "--demo",
        action="store_true",
        help="build the demo cascades (digits images, intents texts) if missing, run the "
        "bundled Triton with them, and set an admin token if none is configured",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument(
        "--bundle",
        type=Path,
        action="append",
        dest="bundles",
        help="a cascade bundle directory (repeat for several; else CASCADE_BUNDLES)",
    )
    p.add_argument("--triton-url", help="Triton gRPC host:port (else CASCADE_TRITON_URL)")
    p.add_argument(
        "--launch-triton",
        action="store_true",
        help="start the bundled tritonserver on --model-repository, on free ports",
    )
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument(
        "--bundles-dir",
        type=Path,
        default=Path("bundles"),
        help="with --demo: where the demo bundle lives",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(".cascade"),
        help="runtime files: Triton's derived repository and logs, metrics files",
    )
    p.add_argument(
        "--proxy-headers",
        action="store_true",
        help="trust X-Forwarded-For/-Proto from --forwarded-allow-ips (behind a proxy); off by "
        "default: it costs every request a header scan and lets clients dress up their address",
    )
    p.add_argument("--forwarded-allow-ips", default="127.0.0.1")
    p.add_argument(
        "--graceful-shutdown-s",
        type=float,
        default=10.0,
        help="how long in-flight requests may take to finish on shutdown",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .gateway.logs import configure_logging

    configure_logging("info", "json" if os.environ.get("CASCADE_LOG_FORMAT") == "json" else "text")
    env = os.environ
    if args.demo:
        build_demos(args.model_repository, args.bundles_dir)
        args.bundles = args.bundles or [args.bundles_dir / name for name in DEMO_BUNDLES]
        args.launch_triton = True
        if not env.get("CASCADE_ADMIN_TOKEN"):
            env["CASCADE_ADMIN_TOKEN"] = "demo-" + secrets.token_urlsafe(12)
    if args.bundles:
        env["CASCADE_BUNDLES"] = ",".join(str(p.resolve()) for p in args.bundles)
    if args.triton_url:
        env["CASCADE_TRITON_URL"] = args.triton_url

    # Multiprocess metrics must be configured before prometheus_client is first imported.
    metrics_dir = Path(env.get("PROMETHEUS_MULTIPROC_DIR") or args.workdir / "metrics")
    if args.workers > 1 or "PROMETHEUS_MULTIPROC_DIR" in env:
        shutil.rmtree(metrics_dir, ignore_errors=True)  # stale files from a previous run
        metrics_dir.mkdir(parents=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())

    from .bundle import Bundle
    from .settings import Settings

    settings = Settings()  # fail here, once, rather than in every worker
    names = [Bundle.load(path).manifest.name for path in settings.bundles]

    # uvicorn handles SIGTERM itself (drain, graceful shutdown), then restores this handler and
    # raises the signal again: exit through `finally`, so a bundled Triton stops after the
    # gateway and the exit status is 0. A SIGTERM during start-up ends the same way.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    triton = None
    try:
        if args.launch_triton:
            from .triton import TritonServer, python_backend_repository

            workdir = (args.workdir / "triton").resolve()
            repo = python_backend_repository(
                args.model_repository.resolve(), workdir / "repository"
            )
            triton = TritonServer(repo, workdir).start()
            env["CASCADE_TRITON_URL"] = triton.grpc_url
            log.info(
                "bundled tritonserver ready: grpc %s (log: %s)", triton.grpc_url, triton.log_path
            )
        _banner(args, env, names)
        import uvicorn

        uvicorn.run(
            "cascade_server.gateway.app:create_app_from_env",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            access_log=False,
            proxy_headers=args.proxy_headers,
            forwarded_allow_ips=args.forwarded_allow_ips,
            timeout_graceful_shutdown=args.graceful_shutdown_s,
            log_level=settings.log_level.lower(),
            # uvicorn's loggers go to the root logger, with the gateway's format (text/json).
            log_config=None,
        )
    finally:
        if triton is not None:
            log.info("stopping tritonserver")
            triton.stop()
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _banner(args: argparse.Namespace, env, cascades: list[str]) -> None:
    base = f"http://{args.host}:{args.port}"
    lines = [
        f"cascade gateway on {base}  ({args.workers} worker(s); teacher at "
        f"{env.get('CASCADE_TRITON_URL', '127.0.0.1:8001')})",
        f"  predict:  curl -s {base}/predict -H 'content-type: application/json' "
        '-d \'{"image": "<base64 PNG>"}\'',
        f"            curl -s {base}/predict -H 'content-type: application/json' "
        '-d \'{"text": "my card was declined at the shop"}\'',
        f"  metrics:  curl -s {base}/metrics",
    ]
    token = env.get("CASCADE_ADMIN_TOKEN")
    if args.demo and token:
        lines.append(f"  admin token (demo): {token}")
        # With several cascades the admin API needs the name (422 otherwise).
        for name in cascades:
            lines.append(
                f"  admin:    curl -s '{base}/admin/threshold?cascade={name}' "
                f"-H 'authorization: Bearer {token}'"
            )
    print("\n".join(lines), file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
