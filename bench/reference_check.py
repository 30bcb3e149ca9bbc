#!/usr/bin/env python3
"""Does agreement with the reference tell an answer to the question from an
answer to another question?

The control `bench/judge_check.py` runs on the judge, run on the judge-free
instruction signal (`[scoring.reference]`, `<pool>.reference` in the
evaluation; trainer/data/src/score/reference.rs): for N AlpacaEval
instructions, a model answers each one (greedy, through any OpenAI
endpoint); each answer is scored against the GPT-4 reference of its own
instruction and against the reference of a different instruction (the next
one). A signal worth ranking with scores the on-topic pair higher nearly
always; the judges this machine can run score the off-topic answer 0.498
against 0.5 (judge_check.json), i.e. cannot tell them apart.

The metric is computed here as in score/reference.rs (keep the two in step):
the mean of the unigram and bigram F1 over lowercased runs of letters and
digits.

    python3 bench/reference_check.py --base-url http://127.0.0.1:8080/v1 \
        --model qwen2.5-coder-0.5b-instruct --n 40 --json bench/results/reference_check.json
"""

import argparse
import concurrent.futures as cf
import json
import pathlib
import re
import statistics
import urllib.request
from collections import Counter

DATA = pathlib.Path(__file__).resolve().parents[1] / "data/instruction/alpaca_eval_gpt4_baseline.json"


def words(text):
    return [w.lower() for w in re.split(r"[^\w]|_", text) if w]


def f1(a, b):
    na, nb = sum(a.values()), sum(b.values())
    if not na or not nb:
        return 0.0
    overlap = sum(min(n, b[k]) for k, n in a.items())
    if not overlap:
        return 0.0
    p, r = overlap / na, overlap / nb
    return 2 * p * r / (p + r)


def agreement(response, reference):
    a, b = words(response), words(reference)
    uni = f1(Counter(a), Counter(b))
    bi = f1(Counter(zip(a, a[1:])), Counter(zip(b, b[1:])))
    return (uni + bi) / 2


def answer(base_url, model, instruction, max_tokens):
    body = {"model": model, "messages": [{"role": "user", "content": instruction}],
            "max_tokens": max_tokens, "temperature": 0.0}
    req = urllib.request.Request(base_url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=900) as r:
        return json.load(r)["choices"][0]["message"]["content"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = json.loads(pathlib.Path(args.data).read_text())[: args.n]
    with cf.ThreadPoolExecutor(args.concurrency) as pool:
        answers = list(pool.map(lambda r: answer(args.base_url, args.model, r["instruction"], args.max_tokens), rows))
    on, off = [], []
    for i, a in enumerate(answers):
        on.append(agreement(a, rows[i]["output"]))
        off.append(agreement(a, rows[(i + 1) % len(rows)]["output"]))
    wins = sum(x > y for x, y in zip(on, off))
    ties = sum(x == y for x, y in zip(on, off))
    result = {
        "answers_by": f"{args.model} at {args.base_url}",
        "instructions": len(rows),
        "on_topic_mean": statistics.mean(on),
        "off_topic_mean": statistics.mean(off),
        "share_on_topic_higher": wins / len(rows),
        "ties": ties,
    }
    print("| answers by | instructions | agreement with own reference | with another instruction's | own higher |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| {result['answers_by']} | {len(rows)} | {result['on_topic_mean']:.3f} | {result['off_topic_mean']:.3f} "
          f"| {wins}/{len(rows)} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
