"""/v1/responses driven by the official `openai` package against the real
server: text (whole and streamed, the same as chat completions gives for the
same conversation), function tools (a schema-valid call, its output sent back
as items), `text.format` json_schema, `max_output_tokens`, and what a
stateless server refuses."""

import json

import jsonschema
import openai
import pytest

QWEN = "qwen2.5-coder-0.5b-instruct"
SMOL = "smollm2-135m-instruct"

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
}
TOOLS = [{"type": "function", "name": "get_weather", "description": "The current temperature in a city.",
          "parameters": WEATHER}]
INSTRUCTIONS = "You are a helpful assistant. When a tool result arrives, answer the user's question with it in one sentence."


def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=300)


def streamed(c, **kwargs):
    """Every event of a streamed response, and the final response object."""
    events = list(c.responses.create(stream=True, **kwargs))
    return events, events[-1].response


def test_text_equals_chat_completions_and_streams_the_same(server):
    c = client(server)
    ask = dict(model=SMOL, instructions="Answer briefly.", input="Name three colours.", temperature=0, max_output_tokens=30)
    whole = c.responses.create(**ask)
    chat = c.chat.completions.create(model=SMOL, temperature=0, max_tokens=30, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name three colours."}])
    assert whole.status == "completed" and whole.object == "response" and whole.id.startswith("resp_")
    assert whole.output_text == chat.choices[0].message.content
    assert whole.usage.input_tokens == chat.usage.prompt_tokens
    assert whole.usage.output_tokens == chat.usage.completion_tokens
    assert whole.usage.total_tokens == whole.usage.input_tokens + whole.usage.output_tokens
    assert whole.store is False and whole.instructions == "Answer briefly."

    events, final = streamed(c, **ask)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_a_required_function_call_and_its_output_sent_back(server, stream):
    c = client(server)
    ask = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
    kwargs = dict(model=QWEN, instructions=INSTRUCTIONS, input=ask, tools=TOOLS, tool_choice="required",
                  temperature=0, max_output_tokens=80)
    if stream:
        events, r = streamed(c, **kwargs)
        deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        done = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert done and deltas == done[0].arguments
    else:
        r = c.responses.create(**kwargs)
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and calls, r.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_")
    arguments = json.loads(call.arguments)
    jsonschema.validate(arguments, WEATHER)
    assert "paris" in arguments["city"].lower()

    # The call and its output go back as items, as an agent sends them. The
    # tools are left out of this turn: given them again, this 0.5B model
    # calls get_weather again (see test_tools.py).
    turn = ask + [call.model_dump(exclude_none=True),
                  {"type": "function_call_output", "call_id": call.call_id,
                   "output": json.dumps({"temperature_celsius": 23})}]
    answer = c.responses.create(model=QWEN, instructions=INSTRUCTIONS, input=turn, temperature=0, max_output_tokens=60)
    assert answer.status == "completed"
    assert "23" in answer.output_text, answer.output_text


def test_json_schema_format_gives_valid_json(server):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
              "required": ["name", "country"], "additionalProperties": False}
    r = client(server).responses.create(
        model=QWEN, input="I live in Lyon, in France. Which city?", temperature=0, max_output_tokens=60,
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}})
    value = json.loads(r.output_text)
    jsonschema.validate(value, schema)
    assert r.text.format.type == "json_schema"


def test_max_output_tokens_makes_it_incomplete(server):
    c = client(server)
    r = c.responses.create(model=SMOL, input="Tell me a long story about a dragon.", max_output_tokens=5, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5
    events, final = streamed(c, model=SMOL, input="Tell me a long story about a dragon.", max_output_tokens=5, temperature=0)
    assert events[-1].type == "response.incomplete" and final.output_text == r.output_text


def test_what_a_stateless_server_cannot_do_is_a_400_naming_it(server):
    c = client(server)
    for kwargs, param in [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"truncation": "auto"}, "truncation"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]}, "input[0].content[0]"),
    ]:
        args = {"model": QWEN, "input": "Hi", "max_output_tokens": 5, **kwargs}
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(**args)
        assert e.value.body["param"] == param, kwargs
    # A model whose template renders no tools: 400 naming `tools`.
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model=SMOL, input="Weather in Paris?", tools=TOOLS, max_output_tokens=5)
    assert e.value.body["param"] == "tools"


def test_the_route_is_counted_in_metrics(server):
    import httpx

    client(server).responses.create(model=SMOL, input="Hi", max_output_tokens=3)
    metrics = httpx.get(server.base + "/metrics").text
    assert any('/v1/responses' in line and line.startswith("fusechat_http_requests_total") for line in metrics.splitlines()), \
        [l for l in metrics.splitlines() if "http_requests_total" in l][:5]
