"""AlpacaEval's own harness (`alpaca-eval` from pip) generating its model
outputs from the real `fusechat serve`: `alpaca_eval.main.evaluate_from_model`
with an OpenAI client config whose base_url is the server, on 2 instructions
of the AlpacaEval set (the local copy in ../shared/data, so nothing is
downloaded). The harness's generation step runs for real (its prompt
template, its `openai_completions` decoder, its model_outputs.json); only the
annotation step that follows is stopped, because it needs AlpacaEval's
GPT-4 annotator (an OpenAI key and the network).

alpaca-eval lives in its own virtual environment ($FUSECHAT_ALPACA_VENV,
default $FUSECHAT_HOME/alpaca-venv; scripts/test.sh creates it) so its
dependencies cannot move the pinned test packages."""

import json
import os
import subprocess
import textwrap
from pathlib import Path

import httpx
import pytest

from conftest import HOME, REPO

VENV = Path(os.environ.get("FUSECHAT_ALPACA_VENV", HOME / "alpaca-venv"))
PYTHON = VENV / "bin" / "python"
DATA = REPO / "data"
DATASET = DATA / "instruction" / "alpaca_eval_gpt4_baseline.json"

GENERATE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import alpaca_eval.main as ae

    cfg = json.loads(sys.argv[1])
    captured = {}

    def stop_before_annotation(model_outputs, reference_outputs, **kwargs):
        # The annotation needs AlpacaEval's GPT-4 annotator: not run here.
        captured["n"] = len(model_outputs)
        return None

    ae.evaluate = stop_before_annotation
    ae.evaluate_from_model(
        model_configs=cfg["model_configs"],
        evaluation_dataset=cfg["dataset"],
        output_path=cfg["output_path"],
        max_instances=2,
        chunksize=None,
    )
    print(json.dumps({"generated": captured.get("n")}))
    """
)


def test_alpaca_eval_generates_its_outputs_from_the_server(server, tmp_path):
    if not PYTHON.exists():
        pytest.fail(
            f"{PYTHON} is missing: create it with `python3 -m venv {VENV} && "
            f"{VENV}/bin/pip install alpaca-eval==0.6.6` (scripts/test.sh does)"
        )
    assert DATASET.exists(), DATASET
    # The OpenAI client config alpaca_eval reads: every model goes to fusechat.
    clients = tmp_path / "openai_configs.yaml"
    clients.write_text(f'default:\n  - api_key: "none"\n    base_url: "{server.base}/v1"\n')
    template = tmp_path / "chatml_prompt.txt"
    template.write_text("<|im_start|>user\n{instruction}\n<|im_end|>")
    configs = tmp_path / "fusechat-smollm2" / "configs.yaml"
    configs.parent.mkdir()
    configs.write_text(
        textwrap.dedent(
            f"""
            fusechat-smollm2:
              prompt_template: "{template}"
              fn_completions: "openai_completions"
              completions_kwargs:
                model_name: "smollm2-135m-instruct"
                max_tokens: 48
                temperature: 0.0
                requires_chatml: true
              pretty_name: "SmolLM2-135M-Instruct served by fusechat"
            """
        )
    )
    out = tmp_path / "results"
    before = httpx.get(server.base + "/metrics").text.count("\n")  # server answers
    assert before > 0
    env = dict(os.environ, OPENAI_CLIENT_CONFIG_PATH=str(clients), OPENAI_API_KEY="none",
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    arg = json.dumps({"model_configs": str(configs), "dataset": str(DATASET), "output_path": str(out)})
    r = subprocess.run([str(PYTHON), "-c", GENERATE, arg], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-5000:]}"
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"generated": 2}

    outputs = json.loads((out / "model_outputs.json").read_text())
    references = json.loads(DATASET.read_text())
    assert len(outputs) == 2
    for got, ref in zip(outputs, references[:2]):
        # AlpacaEval's documented output format: instruction, output, generator (+ dataset).
        assert got["instruction"] == ref["instruction"]
        assert got["generator"] == "fusechat-smollm2"
        assert isinstance(got["output"], str) and got["output"].strip(), got
        assert got["dataset"] == ref["dataset"]
    # The outputs are the server's greedy answers: the same request through
    # the openai client gives the same text.
    from openai import OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key="none")
    again = client.chat.completions.create(
        model="smollm2-135m-instruct", max_tokens=48, temperature=0.0, top_p=1.0,
        messages=[{"role": "user", "content": references[0]["instruction"]}],
    )
    assert again.choices[0].message.content.strip() == outputs[0]["output"]
