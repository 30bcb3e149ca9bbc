"""Tool calling on /v1/chat/completions, driven by the official `openai`
package against the real server: Qwen2.5-Coder (whose chat template renders
tools and calls them in `<tool_call>` blocks) calls a declared function with
arguments valid against its schema under `tool_choice: "required"` and under
a named choice, the result goes back as a `tool` message and the model
answers, streamed and not; SmolLM2 and Gemma 3, whose templates render no
tools, answer 400 naming `tools`."""

import json

import jsonschema
import openai
import pytest

QWEN = "qwen2.5-coder-0.5b-instruct"
SMOL = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current temperature in a city.", "parameters": WEATHER}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The current time in a time zone.",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}},
]
SYSTEM = {"role": "system",
          "content": "You are a helpful assistant. When a tool result arrives, answer the user's question with it in one sentence."}
ASK = [SYSTEM, {"role": "user", "content": "What is the weather like in Paris right now?"}]


def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=300)


def streamed(c, **kwargs):
    """The streamed answer put together as the openai SDK's users do: text,
    and tool calls from their deltas by index."""
    text, calls, finish = "", {}, None
    for chunk in c.chat.completions.create(stream=True, **kwargs):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            for d in ch.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                if d.function:
                    call["name"] += d.function.name or ""
                    call["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
    return text, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_call_round_trip(server, stream):
    c = client(server)
    kwargs = dict(model=QWEN, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80)
    if stream:
        text, calls, finish = streamed(c, **kwargs)
    else:
        r = c.chat.completions.create(**kwargs)
        ch = r.choices[0]
        text, finish = ch.message.content, ch.finish_reason
        calls = [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments} for t in ch.message.tool_calls]
    assert finish == "tool_calls" and calls, (text, calls)
    assert not text
    call = calls[0]
    assert call["name"] == "get_weather" and call["id"]
    arguments = json.loads(call["arguments"])
    jsonschema.validate(arguments, WEATHER)
    assert "paris" in arguments["city"].lower()

    # The result goes back; the model answers in words, using it. The tools
    # are left out of this turn, as a client may: given them again, this
    # 0.5B model calls get_weather again whatever the result says (its own
    # choice: the template renders the result in its <tool_response> turn).
    turn = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temperature_celsius": 23})}]
    kwargs = dict(model=QWEN, messages=ASK + turn, temperature=0, max_tokens=60)
    if stream:
        text, calls, finish = streamed(c, **kwargs)
    else:
        r = c.chat.completions.create(**kwargs)
        text, calls, finish = r.choices[0].message.content, r.choices[0].message.tool_calls or [], r.choices[0].finish_reason
    assert finish == "stop" and not calls, (text, calls)
    assert "23" in text, text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_do_not_cut_a_call(server, stream):
    # Each stop string occurs inside the call's JSON; the engine would stop
    # there. Stop strings apply to the answer's text, never to a call.
    c = client(server)
    kwargs = dict(model=QWEN, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80,
                  stop=["}", "city", "Paris", "\n"])
    if stream:
        _, calls, finish = streamed(c, **kwargs)
    else:
        ch = c.chat.completions.create(**kwargs).choices[0]
        calls, finish = [{"name": t.function.name, "arguments": t.function.arguments} for t in ch.message.tool_calls or []], ch.finish_reason
    assert finish == "tool_calls" and calls, calls
    arguments = json.loads(calls[0]["arguments"])
    jsonschema.validate(arguments, WEATHER)
    assert "paris" in arguments["city"].lower()


def test_the_seeded_sampler_gives_the_same_whole_call(server):
    c = client(server)
    kwargs = dict(model=QWEN, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=11, max_tokens=80)
    answers = []
    for _ in range(2):
        ch = c.chat.completions.create(**kwargs).choices[0]
        assert ch.finish_reason == "tool_calls"
        call = ch.message.tool_calls[0].function
        jsonschema.validate(json.loads(call.arguments), WEATHER if call.name == "get_weather" else TOOLS[1]["function"]["parameters"])
        answers.append((call.name, call.arguments))
    assert answers[0] == answers[1]


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_still_ends_a_plain_answer_beside_tools(server, stream):
    # With tools the stop strings are the server's alone: a plain answer is
    # cut at one and its generation ended there.
    c = client(server)
    ask = [{"role": "user", "content": "Hi! Who are you?"}]
    whole = c.chat.completions.create(model=QWEN, messages=ask, tools=TOOLS, temperature=0, max_tokens=60)
    text = whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "stop" and "Cloud" in text, text
    kwargs = dict(model=QWEN, messages=ask, tools=TOOLS, temperature=0, max_tokens=60, stop=["Cloud"])
    if stream:
        cut, calls, finish = streamed(c, stream_options={"include_usage": True}, **kwargs)
    else:
        r = c.chat.completions.create(**kwargs)
        cut, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert r.usage.completion_tokens < whole.usage.completion_tokens
    assert finish == "stop"
    assert cut == text[: text.index("Cloud")]


def test_a_named_tool_choice_calls_that_function(server):
    c = client(server)
    r = c.chat.completions.create(model=QWEN, messages=ASK, tools=TOOLS, temperature=0, max_tokens=60,
                                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert [t.function.name for t in ch.message.tool_calls] == ["get_time"]
    assert isinstance(json.loads(ch.message.tool_calls[0].function.arguments)["zone"], str)


def test_tool_choice_none_answers_in_words(server):
    r = client(server).chat.completions.create(model=QWEN, messages=ASK, tools=TOOLS, tool_choice="none",
                                               temperature=0, max_tokens=20)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


@pytest.mark.parametrize("model", [SMOL, GEMMA])
def test_templates_without_tools_refuse_them(server, model):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=5)
    assert e.value.body["param"] == "tools"


def test_bad_tool_requests_name_the_field(server):
    c = client(server)
    for kwargs, param in [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=QWEN, messages=ASK, max_tokens=5, **kwargs)
        assert e.value.body["param"] == param, kwargs
