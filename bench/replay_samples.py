#!/usr/bin/env python3
"""Replay the requests a data stage stored, against a server, and say how
fast they were answered and whether the answers are the ones stored.

The data stage (`fusechat sample`, `fusechat fuse`) keeps every request body
it sent and the answer it got in its store (runs/<name>/data/store.sqlite).
Sent again with the same seed, a request must get the same answer from the
same model, whoever serves it: so this measures an engine change on the
data stage's own work (its prompts, sampling knobs and seeds, at its
concurrency) and checks that the change kept every token.

    bench/replay_samples.py --store runs/fuse-tiny/data/store.sqlite \\
        --source qwen2.5-coder-0.5b-instruct --limit 64 --concurrency 16 \\
        --base-url http://127.0.0.1:8080/v1 [--json out.json]

Standard library only (and serving_bench.py's loopback check): only
servers on this machine are accepted.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import sqlite3
import sys
import time
import urllib.request

from serving_bench import check_loopback


def stored(store: str, source: str, limit: int) -> list[tuple[dict, str]]:
    """(request body, stored answer) of the first `limit` answered samples."""
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT request, text FROM samples WHERE source = ? AND status = 'ok'"
            " ORDER BY prompt_id, idx LIMIT ?",
            (source, limit),
        ).fetchall()
    return [(json.loads(body), text) for body, text in rows]


def send(base_url: str, body: dict, timeout: float) -> tuple[str, int]:
    req = urllib.request.Request(
        base_url.rstrip("/") + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        answer = json.load(r)
    return answer["choices"][0]["message"]["content"] or "", answer["usage"]["completion_tokens"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="a data stage's store.sqlite")
    p.add_argument("--source", required=True, help="the source whose requests to replay")
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args()
    check_loopback(args.base_url)
    samples = stored(args.store, args.source, args.limit)
    if not samples:
        sys.exit(f"replay_samples: no answered samples of {args.source!r} in {args.store}")
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        answers = list(pool.map(lambda s: send(args.base_url, s[0], args.timeout), samples))
    wall = time.monotonic() - start
    tokens = sum(n for _, n in answers)
    same = sum(text == old for (text, _), (_, old) in zip(answers, samples))
    result = {
        "source": args.source,
        "requests": len(samples),
        "concurrency": args.concurrency,
        "completion_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2),
        "same_answers": same,
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if same == len(samples) else 1


if __name__ == "__main__":
    sys.exit(main())
