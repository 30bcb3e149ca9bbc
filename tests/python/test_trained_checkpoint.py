"""The folder `fusechat sft` writes (OUT/final) is a real Hugging Face
checkpoint: transformers loads it, fusechat's own server serves it, and both
decode it the same way; its logits differ from the base model's (training
changed it)."""

import json

from conftest import BASE_SMOLLM2 as BASE, PROMPT, Server


def test_transformers_loads_the_trained_folder(trained_smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained_smollm2)
    model = AutoModelForCausalLM.from_pretrained(trained_smollm2, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        diff = (model(ids).logits - base(ids).logits).abs().max().item()
    assert diff > 1e-3, f"the trained folder has the base weights (max logit difference {diff})"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert json.loads((trained_smollm2 / "fusechat_train.json").read_text())["run"]["objective"] == "sft"


def test_server_serves_it_like_transformers(trained_smollm2):
    import openai
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained_smollm2)
    model = AutoModelForCausalLM.from_pretrained(trained_smollm2, dtype=torch.float32)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    server = Server(f'[[models]]\nid = "fused"\npath = "{trained_smollm2}"\nmax_seqs = 2\n', "trained")
    try:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused")
        reply = client.chat.completions.create(
            model="fused", messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=0,
        )
        got = reply.choices[0].message.content
    finally:
        server.stop()
    # Same weights, same template, greedy: the first words agree.
    assert got.split()[:4] == expected.split()[:4], (got, expected)
