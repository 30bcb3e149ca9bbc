"""Running streams while a long prompt arrives: chunked prefill against whole
prompts and against llama.cpp, on the same GGUF files, in one run.

For each model, three servers in turn on 127.0.0.1: llama.cpp's
llama-server (its own batching of prompt and decode tokens), then one
fusechat server holding the file once per `--chunks` setting of
`prefill_chunk` (256 is the default) and once with `prefill_chunk = 0` (a
prompt read in one step). On each:

1. the long prompt (about 2,000 tokens) alone, `max_tokens` 1: its time to
   answer, i.e. what chunking costs a prompt when nothing else runs;
2. `--streams` streaming completions decoding (a counting prompt, greedy),
   and once each has streamed 10 tokens the same long prompt arrives (a
   fresh number at its start, so nothing is cached): the gaps between the
   tokens of the running streams before it arrived and while it was read
   (inter-token latency, ITL), the tokens they streamed meanwhile, and the
   long prompt's own time to answer under that load.

Writes bench/results/chunked_prefill.{md,json}. Servers bind to loopback
only. Needs httpx; the fusechat binary ($FUSECHAT_BIN) and the models
(`fusechat models fetch`); llama-server from bench/llamacpp.sh.

Usage: python3 bench/chunked_prefill_bench.py [--models smollm2,gemma,qwen]
           [--streams 4] [--chunks 256,64]
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from prefill_bench import prompt as long_prompt

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
MODELS_DIR = Path(os.environ.get("FUSECHAT_HOME", Path.home() / ".cache/fusechat")) / "models"
MODELS = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma": "gemma-3-270m-q4_k_m.gguf",
    "qwen": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
}
# prefill_bench.py's longest prompt: about 2,000 tokens with any of the three
# tokenizers once templated.
LONG_WORDS = 1860
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Started:
    """A server process on a free loopback port, stopped on exit."""

    def __init__(self, argv: list[str], ready_path: str, log: Path, port: int, timeout: float = 600):
        self.port, self.log_path = port, log
        self.proc = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{argv[0]} exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(f"http://{HOST}:{port}{ready_path}", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{argv[0]} not ready after {timeout} s; see {log}")
            time.sleep(0.5)

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.stop()


def start_llamacpp(model_id: str, file: Path, work: Path) -> Started:
    binary = subprocess.run(["bash", str(HERE / "llamacpp.sh")], check=True, capture_output=True, text=True)
    threads = str(os.cpu_count())
    port = free_port()
    argv = [binary.stdout.strip().splitlines()[-1], "-m", str(file), "--host", HOST, "--port", str(port),
            "--alias", model_id, "--parallel", "8", "--cont-batching", "--ctx-size", "32768",
            "--threads", threads, "--threads-batch", threads]
    return Started(argv, "/health", work / f"llamacpp.{model_id}.log", port)


def start_fusechat(model_id: str, file: Path, chunks: list[int], work: Path) -> Started:
    """One fusechat server holding the file once per chunk size: `ID-cN`
    reads prompts N tokens a step (`ID-c0`: whole)."""
    config = work / f"fusechat.{model_id}.toml"
    config.write_text("".join(
        f'[[models]]\nid = "{model_id}-c{tokens}"\npath = "{file}"\nmax_seqs = 8\nprefill_chunk = {tokens}\n\n'
        for tokens in chunks))
    binary = os.environ.get("FUSECHAT_BIN", str(Path.home() / ".cache/fusechat-target/release/fusechat"))
    port = free_port()
    argv = [binary, "serve", "--config", str(config), "--host", HOST, "--port", str(port)]
    return Started(argv, "/ready", work / f"fusechat.{model_id}.log", port)


def answer_time(client: httpx.Client, base: str, model: str, nonce: int) -> tuple[float, int]:
    t0 = time.monotonic()
    r = client.post(f"{base}/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": long_prompt(LONG_WORDS, nonce)}],
        "max_tokens": 1, "temperature": 0})
    r.raise_for_status()
    return time.monotonic() - t0, r.json()["usage"]["prompt_tokens"]


def stream_tokens(base: str, model: str, max_tokens: int, stamps: list[float]):
    """A streaming completion; appends the arrival time of every token."""
    body = {"model": model, "prompt": COUNTING, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.Client(timeout=600) as client, client.stream("POST", f"{base}/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and choices[0].get("text"):
                stamps.append(time.monotonic())


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(base: str, model: str, streams: int, stream_tokens_max: int) -> dict:
    nonce = int(time.time() * 1000)
    with httpx.Client(timeout=600) as client:
        client.post(f"{base}/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 1})
        alone, prompt_tokens = answer_time(client, base, model, nonce)
        stamps = [[] for _ in range(streams)]
        threads = [threading.Thread(target=stream_tokens, args=(base, model, stream_tokens_max, s))
                   for s in stamps]
        for t in threads:
            t.start()
        while min(len(s) for s in stamps) < 10 and any(t.is_alive() for t in threads):
            time.sleep(0.01)
        sent = time.monotonic()
        loaded, _ = answer_time(client, base, model, nonce + 1)
        answered = sent + loaded
        for t in threads:
            t.join()
    before, during, meanwhile = [], [], 0
    for s in stamps:
        for a, b in zip(s, s[1:]):
            if b <= sent:
                before.append(b - a)
            elif a < answered:
                during.append(b - a)
        meanwhile += sum(sent <= t <= answered for t in s)
    outlived = all(s and s[-1] > answered for s in stamps)
    ms = lambda x: round(1000 * x, 1)  # noqa: E731
    return {
        "prompt_tokens": prompt_tokens, "alone_s": round(alone, 2), "under_load_s": round(loaded, 2),
        "itl_before_p50_ms": ms(statistics.median(before)),
        "itl_during_p50_ms": ms(statistics.median(during)) if during else None,
        "itl_during_p99_ms": ms(percentile(during, 0.99)) if during else None,
        "longest_gap_ms": ms(max(during)) if during else None,
        "tokens_streamed_meanwhile": meanwhile, "streams_outlived_prompt": outlived,
    }


def run_model(name: str, args, work: Path) -> list[dict]:
    file = MODELS_DIR / MODELS[name]
    if not file.is_file():
        raise SystemExit(f"{file} is missing: run `fusechat models fetch`")
    rows = []

    def record(server: str, base: str, model: str):
        row = {"model": name, "server": server, "streams": args.streams,
               **measure(base, model, args.streams, args.stream_tokens)}
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)

    with start_llamacpp(name, file, work) as s:
        record("llama.cpp", s.base, name)
    chunks = [int(c) for c in args.chunks.split(",")] + [0]
    with start_fusechat(name, file, chunks, work) as s:
        for tokens in chunks:
            label = f"fusechat, prefill_chunk {tokens}" + (" (whole prompt)" if tokens == 0 else "")
            record(label, s.base, f"{name}-c{tokens}")
    return rows


def markdown(rows: list[dict], args) -> str:
    lines = [
        "# Running streams while a long prompt arrives (bench/chunked_prefill_bench.py)",
        "",
        f"{args.streams} streaming completions decode (greedy, counting); once each has streamed 10 tokens "
        "a chat prompt of about 2,000 tokens arrives (`max_tokens` 1). ITL: gaps between the tokens of the "
        "running streams, before it arrived and while it was read. \"alone\": the long prompt's time to "
        "answer with nothing else running; \"under load\": with the streams. Same GGUF file for every server, "
        f"one run, {time.strftime('%Y-%m-%d', time.gmtime())}, this machine ({os.cpu_count()} cores, no GPU).",
        "",
        "| model | server | prompt tokens | alone s | under load s | ITL before p50 ms | ITL during p50 ms "
        "| p99 ms | longest gap ms | tokens streamed meanwhile |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        flag = "" if r["streams_outlived_prompt"] else " (a stream ended first)"
        lines.append(
            f"| {r['model']} | {r['server']} | {r['prompt_tokens']} | {r['alone_s']} | {r['under_load_s']} "
            f"| {r['itl_before_p50_ms']} | {r['itl_during_p50_ms']} | {r['itl_during_p99_ms']} "
            f"| **{r['longest_gap_ms']}** | {r['tokens_streamed_meanwhile']}{flag} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,gemma,qwen")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--stream-tokens", type=int, default=400, help="max_tokens of each running stream")
    p.add_argument("--chunks", default="256,64", help="prefill_chunk settings besides 0 (whole prompts)")
    p.add_argument("--out", default=str(HERE / "results" / "chunked_prefill"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fusechat-chunked-"))
    rows = [row for name in args.models.split(",") for row in run_model(name, args, work)]
    Path(args.out + ".json").write_text(json.dumps(rows, indent=2) + "\n")
    Path(args.out + ".md").write_text(markdown(rows, args))
    print(markdown(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
