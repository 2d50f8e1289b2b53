"""The teacher called directly on Triton: tritonclient grpc.aio, B images per call (batch 1 by
default), C calls in flight.

    python benchmarks/direct_teacher.py --url 127.0.0.1:8001 --model fashion_teacher \
        --inputs runs/serving/payloads/tensors.npy --concurrency 16 --seconds 8

Prints one JSON line: images/s (`requests_per_s`, one image per request at batch 1) and call
latency percentiles (ms)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import numpy as np


async def main(args: argparse.Namespace) -> dict[str, float]:
    import tritonclient.grpc.aio as grpcclient

    images = np.load(args.inputs)
    client = grpcclient.InferenceServerClient(args.url)
    latencies: list[float] = []
    stop = time.perf_counter() + args.seconds

    async def worker(offset: int) -> None:
        i = offset * args.batch
        while time.perf_counter() < stop:
            rows = [(i + k) % len(images) for k in range(args.batch)]
            x = images[rows]
            i += args.concurrency * args.batch
            inp = grpcclient.InferInput(args.input, list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            t0 = time.perf_counter()
            await client.infer(args.model, [inp])
            latencies.append(time.perf_counter() - t0)

    for _ in range(20):  # warm up the channel and the model
        inp = grpcclient.InferInput(args.input, [1, *images.shape[1:]], "FP32")
        inp.set_data_from_numpy(images[:1])
        await client.infer(args.model, [inp])
    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    await client.close()
    ms = np.asarray(latencies) * 1e3
    return {
        "requests_per_s": len(latencies) * args.batch / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--input", default="input")
    p.add_argument("--inputs", required=True, help=".npy of preprocessed float32 images")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--seconds", type=float, default=8.0)
    print(json.dumps(asyncio.run(main(p.parse_args()))))
