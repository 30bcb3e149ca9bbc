"""What benchmark harnesses and tokenizer-aware clients send, driven by the
official `openai` package and plain HTTP: completions from token ids and
from lists of prompts (one group of choices per prompt, in order), vLLM's
`/tokenize` and `/detokenize`, `GET /v1/models/{id}`, and every request field
the server does not implement answered 400 naming it, never dropped."""

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
    # The prompt's own log-probabilities are not computed yet: asking for
    # them is refused, not answered with the completion's alone.
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=SMOL, prompt=PROMPT, max_tokens=1, echo=True, logprobs=1)
    assert e.value.body["param"] == "echo"


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
        ({"logit_bias": {"42": 10}}, "logit_bias"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
        ({"extra_body": {"guided_choice": ["a", "b"]}}, "guided_choice"),
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
