"""The OpenAI Responses API (`client.responses`) through a real Envoy, with
the official SDK as the client, to every provider kind (OpenAI as itself,
the others through the chat pivot): plain, streamed, a tool call with its
result sent back, JSON schema output. OpenAI's own Responses features are in
test_openai_surface.py."""

import json

import openai
import pytest

from conftest import KEYS

# (model, mock) for each provider kind the example config routes to.
TARGETS = [
    ("gpt-4o-mini", "openai"),
    ("claude-sonnet", "anthropic"),
    ("gemini-flash", "gemini"),
    ("bedrock-claude", "bedrock"),
    ("llama-3.3-70b", "groq"),
]
WEATHER = {"type": "function", "name": "weather", "description": "Weather now",
           "parameters": {"type": "object", "properties": {"query": {"type": "string"},
                                                          "n": {"type": "integer"}}}}


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client-not-forwarded",
                         max_retries=0, timeout=15)


def mock_of(mocks, name):
    return mocks[name] if name in mocks else mocks["openai"]


@pytest.mark.parametrize("model,mock", TARGETS)
def test_create_answers_in_the_responses_shape(client, mocks, model, mock):
    resp = client.responses.create(model=model, instructions="Be brief.",
                                   input="what is a mesh", max_output_tokens=100)
    assert resp.object == "response" and resp.status == "completed"
    assert resp.output_text.endswith("You said: what is a mesh"), resp.output_text
    assert resp.output[0].type == "message" and resp.output[0].role == "assistant"
    assert resp.usage.input_tokens > 0 and resp.usage.output_tokens > 0
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    sent = mock_of(mocks, mock).take()
    assert len(sent) == 1
    assert "sk-client-not-forwarded" not in json.dumps(sent[0])
    assert "Be brief." in sent[0]["body"], "the instructions reach the provider"


def test_metrics_and_quota_headers_count_responses_calls_as_chat(client, gateway):
    raw = client.responses.with_raw_response.create(model="claude-sonnet", input="count me")
    assert raw.headers["x-meshllm-provider"] == "anthropic"
    assert raw.parse().output_text
    assert gateway.metric("meshllm_requests_total", gen_ai_request_model="claude-sonnet",
                          gen_ai_operation_name="chat", error_type=None) >= 1


@pytest.mark.parametrize("model,mock", TARGETS)
def test_streamed_events_build_the_same_text(client, mocks, model, mock):
    with client.responses.stream(model=model, input="stream please") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert final.output_text.endswith("You said: stream please"), final.output_text
    assert final.usage is not None and final.usage.output_tokens > 0
    assert len(mock_of(mocks, mock).take()) == 1


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet", "gemini-flash"])
def test_a_tool_call_round_trip(client, model):
    first = client.responses.create(model=model, input="weather in Oslo", tools=[WEATHER])
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name == "weather"
    assert json.loads(calls[0].arguments)["query"] == "weather in Oslo"
    follow = [{"role": "user", "content": "weather in Oslo"}, *[
        {"type": "function_call", "call_id": c.call_id, "name": c.name,
         "arguments": c.arguments} for c in calls]] + [
        {"type": "function_call_output", "call_id": c.call_id, "output": f"{i}C"}
        for i, c in enumerate(calls)]
    second = client.responses.create(model=model, input=follow, tools=[WEATHER])
    assert second.output_text.startswith("Tools said: "), second.output_text
    assert "0C" in second.output_text


def test_streamed_tool_calls_arrive_as_argument_deltas(client):
    with client.responses.stream(model="claude-sonnet", input="weather in Rome",
                                 tools=[WEATHER]) as stream:
        deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert calls and "".join(deltas).startswith(calls[0].arguments[:5])
    assert json.loads(calls[0].arguments)["query"] == "weather in Rome"


def test_what_only_openai_can_do_is_a_clear_400(client):
    for kwargs, param in [({"previous_response_id": "resp_1"}, "previous_response_id"),
                          ({"store": True}, "store"),
                          ({"tools": [{"type": "web_search"}]}, "tools")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="claude-sonnet", input="x", **kwargs)
        assert e.value.param == param and "only available on OpenAI" in e.value.message


def test_a_broken_stream_ends_failed_not_completed(client):
    with client.responses.stream(model="claude-cut", input="cut me off") as stream:
        kinds = [event.type for event in stream]
    assert "response.completed" not in kinds
    assert kinds[-1] == "response.failed" and "error" in kinds


CITY = {"type": "json_schema", "name": "city", "strict": True,
        "schema": {"type": "object", "properties": {"city_name": {"type": "string"}},
                   "required": ["city_name"], "additionalProperties": False}}


@pytest.mark.parametrize("model,mock,carried", [
    ("gpt-4o-mini", "openai", lambda b: b["text"]["format"] == CITY),
    ("llama-3.3-70b", "groq",
     lambda b: b["response_format"]["json_schema"]["schema"] == CITY["schema"]),
    ("gemini-flash", "gemini",
     lambda b: b["generationConfig"]["responseJsonSchema"] == CITY["schema"]),
])
def test_json_schema_output_reaches_providers_that_have_it(client, mocks, model, mock, carried):
    resp = client.responses.create(model=model, input="a city", text={"format": CITY})
    assert resp.status == "completed"
    (sent,) = mocks[mock].take()
    assert carried(json.loads(sent["body"])), sent["body"]


@pytest.mark.parametrize("model", ["claude-sonnet", "bedrock-claude"])
def test_json_schema_output_elsewhere_is_a_400_naming_text(client, mocks, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=model, input="a city", text={"format": CITY})
    assert e.value.param == "text" and "'text.format'" in e.value.message, e.value.message
    assert all(m.take() == [] for m in mocks.values())
