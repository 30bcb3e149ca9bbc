"""Prompt-processing (prefill) benchmark for an OpenAI-compatible chat endpoint.

For prompts of a few lengths (about 250 to 2,000 tokens), one request at a
time, `max_tokens` = 1, greedy: the time from sending the request to its
complete answer, which is the prompt's prefill plus one decode step plus HTTP.
Every request starts with a fresh number, so no server can reuse a cached
prefix of an earlier one. Each length is sent `--repeats` times; the median
is reported, with prompt tokens as the server counted them (`usage`).

Subcommands:
  run     benchmark one endpoint, write JSON
  report  merge JSON results of several runs into one markdown table + JSON

Only loopback targets are accepted. Requires httpx. Python >= 3.11.
"""

import argparse
import json
import statistics
import sys
import time
import httpx

# The same loopback check as the serving benchmark (resolves the host name).
from serving_bench import check_loopback

# Words per prompt: about 1.3 SmolLM2 tokens each, plus the chat template
# (about 240 to 2,000 tokens).
LENGTHS = [180, 380, 760, 1520, 1860]
WORDS = (
    "the river carried small boats past the old mill while farmers counted sacks of grain "
    "and children read numbers from the market board before the evening bell rang twice"
).split()


def prompt(words: int, nonce: int) -> str:
    body = " ".join(WORDS[i % len(WORDS)] for i in range(words))
    return f"Request {nonce}. Summarise this text in one word: {body}"


def run(args) -> int:
    check_loopback(args.base_url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rows = []
    nonce = int(time.time() * 1000)
    with httpx.Client(timeout=args.request_timeout, headers=headers) as client:
        # Warm-up: loads whatever a first request loads.
        client.post(f"{args.base_url}/chat/completions", json={
            "model": args.model, "messages": [{"role": "user", "content": "Hi."}],
            "max_tokens": 1, "temperature": 0})
        for words in LENGTHS:
            times, tokens = [], []
            for _ in range(args.repeats):
                nonce += 1
                t0 = time.perf_counter()
                r = client.post(f"{args.base_url}/chat/completions", json={
                    "model": args.model,
                    "messages": [{"role": "user", "content": prompt(words, nonce)}],
                    "max_tokens": 1, "temperature": 0})
                elapsed = time.perf_counter() - t0
                if r.status_code != 200:
                    break
                times.append(elapsed)
                tokens.append(r.json()["usage"]["prompt_tokens"])
            if not times:
                rows.append({"words": words, "refused": f"HTTP {r.status_code}: {r.text[:200]}"})
                print(f"{args.server}: {words} words refused: HTTP {r.status_code}", file=sys.stderr)
                continue
            seconds = statistics.median(times)
            prompt_tokens = int(statistics.median(tokens))
            rows.append({"words": words, "prompt_tokens": prompt_tokens, "seconds": round(seconds, 3),
                         "all_seconds": [round(t, 3) for t in times],
                         "prefill_tok_s": round(prompt_tokens / seconds, 1)})
            print(f"{args.server}: {prompt_tokens} prompt tokens, {seconds:.2f} s "
                  f"({prompt_tokens / seconds:.0f} tokens/s)", file=sys.stderr)
    out = {"server": args.server, "model": args.model, "repeats": args.repeats, "rows": rows,
           "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(args.json_out, "w") as f:
        json.dump(out, f, indent=2)
    return 0


def table(runs: list[dict]) -> list[str]:
    lines = ["| server | model | prompt tokens | time to answer (median) s | prefill tokens/s |",
             "|---|---|---:|---:|---:|"]
    for r in runs:
        for row in r["rows"]:
            if "refused" in row:
                lines.append(f"| {r['server']} | {r['model']} | ({row['words']} words) | refused: "
                             f"{row['refused'][:60]} | |")
                continue
            lines.append(f"| {r['server']} | {r['model']} | {row['prompt_tokens']} | "
                         f"{row['seconds']:.2f} | **{row['prefill_tok_s']:.0f}** |")
    return lines


def ratio_line(runs: list[dict], server: str = "fusechat", peer: str = "llamacpp") -> str:
    """`server`'s prefill tokens/s over `peer`'s, prompt by prompt (same words)."""
    def rates(name):
        run = next((r for r in runs if r["server"] == name), None)
        return {row["words"]: row["prefill_tok_s"] for row in run["rows"] if "prefill_tok_s" in row} if run else {}
    ours, theirs = rates(server), rates(peer)
    parts = [f"{w} words **{ours[w] / theirs[w]:.2f}x**" for w in sorted(ours) if theirs.get(w)]
    return f"{server} / {peer}, prefill tokens/s: " + (", ".join(parts) if parts else "not measured")


def report(args) -> int:
    runs = [json.load(open(p)) for p in args.inputs]
    lines = []
    for model in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == model]
        lines += [f"### {model}", ""] + table(mine) + ["", ratio_line(mine), ""]
    with open(args.md_out, "w") as f:
        f.write("\n".join(lines) + "\n")
    if args.into:
        # A section of the serving report, before its settings.
        text = open(args.into).read()
        head, sep, tail = text.partition("\n## Settings")
        section = ("\n## Prompt processing (bench/prefill_bench.py)\n\n"
                   "One request at a time, `max_tokens` = 1, greedy, a fresh number at the start of "
                   "every prompt (no cached prefix), median of 3. Time to answer = prefill + one "
                   "decode step + HTTP.\n\n" + "\n".join(lines) + "\n")
        with open(args.into, "w") as f:
            f.write(head + section + sep + tail)
    with open(args.json_out, "w") as f:
        json.dump(runs, f, indent=2)
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="benchmark one endpoint")
    r.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1 (loopback only)")
    r.add_argument("--model", required=True)
    r.add_argument("--server", default="server", help="label for the results table")
    r.add_argument("--api-key", default=None)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--request-timeout", type=float, default=300.0)
    r.add_argument("--json-out", required=True)
    m = sub.add_parser("report", help="merge run JSON files")
    m.add_argument("inputs", nargs="+")
    m.add_argument("--json-out", required=True)
    m.add_argument("--md-out", required=True)
    m.add_argument("--into", help="also insert the table into this markdown report, before its '## Settings'")
    args = p.parse_args(argv)
    return run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
