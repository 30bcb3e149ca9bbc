"""The folder `fusechat sft` writes (OUT/final) is a real Hugging Face
checkpoint: transformers loads it, fusechat's own server serves it, and both
decode it the same way; its logits differ from the base model's (training
changed it). Under LoRA, OUT/adapter is peft's adapter folder and OUT/final
the merged model."""

import json

from conftest import BASE_SMOLLM2 as BASE, PROMPT, Server


def _prompt_ids(tok):
    """PROMPT as a user turn, rendered with the chat template and tokenized."""
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt", add_special_tokens=False).input_ids


def _served_answer(folder, name: str) -> str:
    """`fusechat serve` on the folder: its greedy 12-token answer to PROMPT."""
    import openai

    server = Server(f'[[models]]\nid = "{name}"\npath = "{folder}"\nmax_seqs = 2\n', name)
    try:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused")
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=0,
        )
        return reply.choices[0].message.content
    finally:
        server.stop()


def test_transformers_loads_the_trained_folder(trained_smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained_smollm2)
    model = AutoModelForCausalLM.from_pretrained(trained_smollm2, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    ids = _prompt_ids(tok)
    with torch.no_grad():
        diff = (model(ids).logits - base(ids).logits).abs().max().item()
    assert diff > 1e-3, f"the trained folder has the base weights (max logit difference {diff})"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert json.loads((trained_smollm2 / "fusechat_train.json").read_text())["run"]["objective"] == "sft"


def test_server_serves_it_like_transformers(trained_smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained_smollm2)
    model = AutoModelForCausalLM.from_pretrained(trained_smollm2, dtype=torch.float32)
    ids = _prompt_ids(tok)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    got = _served_answer(trained_smollm2, "trained")
    # Same weights, same template, greedy: the first words agree.
    assert got.split()[:4] == expected.split()[:4], (got, expected)


def test_lora_adapter_loads_in_peft_and_the_merged_folder_serves_as_it(lora_trained_smollm2):
    """`fusechat sft --lora --merge`: peft loads OUT/adapter over the base
    folder and computes what transformers computes on the merged OUT/final;
    `fusechat serve` serves OUT/final and answers as peft does."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, merged = lora_trained_smollm2 / "adapter", lora_trained_smollm2 / "final"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], len(config["target_modules"])) == ("LORA", 8, 7)
    tok = AutoTokenizer.from_pretrained(adapter)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32), adapter)
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    ids = _prompt_ids(tok)
    with torch.no_grad():
        adapted = peft_model(ids).logits
        diff = (adapted - merged_model(ids).logits).abs().max().item()
        moved = (adapted - base(ids).logits).abs().max().item()
        out = peft_model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    assert moved > 1e-2, f"the adapters barely change the model (max logit difference {moved})"
    # Merged f32 weights against base + low-rank update, in f32.
    assert diff < 2e-3, f"peft and the merged folder differ by {diff}"
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    got = _served_answer(merged, "lora")
    assert got.split()[:4] == expected.split()[:4], (got, expected)
