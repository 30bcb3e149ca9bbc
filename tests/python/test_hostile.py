"""Hostile input against the live server (loopback only).

1. Property-based: schemathesis (pip) generates requests from the server's
   own OpenAPI document, valid and invalid, for every operation, bounded in
   examples per operation and in time: no response may be a 5xx or stray
   from the document (status code, content type, headers, body schema).
2. Hand-written: invalid UTF-8, deeply nested JSON, a 10 MB body, huge `n`
   and `max_tokens`, negative and NaN numbers, an unknown model, a chunked
   body cut off mid-chunk: each a 4xx in OpenAI's error shape.

The counts of the property-based run are written to $FUSECHAT_HOSTILE_OUT
when set (bench/results/hostile.json holds a committed run of
FUSECHAT_HOSTILE_SECONDS=300; CI runs 120 s)."""

import json
import os
import shutil
import socket
import subprocess
import xml.etree.ElementTree as ET

import httpx
import pytest

from conftest import SMOL, Server

CONFIG = f"""
[limits]
max_tokens = 8          # every generated case stays short
max_n = 2
max_body_bytes = 1048576

[auth]
admin_key = "hostile-admin-key"

[[models]]
id = "smollm2-135m-instruct"
path = "{SMOL}"
max_seqs = 4
max_waiting = 64
"""

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance"
MAX_EXAMPLES = 25
# Bounded for CI; bench/results/hostile.json is a run of 300 s.
MAX_SECONDS = int(os.environ.get("FUSECHAT_HOSTILE_SECONDS", "120"))


@pytest.fixture(scope="module")
def hostile():
    s = Server(CONFIG, "hostile")
    yield s
    s.stop()


@pytest.fixture()
def fuzzed():
    """A server of its own: with the admin key, schemathesis also unloads and
    renames models, which the hand-written cases must not inherit."""
    s = Server(CONFIG, "fuzzed")
    yield s
    s.stop()


def assert_openai_error(r: httpx.Response, status: int | None = None):
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text[:500])
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]


def test_schemathesis_finds_no_server_error_and_no_response_off_the_document(fuzzed, tmp_path):
    st = shutil.which("st") or shutil.which("schemathesis")
    if st is None:
        pytest.fail("schemathesis is missing: pip install -r tests/python/requirements.txt")
    junit = tmp_path / "junit.xml"
    out = subprocess.run(
        [st, "run", f"{fuzzed.base}/openapi.json", "--url", fuzzed.base,
         "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES), "--seed", "1", "--max-time", str(MAX_SECONDS),
         "--workers", "2", "--report", "junit", "--report-junit-path", str(junit),
         "--header", "Authorization: Bearer hostile-admin-key", "--no-color"],
        capture_output=True, text=True, timeout=MAX_SECONDS + 240, cwd=tmp_path,  # its .schemathesis/ cache
    )
    suites = ET.parse(junit).getroot()
    cases = sum(int(s.get("tests", 0)) for s in suites.iter("testsuite"))
    failures = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites.iter("testsuite"))
    summary = [line for line in out.stdout.splitlines() if "test cases" in line or "generated" in line.lower()]
    if os.environ.get("FUSECHAT_HOSTILE_OUT"):
        with open(os.environ["FUSECHAT_HOSTILE_OUT"], "w") as f:
            json.dump({"operations": cases, "failed_operations": failures, "checks": CHECKS.split(","),
                       "max_examples_per_operation": MAX_EXAMPLES, "max_seconds": MAX_SECONDS, "summary": summary,
                       "exit_code": out.returncode}, f, indent=2)
    assert cases > 0, out.stdout[-3000:]
    assert out.returncode == 0 and failures == 0, out.stdout[-8000:]
    assert fuzzed.alive()


def post(s: Server, content: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(s.base + "/v1/chat/completions", content=content,
                      headers={"Content-Type": "application/json", **(headers or {})}, timeout=60)


def chat(**fields) -> dict:
    return {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            **fields}


def test_invalid_utf8(hostile):
    assert_openai_error(post(hostile, b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "\xff\xfe"}]}'), 400)


def test_deeply_nested_json(hostile):
    nested = b'{"model": "smollm2-135m-instruct", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_openai_error(post(hostile, nested), 400)
    assert hostile.alive()


def test_a_ten_megabyte_body(hostile):
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * (10 * 1024 * 1024)}])).encode()
    try:
        r = post(hostile, big)
    except httpx.TransportError:
        pytest.fail("the connection was dropped instead of answered 413")
    assert_openai_error(r, 413)


@pytest.mark.parametrize("field,value", [
    ("n", 10**9), ("n", -1), ("max_tokens", 10**12), ("max_tokens", -5),
    ("temperature", -1.0), ("top_p", -0.5), ("top_p", 1e308), ("presence_penalty", -1e308),
])
def test_out_of_range_numbers(hostile, field, value):
    r = post(hostile, json.dumps(chat(**{field: value})).encode())
    assert_openai_error(r, 400)
    assert r.json()["error"]["param"] == field


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_nan_and_infinite_numbers(hostile, literal):
    body = b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "temperature": ' + literal + b"}"
    assert_openai_error(post(hostile, body), 400)


def test_an_unknown_model(hostile):
    r = post(hostile, json.dumps(chat(model="no-such-model")).encode())
    assert_openai_error(r, 404)
    assert r.json()["error"]["code"] == "model_not_found"


def test_a_chunked_body_cut_off_mid_chunk(hostile):
    host, port = "127.0.0.1", hostile.port
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"40\r\n{\"model\": \"smollm2-135m-instruct\", \"mess"
        )
        sock.shutdown(socket.SHUT_WR)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    # Either a 4xx in OpenAI's shape, or (when the server sees the
    # connection end before it can answer) no response at all; never a 5xx.
    if response:
        head, _, body = response.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        assert 400 <= status < 500, response[:500]
        if b"content-length" in head.lower() and body:
            assert "error" in json.loads(body)
    assert hostile.alive()
    # And the server still answers.
    r = httpx.post(hostile.base + "/v1/chat/completions", json=chat(), timeout=60)
    assert r.status_code == 200, r.text
