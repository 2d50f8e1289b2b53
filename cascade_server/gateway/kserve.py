"""The KServe v2 / Open Inference Protocol view of a cascade, so that tritonclient, perf_analyzer
and other OIP clients can call the cascade itself.

`POST /v2/models/{cascade}/infer` takes one BYTES input: encoded images (base64 strings in JSON,
raw bytes with the binary tensor extension) or UTF-8 texts. It answers the tensors in OUTPUTS,
in JSON or, per output or for all, in the binary tensor extension. The metadata and health
routes live on the FastAPI router below; inference is served by predict.py's ASGI endpoints.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from .. import __version__
from ..errors import BadRequest, InvalidInput, PayloadTooLarge
from .outcomes import ANSWERED_BY, NAMES
from .parsing import OPTION_KEYS, decode_base64, json_object
from .schemas import ProtocolError, documented_errors
from .serving import gateway_of

if TYPE_CHECKING:
    from .answers import Predictions
    from .cascade import Cascade

HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data"]
# name -> (datatype, per-item shape suffix; "classes" = the cascade's class count)
OUTPUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "label": ("BYTES", ()),
    "class_id": ("INT64", ()),
    "probability": ("FP32", ()),
    "margin": ("FP32", ()),
    "answered_by": ("BYTES", ()),
    "outcome": ("BYTES", ()),
    "delegated": ("BOOL", ()),
    "degraded": ("BOOL", ()),
    "probabilities": ("FP32", ("classes",)),
}
_NUMPY = {"INT64": "<i8", "FP32": "<f4", "BOOL": "?"}
_ANSWERED_BY = np.array([x.encode() for x in ANSWERED_BY], dtype=object)
_OUTCOMES = np.array([x.encode() for x in NAMES], dtype=object)


@dataclass
class InferRequest:
    id: str | None
    items: list[Any]  # bytes (images) or str (texts)
    # Requested outputs (name -> binary?), in the order asked; None: all of them.
    outputs: list[tuple[str, bool]] | None
    binary_default: bool
    # Per-request options from the request's parameters (delegate, threshold, deadline_ms).
    options: dict[str, Any]


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON inference header and the binary section that follows it (if any)."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} is not a number") from None
        if not 0 < n <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} {n} does not fit a body of {len(body)} bytes")
        json_part, binary = body[:n], body[n:]
    return json_object(json_part, "inference header is not valid JSON", "inference request"), binary


def _deserialize_bytes(raw: bytes, count: int) -> list[bytes]:
    """The binary tensor extension's BYTES layout: each element as a 4-byte little-endian
    length, then its bytes; exactly `count` of them, nothing after."""
    out, pos = [], 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise InvalidInput(
                f"binary BYTES tensor is truncated: it ends before element {i} of the {count} "
                "its shape says"
            )
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise InvalidInput(
                f"binary BYTES tensor is truncated: element {i} declares {size} bytes, "
                f"{len(raw) - pos} remain"
            )
        out.append(raw[pos : pos + size])
        pos += size
    if pos != len(raw):
        raise InvalidInput(
            f"binary BYTES tensor has {len(raw) - pos} bytes after the {count} elements its "
            "shape says"
        )
    return out


def _parameters(value: object, where: str) -> dict[str, Any]:
    """A `parameters` object (absent = empty); anything else is the client's error, not ours."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    return value


def _flag(params: dict[str, Any], key: str, default: bool, where: str) -> bool:
    """A boolean parameter: JSON true or false only (the string "false" is not false)."""
    value = params.get(key, default)
    if type(value) is not bool:
        raise InvalidInput(f"{where}.{key} must be true or false, got {value!r}")
    return value


def _flatten(data: object, shape: list[int]) -> list[Any]:
    """Tensor data as the protocol allows it: flat in row-major order, or nested exactly as
    the shape says ([N, 1] as [[a], [b]]); nested rows of another length are refused."""
    if not isinstance(data, list):
        raise InvalidInput("input data must be a list of strings")
    if data and isinstance(data[0], list):
        if len(shape) != 2 or len(data) != shape[0]:
            raise InvalidInput(f"input data is nested as {len(data)} rows; shape says {shape}")
        flat = []
        for row in data:
            if not isinstance(row, list) or len(row) != shape[1]:
                raise InvalidInput(f"input data rows must hold {shape[1]} element(s) each")
            flat.extend(row)
        return flat
    return data


def parse_infer(
    header: dict[str, Any], binary: bytes, modality: str, max_batch: int
) -> InferRequest:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidInput("inputs must hold exactly one tensor (BYTES: encoded images or texts)")
    tensor = inputs[0]
    if tensor.get("datatype") != "BYTES":
        raise InvalidInput(f"input {tensor.get('name')!r} must have datatype BYTES")
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 2
        or not all(type(d) is int and d >= 0 for d in shape)
        or (len(shape) == 2 and shape[1] != 1)
    ):
        raise InvalidInput("input shape must be [N] or [N, 1]")
    count = shape[0]
    if count == 0:
        raise InvalidInput("input holds no element: send at least one")
    if count > max_batch:
        raise PayloadTooLarge(f"batch of {count} inputs; the limit is {max_batch}")
    params = _parameters(tensor.get("parameters"), "inputs[0].parameters")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if type(size) is not int or size != len(binary):
            raise InvalidInput("binary_data_size does not match the binary section")
        elements: list[Any] = _deserialize_bytes(binary, count)
        if modality == "text":
            try:
                elements = [e.decode("utf-8") for e in elements]
            except UnicodeDecodeError:
                raise InvalidInput("texts must be UTF-8") from None
    else:
        if binary:
            raise InvalidInput(
                f"the body has {len(binary)} bytes of binary data after the JSON header, but "
                "the input declares no binary_data_size"
            )
        if "data" in tensor and tensor["data"] is not None:
            data = _flatten(tensor["data"], shape)
        else:
            raise InvalidInput("input has neither data nor binary_data_size")
        if not all(isinstance(x, str) for x in data):
            raise InvalidInput("input data must be a list of strings")
        if len(data) != count:
            raise InvalidInput(f"input data holds {len(data)} elements; shape says {count}")
        elements = data
        if modality == "image":
            elements = [decode_base64(x, f"inputs[0].data[{i}]") for i, x in enumerate(data)]
    request_params = _parameters(header.get("parameters"), "parameters")
    binary_default = _flag(request_params, "binary_data_output", False, "parameters")
    outputs = None
    if header.get("outputs") is not None:
        asked = header["outputs"]
        if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
            raise InvalidInput("outputs must be a list of objects")
        outputs = []
        for i, o in enumerate(asked):
            name = o.get("name")
            if not isinstance(name, str) or name not in OUTPUTS:
                raise InvalidInput(f"unknown output {name!r}; outputs: {', '.join(OUTPUTS)}")
            where = f"outputs[{i}].parameters"
            out_params = _parameters(o.get("parameters"), where)
            outputs.append((name, _flag(out_params, "binary_data", binary_default, where)))
    request_id = header.get("id")
    options = {k: request_params[k] for k in OPTION_KEYS if request_params.get(k) is not None}
    return InferRequest(
        request_id if isinstance(request_id, str) else None,
        elements,
        outputs,
        binary_default,
        options,
    )


def _tensors(predictions: Predictions) -> dict[str, np.ndarray]:
    a, classes = predictions.answer, predictions.classes
    top = a.probs.argmax(axis=1)
    rows = np.arange(len(top))
    return {
        "label": np.array([classes[c].encode() for c in top], dtype=object),
        "class_id": top.astype(np.int64),
        "probability": a.probs[rows, top].astype(np.float32),
        "margin": a.margins.astype(np.float32),
        "answered_by": _ANSWERED_BY[a.outcome]
        if a.stage is None
        else np.array([a.stage_names[c].encode() for c in a.stage.tolist()], dtype=object),
        "outcome": _OUTCOMES[a.outcome],
        "delegated": a.delegated.astype(bool),
        "degraded": a.degraded.astype(bool),
        "probabilities": a.probs.astype(np.float32),
    }


def encode_response(
    request: InferRequest, predictions: Predictions, model_version: str
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it."""
    tensors = _tensors(predictions)
    wanted = request.outputs or [(name, request.binary_default) for name in OUTPUTS]
    described, blobs = [], []
    for name, binary in wanted:
        datatype = OUTPUTS[name][0]
        array = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            if datatype == "BYTES":
                blob = b"".join(struct.pack("<I", len(x)) + x for x in array.ravel())
            else:
                blob = np.ascontiguousarray(array, dtype=_NUMPY[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [x.decode() for x in array.ravel()]
        else:
            entry["data"] = array.ravel().tolist()
        described.append(entry)
    head: dict[str, Any] = {
        "model_name": predictions.cascade,
        "model_version": model_version,
        "outputs": described,
    }
    if request.id is not None:
        head["id"] = request.id
    json_part = orjson.dumps(head)
    if not blobs:
        return json_part, None
    return json_part + b"".join(blobs), len(json_part)


def error_body(message: str) -> bytes:
    """Errors in the protocol's own shape, which tritonclient reads."""
    return orjson.dumps({"error": message})


def model_metadata(cascade: Cascade) -> dict[str, Any]:
    n = len(cascade.classes)
    return {
        "name": cascade.name,
        "versions": [cascade.versions["student"]],
        "platform": "cascade",
        "inputs": [
            {
                "name": cascade.modality,
                "datatype": "BYTES",
                "shape": [-1],
            }
        ],
        "outputs": [
            {
                "name": name,
                "datatype": datatype,
                "shape": [-1, *(n for _ in suffix)],
            }
            for name, (datatype, suffix) in OUTPUTS.items()
        ],
    }


router = APIRouter(
    prefix="/v2",
    tags=["open inference protocol"],
    responses=documented_errors(ProtocolError, {404: "no such model", 503: "not ready"}),
)


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


@router.get("")
async def server_metadata() -> Response:
    """Server metadata (name, version, protocol extensions)."""
    return _json({"name": "cascade-server", "version": __version__, "extensions": EXTENSIONS})


@router.get("/health/live")
async def server_live() -> Response:
    return _json({"live": True})


@router.get("/health/ready")
async def server_ready(request: Request) -> Response:
    """Ready when every student is loaded (a teacher outage answers degraded, not 503)."""
    gateway = gateway_of(request)
    ready = gateway is not None and all(c.student.ready for c in gateway.cascades.values())
    return _json({"ready": ready}, 200 if ready else 503)


@router.get("/models/{name}")
async def model_meta(request: Request, name: str) -> Response:
    """A cascade's inputs and outputs as OIP tensor metadata."""
    gateway = gateway_of(request)
    if gateway is None or name not in gateway.cascades:
        return Response(error_body(f"no model {name!r}"), 404, media_type="application/json")
    return _json(model_metadata(gateway.cascades[name]))


@router.get("/models/{name}/ready")
async def model_ready(request: Request, name: str) -> Response:
    gateway = gateway_of(request)
    if gateway is None or name not in gateway.cascades:
        return Response(error_body(f"no model {name!r}"), 404, media_type="application/json")
    ready = gateway.cascades[name].student.ready
    return _json({"name": name, "ready": ready}, 200 if ready else 503)
