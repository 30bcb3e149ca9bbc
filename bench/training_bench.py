"""Training benchmark helper: prepares the data both trainers read, and runs
the PyTorch + transformers side (SFT and DPO steps on the same rows, float32,
full fine-tune or peft LoRA, AdamW), writing per-step timings (forward,
backward, optimizer) as JSON.

  python3 bench/training_bench.py prepare --model DIR --out DIR --steps N
  python3 bench/training_bench.py torch-sft --model DIR --data F --steps N --batch 4 --json OUT [--lora R]
  python3 bench/training_bench.py torch-dpo --model DIR --data F --steps N --batch 2 --json OUT
"""

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

import os

DATA = Path(__file__).resolve().parents[1] / "data"
ALPACA = DATA / "instruction" / "alpaca_eval_gpt4_baseline.json"


def rendered_len(tok, messages):
    text = tok.apply_chat_template(messages, tokenize=False)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def prepare(args):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    rows = json.loads(Path(args.alpaca).read_text())
    random.Random(0).shuffle(rows)
    long_rows = []
    for r in rows:
        msgs = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        n = rendered_len(tok, msgs)
        if args.min_len <= n <= args.max_len:
            long_rows.append((r, n))
        if len(long_rows) >= 6 * args.steps:
            break
    need = 4 * args.steps
    if len(long_rows) < need:
        sys.exit(f"only {len(long_rows)} AlpacaEval rows render to {args.min_len}-{args.max_len} tokens; need {need}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sft.jsonl", "w") as f:
        for r, _ in long_rows[:need]:
            f.write(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                             {"role": "assistant", "content": r["output"]}]}) + "\n")
    # DPO pairs: one instruction, its own answer as chosen and another long
    # answer as rejected (only the lengths matter for speed), both within the limit.
    pairs = []
    for i, (a, _) in enumerate(long_rows):
        for b, _ in long_rows[i + 1:] + long_rows[:i]:
            rejected = [{"role": "user", "content": a["instruction"]}, {"role": "assistant", "content": b["output"]}]
            if args.min_len <= rendered_len(tok, rejected) <= args.max_len:
                pairs.append((a, b))
                break
        if len(pairs) == 2 * args.steps:
            break
    if len(pairs) < 2 * args.steps:
        sys.exit(f"only {len(pairs)} DPO pairs fit in {args.max_len} tokens; need {2 * args.steps}")
    with open(out / "dpo.jsonl", "w") as f:
        for a, b in pairs:
            f.write(json.dumps({"prompt": [{"role": "user", "content": a["instruction"]}],
                                "chosen": [{"role": "assistant", "content": a["output"]}],
                                "rejected": [{"role": "assistant", "content": b["output"]}]}) + "\n")
    lens = [n for _, n in long_rows[:need]]
    print(json.dumps({"rows": need, "mean_tokens": sum(lens) / len(lens), "min": min(lens), "max": max(lens)}))


def encode(tok, prompt, response):
    """Token ids of prompt+response and a label list with -100 outside the response."""
    full = tok.apply_chat_template(prompt + response, tokenize=False)
    head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    n_head = len(tok(head, add_special_tokens=False)["input_ids"])
    labels = [-100] * n_head + ids[n_head:]
    return ids, labels


def pad(batch, pad_id):
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        attn[i, : len(x)] = 1
    return ids, labels, attn


def seq_logps(model, ids, labels, attn):
    import torch

    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    lp = torch.log_softmax(logits.float(), -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1), mask.sum(-1)


def run(args, kind):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False
    if args.lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=args.lora, lora_alpha=args.lora_alpha, lora_dropout=0.0,
            target_modules=args.lora_targets.split(","), task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    rows = [json.loads(l) for l in Path(args.data).read_text().splitlines() if l.strip()]
    steps = []
    if kind == "sft":
        data = [encode(tok, r["messages"][:-1], r["messages"][-1:]) for r in rows]
    else:
        data = [(encode(tok, r["prompt"], r["chosen"]), encode(tok, r["prompt"], r["rejected"])) for r in rows]
        # Reference log-probs once, as fusechat does (not timed in the steps).
        with torch.no_grad():
            refs = []
            for i in range(0, len(data), args.batch):
                chunk = data[i : i + args.batch]
                ids, labels, attn = pad([c for c, _ in chunk] + [r for _, r in chunk], tok.pad_token_id)
                lp, _ = seq_logps(model, ids, labels, attn)
                m = len(chunk)
                refs += list(zip(lp[:m].tolist(), lp[m:].tolist()))
    for step in range(args.steps):
        chunk = data[step * args.batch : (step + 1) * args.batch]
        t0 = time.perf_counter()
        if kind == "sft":
            ids, labels, attn = pad(chunk, tok.pad_token_id)
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            tokens = int(attn.sum())
        else:
            m = len(chunk)
            ids, labels, attn = pad([c for c, _ in chunk] + [r for _, r in chunk], tok.pad_token_id)
            lp, _ = seq_logps(model, ids, labels, attn)
            ref = refs[step * args.batch : step * args.batch + m]
            ref_c = torch.tensor([r[0] for r in ref])
            ref_r = torch.tensor([r[1] for r in ref])
            logits = (lp[:m] - ref_c) - (lp[m:] - ref_r)
            loss = -torch.nn.functional.logsigmoid(args.beta * logits).mean()
            tokens = int(attn.sum())
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        dt = t3 - t0
        steps.append({"step": step + 1, "loss": loss.item(), "seconds": dt, "tokens": tokens,
                      "forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2})
        print(f"torch {kind} step {step + 1}: loss {loss.item():.4f} {dt:.2f}s {tokens / dt:.0f} tok/s", file=sys.stderr)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(args.json).write_text(json.dumps({
        "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": steps, "peak_rss_kb": peak_kb,
    }, indent=1))


def peak_rss_gb(time_file):
    for line in Path(time_file).read_text().splitlines():
        if "Maximum resident set size" in line:
            return int(line.split(":")[1]) / 1024 / 1024
    return float("nan")


def cpu_seconds(time_file):
    """(user, system) CPU seconds of the whole process, from /usr/bin/time -v."""
    found = {}
    for line in Path(time_file).read_text().splitlines():
        for key in ("User time (seconds)", "System time (seconds)"):
            if key in line:
                found[key] = float(line.split(":")[1])
    return found.get("User time (seconds)", float("nan")), found.get("System time (seconds)", float("nan"))


# The fusechat runs of a stage, by the suffix of their folder: the default
# build (candle's gemm crate for the matrix products), the same with Intel MKL's
# sgemm loaded at run time, and the default with gradient checkpointing.
FUSECHAT_VARIANTS = [
    ("", "fusechat (candle 0.10, gemm crate)"),
    ("-mkl", "fusechat + MKL sgemm"),
    ("-gc", "fusechat, gradient checkpointing"),
]


def report(args):
    """bench/results/training.md and .json from one run's files."""
    d = Path(args.dir)
    rows = []
    mean = lambda steps, key: sum(s[key] for s in steps) / len(steps)
    for stage in ("sft", "dpo", "lora-sft"):
        if not (d / f"torch-{stage}.json").is_file():
            continue
        t = json.loads((d / f"torch-{stage}.json").read_text())
        steps = t["steps"][1:] or t["steps"]  # the first step warms up
        peft = " + peft" if stage.startswith("lora") else ""
        rows.append({
            "stage": stage, "trainer": f"PyTorch {t['torch']} + transformers{peft} ({t['threads']} threads)",
            "steps": len(t["steps"]), "tokens_per_step": mean(steps, "tokens"),
            "seconds_per_step": mean(steps, "seconds"),
            "phases": [mean(steps, k) for k in ("forward", "backward", "optimizer")],
            "peak_rss_gb": peak_rss_gb(d / f"torch-{stage}.time"),
            "cpu_user_sys": cpu_seconds(d / f"torch-{stage}.time"),
            "losses": [s["loss"] for s in t["steps"]],
        })
        torch_row = len(rows) - 1
        for suffix, trainer in FUSECHAT_VARIANTS:
            run = d / f"fusechat-{stage}{suffix}"
            if not (run / "metrics.jsonl").is_file():
                continue
            m = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
            steps = m[1:] or m
            rows.append({
                "stage": stage, "trainer": trainer, "versus": torch_row,
                "steps": len(m), "tokens_per_step": mean(steps, "tokens"),
                "seconds_per_step": mean(steps, "step_seconds"),
                "phases": [mean(steps, f"{k}_seconds") for k in ("forward", "backward", "optimizer")],
                "peak_rss_gb": peak_rss_gb(d / f"fusechat-{stage}{suffix}.time"),
                "cpu_user_sys": cpu_seconds(d / f"fusechat-{stage}{suffix}.time"),
                "losses": [s["loss"] for s in m],
            })
    for r in rows:
        r["tokens_per_s"] = r["tokens_per_step"] / r["seconds_per_step"]
    out = Path(args.results)
    (out / "training.json").write_text(json.dumps({"setup": args.setup, "rows": rows}, indent=1))
    lines = [
        "# Training speed: fusechat vs PyTorch + transformers",
        "",
        f"{args.setup}",
        "",
        "| stage | trainer | steps | tokens/step | s/step | tokens/s | peak RSS (GB) | CPU s user / system | fusechat / PyTorch |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = f"{r['tokens_per_s'] / rows[r['versus']]['tokens_per_s']:.2f}" if "versus" in r else ""
        lines.append(f"| {r['stage']} | {r['trainer']} | {r['steps']} | {r['tokens_per_step']:.0f} | "
                     f"{r['seconds_per_step']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_rss_gb']:.2f} | "
                     f"{r['cpu_user_sys'][0]:.0f} / {r['cpu_user_sys'][1]:.0f} | {ratio} |")
    lines += ["", "Where a step's time goes (mean seconds per step, first step excluded; the rest of a step is batching and summing the micro-batches' gradients):", "",
              "| stage | trainer | forward | backward | optimizer (clip + AdamW) |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        f, b, o = r["phases"]
        lines.append(f"| {r['stage']} | {r['trainer']} | {f:.2f} | {b:.2f} | {o:.2f} |")
    lines += ["", "Losses per step (same rows and initial weights; fusechat shuffles the rows with its seed while the PyTorch side takes them in file order, and PyTorch also learns the newline after the end-of-turn token, so the losses are not comparable step by step):", ""]
    for r in rows:
        lines.append(f"- {r['stage']} {r['trainer']}: " + ", ".join(f"{x:.4f}" for x in r["losses"]))
    (out / "training.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--model", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--steps", type=int, default=5)
    a.add_argument("--alpaca", default=str(ALPACA))
    a.add_argument("--min-len", type=int, default=440)
    a.add_argument("--max-len", type=int, default=512)
    for name in ("torch-sft", "torch-dpo"):
        b = sub.add_parser(name)
        b.add_argument("--model", required=True)
        b.add_argument("--data", required=True)
        b.add_argument("--steps", type=int, default=5)
        b.add_argument("--batch", type=int, default=4)
        b.add_argument("--lr", type=float, default=5e-6)
        b.add_argument("--beta", type=float, default=0.1)
        b.add_argument("--json", required=True)
        b.add_argument("--lora", type=int, default=0, help="peft LoRA of this rank (0: full fine-tune)")
        b.add_argument("--lora-alpha", type=float, default=16.0)
        b.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    c = sub.add_parser("report")
    c.add_argument("--dir", required=True)
    c.add_argument("--results", required=True)
    c.add_argument("--setup", default="")
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args)
    elif args.cmd == "report":
        report(args)
    else:
        run(args, args.cmd.split("-", 1)[1])


if __name__ == "__main__":
    main()
