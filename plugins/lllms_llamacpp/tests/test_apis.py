"""Each API's official SDK against a real server (hypercorn) serving SmolLM2 through llama.cpp:
what a user of the Anthropic, OpenAI (Responses, Agents) and Ollama SDKs would see."""

from __future__ import annotations

import json

import anthropic
import httpx
import ollama
import openai
import pytest

from lllms_core.testing import BackgroundServer

pytestmark = pytest.mark.timeout(120)

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture(scope="module")
def server(smollm2_file, tmp_path_factory):
    model = {"engine": "llamacpp", "location": str(smollm2_file), "context_size": 1024, "device": {"gpu": False, "cpu_threads": 1}}
    config = {
        "server": {"cache_dir": str(tmp_path_factory.mktemp("cache"))},
        "models": {"smol": {**model, "parallel": 2}, "smol-embed": {**model, "task": "embedding", "parallel": 1}},
    }
    running = BackgroundServer(config).start()
    yield running
    running.stop()


def test_anthropic_messages(server):
    client = anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
    question = [{"role": "user", "content": "What is a dog?"}]
    message = client.messages.create(model="smol", max_tokens=16, messages=question, extra_body={"temperature": 0})
    assert "dog" in message.content[0].text.lower()
    assert message.stop_reason in ("end_turn", "max_tokens") and message.usage.output_tokens > 0
    with client.messages.stream(model="smol", max_tokens=16, messages=question, extra_body={"temperature": 0}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == message.content[0].text
    # the same question again: its prompt is read from the slot's context
    assert final.usage.cache_read_input_tokens > 0
    counted = client.messages.count_tokens(model="smol", messages=question)
    assert counted.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="smol", max_tokens=0, messages=question)


def test_anthropic_tool_use_round_trip(server):
    client = anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
    tools = [{"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER}]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.messages.create(model="smol", max_tokens=128, messages=messages, tools=tools,
                                   tool_choice={"type": "any", "disable_parallel_tool_use": True}, extra_body={"temperature": 0})
    assert first.stop_reason == "tool_use"
    call = next(block for block in first.content if block.type == "tool_use")
    assert call.name == "get_weather" and isinstance(call.input.get("city"), str)
    messages += [{"role": "assistant", "content": first.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 24 degrees"}]}]
    answer = client.messages.create(model="smol", max_tokens=32, messages=messages, tools=tools, extra_body={"temperature": 0})
    assert answer.content and answer.content[-1].type in ("text", "tool_use")


def test_openai_responses(server):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=60)
    response = client.responses.create(model="smol", input="What is a dog?", max_output_tokens=16, temperature=0)
    assert "dog" in response.output_text.lower()
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    with client.responses.stream(model="smol", input="What is a dog?", max_output_tokens=16, temperature=0) as stream:
        events = list(stream)
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == response.output_text
    # cut short by max_output_tokens, as OpenAI's stream ends then (the SDK's final response wants response.completed)
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == deltas


def test_openai_function_call_round_trip_with_previous_response_id(server):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=60)
    tools = [{"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}]
    first = client.responses.create(model="smol", input="What is the weather in Paris?", tools=tools, tool_choice="required",
                                    parallel_tool_calls=False, temperature=0)
    call = next(item for item in first.output if item.type == "function_call")
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)
    second = client.responses.create(
        model="smol", previous_response_id=first.id, tools=tools, tool_choice="none", temperature=0, max_output_tokens=24,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 degrees"}],
    )  # fmt: skip
    assert second.output_text
    # the chain went on in the slot that held the first turn
    assert second.usage.input_tokens_details.cached_tokens > 0


def test_openai_agents_sdk_runs_an_agent_with_a_function_tool(server):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"Sunny in {city}"

    model = OpenAIResponsesModel(model="smol", openai_client=openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0))
    agent = Agent(
        name="weather", instructions="Answer with the weather tool.", tools=[get_weather], model=model,
        model_settings=ModelSettings(tool_choice="required", temperature=0, parallel_tool_calls=False),
        tool_use_behavior="stop_on_first_tool",
    )  # fmt: skip
    result = Runner.run_sync(agent, "What is the weather in Paris?")
    assert len(calls) == 1 and result.final_output == f"Sunny in {calls[0]}"


def test_ollama_client(server):
    client = ollama.Client(host=server.base_url, timeout=60)
    question = [{"role": "user", "content": "What is a dog?"}]
    answer = client.chat(model="smol", messages=question, options={"temperature": 0, "num_predict": 16})
    assert "dog" in answer.message.content.lower() and answer.eval_count > 0
    streamed = "".join(part.message.content for part in client.chat(model="smol", messages=question, stream=True,
                                                                      options={"temperature": 0, "num_predict": 16}))
    assert streamed == answer.message.content
    generated = client.generate(model="smol", prompt="What is a dog?", options={"temperature": 0, "num_predict": 16})
    assert "dog" in generated.response.lower()
    vectors = client.embed(model="smol-embed", input=["a cat", "a dog"]).embeddings
    assert len(vectors) == 2 and len(vectors[0]) == 576
    assert {model.model for model in client.list().models} == {"smol", "smol-embed"}


def test_ollama_tool_call(server):
    """SmolLM2-135M does not choose to call a tool on its own (three prompts tried), and Ollama's API
    has no tool_choice: lllms' extension ``tool_choice`` forces the call; the ollama client reads it."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}}]
    body = {"model": "smol", "messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": tools,
            "tool_choice": "required", "parallel_tool_calls": False, "options": {"temperature": 0}, "stream": False}
    raw = httpx.post(server.url("/api/chat"), json=body, timeout=60).json()
    response = ollama.ChatResponse.model_validate(raw)
    [call] = response.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(call.function.arguments.get("city"), str)


def test_tokenize_detokenize_round_trip(server):
    text = "Local models are private and fast."
    tokens = httpx.post(server.url("/tokenize"), json={"model": "smol", "content": text, "with_pieces": True}, timeout=60).json()
    assert "".join(token["piece"] for token in tokens["tokens"]) == text and tokens["count"] == len(tokens["tokens"])
    ids = [token["id"] for token in tokens["tokens"]]
    back = httpx.post(server.url("/detokenize"), json={"model": "smol", "tokens": ids}, timeout=60).json()
    assert back["content"] == text
    bad = httpx.post(server.url("/detokenize"), json={"model": "smol", "tokens": [10**9]}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
