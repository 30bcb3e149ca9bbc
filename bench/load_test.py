"""Sustained overload: `fusechat serve` on loopback with SmolLM2, fed an
open-loop stream of requests at a steady rate above what it can answer, for
a fixed time. Half the requests stream; every few seconds one streaming
client hangs up mid-answer. Measured: status counts (no 5xx allowed), every
429 carrying Retry-After, the server's RSS every 10 s (flat after the first
minute?), and the running/waiting gauges after the load (back to 0?).

Usage: python bench/load_test.py [--minutes 10] [--rate 6] [--out bench/results/load]
Environment: FUSECHAT_BIN, FUSECHAT_HOME (as scripts/env.sh sets them)."""

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

HOME = Path(os.environ.get("FUSECHAT_HOME", Path.home() / ".cache" / "fusechat"))
BIN = Path(os.environ.get("FUSECHAT_BIN", Path.home() / ".cache" / "fusechat-target" / "release" / "fusechat"))
SMOL = HOME / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "Write a haiku about the sea.", "What is 17 times 23?", "Name three uses of copper.",
    "Explain what a hash table is.", "Give me a short recipe for pancakes.", "Why is the sky blue?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gauges(base: str) -> dict:
    out = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith(("fusechat_num_requests_running", "fusechat_num_requests_waiting")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def one(client: httpx.AsyncClient, i: int, stats: dict, hang_up: bool):
    body = {"model": "smol", "max_tokens": 64, "temperature": 0.7,
            "messages": [{"role": "user", "content": random.choice(PROMPTS)}]}
    stream = hang_up or i % 2 == 0
    try:
        if stream:
            body["stream"] = True
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                stats["status"][r.status_code] += 1
                if r.status_code == 429:
                    stats["429_with_retry_after"] += "retry-after" in r.headers
                if r.status_code != 200:
                    await r.aread()
                    return
                pieces = 0
                async for _ in r.aiter_lines():
                    pieces += 1
                    if hang_up and pieces == 5:
                        stats["hung_up"] += 1
                        return  # leaving the block closes the connection mid-stream
        else:
            r = await client.post("/v1/chat/completions", json=body)
            stats["status"][r.status_code] += 1
            if r.status_code == 429:
                stats["429_with_retry_after"] += "retry-after" in r.headers
    except httpx.HTTPError as e:
        stats["transport_errors"][type(e).__name__] += 1


async def drive(base: str, pid: int, minutes: float, rate: float, hang_up_every_s: float) -> dict:
    stats = {"status": Counter(), "429_with_retry_after": 0, "hung_up": 0, "transport_errors": Counter(),
             "rss_mb": []}
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
        start = time.monotonic()
        end = start + minutes * 60
        tasks, i, next_hang_up, next_rss = [], 0, start + hang_up_every_s, start
        while (now := time.monotonic()) < end:
            if now >= next_rss:
                stats["rss_mb"].append((round(now - start), round(rss_mb(pid), 1)))
                next_rss += 10
            hang_up = now >= next_hang_up
            if hang_up:
                next_hang_up += hang_up_every_s
            tasks.append(asyncio.create_task(one(client, i, stats, hang_up)))
            i += 1
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        stats["sent"] = i
        await asyncio.gather(*tasks)
        stats["rss_mb"].append((round(time.monotonic() - start), round(rss_mb(pid), 1)))
    return stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rate", type=float, default=6.0, help="requests per second sent, open loop")
    ap.add_argument("--hang-up-every", type=float, default=5.0, help="seconds between clients hanging up mid-stream")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "load"))
    args = ap.parse_args()

    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="fusechat-load-"))
    (work / "serve.toml").write_text(
        f'[[models]]\nid = "smol"\npath = "{SMOL}"\nmax_seqs = 16\nmax_waiting = 32\n')
    log = open(work / "server.log", "w")
    proc = subprocess.Popen([str(BIN), "serve", "--config", str(work / "serve.toml"), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(base + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, "server did not start"
            time.sleep(0.5)
        stats = asyncio.run(drive(base, proc.pid, args.minutes, args.rate, args.hang_up_every))
        time.sleep(2)
        after = gauges(base)
    finally:
        proc.terminate()
        code = proc.wait(timeout=60)
        log.close()

    status = {str(k): v for k, v in sorted(stats["status"].items())}
    five_xx = sum(v for k, v in stats["status"].items() if k >= 500)
    rss = stats["rss_mb"]
    after_first_minute = [m for t, m in rss if t >= 60]
    result = {
        "minutes": args.minutes, "rate_per_s": args.rate, "sent": stats["sent"], "status": status,
        "5xx": five_xx, "429": stats["status"].get(429, 0), "429_with_retry_after": stats["429_with_retry_after"],
        "hung_up_mid_stream": stats["hung_up"], "transport_errors": dict(stats["transport_errors"]),
        "gauges_after": after, "server_exit_code": code, "rss_mb": rss,
        "rss_after_first_minute_mb": {"min": min(after_first_minute, default=None),
                                      "max": max(after_first_minute, default=None)},
    }
    result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                      cwd=Path(__file__).parent).stdout.strip()
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Sustained overload (bench/load_test.py)", "",
        f"`fusechat serve` with SmolLM2-135M (Q4_1 GGUF, max_seqs 16, max_waiting 32) on 127.0.0.1, "
        f"{args.minutes:g} minutes at {args.rate:g} requests/s sent open-loop (max_tokens 64, half streaming), "
        f"one streaming client hanging up after 5 pieces every {args.hang_up_every:g} s. "
        f"Commit {result['commit']}, {result['date']}, 2 cores.", "",
        f"- sent {stats['sent']}; statuses {status}; **5xx: {five_xx}**",
        f"- 429: {result['429']}, with Retry-After: {result['429_with_retry_after']}",
        f"- hung up mid-stream: {stats['hung_up']}; client transport errors: {dict(stats['transport_errors']) or 0}",
        f"- gauges 2 s after the load: {after}",
        f"- RSS after the first minute: {result['rss_after_first_minute_mb']['min']} - "
        f"{result['rss_after_first_minute_mb']['max']} MB; server exit code after SIGTERM: {code}", "",
        "| seconds | RSS MB |", "| ---: | ---: |", *[f"| {t} | {m} |" for t, m in rss], "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines[:10]))


if __name__ == "__main__":
    main()
