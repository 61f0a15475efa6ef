"""Request parsing and response building for the v1 JSON and Open Inference Protocol v2 forms.

See ``rest_predictor.predictor`` for the wire formats. Parsing is strict: anything that is not
exactly one of the documented forms raises kserve's ``InvalidInput`` (HTTP 400) naming what was
wrong; a batch above the limit raises ``BatchTooLarge`` (HTTP 413).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from kserve import InferOutput, InferRequest, InferResponse
from kserve.errors import InvalidInput

from fraud_common import schemas
from rest_predictor.errors import BatchTooLarge, one_line
from rest_predictor.transactions import Transactions, format_us

USER_ID = "user_id"
USER_IDS = "user_ids"
REQUEST_ID = "request_id"  # v1 answers' request id (v2: the response's ``id``); rest_predictor.served_log sets it
V2_INPUT = "user_id"
MAX_USER_ID_LENGTH = 256


def _checked_user_id(value: Any, where: str) -> str:
    """``value`` if it is a usable user id, else an ``InvalidInput`` naming ``where`` and the value."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{where} is not valid UTF-8") from None
    if not isinstance(value, str):
        raise InvalidInput(f"{where} must be a string, got {type(value).__name__} {str(value)[:40]!r}")
    if not value.strip():
        raise InvalidInput(f"{where} must be a non-empty string")
    if len(value) > MAX_USER_ID_LENGTH:
        raise InvalidInput(f"{where} is longer than {MAX_USER_ID_LENGTH} characters")
    try:
        value.encode("utf-8")  # the online-store key is UTF-8: a lone surrogate has no encoding
    except UnicodeEncodeError:
        raise InvalidInput(f"{where} is not valid Unicode text (it holds a lone UTF-16 surrogate)") from None
    return value


def _checked_batch(values: list[Any], where: str, max_batch_size: int) -> list[str]:
    """A non-empty, not too large list of user ids."""
    if not values:
        raise InvalidInput(f"{where} is empty; send at least one user id")
    if len(values) > max_batch_size:
        raise BatchTooLarge(f"{where} holds {len(values)} user ids; at most {max_batch_size} per request")
    return [_checked_user_id(v, f"{where}[{i}]") for i, v in enumerate(values)]


def _decode_json(raw: bytes | str) -> Any:
    """The JSON value in a raw body; ``InvalidInput`` saying where the JSON is broken."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise InvalidInput(f"request body is not valid JSON: {err}") from None


def parse_v1(body: Any, max_batch_size: int) -> tuple[list[str], bool]:
    """User ids of a v1 request and whether it is the batch form (``user_ids``).

    kserve decodes JSON only for JSON content types; a body sent without one (``curl -d``)
    arrives as bytes and is decoded here.
    """
    if isinstance(body, (bytes, str)):
        body = _decode_json(body)
    if not isinstance(body, dict):
        raise InvalidInput(
            f'request body must be a JSON object like {{"{USER_ID}": "user_0"}} or '
            f'{{"{USER_IDS}": ["user_0", "user_1"]}}, got {type(body).__name__}'
        )
    has_one, has_many = USER_ID in body, USER_IDS in body
    if has_one and has_many:
        raise InvalidInput(f'send either "{USER_ID}" or "{USER_IDS}", not both')
    if has_one:
        return [_checked_user_id(body[USER_ID], f'"{USER_ID}"')], False
    if has_many:
        values = body[USER_IDS]
        if not isinstance(values, list):
            raise InvalidInput(f'"{USER_IDS}" must be a list of strings, got {type(values).__name__}')
        return _checked_batch(values, f'"{USER_IDS}"', max_batch_size), True
    keys = ", ".join(repr(k) for k in sorted(map(str, body))[:5]) or "none"
    raise InvalidInput(f'request body has no "{USER_ID}" (or "{USER_IDS}"); keys found: {keys}')


def parse_v2(request: InferRequest, max_batch_size: int) -> list[str]:
    """User ids of an Open Inference Protocol v2 request: one BYTES input named ``user_id``."""
    inputs = request.inputs or []
    if len(inputs) != 1 or inputs[0].name != V2_INPUT:
        found = [i.name for i in inputs]
        raise InvalidInput(f'v2 request must have exactly one input named "{V2_INPUT}", found {found}')
    return v2_user_ids(inputs[0], max_batch_size)


def v2_user_ids(tensor, max_batch_size: int) -> list[str]:  # noqa: ANN001 - kserve InferInput
    """The checked user ids of the v2 ``user_id`` input (BYTES)."""
    if tensor.datatype != "BYTES":
        raise InvalidInput(f'v2 input "{V2_INPUT}" must have datatype BYTES, got {tensor.datatype!r}')
    try:
        values = tensor.as_numpy().ravel().tolist()
    except Exception as err:  # shape/data mismatch surfaces as numpy or kserve errors
        raise InvalidInput(one_line(f'v2 input "{V2_INPUT}" data does not match its shape {tensor.shape}: {err}')) from None
    return _checked_batch(values, f'input "{V2_INPUT}"', max_batch_size)


def v1_response(
    user_ids: list[str], batch: bool, scores: np.ndarray, threshold: float, model_name: str, version: str
) -> dict[str, Any]:
    """The v1 answer; ``prediction`` is always the ``[n, 1]`` probability matrix."""
    prediction = scores.tolist()
    fraud = [row[0] >= threshold for row in prediction]
    if batch:
        head: dict[str, Any] = {USER_IDS: user_ids, "prediction": prediction, "fraud": fraud}
    else:
        head = {USER_ID: user_ids[0], "prediction": prediction, "fraud": fraud[0]}
    head["model_name"] = model_name
    head["model_version"] = version
    return head


def v1_transaction_response(
    txns: Transactions, history_rows: np.ndarray, scores: np.ndarray, threshold: float, model_name: str, version: str
) -> dict[str, Any]:
    """The v1 answer for transactions: as ``v1_response``, plus the time each was scored as of
    and (for one transaction) the history features it was scored with."""
    head = v1_response(txns.user_ids, txns.batch, scores, threshold, model_name, version)
    as_of = [format_us(int(t)) for t in txns.when_us]
    head["as_of"] = as_of if txns.batch else as_of[0]
    if not txns.batch:
        head["history"] = dict(zip(schemas.HISTORY_FEATURES, history_rows[0].tolist()))
    return head


def v2_response(
    request: InferRequest, scores: np.ndarray, threshold: float, model_name: str, version: str
) -> InferResponse:
    """The v2 answer: outputs ``prediction`` (FP32 ``[n, 1]``) and ``fraud`` (BOOL ``[n]``)."""
    flat = scores.ravel().tolist()
    outputs = [
        InferOutput(name="prediction", shape=[len(flat), 1], datatype="FP32", data=flat),
        InferOutput(name="fraud", shape=[len(flat)], datatype="BOOL", data=[p >= threshold for p in flat]),
    ]
    return InferResponse(
        response_id=request.id or "",
        model_name=model_name,
        model_version=version,
        infer_outputs=outputs,
    )
