"""The floor of benchmarks/serving.py: a bare FastAPI app that parses the same JSON bodies
(orjson, raw Request) and answers a small JSON object. No model, no decode."""

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response

app = FastAPI()


@app.post("/predict")
async def predict(request: Request) -> Response:
    body = orjson.loads(await request.body())
    return Response(orjson.dumps({"n": len(body["image"])}), media_type="application/json")
