"""Fixtures that start the real `fusechat serve` on a free loopback port with
the real models, and stop it afterwards."""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache" / "fusechat-target"))
BIN = Path(os.environ.get("FUSECHAT_BIN", TARGET / "release" / "fusechat"))
HOME = Path(os.environ.get("FUSECHAT_HOME", Path.home() / ".cache" / "fusechat"))
MODELS = HOME / "models"
SMOL = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN = MODELS / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GEMMA = MODELS / "gemma-3-270m-q4_k_m.gguf"


def scrape(base: str) -> dict:
    """The server's /metrics, parsed by Prometheus's own client library:
    {(sample name, frozenset of its labels): value}."""
    text = httpx.get(base + "/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(samples: dict, name: str, **labels):
    """The value of the sample `name` with exactly these labels, or None."""
    return samples.get((name, frozenset(labels.items())))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float, not_ready=None):
    """Until GET `url` answers 200; fails the test, with the log's tail, when
    `proc` exits first or `timeout` seconds pass. `not_ready(response)`, if
    given, sees every other answer and may fail the test at once."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{url}: the process exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200:
                return
            if not_ready is not None:
                not_ready(r)
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            pytest.fail(f"{url} not ready after {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)


class Server:
    def __init__(self, config_text: str, name: str, timeout: float = 600, args: tuple = ()):
        if not BIN.exists():
            pytest.fail(f"{BIN} is missing: build it with `cargo build --release` (scripts/test.sh does)")
        for path in (SMOL, QWEN, GEMMA):
            if not path.exists():
                pytest.fail(f"{path} is missing: run `fusechat models fetch` (scripts/test.sh does)")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"fusechat-{name}-"))
        config = self.dir / "serve.toml"
        config.write_text(config_text)
        self.log_path = self.dir / "server.log"
        self.log = open(self.log_path, "w")
        # The address through the environment, as a pod gives it (`--host` /
        # `--port` are what `fusechat fuse` and the Rust tests pass).
        env = dict(os.environ, FUSECHAT_HOME=str(HOME), RUST_LOG=os.environ.get("RUST_LOG", "info,mistralrs_core=warn"),
                   FUSECHAT_HOST="127.0.0.1", FUSECHAT_PORT=str(self.port))
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--config", str(config), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )

        def no_failed_model(r: httpx.Response):
            if any(v.startswith("failed") for v in r.json()["models"].values()):
                pytest.fail(f"a model failed to load: {r.text}\n{self.tail()}")

        wait_ready(self.base + "/ready", self.proc, self.log_path, timeout, no_failed_model)

    def tail(self, n: int = 60) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def server():
    """The three real models, no API key."""
    config = f"""
[[models]]
id = "smollm2-135m-instruct"
path = "{SMOL}"
max_seqs = 8
isq = "q8_0"

[[models]]
id = "qwen2.5-coder-0.5b-instruct"
path = "{QWEN}"
max_seqs = 4

[[models]]
id = "gemma-3-270m"
path = "{GEMMA}"
max_seqs = 4
"""
    s = Server(config, "main")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def guarded():
    """SmolLM2 behind an API key, with a batch of one, a queue of one and a
    small body limit: for the 401, 429 and 413 paths."""
    config = f"""
[limits]
max_body_bytes = 4096

[auth]
api_keys = ["sk-test-key"]

[[models]]
id = "smollm2-135m-instruct"
path = "{SMOL}"
max_seqs = 1
max_waiting = 1
"""
    s = Server(config, "guarded")
    yield s
    s.stop()


IMPORTED = Path(os.environ.get("FUSECHAT_IMPORTED_DIR", HOME / "test-imported"))
BASE_SMOLLM2 = IMPORTED / "smollm2-135m-instruct"
PROMPT = "What is 12 plus 30? Answer with the number."


def _sft_data(work: Path) -> Path:
    """8 small addition conversations in `fusechat sft`'s format."""
    data = work / "sft.jsonl"
    with open(data, "w") as f:
        for a in range(8):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"What is {a} plus {a + 30}? Answer with the number."},
                {"role": "assistant", "content": f"{a} + {a + 30} = {2 * a + 30}. The answer is {2 * a + 30}."},
            ]}) + "\n")
    return data


@pytest.fixture(scope="session")
def trained_smollm2(tmp_path_factory):
    """`fusechat sft` on the real SmolLM2 folder (one step on 8 small
    conversations): the OUT/final folder it writes."""
    if not (BASE_SMOLLM2 / "model.safetensors").is_file():
        pytest.fail(f"{BASE_SMOLLM2} is missing: the Rust import test writes it (scripts/test.sh)")
    work = tmp_path_factory.mktemp("sft")
    data = _sft_data(work)
    out = work / "run"
    subprocess.run(
        [str(BIN), "sft", "--model", str(BASE_SMOLLM2), "--data", str(data), "--out", str(out),
         "--epochs", "1", "--batch", "4", "--grad-accum", "1", "--lr", "5e-5", "--max-len", "256"],
        check=True, timeout=900,
    )
    return out / "final"


@pytest.fixture(scope="session")
def lora_trained_smollm2(tmp_path_factory):
    """`fusechat sft --lora ... --merge` on the real SmolLM2 folder (two steps on
    8 small conversations): the run folder, with OUT/adapter (peft's format)
    and OUT/final (merged)."""
    if not (BASE_SMOLLM2 / "model.safetensors").is_file():
        pytest.fail(f"{BASE_SMOLLM2} is missing: the Rust import test writes it (scripts/test.sh)")
    work = tmp_path_factory.mktemp("lora")
    data = _sft_data(work)
    out = work / "run"
    subprocess.run(
        [str(BIN), "sft", "--model", str(BASE_SMOLLM2), "--data", str(data), "--out", str(out),
         "--epochs", "1", "--batch", "4", "--grad-accum", "1", "--lr", "1e-3", "--max-len", "256",
         "--lora-rank", "8", "--lora-targets", "all-linear", "--merge"],
        check=True, timeout=900,
    )
    return out
