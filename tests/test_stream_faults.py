"""Hostile provider streams through a real Envoy running the built filter.

A scripted provider replays the corpus in tests/fixtures/hostile/streams/
(the same bytes the native tests replay; see its README) for every caller
API (OpenAI, Anthropic, Gemini) on every provider API (OpenAI, Anthropic,
Gemini, Bedrock):

* an event whose data is not JSON (and, for Bedrock, a frame that fails its
  CRC) ends the caller's stream with an error event in the caller's shape:
  the text before it arrives, nothing after it, no clean end;
* an error event quoting the provider key reaches the caller redacted, even
  when the key arrives split across two network writes;
* a lone UTF-16 surrogate escape is valid JSON: the stream completes;
* an event over 16 MiB ends the stream with an error; one of 15 MiB passes.

The official SDKs show the caller's side: each raises instead of returning
a truncated answer.
"""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anthropic
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from conftest import Envoy, http

CORPUS = Path(__file__).resolve().parent / "fixtures" / "hostile" / "streams"
# The key every provider here has; the corpus quotes it.
KEY = "hostile-key/0123456789abcdef"
KEY_FORMS = (KEY, KEY.replace("/", "\\/"), "0123456789abcdef")
MIB = 1024 * 1024

CALLERS = ["openai", "anthropic", "gemini"]
PROVIDERS = ["openai", "anthropic", "gemini", "bedrock"]
FAULTS = {p: ["corrupt"] for p in PROVIDERS}
FAULTS["bedrock"] = ["corrupt", "bad_frame"]


RESPONSES_STEMS = ["responses_corrupt", "responses_giant_15mib", "responses_giant_17mib"]


def corpus_file(stem):
    ext = ".bin" if stem.startswith("bedrock") else ".sse"
    return CORPUS / (stem + ext)


def script(stem):
    """The provider's body for the model `stem` (a corpus file name, or a
    giant template name with its size: `openai_giant_15mib`)."""
    giant = re.fullmatch(r"(\w+_giant)_(\d+)mib", stem)
    if giant:
        template = corpus_file(giant.group(1)).read_bytes()
        return template.replace(b"@@FILL@@", b"x" * (int(giant.group(2)) * MIB), 1)
    return corpus_file(stem).read_bytes()


def pieces(body):
    """How the provider writes `body`: cut in the middle of the key when it
    quotes one, else in three parts, giant bodies 1 MiB at a time."""
    if len(body) > MIB:
        return [body[i:i + MIB] for i in range(0, len(body), MIB)]
    for form in (KEY.replace("/", "\\/").encode(), KEY.encode()):
        at = body.find(form)
        if at >= 0:
            cut = at + len(form) // 2
            return [body[:cut], body[cut:]]
    third = max(1, len(body) // 3)
    return [body[:third], body[third:2 * third], body[2 * third:]]


class ScriptedProvider:
    """Answers every streamed call with the corpus file its model names,
    whatever the API (the model is in the body, or in the Gemini and
    Bedrock paths)."""

    def __init__(self):
        self.seen = []
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                if "chunked" in self.headers.get("transfer-encoding", ""):
                    body = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        body += self.rfile.read(size)
                        self.rfile.readline()
                else:
                    body = self.rfile.read(int(self.headers.get("content-length") or 0))
                path = self.path.split("?")[0]
                m = re.search(r"/models/([^/:]+):streamGenerateContent$", path) or \
                    re.search(r"^/model/([^/]+)/converse-stream$", path)
                model = m.group(1) if m else json.loads(body).get("model", "")
                provider.seen.append((path, model))
                data = script(model)
                kind = ("application/vnd.amazon.eventstream" if model.startswith("bedrock")
                        else "text/event-stream")
                self.send_response(200)
                self.send_header("content-type", kind)
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for piece in pieces(data):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def stems():
    out = []
    for p in PROVIDERS:
        out += [f"{p}_{kind}" for kind in FAULTS[p] + ["error_secret", "lone_surrogate"]]
        if p != "bedrock":
            out += [f"{p}_giant_15mib", f"{p}_giant_17mib"]
    return out


@pytest.fixture(scope="module")
def scripted():
    server = ScriptedProvider().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def faults_gateway(wasm, scripted):
    config = {
        "providers": [
            {"name": "openai", "kind": "openai", "api_key_env": "HOSTILE_KEY"},
            {"name": "anthropic", "kind": "anthropic", "api_key_env": "HOSTILE_KEY"},
            {"name": "gemini", "kind": "gemini", "api_key_env": "HOSTILE_KEY"},
            {"name": "bedrock", "kind": "bedrock", "region": "us-east-1"},
        ],
        # The model name is the corpus file the provider plays.
        "models": [{"name": s, "provider": s.split("_")[0], "model": s} for s in stems()]
        # OpenAI serving Responses callers as themselves (the stream watched).
        + [{"name": s, "provider": "openai", "model": s} for s in RESPONSES_STEMS],
    }
    env = {"HOSTILE_KEY": KEY, "AWS_ACCESS_KEY_ID": "AKIDHOSTILE",
           "AWS_SECRET_ACCESS_KEY": KEY}
    upstreams = {p: ("127.0.0.1", scripted.port) for p in PROVIDERS}
    gateway = Envoy(config, upstreams=upstreams, env=env)
    try:
        gateway.wait_ready()
        yield gateway
    finally:
        gateway.stop()


# --- the caller's side, read raw ---------------------------------------------

def ask(gateway, caller, model):
    """(status, body bytes) of a streamed call in the caller's API."""
    if caller == "openai":
        return http("POST", gateway.url + "/v1/chat/completions", {
            "model": model, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}]}, timeout=60)[::2]
    if caller == "anthropic":
        return http("POST", gateway.url + "/v1/messages", {
            "model": model, "max_tokens": 100, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]},
            headers={"anthropic-version": "2023-06-01", "x-api-key": "client"},
            timeout=60)[::2]
    return http("POST", gateway.url + f"/v1beta/models/{model}:streamGenerateContent?alt=sse",
                {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
                headers={"x-goog-api-key": "client"}, timeout=60)[::2]


def sse(body):
    """[(event name, data)] as an SSE client dispatches them."""
    events, name, data = [], None, []
    for line in re.split(r"\r\n|\r|\n", body.decode("utf-8", "replace")):
        if line == "":
            if data:
                events.append((name, "\n".join(data)))
            name, data = None, []
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
    return events


def loads(data):
    try:
        return json.loads(data)
    except ValueError:
        return None


def is_error(caller, event):
    name, data = event
    if caller == "anthropic":
        return name == "error"
    v = loads(data)
    return isinstance(v, dict) and isinstance(v.get("error"), dict)


def finished(caller, events):
    """Whether anything in the stream marks the answer complete."""
    if caller == "openai":
        return any(d == "[DONE]" for _, d in events)
    if caller == "anthropic":
        return any(n == "message_stop" for n, _ in events)
    return any(c.get("finishReason") for _, d in events
               for c in ((loads(d) or {}).get("candidates") or []))


def text(caller, events):
    out = ""
    for _, data in events:
        v = loads(data) or {}
        if caller == "openai":
            for c in v.get("choices") or []:
                out += (c.get("delta") or {}).get("content") or ""
        elif caller == "anthropic":
            out += (v.get("delta") or {}).get("text") or ""
        else:
            for c in v.get("candidates") or []:
                out += "".join(p.get("text", "") for p in (c.get("content") or {}).get("parts", []))
    return out


def error_end(caller, body, what):
    """The error object the stream ends with; it is the only error, comes
    last, and nothing marks the answer complete."""
    events = sse(body)
    assert events, what
    assert is_error(caller, events[-1]), f"{what}: {body[-600:]!r}"
    assert sum(is_error(caller, e) for e in events) == 1, what
    assert not finished(caller, events), f"{what}: {body[-600:]!r}"
    v = json.loads(events[-1][1])
    if caller == "anthropic":
        assert v["type"] == "error" and isinstance(v["error"]["type"], str), what
    elif caller == "gemini":
        assert isinstance(v["error"]["code"], int) and isinstance(v["error"]["status"], str), what
    else:
        assert isinstance(v["error"]["type"], str), what
    return v["error"]


def clean_end(caller, body, what):
    events = sse(body)
    assert not any(is_error(caller, e) for e in events), f"{what}: {body[-600:]!r}"
    if caller == "openai":
        assert events[-1][1] == "[DONE]", what
    elif caller == "anthropic":
        assert events[-1][0] == "message_stop", what
    else:
        assert (loads(events[-1][1]) or {})["candidates"][0]["finishReason"] == "STOP", what
    return events


def assert_fault(caller, error, code, what):
    """A 502 in the caller's terms, naming what went wrong."""
    if caller == "anthropic":
        assert error["type"] == "api_error", what
    elif caller == "gemini":
        assert (error["code"], error["status"]) == (502, "UNAVAILABLE"), what
        assert error["details"][0]["reason"] == code.upper(), what
    else:
        assert (error["type"], error["code"]) == ("server_error", code), what


PAIRS = [(c, p) for c in CALLERS for p in PROVIDERS]


@pytest.mark.parametrize("caller,provider", PAIRS)
def test_a_corrupt_event_ends_the_stream_with_an_error(faults_gateway, caller, provider):
    for kind in FAULTS[provider]:
        what = f"{caller} caller, {provider} provider, {kind}"
        status, body = ask(faults_gateway, caller, f"{provider}_{kind}")
        assert status == 200, what
        error = error_end(caller, body, what)
        assert_fault(caller, error, "invalid_provider_response", what)
        assert "could not read" in error["message"], what
        assert text(caller, sse(body)) == "Before the fault.", what
        assert b"lost wo" not in body and b"After the fault" not in body, what


@pytest.mark.parametrize("caller,provider", PAIRS)
def test_a_key_in_a_streamed_error_is_redacted(faults_gateway, caller, provider):
    what = f"{caller} caller, {provider} provider"
    status, body = ask(faults_gateway, caller, f"{provider}_error_secret")
    assert status == 200, what
    for form in KEY_FORMS:
        assert form.encode() not in body, f"{what}: {body!r}"
    error = error_end(caller, body, what)
    assert "[redacted]" in error["message"], what
    assert text(caller, sse(body)) == "Before the error.", what


@pytest.mark.parametrize("caller,provider", PAIRS)
def test_a_lone_surrogate_is_a_valid_event(faults_gateway, caller, provider):
    what = f"{caller} caller, {provider} provider"
    status, body = ask(faults_gateway, caller, f"{provider}_lone_surrogate")
    assert status == 200, what
    events = clean_end(caller, body, what)
    if caller == provider:
        # Passed on byte for byte: the caller's JSON parser reads the escape.
        assert body == script(f"{provider}_lone_surrogate"), what
        assert text(caller, events) == "Hello end \ud800x", what
    else:
        assert text(caller, events) == "Hello end \ufffdx", what


GIANT_PAIRS = [(c, p) for c in CALLERS for p in PROVIDERS if p != "bedrock"]


@pytest.mark.parametrize("caller,provider", GIANT_PAIRS)
def test_an_event_over_16_mib_ends_the_stream_and_15_mib_passes(faults_gateway, caller, provider):
    what = f"{caller} caller, {provider} provider"
    status, body = ask(faults_gateway, caller, f"{provider}_giant_15mib")
    assert status == 200, what
    answer = text(caller, clean_end(caller, body, what))
    assert answer == "Before the giant." + "x" * (15 * MIB) + " After the giant.", what

    status, body = ask(faults_gateway, caller, f"{provider}_giant_17mib")
    assert status == 200, what
    assert len(body) < MIB, what
    error = error_end(caller, body, what)
    assert_fault(caller, error, "provider_event_too_large", what)
    assert "larger than 16 MiB" in error["message"], what
    assert text(caller, sse(body)) == "Before the giant.", what


# --- the official SDKs --------------------------------------------------------

def openai_client(gateway):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client", max_retries=0,
                         timeout=30)


def anthropic_client(gateway):
    return anthropic.Anthropic(base_url=gateway.url, api_key="sk-ant-client", max_retries=0,
                               timeout=30)


def gemini_client(gateway):
    return genai.Client(api_key="client", http_options=types.HttpOptions(
        base_url=gateway.url, api_version="v1beta", timeout=30000))


def openai_stream(gateway, model, got):
    for chunk in openai_client(gateway).chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            got.append(chunk.choices[0].delta.content)


def anthropic_stream(gateway, model, got):
    with anthropic_client(gateway).messages.stream(
            model=model, max_tokens=100, messages=[{"role": "user", "content": "hi"}]) as s:
        for piece in s.text_stream:
            got.append(piece)
        return s.get_final_message()


def gemini_stream(gateway, model, got):
    last = None
    client = gemini_client(gateway)  # held: a collected client closes its connection
    for chunk in client.models.generate_content_stream(model=model, contents="hi"):
        got.append(chunk.text or "")
        last = chunk
    return last


@pytest.mark.parametrize("provider", ["anthropic", "openai", "bedrock"])
def test_the_openai_sdk_raises_on_a_corrupt_event(faults_gateway, provider):
    got = []
    with pytest.raises(openai.APIError) as raised:
        openai_stream(faults_gateway, f"{provider}_corrupt", got)
    assert "".join(got) == "Before the fault."
    assert "could not read" in str(raised.value)


@pytest.mark.parametrize("provider", ["gemini", "anthropic"])
def test_the_anthropic_sdk_raises_on_a_corrupt_event(faults_gateway, provider):
    got = []
    with pytest.raises(anthropic.APIError) as raised:
        anthropic_stream(faults_gateway, f"{provider}_corrupt", got)
    assert "".join(got) == "Before the fault."
    assert "could not read" in str(raised.value)


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_the_genai_sdk_raises_on_a_corrupt_event(faults_gateway, provider):
    got = []
    with pytest.raises(genai_errors.APIError) as raised:
        gemini_stream(faults_gateway, f"{provider}_corrupt", got)
    assert "".join(got) == "Before the fault."
    assert raised.value.code == 502
    assert "could not read" in str(raised.value)


def test_each_sdk_raises_a_redacted_error_for_a_key_in_a_stream(faults_gateway):
    cases = [
        (openai_stream, "openai_error_secret", openai.APIError),
        (openai_stream, "bedrock_error_secret", openai.APIError),
        (anthropic_stream, "anthropic_error_secret", anthropic.APIError),
        (gemini_stream, "gemini_error_secret", genai_errors.APIError),
    ]
    for stream, model, error in cases:
        got = []
        with pytest.raises(error) as raised:
            stream(faults_gateway, model, got)
        assert "".join(got) == "Before the error.", model
        message = str(raised.value)
        assert "[redacted]" in message, model
        assert not any(form in message for form in KEY_FORMS), model


def test_each_sdk_completes_a_stream_with_a_lone_surrogate(faults_gateway):
    got = []
    openai_stream(faults_gateway, "gemini_lone_surrogate", got)
    assert "".join(got) == "Hello end \ufffdx"
    got = []
    message = anthropic_stream(faults_gateway, "anthropic_lone_surrogate", got)
    assert message.stop_reason == "end_turn"
    assert "".join(got).startswith("Hello end ")
    got = []
    last = gemini_stream(faults_gateway, "gemini_lone_surrogate", got)
    assert last.candidates[0].finish_reason == types.FinishReason.STOP
    assert "".join(got).startswith("Hello end ")


# --- OpenAI's own Responses streams, watched on their way to Responses callers ---

def responses_stream(gateway, model):
    status, body = http("POST", gateway.url + "/v1/responses", {
        "model": model, "input": "hi", "stream": True}, timeout=60)[::2]
    assert status == 200, model
    events = [(name, loads(data)) for name, data in sse(body)]
    assert all(isinstance(v, dict) and v.get("type") == name for name, v in events), model
    kinds = [name for name, _ in events]
    text = "".join(v["delta"] for name, v in events if name == "response.output_text.delta")
    numbers = [v["sequence_number"] for _, v in events]
    assert numbers == sorted(set(numbers)), f"{model}: sequence numbers {numbers[-4:]}"
    return kinds, text, events


def test_a_responses_stream_ends_with_error_and_failed_at_a_corrupt_event(faults_gateway):
    kinds, text, events = responses_stream(faults_gateway, "responses_corrupt")
    assert text == "Before the fault.", "nothing of the cut event or after it"
    assert kinds[-2:] == ["error", "response.failed"] and "response.completed" not in kinds
    assert events[-2][1]["code"] == "invalid_provider_response"


def test_a_giant_responses_event_passes_under_the_limit_and_ends_the_stream_over_it(
        faults_gateway):
    kinds, text, _ = responses_stream(faults_gateway, "responses_giant_15mib")
    assert text == "Before the giant." + "x" * (15 * MIB) + " After the giant."
    assert kinds[-1] == "response.completed" and "error" not in kinds
    kinds, text, _ = responses_stream(faults_gateway, "responses_giant_17mib")
    assert text == "Before the giant."
    assert kinds[-2:] == ["error", "response.failed"] and "response.completed" not in kinds
