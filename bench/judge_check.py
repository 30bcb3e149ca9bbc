#!/usr/bin/env python3
"""Can the judge tell a right answer from an off-topic one?

A control for the instruction win rate: for N AlpacaEval instructions, the
judge compares GPT-4's reference answer with GPT-4's reference answer to a
*different* instruction (the "model" output here), in both orders, with the
same system prompt, user message and request that `fusechat eval` sends
(trainer/eval/src/judge.rs; keep the two in step). A judge worth its win
rate gives the off-topic answer a score near 0; one that scores it near 0.5
cannot separate two models on instructions, whatever their outputs.

Prints a Markdown table and writes JSON next to it when --json is given.

    python3 bench/judge_check.py --base-url http://127.0.0.1:8092/v1 \
        --model qwen2.5-coder-0.5b-instruct --n 40 --json bench/results/judge_check.json
"""

import argparse
import concurrent.futures as cf
import json
import math
import pathlib
import statistics
import urllib.request

SYSTEM = (
    "You are a fair and impartial judge. You compare two outputs written by AI assistants for the "
    "same instruction and decide which one follows the instruction better: more helpful, more "
    "correct, clearer. Do not let the order of the outputs or their length influence you."
)


def user_message(instruction, a, b):
    return (
        f"Which output follows the instruction better?\n\n## Instruction\n{instruction}\n\n"
        f"## Output (a)\n{a}\n\n## Output (b)\n{b}\n\n## Your verdict\n"
        'Reply with exactly one of: "A" if output (a) is better, "B" if output (b) is better, '
        'or "tie". Verdict:'
    )


def letter(token):
    # As trainer/eval/src/judge.rs reads a token: anything but letters and
    # digits trimmed, byte-level BPE and SentencePiece space marks too.
    t = token.strip("".join(c for c in set(token) if not c.isalnum()) + "\u0120\u2581")
    return {"A": "a", "a": "a", "B": "b", "b": "b", "tie": "tie", "Tie": "tie", "TIE": "tie"}.get(t)


def judge(base_url, model, instruction, a, b):
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user_message(instruction, a, b)},
        ],
        "max_tokens": 32,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": 10,
    }
    req = urllib.request.Request(
        base_url.rstrip("/") + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        resp = json.load(r)
    choice = resp["choices"][0]
    text = choice["message"]["content"]
    # The first token that is a verdict letter (the judge's replies here are
    # one token, "A" or "B"; fusechat eval reads the verdict from the text
    # and takes the token where it was read).
    for tok in (choice.get("logprobs") or {}).get("content") or []:
        if letter(tok.get("token", "")):
            p = {"a": 0.0, "b": 0.0, "tie": 0.0}
            alts = {a["token"]: a["logprob"] for a in tok.get("top_logprobs") or []}
            alts.setdefault(tok["token"], tok.get("logprob", float("-inf")))
            for t, lp in alts.items():
                k = letter(t)
                if k:
                    p[k] += math.exp(lp)
            total = sum(p.values())
            return text, ({k: v / total for k, v in p.items()} if total > 0 else None)
    return text, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=str(pathlib.Path(__file__).resolve().parents[1] / "data/instruction/alpaca_eval_gpt4_baseline.json"))
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()

    rows = json.load(open(args.data))
    # Evenly spaced instructions: spread over AlpacaEval's sources.
    picked = rows[:: max(1, len(rows) // args.n)][: args.n]
    jobs = []
    for i, row in enumerate(picked):
        off_topic = picked[(i + 1) % len(picked)]["output"]
        ref = row["output"]
        # (instruction index, order, instruction, output (a), output (b));
        # the off-topic answer plays the model.
        jobs.append((i, "model_first", row["instruction"], off_topic, ref))
        jobs.append((i, "reference_first", row["instruction"], ref, off_topic))

    def run(job):
        i, order, instr, a, b = job
        text, probs = judge(args.base_url, args.model, instr, a, b)
        return i, order, text, probs

    with cf.ThreadPoolExecutor(args.concurrency) as ex:
        results = list(ex.map(run, jobs))

    per = {}
    first_letters = []
    for i, order, text, probs in results:
        if probs is None:
            continue
        mine = probs["a"] if order == "model_first" else probs["b"]
        per.setdefault(i, {})[order] = mine + 0.5 * probs["tie"]
        first_letters.append(max(probs, key=probs.get))
    scores = [sum(v.values()) / 2 for v in per.values() if len(v) == 2]
    out = {
        "judge": f"{args.model} at {args.base_url}",
        "pairs": len(scores),
        "off_topic_weighted_score": statistics.mean(scores) if scores else None,
        "off_topic_weighted_sd": statistics.pstdev(scores) if scores else None,
        "share_a_most_probable": first_letters.count("a") / len(first_letters) if first_letters else None,
        "calls_without_logprobs": sum(1 for r in results if r[3] is None),
    }
    if not scores:
        raise SystemExit("no instruction got probabilities in both orders: does the judge return logprobs?")
    print("| judge | instructions | off-topic answer's weighted score (0 = always spotted, 0.5 = blind) | sd | share of calls where \"A\" is the likeliest letter |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(
        f"| {out['judge']} | {out['pairs']} | {out['off_topic_weighted_score']:.3f} | "
        f"{out['off_topic_weighted_sd']:.3f} | {out['share_a_most_probable']:.3f} |"
    )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
