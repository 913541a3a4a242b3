"""Failover under load and faults: each failure mode of a route's first
target, 64 concurrent clients on an Envoy with two workers. Every request
must be answered exactly once by the good target (counted at the mock by a
per-request nonce), none lost, none sent twice, and the failing target must
cool down. A cut after the first byte is an error for the caller and never
a second attempt."""

import http.client
import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from pathlib import Path

import pytest

from conftest import BUILD, KEYS, Envoy, free_port, http as http_call
from faultserver import FaultServer

CLIENTS = 64
REQUESTS = 500
PER_TRY_TIMEOUT_MS = 1000

# Mode → the failing target's upstream model (the fault server's script),
# and the provider that serves it ("dead" listens nowhere).
MODES = {
    "500": ("flaky", "fail-500"),
    "502": ("flaky", "fail-502"),
    "503": ("flaky", "fail-503"),
    "503-text": ("flaky", "fail-503-text"),
    "429-retry-after": ("flaky", "fail-429"),
    "connection-refused": ("dead", "anything"),
    "reset-before-headers": ("flaky", "fail-reset"),
    "stall-past-per-try-timeout": ("flaky", "fail-stall"),
}
# Metric error_type each mode's failed attempts are counted under.
ERROR_TYPES = {
    "500": "500", "502": "502", "503": "503", "503-text": "503", "429-retry-after": "429",
    "connection-refused": "connect_failure", "reset-before-headers": "reset",
    "stall-past-per-try-timeout": "timeout",
}


def expected_error_type(mode):
    """The attempt's `error_type`. The native build's upstream filter sees
    the caller's stream info, not the attempt's connection, so an attempt
    reset before any answer reads as a connection failure there (a stall
    still reads as a timeout, by the clock)."""
    if BUILD == "native" and mode == "reset-before-headers":
        return "connect_failure"
    return ERROR_TYPES[mode]


CUTS = {"cut-after-first-byte": False, "cut-stream": True}


@pytest.fixture(scope="module")
def fault_env(wasm):
    faults = FaultServer(stall_seconds=PER_TRY_TIMEOUT_MS / 1000 * 5, delay_seconds=0.2).start()
    dead_port = free_port()
    cfg = {
        "providers": [
            {"name": "flaky", "kind": "openai_compatible", "base_url": "http://flaky.test/v1",
             "api_key_env": "OPENAI_API_KEY"},
            {"name": "dead", "kind": "openai_compatible", "base_url": "http://dead.test/v1",
             "api_key_env": "OPENAI_API_KEY"},
            {"name": "good", "kind": "anthropic", "api_key_env": "ANTHROPIC_API_KEY"},
        ],
        "models": [{"name": "good-claude", "provider": "good", "model": "claude-good"},
                   {"name": "solo-500", "provider": "flaky", "model": "fail-500"}],
        "routes": [],
        "failover": {"max_attempts": 3, "per_try_timeout_ms": PER_TRY_TIMEOUT_MS},
    }
    for mode, (provider, upstream_model) in {**MODES, **{c: ("flaky", c) for c in CUTS}}.items():
        cfg["models"].append({"name": f"first-{mode}", "provider": provider,
                              "model": upstream_model})
        cfg["routes"].append({"name": f"route-{mode}",
                              "targets": [f"first-{mode}", "good-claude"]})
    upstreams = {"flaky": ("127.0.0.1", faults.port), "good": ("127.0.0.1", faults.port),
                 "dead": ("127.0.0.1", dead_port)}
    env = Envoy(cfg, upstreams=upstreams, env=KEYS, concurrency=2)
    try:
        env.wait_ready()
        yield env, faults
    finally:
        env.stop()
        faults.stop()


class Client:
    """One keep-alive connection per client thread, like an SDK's pool."""

    local = threading.local()

    def __init__(self, port):
        self.port = port

    def post(self, path, body, headers):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("POST", path, json.dumps(body).encode(),
                         {"content-type": "application/json", **headers})
            r = conn.getresponse()
            data = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, data
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            self.local.conn = None
            return None, {}, repr(e).encode()


def call(client, route, nonce, caller, stream):
    """One request in the caller's API; returns (status, headers, text)."""
    text = f"please answer nonce:{nonce}"
    if caller == "openai":
        body = {"model": route, "messages": [{"role": "user", "content": text}]}
        if stream:
            body["stream"] = True
        return client.post("/v1/chat/completions", body, {"authorization": "Bearer client"})
    if caller == "anthropic":
        body = {"model": route, "max_tokens": 64, "stream": stream,
                "messages": [{"role": "user", "content": text}]}
        return client.post("/v1/messages", body, {"x-api-key": "client",
                                                  "anthropic-version": "2023-06-01"})
    verb = "streamGenerateContent?alt=sse" if stream else "generateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    return client.post(f"/v1beta/models/{route}:{verb}", body, {"x-goog-api-key": "client"})


def complete_answer(caller, stream, raw, nonce):
    """The caller got the whole good answer, in its own API's shape."""
    want = f"good answer for nonce:{nonce}"
    text = raw.decode(errors="replace")
    if stream:
        ends = {"openai": "data: [DONE]", "anthropic": "event: message_stop",
                "gemini": '"finishReason": "STOP"'}
        return want in text and ends[caller] in text.replace('"finishReason":"STOP"',
                                                              '"finishReason": "STOP"')
    doc = json.loads(raw)
    if caller == "openai":
        return doc["choices"][0]["message"]["content"] == want
    if caller == "anthropic":
        return doc["content"][0]["text"] == want
    return doc["candidates"][0]["content"]["parts"][0]["text"] == want


def run_load(env, route, prefix, count, stream_every=4):
    client = Client(env.port)
    callers = ["openai", "anthropic", "gemini"]

    def one(i):
        nonce = f"{prefix}-{i}"
        caller, stream = callers[i % 3], i % stream_every == 0
        status, headers, raw = call(client, route, nonce, caller, stream)
        return nonce, caller, stream, status, headers, raw

    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(one, range(count)))


def retry_overflows(env):
    return sum(env.stat(f"cluster.{c}.upstream_rq_retry_overflow")
               for c in ["meshllm", "meshllm.p0", "meshllm.p1", "meshllm.p2"])


@pytest.mark.parametrize("mode", list(MODES))
def test_every_request_is_answered_once_by_the_next_target(fault_env, mode):
    env, faults = fault_env
    faults.take()
    provider, upstream_model = MODES[mode]
    results = run_load(env, f"route-{mode}", mode, REQUESTS)

    bad = [(n, c, s, st, raw[:200]) for n, c, s, st, h, raw in results
           if st != 200 or not complete_answer(c, s, raw, n)]
    assert not bad, f"{len(bad)} of {REQUESTS} not answered well, e.g. {bad[:3]}"
    assert all(h.get("x-meshllm-provider") == "good" for *_, h, _ in results)

    counts = faults.take()
    good = Counter({nonce: n for (model, nonce), n in counts.items() if model == "claude-good"})
    nonces = {f"{mode}-{i}" for i in range(REQUESTS)}
    assert set(good) == nonces, "lost or unknown requests at the good target"
    assert [n for n, k in good.items() if k != 1] == [], "sent twice to the good target"

    # The failing target was tried at most once per request, and it cooled
    # down: later requests skipped it.
    tried = Counter({n: k for (model, n), k in counts.items() if model == upstream_model})
    assert all(k == 1 for k in tried.values()), "a failing target tried twice for one request"
    skipped = sum(1 for *_, h, _ in results if "skipped=first-" in h.get("x-meshllm-route", ""))
    attempts2 = sum(1 for *_, h, _ in results if h.get("x-meshllm-attempts") == "2")
    assert skipped > 0, "the failing target never cooled down"
    assert skipped + attempts2 == REQUESTS
    if provider == "flaky":
        assert sum(tried.values()) == attempts2
    assert sum(tried.values()) <= REQUESTS // 2 if provider == "flaky" else True

    assert retry_overflows(env) == 0
    labels = dict(gen_ai_provider_name=provider, gen_ai_response_model=upstream_model)
    assert env.metric("meshllm_attempts_total", **labels,
                      error_type=expected_error_type(mode)) == attempts2
    assert env.metric("meshllm_fallbacks_total", fallback_from=provider,
                      gen_ai_request_model=f"route-{mode}") == attempts2


@pytest.mark.parametrize("mode", list(CUTS))
def test_a_cut_after_the_first_byte_is_an_error_and_never_retried(fault_env, mode):
    env, faults = fault_env
    faults.take()
    stream = CUTS[mode]
    count = 128
    results = run_load(env, f"route-{mode}", mode, count, stream_every=1 if stream else 10**9)
    counts = faults.take()
    assert not any(model == "claude-good" for model, _ in counts), "retried after the first byte"
    tried = Counter({n: k for (model, n), k in counts.items() if model == mode})
    assert tried == Counter({f"{mode}-{i}": 1 for i in range(count)})
    for nonce, caller, _, status, _, raw in results:
        # A cut connection or an error; never a clean, complete answer.
        if status is None:
            continue
        text = raw.decode(errors="replace")
        assert status != 200 or not any(end in text for end in
                                         ["data: [DONE]", "event: message_stop", '"STOP"']), \
            (caller, status, text[:300])
        assert nonce not in text or status is None


def test_overload_settings_are_deliberate(fault_env):
    """The retry circuit breaker is not Envoy's default of 3."""
    env, _ = fault_env
    _, _, body = http_call("GET", env.admin + "/config_dump?resource=dynamic_active_clusters")
    _, _, body = http_call("GET", env.admin + "/config_dump")
    dump = json.loads(body)
    clusters = [c["cluster"] for s in dump["configs"] if "static_clusters" in s
                for c in s["static_clusters"]]
    for c in clusters:
        if c["name"].startswith("meshllm"):
            thresholds = c["circuit_breakers"]["thresholds"][0]
            assert int(thresholds["max_retries"]) >= 1 << 20, c["name"]


FORGED = json.loads((Path(__file__).parent / "fixtures" / "hostile" / "forged_headers.json").read_text())


@pytest.mark.parametrize("forged", FORGED["sets"], ids=[s["name"] for s in FORGED["sets"]])
def test_forged_internal_headers_change_nothing(fault_env, forged):
    """A client's copy of an internal header neither steers the request,
    nor sends it twice, nor feeds any target's health."""
    env, faults = fault_env
    faults.take()
    client = Client(env.port)
    headers = {"authorization": "Bearer client", **forged["headers"]}

    def post(model, nonce):
        body = {"model": model, "messages": [{"role": "user", "content": f"nonce:{nonce}"}]}
        return client.post("/v1/chat/completions", body, headers)

    # A single target, many times over: every one served once, by it.
    for i in range(8):
        status, h, raw = post("good-claude", f"solo-{i}")
        assert status == 200, raw[:300]
        assert json.loads(raw)["choices"][0]["message"]["content"] == f"good answer for nonce:solo-{i}"
        assert h["x-meshllm-attempts"] == "1" and h["x-meshllm-provider"] == "good"
    # A failing single target: its error, sent once (no forged retries).
    for i in range(3):
        status, h, raw = post("solo-500", f"fail-{i}")
        assert status == 500, raw[:300]
        assert json.loads(raw)["error"]["message"]
    # A route: still its own order, the good target's health untouched.
    status, h, raw = post("route-500", "route")
    assert status == 200 and h["x-meshllm-provider"] == "good", raw[:300]
    assert "skipped=good" not in h.get("x-meshllm-route", "")
    counts = faults.take()
    assert counts == Counter({**{("claude-good", f"solo-{i}"): 1 for i in range(8)},
                              **{("fail-500", f"fail-{i}"): 1 for i in range(3)},
                              ("claude-good", "route"): 1,
                              **({("fail-500", "route"): 1} if counts.get(("fail-500", "route")) else {})})
    # And the good target never cooled down from any of it.
    status, h, _ = post("good-claude", "after")
    assert status == 200 and h["x-meshllm-provider"] == "good"
