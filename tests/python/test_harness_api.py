"""What benchmark harnesses and tokenizer-aware clients send, driven by the
official `openai` package and plain HTTP: completions from token ids and
from lists of prompts (one group of choices per prompt, in order), the
prompt's own log-probabilities with `echo` and `logprobs`, `logit_bias`,
vLLM's `/tokenize`, `/detokenize` and `/tokenizer_info`, `GET
/v1/models/{id}`, and every request field the server does not implement
answered 400 naming it, never dropped. (lm-evaluation-harness itself runs
against the server in test_lm_eval.py.)"""

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

SMOL = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"
PROMPT = "The capital of France is"


def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=300)


def tokenize(server, **body) -> dict:
    r = httpx.post(server.base + "/tokenize", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("model", [SMOL, GEMMA])
def test_token_ids_continue_as_the_text_they_encode(server, model):
    """The ids /tokenize gives for a text (special tokens included, as a text
    prompt gets them) are the same prompt: greedy answers are equal."""
    ids = tokenize(server, model=model, prompt=PROMPT)["tokens"]
    c = client(server)
    by_text = c.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    by_ids = c.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)


def test_a_list_of_prompts_answers_each_in_order(server):
    c = client(server)
    prompts = [PROMPT, "One, two, three,"]
    alone = [c.completions.create(model=SMOL, prompt=p, max_tokens=6, temperature=0) for p in prompts]
    batch = c.completions.create(model=SMOL, prompt=prompts, max_tokens=6, temperature=0, n=2)
    # n choices per prompt, prompt i's at i * n .. i * n + n - 1.
    assert [ch.index for ch in batch.choices] == [0, 1, 2, 3]
    texts = [ch.text for ch in batch.choices]
    assert texts == [alone[0].choices[0].text] * 2 + [alone[1].choices[0].text] * 2
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)

    ids = [tokenize(server, model=SMOL, prompt=p)["tokens"] for p in prompts]
    by_ids = c.completions.create(model=SMOL, prompt=ids, max_tokens=6, temperature=0)
    assert [ch.text for ch in by_ids.choices] == [a.choices[0].text for a in alone]


def test_a_streamed_list_of_prompts_keeps_each_prompt_s_index(server):
    c = client(server)
    prompts = [PROMPT, "One, two, three,"]
    whole = c.completions.create(model=SMOL, prompt=prompts, max_tokens=6, temperature=0)
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in c.completions.create(model=SMOL, prompt=prompts, max_tokens=6, temperature=0, stream=True):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1}
    assert [texts[0], texts[1]] == [ch.text for ch in whole.choices]


def test_echo_puts_each_prompt_before_its_choices(server):
    c = client(server)
    other = "One, two, three,"
    by_text = c.completions.create(model=SMOL, prompt=[PROMPT, other], max_tokens=4, temperature=0, echo=True)
    ids = [tokenize(server, model=SMOL, prompt=p, add_special_tokens=False)["tokens"] for p in (PROMPT, other)]
    by_ids = c.completions.create(model=SMOL, prompt=ids, max_tokens=4, temperature=0, echo=True)
    for r in (by_text, by_ids):
        texts = [ch.text for ch in r.choices]
        assert texts[0].startswith(PROMPT) and texts[1].startswith(other), texts
    assert [ch.text for ch in by_ids.choices] == [ch.text for ch in by_text.choices]


@pytest.mark.parametrize("model", [SMOL, GEMMA])
def test_echo_with_logprobs_scores_every_prompt_token(server, model):
    """As vLLM answers lm-evaluation-harness: one entry per prompt token, the
    first null; `max_tokens` 0 scores the prompt alone, 1 adds the generated
    token after the same prompt entries; a list of prompts is scored each."""
    c = client(server)
    ids = tokenize(server, model=model, prompt=PROMPT, add_special_tokens=False)["tokens"]
    scored = c.completions.create(model=model, prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == PROMPT and scored.choices[0].finish_reason == "length"
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids)
    assert "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v < 0 for v in lp.token_logprobs[1:])
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        # The two likeliest tokens plus the prompt's own; none likelier than the best.
        assert token in top and top[token] == value and 2 <= len(top) <= 3
        assert max(top.values()) >= value
    # " Paris" after "The capital of France is" is likelier than most words.
    one_more = c.completions.create(model=model, prompt=ids, max_tokens=1, echo=True, logprobs=2, temperature=0)
    lp1 = one_more.choices[0].logprobs
    assert len(lp1.tokens) == len(ids) + 1
    assert lp1.token_logprobs[: len(ids)] == lp.token_logprobs
    assert lp1.text_offset[len(ids)] == len(PROMPT)
    assert one_more.choices[0].text == PROMPT + lp1.tokens[-1]
    # The generated token is the greedy one: the best of the last row.
    assert lp1.token_logprobs[-1] == max(lp1.top_logprobs[-1].values())

    other = "One, two, three,"
    both = c.completions.create(model=model, prompt=[PROMPT, other], max_tokens=0, echo=True, logprobs=0)
    assert [ch.text for ch in both.choices] == [PROMPT, other]
    assert [len(ch.logprobs.tokens) for ch in both.choices] == [
        len(tokenize(server, model=model, prompt=p)["tokens"]) for p in (PROMPT, other)
    ]

    chunks = list(c.completions.create(model=model, prompt=ids, max_tokens=1, echo=True, logprobs=2,
                                       temperature=0, stream=True))
    first = chunks[0].choices[0]
    assert first.text == PROMPT and first.logprobs.token_logprobs == lp.token_logprobs


def test_scoring_and_generating_the_same_prompt_at_once(server):
    """A prompt scored (every position's logits, no sampling) and the same
    prompt generating arrive together: the engine runs them in separate
    steps (one step cannot do both) and both answer as they do alone."""
    c = client(server)
    ids = tokenize(server, model=SMOL, prompt=PROMPT, add_special_tokens=False)["tokens"]
    alone_scored = c.completions.create(model=SMOL, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    alone_generated = c.completions.create(model=SMOL, prompt=ids, max_tokens=6, temperature=0)
    with ThreadPoolExecutor(6) as pool:
        scored = [pool.submit(c.completions.create, model=SMOL, prompt=ids, max_tokens=0, echo=True, logprobs=1)
                  for _ in range(3)]
        generated = [pool.submit(c.completions.create, model=SMOL, prompt=ids, max_tokens=6, temperature=0)
                     for _ in range(3)]
        for f in scored:
            assert f.result().choices[0].logprobs.token_logprobs == alone_scored.choices[0].logprobs.token_logprobs
        for f in generated:
            assert f.result().choices[0].text == alone_generated.choices[0].text
    assert server.alive()


def test_logit_bias_bans_and_forces_tokens(server):
    """-100 removes the greedy token, 100 makes a chosen one the answer, with
    the engine's sampling and with seeded sampling alike."""
    c = client(server)
    ids = tokenize(server, model=SMOL, prompt=PROMPT, add_special_tokens=False)["tokens"]
    plain = c.completions.create(model=SMOL, prompt=ids, max_tokens=1, temperature=0, logprobs=1)
    greedy = plain.choices[0].text
    greedy_id = tokenize(server, model=SMOL, prompt=greedy, add_special_tokens=False)["tokens"][0]
    banned = c.completions.create(model=SMOL, prompt=ids, max_tokens=1, temperature=0,
                                  logit_bias={str(greedy_id): -100})
    assert banned.choices[0].text != greedy
    forced_id = tokenize(server, model=SMOL, prompt=" banana", add_special_tokens=False)["tokens"][0]
    for kwargs in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}, {"temperature": 1.0}):
        forced = c.completions.create(model=SMOL, prompt=ids, max_tokens=1, logit_bias={str(forced_id): 100}, **kwargs)
        assert forced.choices[0].text == " banana", kwargs
    for bias, why in [({"abc": 1}, "not a token id"), ({str(forced_id): 500}, "out of range"), ({"999999999": 1}, "outside the vocabulary")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=SMOL, prompt=ids, max_tokens=1, logit_bias=bias)
        assert e.value.body["param"] == "logit_bias", why


def test_tokenizer_info_gives_the_special_tokens_and_template(server):
    r = httpx.get(server.base + "/tokenizer_info", params={"model": SMOL}, timeout=60)
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["eos_token"] == "<|im_end|>" and "<|im_start|>" in info["chat_template"]
    assert info["tokenizer_class"] and info["model_max_length"] > 0
    # Its eos token is one token, as lm-evaluation-harness takes it.
    assert len(tokenize(server, model=SMOL, prompt=info["eos_token"], add_special_tokens=False)["tokens"]) == 1
    # Three models are served here: which one must be said.
    r = httpx.get(server.base + "/tokenizer_info", timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    r = httpx.post(server.base + "/tokenize", json={"prompt": "x"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text


def test_tokenize_renders_messages_as_chat_does_and_detokenize_reverses(server):
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    chat = client(server).chat.completions.create(model=SMOL, messages=messages, max_tokens=1, temperature=0)
    rendered = tokenize(server, model=SMOL, messages=messages)
    assert rendered["count"] == len(rendered["tokens"]) == chat.usage.prompt_tokens
    assert rendered["max_model_len"] > rendered["count"]

    plain = tokenize(server, model=SMOL, prompt=PROMPT, add_special_tokens=False)["tokens"]
    r = httpx.post(server.base + "/detokenize", json={"model": SMOL, "tokens": plain}, timeout=60)
    assert r.status_code == 200 and r.json() == {"prompt": PROMPT}, r.text

    for path, body, param in [
        ("/detokenize", {"model": SMOL, "tokens": [10**9]}, "tokens"),
        ("/tokenize", {"model": SMOL}, "prompt"),
        ("/tokenize", {"model": SMOL, "prompt": "x", "return_token_strs": True}, "return_token_strs"),
    ]:
        r = httpx.post(server.base + path, json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(server.base + "/tokenize", json={"model": "nope", "prompt": "x"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_token_ids_outside_the_vocabulary_are_a_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).completions.create(model=SMOL, prompt=[1, 2, 10**9], max_tokens=2)
    assert e.value.body["param"] == "prompt"


def test_one_model_by_id(server):
    c = client(server)
    card = c.models.retrieve(SMOL)
    assert card.id == SMOL and card.object == "model"
    assert card.model_extra["max_model_len"] > 0
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("no-such-model")


def test_fields_the_server_does_not_implement_are_named(server):
    c = client(server)
    ask = [{"role": "user", "content": "Hi"}]
    for kwargs, param in [
        ({"extra_body": {"guided_choice": ["a", "b"]}}, "guided_choice"),
        ({"extra_body": {"functions": [{"name": "f"}]}}, "functions"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=SMOL, messages=ask, max_tokens=2, **kwargs)
        assert (e.value.body["param"], e.value.body["code"]) == (param, "unsupported_parameter")
    # Fields that change nothing about the answer are accepted.
    r = c.chat.completions.create(model=SMOL, messages=ask, max_tokens=2, metadata={"run": "x"}, store=False,
                                  user="u1")
    assert r.choices[0].message.content is not None


def test_a_batch_takes_all_its_seats_at_once_or_is_refused(server):
    """Nine prompts for a model that runs eight sequences (the fixture's
    max_seqs): refused at once, naming `prompt`, never started in part and
    left waiting for seats its own unread output holds."""
    c = client(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=SMOL, prompt=[PROMPT] * 9, max_tokens=200, timeout=30)
    assert e.value.body["param"] == "prompt"
    # Eight fit, and the model still answers afterwards.
    r = c.completions.create(model=SMOL, prompt=[PROMPT] * 8, max_tokens=4, temperature=0)
    assert len(r.choices) == 8 and len({ch.text for ch in r.choices}) == 1


def test_a_seeded_prompt_answers_alike_wherever_it_sits_in_a_list(server):
    c = client(server)
    alone = c.completions.create(model=SMOL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7)
    listed = c.completions.create(model=SMOL, prompt=["One, two, three,", PROMPT], max_tokens=12, temperature=1.0,
                                  seed=7)
    assert listed.choices[1].text == alone.choices[0].text
