"""Failover and routing through a real Envoy: Envoy's retries move each
request along its chain of targets, and the filter's upstream half
translates every attempt for the provider Envoy picked."""

import json
from collections import Counter

import pytest

from conftest import KEYS, Envoy, free_port, gateway_plugin_config, http

ROUTES = [
    {"name": "chain-500", "targets": ["m500", "claude-sonnet"]},
    {"name": "chain-500b", "targets": ["m500b", "claude-sonnet"]},
    {"name": "chain-500c", "targets": ["m500c", "claude-sonnet"]},
    {"name": "chain-3", "targets": ["m503", "m429-wait", "gemini-flash"]},
    {"name": "chain-reset", "targets": ["mreset", "gpt-4o-mini"]},
    {"name": "chain-stall", "targets": ["mstall", "gpt-4o-mini"]},
    {"name": "chain-dead", "targets": ["dead", "claude-sonnet"]},
    {"name": "chain-all-fail", "targets": ["m500", "m503b"]},
    {"name": "chain-cut", "targets": ["claude-cut", "gpt-4o-mini"]},
    {"name": "chain-health", "targets": ["m500-h", "gpt-4o"]},
    {"name": "chain-after-single", "targets": ["m500-single", "gpt-4o"]},
    {"name": "chain-retry-after", "targets": ["m429-r", "gpt-4o"]},
    {"name": "ab", "strategy": "weighted",
     "targets": [{"model": "gpt-4o-mini", "weight": 3}, {"model": "gpt-4o", "weight": 1}]},
    {"name": "fastest", "strategy": "lowest_latency", "targets": ["slow", "fast"]},
    {"name": "cheapest", "strategy": "lowest_cost", "targets": ["gpt-4o", "gpt-4o-mini"]},
    {"name": "vision", "targets": ["text-only", "gpt-4o"]},
    {"name": "best", "strategy": "scored", "score_weights": {"quality": 1},
     "targets": ["gpt-4o", "claude-sonnet"]},
    {"name": "us-only", "regions": ["us"], "targets": ["text-only", "vertex-gemini"]},
    {"name": "eu-only", "regions": ["eu"], "targets": ["text-only", "vertex-gemini"]},
    {"name": "resp-chain", "targets": ["m500-resp", "claude-sonnet"]},
    {"name": "whisper-chain", "targets": ["m500-whisper", "whisper-groq"]},
    {"name": "smart", "strategy": "auto",
     "targets": [{"model": "gpt-4o-mini", "tier": "simple"}, {"model": "claude-sonnet", "tier": "hard"}]},
]


@pytest.fixture(scope="module")
def failover(wasm, mocks):
    dead_port = free_port()
    cfg = gateway_plugin_config(dead_port)
    cfg["models"] += [
        {"name": "m500", "provider": "openai", "model": "mock-500"},
        {"name": "m500b", "provider": "openai", "model": "mock-500"},
        {"name": "m500c", "provider": "openai", "model": "mock-500"},
        {"name": "m500d", "provider": "openai", "model": "mock-500"},
        {"name": "m503", "provider": "openai", "model": "mock-503"},
        {"name": "m503b", "provider": "groq", "model": "mock-503"},
        {"name": "m429-wait", "provider": "groq", "model": "mock-429-wait"},
        {"name": "mreset", "provider": "openai", "model": "mock-reset"},
        {"name": "mstall", "provider": "openai", "model": "mock-stall"},
        {"name": "dead", "provider": "deadend", "model": "anything"},
        {"name": "m500-h", "provider": "openai", "model": "mock-500"},
        {"name": "m500-single", "provider": "openai", "model": "mock-500"},
        {"name": "m429-r", "provider": "groq", "model": "mock-429-wait"},
        {"name": "slow", "provider": "openai", "model": "mock-slow"},
        {"name": "fast", "provider": "groq", "model": "mock-fast"},
        {"name": "text-only", "provider": "groq", "model": "text-model",
         "capabilities": {"vision": False}},
        {"name": "m500-resp", "provider": "openai", "model": "mock-500"},
        {"name": "m500-whisper", "provider": "openai", "model": "mock-500"},
        {"name": "whisper-groq", "provider": "groq", "model": "whisper-large-v3"},
    ]
    for m in cfg["models"]:
        if m["name"] == "gpt-4o":
            m["price"] = {"input": 2.5, "output": 10}
        if m["name"] == "gpt-4o-mini":
            m["price"] = {"input": 0.15, "output": 0.6}
        if m["name"] == "gpt-4o":
            m["quality"] = 0.5
        if m["name"] == "claude-sonnet":
            m["quality"] = 0.95
        if m["name"] == "vertex-gemini":
            m["capabilities"] = {"region": "us"}
    cfg["routes"] = ROUTES
    cfg["failover"] = {"max_attempts": 3, "per_try_timeout_ms": 1500}
    upstreams = {name: ("127.0.0.1", m.port) for name, m in mocks.items()}
    upstreams["deadend"] = ("127.0.0.1", dead_port)
    env = Envoy(cfg, upstreams=upstreams, env=KEYS)
    try:
        env.wait_ready()
        yield env
    finally:
        env.stop()


def chat(env, model, text="hi", headers=None, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    status, h, raw = http("POST", env.url + "/v1/chat/completions", body, headers=headers)
    return status, h, json.loads(raw) if raw else None


def models_sent(mock):
    return [json.loads(r["body"]).get("model") for r in mock.take() if r["body"]]


def test_500_then_anthropic_answers_translated(failover, mocks):
    status, h, body = chat(failover, "chain-500", "fall over")
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert "Hello from the anthropic provider! You said: fall over" in body["choices"][0]["message"]["content"]
    assert h["x-meshllm-provider"] == "anthropic"
    assert h["x-meshllm-model"] == "claude-sonnet-4-5"
    assert h["x-meshllm-attempts"] == "2"
    assert h["x-meshllm-route"] == "ordered"
    # Attempt 1 went to OpenAI in OpenAI's shape, attempt 2 to Anthropic in its own.
    openai = mocks["openai"].take()
    assert [json.loads(r["body"])["model"] for r in openai] == ["mock-500"]
    assert openai[0]["headers"]["authorization"] == "Bearer " + KEYS["OPENAI_API_KEY"]
    anthropic = mocks["anthropic"].take()
    assert len(anthropic) == 1
    sent = json.loads(anthropic[0]["body"])
    assert sent["model"] == "claude-sonnet-4-5" and isinstance(sent["max_tokens"], int)
    assert anthropic[0]["path"] == "/v1/messages"
    # The OpenAI key set for attempt 1 never reaches Anthropic.
    assert "authorization" not in anthropic[0]["headers"]
    assert anthropic[0]["headers"]["x-api-key"] == KEYS["ANTHROPIC_API_KEY"]
    assert not any(k.startswith("x-meshllm") or k.startswith("x-envoy") for k in anthropic[0]["headers"])


def test_503_then_429_then_gemini(failover, mocks):
    status, h, body = chat(failover, "chain-3", "third time")
    assert status == 200, body
    assert h["x-meshllm-attempts"] == "3"
    assert h["x-meshllm-provider"] == "gemini"
    assert "You said: third time" in body["choices"][0]["message"]["content"]
    assert models_sent(mocks["openai"]) == ["mock-503"]
    assert models_sent(mocks["groq"]) == ["mock-429-wait"]
    gemini = mocks["gemini"].take()
    assert len(gemini) == 1 and ":generateContent" in gemini[0]["path"]
    assert "contents" in json.loads(gemini[0]["body"])


def test_reset_moves_on(failover, mocks):
    status, h, body = chat(failover, "chain-reset")
    assert status == 200, body
    assert h["x-meshllm-attempts"] == "2" and h["x-meshllm-model"] == "gpt-4o-mini"
    assert models_sent(mocks["openai"]) == ["mock-reset", "gpt-4o-mini"]


def test_stall_before_first_byte_times_out_and_moves_on(failover, mocks):
    status, h, body = chat(failover, "chain-stall")
    assert status == 200, body
    assert h["x-meshllm-attempts"] == "2" and h["x-meshllm-model"] == "gpt-4o-mini"


def test_connect_failure_moves_on(failover, mocks):
    status, h, body = chat(failover, "chain-dead", "anyone there")
    assert status == 200, body
    assert h["x-meshllm-provider"] == "anthropic" and h["x-meshllm-attempts"] == "2"


def test_every_target_failing_gives_the_last_error_in_callers_shape(failover, mocks):
    status, h, body = chat(failover, "chain-all-fail")
    assert status == 503
    assert body["error"]["type"] == "server_error"
    assert "scripted 503" in body["error"]["message"]
    assert h["x-meshllm-attempts"] == "2" and h["x-meshllm-provider"] == "groq"
    assert models_sent(mocks["openai"]) == ["mock-500"]
    assert models_sent(mocks["groq"]) == ["mock-503"]


def test_anthropic_caller_fails_over_with_per_attempt_translation(failover, mocks):
    body = {"model": "chain-500b", "max_tokens": 64,
            "messages": [{"role": "user", "content": "from anthropic sdk"}]}
    status, h, raw = http("POST", failover.url + "/v1/messages", body,
                          headers={"anthropic-version": "2023-06-01", "x-api-key": "client-key"})
    answer = json.loads(raw)
    assert status == 200, answer
    assert answer["type"] == "message"
    assert "You said: from anthropic sdk" in answer["content"][0]["text"]
    assert h["x-meshllm-attempts"] == "2"
    openai = mocks["openai"].take()
    assert "messages" in json.loads(openai[0]["body"])          # translated to OpenAI
    assert "anthropic-version" not in openai[0]["headers"]
    anthropic = mocks["anthropic"].take()
    assert anthropic[0]["headers"]["anthropic-version"] == "2023-06-01"
    assert anthropic[0]["headers"]["x-api-key"] == KEYS["ANTHROPIC_API_KEY"]


def test_mid_stream_cut_is_not_retried(failover, mocks):
    body = {"model": "chain-cut", "stream": True, "messages": [{"role": "user", "content": "cut"}]}
    status, h, raw = http("POST", failover.url + "/v1/chat/completions", body)
    assert status == 200
    text = raw.decode()
    assert '"error"' in text
    assert "[DONE]" not in text
    assert h["x-meshllm-attempts"] == "1"
    assert len(mocks["anthropic"].take()) == 1
    assert mocks["openai"].take() == []


def test_failing_target_cools_down_then_is_skipped(failover, mocks):
    for _ in range(3):
        status, h, _ = chat(failover, "chain-health")
        assert status == 200 and h["x-meshllm-attempts"] == "2"
    status, h, _ = chat(failover, "chain-health")
    assert status == 200
    assert h["x-meshllm-attempts"] == "1"
    assert "skipped=m500-h" in h["x-meshllm-route"]
    assert Counter(models_sent(mocks["openai"])) == {"mock-500": 3, "gpt-4o": 4}


def test_single_target_skips_the_upstream_half_and_still_feeds_health(failover, mocks):
    """A model with nothing to fail over to is served by the listener half
    alone (straight to meshllm.p0); its failures still count against it."""
    sent_before = failover.stat("cluster.meshllm.p0.upstream_rq_total")
    for _ in range(3):
        status, h, body = chat(failover, "m500-single")
        assert status == 500, body
        assert h["x-meshllm-attempts"] == "1"
        assert h["x-meshllm-provider"] == "openai"
    assert failover.stat("cluster.meshllm.p0.upstream_rq_total") == sent_before + 3
    got = mocks["openai"].take()
    assert [json.loads(r["body"])["model"] for r in got] == ["mock-500"] * 3
    for r in got:
        assert r["headers"]["authorization"] == "Bearer " + KEYS["OPENAI_API_KEY"]
        # Only the upstream half removes Envoy's attempt count: it did not run.
        assert r["headers"]["x-envoy-attempt-count"] == "1"
    status, h, _ = chat(failover, "chain-after-single")
    assert status == 200 and h["x-meshllm-attempts"] == "1"
    assert "skipped=m500-single" in h["x-meshllm-route"]
    assert models_sent(mocks["openai"]) == ["gpt-4o"]


def test_retry_after_puts_target_in_cool_down(failover, mocks):
    status, h, _ = chat(failover, "chain-retry-after")
    assert status == 200 and h["x-meshllm-attempts"] == "2"
    status, h, _ = chat(failover, "chain-retry-after")
    assert status == 200 and h["x-meshllm-attempts"] == "1"
    assert "skipped=m429-r" in h["x-meshllm-route"]
    assert models_sent(mocks["groq"]) == ["mock-429-wait"]


def test_weighted_split_within_bounds(failover, mocks):
    served = Counter()
    n = 400
    for _ in range(n):
        status, h, _ = chat(failover, "ab")
        assert status == 200
        served[h["x-meshllm-model"]] += 1
        assert h["x-meshllm-route"].startswith("weighted:")
    # 3:1 weights: 300 expected; binomial sd is about 8.7, bounds are 4.5 sd.
    assert 261 <= served["gpt-4o-mini"] <= 339, served
    assert served["gpt-4o-mini"] + served["gpt-4o"] == n


def test_latency_routing_prefers_the_faster_target(failover, mocks):
    reasons = []
    for _ in range(10):
        status, h, _ = chat(failover, "fastest")
        assert status == 200
        reasons.append(h["x-meshllm-model"])
    # Both are measured first (three samples each), then the fast one wins.
    assert reasons[-3:] == ["mock-fast"] * 3, reasons
    assert reasons.count("mock-slow") >= 3


def test_lowest_cost_puts_the_cheaper_model_first(failover, mocks):
    status, h, _ = chat(failover, "cheapest")
    assert status == 200
    assert h["x-meshllm-model"] == "gpt-4o-mini" and h["x-meshllm-route"] == "lowest_cost"


def test_capability_filter_skips_a_model_without_vision(failover, mocks):
    image = [{"type": "text", "text": "what is this"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    status, h, _ = chat(failover, "vision", image)
    assert status == 200
    assert h["x-meshllm-model"] == "gpt-4o"
    assert "filtered=text-only" in h["x-meshllm-route"]
    status, h, _ = chat(failover, "vision", "plain text")
    assert h["x-meshllm-model"] == "text-model"


def test_scored_route_puts_the_best_score_first(failover, mocks):
    status, h, body = chat(failover, "best", "score me")
    assert status == 200, body
    assert h["x-meshllm-provider"] == "anthropic" and h["x-meshllm-route"] == "scored"


def test_region_policy_keeps_only_targets_in_allowed_regions(failover, mocks):
    status, h, body = chat(failover, "us-only", "stay in the us")
    assert status == 200, body
    assert h["x-meshllm-provider"] == "vertex"
    assert "filtered=text-only" in h["x-meshllm-route"]
    status, h, body = chat(failover, "eu-only", "stay in the eu")
    assert status == 400
    assert body["error"]["code"] == "no_capable_model"
    assert "eu-only" in body["error"]["message"]
    assert mocks["groq"].take() == []


def test_auto_router_sends_simple_and_hard_prompts_apart(failover, mocks):
    status, h, _ = chat(failover, "smart", "What is the capital of France?")
    assert status == 200 and h["x-meshllm-provider"] == "openai"
    assert h["x-meshllm-route"].startswith("auto:simple")
    hard = "Prove step by step that the algorithm below terminates:\n```python\ndef f(n):\n    while n > 1:\n        n = n // 2\n```"
    status, h, _ = chat(failover, "smart", hard)
    assert status == 200 and h["x-meshllm-provider"] == "anthropic"
    assert h["x-meshllm-route"].startswith("auto:hard(")


def test_caller_names_its_own_chain_in_a_header(failover, mocks):
    status, h, body = chat(failover, "m500d", headers={"x-meshllm-models": "gemini-flash"})
    assert status == 200, body
    assert h["x-meshllm-attempts"] == "2" and h["x-meshllm-provider"] == "gemini"
    assert h["x-meshllm-route"].startswith("request")
    status, h, body = chat(failover, "gpt-4o", headers={"x-meshllm-models": "no-such-model"})
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_models_listing_includes_routes(failover):
    status, _, raw = http("GET", failover.url + "/v1/models")
    ids = {m["id"]: m["owned_by"] for m in json.loads(raw)["data"]}
    assert ids["chain-500"] == "meshllm" and ids["gpt-4o"] == "openai"


def test_openai_sdk_gets_one_normal_answer_across_a_failover(failover):
    import openai

    client = openai.OpenAI(base_url=failover.url + "/v1", api_key="client-key", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="chain-500c", messages=[{"role": "user", "content": "sdk"}])
    answer = raw.parse()
    assert "You said: sdk" in answer.choices[0].message.content
    assert raw.headers["x-meshllm-attempts"] == "2"
    stream = client.chat.completions.create(
        model="chain-3", stream=True, messages=[{"role": "user", "content": "streamed"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "You said: streamed" in text


@pytest.fixture(scope="module")
def single_filter(wasm, mocks):
    """`"failover": {"enabled": false}`: one listener filter, one cluster per provider."""
    cfg = gateway_plugin_config(free_port())
    cfg["models"].append({"name": "m500", "provider": "openai", "model": "mock-500"})
    cfg["routes"] = [{"name": "chain-500", "targets": ["m500", "claude-sonnet"]}]
    cfg["failover"] = {"enabled": False}
    upstreams = {name: ("127.0.0.1", m.port) for name, m in mocks.items()}
    env = Envoy(cfg, upstreams=upstreams, env=KEYS)
    try:
        env.wait_ready()
        yield env
    finally:
        env.stop()


def test_single_filter_mode_serves_and_translates_without_failover(single_filter, mocks):
    status, h, body = chat(single_filter, "gpt-4o-mini", "single")
    assert status == 200, body
    assert h["x-meshllm-provider"] == "openai" and "x-meshllm-attempts" not in h
    status, h, body = chat(single_filter, "claude-sonnet", "translated")
    assert status == 200, body
    assert "You said: translated" in body["choices"][0]["message"]["content"]
    assert h["x-meshllm-provider"] == "anthropic"
    # A route's first target answers alone: no second attempt.
    mocks["anthropic"].take()
    status, h, body = chat(single_filter, "chain-500")
    assert status == 500 and "scripted 500" in body["error"]["message"]
    assert mocks["anthropic"].take() == []
    assert models_sent(mocks["openai"]) == ["gpt-4o-mini", "mock-500"]


def test_a_responses_call_fails_over_from_openai_itself_to_anthropic_translated(failover, mocks):
    """The first attempt is OpenAI's own /v1/responses, the second the
    Anthropic translation, each prepared by the upstream half."""
    import openai
    client = openai.OpenAI(base_url=failover.url + "/v1", api_key="sk-client", max_retries=0)
    for stream in (False, True):
        if stream:
            with client.responses.stream(model="resp-chain", input="fall over") as s:
                kinds = [e.type for e in s]
                resp = s.get_final_response()
            assert kinds[-1] == "response.completed"
        else:
            resp = client.responses.create(model="resp-chain", input="fall over")
        assert resp.output_text.endswith("You said: fall over"), resp.output_text
        first = mocks["openai"].take()
        assert [r["path"] for r in first] == ["/v1/responses"]
        assert json.loads(first[0]["body"])["model"] == "mock-500"
        assert [r["path"] for r in mocks["anthropic"].take()] == ["/v1/messages"]


def test_a_multipart_upload_fails_over_with_its_model_field_rewritten(failover, mocks):
    import openai
    client = openai.OpenAI(base_url=failover.url + "/v1", api_key="sk-client", max_retries=0)
    audio = b"RIFF" + bytes(range(256)) * 8
    raw = client.audio.transcriptions.with_raw_response.create(
        model="whisper-chain", file=("a.wav", audio, "audio/wav"))
    assert raw.headers["x-meshllm-provider"] == "groq"
    assert raw.headers["x-meshllm-attempts"] == "2"
    assert str(len(audio)) in raw.parse().text
    (first,) = mocks["openai"].take()
    (second,) = mocks["groq"].take()
    assert "\r\n\r\nmock-500\r\n" in first["body"]
    assert "\r\n\r\nwhisper-large-v3\r\n" in second["body"]
    assert second["path"] == "/openai/v1/audio/transcriptions"
    assert second["headers"]["authorization"] == f"Bearer {KEYS['GROQ_API_KEY']}"
