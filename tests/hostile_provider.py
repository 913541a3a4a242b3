"""A provider that misbehaves on purpose, for the error-shape tests.

It speaks just enough of three wire formats (OpenAI chat completions,
Anthropic messages, Gemini generateContent) to answer successfully, and
otherwise does what the upstream model name says:

  hostile-fixture-<stem>  replays tests/fixtures/hostile/errors/<stem>.<ext>:
                          status from the name's leading digits, content type
                          from the extension; `{{credential}}` in the file is
                          replaced by the credential the request carried
  hostile-big             a normal answer whose text is `big_bytes` long
  hostile-big-<n>         a normal answer whose text is n bytes long
  hostile-short           a normal answer's headers and `content-length`, half
                          of its body, then the connection is closed
  hostile-stall           waits (up to 30 s, or until `release()`) before
                          answering, so per-try timeouts fire
anything else             a normal, short answer

The model is read from the body (OpenAI, Anthropic) or from the path
(Gemini: `/models/{model}:generateContent`); setting `behaviour` to one of
these names applies it to every request instead.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "envoy" / "tools"))
import mock_provider  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hostile" / "errors"
CONTENT_TYPES = {
    ".txt": "text/plain; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".bin": "application/octet-stream",
}


def fixtures():
    """Every replayable error: stem → (status, content type, body bytes)."""
    out = {}
    for path in sorted(FIXTURES.iterdir()):
        if path.suffix not in CONTENT_TYPES:
            continue
        status = int(path.stem.split("-", 1)[0])
        out[path.stem] = (status, CONTENT_TYPES[path.suffix], path.read_bytes())
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hostile-provider"

    def log_message(self, fmt, *args):
        pass

    # Chunked or content-length bodies, as the recording mock reads them.
    read_body = mock_provider.Handler.read_body

    def send_bytes(self, status, content_type, data, declared=None):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data) if declared is None else declared))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def do_POST(self):
        body = self.read_body()
        path = self.path.split("?")[0]
        with self.server.lock:
            self.server.requests.append({"path": self.path, "body": body,
                                         "headers": {k.lower(): v for k, v in self.headers.items()}})
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            req = {}
        if ":generateContent" in path or ":streamGenerateContent" in path:
            api = "gemini"
            model = unquote(path.rsplit("/", 1)[-1].split(":")[0])
        elif path.endswith("/messages"):
            api, model = "anthropic", req.get("model", "")
        else:
            api, model = "openai", req.get("model", "")
        model = self.server.behaviour or model
        if model.startswith("hostile-fixture-"):
            status, content_type, data = self.server.fixtures[model[len("hostile-fixture-"):]]
            credential = (self.headers.get("authorization") or self.headers.get("x-api-key")
                          or self.headers.get("x-goog-api-key") or "")
            data = data.replace(b"{{credential}}", credential.encode())
            return self.send_bytes(status, content_type, data)
        if model == "hostile-stall":
            self.server.gate.wait(30)
        text = "hello from the hostile provider"
        if model == "hostile-big":
            text = "x" * self.server.big_bytes
        elif model.startswith("hostile-big-"):
            text = "x" * int(model[len("hostile-big-"):])
        data = json.dumps(answer(api, model, text)).encode()
        if model == "hostile-short":
            self.send_bytes(200, "application/json", data[: len(data) // 2], declared=len(data))
            self.close_connection = True
            self.connection.shutdown(2)
            return None
        return self.send_bytes(200, "application/json", data)


def answer(api, model, text):
    """A complete, successful answer in the provider's API."""
    if api == "anthropic":
        return {"id": "msg_hostile", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 5}}
    if api == "gemini":
        return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 5,
                                  "totalTokenCount": 8},
                "modelVersion": model}
    return {"id": "chatcmpl-hostile", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}


class HostileProvider(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, big_bytes=1 << 20):
        super().__init__(("127.0.0.1", 0), Handler)
        self.big_bytes = big_bytes
        self.behaviour = None
        self.fixtures = fixtures()
        self.requests = []
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.thread = None

    def handle_error(self, request, client_address):
        # Envoy resets stalled and cut-short exchanges on purpose; what the
        # caller got is what the tests judge.
        pass

    @property
    def port(self):
        return self.server_address[1]

    def start(self):
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()
        return self

    def release(self):
        """Lets stalled requests answer."""
        self.gate.set()

    def stop(self):
        self.gate.set()
        self.shutdown()
        self.server_close()
