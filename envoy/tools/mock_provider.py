#!/usr/bin/env python3
"""An OpenAI-compatible mock provider: the demo upstream of `make run` and
the recording upstream of the integration tests.

It answers chat completions (streamed and not, with usage) and embeddings on
any path ending in /chat/completions or /embeddings (so Azure deployment
paths work too), and records every request it receives. Paths are matched
by their end, whatever their prefix (/v1, Azure's /openai/v1 or deployment
paths), query strings ignored; multipart/form-data bodies (on the upload
paths below) are parsed as such, with the stdlib, and recorded raw.

The rest of OpenAI's API, shaped so the official SDK parses it:
  .../responses             the Responses API: a `message` output item, or up
                            to two `function_call` items when function tools
                            are offered and the last input item is no
                            function_call_output ("Tools said: ..." then);
                            usage with cached_tokens 2 and reasoning_tokens 1;
                            streamed as typed events with sequence_number.
                            Stored unless "store": false: GET and DELETE
                            .../responses/{id}; an unknown previous_response_id
                            is a 400 previous_response_not_found, a known one
                            carries its conversation into the next turn
  .../completions           the legacy text completions (not chat), streamed
                            or not
  .../images/generations    one tiny PNG per image (b64_json, or a data: url),
  .../images/edits          with revised_prompt and usage; edits are multipart
  .../images/variations     multipart: one tiny PNG per image asked for
  .../audio/transcriptions  multipart: "transcribed <N> bytes of <filename>",
  .../audio/translations    as json, verbose_json, text, srt or vtt
  .../audio/speech          audio bytes (b"ID3" + the input for mp3)
  .../moderations           flagged (violence) when the input says "kill"
  .../files                 multipart upload kept in memory; GET lists, GET
                            .../files/{id}[/content], DELETE .../files/{id}
  .../batches               create (status "validating", input file must
                            exist), GET one or all, POST .../{id}/cancel
Unknown ids are 404s, and every error is OpenAI-shaped. The scripted models
below apply to all of these (for multipart bodies, the `model` form field).

Behaviour is chosen by the upstream model name, so tests can script it:
  mock-429        429, OpenAI-shaped rate-limit error with retry-after
  mock-500-text   500 with a plain-text body
  mock-400-detail 400 with a FastAPI-style {"detail": ...} body
  mock-echo-key   401 whose message quotes the credential it received
  mock-gated      streams its first chunk (or event), then waits for release()
                  before sending the rest (proves the gateway does not buffer)
  mock-overloaded (Anthropic) 529 overloaded_error
  mock-500        500 with an OpenAI-shaped error
  mock-503        503 with an OpenAI-shaped error
  mock-429-wait   429 with retry-after: 30
  mock-reset      closes the connection without answering
  mock-stall      waits 5 s before answering (longer than a test per-try timeout)
  mock-slow       answers normally after 300 ms
  mock-split      (OpenAI chat, streamed) five characters an event, so words
                  and secrets are split across events
  mock-cut        (streamed) ends the HTTP response cleanly part-way, without
                  the closing event (Anthropic's message_stop, the Responses
                  API's response.completed after two deltas, legacy
                  completions' [DONE]; Gemini's and Bedrock's streams too),
                  like a provider that broke off
Anything else gets a normal answer.

Paths ending in /messages speak Anthropic's Messages API (x-api-key and
anthropic-version required; event-stream framing when streamed; tool_use
blocks for each offered tool, up to two, unless the last turn holds tool
results); /messages/count_tokens answers {"input_tokens": N}, the word count
of the messages and system prompt, with the same header checks. Vertex AI's
`:rawPredict` / `:streamRawPredict` paths speak it too, with the model in
the URL, `anthropic_version` in the body and a bearer token.

Paths ending in `:generateContent` / `:streamGenerateContent` speak the
Gemini API (x-goog-api-key, or a bearer token on Vertex AI paths).

Paths `/model/{id}/converse` and `/converse-stream` speak Bedrock Converse:
the SigV4 signature is verified in full against the secret given to the
mock (`aws_secret`), and streams use the AWS event-stream framing.

Every kind offers tool calls the same way: when the request offers tools and
its last turn holds no tool results, the answer calls up to two of them.
"""

import argparse
import email.message
import email.utils
import hashlib
import hmac
import json
import os
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import eventstream  # noqa: E402  (the AWS event-stream encoder, next to this file)


def words(text):
    return max(1, len(str(text).split()))


def last_user_text(messages):
    for m in reversed(messages or []):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, list):
                return " ".join(p.get("text", "") for p in c if isinstance(p, dict))
            return str(c)
    return ""


def new_id(prefix):
    return prefix + uuid.uuid4().hex[:24]


# A valid 1x1 PNG: what every generated or edited image is.
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="

# Paths whose requests are multipart/form-data uploads.
MULTIPART_PATHS = ("/images/edits", "/images/variations", "/audio/transcriptions",
                   "/audio/translations", "/files")


def header_param(value, header, param):
    """A parameter of a header value (boundary=, name=, filename=), unquoted."""
    msg = email.message.Message()
    msg[header] = value
    got = msg.get_param(param, header=header)
    return email.utils.collapse_rfc2231_value(got) if got is not None else None


def parse_multipart(body, content_type):
    """The (fields, files) of a multipart/form-data body: fields maps each
    text part's name to its value (a list for names ending in "[]"), files
    lists the file parts as dicts of name, filename, content_type and data.
    ValueError when the body is not multipart."""
    boundary = header_param(content_type, "content-type", "boundary")
    if not boundary:
        raise ValueError("multipart/form-data without a boundary")
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    if len(chunks) < 2:
        raise ValueError("no multipart boundary in the body")
    fields, files = {}, []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            return fields, files
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a multipart part without a blank line after its headers")
        headers = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        name = header_param(disposition, "content-disposition", "name")
        filename = header_param(disposition, "content-disposition", "filename")
        if name is None:
            raise ValueError("a multipart part without a name")
        if filename is not None:
            files.append({"name": name, "filename": filename, "data": data,
                          "content_type": headers.get("content-type", "application/octet-stream")})
        elif name.endswith("[]"):
            fields.setdefault(name, []).append(data.decode("utf-8", "replace"))
        else:
            fields[name] = data.decode("utf-8", "replace")
    raise ValueError("multipart body without its closing boundary")


def response_items(value):
    """The Responses API's `input` as a list of items."""
    if isinstance(value, list):
        return [i for i in value if isinstance(i, dict)]
    return [] if value is None else [{"role": "user", "content": str(value)}]


def item_text(item):
    """The words a Responses input or output item carries."""
    kind = item.get("type")
    if kind == "function_call":
        return str(item.get("arguments", ""))
    value = item.get("output") if kind == "function_call_output" else item.get("content")
    if isinstance(value, list):
        return " ".join(str(p["text"]) for p in value if isinstance(p, dict) and "text" in p)
    return "" if value is None else str(value)


def last_user_item_text(items):
    for item in reversed(items):
        if item.get("role") == "user" and item.get("type", "message") == "message":
            return item_text(item)
    return ""


def anthropic_text(content):
    """The words of an Anthropic content value (a string or blocks)."""
    if isinstance(content, list):
        return " ".join(b.get("text", "") if b.get("type") == "text" else json.dumps(b)
                        for b in content if isinstance(b, dict))
    return "" if content is None else str(content)


MODERATION_CATEGORIES = [
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/instructions", "self-harm/intent", "sexual",
    "sexual/minors", "violence", "violence/graphic"]
# The categories OpenAI's omni-moderation also judges images for.
MODERATION_IMAGE_CATEGORIES = {"self-harm", "self-harm/instructions", "self-harm/intent", "sexual",
                               "violence", "violence/graphic"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mock-provider"

    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write("mock: " + fmt % args + "\n")

    # --- request reading -------------------------------------------------
    def read_body(self):
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def record(self, body):
        entry = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.decode("utf-8", "replace"),
        }
        with self.server.lock:
            self.server.requests.append(entry)
            del self.server.requests[:-1000]

    # --- responses -------------------------------------------------------
    def send_json(self, status, obj, extra=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def send_text(self, status, text):
        data = text.encode()
        self.send_response(status)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_bytes(self, status, data, content_type):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def openai_error(self, status, message, param=None, code=None, kind="invalid_request_error"):
        return self.send_json(status, {"error": {"message": message, "type": kind,
                                                 "param": param, "code": code}})

    def segments(self):
        """The path's segments, padded in front so [-3] always exists."""
        return ["", ""] + self.path.split("?")[0].split("/")

    def do_GET(self):
        if self.path == "/__mock/requests":
            with self.server.lock:
                return self.send_json(200, list(self.server.requests))
        self.record(b"")
        seg = self.segments()
        if seg[-2] == "responses":
            return self.response_retrieve(seg[-1])
        if seg[-1] == "files":
            return self.file_list()
        if seg[-2] == "files":
            return self.file_retrieve(seg[-1])
        if seg[-3] == "files" and seg[-1] == "content":
            return self.file_content(seg[-2])
        if seg[-1] == "batches":
            return self.batch_list()
        if seg[-2] == "batches":
            return self.batch_retrieve(seg[-1])
        self.send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_DELETE(self):
        if self.path == "/__mock/requests":
            with self.server.lock:
                self.server.requests.clear()
            return self.send_json(200, {})
        self.record(self.read_body())
        seg = self.segments()
        if seg[-2] == "responses":
            return self.response_delete(seg[-1])
        if seg[-2] == "files":
            return self.file_delete(seg[-1])
        self.send_json(404, {})

    def do_POST(self):
        body = self.read_body()
        self.record(body)
        path = self.path.split("?")[0]
        files = []
        if self.headers.get("content-type", "").lower().startswith("multipart/form-data") \
                and path.endswith(MULTIPART_PATHS):
            try:
                req, files = parse_multipart(body, self.headers["content-type"])
            except ValueError as e:
                return self.openai_error(400, f"bad multipart body: {e}")
        else:
            try:
                req = json.loads(body or b"{}")
            except ValueError:
                return self.send_json(400, {"error": {"message": "bad json", "type": "invalid_request_error"}})
        if ":generateContent" in path or ":streamGenerateContent" in path:
            return self.gemini(req, path)
        if path.endswith(":rawPredict") or path.endswith(":streamRawPredict"):
            return self.vertex_anthropic(req, path)
        if path.startswith("/model/") and (path.endswith("/converse") or path.endswith("/converse-stream")):
            return self.bedrock(req, body, path)
        model = req.get("model", "")
        if self.failover_behaviour(model):
            return None
        if model == "mock-429":
            return self.send_json(
                429,
                {"error": {"message": "Rate limit reached for requests", "type": "requests",
                           "param": None, "code": "rate_limit_exceeded"}},
                {"retry-after": "1"},
            )
        if model == "mock-500-text":
            return self.send_text(500, "upstream exploded")
        if model == "mock-400-detail":
            return self.send_json(400, {"detail": "temperature must be <= 2"})
        if model == "mock-echo-key":
            cred = self.headers.get("authorization") or self.headers.get("api-key") or ""
            return self.send_json(401, {"error": {"message": f"Incorrect API key provided: {cred}",
                                                  "type": "invalid_request_error", "param": None,
                                                  "code": "invalid_api_key"}})
        if path.endswith("/messages/count_tokens"):
            return self.anthropic_count_tokens(req)
        if path.endswith("/messages"):
            return self.anthropic(req)
        if path.endswith("/chat/completions"):
            return self.chat(req)
        if path.endswith("/completions"):
            return self.completions(req)
        if path.endswith("/embeddings"):
            return self.embeddings(req)
        if path.endswith("/responses"):
            return self.responses_create(req)
        if path.endswith("/images/generations"):
            return self.images(req)
        if path.endswith("/images/edits"):
            return self.images(req, files, edit=True)
        if path.endswith("/images/variations"):
            return self.image_variations(req, files)
        if path.endswith("/audio/transcriptions"):
            return self.transcription(req, files, "transcribe")
        if path.endswith("/audio/translations"):
            return self.transcription(req, files, "translate")
        if path.endswith("/audio/speech"):
            return self.speech(req)
        if path.endswith("/moderations"):
            return self.moderations(req)
        if path.endswith("/files"):
            return self.file_upload(req, files)
        if path.endswith("/batches"):
            return self.batch_create(req)
        seg = self.segments()
        if seg[-3] == "batches" and seg[-1] == "cancel":
            return self.batch_cancel(seg[-2])
        self.send_json(404, {"error": {"message": f"unknown path {path}", "type": "invalid_request_error"}})

    def failover_behaviour(self, model):
        """Scripted failures for failover tests; True when handled."""
        if model in ("mock-500", "mock-503"):
            status = int(model[-3:])
            self.send_json(status, {"error": {"message": f"scripted {status}", "type": "server_error",
                                              "param": None, "code": None}})
            return True
        if model == "mock-429-wait":
            self.send_json(429, {"error": {"message": "Rate limit reached", "type": "requests",
                                           "param": None, "code": "rate_limit_exceeded"}},
                           {"retry-after": "30"})
            return True
        if model == "mock-reset":
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass
            return True
        if model == "mock-stall":
            time.sleep(5)
        if model == "mock-slow":
            time.sleep(0.3)
        return False

    def chat(self, req):
        messages = req.get("messages") or []
        said = last_user_text(messages)
        text = f"Hello from the {self.server.label} provider! You said: {said}"
        last = messages[-1] if messages else {}
        calls = []
        if req.get("tools") and last.get("role") != "tool":
            for i, tool in enumerate(req["tools"][:2]):
                calls.append({"id": f"call_mock{i}", "type": "function",
                              "function": {"name": tool["function"]["name"],
                                           "arguments": json.dumps({"query": said, "n": i})}})
        elif last.get("role") == "tool":
            results = [m.get("content") for m in messages if m.get("role") == "tool"]
            text = "Tools said: " + "; ".join(str(r) for r in results)
        if calls:
            return self.chat_tool_calls(req, calls)
        usage = {
            "prompt_tokens": sum(words(last_user_text([m])) for m in req.get("messages") or []),
            "completion_tokens": words(text),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        cid = "chatcmpl-" + hashlib.sha1(text.encode()).hexdigest()[:12]
        created = int(time.time())
        model = req.get("model")
        if not req.get("stream"):
            return self.send_json(200, {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": usage,
            })
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))

        def chunk(delta, finish=None, choices=True, usage_value=None):
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                "finish_reason": finish}] if choices else []}
            if include_usage:
                obj["usage"] = usage_value
            return f"data: {json.dumps(obj)}\n\n"

        pieces = text.split(" ")
        pieces = [p if i == 0 else " " + p for i, p in enumerate(pieces)]
        if model == "mock-split":
            # Five characters an event: words (and secrets) split across events.
            pieces = [text[i:i + 5] for i in range(0, len(text), 5)]
        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": p}) for p in pieces]
        events.append(chunk({}, finish="stop"))
        if include_usage:
            events.append(chunk(None, choices=False, usage_value=usage))
        events.append("data: [DONE]\n\n")

        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i, ev in enumerate(events):
            data = ev.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            if i == 0 and model == "mock-gated":
                self.server.gate.wait(timeout=30)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def chat_tool_calls(self, req, calls):
        usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        cid, created, model = "chatcmpl-tools", int(time.time()), req.get("model")
        if not req.get("stream"):
            return self.send_json(200, {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": None,
                                                     "tool_calls": calls},
                             "logprobs": None, "finish_reason": "tool_calls"}],
                "usage": usage})
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))

        def chunk(delta, finish=None, choices=True, usage_value=None):
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                "finish_reason": finish}] if choices else []}
            if include_usage:
                obj["usage"] = usage_value
            return f"data: {json.dumps(obj)}\n\n"

        events = [chunk({"role": "assistant", "content": None})]
        for i, call in enumerate(calls):
            args = call["function"]["arguments"]
            events.append(chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                                 "function": {"name": call["function"]["name"],
                                                              "arguments": ""}}]}))
            for piece in (args[:6], args[6:]):
                events.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}))
        events.append(chunk({}, finish="tool_calls"))
        if include_usage:
            events.append(chunk(None, choices=False, usage_value=usage))
        events.append("data: [DONE]\n\n")
        self.send_chunked(events)

    def send_chunked(self, events, content_type="text/event-stream", gated=False):
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i, e in enumerate(events):
            data = e.encode() if isinstance(e, str) else e
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            if i == 0 and gated:
                self.server.gate.wait(timeout=30)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def completions(self, req):
        """The legacy text completions API."""
        prompt = req.get("prompt", "")
        prompts = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) \
            else [prompt]
        n = max(1, int(req.get("n") or 1))
        choices = []
        for p in prompts:
            said = p if isinstance(p, str) else " ".join(str(t) for t in p)
            text = f"Hello from the {self.server.label} provider! You said: {said}"
            for _ in range(n):
                choices.append({"text": (said + text) if req.get("echo") else text,
                                "index": len(choices), "logprobs": None, "finish_reason": "stop"})
        usage = {"prompt_tokens": sum(words(p if isinstance(p, str) else " ".join(map(str, p)))
                                      for p in prompts),
                 "completion_tokens": sum(words(c["text"]) for c in choices)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        cid = "cmpl-" + hashlib.sha1(json.dumps(choices).encode()).hexdigest()[:24]
        created, model = int(time.time()), req.get("model")
        if not req.get("stream"):
            return self.send_json(200, {"id": cid, "object": "text_completion", "created": created,
                                        "model": model, "choices": choices, "usage": usage})
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))

        def chunk(choices_, usage_value=None):
            obj = {"id": cid, "object": "text_completion", "created": created, "model": model,
                   "choices": choices_}
            if include_usage:
                obj["usage"] = usage_value
            return f"data: {json.dumps(obj)}\n\n"

        events = []
        for c in choices:
            for j, piece in enumerate(c["text"].split(" ")):
                events.append(chunk([{"text": piece if j == 0 else " " + piece, "index": c["index"],
                                      "logprobs": None, "finish_reason": None}]))
        for c in choices:
            events.append(chunk([{"text": "", "index": c["index"], "logprobs": None,
                                  "finish_reason": "stop"}]))
        if include_usage:
            events.append(chunk([], usage))
        events.append("data: [DONE]\n\n")
        if model == "mock-cut":
            events = events[:3]
        self.send_chunked(events, gated=model == "mock-gated")

    # --- OpenAI Responses API --------------------------------------------
    def response_object(self, rid, created, req, output, usage):
        tools = req.get("tools") or []
        return {
            "id": rid, "object": "response", "created_at": created, "status": "completed",
            "background": False, "completed_at": created, "error": None,
            "incomplete_details": None, "instructions": req.get("instructions"),
            "max_output_tokens": req.get("max_output_tokens"),
            "max_tool_calls": req.get("max_tool_calls"), "model": req.get("model"),
            "output": output, "parallel_tool_calls": req.get("parallel_tool_calls", True),
            "previous_response_id": req.get("previous_response_id"),
            "prompt_cache_key": req.get("prompt_cache_key"),
            "reasoning": req.get("reasoning") or {"effort": None, "summary": None},
            "safety_identifier": req.get("safety_identifier"), "service_tier": "default",
            "store": req.get("store") is not False,
            "temperature": req.get("temperature", 1.0),
            "text": req.get("text") or {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": req.get("tool_choice", "auto"), "tools": tools,
            "top_logprobs": req.get("top_logprobs", 0), "top_p": req.get("top_p", 1.0),
            "truncation": req.get("truncation", "disabled"), "usage": usage,
            "user": req.get("user"), "metadata": req.get("metadata") or {},
        }

    def responses_create(self, req):
        history = []
        prev_id = req.get("previous_response_id")
        if prev_id:
            with self.server.lock:
                prev = self.server.responses.get(prev_id)
            if prev is None:
                return self.openai_error(400, f"Previous response with id '{prev_id}' not found.",
                                         "previous_response_id", "previous_response_not_found")
            history = prev["context"] + prev["response"]["output"]
        items = response_items(req.get("input"))
        history = history + items
        said = last_user_item_text(history)
        last = items[-1] if items else {}
        functions = [t for t in req.get("tools") or [] if t.get("type") == "function"]
        rid = new_id("resp_")
        if functions and last.get("type") != "function_call_output":
            output = [{"id": f"fc_{rid[5:]}{i}", "type": "function_call", "status": "completed",
                       "call_id": f"call_mock{i}", "name": tool["name"],
                       "arguments": json.dumps({"query": said, "n": i})}
                      for i, tool in enumerate(functions[:2])]
            out_words = sum(words(o["arguments"]) for o in output)
        else:
            if last.get("type") == "function_call_output":
                results = [item_text(i) for i in history if i.get("type") == "function_call_output"]
                text = "Tools said: " + "; ".join(results)
            else:
                text = f"Hello from the {self.server.label} provider! You said: {said}"
            output = [{"id": "msg_" + rid[5:], "type": "message", "status": "completed",
                       "role": "assistant",
                       "content": [{"type": "output_text", "text": text, "annotations": [],
                                    "logprobs": []}]}]
            out_words = words(text)
        instructions = req.get("instructions")
        input_tokens = sum(words(item_text(i)) for i in history) + (
            words(instructions) if isinstance(instructions, str) and instructions else 0)
        usage = {"input_tokens": max(2, input_tokens),
                 "input_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 0},
                 "output_tokens": out_words + 1, "output_tokens_details": {"reasoning_tokens": 1}}
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
        final = self.response_object(rid, int(time.time()), req, output, usage)
        model = req.get("model")
        if final["store"] and not (req.get("stream") and model == "mock-cut"):
            with self.server.lock:
                self.server.responses[rid] = {"response": final, "context": history}
        if not req.get("stream"):
            return self.send_json(200, final)

        started = {**final, "status": "in_progress", "completed_at": None, "output": [],
                   "usage": None}
        events = [("response.created", {"response": started}),
                  ("response.in_progress", {"response": started})]
        for oi, item in enumerate(output):
            at = {"item_id": item["id"], "output_index": oi}
            if item["type"] == "message":
                part = item["content"][0]
                events.append(("response.output_item.added", {
                    "output_index": oi, "item": {**item, "status": "in_progress", "content": []}}))
                events.append(("response.content_part.added", {
                    **at, "content_index": 0, "part": {**part, "text": ""}}))
                for j, piece in enumerate(part["text"].split(" ")):
                    events.append(("response.output_text.delta", {
                        **at, "content_index": 0, "delta": piece if j == 0 else " " + piece,
                        "logprobs": []}))
                events.append(("response.output_text.done", {
                    **at, "content_index": 0, "text": part["text"], "logprobs": []}))
                events.append(("response.content_part.done", {**at, "content_index": 0, "part": part}))
            else:
                events.append(("response.output_item.added", {
                    "output_index": oi, "item": {**item, "status": "in_progress", "arguments": ""}}))
                args = item["arguments"]
                for piece in (args[:6], args[6:]):
                    events.append(("response.function_call_arguments.delta", {**at, "delta": piece}))
                events.append(("response.function_call_arguments.done", {**at, "arguments": args}))
            events.append(("response.output_item.done", {"output_index": oi, "item": item}))
        events.append(("response.completed", {"response": final}))
        if model == "mock-cut":
            deltas = [i for i, (kind, _) in enumerate(events) if kind.endswith(".delta")]
            events = events[:deltas[1] + 1 if len(deltas) > 1 else deltas[0] + 1]
        frames = [f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': n, **data})}\n\n"
                  for n, (kind, data) in enumerate(events)]
        self.send_chunked(frames, gated=model == "mock-gated")

    def response_retrieve(self, rid):
        with self.server.lock:
            stored = self.server.responses.get(rid)
        if stored is None:
            return self.openai_error(404, f"Response with id '{rid}' not found.", "response_id")
        return self.send_json(200, stored["response"])

    def response_delete(self, rid):
        with self.server.lock:
            stored = self.server.responses.pop(rid, None)
        if stored is None:
            return self.openai_error(404, f"Response with id '{rid}' not found.", "response_id")
        return self.send_json(200, {"id": rid, "object": "response.deleted", "deleted": True})

    # --- OpenAI images, audio, moderations -------------------------------
    def images(self, req, files=(), edit=False):
        prompt = req.get("prompt")
        if not prompt:
            return self.openai_error(400, "Missing required parameter: 'prompt'.", "prompt",
                                     "missing_required_parameter")
        images = [f for f in files if f["name"].split("[")[0] == "image"]
        if edit and not images:
            return self.openai_error(400, "Missing required parameter: 'image'.", "image",
                                     "missing_required_parameter")
        n = self.image_count(req)
        if n is None:
            return
        if req.get("response_format") == "url":
            item = {"url": "data:image/png;base64," + PNG_B64}
        else:
            item = {"b64_json": PNG_B64}
        usage = {"input_tokens_details": {"text_tokens": words(prompt), "image_tokens": 8 * len(images)},
                 "output_tokens": 16 * n, "output_tokens_details": {"text_tokens": 0, "image_tokens": 16 * n}}
        usage["input_tokens"] = sum(usage["input_tokens_details"].values())
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
        self.send_json(200, {"created": int(time.time()),
                             "data": [{**item, "revised_prompt": prompt} for _ in range(n)],
                             "output_format": req.get("output_format") or "png",
                             "size": req.get("size") or "1024x1024", "usage": usage})

    def image_variations(self, req, files):
        if not [f for f in files if f["name"] == "image"]:
            return self.openai_error(400, "Missing required parameter: 'image'.", "image",
                                     "missing_required_parameter")
        n = self.image_count(req)
        if n is not None:
            self.send_json(200, {"created": int(time.time()),
                                 "data": [{"b64_json": PNG_B64} for _ in range(n)]})

    def image_count(self, req):
        """`n`, 1 to 10; None once a 400 for a bad one was sent."""
        try:
            return min(10, max(1, int(req.get("n") or 1)))
        except ValueError:
            self.openai_error(400, f"Invalid value for 'n': {req.get('n')}.", "n", "invalid_value")
            return None

    def transcription(self, req, files, task):
        audio = [f for f in files if f["name"] == "file"]
        if not audio:
            return self.openai_error(400, "Missing required parameter: 'file'.", "file",
                                     "missing_required_parameter")
        data, filename = audio[0]["data"], audio[0]["filename"]
        text = f"transcribed {len(data)} bytes of {filename}"
        seconds = max(0.01, round(len(data) / 32000, 2))  # 16 kHz, 16-bit mono
        fmt = req.get("response_format") or "json"
        if fmt == "text":
            return self.send_text(200, text + "\n")
        if fmt == "srt":
            return self.send_text(200, f"1\n00:00:00,000 --> 00:00:01,000\n{text}\n\n")
        if fmt == "vtt":
            return self.send_text(200, f"WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n{text}\n\n")
        if fmt == "verbose_json":
            answer = {"task": task, "language": req.get("language") or "english",
                      "duration": seconds, "text": text,
                      "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": seconds, "text": text,
                                    "tokens": [], "temperature": 0.0, "avg_logprob": -0.1,
                                    "compression_ratio": 1.0, "no_speech_prob": 0.01}]}
            if task == "transcribe":
                answer["usage"] = {"type": "duration", "seconds": seconds}
            return self.send_json(200, answer)
        answer = {"text": text}
        if task == "transcribe":
            if str(req.get("model", "")).startswith("whisper"):
                answer["usage"] = {"type": "duration", "seconds": seconds}
            else:
                audio_tokens = max(1, len(data) // 100)
                answer["usage"] = {"type": "tokens", "input_tokens": audio_tokens,
                                   "input_token_details": {"audio_tokens": audio_tokens,
                                                           "text_tokens": 0},
                                   "output_tokens": words(text),
                                   "total_tokens": audio_tokens + words(text)}
        self.send_json(200, answer)

    def speech(self, req):
        for field in ("input", "voice"):
            if not req.get(field):
                return self.openai_error(400, f"Missing required parameter: '{field}'.", field,
                                         "missing_required_parameter")
        fmt = req.get("response_format") or "mp3"
        kinds = {"mp3": (b"ID3", "audio/mpeg"), "wav": (b"RIFF", "audio/wav"),
                 "flac": (b"fLaC", "audio/flac"), "opus": (b"OggS", "audio/opus"),
                 "aac": (b"", "audio/aac"), "pcm": (b"", "audio/pcm")}
        magic, content_type = kinds.get(fmt, kinds["mp3"])
        self.send_bytes(200, magic + str(req["input"]).encode(), content_type)

    def moderations(self, req):
        value = req.get("input")
        if value is None:
            return self.openai_error(400, "Missing required parameter: 'input'.", "input",
                                     "missing_required_parameter")
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            # Multi-modal parts are judged together, as one input.
            inputs = [(" ".join(str(v.get("text", "")) for v in value),
                       any(v.get("type") == "image_url" for v in value))]
        else:
            inputs = [(str(v), False) for v in (value if isinstance(value, list) else [value])]
        results = []
        for text, has_image in inputs:
            violent = "kill" in text.lower()
            flags = {c: violent and c == "violence" for c in MODERATION_CATEGORIES}
            results.append({
                "flagged": violent, "categories": flags,
                "category_scores": {c: 0.91 if flags[c] else 0.0001 for c in MODERATION_CATEGORIES},
                "category_applied_input_types": {
                    c: ["text", "image"] if has_image and c in MODERATION_IMAGE_CATEGORIES else ["text"]
                    for c in MODERATION_CATEGORIES}})
        self.send_json(200, {"id": new_id("modr-"), "model": req.get("model") or "omni-moderation-latest",
                             "results": results})

    # --- OpenAI files and batches ----------------------------------------
    def file_upload(self, req, files):
        uploads = [f for f in files if f["name"] == "file"]
        if not uploads:
            return self.openai_error(400, "Missing required parameter: 'file'.", "file",
                                     "missing_required_parameter")
        if not req.get("purpose"):
            return self.openai_error(400, "Missing required parameter: 'purpose'.", "purpose",
                                     "missing_required_parameter")
        f = uploads[0]
        obj = {"id": new_id("file-"), "object": "file", "bytes": len(f["data"]),
               "created_at": int(time.time()), "filename": f["filename"], "purpose": req["purpose"],
               "status": "processed", "expires_at": None, "status_details": None}
        with self.server.lock:
            self.server.files[obj["id"]] = {"object": obj, "content": f["data"]}
        self.send_json(200, obj)

    def stored_file(self, fid):
        with self.server.lock:
            stored = self.server.files.get(fid)
        if stored is None:
            self.openai_error(404, f"No such File object: {fid}", "id")
        return stored

    def file_list(self):
        with self.server.lock:
            data = [f["object"] for f in self.server.files.values()]
        self.send_json(200, {"object": "list", "data": data, "has_more": False,
                             "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None})

    def file_retrieve(self, fid):
        stored = self.stored_file(fid)
        if stored:
            self.send_json(200, stored["object"])

    def file_content(self, fid):
        stored = self.stored_file(fid)
        if stored:
            self.send_bytes(200, stored["content"], "application/octet-stream")

    def file_delete(self, fid):
        with self.server.lock:
            stored = self.server.files.pop(fid, None)
        if stored is None:
            return self.openai_error(404, f"No such File object: {fid}", "id")
        self.send_json(200, {"id": fid, "object": "file", "deleted": True})

    def batch_create(self, req):
        for field in ("input_file_id", "endpoint", "completion_window"):
            if not req.get(field):
                return self.openai_error(400, f"Missing required parameter: '{field}'.", field,
                                         "missing_required_parameter")
        with self.server.lock:
            known = req["input_file_id"] in self.server.files
        if not known:
            return self.openai_error(404, f"No such File object: {req['input_file_id']}",
                                     "input_file_id")
        created = int(time.time())
        batch = {"id": new_id("batch_"), "object": "batch", "endpoint": req["endpoint"],
                 "model": None, "errors": None, "input_file_id": req["input_file_id"],
                 "completion_window": req["completion_window"], "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": created,
                 "in_progress_at": None, "expires_at": created + 86400, "finalizing_at": None,
                 "completed_at": None, "failed_at": None, "expired_at": None,
                 "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0},
                 "metadata": req.get("metadata")}
        with self.server.lock:
            self.server.batches[batch["id"]] = batch
        self.send_json(200, batch)

    def batch_retrieve(self, bid):
        with self.server.lock:
            batch = self.server.batches.get(bid)
        if batch is None:
            return self.openai_error(404, f"No such Batch object: {bid}", "batch_id")
        self.send_json(200, batch)

    def batch_cancel(self, bid):
        with self.server.lock:
            batch = self.server.batches.get(bid)
            if batch is not None and batch["status"] in ("validating", "in_progress", "finalizing"):
                batch.update(status="cancelling", cancelling_at=int(time.time()))
            batch = dict(batch) if batch is not None else None
        if batch is None:
            return self.openai_error(404, f"No such Batch object: {bid}", "batch_id")
        self.send_json(200, batch)

    def batch_list(self):
        with self.server.lock:
            data = [dict(b) for b in self.server.batches.values()]
        self.send_json(200, {"object": "list", "data": data, "has_more": False,
                             "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None})

    # --- Gemini (Google AI Studio and Vertex AI) -------------------------
    def gemini_error(self, status, code_name, message):
        return self.send_json(status, {"error": {"code": status, "message": message,
                                                 "status": code_name}})

    def gemini(self, req, path):
        vertex = "/publishers/" in path
        if vertex:
            if not (self.headers.get("authorization") or "").startswith("Bearer "):
                return self.gemini_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
        elif not self.headers.get("x-goog-api-key"):
            return self.gemini_error(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers.")
        model = unquote(path.rsplit("/", 1)[-1].split(":")[0])
        stream = ":streamGenerateContent" in path
        if model == "mock-429":
            return self.gemini_error(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota).")
        if model == "mock-400-detail":
            return self.gemini_error(400, "INVALID_ARGUMENT", "Invalid value at 'generation_config.temperature'.")
        contents = req.get("contents") or []
        if not contents:
            return self.gemini_error(400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not specified")
        last = contents[-1]
        parts = last.get("parts") or []
        results = [p["functionResponse"] for p in parts if "functionResponse" in p]
        said = " ".join(p.get("text", "") for p in parts if "text" in p)
        declarations = [d for t in req.get("tools") or [] for d in t.get("functionDeclarations") or []]
        if declarations and not results:
            out_parts = [{"functionCall": {"name": d["name"], "args": {"query": said, "n": i}}}
                         for i, d in enumerate(declarations[:2])]
        else:
            if results:
                text = "Tools said: " + "; ".join(json.dumps(r.get("response")) for r in results)
            else:
                text = f"Hello from the {self.server.label} provider! You said: {said}"
            out_parts = [{"text": text}]
        usage = {"promptTokenCount": sum(words(json.dumps(c)) for c in contents),
                 "candidatesTokenCount": sum(words(json.dumps(p)) for p in out_parts),
                 "cachedContentTokenCount": 1}
        usage["totalTokenCount"] = usage["promptTokenCount"] + usage["candidatesTokenCount"]

        def response(parts_, finish=None, usage_=None):
            cand = {"content": {"role": "model", "parts": parts_}, "index": 0}
            if finish:
                cand["finishReason"] = finish
            obj = {"candidates": [cand], "modelVersion": model, "responseId": "resp-mock"}
            if usage_:
                obj["usageMetadata"] = usage_
            return obj

        if not stream:
            return self.send_json(200, response(out_parts, "STOP", usage))
        events = []
        if "text" in out_parts[0]:
            words_ = out_parts[0]["text"].split(" ")
            pieces = [" ".join(words_[:2]), " " + " ".join(words_[2:])]
            events.append(response([{"text": pieces[0]}]))
            events.append(response([{"text": pieces[1]}], "STOP", usage))
        else:
            events.append(response(out_parts[:1]))
            events.append(response(out_parts[1:] or [{"text": ""}], "STOP", usage))
        if model == "mock-cut":
            events = events[:1]
        self.send_chunked([f"data: {json.dumps(e)}\r\n\r\n" for e in events])

    def vertex_anthropic(self, req, path):
        if not (self.headers.get("authorization") or "").startswith("Bearer "):
            return self.anthropic_error(401, "authentication_error", "bearer token required")
        if req.get("anthropic_version") != "vertex-2023-10-16" or "model" in req:
            return self.anthropic_error(400, "invalid_request_error",
                                        "anthropic_version must be vertex-2023-10-16 and model absent")
        model = unquote(path.rsplit("/", 1)[-1].split(":")[0])
        req = {**req, "model": model, "stream": path.endswith(":streamRawPredict")}
        return self.anthropic(req, check_headers=False)

    # --- Bedrock Converse ------------------------------------------------
    def verify_sigv4(self, body, path):
        """None when the request carries a valid SigV4 signature, else why not."""
        auth = self.headers.get("authorization") or ""
        if not auth.startswith("AWS4-HMAC-SHA256 "):
            return "missing AWS4-HMAC-SHA256 authorization"
        fields = dict(p.strip().split("=", 1) for p in auth[len("AWS4-HMAC-SHA256 "):].split(","))
        akid, date, region, service, term = fields["Credential"].split("/")
        if akid != self.server.aws_key_id or service != "bedrock" or term != "aws4_request":
            return f"unexpected credential scope {fields['Credential']}"
        amz_date = self.headers.get("x-amz-date") or ""
        payload_hash = hashlib.sha256(body).hexdigest()
        if self.headers.get("x-amz-content-sha256") not in (None, payload_hash):
            return "x-amz-content-sha256 does not match the body"
        signed = fields["SignedHeaders"].split(";")
        if "host" not in signed or "x-amz-date" not in signed:
            return "host and x-amz-date must be signed"
        raw_path, _, query = self.path.partition("?")
        # Non-S3 services encode each (already encoded) path segment again.
        canonical_uri = "/".join(quote(seg, safe="-_.~") for seg in raw_path.split("/"))
        canonical_headers = "".join(
            f"{h}:{' '.join((self.headers.get(h) or '').split())}\n" for h in signed)
        canonical = "\n".join(["POST", canonical_uri, query, canonical_headers,
                               ";".join(signed), payload_hash])
        scope = f"{date}/{region}/{service}/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        key = ("AWS4" + self.server.aws_secret).encode()
        for part in (date, region, service, "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, fields["Signature"]):
            return "signature mismatch"
        if self.server.aws_token and self.headers.get("x-amz-security-token") != self.server.aws_token:
            return "x-amz-security-token missing or wrong"
        return None

    def bedrock_error(self, status, kind, message):
        data = json.dumps({"message": message}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("x-amzn-errortype", f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def bedrock(self, req, body, path):
        if self.headers.get("authorization", "").startswith("Bearer "):
            pass  # a Bedrock API key
        else:
            problem = self.verify_sigv4(body, path)
            if problem:
                return self.bedrock_error(403, "InvalidSignatureException", problem)
        model = unquote(path.split("/")[2])
        stream = path.endswith("/converse-stream")
        if model == "mock-429":
            return self.bedrock_error(429, "ThrottlingException", "Too many requests, please wait before trying again.")
        if model == "mock-400-detail":
            return self.bedrock_error(400, "ValidationException", "The provided model identifier is invalid.")
        messages = req.get("messages") or []
        if not messages:
            return self.bedrock_error(400, "ValidationException", "messages is required")
        last = messages[-1]
        blocks = last.get("content") or []
        results = [b["toolResult"] for b in blocks if "toolResult" in b]
        said = " ".join(b.get("text", "") for b in blocks if "text" in b)
        tools = [t["toolSpec"] for t in (req.get("toolConfig") or {}).get("tools") or []]
        if tools and not results:
            out = [{"toolUse": {"toolUseId": f"tooluse_mock{i}", "name": t["name"],
                                "input": {"query": said, "n": i}}} for i, t in enumerate(tools[:2])]
            stop = "tool_use"
        else:
            if results:
                text = "Tools said: " + "; ".join(json.dumps(r.get("content")) for r in results)
            else:
                text = f"Hello from the {self.server.label} provider! You said: {said}"
            out = [{"text": text}]
            stop = "end_turn"
        usage = {"inputTokens": sum(words(json.dumps(m)) for m in messages),
                 "outputTokens": sum(words(json.dumps(b)) for b in out),
                 "cacheReadInputTokens": 1}
        usage["totalTokens"] = usage["inputTokens"] + usage["outputTokens"]
        if not stream:
            return self.send_json(200, {"output": {"message": {"role": "assistant", "content": out}},
                                        "stopReason": stop, "usage": usage,
                                        "metrics": {"latencyMs": 12}})

        def frame(kind, payload):
            return eventstream.encode({":event-type": kind, ":content-type": "application/json",
                                       ":message-type": "event"}, json.dumps(payload).encode())

        frames = [frame("messageStart", {"role": "assistant"})]
        for i, b in enumerate(out):
            if "text" in b:
                words_ = b["text"].split(" ")
                for piece in (" ".join(words_[:2]), " " + " ".join(words_[2:])):
                    frames.append(frame("contentBlockDelta", {"contentBlockIndex": i,
                                                              "delta": {"text": piece}}))
            else:
                tu = b["toolUse"]
                frames.append(frame("contentBlockStart", {"contentBlockIndex": i, "start": {
                    "toolUse": {"toolUseId": tu["toolUseId"], "name": tu["name"]}}}))
                args = json.dumps(tu["input"])
                for piece in (args[:5], args[5:]):
                    frames.append(frame("contentBlockDelta", {"contentBlockIndex": i,
                                                              "delta": {"toolUse": {"input": piece}}}))
            frames.append(frame("contentBlockStop", {"contentBlockIndex": i}))
        frames.append(frame("messageStop", {"stopReason": stop}))
        frames.append(frame("metadata", {"usage": usage, "metrics": {"latencyMs": 12}}))
        if model == "mock-cut":
            frames = frames[:2]
        self.send_chunked(frames, "application/vnd.amazon.eventstream")

    def anthropic_error(self, status, kind, message):
        return self.send_json(status, {"type": "error", "error": {"type": kind, "message": message}})

    def anthropic_count_tokens(self, req):
        if not self.headers.get("x-api-key"):
            return self.anthropic_error(401, "authentication_error", "x-api-key header is required")
        if not self.headers.get("anthropic-version"):
            return self.anthropic_error(400, "invalid_request_error", "anthropic-version header is required")
        if req.get("model") == "mock-overloaded":
            return self.anthropic_error(529, "overloaded_error", "Overloaded")
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            return self.anthropic_error(400, "invalid_request_error", "messages: Field required")
        tokens = sum(words(anthropic_text(m.get("content"))) for m in messages)
        if req.get("system"):
            tokens += words(anthropic_text(req["system"]))
        self.send_json(200, {"input_tokens": tokens})

    def anthropic(self, req, check_headers=True):
        if check_headers and not self.headers.get("x-api-key"):
            return self.anthropic_error(401, "authentication_error", "x-api-key header is required")
        if check_headers and not self.headers.get("anthropic-version"):
            return self.anthropic_error(400, "invalid_request_error", "anthropic-version header is required")
        if not isinstance(req.get("max_tokens"), int):
            return self.anthropic_error(400, "invalid_request_error", "max_tokens: Field required")
        model = req.get("model", "")
        if model == "mock-overloaded":
            return self.anthropic_error(529, "overloaded_error", "Overloaded")
        messages = req.get("messages") or []
        last = messages[-1] if messages else {}
        last_blocks = last.get("content") if isinstance(last.get("content"), list) else []
        tool_results = [b for b in last_blocks if b.get("type") == "tool_result"]
        said = " ".join(
            (b.get("text", "") for b in last_blocks if b.get("type") == "text")
        ) if last_blocks else str(last.get("content", ""))
        blocks = []
        if req.get("tools") and not tool_results:
            for i, tool in enumerate(req["tools"][:2]):
                blocks.append({"type": "tool_use", "id": f"toolu_mock{i}", "name": tool["name"],
                               "input": {"query": said, "n": i}})
            stop = "tool_use"
        else:
            if tool_results:
                text = "Tools said: " + "; ".join(str(t.get("content")) for t in tool_results)
            else:
                text = f"Hello from the {self.server.label} provider! You said: {said}"
            blocks.append({"type": "text", "text": text})
            stop = "end_turn"
        usage = {"input_tokens": sum(words(json.dumps(m.get("content"))) for m in messages),
                 "output_tokens": sum(words(json.dumps(b)) for b in blocks),
                 "cache_read_input_tokens": 2, "cache_creation_input_tokens": 0}
        msg_id = "msg_" + hashlib.sha1(json.dumps(blocks).encode()).hexdigest()[:12]
        if not req.get("stream"):
            return self.send_json(200, {"id": msg_id, "type": "message", "role": "assistant",
                                        "model": model, "content": blocks, "stop_reason": stop,
                                        "stop_sequence": None, "usage": usage})

        def ev(name, data):
            return f"event: {name}\ndata: {json.dumps(data)}\n\n"

        events = [ev("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1}}}), ": keep-alive comment\n\n",
            ev("ping", {"type": "ping"})]
        for i, b in enumerate(blocks):
            if b["type"] == "text":
                events.append(ev("content_block_start", {"type": "content_block_start", "index": i,
                                                         "content_block": {"type": "text", "text": ""}}))
                for j, piece in enumerate(b["text"].split(" ")):
                    events.append(ev("content_block_delta", {
                        "type": "content_block_delta", "index": i,
                        "delta": {"type": "text_delta", "text": piece if j == 0 else " " + piece}}))
            else:
                events.append(ev("content_block_start", {"type": "content_block_start", "index": i,
                                                         "content_block": {**b, "input": {}}}))
                args = json.dumps(b["input"])
                for piece in (args[:5], args[5:]):
                    events.append(ev("content_block_delta", {
                        "type": "content_block_delta", "index": i,
                        "delta": {"type": "input_json_delta", "partial_json": piece}}))
            events.append(ev("content_block_stop", {"type": "content_block_stop", "index": i}))
        events.append(ev("message_delta", {"type": "message_delta",
                                           "delta": {"stop_reason": stop, "stop_sequence": None},
                                           "usage": {"output_tokens": usage["output_tokens"]}}))
        events.append(ev("message_stop", {"type": "message_stop"}))
        if model == "mock-cut":
            events = events[:5]
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for e in events:
            data = e.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def embeddings(self, req):
        inputs = req.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = []
        for i, item in enumerate(inputs):
            digest = hashlib.sha256(json.dumps(item).encode()).digest()
            data.append({"object": "embedding", "index": i,
                         "embedding": [round(b / 255.0, 4) for b in digest[:8]]})
        tokens = sum(words(x) for x in inputs)
        self.send_json(200, {"object": "list", "data": data, "model": req.get("model"),
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


class MockProvider(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port=0, label="mock", verbose=False, aws_key_id="AKIDMOCK",
                 aws_secret="mock-secret", aws_token=None):
        super().__init__(("127.0.0.1", port), Handler)
        self.label = label
        self.aws_key_id = aws_key_id
        self.aws_secret = aws_secret
        self.aws_token = aws_token
        self.verbose = verbose
        self.requests = []
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.responses = {}  # Responses API: id -> {"response", "context"}
        self.files = {}  # id -> {"object", "content"}
        self.batches = {}  # id -> batch object
        self.thread = None

    @property
    def port(self):
        return self.server_address[1]

    def start(self):
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.gate.set()
        self.shutdown()
        self.server_close()

    def release(self):
        self.gate.set()

    def take(self):
        """Returns and forgets the requests recorded so far."""
        with self.lock:
            out, self.requests = self.requests, []
        return out


def main():
    ap = argparse.ArgumentParser(description="OpenAI-compatible demo/mock provider")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--label", default="demo")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    server = MockProvider(args.port, args.label, args.verbose)
    print(f"mock provider listening on 127.0.0.1:{server.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
