"""A provider that breaks off a streamed answer after it began, through a real
Envoy: what the caller sees, byte for byte and through the SDKs.

Envoy gives the filter no chance to add an error event when the provider's
connection is reset or closed mid-body, or when a stalled stream times out:
the filter's last callback is the access log, and Envoy cuts the caller's
HTTP/1.1 response without its terminating zero-length chunk (HTTP/2: a
stream reset). So the caller sees a cut connection, never a clean end. When
the provider instead ends the HTTP response cleanly without the stream's end
marker, the filter does add an error event (the last case below)."""

import json
import shutil
import socket
import struct
import subprocess
import threading
from http.client import HTTPConnection, IncompleteRead

import anthropic
import openai
import pytest

from conftest import KEYS, Envoy, http, wait_for

OPENAI_EVENTS = [
    {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x",
     "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello"},
                  "finish_reason": None}]},
    {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x",
     "choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": None}]},
]
ANTHROPIC_EVENTS = [
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0,
                             "content_block": {"type": "text", "text": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "Hello"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": " there"}}),
]


def sse(path):
    """The events a provider sends before it breaks off, in its own framing."""
    if path.endswith("/messages"):
        return [f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                for name, data in ANTHROPIC_EVENTS]
    return [f"data: {json.dumps(e)}\n\n".encode() for e in OPENAI_EVENTS]


class BreakingProvider:
    """Answers every request with a 200 event stream, sends a few events and
    then, as `ending` says:
      reset   resets the connection (SO_LINGER 0): a TCP RST
      close   closes it (FIN) without the chunked body's terminating chunk
      stall   sends nothing more until the test ends
      eof     a body without chunking or length, ended by closing: a clean
              HTTP end that lacks the stream's end marker
    """

    def __init__(self, ending):
        self.ending = ending
        self.paths = []
        self.done = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn):
        with conn, conn.makefile("rb") as reader:
            request_line = reader.readline().split()
            length = 0
            for line in iter(reader.readline, b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            reader.read(length)
            path = request_line[1].decode()
            self.paths.append(path)
            events = sse(path)
            head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            if self.ending == "eof":
                conn.sendall(head + b"connection: close\r\n\r\n" + b"".join(events))
                return
            conn.sendall(head + b"transfer-encoding: chunked\r\n\r\n" + b"".join(
                b"%x\r\n%s\r\n" % (len(e), e) for e in events))
            if self.ending == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif self.ending == "stall":
                self.done.wait()

    def stop(self):
        self.done.set()
        self.sock.close()


CONFIG = {
    "providers": [
        {"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"},
        {"name": "anthropic", "kind": "anthropic", "api_key_env": "ANTHROPIC_API_KEY"},
    ],
    "models": [
        {"name": "gpt", "provider": "openai", "model": "gpt-x"},
        {"name": "claude", "provider": "anthropic", "model": "claude-x"},
    ],
    # The first target breaks off mid-stream: the second is never tried.
    "routes": [{"name": "chain", "targets": ["gpt", "claude"]}],
}


def timeouts(route=None, idle=None):
    """A bootstrap edit: the route's timeout, the connection manager's stream
    idle timeout (Envoy's default 5 minutes when unset)."""
    def edit(bootstrap):
        hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
            "typed_config"]
        if idle:
            hcm["stream_idle_timeout"] = idle
        for vhost in hcm["route_config"]["virtual_hosts"]:
            for r in vhost["routes"]:
                if route and "route" in r:
                    r["route"]["timeout"] = route
    return edit


@pytest.fixture(scope="module",
                params=["reset", "close", "stall-route-timeout", "stall-idle-timeout"])
def broken(request, wasm):
    """(Envoy, provider, the response flag Envoy logs for the cut)."""
    ending = request.param.split("-")[0]
    provider = BreakingProvider(ending)
    edit, flag = {
        # Long enough that the answer starts first on a loaded machine.
        "stall-route-timeout": (timeouts(route="3s"), "UT"),
        "stall-idle-timeout": (timeouts(idle="3s"), "SI"),
    }.get(request.param, (None, "UPE"))
    upstreams = {p: ("127.0.0.1", provider.port) for p in ("openai", "anthropic")}
    env = Envoy(CONFIG, upstreams=upstreams, env=KEYS, bootstrap_edit=edit)
    try:
        env.wait_ready()
        yield env, provider, flag
    finally:
        provider.stop()
        env.stop()


def raw_stream(env, model):
    """(status, bytes before the end, the exception the end raised or None)."""
    conn = HTTPConnection("127.0.0.1", env.port, timeout=60)
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.getheader("transfer-encoding") == "chunked"
    got = b""
    try:
        while chunk := resp.read1(65536):
            got += chunk
        return resp.status, got, None
    except IncompleteRead as e:
        return resp.status, got, e
    finally:
        conn.close()


def log_line(env, model, after):
    """The access-log line of the request for `model` made after `after` lines."""
    def found():
        return [json.loads(l) for l in env.access_log_lines()[after:]
                if json.loads(l)["request_model"] == model]
    assert wait_for(found), env.access_log_lines()
    return found()[-1]


@pytest.mark.parametrize("model", ["gpt", "claude", "chain"],
                         ids=["passthrough", "translated", "failover-two-halves"])
def test_a_cut_stream_reaches_the_caller_as_a_cut_connection(broken, model):
    env, provider, flag = broken
    provider.paths.clear()
    logged = len(env.access_log_lines())
    status, got, cut = raw_stream(env, model)
    assert status == 200
    # Every event sent before the break reached the caller, and nothing after
    # it: no error event, no [DONE], and no terminating chunk.
    assert isinstance(cut, IncompleteRead), got
    text = got.decode()
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == \
        "Hello there"
    assert "[DONE]" not in text and '"error"' not in text
    if model == "gpt":
        assert got == b"".join(sse("/v1/chat/completions"))  # passed through untouched
    # One provider request: nothing is retried once the answer started.
    assert provider.paths == ["/v1/messages" if model == "claude" else "/v1/chat/completions"]
    line = log_line(env, model, logged)
    assert (line["status"], line["response_flags"]) == (200, flag)
    assert line["attempts"] == "1"


def causes(error):
    """The messages of an exception and of what caused it."""
    text = ""
    while error is not None:
        text += f"{error}\n"
        error = error.__cause__ or error.__context__
    return text


def test_the_sdks_raise_on_a_cut_stream(broken):
    """Each SDK raises a connection error after the text that arrived."""
    env, _, _ = broken
    client = openai.OpenAI(base_url=env.url + "/v1", api_key="unused", max_retries=0,
                           timeout=60)
    text = ""
    with pytest.raises(openai.APIConnectionError) as raised:
        for chunk in client.chat.completions.create(
                model="claude", stream=True, messages=[{"role": "user", "content": "hi"}]):
            text += chunk.choices[0].delta.content or ""
    assert text == "Hello there"
    assert "incomplete chunked read" in causes(raised.value)

    claude = anthropic.Anthropic(base_url=env.url, api_key="unused", max_retries=0,
                                 timeout=60)
    text = ""
    with pytest.raises(anthropic.APIConnectionError) as raised:
        with claude.messages.stream(model="gpt", max_tokens=20,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
            for piece in stream.text_stream:
                text += piece
    assert text == "Hello there"
    assert "incomplete chunked read" in causes(raised.value)


@pytest.mark.skipif(not shutil.which("curl"), reason="curl (HTTP/2 client) not installed")
def test_an_http2_caller_sees_its_stream_reset(broken):
    env, _, _ = broken
    body = {"model": "claude", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    result = subprocess.run(
        ["curl", "-sS", "-N", "--http2-prior-knowledge", "--max-time", "60",
         env.url + "/v1/chat/completions", "-H", "content-type: application/json",
         "-d", json.dumps(body)],
        capture_output=True, text=True, timeout=90)
    # curl's "HTTP/2 stream was not closed cleanly" (RST_STREAM), not a clean end.
    assert result.returncode == 92, (result.returncode, result.stderr)
    assert "not closed cleanly" in result.stderr
    assert "[DONE]" not in result.stdout


@pytest.mark.parametrize("model", ["gpt", "claude"], ids=["passthrough", "translated"])
def test_a_clean_end_without_the_end_marker_gets_an_error_event(wasm, model):
    """The contrast: the provider's HTTP response ends cleanly, so the filter
    sees the end of the stream and adds an error event before it."""
    provider = BreakingProvider("eof")
    upstreams = {p: ("127.0.0.1", provider.port) for p in ("openai", "anthropic")}
    env = Envoy(CONFIG, upstreams=upstreams, env=KEYS)
    try:
        env.wait_ready()
        status, got, cut = raw_stream(env, model)
        assert (status, cut) == (200, None)
        last = [l for l in got.decode().splitlines() if l.startswith("data: ")][-1]
        assert json.loads(last[6:])["error"]["code"] == "stream_interrupted"
        assert "[DONE]" not in got.decode()
        # The SDK raises it as an API error.
        client = openai.OpenAI(base_url=env.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError, match="ended before completion"):
            for _ in client.chat.completions.create(
                    model=model, stream=True, messages=[{"role": "user", "content": "hi"}]):
                pass
        assert http("GET", env.admin + "/ready")[0] == 200
    finally:
        provider.stop()
        env.stop()
