"""OpenAI's surface beyond chat through a real Envoy, with the official SDKs
as clients: the Responses API served by OpenAI and Azure OpenAI as
themselves (stored responses, built-in tools, stream ends), OpenAI's
completions, images, audio (multipart uploads), moderations, files and
batches, and Anthropic's count_tokens. Every provider request is counted at
the mocks: nothing lost, nothing sent twice, no client credential passed."""

import asyncio
import concurrent.futures
import json

import anthropic
import httpx
import openai
import pytest

from conftest import KEYS

CLIENT_KEY = "sk-client-not-forwarded"
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 4
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(255, -1, -1)) * 4


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=CLIENT_KEY,
                         max_retries=0, timeout=15)


def only(mock, path_suffix):
    """The one request the mock saw, which went to `path_suffix`."""
    sent = mock.take()
    assert len(sent) == 1, [s["path"] for s in sent]
    assert sent[0]["path"].split("?")[0].endswith(path_suffix), sent[0]["path"]
    assert CLIENT_KEY not in json.dumps(sent[0]), "a client credential reached the provider"
    return sent[0]


# ---- the Responses API at OpenAI ------------------------------------------

def test_openai_serves_responses_as_itself_with_its_stored_state(client, mocks):
    first = client.responses.create(model="mini", input="remember the mesh", store=True,
                                    tools=[{"type": "web_search"}])
    sent = only(mocks["openai"], "/v1/responses")
    body = json.loads(sent["body"])
    assert body["model"] == "gpt-4o-mini", "the alias became the upstream name"
    assert body["store"] is True and body["tools"] == [{"type": "web_search"}]
    assert sent["headers"]["authorization"] == f"Bearer {KEYS['OPENAI_API_KEY']}"
    # OpenAI's own answer and usage, cached and reasoning tokens included.
    assert first.object == "response" and first.output_text.endswith("remember the mesh")
    assert first.usage.input_tokens_details.cached_tokens == 2
    assert first.usage.output_tokens_details.reasoning_tokens == 1

    follow = client.responses.create(model="mini", input="and now?",
                                     previous_response_id=first.id)
    assert json.loads(only(mocks["openai"], "/v1/responses")["body"])[
        "previous_response_id"] == first.id
    assert follow.previous_response_id == first.id

    # Stored responses name no model: they go to the default provider.
    again = client.responses.retrieve(first.id)
    assert again.id == first.id and again.output_text == first.output_text
    got = only(mocks["openai"], f"/v1/responses/{first.id}")
    assert got["method"] == "GET"
    client.responses.delete(first.id)
    assert only(mocks["openai"], f"/v1/responses/{first.id}")["method"] == "DELETE"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    mocks["openai"].take()


def test_a_request_passes_byte_for_byte_when_nothing_changes(gateway, mocks):
    raw = b'{ "input" :"as is",\n  "model":"gpt-4o-mini", "metadata": {"model": "mini"} }'
    r = httpx.post(gateway.url + "/v1/responses", content=raw, timeout=15,
                   headers={"content-type": "application/json",
                            "authorization": f"Bearer {CLIENT_KEY}"})
    assert r.status_code == 200, r.text
    assert only(mocks["openai"], "/v1/responses")["body"].encode() == raw


def test_an_openai_responses_stream_passes_and_is_counted(client, mocks, gateway):
    before = gateway.metric("meshllm_tokens_total", gen_ai_request_model="gpt-4o-mini",
                            gen_ai_token_type="input")
    with client.responses.stream(model="gpt-4o-mini", input="stream it") as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert final.output_text.endswith("stream it")
    only(mocks["openai"], "/v1/responses")
    after = gateway.metric("meshllm_tokens_total", gen_ai_request_model="gpt-4o-mini",
                           gen_ai_token_type="input")
    assert after - before == final.usage.input_tokens


def test_an_openai_responses_stream_that_breaks_ends_failed(client, mocks):
    with client.responses.stream(model="openai-cut", input="cut me off") as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert "response.completed" not in kinds
    assert kinds[-2:] == ["error", "response.failed"], kinds
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers)), "sequence numbers stay in order"
    only(mocks["openai"], "/v1/responses")


def test_azure_serves_responses_on_its_v1_api_with_the_deployment(client, mocks):
    resp = client.responses.create(model="azure-gpt-4o", input="hello azure")
    assert resp.output_text.endswith("hello azure")
    sent = only(mocks["azure"], "/openai/v1/responses")
    assert json.loads(sent["body"])["model"] == "gpt-4o"
    assert sent["headers"]["api-key"] == KEYS["AZURE_OPENAI_API_KEY"]


def test_a_mixed_route_keeps_openai_for_what_only_openai_serves(client, mocks):
    # `smart`: gpt-4o, then claude-sonnet, then vertex-gemini.
    raw = client.responses.with_raw_response.create(
        model="smart", input="x", tools=[{"type": "file_search", "vector_store_ids": ["vs_1"]}])
    assert raw.headers["x-meshllm-provider"] == "openai"
    only(mocks["openai"], "/v1/responses")
    # Elsewhere, a clear 400 in the Responses shape naming the field.
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="claude-sonnet", input="x", previous_response_id="r")
    assert e.value.param == "previous_response_id"
    assert mocks["anthropic"].take() == []


# ---- completions, images, audio, moderations --------------------------------

def test_completions_plain_and_streamed(client, mocks, gateway):
    done = client.completions.create(model="instruct", prompt="say hi", max_tokens=20)
    assert done.object == "text_completion" and done.choices[0].text
    assert json.loads(only(mocks["openai"], "/v1/completions")["body"])["model"] == \
        "gpt-3.5-turbo-instruct"
    chunks = list(client.completions.create(model="instruct", prompt="say hi", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert all(c.usage is None for c in chunks), "usage the caller did not ask for stays hidden"
    body = json.loads(only(mocks["openai"], "/v1/completions")["body"])
    assert body["stream_options"] == {"include_usage": True}
    assert gateway.metric("meshllm_requests_total", gen_ai_operation_name="text_completion",
                          gen_ai_request_model="instruct", error_type=None) >= 2
    # Azure: the deployment's own URL.
    client.completions.create(model="azure-instruct", prompt="hi")
    only(mocks["azure"], "/openai/deployments/instruct-prod/completions")


def test_images_generate_and_edit_with_a_multipart_upload(client, mocks):
    gen = client.images.generate(model="image-editor", prompt="a mesh of cats")
    assert gen.data and gen.data[0].b64_json
    assert json.loads(only(mocks["openai"], "/v1/images/generations")["body"])["model"] == \
        "gpt-image-1"
    # No model: routed as OpenAI serves it, by its default model.
    client.images.generate(prompt="default model")
    only(mocks["openai"], "/v1/images/generations")

    edit = client.images.edit(model="image-editor", prompt="add a hat",
                              image=("cat.png", PNG, "image/png"))
    assert edit.data
    sent = mocks["openai"].take()
    assert len(sent) == 1 and sent[0]["path"] == "/v1/images/edits"
    assert sent[0]["headers"]["content-type"].startswith("multipart/form-data; boundary=")
    form = sent[0]["body"]
    assert "\r\n\r\ngpt-image-1\r\n" in form and "image-editor" not in form
    assert CLIENT_KEY not in json.dumps(sent[0])


def test_image_variations_and_audio_translations_are_forms_too(client, mocks, gateway):
    var = client.images.create_variation(model="dall-e-2", image=("cat.png", PNG, "image/png"), n=2)
    assert len(var.data) == 2 and var.data[0].b64_json
    sent = only(mocks["openai"], "/v1/images/variations")
    assert "\r\n\r\ndall-e-2\r\n" in sent["body"] and 'filename="cat.png"' in sent["body"]
    # No model: OpenAI's default for variations, as routed.
    client.images.create_variation(image=("cat.png", PNG, "image/png"))
    only(mocks["openai"], "/v1/images/variations")
    text = client.audio.translations.create(model="whisper", file=("talk.wav", WAV, "audio/wav"))
    assert str(len(WAV)) in text.text, "the upload arrived whole"
    sent = only(mocks["openai"], "/v1/audio/translations")
    assert "\r\n\r\nwhisper-1\r\n" in sent["body"] and "whisper\r\n" not in sent["body"]
    assert CLIENT_KEY not in json.dumps(sent)
    assert gateway.metric("meshllm_requests_total", gen_ai_request_model="whisper",
                          error_type=None) >= 1


def test_audio_transcription_upload_and_speech(client, mocks, gateway):
    text = client.audio.transcriptions.create(model="whisper", file=("talk.wav", WAV, "audio/wav"))
    assert str(len(WAV)) in text.text, "the upload arrived whole"
    sent = only(mocks["openai"], "/v1/audio/transcriptions")
    assert "\r\n\r\nwhisper-1\r\n" in sent["body"]
    speech = client.audio.speech.create(model="tts", voice="alloy", input="hello mesh")
    assert speech.read().startswith(b"ID3")
    assert json.loads(only(mocks["openai"], "/v1/audio/speech")["body"])["model"] == "tts-1"
    assert gateway.metric("meshllm_requests_total", gen_ai_operation_name="transcription",
                          gen_ai_request_model="whisper", error_type=None) >= 1


def test_moderations_with_and_without_a_model(client, mocks):
    flagged = client.moderations.create(input="how to kill a process")
    assert flagged.results[0].flagged
    only(mocks["openai"], "/v1/moderations")
    client.moderations.create(model="omni-moderation-latest", input=["fine", "also fine"])
    only(mocks["openai"], "/v1/moderations")


def test_an_endpoint_the_provider_lacks_is_a_clear_400(client, mocks):
    for call in (lambda: client.completions.create(model="claude-sonnet", prompt="x"),
                 lambda: client.images.generate(model="gemini-flash", prompt="x"),
                 lambda: client.moderations.create(model="azure-gpt-4o", input="x")):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.param == "model" and "which has no" in e.value.message
    assert all(m.take() == [] for m in mocks.values())


# ---- files and batches ------------------------------------------------------

def test_files_and_batches_reach_the_default_provider(client, mocks, gateway):
    jsonl = b'{"custom_id":"1","method":"POST","url":"/v1/chat/completions","body":{}}\n'
    f = client.files.create(file=("in.jsonl", jsonl, "application/jsonl"), purpose="batch")
    sent = only(mocks["openai"], "/v1/files")
    assert sent["headers"]["authorization"] == f"Bearer {KEYS['OPENAI_API_KEY']}"
    assert jsonl.decode() in sent["body"]
    got = client.files.with_raw_response.retrieve(f.id)
    assert got.headers["x-meshllm-provider"] == "openai"
    assert got.parse().filename == "in.jsonl"
    assert client.files.content(f.id).read() == jsonl
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    assert client.batches.retrieve(batch.id).input_file_id == f.id
    assert client.batches.cancel(batch.id).status == "cancelling"
    assert client.files.delete(f.id).deleted
    paths = [s["path"] for s in mocks["openai"].take()]
    assert paths == [f"/v1/files/{f.id}", f"/v1/files/{f.id}/content", "/v1/batches",
                     f"/v1/batches/{batch.id}", f"/v1/batches/{batch.id}/cancel",
                     f"/v1/files/{f.id}"]
    assert gateway.metric("meshllm_requests_total", gen_ai_operation_name="files",
                          gen_ai_provider_name="openai") >= 4


def test_a_forged_cluster_header_cannot_redirect_a_stored_object_call(gateway, mocks):
    r = httpx.get(gateway.url + "/v1/files", timeout=15,
                  headers={"x-meshllm-cluster": "anthropic", "authorization": "Bearer x"})
    assert r.status_code == 200, r.text
    assert mocks["anthropic"].take() == []
    only(mocks["openai"], "/v1/files")


# ---- Anthropic's count_tokens ----------------------------------------------

def test_anthropic_count_tokens(gateway, mocks):
    client = anthropic.Anthropic(base_url=gateway.url, api_key=CLIENT_KEY, max_retries=0)
    counted = client.messages.count_tokens(
        model="claude", messages=[{"role": "user", "content": "count these four words"}])
    assert counted.input_tokens > 0
    sent = only(mocks["anthropic"], "/v1/messages/count_tokens")
    assert json.loads(sent["body"])["model"] == "claude-sonnet-4-5"
    assert sent["headers"]["x-api-key"] == KEYS["ANTHROPIC_API_KEY"]


# ---- under load --------------------------------------------------------------

def test_64_concurrent_calls_across_the_endpoints_each_reach_the_provider_once(client, mocks):
    calls = {
        "completions": lambda i: client.completions.create(model="instruct", prompt=f"n{i}"),
        "transcriptions": lambda i: client.audio.transcriptions.create(
            model="whisper", file=(f"t{i}.wav", WAV, "audio/wav")),
        "moderations": lambda i: client.moderations.create(input=f"n{i}"),
        "responses": lambda i: client.responses.create(model="mini", input=f"n{i}"),
    }
    jobs = [(name, i) for i in range(16) for name in calls]
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        list(pool.map(lambda job: calls[job[0]](job[1]), jobs))
    sent = mocks["openai"].take()
    assert len(sent) == len(jobs)
    for name in calls:
        bodies = [s["body"] for s in sent if s["path"].endswith(name)]
        assert len(bodies) == 16, name
        for i in range(16):
            assert sum(f"n{i}\"" in b or f"t{i}.wav" in b for b in bodies) == 1, (name, i)


# ---- faults and limits ---------------------------------------------------------

def test_a_provider_error_quoting_its_key_is_scrubbed_on_passed_endpoints(client, mocks):
    for call in (lambda: client.completions.create(model="leak", prompt="x"),
                 lambda: client.responses.create(model="leak", input="x")):
        with pytest.raises(openai.AuthenticationError) as e:
            call()
        assert KEYS["OPENAI_API_KEY"] not in json.dumps(e.value.body)
        assert KEYS["OPENAI_API_KEY"] not in e.value.response.text
    assert len(mocks["openai"].take()) == 2


def test_uploads_to_files_stream_through_and_held_uploads_are_bounded(client, mocks, gateway):
    # The test gateway holds at most 256 KiB of a request body.
    big = bytes(range(256)) * 4096 + b"\n"  # 1 MiB + 1
    f = client.files.create(file=("big.jsonl", big, "application/jsonl"), purpose="batch")
    assert f.bytes == len(big)
    assert len(only(mocks["openai"], "/v1/files")["body"]) > len(big)
    assert client.files.content(f.id).read() == big
    mocks["openai"].take()
    # A transcription is routed by a field of its form, so it is held: 413.
    with pytest.raises(openai.APIStatusError) as e:
        client.audio.transcriptions.create(model="whisper", file=("big.wav", big, "audio/wav"))
    assert e.value.status_code == 413 and e.value.code == "request_too_large"
    assert mocks["openai"].take() == []


# ---- the OpenAI Agents SDK ----------------------------------------------------

def test_an_agents_sdk_agent_with_a_tool_runs_on_anthropic(gateway, mocks):
    """`openai-agents` speaks the Responses API; through the gateway its
    one-tool agent runs on Claude: the tool call, its result, the answer."""
    import agents  # openai-agents (tests/requirements.txt)
    agents.set_tracing_disabled(True)  # traces would go to OpenAI
    asked = []

    @agents.function_tool
    def weather(query: str, n: int) -> str:
        """The weather for a place."""
        asked.append(query)
        return f"sunny in {query}"

    def forecaster():
        # A client per event loop: its connections belong to the loop.
        model = agents.OpenAIResponsesModel(
            model="claude-sonnet",
            openai_client=openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=CLIENT_KEY,
                                             max_retries=0, timeout=15))
        return agents.Agent(name="forecaster", instructions="Use the tool.", tools=[weather],
                            model=model)
    result = agents.Runner.run_sync(forecaster(), "Oslo")
    assert asked == ["Oslo"]
    assert result.final_output == "Tools said: sunny in Oslo", result.final_output
    sent = mocks["anthropic"].take()
    assert [s["path"] for s in sent] == ["/v1/messages", "/v1/messages"]
    second = json.loads(sent[1]["body"])
    assert second["messages"][-1]["content"][0]["type"] == "tool_result"
    assert CLIENT_KEY not in json.dumps(sent)

    # Streamed, as agent UIs run it.
    async def streamed():
        run = agents.Runner.run_streamed(forecaster(), "Rome")
        kinds = [event.type async for event in run.stream_events()]
        return run.final_output, kinds
    final, kinds = asyncio.run(streamed())
    assert final == "Tools said: sunny in Rome" and asked == ["Oslo", "Rome"]
    assert "raw_response_event" in kinds
    assert len(mocks["anthropic"].take()) == 2


def test_an_openai_compatible_server_that_serves_responses_gets_them_as_they_are(wasm, mocks):
    """`responses_api: true` on an OpenAI-compatible provider (vLLM, Groq,
    OpenRouter serve /v1/responses): the caller's request goes as it is."""
    from conftest import Envoy, free_port, gateway_plugin_config
    cfg = gateway_plugin_config(free_port())
    for p in cfg["providers"]:
        if p["name"] == "groq":
            p["responses_api"] = True
    upstreams = {name: ("127.0.0.1", m.port) for name, m in mocks.items()}
    env = Envoy(cfg, upstreams=upstreams, env=KEYS)
    try:
        env.wait_ready()
        client = openai.OpenAI(base_url=env.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
        resp = client.responses.create(model="llama-3.3-70b", input="as it is", store=False)
        assert resp.output_text.endswith("as it is")
        sent = only(mocks["groq"], "/openai/v1/responses")
        assert json.loads(sent["body"])["model"] == "llama-3.3-70b-versatile"
        with client.responses.stream(model="llama-3.3-70b", input="streamed") as s:
            assert [e.type for e in s][-1] == "response.completed"
        only(mocks["groq"], "/openai/v1/responses")
    finally:
        env.stop()
