"""The OpenAPI document: FastAPI's, plus the prediction endpoints served as plain ASGI
(predict.py), described from the same pydantic models that validate requests."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from .schemas import BatchPrediction, ErrorResponse, Prediction, PredictRequest

_REF = "#/components/schemas/{model}"
_ERRORS = {
    "400": "malformed body (not JSON, broken multipart, bad encoding)",
    "404": "no such cascade",
    "413": "body, batch, image or text over its limit",
    "415": "content type not accepted",
    "422": "invalid input: the message names it",
    "500": "unexpected error (logged; the message leaks nothing)",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _add_models(schemas: dict[str, Any], *models: type[BaseModel]) -> None:
    for model in models:
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema


def _errors(with_error_model: bool = True) -> dict[str, Any]:
    content = {"application/json": {"schema": _ref("ErrorResponse")}} if with_error_model else {}
    return {code: {"description": text, "content": content} for code, text in _ERRORS.items()}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def predict_path() -> dict[str, Any]:
    return {
        "post": {
            "tags": ["predict"],
            "summary": "Classify one input or a batch",
            "description": "JSON (base64 images or texts), multipart upload (`file` fields, one "
            "or more), a raw image body, or a text/plain body (UTF-8). Easy inputs are answered "
            "by the student, hard ones by the teacher.",
            "operationId": "predict",
            "parameters": [
                _query("cascade", {"type": "string"}, "which cascade; optional if one fits"),
                _query("top_k", {"type": "integer", "minimum": 1}, "classes in `top_k`"),
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": _ref("PredictRequest")},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "file": {
                                    "type": "array",
                                    "items": {"type": "string", "format": "binary"},
                                },
                                "cascade": {"type": "string"},
                                "top_k": {"type": "integer", "minimum": 1},
                            },
                            "required": ["file"],
                        }
                    },
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                    "text/plain": {"schema": {"type": "string"}},
                },
            },
            "responses": {
                "200": {
                    "description": "One Prediction, or `outputs` for a batch, in order",
                    "content": {
                        "application/json": {
                            "schema": {"oneOf": [_ref("Prediction"), _ref("BatchPrediction")]}
                        }
                    },
                },
                **_errors(),
            },
        }
    }


def infer_path() -> dict[str, Any]:
    tensor = {"type": "object", "additionalProperties": True}
    return {
        "post": {
            "tags": ["open inference protocol"],
            "summary": "KServe v2 / Open Inference Protocol inference on a cascade",
            "description": "One BYTES input (base64 images or UTF-8 texts in JSON; raw bytes "
            "with the binary tensor extension and `Inference-Header-Content-Length`). Outputs: "
            "label, class_id, probability, margin, answered_by, delegated, degraded, "
            'probabilities. Errors are `{"error": message}`.',
            "operationId": "infer",
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": tensor},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "responses": {
                "200": {
                    "description": "the output tensors (JSON, or JSON + binary sections)",
                    "content": {
                        "application/json": {"schema": tensor},
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        },
                    },
                },
                **_errors(with_error_model=False),
            },
        }
    }


def install_openapi(api: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if api.openapi_schema:
            return api.openapi_schema
        schema = get_openapi(
            title=api.title, version=api.version, description=api.description, routes=api.routes
        )
        components = schema.setdefault("components", {})
        _add_models(
            components.setdefault("schemas", {}),
            PredictRequest,
            Prediction,
            BatchPrediction,
            ErrorResponse,
        )
        components.setdefault("securitySchemes", {})["bearer"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "CASCADE_ADMIN_TOKEN, for /admin",
        }
        for path, ops in schema["paths"].items():
            if path.startswith("/admin"):
                for op in ops.values():
                    op["security"] = [{"bearer": []}]
        schema["paths"]["/predict"] = predict_path()
        schema["paths"]["/v2/models/{name}/infer"] = infer_path()
        api.openapi_schema = schema
        return schema

    api.openapi = openapi  # type: ignore[method-assign]
