"""CPU per request of the gateway's prediction path, in process: the app driven over ASGI (no
sockets, no wrk, no Triton: a teacher that answers at once), 16 concurrent clients, student
only by default. What the serving benchmark's wall-clock figures cannot give on a noisy
machine: the gateway's own main-thread CPU per request, and (with --profile) Python calls per
request. Run it against another checkout by putting that one first on the path, from a
directory outside both:

    cd /tmp && PYTHONPATH=/path/to/checkout python /path/to/benchmarks/cpu_per_request.py \
        --bundle /path/to/runs/serving/bundles/fashion \
        --bodies /path/to/runs/serving/payloads/gateway.jsonl

(the bundle and bodies are the serving benchmark's: run it once first). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np


class InstantTeacher:
    name, version = "instant", "1"

    async def setup(self) -> None: ...
    async def close(self) -> None: ...

    async def ready(self) -> bool:
        return True

    async def infer(self, feeds, *args, **kwargs):
        n = len(next(iter(feeds.values())))
        logits = np.zeros((n, 10), np.float32)
        logits[:, 3] = 8.0
        return logits


async def main(args: argparse.Namespace) -> dict:
    import cascade_server
    from cascade_server.gateway.app import create_app
    from cascade_server.settings import Settings

    bodies = [line.encode() for line in args.bodies.read_text().splitlines()[:400]]
    settings = Settings(bundles=[args.bundle], state_dir=Path(tempfile.mkdtemp()), admin_token="t")
    app = create_app(settings, teacher_factory=lambda *a: InstantTeacher())
    inbox: asyncio.Queue = asyncio.Queue()
    outbox: asyncio.Queue = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    started = await outbox.get()
    assert started["type"] == "lifespan.startup.complete", started

    async def call(method: str, path: str, body: bytes, headers=()) -> int:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "scheme": "http", "server": ("127.0.0.1", 80),
            "client": ("127.0.0.1", 1),
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()), *headers],
        }  # fmt: skip
        sent, status = False, []

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope, receive, send)
        return status[0]

    auth = [(b"authorization", b"Bearer t")]
    policy = json.dumps({"threshold": args.threshold}).encode()
    assert await call("PUT", "/admin/threshold", policy, auth) == 200

    async def client(k: int, count: int) -> None:
        for i in range(count):
            assert await call("POST", "/predict", bodies[(k * 31 + i) % len(bodies)]) == 200

    await asyncio.gather(*(client(k, 50) for k in range(16)))  # warm up
    profile = cProfile.Profile() if args.profile else None
    collections = [0]
    gc.callbacks.append(lambda phase, info: collections.__setitem__(0, collections[0] + 1))
    cpu0, thread0 = time.process_time(), time.thread_time()
    if profile is not None:
        profile.enable()
    await asyncio.gather(*(client(k, args.requests // 16) for k in range(16)))
    if profile is not None:
        profile.disable()
    n = args.requests // 16 * 16
    out = {
        "checkout": str(Path(cascade_server.__file__).parent.parent),
        "requests": n,
        "main_thread_us_per_request": round((time.thread_time() - thread0) / n * 1e6, 1),
        "process_us_per_request": round((time.process_time() - cpu0) / n * 1e6, 1),
        "gc_runs": collections[0] // 2,
    }
    if profile is not None:
        stats = pstats.Stats(profile)
        out["python_calls_per_request"] = round(stats.total_calls / n, 1)
    await inbox.put({"type": "lifespan.shutdown"})
    await lifespan
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--bodies", type=Path, required=True)
    p.add_argument("--requests", type=int, default=3200)
    p.add_argument("--threshold", type=float, default=0.0, help="0: student only")
    p.add_argument("--profile", action="store_true", help="also count Python calls (cProfile)")
    print(json.dumps(asyncio.run(main(p.parse_args()))))
