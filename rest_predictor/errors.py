"""Request errors as ``kserve.errors`` types, and the few HTTP answers kserve has no handler for.

kserve's REST server maps ``InvalidInput`` to 400 and ``ModelNotFound`` to 404, each with body
``{"error": str(exc)}``; the predictor raises those (``InvalidInput`` directly, ``UnknownUser`` as a
``ModelNotFound`` that names the users). kserve 0.21 has no 413 type, so ``BatchTooLarge`` is an
``InvalidInput`` (a 400 wherever our handler is not installed) that ``batch_too_large_handler``
answers with 413. ``validation_error_handler`` replaces FastAPI's 422, which echoes the request
back and fails (500) when it holds a lone surrogate or ``NaN``; ``http_error_handler`` gives the
framework's own 4xx answers (unknown route, unparsable body) the same ``{"error": ...}`` body.
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve.errors import InferenceError, InvalidInput, ModelNotFound
from starlette.exceptions import HTTPException


def one_line(text: str, limit: int = 300) -> str:
    """``text`` safe for a JSON answer and a log line: no raw surrogates, no newlines, bounded."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class UnknownUser(ModelNotFound):
    """Users with no features in the online store: HTTP 404 through kserve's handler."""

    def __init__(self, user_ids: list[str]) -> None:
        super().__init__()
        shown = ", ".join(repr(u) for u in user_ids[:5]) + (" ..." if len(user_ids) > 5 else "")
        self.reason = one_line(f"no features in the online store for user(s): {shown}")
        self.user_ids = user_ids


class BatchTooLarge(InvalidInput):
    """More user ids in one request than ``settings.max_batch_size``: HTTP 413."""


class FeatureDataError(InferenceError):
    """The online store holds a value the model cannot take (null or not a number): HTTP 500."""


class PredictorLoadError(RuntimeError):
    """The predictor cannot become ready: model, registry or feature store unusable."""


async def batch_too_large_handler(_: Request, exc: Exception) -> JSONResponse:
    """413 with the error's message."""
    return JSONResponse(status_code=413, content={"error": one_line(str(exc))})


async def validation_error_handler(_: Request, exc: Exception) -> JSONResponse:
    """400 naming the first fields that do not fit the schema, without echoing their values."""
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors()[:3]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return JSONResponse(status_code=400, content={"error": one_line("request does not fit the schema: " + "; ".join(problems))})


async def http_error_handler(_: Request, exc: Exception) -> JSONResponse:
    """The framework's HTTP errors with ``{"error": detail}`` instead of ``{"detail": ...}``."""
    assert isinstance(exc, HTTPException)
    return JSONResponse(status_code=exc.status_code, content={"error": one_line(str(exc.detail))}, headers=exc.headers)


class ClientErrorLogFilter(logging.Filter):
    """Turns kserve's per-request traceback for a client error (400/404) into one DEBUG line.

    kserve's handlers log every ``InvalidInput``/``ModelNotFound`` at ERROR with a traceback; a
    bad request is the client's mistake, counted in the metrics, not a server fault.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, (InvalidInput, ModelNotFound)):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.msg, record.args, record.exc_info, record.exc_text = f"rejected request: {one_line(str(exc))}", (), None, None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True
