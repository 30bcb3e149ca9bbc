"""The binary runs from anywhere: copied into an empty folder (as into a
container image), with no build tree and no data folder beside it, it
serves its embedded default config, samples and evaluates with configs
that name the shipped prompt pools by a relative folder that does not
exist there (the pools compiled into the binary are written to
$FUSECHAT_HOME/data), and the embedded data default resolves against the
current folder, not the machine it was built on."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest

from conftest import BIN, HOME, REPO, free_port, wait_ready


def run(args, cwd, env, timeout=600):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def elsewhere():
    root = Path(tempfile.mkdtemp(prefix="fusechat-anywhere-"))
    (root / "bin").mkdir()
    binary = root / "bin" / "fusechat"
    shutil.copy2(BIN, binary)
    work = root / "work"
    work.mkdir()
    home = root / "home"
    home.mkdir()
    # The models as a pod's volume holds them; nothing else in this home.
    (home / "models").symlink_to(HOME / "models")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARGO", "FUSECHAT"))}
    env["FUSECHAT_HOME"] = str(home)
    yield binary, work, home, env
    shutil.rmtree(root, ignore_errors=True)


def test_serve_sample_and_eval_from_an_empty_folder(elsewhere):
    binary, work, home, env = elsewhere
    port = free_port()
    log = open(work / "serve.log", "w")
    # The embedded default config: the three fetched models.
    server = subprocess.Popen([str(binary), "serve", "--port", str(port)], cwd=work, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base + "/ready", server, work / "serve.log", 600)
        ids = sorted(m["id"] for m in httpx.get(base + "/v1/models").json()["data"])
        assert ids == ["gemma-3-270m", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"]

        (work / "data.toml").write_text(f"""
[run]
output = "out/data"

[prompts]
data_dir = "data"          # not here: the pools shipped in the binary

[[pools]]
name = "mawps"
domain = "math"
format = "mawps"
file = "math/mawps.jsonl"
limit = 2

[[endpoints]]
name = "local"
base_url = "{base}/v1"
concurrency = 2

[[sources]]
id = "smollm2-135m-instruct"
endpoint = "local"

[sampling]
n = {{ instruction = 1, math = 1, code = 1 }}
max_tokens = 48
progress = false
""")
        sampled = run([str(binary), "sample", "--config", "data.toml"], work, env)
        assert sampled.returncode == 0, sampled.stderr[-3000:]
        assert (work / "out" / "data" / "store.sqlite").is_file()
        shipped = home / "data" / "math" / "mawps.jsonl"
        assert shipped.read_bytes() == (REPO / "data" / "math" / "mawps.jsonl").read_bytes()

        (work / "eval.toml").write_text(f"""
data_config = "data.toml"
output = "out/eval"
max_tokens = 48
progress = false

[sizes]
mawps = 2

[[models]]
name = "smollm2"
base_url = "{base}/v1"
model = "smollm2-135m-instruct"
""")
        evaluated = run([str(binary), "eval", "--config", "eval.toml"], work, env)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        assert (work / "out" / "eval" / "report.md").is_file()
    finally:
        server.terminate()
        assert server.wait(timeout=60) == 0
        log.close()


def test_the_embedded_data_default_resolves_against_the_current_folder(elsewhere):
    binary, work, home, env = elsewhere
    # Nothing sampled here: pair says so, naming the store under this folder
    # (the embedded config's `../runs/data-tiny` from a virtual `config/`).
    paired = run([str(binary), "pair"], work, env, timeout=120)
    assert paired.returncode != 0
    expected = work / "runs" / "data-tiny" / "store.sqlite"
    assert str(expected) in paired.stderr, paired.stderr[-2000:]
    assert str(REPO) not in paired.stderr
