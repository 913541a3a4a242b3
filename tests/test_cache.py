"""The response cache through a real Envoy (two workers) with the official
SDKs: a repeated request answered from the proxy without reaching a
provider, plain and streamed, in OpenAI's, Anthropic's and Gemini's APIs,
behind a failover chain and for embeddings; callers of another namespace
never served another's answer; `Cache-Control: no-store` and `no-cache`;
sampled requests, tool turns, errors and cut streams never kept; a hit
still counted by request quotas; metrics and access logs; 64 concurrent
callers on two workers. The mocks count what reached the providers."""

import json
import threading
import time
from urllib.request import Request, urlopen

import anthropic
import openai
import pytest
from google import genai
from google.genai import types as genai_types

from conftest import KEYS, Envoy, free_port, gateway_plugin_config

HIT = "x-meshllm-cache"


@pytest.fixture(scope="module")
def env(wasm, mocks):
    cfg = gateway_plugin_config(free_port())
    cfg["identity"] = {"source": "trusted_header", "header": "x-caller"}
    # Anthropic's API has no sampling parameters any more (SDK 2.x): its
    # answers are cached only for models allowed to be cached sampled.
    cfg["cache"] = {"ttl_s": 60, "max_entries": 4096, "sampled": ["claude-sonnet"]}
    cfg["namespaces"] = {"lab": {"cache": False}}
    cfg["quotas"] = {"limits": [
        {"name": "three", "match": {"namespace": "metered"}, "requests_per_minute": 3},
    ]}
    upstreams = {name: ("127.0.0.1", m.port) for name, m in mocks.items()}
    gw = Envoy(cfg, upstreams=upstreams, env=KEYS, concurrency=2)
    try:
        gw.wait_ready()
        for m in mocks.values():
            m.take()
        yield gw
    finally:
        gw.stop()


def oai(env, caller="shop/web", **headers):
    return openai.OpenAI(base_url=env.url + "/v1", api_key="sk-client", max_retries=0,
                         timeout=15, default_headers={"x-caller": caller, **headers})


def chat(env, prompt, caller="shop/web", model="gpt-4o-mini", **kw):
    """(answer, the cache header) of a greedy chat call."""
    kw.setdefault("temperature", 0)
    raw = oai(env, caller).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt}], **kw)
    return raw.parse(), raw.headers.get(HIT)


def reached(mock):
    return len(mock.take())


def test_a_repeated_request_is_answered_from_the_cache(env, mocks):
    first, state = chat(env, "cache me once")
    assert state == "miss"
    again, state = chat(env, "cache me once", caller="shop/api")
    assert state == "hit", "another service of the namespace shares it"
    assert again.id == first.id and again.choices[0].message.content == \
        first.choices[0].message.content
    assert reached(mocks["openai"]) == 1
    raw = oai(env).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", temperature=0,
        messages=[{"role": "user", "content": "cache me once"}])
    assert raw.headers.get(HIT) == "hit" and raw.headers.get("age", "").isdigit()
    assert raw.headers.get("x-meshllm-provider") == "openai"
    # Another namespace asks the provider itself; `lab` has the cache off.
    other, state = chat(env, "cache me once", caller="other/web")
    assert state == "miss" and other.id == first.id  # the mock's ids are content hashes
    for _ in range(2):
        _, state = chat(env, "cache me once", caller="lab/web")
        assert state is None
    assert reached(mocks["openai"]) == 3
    assert env.metric("meshllm_cache_lookups_total", outcome="hit",
                      caller_namespace="shop") >= 1
    assert env.metric("meshllm_cache_stores_total", caller_namespace="other") >= 1


def test_a_hit_costs_no_tokens_and_is_logged(env, mocks):
    chat(env, "log my hit", caller="logs/app")
    _, state = chat(env, "log my hit", caller="logs/app")
    assert state == "hit"
    assert reached(mocks["openai"]) == 1
    deadline = time.time() + 5
    while True:
        lines = [json.loads(line) for line in env.access_log_lines()]
        mine = [line for line in lines if line.get("caller") == "logs/app"]
        if len(mine) >= 2 or time.time() > deadline:
            break
        time.sleep(0.1)
    assert [line["cache"] for line in mine] == ["stored", "hit"], mine
    assert mine[1]["input_tokens"] == "0" and mine[1]["output_tokens"] == "0"
    assert int(mine[0]["input_tokens"]) > 0


def test_streams_are_replayed_in_each_callers_api(env, mocks):
    def openai_stream():
        raw = oai(env).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", temperature=0, stream=True,
            messages=[{"role": "user", "content": "stream me"}])
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        return text, raw.headers.get(HIT)

    claude = anthropic.Anthropic(base_url=env.url, api_key="sk-client", max_retries=0,
                                 default_headers={"x-caller": "shop/web"})

    def anthropic_stream():
        raw = claude.messages.with_raw_response.create(
            model="claude-sonnet", max_tokens=50, stream=True,
            messages=[{"role": "user", "content": "stream me"}])
        events = list(raw.parse())
        assert events[-1].type == "message_stop"
        text = "".join(e.delta.text for e in events
                       if e.type == "content_block_delta" and e.delta.type == "text_delta")
        return text, raw.headers.get(HIT)

    gem = genai.Client(api_key="client-key", http_options=genai_types.HttpOptions(
        base_url=env.url, headers={"x-caller": "shop/web"}))

    def gemini_stream():
        chunks = list(gem.models.generate_content_stream(
            model="gemini-flash", contents="stream me",
            config=genai_types.GenerateContentConfig(temperature=0)))
        return "".join(c.text or "" for c in chunks), None

    for run, mock in ((openai_stream, "openai"), (anthropic_stream, "anthropic"),
                      (gemini_stream, "gemini")):
        text, state = run()
        assert "stream me" in text and state in ("miss", None), (mock, state)
        again, state = run()
        assert again == text and state in ("hit", None), (mock, state)
        assert reached(mocks[mock]) == 1, f"{mock}: the replay never reached it"
    # Streamed and whole answers are kept apart.
    _, state = chat(env, "stream me")
    assert state == "miss"
    assert reached(mocks["openai"]) == 1


def test_a_failover_chain_and_embeddings_are_cached(env, mocks):
    first, state = chat(env, "route me", model="smart")
    assert state == "miss"
    again, state = chat(env, "route me", model="smart")
    assert state == "hit" and again.id == first.id
    assert reached(mocks["openai"]) == 1
    client = oai(env)
    a = client.embeddings.with_raw_response.create(model="text-embedding-3-small",
                                                   input=["cache", "me"])
    b = client.embeddings.with_raw_response.create(model="text-embedding-3-small",
                                                   input=["cache", "me"])
    assert (a.headers.get(HIT), b.headers.get(HIT)) == ("miss", "hit")
    assert b.parse().data[1].embedding == a.parse().data[1].embedding
    assert reached(mocks["openai"]) == 1


def test_no_store_no_cache_sampling_and_tools_bypass_it(env, mocks):
    chat(env, "control me")
    assert reached(mocks["openai"]) == 1
    raw = oai(env, **{"Cache-Control": "no-store"}).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", temperature=0, messages=[{"role": "user", "content": "control me"}])
    assert raw.headers.get(HIT) == "bypass"
    raw = oai(env, **{"Cache-Control": "no-cache"}).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", temperature=0, messages=[{"role": "user", "content": "control me"}])
    assert raw.headers.get(HIT) == "miss"
    refreshed = raw.parse()
    assert reached(mocks["openai"]) == 2
    again, state = chat(env, "control me")
    assert state == "hit" and again.id == refreshed.id, "no-cache stored the fresh answer"
    # Sampled (no temperature) and tool turns: every one reaches the provider.
    for _ in range(2):
        raw = oai(env).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "sample me"}])
        assert raw.headers.get(HIT) == "bypass"
        chat(env, "tool me", tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {}}}}])
    assert reached(mocks["openai"]) == 4


def test_errors_and_cut_streams_are_never_kept(env, mocks):
    for _ in range(2):
        with pytest.raises(openai.RateLimitError):
            chat(env, "fail me", model="err-429")
    assert reached(mocks["openai"]) == 2
    # A provider that breaks off mid-stream: the caller's stream ends with
    # an error, and nothing is kept for the next caller.
    for _ in range(2):
        stream = oai(env).chat.completions.create(
            model="claude-cut", temperature=0, stream=True,
            messages=[{"role": "user", "content": "cut me"}])
        with pytest.raises(openai.APIError):
            for _chunk in stream:
                pass
    assert reached(mocks["anthropic"]) == 2


def test_a_hit_still_counts_for_request_quotas(env, mocks):
    for n in range(3):
        _, state = chat(env, "meter me", caller="metered/app")
        assert state == ("miss" if n == 0 else "hit")
    with pytest.raises(openai.RateLimitError):
        chat(env, "meter me", caller="metered/app")
    assert reached(mocks["openai"]) == 1


def test_64_concurrent_callers_on_two_workers(env, mocks):
    prompts = [f"concurrent prompt {i}" for i in range(64)]
    results, errors = {}, []

    def call(i, prompt):
        try:
            results[i] = chat(env, prompt, caller="load/app")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def wave(items):
        threads = [threading.Thread(target=call, args=item) for item in items]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors[:3]

    # 64 distinct requests: each reaches the provider once.
    wave(list(enumerate(prompts)))
    first = {i: r[0].id for i, r in results.items()}
    assert reached(mocks["openai"]) == 64
    # The same 64 again, from both workers: every one a hit.
    results.clear()
    wave(list(enumerate(prompts)))
    assert all(state == "hit" for _, state in results.values()), \
        sorted({s for _, s in results.values()})
    assert {i: r[0].id for i, r in results.items()} == first
    assert reached(mocks["openai"]) == 0
    # 64 callers of one new request at once: misses race, but each reaches
    # the provider at most once and every later one is a hit.
    results.clear()
    wave([(i, "one for all") for i in range(64)])
    n = reached(mocks["openai"])
    assert 1 <= n <= 64
    _, state = chat(env, "one for all", caller="load/app")
    assert state == "hit"
    assert reached(mocks["openai"]) == 0


def test_forged_cache_header_from_a_client_is_not_believed(env, mocks):
    # A client cannot make the gateway claim (or skip) a hit with its own header.
    req = Request(env.url + "/v1/chat/completions", method="POST", data=json.dumps({
        "model": "gpt-4o-mini", "temperature": 0,
        "messages": [{"role": "user", "content": "forge me"}]}).encode(),
        headers={"content-type": "application/json", "x-caller": "forge/app",
                 HIT: "hit", "authorization": "Bearer sk-client"})
    with urlopen(req, timeout=15) as r:
        assert r.headers.get(HIT) == "miss"
    got = mocks["openai"].take()
    assert len(got) == 1
    assert HIT not in got[0]["headers"], "internal headers never reach a provider"


# ---- shared across proxies through the quota store's Redis -----------------------

@pytest.fixture(scope="module")
def shared(wasm, mocks):
    from test_shared_quota import Redis, Webdis, start_envoys

    redis = Redis()
    webdis = Webdis(redis.port)
    cfg = gateway_plugin_config(free_port())
    cfg["identity"] = {"source": "trusted_header", "header": "x-caller"}
    cfg["quotas"] = {"store": {"cluster": "quota_store", "timeout_ms": 300}, "limits": []}
    cfg["cache"] = {"shared": True, "ttl_s": 120}
    state = {"redis": redis, "webdis": webdis}
    try:
        state["envoys"] = start_envoys(mocks, cfg, webdis.port, n=2)
        for m in mocks.values():
            m.take()
        yield state
    finally:
        for e in state.get("envoys", []):
            e.stop()
        webdis.stop()
        redis.stop()


def test_an_answer_kept_by_one_proxy_serves_the_others(shared, mocks):
    a, b = shared["envoys"]
    first, state = chat(a, "share me")
    assert state == "miss"

    def kept():
        return shared["redis"].cli("KEYS", "meshllm/cache/*")

    assert wait_for_value(kept), "written to Redis after the answer"
    again, state = chat(b, "share me", caller="shop/other")
    assert state == "hit" and again.choices[0].message.content == first.choices[0].message.content
    assert reached(mocks["openai"]) == 1
    ttl = int(shared["redis"].cli("TTL", kept().split()[0]))
    assert 100 < ttl <= 120
    # Another namespace on the other proxy: not shared with it.
    _, state = chat(b, "share me", caller="other/app")
    assert state == "miss"
    assert reached(mocks["openai"]) == 1


def test_a_large_stream_is_written_in_pieces_and_replayed_whole(shared, mocks):
    a, b = shared["envoys"]
    # ~600 events, about 90 KB of stream: many pieces of 8 KiB.
    prompt = " ".join(f"word{i}" for i in range(600))

    def stream(env):
        raw = oai(env).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", temperature=0, stream=True,
            messages=[{"role": "user", "content": prompt}])
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        return text, raw.headers.get(HIT)

    text, state = stream(a)
    assert state == "miss" and prompt in text
    redis = shared["redis"]
    assert wait_for_value(lambda: [k for k in redis.cli("KEYS", "meshllm/cache/*").split()
                                   if "/part/" not in k and int(redis.cli("STRLEN", k)) > 40000], timeout=10)
    assert [k for k in redis.cli("KEYS", "meshllm/cache/*").split() if "/part/" in k] == []
    again, state = stream(b)
    assert state == "hit" and again == text
    assert reached(mocks["openai"]) == 1


def test_a_store_that_is_down_never_stops_a_request(shared, mocks):
    a, _ = shared["envoys"]
    shared["webdis"].stop()
    started = time.time()
    for n in range(3):
        answer, state = chat(a, f"store down {n}")
        assert state == "miss" and answer.choices[0].message.content
    assert time.time() - started < 5
    assert reached(mocks["openai"]) == 3
    assert a.metric("meshllm_quota_store_calls_total", kind="cache_lookup", outcome="failed") >= 3


def wait_for_value(probe, timeout=5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    return None
