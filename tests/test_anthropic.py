"""OpenAI callers reaching Anthropic models: the request is translated to the
Messages API and the answer (streamed or not, tool calls included) back to
OpenAI's shape, through a real Envoy, with the official `openai` SDK."""

import json

import openai
import pytest

from conftest import KEYS, http

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}},
    {"type": "function", "function": {
        "name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client-not-forwarded",
                         max_retries=0, timeout=15)


def sent_to_anthropic(mocks):
    reqs = mocks["anthropic"].take()
    assert len(reqs) == 1, reqs
    return reqs[0], json.loads(reqs[0]["body"])


def test_chat_is_translated_to_messages_and_back(client, mocks):
    resp = client.chat.completions.create(
        model="claude", temperature=0.2, stop=["END"],
        messages=[{"role": "system", "content": "be brief"},
                  {"role": "user", "content": "hi claude"}])
    assert resp.choices[0].message.content == "Hello from the anthropic provider! You said: hi claude"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.object == "chat.completion"
    assert resp.model == "claude-sonnet-4-5"
    assert resp.usage.prompt_tokens_details.cached_tokens == 2
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens

    req, body = sent_to_anthropic(mocks)
    assert req["path"] == "/v1/messages"
    assert req["headers"]["host"] == "api.anthropic.com"
    assert req["headers"]["x-api-key"] == KEYS["ANTHROPIC_API_KEY"]
    assert req["headers"]["anthropic-version"] == "2023-06-01"
    assert "authorization" not in req["headers"]
    assert int(req["headers"]["content-length"]) == len(req["body"].encode())
    assert body["model"] == "claude-sonnet-4-5"
    assert body["system"] == "be brief"
    assert body["messages"] == [{"role": "user", "content": "hi claude"}]
    assert body["max_tokens"] == 4096  # Anthropic requires one; the provider default
    assert body["temperature"] == 0.2 and body["stop_sequences"] == ["END"]


def test_streamed_chat_with_usage(client, mocks):
    stream = client.chat.completions.create(
        model="claude-sonnet", stream=True, stream_options={"include_usage": True},
        max_tokens=50, messages=[{"role": "user", "content": "stream it"}])
    text, finish, usage = "", None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text == "Hello from the anthropic provider! You said: stream it"
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens > 0
    _, body = sent_to_anthropic(mocks)
    assert body["stream"] is True and body["max_tokens"] == 50
    assert "stream_options" not in body


def test_stream_without_usage_request_has_no_usage_chunk(gateway):
    status, _, raw = http("POST", gateway.url + "/v1/chat/completions",
                          {"model": "claude", "stream": True,
                           "messages": [{"role": "user", "content": "x"}]})
    assert status == 200
    events = [e for e in raw.decode().split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(c["choices"] for c in chunks), "no usage-only chunk unless asked"
    assert all("usage" not in c or c["usage"] is None for c in chunks)


def test_parallel_tool_calls_round_trip(client, mocks):
    first = client.chat.completions.create(
        model="claude", tools=TOOLS, tool_choice="required",
        messages=[{"role": "user", "content": "weather and time"}])
    msg = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in msg.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(msg.tool_calls[0].function.arguments) == {"query": "weather and time", "n": 0}
    _, body = sent_to_anthropic(mocks)
    assert body["tool_choice"] == {"type": "any"}
    assert body["tools"][0] == {"name": "get_weather", "description": "Weather for a city",
                                "input_schema": TOOLS[0]["function"]["parameters"]}

    second = client.chat.completions.create(
        model="claude", tools=TOOLS,
        messages=[{"role": "user", "content": "weather and time"},
                  msg.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "sunny"},
                  {"role": "tool", "tool_call_id": msg.tool_calls[1].id, "content": "noon"}])
    assert second.choices[0].message.content == "Tools said: sunny; noon"
    _, body = sent_to_anthropic(mocks)
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant", "user"], "tool results merge into one user turn"
    results = body["messages"][2]["content"]
    assert [r["tool_use_id"] for r in results] == [c.id for c in msg.tool_calls]
    assert body["messages"][1]["content"][0]["type"] == "tool_use"


def test_streamed_tool_calls_reassemble_by_index(client):
    stream = client.chat.completions.create(
        model="claude", tools=TOOLS, stream=True,
        messages=[{"role": "user", "content": "tools please"}])
    calls, finish = {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        for tc in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "args": ""})
            entry["id"] = tc.id or entry["id"]
            if tc.function:
                entry["name"] = tc.function.name or entry["name"]
                entry["args"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert sorted(calls) == [0, 1]
    assert [calls[i]["name"] for i in (0, 1)] == ["get_weather", "get_time"]
    assert all(calls[i]["id"].startswith("toolu_") for i in (0, 1))
    assert json.loads(calls[1]["args"]) == {"query": "tools please", "n": 1}


def test_anthropic_overloaded_becomes_503_openai_error(client):
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="claude-overloaded",
                                       messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 503
    assert e.value.body["type"] == "server_error"
    assert "Overloaded" in e.value.message


def test_broken_stream_ends_with_an_error_event(client, gateway):
    status, _, raw = http("POST", gateway.url + "/v1/chat/completions",
                          {"model": "claude-cut", "stream": True,
                           "messages": [{"role": "user", "content": "x"}]})
    text = raw.decode()
    assert status == 200
    assert "[DONE]" not in text
    last = [e for e in text.split("\n\n") if e.strip()][-1]
    assert json.loads(last[len("data: "):])["error"]["code"] == "stream_interrupted"
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(
                model="claude-cut", stream=True, messages=[{"role": "user", "content": "x"}]):
            pass


def test_embeddings_to_anthropic_are_refused(gateway, mocks):
    status, _, body = http("POST", gateway.url + "/v1/embeddings",
                           {"model": "claude", "input": "x"})
    assert status == 400
    assert json.loads(body)["error"]["code"] == "unsupported_operation"
    assert not mocks["anthropic"].take()


def test_json_schema_response_format_is_a_clear_400(gateway, mocks):
    status, _, body = http("POST", gateway.url + "/v1/chat/completions", {
        "model": "claude", "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "x", "schema": {"type": "object"}}}})
    assert status == 400
    err = json.loads(body)["error"]
    assert err["param"] == "response_format"
    assert not mocks["anthropic"].take()
