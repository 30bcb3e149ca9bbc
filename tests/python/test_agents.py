"""Agent frameworks nobody here wrote, against the real server:

- LangChain (`langchain-openai`): `bind_tools` with a tool round trip
  (streamed and not, on chat completions and on the Responses API), and
  `with_structured_output` by each of its methods;
- the OpenAI Agents SDK (`openai-agents`): a one-tool agent streamed over
  /v1/responses, and an agent whose output type is read from JSON decoded
  under its schema (`text.format`)."""

import asyncio

import pytest
from pydantic import BaseModel, Field

QWEN = "qwen2.5-coder-0.5b-instruct"
SYSTEM = "You are a helpful assistant. When a tool result arrives, answer the user's question with it in one sentence."


class City(BaseModel):
    """A city the user named."""

    name: str = Field(description="The city's name")
    country: str


def weather_tool(calls: list):
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"It is 21 degrees Celsius and sunny in {city}."

    return get_weather


def chat_model(server, **kwargs):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=server.base + "/v1", api_key="none", model=QWEN, temperature=0, max_retries=0,
                      timeout=300, **kwargs)


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("stream", [False, True])
def test_langchain_bind_tools_round_trip(server, stream, api):
    from langchain_core.messages import HumanMessage, SystemMessage

    llm = chat_model(server, use_responses_api=api == "responses")
    calls = []
    get_weather = weather_tool(calls)
    messages = [SystemMessage(SYSTEM), HumanMessage("What is the weather in Paris?")]
    bound = llm.bind_tools([get_weather], tool_choice="required")
    if stream:
        ai = None
        for chunk in bound.stream(messages):
            ai = chunk if ai is None else ai + chunk
    else:
        ai = bound.invoke(messages)
    assert [c["name"] for c in ai.tool_calls] == ["get_weather"], ai
    result = get_weather.invoke(ai.tool_calls[0])
    assert calls and "paris" in calls[0].lower()
    # The answer turn goes without the tools (see test_tools.py on why).
    answer = llm.invoke(messages + [ai, result])
    assert "21" in answer.text, answer


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_structured_output(server, method):
    structured = chat_model(server).with_structured_output(City, method=method)
    city = structured.invoke("I live in Lyon, in France. Reply in JSON with the keys name and country.")
    assert isinstance(city, City)
    assert city.name == "Lyon" and city.country == "France"


def agents_model(server):
    from agents import OpenAIResponsesModel, set_tracing_disabled
    from openai import AsyncOpenAI

    # Tracing uploads to OpenAI; nothing here may leave the machine.
    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=300)
    return OpenAIResponsesModel(model=QWEN, openai_client=client)


async def run_streamed(agent, question: str, **kwargs):
    from agents import Runner

    result = Runner.run_streamed(agent, question, **kwargs)
    kinds = [e.data.type async for e in result.stream_events() if e.type == "raw_response_event"]
    return result, kinds


def test_agents_sdk_one_tool_agent_streams_over_responses(server):
    from agents import Agent, ModelSettings, function_tool

    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"It is 21 degrees Celsius and sunny in {city}."

    # The tool's result is the agent's answer (`stop_on_first_tool`): given
    # the tools again with the result, this 0.5B model calls get_weather
    # again rather than answering (see test_tools.py).
    agent = Agent(name="weather", instructions="Answer questions about the weather with get_weather.",
                  tools=[get_weather], model=agents_model(server), tool_use_behavior="stop_on_first_tool",
                  model_settings=ModelSettings(tool_choice="required", temperature=0))
    result, kinds = asyncio.run(run_streamed(agent, "What is the weather in Paris?", max_turns=2))
    assert [c.lower() for c in calls] == ["paris"]
    assert result.final_output == "It is 21 degrees Celsius and sunny in Paris."
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in kinds


def test_agents_sdk_output_type_from_a_json_schema(server):
    from agents import Agent, ModelSettings

    agent = Agent(name="geo", instructions="Extract the city the user names.", model=agents_model(server),
                  output_type=City, model_settings=ModelSettings(temperature=0))
    result, kinds = asyncio.run(run_streamed(agent, "I live in Lyon, in France."))
    assert result.final_output == City(name="Lyon", country="France")
    assert "response.output_text.delta" in kinds and kinds[-1] == "response.completed"
