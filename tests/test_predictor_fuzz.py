"""Property-based requests against the real predictor: no bad request may get a 5xx answer.

Hypothesis generates request bodies and headers for the v1 predict and v2 infer routes, from
near-valid requests (known and unknown users, wrong types, odd shapes) to hostile ones (lone
UTF-16 surrogates, ``NaN``/``Infinity``, invalid UTF-8, truncated JSON, the binary tensor
extension with a wrong ``Inference-Header-Content-Length``, CloudEvent headers). Every answer
must be below 500, every 4xx must carry a one-line ``{"error": ...}``, the server must still be
alive and scoring afterwards, and its log (at INFO) must hold no traceback. ``FRAUD_FUZZ_EXAMPLES`` sets the number of requests (default
3000, derandomized so CI runs the same requests every time).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fraud_common import schemas
from helpers import ServingState, build_serving_state
from test_predictor import V1, V2, running_predictor

N_USERS = 20
MAX_BATCH = 8
EXAMPLES = int(os.environ.get("FRAUD_FUZZ_EXAMPLES", "3000"))

KNOWN_USERS = [schemas.user_id(i) for i in range(N_USERS)]
SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff", "user_\ud83d"]
CONTENT_TYPES = [
    None, "application/json", "application/json; charset=utf-8", "application/cloudevents+json",
    "application/problem+json", "application/octet-stream", "text/plain", "application/x-www-form-urlencoded",
]
DATATYPES = ["BYTES", "FP32", "FP16", "INT64", "BOOL", "UINT8", "bytes", ""]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, Path]]:
    """A predictor of its own (a tiny store and model), so a crash here cannot hide behind another test."""
    state: ServingState = build_serving_state(tmp_path_factory.mktemp("fuzz") / "home", N_USERS)
    env = {"FRAUD_MAX_BATCH_SIZE": str(MAX_BATCH), "FRAUD_LOG_LEVEL": "INFO"}
    log_dir = tmp_path_factory.mktemp("fuzz-log")
    with running_predictor(state, log_dir, env) as (url, proc):
        yield url, proc, log_dir / "predictor.log"


# ------------------------------------------------------------------ strategies
texts = st.one_of(
    st.sampled_from(KNOWN_USERS),
    st.sampled_from(SURROGATES),
    st.text(max_size=8),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=()), max_size=6),
    st.text(alphabet=st.characters(categories=["Cs", "Cc", "Zs"]), max_size=4),
    st.just("x" * 300),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), texts,
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=10
)

# Near-valid requests first (one_of draws its branches evenly): most reach parsing, the store and ONNX.
v1_bodies = st.one_of(
    st.fixed_dictionaries({"user_id": texts}),
    st.fixed_dictionaries({"user_ids": st.lists(st.sampled_from(KNOWN_USERS), min_size=1, max_size=MAX_BATCH + 1)}),
    st.fixed_dictionaries({"user_id": st.one_of(texts, json_values)}),
    st.fixed_dictionaries({"user_ids": st.one_of(st.lists(texts, max_size=MAX_BATCH + 2), json_values)}),
    st.fixed_dictionaries({"user_id": texts, "user_ids": st.lists(texts, max_size=2)}),
    json_values,
)
tensors = st.fixed_dictionaries(
    {
        "name": st.one_of(st.just("user_id"), texts),
        "datatype": st.one_of(st.sampled_from(DATATYPES), json_values),
        "shape": st.one_of(st.lists(st.integers(-2, MAX_BATCH + 2), max_size=3), json_values),
        "data": st.one_of(st.lists(texts, max_size=MAX_BATCH + 2), json_values),
    },
    optional={"parameters": st.one_of(st.dictionaries(texts, json_values, max_size=2), json_values)},
)
v2_valid_tensors = st.lists(st.sampled_from(KNOWN_USERS + SURROGATES), min_size=1, max_size=MAX_BATCH + 1).map(
    lambda ids: {"name": "user_id", "datatype": "BYTES", "shape": [len(ids)], "data": ids}
)
v2_bodies = st.one_of(
    st.fixed_dictionaries({"inputs": st.lists(v2_valid_tensors, min_size=1, max_size=1)}, optional={"id": texts}),
    st.fixed_dictionaries(
        {"inputs": st.one_of(st.lists(tensors, max_size=2), json_values)},
        optional={
            "id": st.one_of(texts, json_values),
            "parameters": json_values,
            "outputs": st.one_of(st.lists(st.fixed_dictionaries({"name": texts}), max_size=2), json_values),
        },
    ),
    json_values,
)


def encode(value: Any, ascii_only: bool) -> bytes:
    """JSON text as a careless client writes it: NaN allowed, surrogates escaped or raw (invalid UTF-8)."""
    text = json.dumps(value, allow_nan=True, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def requests_to_send(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str | bytes]]:
    """(route, body bytes, headers) for one request."""
    route = draw(st.sampled_from([V1, V2]))
    value = draw(v1_bodies if route == V1 else v2_bodies)
    body = encode(value, draw(st.booleans()))
    shape = draw(st.sampled_from(["json"] * 6 + ["truncated", "junk", "binary"]))
    headers: dict[str, str | bytes] = {}
    if shape == "truncated":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif shape == "junk":
        body = draw(st.binary(max_size=48))
    elif shape == "binary":  # the v2 binary tensor extension: JSON header, raw bytes after it
        length = draw(
            st.one_of(
                st.just(str(len(body))),
                st.integers(-3, len(body) + 8).map(str),
                st.sampled_from(["abc", "", "12 ", "+12", "1e3", "0x10", "99999999999999999999", "٣"]),
            )
        )
        headers["inference-header-content-length"] = length.encode("utf-8")
        body += draw(st.binary(max_size=24))
    content_type = draw(st.sampled_from(["application/json"] * 4 + CONTENT_TYPES))
    if content_type is not None:
        headers["content-type"] = content_type
    if draw(st.integers(0, 9)) == 0:  # a binary-mode CloudEvent
        headers.update({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "fuzz", "ce-type": "test"})
    return route, body, headers


# ------------------------------------------------------------------ the property
@pytest.mark.slow
def test_no_request_gets_a_5xx_and_the_server_survives(fuzz_server: tuple[str, Any, Path]) -> None:
    url, proc, log_path = fuzz_server
    session = requests.Session()
    seen: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(requests_to_send())
    def answers_without_5xx(request: tuple[str, bytes, dict[str, str | bytes]]) -> None:
        route, body, headers = request
        response = session.post(url + route, data=body, headers=headers, timeout=10)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, f"{response.status_code} for {route} {headers} {body!r}: {response.text[:300]}"
        if response.status_code >= 400:
            error = response.json().get("error")
            assert isinstance(error, str) and error and "\n" not in error, f"{response.status_code}: {response.text[:300]}"

    answers_without_5xx()
    assert proc.poll() is None, "the predictor process died"
    assert sum(seen.values()) >= EXAMPLES
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0 and seen.get(404, 0) > 0, seen  # the generator reaches every outcome
    assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    scored = requests.post(url + V1, json={"user_id": KNOWN_USERS[0]}, timeout=10)
    assert scored.status_code == 200 and scored.json()["user_id"] == KNOWN_USERS[0]
    # A bad request is the client's mistake: no traceback in the server's log for any of them.
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-3000:]
