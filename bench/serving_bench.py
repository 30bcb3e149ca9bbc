#!/usr/bin/env python3
"""Serving benchmark for any OpenAI-compatible chat completions endpoint.

Sends streaming chat completions (``stream: true`` with
``stream_options: {"include_usage": true}``) at one or more concurrency levels
and measures, per level:

* aggregate throughput: generated tokens of all requests / wall time of the level
* per-request decode speed: (tokens - 1) / (t_last_token - t_first_token)
* time to first token (TTFT) p50 / p95, end-to-end latency p50

Only loopback targets (127.0.0.0/8, ::1, localhost) are accepted.  Every level
is bounded in request count and in time, and each request has a timeout.

Subcommands:
  run     benchmark one endpoint, write JSON (and optionally markdown)
  report  merge JSON results of several runs into one JSON + markdown table

Requires httpx (``pip install httpx``).  Python >= 3.11.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import ipaddress
import json
import math
import os
import socket
import sys
import time
import urllib.parse
from dataclasses import asdict, dataclass, field

SYSTEM_PROMPT = "You are a helpful, concise assistant."

# A small fixed set of realistic chat prompts (short to medium length).
PROMPTS: list[str] = [
    "Explain the difference between a process and a thread in a few paragraphs.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of inflation, and how do central banks respond to it?",
    "Give me a step-by-step recipe for a simple tomato pasta sauce.",
    "Write a Python function that checks whether a string is a palindrome, and explain how it works.",
    "Summarize the water cycle for a ten-year-old student.",
    "List some tips for improving sleep quality and explain why each one helps.",
    "Compare electric cars and gasoline cars in terms of cost, maintenance and environmental impact.",
]


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no data."""
    if not values:
        return None
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    pos = (len(v) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def check_loopback(base_url: str) -> None:
    """Refuse any target that does not resolve to loopback addresses only."""
    u = urllib.parse.urlsplit(base_url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise SystemExit(f"bad --base-url {base_url!r}")
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(u.hostname, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise SystemExit(f"cannot resolve {u.hostname!r}: {e}")
    addrs = {info[4][0] for info in infos}
    bad = [a for a in addrs if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
    if not addrs or bad:
        raise SystemExit(
            f"refusing non-loopback target {u.hostname!r} (resolves to {sorted(addrs)}); "
            "this benchmark only talks to servers on this machine"
        )


# --------------------------------------------------------------------------- #
# one request
# --------------------------------------------------------------------------- #
@dataclass
class RequestResult:
    index: int
    prompt_index: int
    ok: bool = False
    error: str | None = None
    status: int | None = None
    t_start: float = 0.0          # perf_counter seconds
    t_first: float | None = None  # first content chunk
    t_last: float | None = None   # last content chunk
    t_end: float = 0.0            # stream closed
    content_chunks: int = 0
    usage_completion_tokens: int | None = None
    usage_prompt_tokens: int | None = None
    finish_reason: str | None = None
    text_chars: int = 0

    @property
    def tokens(self) -> int:
        """Generated tokens: usage.completion_tokens when sent, else content chunks."""
        if self.usage_completion_tokens is not None:
            return self.usage_completion_tokens
        return self.content_chunks

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_start

    @property
    def e2e(self) -> float:
        return self.t_end - self.t_start

    @property
    def decode_tps(self) -> float | None:
        if self.t_first is None or self.t_last is None or self.tokens < 2:
            return None
        dt = self.t_last - self.t_first
        if dt <= 0:
            return None
        return (self.tokens - 1) / dt


def build_body(args, prompt_index: int, request_index: int, max_tokens: int) -> dict:
    user = PROMPTS[prompt_index % len(PROMPTS)]
    if args.cache_bust:
        user = f"(request {request_index}) {user}"
    body = {
        "model": args.model,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user},
        ],
        "max_tokens": max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.seed is not None:
        body["seed"] = args.seed
    return body


async def one_request(client, args, request_index: int, prompt_index: int,
                      max_tokens: int | None = None) -> RequestResult:
    import httpx

    r = RequestResult(index=request_index, prompt_index=prompt_index)
    body = build_body(args, prompt_index, request_index, max_tokens or args.max_tokens)
    url = args.base_url.rstrip("/") + "/chat/completions"
    headers = {"Accept": "text/event-stream"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    # A hard bound on chunks read, in case a server ignores max_tokens.
    chunk_cap = 8 * body["max_tokens"] + 64
    r.t_start = time.perf_counter()
    try:
        async with asyncio.timeout(args.request_timeout):
            async with client.stream("POST", url, json=body, headers=headers) as resp:
                r.status = resp.status_code
                if resp.status_code != 200:
                    text = (await resp.aread()).decode("utf-8", "replace")
                    r.error = f"HTTP {resp.status_code}: {text[:300]}"
                    return r
                n_events = 0
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    n_events += 1
                    if n_events > chunk_cap:
                        r.error = f"stream exceeded {chunk_cap} chunks (max_tokens ignored?)"
                        return r
                    try:
                        ev = json.loads(data)
                    except json.JSONDecodeError:
                        continue
                    if "error" in ev and not ev.get("choices"):
                        r.error = f"stream error: {json.dumps(ev['error'])[:300]}"
                        return r
                    now = time.perf_counter()
                    for ch in ev.get("choices") or []:
                        delta = ch.get("delta") or {}
                        piece = delta.get("content") or delta.get("reasoning_content") or ""
                        if piece:
                            if r.t_first is None:
                                r.t_first = now
                            r.t_last = now
                            r.content_chunks += 1
                            r.text_chars += len(piece)
                        if ch.get("finish_reason"):
                            r.finish_reason = ch["finish_reason"]
                    usage = ev.get("usage")
                    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                        r.usage_completion_tokens = int(usage["completion_tokens"])
                        if usage.get("prompt_tokens") is not None:
                            r.usage_prompt_tokens = int(usage["prompt_tokens"])
        r.ok = r.t_first is not None
        if not r.ok:
            r.error = "no content received"
    except TimeoutError:
        r.error = f"timeout after {args.request_timeout}s"
    except httpx.HTTPError as e:
        r.error = f"{type(e).__name__}: {e}"
    finally:
        r.t_end = time.perf_counter()
    return r


# --------------------------------------------------------------------------- #
# one concurrency level
# --------------------------------------------------------------------------- #
@dataclass
class LevelResult:
    concurrency: int
    requests_planned: int
    requests_sent: int = 0
    requests_ok: int = 0
    requests_failed: int = 0
    stopped_by_time_limit: bool = False
    total_tokens: int = 0
    wall_s: float = 0.0
    aggregate_tps: float | None = None
    decode_tps_p50: float | None = None
    decode_tps_mean: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    e2e_p50_s: float | None = None
    tokens_per_request_mean: float | None = None
    early_stops: int = 0
    token_count_source: str = "usage"
    loadavg_1m_before: float | None = None
    errors: list[str] = field(default_factory=list)
    per_request: list[dict] = field(default_factory=list)


async def run_level(client, args, concurrency: int, requests: int) -> LevelResult:
    lv = LevelResult(concurrency=concurrency, requests_planned=requests)
    try:
        lv.loadavg_1m_before = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    results: list[RequestResult] = []
    next_index = 0
    lock = asyncio.Lock()
    t0 = time.perf_counter()
    deadline = t0 + args.level_time_limit

    async def worker():
        nonlocal next_index
        while True:
            async with lock:
                if next_index >= requests:
                    return
                if time.perf_counter() >= deadline:
                    lv.stopped_by_time_limit = True
                    return
                i = next_index
                next_index += 1
            res = await one_request(client, args, i, i % len(PROMPTS))
            results.append(res)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    t1 = time.perf_counter()

    ok = [r for r in results if r.ok]
    lv.requests_sent = len(results)
    lv.requests_ok = len(ok)
    lv.requests_failed = len(results) - len(ok)
    lv.errors = sorted({r.error for r in results if r.error})[:10]
    lv.total_tokens = sum(r.tokens for r in ok)
    # Wall time: first request sent -> last stream closed.
    if results:
        start = min(r.t_start for r in results)
        end = max(r.t_end for r in results)
        lv.wall_s = end - start
    else:
        lv.wall_s = t1 - t0
    if lv.wall_s > 0 and ok:
        lv.aggregate_tps = lv.total_tokens / lv.wall_s
    dec = [r.decode_tps for r in ok if r.decode_tps is not None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    lv.decode_tps_p50 = percentile(dec, 50)
    lv.decode_tps_mean = mean(dec)
    lv.ttft_p50_ms = None if not ttfts else percentile(ttfts, 50) * 1000
    lv.ttft_p95_ms = None if not ttfts else percentile(ttfts, 95) * 1000
    lv.e2e_p50_s = percentile([r.e2e for r in ok], 50)
    lv.tokens_per_request_mean = mean([float(r.tokens) for r in ok])
    lv.early_stops = sum(1 for r in ok if r.tokens < args.max_tokens)
    srcs = {("usage" if r.usage_completion_tokens is not None else "chunks") for r in ok}
    lv.token_count_source = "+".join(sorted(srcs)) if srcs else "none"
    for r in sorted(results, key=lambda r: r.index):
        lv.per_request.append({
            "index": r.index,
            "prompt": r.prompt_index,
            "ok": r.ok,
            "error": r.error,
            "tokens": r.tokens if r.ok else None,
            "usage_completion_tokens": r.usage_completion_tokens,
            "usage_prompt_tokens": r.usage_prompt_tokens,
            "content_chunks": r.content_chunks,
            "finish_reason": r.finish_reason,
            "ttft_ms": None if r.ttft is None else round(r.ttft * 1000, 2),
            "decode_tps": None if r.decode_tps is None else round(r.decode_tps, 2),
            "e2e_s": round(r.e2e, 4),
            "start_offset_s": round(r.t_start - t0, 4),
        })
    return lv


def r2(x, nd=1):
    return None if x is None else round(x, nd)


# --------------------------------------------------------------------------- #
# markdown
# --------------------------------------------------------------------------- #
TABLE_HEADER = (
    "| server | model | concurrency | requests ok/sent | tokens | wall s | aggregate tok/s "
    "| decode tok/s per request (p50) | TTFT p50 ms | TTFT p95 ms | e2e p50 s | token count |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
)


def fmt(x, nd=1):
    if x is None:
        return "–"
    return f"{x:.{nd}f}"


def table_rows(run: dict) -> str:
    out = []
    if run.get("status") != "ok":
        out.append(f"| {run.get('server', '?')} | {run.get('model', '?')} | – | – | – | – | – | – | – | – | – | "
                   f"{run.get('status', 'failed')}: {run.get('note', '')} |\n")
        return "".join(out)
    for lv in run["levels"]:
        out.append(
            f"| {run['server']} | {run['model']} | {lv['concurrency']} "
            f"| {lv['requests_ok']}/{lv['requests_sent']} | {lv['total_tokens']} | {fmt(lv['wall_s'], 2)} "
            f"| **{fmt(lv['aggregate_tps'])}** | {fmt(lv['decode_tps_p50'])} "
            f"| {fmt(lv['ttft_p50_ms'], 0)} | {fmt(lv['ttft_p95_ms'], 0)} | {fmt(lv['e2e_p50_s'], 2)} "
            f"| {lv['token_count_source']} |\n"
        )
    return "".join(out)


def markdown_for_runs(runs: list[dict]) -> str:
    return TABLE_HEADER + "".join(table_rows(r) for r in runs)


def ratio_line(runs: list[dict], server: str = "fusechat", peer: str = "llamacpp") -> str:
    """`server`'s aggregate tokens/s over `peer`'s at each concurrency both
    measured, e.g. "fusechat / llamacpp aggregate: c=1 0.92x, c=16 1.10x"."""
    def rates(name):
        run = next((r for r in runs if r.get("server") == name and r.get("status") == "ok"), None)
        return {lv["concurrency"]: lv["aggregate_tps"] for lv in run["levels"]} if run else {}
    ours, theirs = rates(server), rates(peer)
    parts = [f"c={c} **{ours[c] / theirs[c]:.2f}x**" for c in sorted(ours) if theirs.get(c) and ours[c]]
    return f"{server} / {peer}, aggregate tokens/s: " + (", ".join(parts) if parts else "not measured")


def markdown_by_model(runs: list[dict]) -> str:
    """One table per model (runs in the order given), each with its ratio line."""
    models = list(dict.fromkeys(r.get("model", "?") for r in runs))
    out = []
    for model in models:
        mine = [r for r in runs if r.get("model", "?") == model]
        out += [f"### {model}", "", markdown_for_runs(mine).rstrip("\n"), "", ratio_line(mine), ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- #
# subcommands
# --------------------------------------------------------------------------- #
def parse_levels(s: str) -> list[int]:
    levels = [int(x) for x in s.split(",") if x.strip()]
    if not levels or any(c < 1 or c > 256 for c in levels):
        raise argparse.ArgumentTypeError("concurrency levels must be in 1..256")
    return levels


async def cmd_run_async(args) -> dict:
    import httpx

    check_loopback(args.base_url)
    max_c = max(args.concurrency)
    limits = httpx.Limits(max_connections=max_c + 4, max_keepalive_connections=max_c + 4)
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    run: dict = {
        "server": args.server,
        "base_url": args.base_url,
        "model": args.model,
        "model_file": args.model_file,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "cache_bust": args.cache_bust,
        "prompts": len(PROMPTS),
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "server_info": args.server_info,
        "status": "ok",
        "levels": [],
    }
    # trust_env=False: never route loopback traffic through an HTTP proxy.
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        print(f"[{args.server}] warm-up ({args.warmup} request(s))", file=sys.stderr)
        for i in range(args.warmup):
            w = await one_request(client, args, -1 - i, i % len(PROMPTS))
            if not w.ok:
                run["status"] = "failed"
                run["note"] = f"warm-up failed: {w.error}"
                print(f"[{args.server}] {run['note']}", file=sys.stderr)
                return run
            print(f"[{args.server}]   warm-up: {w.tokens} tokens, ttft {w.ttft*1000:.0f} ms, "
                  f"e2e {w.e2e:.2f} s, usage={'yes' if w.usage_completion_tokens is not None else 'NO'}",
                  file=sys.stderr)
        for c in args.concurrency:
            n = args.requests if args.requests else max(args.min_requests, args.rounds * c)
            print(f"[{args.server}] concurrency {c}: {n} requests", file=sys.stderr)
            lv = await run_level(client, args, c, n)
            d = asdict(lv)
            for k in ("wall_s", "aggregate_tps", "decode_tps_p50", "decode_tps_mean",
                      "ttft_p50_ms", "ttft_p95_ms", "e2e_p50_s", "tokens_per_request_mean"):
                d[k] = r2(d[k], 3)
            run["levels"].append(d)
            print(f"[{args.server}]   ok {lv.requests_ok}/{lv.requests_sent}, {lv.total_tokens} tok "
                  f"in {lv.wall_s:.2f} s -> aggregate {fmt(lv.aggregate_tps)} tok/s, decode p50 "
                  f"{fmt(lv.decode_tps_p50)} tok/s, TTFT p50 {fmt(lv.ttft_p50_ms, 0)} ms "
                  f"p95 {fmt(lv.ttft_p95_ms, 0)} ms ({lv.token_count_source})", file=sys.stderr)
            if lv.errors:
                print(f"[{args.server}]   errors: {lv.errors}", file=sys.stderr)
            if lv.requests_ok == 0:
                run["status"] = "failed"
                run["note"] = f"no successful request at concurrency {c}"
                break
    run["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return run


def cmd_run(args) -> int:
    if args.server_info:
        try:
            args.server_info = json.loads(args.server_info)
        except json.JSONDecodeError:
            pass
    run = asyncio.run(cmd_run_async(args))
    text = json.dumps(run, indent=2)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    md = markdown_for_runs([run])
    if args.md_out:
        with open(args.md_out, "w") as f:
            f.write(md)
    print(md)
    return 0 if run["status"] == "ok" else 1


def cmd_report(args) -> int:
    runs = []
    for p in args.inputs:
        with open(p) as f:
            runs.append(json.load(f))
    machine = json.loads(args.machine) if args.machine else {}
    doc = {"machine": machine, "runs": runs}
    with open(args.json_out, "w") as f:
        f.write(json.dumps(doc, indent=2) + "\n")

    lines = ["# Serving benchmark", ""]
    if args.note:
        lines += [args.note, ""]
    if machine:
        lines += ["## Machine", ""]
        for k, v in machine.items():
            lines.append(f"- **{k}**: {v}")
        lines.append("")
    lines += ["## Results", "", markdown_by_model(runs).rstrip("\n"), ""]
    if runs:
        r0 = next((r for r in runs if r.get("status") == "ok"), runs[0])
        lines += [
            "## Settings", "",
            f"- streaming chat completions, `max_tokens` = {r0.get('max_tokens')}, "
            f"temperature = {r0.get('temperature')}, seed = {r0.get('seed')}, "
            f"{r0.get('prompts')} fixed chat prompts (cycled), one warm-up request before the levels",
            "- closed loop: at concurrency C, C workers each send their next request as soon as the previous one ends",
            "- aggregate tok/s = generated tokens of all successful requests / (first request sent → last stream closed)",
            "- decode tok/s per request = (tokens − 1) / (last content chunk − first content chunk); the p50 over requests is shown",
            "- TTFT = request sent → first non-empty content chunk",
            "- token count: `usage` = the server's `usage.completion_tokens`; `chunks` = counted content chunks "
            "(the server sent no usage)",
            "",
        ]
        for r in runs:
            if r.get("server_info"):
                lines.append(f"- **{r['server']}**: `{json.dumps(r['server_info'])}`")
        lines.append("")
    with open(args.md_out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="benchmark one OpenAI-compatible endpoint")
    r.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1 (loopback only)")
    r.add_argument("--model", required=True, help="model id sent in the request")
    r.add_argument("--server", default="server", help="label for the results table")
    r.add_argument("--model-file", default=None, help="GGUF path, for the record only")
    r.add_argument("--server-info", default=None, help="JSON or text recorded with the results")
    r.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    r.add_argument("--concurrency", type=parse_levels, default=[1, 8, 16], help="comma list, default 1,8,16")
    r.add_argument("--max-tokens", type=int, default=128)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--seed", type=int, default=1234)
    r.add_argument("--requests", type=int, default=0,
                   help="requests per level (default: max(--min-requests, --rounds x concurrency))")
    r.add_argument("--rounds", type=int, default=2, help="requests per worker per level (default 2)")
    r.add_argument("--min-requests", type=int, default=8)
    r.add_argument("--warmup", type=int, default=1, help="warm-up requests before the levels")
    r.add_argument("--request-timeout", type=float, default=180.0, help="seconds per request")
    r.add_argument("--level-time-limit", type=float, default=300.0,
                   help="no new request is started after this many seconds in a level")
    r.add_argument("--cache-bust", action="store_true",
                   help="make every user message unique (defeats exact prompt caching)")
    r.add_argument("--json-out")
    r.add_argument("--md-out")
    r.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="merge run JSON files into one JSON + markdown")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--json-out", required=True)
    p.add_argument("--md-out", required=True)
    p.add_argument("--machine", help="JSON object describing the machine")
    p.add_argument("--note", help="free text put under the title")
    p.set_defaults(func=cmd_report)

    args = ap.parse_args(argv)
    if args.cmd == "run":
        if args.max_tokens < 1 or args.max_tokens > 4096:
            ap.error("--max-tokens must be in 1..4096")
        if args.requests < 0 or args.requests > 10000:
            ap.error("--requests must be in 0..10000")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
