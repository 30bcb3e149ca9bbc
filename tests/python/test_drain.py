"""Graceful shutdown, as Kubernetes stops a pod: SIGTERM while streams are
running. Each running stream completes with its whole answer (the same
text as before the signal), `/ready` turns 503 at once while `/health`
stays 200, a new request gets 503 with Retry-After, and the process exits
0 within the grace period."""

import signal
import threading
import time

import httpx
from openai import OpenAI

from conftest import SMOL, Server

GRACE = 25
PROMPTS = [
    "List the first twenty prime numbers, one per line, each with a short remark.",
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain, step by step and at length, how a bicycle gear system works.",
]


def request(prompt: str) -> dict:
    return dict(model="smol", temperature=0, max_tokens=160,
                messages=[{"role": "user", "content": prompt}])


def test_sigterm_lets_running_streams_finish_and_refuses_new_work():
    s = Server(f'[listen]\nshutdown_grace_s = {GRACE}\n\n[[models]]\nid = "smol"\npath = "{SMOL}"\nmax_seqs = 4\n',
               "drain")
    try:
        client = OpenAI(base_url=s.base + "/v1", api_key="none", max_retries=0)
        lone = []
        for p in PROMPTS:
            c = client.chat.completions.create(**request(p)).choices[0]
            lone.append((c.message.content, c.finish_reason))

        results = [None] * len(PROMPTS)
        first_token = [threading.Event() for _ in PROMPTS]

        def stream(i):
            text, finish = "", None
            for chunk in client.chat.completions.create(stream=True, **request(PROMPTS[i])):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
                    first_token[i].set()
            results[i] = (text, finish)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for e in first_token:
            assert e.wait(60), "a stream never started"

        signalled = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        while True:
            ready = httpx.get(s.base + "/ready", timeout=5)
            if ready.status_code == 503:
                break
            assert time.monotonic() - signalled < 1.0, "/ready still 200 a second after SIGTERM"
            time.sleep(0.02)
        assert ready.json()["status"] == "shutting down"
        assert httpx.get(s.base + "/health", timeout=5).status_code == 200
        assert all(t.is_alive() for t in threads), "the streams ended before the checks: make them longer"

        refused = httpx.post(s.base + "/v1/chat/completions", json=request(PROMPTS[0]), timeout=10)
        assert refused.status_code == 503
        assert refused.headers.get("retry-after") == "1"
        assert refused.json()["error"]["code"] == "server_shutting_down"

        for t in threads:
            t.join(GRACE)
        assert s.proc.wait(timeout=GRACE + 5) == 0, s.tail()
        assert time.monotonic() - signalled < GRACE, "the drain took the whole grace period"
        for got, want in zip(results, lone):
            assert got == want, (got, want)
        assert "every request finished" in s.tail()
    finally:
        s.stop()
