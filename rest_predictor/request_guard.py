"""Reject malformed inference requests before the web framework or kserve can trip over them.

FastAPI parses v2 bodies with Python's ``json``, which accepts ``NaN``, ``Infinity`` and lone
UTF-16 surrogates (``"\\ud800"``); those values then break its 422 answer, kserve's response
encoder or the online-store key (HTTP 500). kserve turns a non-numeric
``Inference-Header-Content-Length`` and many malformed binary or CloudEvent bodies into 500s too.
Two small guards keep every such request a 400 with ``{"error": ...}``:

* ``StrictJsonMiddleware`` (pure ASGI, inference routes only): the header, when present, must
  be a byte count within the body, and the JSON part of the body must be strict RFC 8259 JSON in
  UTF-8 (checked with orjson, the parser kserve's v1 route already uses).
* ``GuardedDataPlane``: kserve's ``DataPlane`` whose ``decode`` reports any failure to decode the
  client's bytes as ``InvalidInput`` instead of letting it surface as a 500.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import orjson
from kserve.errors import InvalidInput
from kserve import InferRequest
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from kserve.protocol.dataplane import DataPlane

from rest_predictor.errors import one_line
from rest_predictor.metrics import is_inference_path

HEADER_LENGTH = b"inference-header-content-length"

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


def body_problem(body: bytes, header_length: bytes | None) -> str | None:
    """What is wrong with an inference request body, or ``None`` if its JSON part is sound."""
    json_part = body
    if header_length is not None:
        text = header_length.decode("latin-1").strip()
        if not (text.isascii() and text.isdigit()) or int(text) > len(body):
            return (
                f"Inference-Header-Content-Length must be a byte count between 0 and the body size "
                f"({len(body)}), got {text[:40]!r}"
            )
        json_part = body[: int(text)]
    try:
        orjson.loads(json_part)
    except orjson.JSONDecodeError as err:
        return f"request body is not valid JSON (UTF-8, no NaN/Infinity, no lone surrogates): {err}"
    return None


class StrictJsonMiddleware:
    """Answers 400 for an inference request whose JSON part or length header is malformed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not is_inference_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        header_length = next((value for name, value in scope["headers"] if name == HEADER_LENGTH), None)
        problem = body_problem(body, header_length)
        if problem is not None:
            payload = orjson.dumps({"error": one_line(problem)})
            await send({
                "type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            })
            await send({"type": "http.response.body", "body": payload})
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for disconnect as the app expects
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class GuardedDataPlane(DataPlane):
    """kserve's data plane; a request body it cannot decode is the client's 400, never a 500.

    A v2 body without ``Inference-Header-Content-Length`` is all JSON, as the protocol says,
    whatever its content type (``curl -d`` sends form encoding); kserve 0.21 refuses it.
    """

    def decode_inference_request(self, body, headers, model_name):  # noqa: ANN001, ANN201 - kserve's signature
        if isinstance(body, bytes) and INFERENCE_CONTENT_LENGTH_HEADER not in (headers or {}):
            return InferRequest.from_bytes(body, len(body), model_name)
        return super().decode_inference_request(body, headers, model_name)

    def decode(self, body, headers, *args: Any, **kwargs: Any):  # noqa: ANN001, ANN201 - kserve's signature
        try:
            return super().decode(body, headers, *args, **kwargs)
        except InvalidInput:
            raise
        except Exception as err:  # kserve's decoders raise KeyError, TypeError, ... for odd bodies
            raise InvalidInput(one_line(f"cannot decode the request: {type(err).__name__}: {err}")) from None
