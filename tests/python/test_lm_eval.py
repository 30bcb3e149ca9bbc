"""lm-evaluation-harness (pip `lm-eval`) against the real `fusechat serve`,
on small tasks built from local files (no hub):

- `local-completions` on a multiple-choice task: the harness finds the
  server's tokenizer routes by itself (`/tokenizer_info`, `/tokenize`), sends
  token ids with `echo`, `logprobs` and `max_tokens` 1, and sums the
  continuation's prompt log-probabilities. Every choice's score must equal
  the log-likelihood transformers computes on the same GGUF file
  (transformers' own GGUF loader, float32) within LOGLIK_TOLERANCE, and
  its greedy flag must agree.
- `local-chat-completions` on a generation task: the harness's chat requests
  are answered, each sample has a non-empty response.

The server serves SmolLM2 alone, straight from its GGUF file, so the tokenizer
routes need no `model` (lm-eval sends none, as to vLLM). lm-eval lives in its
own virtual environment ($FUSECHAT_LMEVAL_VENV, default
$FUSECHAT_HOME/lmeval-venv; scripts/test.sh creates it) so that its
dependencies cannot move the pinned test packages."""

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from conftest import HOME, SMOL, Server, metric, scrape

VENV = Path(os.environ.get("FUSECHAT_LMEVAL_VENV", HOME / "lmeval-venv"))
LM_EVAL = VENV / "bin" / "lm_eval"
MODEL = "smollm2-135m-instruct"
# |fusechat - transformers| per choice's log-likelihood (a sum over its
# tokens). The server runs the quantized blocks with float32 activations;
# transformers dequantizes the same file to float32: they differ only in
# the order of float sums (largest difference measured over the 18 choices:
# 9.9e-6, 2026-12-07).
LOGLIK_TOLERANCE = 1e-4

CAPITALS = [
    ("France", "Paris", ["Paris", "Madrid", "Rome"]),
    ("Italy", "Rome", ["Berlin", "Rome", "Lisbon"]),
    ("Japan", "Tokyo", ["Seoul", "Beijing", "Tokyo"]),
    ("Germany", "Berlin", ["Berlin", "Vienna", "Paris"]),
    ("Spain", "Madrid", ["Lisbon", "Madrid", "Athens"]),
    ("England", "London", ["Dublin", "London", "Oslo"]),
]
ARITHMETIC = [("2 + 2", "4"), ("3 + 5", "8"), ("10 - 4", "6")]


@pytest.fixture(scope="module")
def single():
    config = f"""
[[models]]
id = "{MODEL}"
path = "{SMOL}"
max_seqs = 4
"""
    s = Server(config, "lm-eval")
    yield s
    s.stop()


def write_tasks(root: Path) -> Path:
    tasks = root / "tasks"
    tasks.mkdir()
    mc = tasks / "capitals.jsonl"
    mc.write_text("".join(
        json.dumps({"question": f"The capital of {country} is", "choices": choices,
                    "answer": choices.index(answer)}) + "\n"
        for country, answer, choices in CAPITALS))
    gen = tasks / "arithmetic.jsonl"
    gen.write_text("".join(json.dumps({"question": f"What is {q}? Answer with the number only.", "answer": a}) + "\n"
                           for q, a in ARITHMETIC))
    (tasks / "fusechat_capitals.yaml").write_text(textwrap.dedent(f"""\
        task: fusechat_capitals
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {mc}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
        """))
    (tasks / "fusechat_arithmetic.yaml").write_text(textwrap.dedent(f"""\
        task: fusechat_arithmetic
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {gen}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{question}}}}"
        doc_to_target: "{{{{answer}}}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 12
          do_sample: false
        metric_list:
          - metric: exact_match
        """))
    return tasks


def lm_eval(args: list, out: Path) -> tuple:
    """Runs the harness; its logged samples and its log."""
    if not LM_EVAL.exists():
        pytest.fail(f"{LM_EVAL} is missing: scripts/test.sh installs lm-eval there")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OPENAI_API_KEY="none",
               TOKENIZERS_PARALLELISM="false")
    run = subprocess.run([str(LM_EVAL), *args, "--output_path", str(out), "--log_samples"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    samples = sorted(out.rglob("samples_*.jsonl"))
    assert samples, run.stderr[-3000:]
    return [json.loads(line) for line in samples[0].read_text().splitlines()], run.stderr


def pairs_of(sample: dict) -> list:
    """(context, continuation) per choice, from either layout lm-eval logs."""
    args = sample["arguments"]
    if isinstance(args, dict):
        args = [list(a.values()) for a in args.values()]
    return [(a[0], a[1]) for a in args]


def reference_loglikelihoods(pairs: list) -> list:
    """transformers on the GGUF file: sum of ln p(continuation | context),
    the pair split into tokens as lm-eval splits it (whole text encoded,
    the context's tokens removed from its front)."""
    tok = transformers.AutoTokenizer.from_pretrained(SMOL.parent, gguf_file=SMOL.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(SMOL.parent, gguf_file=SMOL.name, dtype=torch.float32)
    model.eval()
    out = []
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        n = len(tok(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].double()
        logp = logits.log_softmax(-1)
        cont = whole[n:]
        picked = [logp[n - 1 + i, t].item() for i, t in enumerate(cont)]
        greedy = all(logp[n - 1 + i].argmax().item() == t for i, t in enumerate(cont))
        out.append((sum(picked), greedy))
    return out


def test_multiple_choice_scores_are_transformers_log_likelihoods(single, tmp_path):
    tasks = write_tasks(tmp_path)
    model_args = f"model={MODEL},base_url={single.base}/v1/completions,num_concurrent=2,max_retries=1"
    samples, log = lm_eval(["--model", "local-completions", "--model_args", model_args,
                            "--tasks", "fusechat_capitals", "--include_path", str(tasks)], tmp_path / "mc")
    # The harness found the tokenizer routes by itself and used them.
    assert "using remote tokenizer backend" in log.lower(), log[-2000:]
    hits = scrape(single.base)
    for route in ("/tokenizer_info", "/tokenize"):
        method = "GET" if route == "/tokenizer_info" else "POST"
        assert (metric(hits, "fusechat_http_requests_total", route=route, method=method, status="200") or 0) > 0, route
    assert len(samples) == len(CAPITALS)
    ours, pairs = [], []
    for sample in samples:
        pairs += pairs_of(sample)
        # Logged as strings: ["-9.56", "False"].
        ours += [(float(ll), str(greedy) == "True") for ll, greedy in sample["filtered_resps"]]
    theirs = reference_loglikelihoods(pairs)
    worst = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs))
    print(f"{len(pairs)} choices, largest |fusechat - transformers| log-likelihood {worst:.2e}")
    for (context, continuation), a, b in zip(pairs, ours, theirs):
        assert abs(a[0] - b[0]) <= LOGLIK_TOLERANCE, (context, continuation, a, b)
        assert a[1] == b[1], (context, continuation, a, b)
    # A model this size knows most capitals: the scores carry the answer.
    assert sum(s["acc"] for s in samples) >= len(CAPITALS) // 2


def test_chat_generation_task_runs(single, tmp_path):
    tasks = write_tasks(tmp_path)
    model_args = f"model={MODEL},base_url={single.base}/v1/chat/completions,num_concurrent=2,max_retries=1"
    samples, _ = lm_eval(["--model", "local-chat-completions", "--model_args", model_args, "--apply_chat_template",
                          "--tasks", "fusechat_arithmetic", "--include_path", str(tasks)], tmp_path / "gen")
    assert len(samples) == len(ARITHMETIC)
    for sample in samples:
        assert sample["resps"][0][0].strip(), sample
