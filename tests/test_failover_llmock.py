"""Failover under load against a third-party mock provider: LLMock (PyPI
`llmock`), which speaks OpenAI, Anthropic and Gemini with their own error
bodies and stream framing, written by others than us. Our own mocks share
our assumptions; this one does not.

64 concurrent clients in all three APIs on an Envoy with two workers; the
first target of each route fails the way LLMock makes that provider fail
(OpenAI 503, Gemini 429 with Retry-After, Anthropic 529 overloaded), and
every request must be answered once by the next target, counted by nonce in
LLMock's own request journal."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import KEYS, Envoy, free_port, http
from test_failover_load import CLIENTS, Client, call

REQUESTS = 300

# route → (failing target's provider, its model, good target's provider, model)
ROUTES = {
    "lm-openai-503": ("lm-openai", "failing-503", "lm-anthropic", "claude-ok"),
    "lm-gemini-429": ("lm-gemini", "failing-429", "lm-openai", "gpt-ok"),
    "lm-anthropic-529": ("lm-anthropic", "failing-529", "lm-gemini", "gemini-ok"),
}
BEHAVIOURS = [
    {"type": "fail", "status": 503, "times": None, "match": {"model": "failing-503"}},
    {"type": "fail", "status": 429, "retry_after": 2, "times": None,
     "match": {"model": "failing-429"}},
    {"type": "fail", "status": 529, "times": None, "match": {"model": "failing-529"}},
]


@pytest.fixture(scope="module")
def llmock():
    port = free_port()
    exe = Path(sys.executable).parent / "llmock"
    log = tempfile.NamedTemporaryFile(prefix="llmock-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "--response-style", "echo", "--tool-mode", "off"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if http("GET", url + "/health", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, open(log.name).read()[-2000:]
            time.sleep(0.1)
        yield url, port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        os.unlink(log.name)


@pytest.fixture(scope="module")
def gateway(wasm, llmock):
    _, port = llmock
    cfg = {
        "providers": [
            {"name": "lm-openai", "kind": "openai_compatible", "base_url": "http://llmock.test/v1",
             "api_key_env": "OPENAI_API_KEY"},
            {"name": "lm-anthropic", "kind": "anthropic",
             "base_url": "http://llmock.test/anthropic/v1", "api_key_env": "ANTHROPIC_API_KEY"},
            {"name": "lm-gemini", "kind": "gemini", "base_url": "http://llmock.test/gemini/v1beta",
             "api_key_env": "GEMINI_API_KEY"},
            # OpenAI's own kind: Responses callers reach LLMock's /v1/responses.
            {"name": "lm-openai-itself", "kind": "openai", "base_url": "http://llmock.test/v1",
             "api_key_env": "OPENAI_API_KEY"},
        ],
        "models": [{"name": "lm-responses", "provider": "lm-openai-itself", "model": "gpt-ok"}],
        "routes": [],
        "failover": {"max_attempts": 2, "per_try_timeout_ms": 5000},
    }
    for route, (bad_p, bad_m, good_p, good_m) in ROUTES.items():
        cfg["models"] += [{"name": f"{route}-first", "provider": bad_p, "model": bad_m},
                          {"name": f"{route}-next", "provider": good_p, "model": good_m}]
        cfg["routes"].append({"name": route, "targets": [f"{route}-first", f"{route}-next"]})
    upstreams = {p["name"]: ("127.0.0.1", port) for p in cfg["providers"]}
    env = Envoy(cfg, upstreams=upstreams, env=KEYS, concurrency=2)
    try:
        env.wait_ready()
        yield env
    finally:
        env.stop()


def journal(url):
    """(model, nonce) → requests LLMock received, from its journal."""
    _, _, body = http("GET", url + "/_llmock/requests", timeout=60)
    counts = Counter()
    for r in json.loads(body)["requests"]:
        text = json.dumps(r.get("body"))
        nonce = text.split("nonce:", 1)[1].split('"', 1)[0].split("\\", 1)[0] \
            if "nonce:" in text else None
        counts[(r.get("model"), nonce)] += 1
    return counts


@pytest.mark.parametrize("route", list(ROUTES))
def test_third_party_failures_fail_over_once_under_load(llmock, gateway, route):
    url, _ = llmock
    http("POST", url + "/_llmock/reset")
    status, _, body = http("POST", url + "/_llmock/scenario", {"behaviors": BEHAVIOURS})
    assert status in (200, 201), body
    client = Client(gateway.port)
    callers = ["openai", "anthropic", "gemini"]
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        nonce = f"{route}-{i}"
        caller, stream = callers[i % 3], i % 4 == 0
        status, headers, raw = call(client, route, nonce, caller, stream)
        return nonce, caller, stream, status, headers, raw

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(one, range(REQUESTS)))

    good_provider, good_model = ROUTES[route][2], ROUTES[route][3]
    bad = [(n, c, s, st, raw[:200]) for n, c, s, st, h, raw in results
           if st != 200 or f"nonce:{n}" not in raw.decode(errors="replace")
           or h.get("x-meshllm-provider") != good_provider]
    assert not bad, f"{len(bad)} of {REQUESTS} not served by the next target: {bad[:3]}"

    counts = journal(url)
    served = Counter({n: k for (m, n), k in counts.items() if m == good_model})
    assert set(served) == {f"{route}-{i}" for i in range(REQUESTS)}, "lost requests"
    assert max(served.values()) == 1, "a request reached the next target twice"
    tried = Counter({n: k for (m, n), k in counts.items() if m == ROUTES[route][1]})
    assert max(tried.values()) == 1, "the failing target got one request twice"
    assert 0 < sum(tried.values()) < REQUESTS, "the failing target never cooled down"
    assert sum(tried.values()) == sum(1 for *_, h, _ in results
                                      if h.get("x-meshllm-attempts") == "2")


def test_a_third_party_responses_api_passes_through_watched_under_load(llmock, gateway):
    """LLMock's own Responses events (written by others) pass event for
    event to 64 concurrent SDK callers, plain and streamed, each answered
    once, with the usage LLMock reported counted."""
    import openai
    from concurrent.futures import ThreadPoolExecutor

    url, _ = llmock
    http("POST", url + "/_llmock/reset")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="sk-client",
                           max_retries=0, timeout=30)

    def one(i):
        nonce = f"resp-{i}"
        if i % 2:
            with client.responses.stream(model="lm-responses", input=f"nonce:{nonce}") as s:
                kinds = [e.type for e in s]
                final = s.get_final_response()
            assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
        else:
            final = client.responses.create(model="lm-responses", input=f"nonce:{nonce}")
        assert f"nonce:{nonce}" in final.output_text, final.output_text
        assert final.usage.input_tokens > 0
        return final.usage.input_tokens + final.usage.output_tokens

    with ThreadPoolExecutor(CLIENTS) as pool:
        tokens = sum(pool.map(one, range(128)))
    counts = journal(url)
    for i in range(128):
        assert counts[("gpt-ok", f"resp-{i}")] == 1, i
    counted = sum(v for labels, v in gateway.series("meshllm_tokens_total")
                  if labels.get("gen_ai_request_model") == "lm-responses"
                  and labels.get("gen_ai_token_type") in ("input", "output"))
    assert counted == tokens
