"""Raw HTTP against the running server with curl: malformed input, limits,
operations endpoints. Whatever is sent, the answer is a 4xx in OpenAI's
error shape and the server keeps serving."""

import json
import subprocess
from pathlib import Path

import httpx

from conftest import metric, scrape

REPO = Path(__file__).resolve().parents[2]


def curl(url, *args, data=None):
    cmd = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", url, *args]
    if data is not None:
        cmd += ["--data-binary", "@-"]
    out = subprocess.run(cmd, input=data, capture_output=True, check=True).stdout
    body, _, code = out.rpartition(b"\n")
    return int(code), body


def post(server, body: bytes, path="/v1/chat/completions", headers=()):
    args = ["-H", "Content-Type: application/json"]
    for h in headers:
        args += ["-H", h]
    return curl(server.base + path, *args, data=body)


def assert_openai_error(body, status, code):
    assert 400 <= status < 500, (status, body)
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    assert code is None or err["code"] == code, err


def test_garbage_bodies_get_4xx_and_the_server_survives(server):
    cases = [
        b"{not json",
        b"",
        b"[]",
        b'{"model": "smollm2-135m-instruct"}',
        b'{"model": 5, "messages": []}',
        b'{"model": "smollm2-135m-instruct", "messages": "hi"}',
        b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": 7}]}',
        b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "n": -1}',
        b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}',
        b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "stop": [""]}',
    ]
    for body in cases:
        status, answer = post(server, body)
        assert status == 400, (body, status, answer)
        assert_openai_error(answer, status, None)
    assert server.alive()
    status, _ = post(server, b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}')
    assert status == 200


def test_body_over_the_limit_is_413(guarded):
    big = json.dumps({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "x" * 10000}]}).encode()
    status, body = post(guarded, big, headers=["Authorization: Bearer sk-test-key"])
    assert status == 413
    assert_openai_error(body, status, "payload_too_large")


def test_unknown_route_and_wrong_method(server):
    status, body = curl(server.base + "/v1/engines")
    assert status == 404
    assert_openai_error(body, status, "unknown_url")
    status, body = curl(server.base + "/v1/chat/completions")
    assert status == 405
    assert_openai_error(body, status, "method_not_allowed")


def test_models_health_ready(server):
    models = httpx.get(server.base + "/v1/models").json()
    assert models["object"] == "list"
    ids = {m["id"] for m in models["data"]}
    assert ids == {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"}
    assert all(m["status"] == "ready" and m["max_model_len"] > 1000 for m in models["data"])
    assert httpx.get(server.base + "/health").status_code == 200
    assert httpx.get(server.base + "/ready").status_code == 200


def test_metrics_have_model_labels_after_traffic(server):
    post(server, b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": true}')
    samples = scrape(server.base)
    smol = "smollm2-135m-instruct"
    for name, labels in [
        ("fusechat_time_to_first_token_seconds_count", dict(model=smol)),
        ("fusechat_inter_token_latency_seconds_count", dict(model=smol)),
        ("fusechat_e2e_request_latency_seconds_count", dict(model=smol)),
        ("fusechat_request_queue_time_seconds_count", dict(model=smol)),
        ("fusechat_num_requests_running", dict(model=smol)),
        ("fusechat_num_requests_waiting", dict(model="qwen2.5-coder-0.5b-instruct")),
        ("fusechat_prompt_tokens_total", dict(model=smol)),
        ("fusechat_generation_tokens_total", dict(model=smol)),
        ("fusechat_http_requests_total", dict(method="POST", route="/v1/chat/completions", status="200")),
        ("fusechat_http_requests_total", dict(method="POST", route="/v1/chat/completions", status="400")),
    ]:
        assert metric(samples, name, **labels) is not None, (name, labels)
    assert metric(samples, "fusechat_generation_tokens_total", model=smol) > 0
    assert any(name == "fusechat_request_success_total" and dict(labels).get("finish_reason")
               for name, labels in samples), "no fusechat_request_success_total{finish_reason=...}"


def test_served_openapi_equals_the_checked_in_document(server):
    served = httpx.get(server.base + "/openapi.json")
    assert served.status_code == 200
    assert served.text == (REPO / "openapi" / "openapi.json").read_text()
    doc = served.json()
    assert "/v1/chat/completions" in doc["paths"]
    assert "ChatCompletionRequest" in doc["components"]["schemas"]
