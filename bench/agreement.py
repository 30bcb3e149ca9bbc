"""Greedy answers of fusechat against transformers on the same GGUF file.

For each of the three models, `fusechat serve --only --model ID=GGUF` (the
GGUF served as it is, quantized) and transformers' own GGUF loader (the file
dequantized to f32, run by PyTorch) continue the same fixed prompts greedily
for N tokens. The prompts are plain text sent to /v1/completions, so no chat
template is involved; both sides tokenize with fusechat's tokenizer files
for the GGUF (`$FUSECHAT_HOME/tokenizers/...`, written on the server's first
load; test_import_transformers.py checks them against the GGUF's own
tokenizer). Reported per model: prompts whose N tokens agree exactly, and
the mean length of the agreeing prefix. The two sides differ in arithmetic
(quantized weights read by fusechat's kernels with f32 activations, against
dequantized f32 weights in PyTorch's matmuls), so a near-tie between two
tokens may go either way and the texts part from there.

    python3 bench/agreement.py [--tokens 32] [--json-out bench/results/agreement.json]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
import transformers

HOME = Path(os.environ.get("FUSECHAT_HOME", Path.home() / ".cache" / "fusechat"))
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache" / "fusechat-target"))
BIN = Path(os.environ.get("FUSECHAT_BIN", TARGET / "release" / "fusechat"))

MODELS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma-3-270m": "gemma-3-270m-q4_k_m.gguf",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
}

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):\n    ",
    "The three primary colors are",
    "Question: Tom has 9 apples and eats 4. How many apples are left?\nAnswer:",
    "import numpy as np\n\n# compute the mean of a list\n",
    "Once upon a time, in a small village,",
    "The largest planet in the solar system is",
    "To make a cup of tea, first",
    "SELECT name, age FROM users WHERE",
    "Photosynthesis is the process by which",
    "A haiku about the sea:\n",
    "The theory of relativity was developed by",
    "Q: What is 12 times 12?\nA:",
    "<html>\n  <head>\n    <title>",
    "The French word for 'cat' is",
    "Step 1: Preheat the oven to",
    "In 1969, the first humans to walk on the Moon were",
    "for i in range(10):\n    if i % 2 == 0:\n        ",
    "The chemical symbol for gold is",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model_id: str, gguf: Path):
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix=f"agreement-{model_id}-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [str(BIN), "serve", "--only", "--model", f"{model_id}={gguf}", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, FUSECHAT_HOME=str(HOME)),
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"fusechat exited; see {log.name}")
        try:
            if httpx.get(base + "/ready", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"fusechat not ready; see {log.name}")


def fusechat_texts(base: str, model_id: str, tokens: int) -> list[str]:
    out = []
    for prompt in PROMPTS:
        r = httpx.post(base + "/v1/completions", json={
            "model": model_id, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
        }, timeout=300)
        r.raise_for_status()
        out.append(r.json()["choices"][0]["text"])
    return out


def tokenizer_dir(gguf: Path) -> Path:
    """fusechat's tokenizer folder for this GGUF (`<stem>-<size>`)."""
    return HOME / "tokenizers" / f"{gguf.stem}-{gguf.stat().st_size}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    results = {}
    for model_id, file in MODELS.items():
        gguf = HOME / "models" / file
        proc, base = serve(model_id, gguf)
        try:
            served = fusechat_texts(base, model_id, args.tokens)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir(gguf)))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        model.eval()
        rows = []
        for prompt, text in zip(PROMPTS, served):
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                gen = model.generate(ids, max_new_tokens=args.tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id or tok.eos_token_id)
            reference = gen[0, ids.shape[1]:].tolist()
            # The reference tokens whose text fusechat's answer starts with
            # (compared as text: re-tokenizing an answer can merge across the
            # prompt boundary).
            prefix = 0
            while prefix < len(reference) and text.startswith(
                    tok.decode(reference[:prefix + 1], skip_special_tokens=True)):
                prefix += 1
            rows.append({"prompt": prompt, "agree": prefix == len(reference), "prefix": prefix,
                         "fusechat": text, "transformers": tok.decode(reference, skip_special_tokens=True)})
        agree = sum(r["agree"] for r in rows)
        mean_prefix = sum(min(r["prefix"], args.tokens) for r in rows) / len(rows)
        results[model_id] = {"prompts": len(rows), "agree": agree, "mean_prefix": mean_prefix, "rows": rows}
        print(f"{model_id}: {agree}/{len(rows)} prompts agree on all {args.tokens} tokens; "
              f"mean agreeing prefix {mean_prefix:.1f} tokens", flush=True)
        del model
    if args.json_out:
        args.json_out.write_text(json.dumps({"tokens": args.tokens, "models": results}, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
