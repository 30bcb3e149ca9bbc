#!/usr/bin/env python3
"""Markdown tables for bench/results/data.md from a finished
`bench/run_data.sh` run: per source, responses, correct answers with a 95%
Wilson interval (overall and per pool), responses cut at max_tokens, and the
decode throughput of the phase in which that source was sampled (the run
samples one source after another; "alone" is the part of the phase in which
no other source's requests were on the server). Reads the run's store.sqlite,
sample_stats.json and report.json; prints markdown to stdout.

usage: python3 bench/data_table.py runs/data-math100
"""
import json
import math
import sqlite3
import sys
from datetime import datetime


def wilson(k, n, z=1.959963984540054):
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def main(run):
    db = sqlite3.connect(f"{run}/store.sqlite")
    stats = json.load(open(f"{run}/sample_stats.json"))
    rows = db.execute(
        """select s.source, p.pool, s.truncated, s.completion_tokens, s.latency_ms, s.created_at,
                  sc.passed
           from samples s join prompts p on p.id = s.prompt_id
           left join scores sc on sc.prompt_id = s.prompt_id and sc.source = s.source
                and sc.idx = s.idx and sc.scorer = 'math'
           where s.status = 'ok'"""
    ).fetchall()
    sources = sorted({r[0] for r in rows}, key=lambda s: min(ts(r[5]) for r in rows if r[0] == s))
    pools = sorted({r[1] for r in rows})
    print("| source | responses | correct | pass rate [95% CI] | cut at max_tokens | mean completion tokens | phase wall s | phase tokens/s | alone s | alone tokens/s |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    # When each source's first request was sent (its first finish minus its
    # latency, queueing included): from then on the server decodes it.
    sent = {
        s: min(ts(r[5]).timestamp() - (r[4] or 0) / 1000 for r in rows if r[0] == s)
        for s in sources
    }
    prev_end = None
    for i, s in enumerate(sources):
        mine = [r for r in rows if r[0] == s]
        n = len(mine)
        k = sum(1 for r in mine if r[6] == 1)
        lo, hi = wilson(k, n)
        cut = sum(1 for r in mine if r[2])
        toks = sum(r[3] or 0 for r in mine)
        # The phase: from the end of the previous source's phase (or this
        # source's first request: its first finish minus its latency) to its last finish.
        first = min(ts(r[5]).timestamp() - (r[4] or 0) / 1000 for r in mine)
        start = max(first, prev_end) if prev_end else first
        end = max(ts(r[5]).timestamp() for r in mine)
        # Alone: from the previous source's last response to the next
        # source's first request, only this source decodes; the tokens of
        # its responses that finished in that window, over the window.
        alone_end = sent[sources[i + 1]] if i + 1 < len(sources) else end
        alone = [r for r in mine if start < ts(r[5]).timestamp() <= alone_end]
        alone_wall = alone_end - start
        alone_toks = sum(r[3] or 0 for r in alone)
        prev_end = end
        wall = end - start
        print(f"| {s} | {n} | {k} | {100*k/n:.1f}% [{100*lo:.1f}, {100*hi:.1f}] | {cut} | {toks/n:.0f} | {wall:.0f} | {toks/wall:.1f} | {alone_wall:.0f} | {alone_toks/alone_wall:.1f} |")
    print()
    print("| source | " + " | ".join(pools) + " |")
    print("| --- | " + " | ".join("---:" for _ in pools) + " |")
    for s in sources:
        cells = []
        for p in pools:
            mine = [r for r in rows if r[0] == s and r[1] == p]
            k = sum(1 for r in mine if r[6] == 1)
            cells.append(f"{k}/{len(mine)}")
        print(f"| {s} | " + " | ".join(cells) + " |")
    print()
    print(
        f"Whole sampling run: {stats['ok']} responses ({stats['failed']} failed, {stats['truncated']} cut), "
        f"{stats['completion_tokens']} completion tokens in {stats['elapsed_s']:.0f} s: "
        f"{stats['responses_per_s']:.3f} responses/s, {stats['tokens_per_s']:.1f} completion tokens/s."
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/data-math100")
