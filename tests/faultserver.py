"""A raw HTTP/1.1 provider for load and fault tests, on asyncio in its own
thread, so 64 concurrent connections cost nothing and every wire-level
fault can be scripted: a status with any body, a reset before headers
(RST, not FIN), a stall, a cut after the first byte.

One server plays both parts of a failover route:
  * paths ending in /chat/completions (OpenAI) fail the way the request's
    `model` says (see FAULTS);
  * paths ending in /messages (Anthropic) answer well, plain or streamed,
    quoting the request's nonce, the text after "nonce:" in the last user
    message.

Every request is counted by (model, nonce), so a test can prove that each
request reached the good target exactly once and how often the failing
target was tried.
"""

import asyncio
import json
import re
import socket
import struct
import threading
from collections import Counter

NONCE = re.compile(r"nonce:(\S+)")

# model → (status, content-type, body, extra headers); wire faults below.
FAULTS = {
    "fail-500": (500, "application/json",
                 b'{"error":{"message":"internal","type":"server_error","code":null}}', []),
    "fail-502": (502, "text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>", []),
    "fail-503": (503, "application/json",
                 b'{"error":{"message":"overloaded","type":"server_error","code":null}}', []),
    "fail-503-text": (503, "text/plain", b"upstream overloaded, try later", []),
    "fail-429": (429, "application/json",
                 b'{"error":{"message":"slow down","type":"rate_limit_error","code":"rate_limit_exceeded"}}',
                 [("retry-after", "2")]),
}
WIRE_FAULTS = {"fail-reset", "fail-stall", "cut-after-first-byte", "cut-stream"}


def nonce_of(body):
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    for m in reversed(doc.get("messages") or []):
        content = m.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        found = NONCE.search(str(content))
        if found:
            return found.group(1)
    return None


class FaultServer:
    def __init__(self, stall_seconds=30.0, delay_seconds=0.0):
        self.stall_seconds = stall_seconds
        # How long a scripted failure waits before answering, so attempts
        # overlap under load (a provider that fails slowly).
        self.delay_seconds = delay_seconds
        self.counts = Counter()  # (model, nonce) → requests received
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.port = None
        self.writers = set()
        self.thread = threading.Thread(target=self._run, daemon=True)

    # --- lifecycle ---------------------------------------------------------

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self):
        self.thread.start()
        ready = asyncio.run_coroutine_threadsafe(self._listen(), self.loop)
        self.port = ready.result(10)
        return self

    async def _listen(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        return self.server.sockets[0].getsockname()[1]

    def stop(self):
        async def close():
            self.server.close()
            for w in list(self.writers):
                w.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def take(self):
        with self.lock:
            counts, self.counts = self.counts, Counter()
        return counts

    # --- HTTP ----------------------------------------------------------------

    async def _serve(self, reader, writer):
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                _method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = b""
                if "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                elif headers.get("transfer-encoding", "").lower() == "chunked":
                    body = await self._read_chunked(reader)
                keep = await self._answer(path.split("?")[0], body, writer)
                if not keep:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError,
                asyncio.CancelledError):
            pass
        finally:
            self.writers.discard(writer)
            if not writer.is_closing():
                writer.close()

    async def _read_chunked(self, reader):
        out = b""
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readline()
                return out
            out += await reader.readexactly(size)
            await reader.readline()

    def _record(self, model, body):
        nonce = nonce_of(body)
        with self.lock:
            self.counts[(model, nonce)] += 1

    @staticmethod
    def _reset(writer):
        """Closes with RST: SO_LINGER on with a zero timeout."""
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _answer(self, path, body, writer):
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {}
        model = doc.get("model", "")
        self._record(model, body)
        if path.endswith("/messages"):
            await self._anthropic(doc, writer)
            return True
        if model in FAULTS:
            if self.delay_seconds:
                await asyncio.sleep(self.delay_seconds)
            status, ctype, payload, extra = FAULTS[model]
            head = f"HTTP/1.1 {status} Failed\r\ncontent-type: {ctype}\r\ncontent-length: {len(payload)}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in extra)
            writer.write(head.encode() + b"\r\n" + payload)
            await writer.drain()
            return True
        if model == "fail-reset":
            if self.delay_seconds:
                await asyncio.sleep(self.delay_seconds)
            self._reset(writer)
            return False
        if model == "fail-stall":
            await asyncio.sleep(self.stall_seconds)
            self._reset(writer)
            return False
        if model == "cut-after-first-byte":
            # A whole answer promised, a few bytes sent, then a reset.
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: 4096\r\n\r\n{\"id\":\"chatcmpl-cut\",")
            await writer.drain()
            await asyncio.sleep(0.05)
            self._reset(writer)
            return False
        if model == "cut-stream":
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model,
                     "choices": [{"index": 0, "delta": {"content": "partial"}, "finish_reason": None}]}
            event = f"data: {json.dumps(chunk)}\n\n".encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n"
                         + f"{len(event):x}\r\n".encode() + event + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            self._reset(writer)
            return False
        payload = json.dumps({"error": {"message": f"unscripted model {model!r}",
                                        "type": "invalid_request_error"}}).encode()
        writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                     + f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
        await writer.drain()
        return True

    async def _anthropic(self, doc, writer):
        nonce = nonce_of(json.dumps(doc)) or "-"
        text = f"good answer for nonce:{nonce}"
        usage = {"input_tokens": 7, "output_tokens": 5}
        if not doc.get("stream"):
            payload = json.dumps({
                "id": "msg_good", "type": "message", "role": "assistant",
                "model": doc.get("model"), "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn", "stop_sequence": None, "usage": usage,
            }).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         + f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
            await writer.drain()
            return
        events = [
            ("message_start", {"type": "message_start", "message": {
                "id": "msg_good", "type": "message", "role": "assistant",
                "model": doc.get("model"), "content": [], "stop_reason": None,
                "stop_sequence": None, "usage": {"input_tokens": 7, "output_tokens": 1}}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": text}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": 5}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        for name, data in events:
            event = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            out += f"{len(event):x}\r\n".encode() + event + b"\r\n"
        out += b"0\r\n\r\n"
        writer.write(out)
        await writer.drain()
