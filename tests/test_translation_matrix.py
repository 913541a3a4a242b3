"""Every inbound API x every provider kind, through a real Envoy, with the
official SDKs as callers: `openai`, `anthropic` and `google-genai`.

The mocks speak each provider's wire format (Gemini SSE, Anthropic events,
Bedrock's binary event-stream with a fully verified SigV4 signature), so a
passing cell means the caller's own SDK accepted what the gateway made of
the provider's answer: text, tool calls and usage, streamed and not.
"""

import json

import anthropic
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from conftest import KEYS, http

CALLERS = ["openai", "anthropic", "gemini"]

# Public model name -> (mock server, the mock's label in its answers).
TARGETS = {
    "gpt-4o-mini": "openai",
    "claude": "anthropic",
    "gemini-flash": "gemini",
    "vertex-gemini": "vertex",
    "vertex-claude": "vertex",
    "bedrock-claude": "bedrock",
}

WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "schema": {"type": "object", "properties": {"query": {"type": "string"},
                                                       "n": {"type": "integer"}}}}
TIME = {"name": "get_time", "description": "The time",
        "schema": {"type": "object", "properties": {"query": {"type": "string"},
                                                    "n": {"type": "integer"}}}}


@pytest.fixture
def clients(gateway):
    return {
        "openai": openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client-openai",
                                max_retries=0, timeout=15),
        "anthropic": anthropic.Anthropic(base_url=gateway.url, api_key="sk-ant-client",
                                         max_retries=0, timeout=15),
        "gemini": genai.Client(api_key="client-gemini-key", http_options=types.HttpOptions(
            base_url=gateway.url, api_version="v1beta", timeout=15000)),
    }


# --- one call per caller SDK, in its own idiom -------------------------------

def ask(clients, caller, model, text, stream):
    """(answer text, input tokens, output tokens) as the caller's SDK reports them."""
    if caller == "openai":
        c = clients["openai"]
        if not stream:
            r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])
            return r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens
        out, usage = "", None
        for chunk in c.chat.completions.create(
                model=model, messages=[{"role": "user", "content": text}], stream=True,
                stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                out += chunk.choices[0].delta.content
            if chunk.usage:
                usage = chunk.usage
        return out, usage.prompt_tokens, usage.completion_tokens
    if caller == "anthropic":
        c = clients["anthropic"]
        kwargs = dict(model=model, max_tokens=200, messages=[{"role": "user", "content": text}])
        if not stream:
            m = c.messages.create(**kwargs)
            assert m.type == "message" and m.stop_reason == "end_turn"
            return m.content[0].text, m.usage.input_tokens, m.usage.output_tokens
        with c.messages.stream(**kwargs) as s:
            out = "".join(s.text_stream)
            m = s.get_final_message()
        assert m.stop_reason == "end_turn"
        return out, m.usage.input_tokens, m.usage.output_tokens
    c = clients["gemini"]
    if not stream:
        r = c.models.generate_content(model=model, contents=text)
        assert r.candidates[0].finish_reason == types.FinishReason.STOP
        u = r.usage_metadata
        return r.text, u.prompt_token_count, u.candidates_token_count
    out, u = "", None
    for chunk in c.models.generate_content_stream(model=model, contents=text):
        out += chunk.text or ""
        if chunk.usage_metadata and chunk.usage_metadata.prompt_token_count:
            u = chunk.usage_metadata
    return out, u.prompt_token_count, u.candidates_token_count


def ask_tools(clients, caller, model, stream):
    """The tool calls the caller's SDK sees, as [(name, args dict)]."""
    text = "weather and time?"
    if caller == "openai":
        tools = [{"type": "function", "function": {
            "name": t["name"], "description": t["description"], "parameters": t["schema"]}}
            for t in (WEATHER, TIME)]
        c = clients["openai"]
        msgs = [{"role": "user", "content": text}]
        if not stream:
            r = c.chat.completions.create(model=model, messages=msgs, tools=tools)
            assert r.choices[0].finish_reason == "tool_calls"
            return [(tc.function.name, json.loads(tc.function.arguments))
                    for tc in r.choices[0].message.tool_calls]
        calls, finish = {}, None
        for chunk in c.chat.completions.create(model=model, messages=msgs, tools=tools,
                                               stream=True):
            for ch in chunk.choices:
                finish = ch.finish_reason or finish
                for tc in ch.delta.tool_calls or []:
                    entry = calls.setdefault(tc.index, {"name": "", "args": "", "id": None})
                    entry["id"] = tc.id or entry["id"]
                    if tc.function and tc.function.name:
                        entry["name"] += tc.function.name
                    if tc.function and tc.function.arguments:
                        entry["args"] += tc.function.arguments
        assert finish == "tool_calls"
        assert all(e["id"] for e in calls.values())
        return [(calls[i]["name"], json.loads(calls[i]["args"])) for i in sorted(calls)]
    if caller == "anthropic":
        tools = [{"name": t["name"], "description": t["description"],
                  "input_schema": t["schema"]} for t in (WEATHER, TIME)]
        c = clients["anthropic"]
        kwargs = dict(model=model, max_tokens=200, tools=tools,
                      messages=[{"role": "user", "content": text}])
        if stream:
            with c.messages.stream(**kwargs) as s:
                m = s.get_final_message()
        else:
            m = c.messages.create(**kwargs)
        assert m.stop_reason == "tool_use"
        return [(b.name, b.input) for b in m.content if b.type == "tool_use"]
    c = clients["gemini"]
    config = types.GenerateContentConfig(
        tools=[types.Tool(function_declarations=[
            types.FunctionDeclaration(name=t["name"], description=t["description"],
                                      parameters_json_schema=t["schema"])
            for t in (WEATHER, TIME)])],
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True))
    if not stream:
        r = c.models.generate_content(model=model, contents=text, config=config)
        return [(fc.name, dict(fc.args)) for fc in r.function_calls]
    calls = []
    for chunk in c.models.generate_content_stream(model=model, contents=text, config=config):
        calls += [(fc.name, dict(fc.args)) for fc in chunk.function_calls or []]
    return calls


def answer_tools(clients, caller, model):
    """A second turn carrying a tool call and its result; the answer text."""
    if caller == "openai":
        r = clients["openai"].chat.completions.create(model=model, messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"query\": \"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny 21C"}],
            tools=[{"type": "function", "function": {"name": "get_weather",
                                                     "parameters": WEATHER["schema"]}}])
        return r.choices[0].message.content
    if caller == "anthropic":
        m = clients["anthropic"].messages.create(
            model=model, max_tokens=200,
            tools=[{"name": "get_weather", "input_schema": WEATHER["schema"]}],
            messages=[
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                     "input": {"query": "Oslo"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny 21C"}]}])
        return m.content[0].text
    r = clients["gemini"].models.generate_content(
        model=model,
        contents=[
            types.Content(role="user", parts=[types.Part(text="weather?")]),
            types.Content(role="model", parts=[types.Part(function_call=types.FunctionCall(
                name="get_weather", args={"query": "Oslo"}))]),
            types.Content(role="user", parts=[types.Part(function_response=types.FunctionResponse(
                name="get_weather", response={"result": "sunny 21C"}))]),
        ],
        config=types.GenerateContentConfig(
            tools=[types.Tool(function_declarations=[types.FunctionDeclaration(
                name="get_weather", parameters_json_schema=WEATHER["schema"])])],
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True)))
    return r.text


# --- the matrix ----------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("model", list(TARGETS))
@pytest.mark.parametrize("caller", CALLERS)
def test_text_and_usage(clients, mocks, caller, model, stream):
    text, tokens_in, tokens_out = ask(clients, caller, model, "hi there", stream)
    assert text == f"Hello from the {TARGETS[model]} provider! You said: hi there"
    assert tokens_in > 0 and tokens_out > 0
    reqs = mocks[TARGETS[model]].take()
    assert len(reqs) == 1, reqs
    headers = reqs[0]["headers"]
    # The caller's credential never reaches a provider.
    for secret in ("sk-client-openai", "sk-ant-client", "client-gemini-key"):
        assert secret not in json.dumps(headers)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("model", list(TARGETS))
@pytest.mark.parametrize("caller", CALLERS)
def test_tool_calls(clients, caller, model, stream):
    calls = ask_tools(clients, caller, model, stream)
    assert [name for name, _ in calls] == ["get_weather", "get_time"]
    assert [args for _, args in calls] == [{"query": "weather and time?", "n": 0},
                                           {"query": "weather and time?", "n": 1}]


@pytest.mark.parametrize("model", list(TARGETS))
@pytest.mark.parametrize("caller", CALLERS)
def test_tool_results_round_trip(clients, caller, model):
    text = answer_tools(clients, caller, model)
    assert text.startswith("Tools said: ") and "sunny 21C" in text


# --- what each provider received ---------------------------------------------

def only(mock):
    reqs = mock.take()
    assert len(reqs) == 1, reqs
    return reqs[0], json.loads(reqs[0]["body"])


def test_gemini_provider_wire(clients, mocks):
    ask(clients, "openai", "gemini-flash", "hi there", True)
    req, body = only(mocks["gemini"])
    assert req["path"] == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert req["headers"]["host"] == "generativelanguage.googleapis.com"
    assert req["headers"]["x-goog-api-key"] == KEYS["GEMINI_API_KEY"]
    assert "authorization" not in req["headers"]
    assert body["contents"] == [{"role": "user", "parts": [{"text": "hi there"}]}]
    assert "model" not in body


def test_vertex_wire(clients, mocks):
    ask(clients, "anthropic", "vertex-gemini", "hi there", False)
    req, body = only(mocks["vertex"])
    assert req["path"] == ("/v1/projects/my-project/locations/us-east5/publishers/google/"
                           "models/gemini-2.5-pro:generateContent")
    assert req["headers"]["host"] == "us-east5-aiplatform.googleapis.com"
    assert req["headers"]["authorization"] == "Bearer " + KEYS["VERTEX_ACCESS_TOKEN"]
    assert "x-api-key" not in req["headers"] and "anthropic-version" not in req["headers"]

    ask(clients, "anthropic", "vertex-claude", "hi there", True)
    req, body = only(mocks["vertex"])
    assert req["path"] == ("/v1/projects/my-project/locations/us-east5/publishers/anthropic/"
                           "models/claude-sonnet-4-5@20250929:streamRawPredict")
    assert body["anthropic_version"] == "vertex-2023-10-16" and "model" not in body
    assert body["messages"] == [{"role": "user", "content": "hi there"}]


def test_bedrock_wire_is_signed(clients, mocks):
    ask(clients, "openai", "bedrock-claude", "hi there", False)
    req, body = only(mocks["bedrock"])
    # The mock verified the SigV4 signature in full (else it answers 403).
    assert req["path"] == "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/converse"
    assert req["headers"]["host"] == "bedrock-runtime.us-east-1.amazonaws.com"
    assert req["headers"]["authorization"].startswith(
        "AWS4-HMAC-SHA256 Credential=" + KEYS["AWS_ACCESS_KEY_ID"] + "/")
    assert req["headers"]["x-amz-security-token"] == KEYS["AWS_SESSION_TOKEN"]
    assert body["messages"] == [{"role": "user", "content": [{"text": "hi there"}]}]


def test_anthropic_caller_to_anthropic_passes_through(clients, mocks):
    m = clients["anthropic"].messages.create(
        model="claude", max_tokens=50, messages=[{"role": "user", "content": "hi there"}],
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    assert m.usage.cache_read_input_tokens == 2
    req, body = only(mocks["anthropic"])
    assert req["path"] == "/v1/messages"
    assert req["headers"]["x-api-key"] == KEYS["ANTHROPIC_API_KEY"]
    assert req["headers"]["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert "authorization" not in req["headers"]
    assert body == {"model": "claude-sonnet-4-5", "max_tokens": 50,
                    "messages": [{"role": "user", "content": "hi there"}]}


def test_anthropic_headers_do_not_reach_other_providers(clients, mocks):
    ask(clients, "anthropic", "gpt-4o-mini", "hi there", False)
    req, body = only(mocks["openai"])
    assert "anthropic-version" not in req["headers"]
    assert req["headers"]["authorization"] == "Bearer " + KEYS["OPENAI_API_KEY"]
    # OpenAI itself gets the limit under the name its reasoning models accept.
    assert body["model"] == "gpt-4o-mini" and body["max_completion_tokens"] == 200
    assert "max_tokens" not in body


def test_openai_stream_usage_is_requested_but_hidden(gateway, mocks):
    status, headers, raw = http("POST", gateway.url + "/v1/chat/completions", {
        "model": "gpt-4o-mini", "stream": True,
        "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200
    req, body = only(mocks["openai"])
    assert body["stream_options"] == {"include_usage": True}
    events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all("usage" not in c and c["choices"] for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "Hello from the openai provider! You said: hi"


# --- errors in each caller's shape ---------------------------------------------

ERROR_MODELS = ["err-429", "gemini-429", "bedrock-429"]


@pytest.mark.parametrize("model", ERROR_MODELS)
def test_rate_limits_reach_each_sdk_as_its_own_429(clients, model):
    with pytest.raises(openai.RateLimitError) as e:
        clients["openai"].chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 429
    with pytest.raises(anthropic.RateLimitError) as e:
        clients["anthropic"].messages.create(
            model=model, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "rate_limit_error"
    with pytest.raises(genai_errors.ClientError) as e:
        clients["gemini"].models.generate_content(model=model, contents="x")
    assert e.value.code == 429 and e.value.status == "RESOURCE_EXHAUSTED"


def test_unknown_model_in_each_callers_shape(clients):
    with pytest.raises(anthropic.NotFoundError) as e:
        clients["anthropic"].messages.create(
            model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "not_found_error"
    assert "nope" in e.value.body["error"]["message"]
    with pytest.raises(genai_errors.ClientError) as e:
        clients["gemini"].models.generate_content(model="nope", contents="x")
    assert e.value.code == 404 and e.value.status == "NOT_FOUND"


def test_bad_request_in_anthropic_shape(gateway):
    status, _, body = http("POST", gateway.url + "/v1/messages",
                           {"model": "claude", "messages": [{"role": "user", "content": "x"}]})
    assert status == 400
    err = json.loads(body)
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"


def test_overloaded_anthropic_reaches_each_caller(clients):
    with pytest.raises(openai.InternalServerError) as e:
        clients["openai"].chat.completions.create(
            model="claude-overloaded", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 503
    with pytest.raises(anthropic.APIStatusError) as e:
        clients["anthropic"].messages.create(
            model="claude-overloaded", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 529  # Anthropic to Anthropic: unchanged
    with pytest.raises(genai_errors.ServerError) as e:
        clients["gemini"].models.generate_content(model="claude-overloaded", contents="x")
    assert e.value.code == 503


@pytest.mark.parametrize("model", ["claude-cut", "gemini-cut", "bedrock-cut"])
@pytest.mark.parametrize("caller", CALLERS)
def test_broken_stream_ends_with_an_error_not_a_clean_end(clients, caller, model):
    with pytest.raises(Exception) as e:
        ask(clients, caller, model, "hi there", True)
    # The SDK raised an API error, not an assertion about missing data.
    assert not isinstance(e.value, (AssertionError, AttributeError, TypeError)), repr(e.value)


# --- images and JSON modes: what each provider received -----------------------

PIXEL = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def test_images_reach_each_provider_in_its_shape(clients, mocks):
    content = [{"type": "text", "text": "what is this?"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PIXEL}}]
    for model in ("claude", "gemini-flash", "bedrock-claude"):
        clients["openai"].chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}])
    _, body = only(mocks["anthropic"])
    assert body["messages"][0]["content"][1] == {
        "type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}}
    _, body = only(mocks["gemini"])
    assert body["contents"][0]["parts"][1] == {
        "inlineData": {"mimeType": "image/png", "data": PIXEL}}
    _, body = only(mocks["bedrock"])
    assert body["messages"][0]["content"][1] == {
        "image": {"format": "png", "source": {"bytes": PIXEL}}}

    # An Anthropic caller's base64 image reaches Gemini too.
    clients["anthropic"].messages.create(model="gemini-flash", max_tokens=20, messages=[
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": PIXEL}},
            {"type": "text", "text": "what is this?"}]}])
    _, body = only(mocks["gemini"])
    assert {"inlineData": {"mimeType": "image/png", "data": PIXEL}} in body["contents"][0]["parts"]


def test_json_schema_where_the_target_has_it_and_400_where_not(clients, mocks):
    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
    clients["openai"].chat.completions.create(
        model="gemini-flash", response_format=fmt,
        messages=[{"role": "user", "content": "a city"}])
    _, body = only(mocks["gemini"])
    assert body["generationConfig"]["responseMimeType"] == "application/json"
    assert body["generationConfig"]["responseJsonSchema"] == schema
    for model in ("claude", "bedrock-claude"):
        with pytest.raises(openai.BadRequestError) as e:
            clients["openai"].chat.completions.create(
                model=model, response_format=fmt,
                messages=[{"role": "user", "content": "a city"}])
        assert e.value.body["code"] == "unsupported_parameter"
        assert e.value.body["param"] == "response_format"
    assert not mocks["anthropic"].take() and not mocks["bedrock"].take()

    # A Gemini caller's JSON schema reaches an OpenAI provider as json_schema.
    clients["gemini"].models.generate_content(
        model="gpt-4o-mini", contents="a city",
        config=types.GenerateContentConfig(response_mime_type="application/json",
                                           response_json_schema=schema))
    _, body = only(mocks["openai"])
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == schema


def test_each_sdk_lists_the_models_in_its_own_shape(clients, gateway):
    names = [m["name"] for m in gateway.plugin_config["models"]]
    listed = [m.id for m in clients["anthropic"].models.list()]
    assert "claude" in listed and "gemini-flash" in listed and "vertex-claude" in listed
    assert clients["anthropic"].models.retrieve("gemini-flash").id == "gemini-flash"
    with pytest.raises(anthropic.NotFoundError):
        clients["anthropic"].models.retrieve("nope")

    listed = [m.name for m in clients["gemini"].models.list()]
    assert "models/claude" in listed and "models/gpt-4o-mini" in listed
    assert set(names) <= {n.removeprefix("models/") for n in listed}
    got = clients["gemini"].models.get(model="claude")
    assert got.name == "models/claude"
    assert "generateContent" in got.supported_actions
