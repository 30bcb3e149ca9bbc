"""The server driven by the official `openai` Python package, as users drive it."""

import concurrent.futures
import json
import math
import time

import httpx
import openai
import pytest

SMOL = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"
GEMMA = "gemma-3-270m"
ASK = [{"role": "user", "content": "Name three colours of the rainbow."}]


def client(server, **kw):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=300, **kw)


def test_chat_completion_has_text_usage_and_fingerprint(server):
    r = client(server).chat.completions.create(model=SMOL, messages=ASK, max_tokens=24, temperature=0)
    assert r.object == "chat.completion"
    assert r.model == SMOL
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5
    assert 1 <= r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.system_fingerprint.startswith("fp_")


def test_max_tokens_cuts_with_length(server):
    r = client(server).chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_completion_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_model_routing_reaches_different_weights(server):
    c = client(server)
    a = c.chat.completions.create(model=SMOL, messages=ASK, max_tokens=8, temperature=0)
    b = c.chat.completions.create(model=QWEN, messages=ASK, max_tokens=8, temperature=0)
    assert (a.model, b.model) == (SMOL, QWEN)
    assert a.system_fingerprint != b.system_fingerprint
    # The chat templates differ, so the same conversation has different prompt lengths.
    assert a.usage.prompt_tokens != b.usage.prompt_tokens


def test_streaming_matches_non_streaming_and_reports_usage(server):
    c = client(server)
    whole = c.chat.completions.create(model=SMOL, messages=ASK, max_tokens=32, temperature=0)
    chunks = list(c.chat.completions.create(
        model=SMOL, messages=ASK, max_tokens=32, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_choices_are_indexed_and_counted(server):
    r = client(server).chat.completions.create(
        model=SMOL, messages=ASK, max_tokens=12, temperature=1.0, n=3, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.message.content for c in r.choices)
    assert len({c.message.content for c in r.choices}) > 1, "seeded choices should differ from each other"
    assert r.usage.completion_tokens <= 36


def test_same_seed_same_output(server):
    c = client(server)
    kw = dict(model=SMOL, messages=ASK, max_tokens=24, temperature=1.0, top_p=0.95)
    a = c.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = c.chat.completions.create(seed=1234, **kw).choices[0].message.content
    d = c.chat.completions.create(seed=999, **kw).choices[0].message.content
    assert a == b
    assert a != d


def test_stop_sequence_is_never_returned(server):
    c = client(server)
    free = c.chat.completions.create(model=SMOL, messages=ASK, max_tokens=40, temperature=0).choices[0].message.content
    words = free.split()
    assert len(words) >= 4, free
    stop = words[2]
    cut = free[: free.index(stop)]
    r = c.chat.completions.create(model=SMOL, messages=ASK, max_tokens=40, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(model=SMOL, messages=ASK, max_tokens=40, temperature=0, stop=stop, stream=True)
        if ch.choices)
    assert streamed == cut
    assert stop not in streamed


def test_logprobs(server):
    c = client(server)
    sampled = c.chat.completions.create(
        model=SMOL, messages=ASK, max_tokens=8, temperature=0.7, logprobs=True, top_logprobs=3)
    content = sampled.choices[0].logprobs.content
    assert 1 <= len(content) <= 8
    for item in content:
        assert item.logprob <= 0.0
        assert len(item.top_logprobs) == 3
        assert all(a.logprob >= b.logprob for a, b in zip(item.top_logprobs, item.top_logprobs[1:]))
    # Natural logarithms of one distribution: at temperature 1 the 20 most likely
    # tokens hold at most all of the probability mass.
    wide = c.chat.completions.create(
        model=QWEN, messages=ASK, max_tokens=4, temperature=1.0, logprobs=True, top_logprobs=20)
    for item in wide.choices[0].logprobs.content:
        mass = sum(math.exp(t.logprob) for t in item.top_logprobs)
        assert 0.2 < mass <= 1.001, mass
    # Greedy: the chosen token is the most likely one, and its alternatives come
    # from the same (temperature 1) distribution.
    greedy = c.chat.completions.create(
        model=SMOL, messages=ASK, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    for item in greedy.choices[0].logprobs.content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-5)
        assert item.top_logprobs[1].logprob < 0.0
    assert any(item.logprob < -1e-3 for item in greedy.choices[0].logprobs.content)


def test_seeded_sampling_reports_the_models_logprobs(server):
    c = client(server)
    kw = dict(model=SMOL, messages=ASK, max_tokens=8, temperature=0.8, logprobs=True, top_logprobs=3)
    seeded = c.chat.completions.create(seed=5, **kw).choices[0].logprobs.content
    for item in seeded:
        assert item.logprob <= 0.0
        assert len(item.top_logprobs) == 3
        assert item.logprob <= item.top_logprobs[0].logprob + 1e-5
        for alt in item.top_logprobs:
            if alt.token == item.token:
                assert alt.logprob == pytest.approx(item.logprob, abs=1e-5)
    assert any(item.logprob < -1e-3 for item in seeded), "seeded logprobs should not all be 0"
    # The first token comes from the prompt alone: seeded or not, the same
    # distribution at the same temperature.
    free = c.chat.completions.create(**kw).choices[0].logprobs.content
    assert [t.token for t in seeded[0].top_logprobs] == [t.token for t in free[0].top_logprobs]
    for a, b in zip(seeded[0].top_logprobs, free[0].top_logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
    # A sharp distribution (temperature 0.1) still reports every alternative
    # asked for, however unlikely.
    sharp = c.chat.completions.create(
        model=SMOL, messages=ASK, max_tokens=3, temperature=0.1, seed=5, logprobs=True, top_logprobs=20)
    for item in sharp.choices[0].logprobs.content:
        assert len(item.top_logprobs) == 20
        assert all(math.isfinite(t.logprob) for t in item.top_logprobs)


def test_default_temperature_is_one(server):
    """No `temperature` and no model default: OpenAI's default of 1, so choices
    differ, and a seed still makes them repeatable."""
    c = client(server)
    r = c.chat.completions.create(model=SMOL, messages=ASK, max_tokens=16, n=4)
    assert len({ch.message.content for ch in r.choices}) > 1, [ch.message.content for ch in r.choices]
    a = c.chat.completions.create(model=SMOL, messages=ASK, max_tokens=16, seed=11).choices[0].message.content
    b = c.chat.completions.create(model=SMOL, messages=ASK, max_tokens=16, seed=11).choices[0].message.content
    assert a == b


def test_response_format_json_object(server):
    r = client(server).chat.completions.create(
        model=QWEN, messages=[{"role": "user", "content": "Give a JSON object with keys name and age for Alice, 30."}],
        max_tokens=48, temperature=0, response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.lstrip().startswith("{"), text
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_gemma_base_model_completes_text(server):
    c = client(server)
    r = c.completions.create(model=GEMMA, prompt="Paris is the capital of", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert "France" in r.choices[0].text, r.choices[0].text
    # The continuation keeps its leading space (" France", not "France").
    assert r.choices[0].text.startswith(" "), r.choices[0].text
    assert r.usage.completion_tokens >= 1
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=GEMMA, prompt="Paris is the capital of", max_tokens=8, temperature=0, stream=True) if ch.choices)
    assert streamed == r.choices[0].text


def test_unknown_model_is_not_found(server):
    with pytest.raises(openai.NotFoundError) as e:
        client(server).chat.completions.create(model="gpt-9", messages=ASK)
    assert e.value.code == "model_not_found"
    assert e.value.body["param"] == "model"


@pytest.mark.parametrize("kw,param", [
    (dict(temperature=5), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(n=100000), "n"),
    (dict(max_tokens=10**9), "max_tokens"),
    (dict(presence_penalty=3), "presence_penalty"),
    (dict(top_logprobs=2), "top_logprobs"),
])
def test_invalid_parameter_is_bad_request_naming_it(server, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model=SMOL, messages=ASK, **kw)
    assert e.value.body["param"] == param


def test_empty_messages_is_bad_request(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model=SMOL, messages=[])
    assert e.value.body["param"] == "messages"


def test_context_length_exceeded(server):
    long = "word " * 9000
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model=SMOL, messages=[{"role": "user", "content": long}], max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    # The prompt fits (about 5000 of 8192 tokens), prompt plus max_tokens does not.
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(
            model=SMOL, messages=[{"role": "user", "content": "word " * 5000}], max_tokens=4000)
    assert e.value.code == "context_length_exceeded"
    assert e.value.body["param"] == "messages"
    assert "4000 in the completion" in e.value.message
    # /v1/completions names its own field.
    with pytest.raises(openai.BadRequestError) as e:
        client(server).completions.create(model=SMOL, prompt="word " * 9000, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    assert e.value.body["param"] == "prompt"


def test_missing_or_wrong_key_is_authentication_error(guarded):
    for key in ("none", "sk-wrong"):
        with pytest.raises(openai.AuthenticationError) as e:
            client(guarded, api_key=key).models.list()
        assert e.value.code == "invalid_api_key"
    r = client(guarded, api_key="sk-test-key").chat.completions.create(model=SMOL, messages=ASK, max_tokens=2)
    assert r.choices[0].message.content is not None


def test_full_queue_is_rate_limited_with_retry_after(guarded):
    c = client(guarded, api_key="sk-test-key")
    long = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]

    def occupy():
        return c.chat.completions.create(model=SMOL, messages=long, max_tokens=200, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(occupy) for _ in range(2)]  # one runs, one waits
        time.sleep(1.5)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model=SMOL, messages=ASK, max_tokens=2)
        assert e.value.code == "rate_limit_exceeded"
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert all(f.result().choices for f in running)
