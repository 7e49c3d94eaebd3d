"""Fuzzed OpenAI JSON bodies get 2xx or 4xx with an OpenAI-style error, never 5xx."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.http.support import API_KEY, HttpCluster

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=50)
)
json_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=10,
)
fields = {
    "model": st.sampled_from(["tiny-chat", "", "nope"]) | json_values,
    "prompt": st.text(max_size=200)
    | st.lists(st.text(max_size=20), max_size=3)
    | st.lists(st.integers(-5, 600), max_size=20)
    | json_values,
    "messages": st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "system", "assistant", "x"]) | json_values,
                "content": st.text(max_size=100) | json_values,
            }
        ),
        max_size=3,
    )
    | json_values,
    "max_tokens": st.integers(-10, 10**12) | json_values,
    "max_completion_tokens": st.integers(-10, 300) | json_values,
    "temperature": st.floats(allow_nan=False, allow_infinity=False, min_value=-5, max_value=300)
    | json_values,
    "top_p": st.floats(allow_nan=False, min_value=-1, max_value=2) | json_values,
    "n": st.integers(-2, 4) | json_values,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=5) | json_values,
    "stream": st.booleans() | json_values,
    "seed": st.integers(-(2**65), 2**65) | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
}


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    if draw(st.integers(0, 15)) == 0:
        return path, draw(st.binary(max_size=100))  # not JSON at all
    keys = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=len(fields)))
    body: dict[str, Any] = {k: draw(fields[k]) for k in keys}
    if draw(st.booleans()):
        body["model"] = "tiny-chat"
    if "max_tokens" in body and isinstance(body["max_tokens"], int) and body["max_tokens"] > 8:
        body["max_tokens"] = 8  # keep valid requests short
    return path, json.dumps(body).encode()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=bodies())
def test_fuzzed_bodies_never_5xx(http_cluster: HttpCluster, case: tuple[str, bytes]) -> None:
    path, body = case
    req = urllib.request.Request(
        http_cluster.base_url + path,
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    assert status in (200, 400, 404, 413, 422, 429), (status, raw[:300], body[:300])
    if status >= 400:
        err = json.loads(raw)["error"]
        assert err["message"] and err["type"]


def test_healthy_after_http_fuzzing(http_cluster: HttpCluster) -> None:
    http_cluster.wait_no_leaks(timeout_s=10)
    req = urllib.request.Request(
        http_cluster.base_url + "/v1/completions",
        data=json.dumps(
            {"model": "tiny-chat", "prompt": "t5 t6", "max_tokens": 3, "temperature": 0}
        ).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        assert json.loads(resp.read())["usage"]["completion_tokens"] == 3
