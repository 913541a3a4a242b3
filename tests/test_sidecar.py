"""Sidecar mode: the outbound listener carries all of a pod's HTTP traffic,
so the filter handles only the hosts its config names (`hosts`) and lets
every other request through untouched. Other hosts' routes do not run the
filter at all (it is disabled unless a route enables it)."""

import json

import pytest

from conftest import KEYS, Envoy, free_port, gateway_plugin_config, http, wait_for
from mock_provider import MockProvider

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(scope="module")
def sidecar(wasm, mocks):
    other = MockProvider(label="reviews").start()
    cfg = gateway_plugin_config(free_port())
    cfg["hosts"] = ["llm.mesh", "api.openai.com"]
    upstreams = {name: ("127.0.0.1", m.port) for name, m in mocks.items()}
    env = Envoy(cfg, upstreams=upstreams, env=KEYS,
                other_services={"reviews": ("127.0.0.1", other.port)})
    try:
        env.wait_ready()
        env.other = other
        yield env
    finally:
        env.stop()
        other.stop()


def test_llm_hosts_are_handled(sidecar, mocks):
    for host in ["llm.mesh", "api.openai.com:80"]:
        status, headers, body = http("POST", sidecar.url + "/v1/chat/completions", CHAT,
                                     {"host": host, "authorization": "Bearer app-secret"})
        assert status == 200, body
        assert headers["x-meshllm-provider"] == "openai"
        reqs = mocks["openai"].take()
        assert len(reqs) == 1
        assert reqs[0]["headers"]["authorization"] == f"Bearer {KEYS['OPENAI_API_KEY']}"


def test_other_hosts_pass_through_untouched(sidecar, mocks):
    raw = json.dumps({**CHAT, "model": "not-a-configured-model"})
    status, headers, body = http(
        "POST", sidecar.url + "/v1/chat/completions", raw.encode(),
        {"host": "reviews:9080", "authorization": "Bearer app-secret",
         "content-type": "application/json",
         # A client cannot reach a provider's cluster this way either.
         "x-meshllm-cluster": "openai"},
    )
    assert status == 200, body
    assert "x-meshllm-provider" not in headers
    reqs = sidecar.other.take()
    assert len(reqs) == 1
    got = reqs[0]
    assert got["body"] == raw, "the body is not rewritten"
    assert got["headers"]["authorization"] == "Bearer app-secret", "nor the credential"
    # The filter never ran for it (it is off outside the LLM hosts' routes,
    # as in the Istio install): it strips every x-meshllm-* header it sees,
    # and this one arrives as sent, without steering the request anywhere.
    assert got["headers"]["x-meshllm-cluster"] == "openai"
    assert mocks["openai"].take() == []
    # Any path, any method: not the gateway's "unknown URL" error.
    status, _, body = http("GET", sidecar.url + "/ratings/1", None, {"host": "reviews"})
    assert status == 404 and json.loads(body)["error"]["message"] == "not found"
    # And none of it is counted as an LLM call.
    assert wait_for(lambda: sidecar.metric("meshllm_requests_total",
                                           gen_ai_request_model="not-a-configured-model") == 0)
    assert sidecar.metric("meshllm_requests_total", gen_ai_request_model="_OTHER") == 0
