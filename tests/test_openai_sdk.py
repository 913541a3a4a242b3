"""End to end with the official `openai` Python SDK as the client."""

import json

import openai
import pytest

from conftest import KEYS


@pytest.fixture
def client(gateway):
    # The SDK's key goes to the gateway, which must never forward it.
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client-not-forwarded",
                         max_retries=0, timeout=15)


def test_sdk_lists_models(client, gateway):
    ids = [m.id for m in client.models.list()]
    assert "gpt-4o-mini" in ids and "mini" in ids and "llama-3.3-70b" in ids
    model = client.models.retrieve("deepseek-chat")
    assert model.id == "deepseek-chat" and model.owned_by == "deepseek"


def test_sdk_chat_non_streamed(client, mocks):
    resp = client.chat.completions.create(
        model="mini", messages=[{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "what is a mesh"}])
    assert resp.choices[0].message.content.endswith("You said: what is a mesh")
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    assert resp.model == "gpt-4o-mini"
    got = mocks["openai"].take()
    assert len(got) == 1
    assert got[0]["headers"]["authorization"] == "Bearer " + KEYS["OPENAI_API_KEY"]
    assert "sk-client-not-forwarded" not in json.dumps(got[0])


def test_sdk_raw_response_headers_name_the_provider(client):
    raw = client.chat.completions.with_raw_response.create(
        model="llama-3.3-70b", messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-meshllm-provider"] == "groq"
    assert raw.headers["x-meshllm-model"] == "llama-3.3-70b-versatile"
    assert raw.parse().choices[0].message.content


def test_sdk_chat_streamed_with_usage(client, mocks):
    stream = client.chat.completions.create(
        model="gpt-4o", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "stream please"}])
    text, usage, chunks = "", None, 0
    for chunk in stream:
        chunks += 1
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert chunks > 3
    assert text.endswith("You said: stream please")
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    sent = json.loads(mocks["openai"].take()[0]["body"])
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_sdk_embeddings(client):
    resp = client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert len(resp.data) == 1 and len(resp.data[0].embedding) == 8
    assert resp.usage.prompt_tokens == 1


def test_sdk_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found"
    assert "gpt-9" in e.value.message


def test_sdk_bad_request_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-4o", messages="not a list")
    assert e.value.code == "invalid_type" and e.value.param == "messages"


def test_sdk_rate_limit_raises_rate_limit_error(client):
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="err-429", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "rate_limit_exceeded"


def test_sdk_unreachable_provider_raises_server_error(client):
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="dead-model", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 503
    assert e.value.code == "provider_unavailable"
