"""Request errors and the HTTP answers they become.

Each error names what was wrong; the handler turns it into ``{"error": message}`` with the
error's status, so a bad request never becomes a 500 and never stops the server.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse


class RequestError(Exception):
    """A request the predictor cannot answer; ``status`` is the HTTP status to send."""

    status: int = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(RequestError):
    """Missing or malformed ``user_id``/``user_ids``, wrong types: HTTP 400."""

    status = 400


class UnknownUser(RequestError):
    """A user with no features in the online store: HTTP 404."""

    status = 404

    def __init__(self, user_ids: list[str]) -> None:
        shown = ", ".join(repr(u) for u in user_ids[:5]) + (" ..." if len(user_ids) > 5 else "")
        super().__init__(f"no features in the online store for user(s): {shown}")
        self.user_ids = user_ids


class BatchTooLarge(RequestError):
    """More user ids in one request than ``settings.max_batch_size``: HTTP 413."""

    status = 413


class PredictorLoadError(RuntimeError):
    """The predictor cannot become ready: model, registry or feature store unusable."""


async def request_error_handler(_: Request, exc: Exception) -> JSONResponse:
    """FastAPI exception handler: the error's status and message, no traceback in the log."""
    assert isinstance(exc, RequestError)
    return JSONResponse(status_code=exc.status, content={"error": exc.message})
