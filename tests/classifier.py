#!/usr/bin/env python3
"""A team's own guardrail classifier, for tests/test_guardrails.py: flags
texts holding `toxic`, masks `mask-me`, answers 500 to `crash` and late to
`slow`. It runs in a process of its own (the test process's threads share
one interpreter lock with 64 clients), prints its port, and tells what it
was asked at GET /asked (DELETE clears it)."""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ASKED = []
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        with LOCK:
            self.answer(200, list(ASKED))

    def do_DELETE(self):
        with LOCK:
            ASKED.clear()
        self.answer(200, {})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with LOCK:
            ASKED.append(req)
        text = " ".join(req["texts"])
        if "slow" in text:
            time.sleep(2.0)
        if "crash" in text:
            return self.answer(500, {"error": "boom"})
        if "mask-me" in text:
            return self.answer(200, {"flagged": True, "texts": [
                t.replace("mask-me", "[MASKED]") for t in req["texts"]]})
        self.answer(200, {"flagged": "toxic" in text, "reason": "toxic"})

    def answer(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except BrokenPipeError:
            pass  # the gateway gave up waiting: that is the point of `slow`


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # 64 callers connect at once


def main():
    server = Server(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
