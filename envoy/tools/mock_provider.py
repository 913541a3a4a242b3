#!/usr/bin/env python3
"""An OpenAI-compatible mock provider: the demo upstream of `make run` and
the recording upstream of the integration tests.

It answers chat completions (streamed and not, with usage) and embeddings on
any path ending in /chat/completions or /embeddings (so Azure deployment
paths work too), and records every request it receives.

Behaviour is chosen by the upstream model name, so tests can script it:
  mock-429        429, OpenAI-shaped rate-limit error with retry-after
  mock-500-text   500 with a plain-text body
  mock-400-detail 400 with a FastAPI-style {"detail": ...} body
  mock-echo-key   401 whose message quotes the credential it received
  mock-gated      streams its first chunk, then waits for release() before
                  sending the rest (proves the gateway does not buffer)
  mock-overloaded (Anthropic) 529 overloaded_error
  mock-500        500 with an OpenAI-shaped error
  mock-503        503 with an OpenAI-shaped error
  mock-429-wait   429 with retry-after: 30
  mock-reset      closes the connection without answering
  mock-stall      waits 5 s before answering (longer than a test per-try timeout)
  mock-slow       answers normally after 300 ms
  mock-cut        (Anthropic, streamed) ends the HTTP response cleanly but
                  without message_stop, like a provider that broke off
Anything else gets a normal answer.

Paths ending in /messages speak Anthropic's Messages API (x-api-key and
anthropic-version required; event-stream framing when streamed; tool_use
blocks for each offered tool, up to two, unless the last turn holds tool
results). Vertex AI's `:rawPredict` / `:streamRawPredict` paths speak it
too, with the model in the URL, `anthropic_version` in the body and a
bearer token.

Paths ending in `:generateContent` / `:streamGenerateContent` speak the
Gemini API (x-goog-api-key, or a bearer token on Vertex AI paths).

Paths `/model/{id}/converse` and `/converse-stream` speak Bedrock Converse:
the SigV4 signature is verified in full against the secret given to the
mock (`aws_secret`), and streams use the AWS event-stream framing.

Every kind offers tool calls the same way: when the request offers tools and
its last turn holds no tool results, the answer calls up to two of them.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time
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

    def do_GET(self):
        if self.path == "/__mock/requests":
            with self.server.lock:
                return self.send_json(200, list(self.server.requests))
        self.record(b"")
        self.send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_DELETE(self):
        if self.path == "/__mock/requests":
            with self.server.lock:
                self.server.requests.clear()
            return self.send_json(200, {})
        self.send_json(404, {})

    def do_POST(self):
        body = self.read_body()
        self.record(body)
        path = self.path.split("?")[0]
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
        if path.endswith("/messages"):
            return self.anthropic(req)
        if path.endswith("/chat/completions"):
            return self.chat(req)
        if path.endswith("/embeddings"):
            return self.embeddings(req)
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
        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": (p if i == 0 else " " + p)}) for i, p in enumerate(pieces)]
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

    def send_chunked(self, events, content_type="text/event-stream"):
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for e in events:
            data = e.encode() if isinstance(e, str) else e
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

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
