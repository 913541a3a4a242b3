"""Metrics and access logs through a real Envoy: known traffic, then exact
counter values and histogram counts on /stats/prometheus, the access-log
lines that go with them, and one scrape by a real Prometheus server."""

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection

import pytest

from conftest import (KEYS, ROOT, Envoy, free_port, gateway_plugin_config, http,
                      metric_name, stop_process, wait_for)
import render  # noqa: E402  (envoy/tools, on sys.path through conftest)

CALLER = "x-caller"
DASHBOARD = ROOT / "k8s" / "observability" / "grafana-dashboard.json"


def metrics_config(dead_port):
    cfg = gateway_plugin_config(dead_port)
    cfg["identity"] = {"source": "trusted_header", "header": CALLER}
    cfg["attribution"] = {"tags": [{"name": "tier", "header": "x-tier", "metric_values": ["gold"]}]}
    cfg["models"] += [
        {"name": "m500", "provider": "openai", "model": "mock-500"},
        {"name": "slow", "provider": "openai", "model": "mock-slow"},
    ]
    cfg["routes"] = cfg.get("routes", []) + [{"name": "chain", "targets": ["m500", "claude-sonnet"]}]
    cfg["failover"] = {"max_attempts": 2, "per_try_timeout_ms": 5000}
    cfg["quotas"] = {"limits": [
        {"name": "one-a-day", "match": {"namespace": "limited"}, "requests_per_day": 1},
    ]}
    return cfg


def start(mocks, cfg, **kw):
    upstreams = {name: ("127.0.0.1", m.port) for name, m in mocks.items()}
    env = Envoy(cfg, upstreams=upstreams, env=KEYS, **kw)
    env.wait_ready()
    return env


@pytest.fixture(scope="module")
def gw(wasm, mocks):
    env = start(mocks, metrics_config(free_port()))
    yield env
    env.stop()


def call(gw, caller, body, headers=None, path="/v1/chat/completions"):
    h = {CALLER: caller, **(headers or {})}
    status, resp_headers, raw = http("POST", gw.url + path, body, h)
    return status, resp_headers, raw


def stream_usage(raw):
    """The usage of a streamed OpenAI answer (its last data event with one)."""
    usage = None
    for line in raw.decode().splitlines():
        if line.startswith("data: {"):
            usage = json.loads(line[6:]).get("usage") or usage
    return usage


def log_lines(gw, count, **match):
    """The last access-log lines whose fields include `match`."""
    def found():
        lines = [json.loads(l) for l in gw.access_log_lines()]
        return [l for l in lines if all(l.get(k) == v for k, v in match.items())]
    assert wait_for(lambda: len(found()) >= count), (match, gw.access_log_lines()[-3:])
    return found()


# --- exact values for known traffic ------------------------------------------


def test_known_traffic_gives_exact_counters_histograms_and_log_lines(gw):
    who = dict(caller_namespace="team-a", caller_service="chat",
               gen_ai_request_model="gpt-4o-mini")
    plain = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "count these words"}]}
    usages = []
    for _ in range(3):
        status, _, raw = call(gw, "team-a/chat", plain, {"x-tier": "gold"})
        assert status == 200
        usages.append(json.loads(raw)["usage"])
    status, _, raw = call(gw, "team-a/chat", {**plain, "stream": True,
                                              "stream_options": {"include_usage": True}},
                          {"x-tier": "gold"})
    assert status == 200
    usages.append(stream_usage(raw))
    inputs = sum(u["prompt_tokens"] for u in usages)
    outputs = sum(u["completion_tokens"] for u in usages)
    assert inputs > 0 and outputs > 0

    served = dict(who, gen_ai_provider_name="openai", gen_ai_response_model="gpt-4o-mini",
                  gen_ai_operation_name="chat")
    assert wait_for(lambda: gw.metric("meshllm_requests_total", **served, error_type=None) == 4)
    assert gw.metric("meshllm_tokens_total", **served, gen_ai_token_type="input",
                     tag_tier="gold") == inputs
    assert gw.metric("meshllm_tokens_total", **served, gen_ai_token_type="output",
                     tag_tier="gold") == outputs
    assert gw.metric("meshllm_route_decisions_total", **served, route_reason="model") == 4
    assert gw.metric("meshllm_attempts_total", **served, error_type=None) == 4

    # Histograms: exact counts (their sums are approximate in Envoy).
    def count(metric, **labels):
        return gw.metric(metric + "_count", **served, **labels)
    assert wait_for(lambda: count("gen_ai_server_request_duration") == 4)
    assert count("gen_ai_client_token_usage", gen_ai_token_type="input") == 4
    assert count("gen_ai_client_token_usage", gen_ai_token_type="output") == 4
    assert count("gen_ai_client_token_usage", gen_ai_token_type="reasoning") == 0
    assert count("gen_ai_server_time_to_first_token") == 1, "only the streamed answer"
    # Every request is in the top bucket; none of these used fewer than 2 tokens.
    bucket = "gen_ai_client_token_usage_bucket"
    assert gw.metric(bucket, **served, gen_ai_token_type="input", le="+Inf") == 4
    assert gw.metric(bucket, **served, gen_ai_token_type="input", le="1") == 0

    # One access-log line per request, agreeing with the answers and metrics.
    lines = log_lines(gw, 4, caller="team-a/chat", request_model="gpt-4o-mini")[-4:]
    for line, usage in zip(lines, usages):
        assert line["provider"] == "openai"
        assert line["response_model"] == "gpt-4o-mini"
        assert line["attempts"] == "1"
        assert line["route_reason"] == "model"
        assert line["tags"] == "tier=gold"
        assert line["quota"] == "none"
        assert line["input_tokens"] == str(usage["prompt_tokens"])
        assert line["output_tokens"] == str(usage["completion_tokens"])
        assert line["tokens_estimated"] is None
        assert int(line["cost_micro_usd"]) > 0
    assert [l["ttft_ms"] is not None for l in lines] == [False, False, False, True]
    assert gw.metric("meshllm_cost_micro_usd_total", **served, tag_tier="gold") == \
        sum(int(l["cost_micro_usd"]) for l in lines)


def test_counters_are_exact_under_load_and_across_a_listener_swap(wasm, mocks):
    """With 64 clients on 2 workers, and the listener (so the filter's root
    contexts) replaced right after, every request is counted exactly once."""
    env = start(mocks, metrics_config(free_port()), concurrency=2, dynamic_listener=True)
    try:
        mocks["openai"].take()
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "tally"}]}
        rounds = 4

        def client(i):
            return [call(env, f"load/c{i % 4}", body)[0] for _ in range(rounds)]
        with ThreadPoolExecutor(64) as pool:
            statuses = [s for batch in pool.map(client, range(64)) for s in batch]
        assert statuses == [200] * (64 * rounds)
        # Replace the listener at once: the requests just served belong to
        # root contexts being drained.
        updates = env.set_listener_metadata({"filter_metadata": {"meshllm": {"note": "swap"}}})
        assert wait_for(lambda: env.stat("listener_manager.lds.update_success") >= updates)
        for i in range(8):
            assert call(env, f"load/c{i % 4}", body)[0] == 200
        total = 64 * rounds + 8
        served = dict(caller_namespace="load", gen_ai_request_model="gpt-4o-mini",
                      error_type=None)
        assert wait_for(lambda: env.metric("meshllm_requests_total", **served) == total), \
            env.metric("meshllm_requests_total", **served)
        for i in range(4):
            assert env.metric("meshllm_requests_total", **served,
                              caller_service=f"c{i}") == total // 4
        assert env.metric("meshllm_attempts_total", **served) == total
        # Not one sent twice or lost at the provider either.
        assert len(mocks["openai"].take()) == total
        # And nothing more arrives later.
        time.sleep(0.6)
        assert env.metric("meshllm_requests_total", **served) == total
    finally:
        env.stop()


def test_fallbacks_and_attempts_are_counted_by_provider(gw):
    status, headers, _ = call(gw, "team-b/api", {"model": "chain", "messages": [
        {"role": "user", "content": "hello"}]})
    assert status == 200
    assert headers["x-meshllm-attempts"] == "2"
    caller = dict(caller_namespace="team-b", caller_service="api", gen_ai_request_model="chain")
    assert wait_for(lambda: gw.metric("meshllm_requests_total", **caller) == 1)
    assert gw.metric("meshllm_requests_total", **caller, gen_ai_provider_name="anthropic",
                     gen_ai_response_model="claude-sonnet-4-5", error_type=None) == 1
    assert gw.metric("meshllm_attempts_total", **caller, gen_ai_provider_name="openai",
                     gen_ai_response_model="mock-500", error_type="500") == 1
    assert gw.metric("meshllm_attempts_total", **caller, gen_ai_provider_name="anthropic",
                     error_type=None) == 1
    assert gw.metric("meshllm_attempts_total", **caller) == 2
    assert gw.metric("meshllm_fallbacks_total", **caller, fallback_from="openai",
                     gen_ai_provider_name="anthropic") == 1
    assert gw.metric("meshllm_route_decisions_total", **caller, route_reason="ordered",
                     gen_ai_provider_name="openai") == 1
    line = log_lines(gw, 1, caller="team-b/api")[-1]
    assert (line["provider"], line["response_model"], line["attempts"], line["route_reason"]) == \
        ("anthropic", "claude-sonnet-4-5", "2", "ordered")


def test_latency_histograms_measure_the_stream(gw, mocks):
    caller = dict(caller_namespace="team-c", caller_service="latency")
    # The provider takes 300 ms to answer: the first token cannot come sooner.
    status, _, _ = call(gw, "team-c/latency", {"model": "slow", "stream": True, "messages": [
        {"role": "user", "content": "hi"}]})
    assert status == 200
    ttft = "gen_ai_server_time_to_first_token_bucket"
    slow = dict(caller, gen_ai_request_model="slow")
    assert wait_for(lambda: gw.metric(ttft, **slow, le="+Inf") == 1)
    assert gw.metric(ttft, **slow, le="250") == 0
    assert gw.metric("gen_ai_server_request_duration_bucket", **slow, le="250") == 0
    line = log_lines(gw, 1, caller="team-c/latency", request_model="slow")[-1]
    assert int(line["ttft_ms"]) >= 300

    # The first chunk comes at once, the rest 600 ms later: per output
    # token after the first, at least 600 / (tokens - 1) ms.
    conn = HTTPConnection("127.0.0.1", gw.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": "gated", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}]}),
        {"content-type": "application/json", CALLER: "team-c/latency"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.read1(65536)
    assert first.startswith(b"data: ")
    time.sleep(0.6)
    mocks["openai"].release()
    raw = first + resp.read()
    conn.close()
    out = stream_usage(raw)["completion_tokens"]
    assert out > 1
    gated = dict(caller, gen_ai_request_model="gated")
    tpot = "gen_ai_server_time_per_output_token_bucket"
    assert wait_for(lambda: gw.metric(tpot, **gated, le="+Inf") == 1)
    floor_ms = 600 / (out - 1)
    below = max(b for b in (1, 2, 5, 10, 25, 50, 100, 250, 500) if b < floor_ms * 0.9)
    assert gw.metric(tpot, **gated, le=str(below)) == 0


def test_quota_rejections_and_budget_use_are_labelled_with_the_caller(gw):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    assert call(gw, "limited/batch", body)[0] == 200
    assert call(gw, "limited/batch", body)[0] == 429
    labels = dict(caller_namespace="limited", caller_service="batch")
    assert wait_for(lambda: gw.metric("meshllm_quota_rejections_total", **labels,
                                      limit="one-a-day", reason="rate",
                                      gen_ai_request_model="gpt-4o-mini") == 1)
    assert gw.metric("meshllm_budget_used_percent", caller_namespace="limited",
                     caller_service="all", limit="one-a-day", kind="requests_per_day") == 100
    assert gw.metric("meshllm_requests_total", **labels, error_type="429") == 1
    line = log_lines(gw, 1, caller="limited/batch", status=429)[-1]
    assert line["quota"] == "rejected:one-a-day:rate"


def test_label_values_stay_bounded(gw):
    body = {"model": "made-up-model-123", "messages": [{"role": "user", "content": "hi"}]}
    assert call(gw, "team-d/x", body)[0] == 404
    assert wait_for(lambda: gw.metric("meshllm_requests_total", caller_namespace="team-d",
                                      gen_ai_request_model="_OTHER", error_type="404") == 1)
    text = gw.prometheus()
    assert "made-up-model-123" not in text
    # The request's own model name is still in its access-log line.
    line = log_lines(gw, 1, caller="team-d/x")[-1]
    assert line["request_model"] == "_OTHER"


def path_cases(failover):
    """(caller, path, body, headers, expected upstream path, attempts)."""
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    anthropic = {"anthropic-version": "2023-06-01"}
    gemini = "/v1beta/models/gpt-4o-mini:streamGenerateContent?alt=sse"
    cases = [
        # Passthrough: the provider's path is the caller's.
        ("paths/passthrough", "/v1/chat/completions", {"model": "gpt-4o-mini", **chat}, {},
         "/v1/chat/completions", "1"),
        # Translated, each way, and a Gemini caller (model and query in the URL).
        ("paths/anthropic-caller", "/v1/messages", {"model": "gpt-4o-mini", "max_tokens": 20,
                                                    **chat}, anthropic,
         "/v1/chat/completions", "1"),
        ("paths/openai-caller", "/v1/chat/completions", {"model": "claude-sonnet", **chat}, {},
         "/v1/messages", "1"),
        ("paths/gemini-caller", gemini, {"contents": [{"parts": [{"text": "hi"}]}]}, {},
         "/v1/chat/completions", "1"),
        ("paths/azure", "/v1/chat/completions", {"model": "azure-gpt-4o", **chat}, {},
         "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", "1"),
    ]
    if failover:
        # Two halves: the upstream half points each attempt at its provider;
        # the second (Anthropic) answered.
        cases.append(("paths/two-halves", "/v1/chat/completions", {"model": "chain", **chat}, {},
                      "/v1/messages", "2"))
    return cases


@pytest.mark.parametrize("failover", [True, False], ids=["failover", "no-failover"])
def test_access_log_path_is_the_callers_and_upstream_path_the_providers(
        failover, request, mocks):
    """`path` is what the caller asked for, whatever the gateway sent the
    provider; `upstream_path` is what the provider got."""
    if failover:
        env = request.getfixturevalue("gw")
    else:
        cfg = metrics_config(free_port())
        cfg["failover"] = {"enabled": False}
        env = start(mocks, cfg)
    try:
        for caller, path, body, headers, upstream, attempts in path_cases(failover):
            status, _, raw = call(env, caller, body, headers, path=path)
            assert status == 200, (caller, raw[:300])
            line = log_lines(env, 1, caller=caller)[-1]
            assert (line["path"], line["upstream_path"], line["attempts"]) == \
                (path, upstream, attempts), caller
            assert line["response_flags"] == "-", caller
        # Answered by the gateway itself: nothing rewrote the path.
        probe = "/v1/models?probe=paths-" + ("failover" if failover else "plain")
        assert http("GET", env.url + probe)[0] == 200
        line = log_lines(env, 1, path=probe)[-1]
        assert line["upstream_path"] == probe
        status, _, _ = call(env, "paths/unknown", {"model": "nope", "max_tokens": 5,
                                                    "messages": []},
                            {"anthropic-version": "2023-06-01"}, path="/v1/messages")
        assert status == 404
        line = log_lines(env, 1, caller="paths/unknown")[-1]
        assert (line["path"], line["upstream_path"]) == ("/v1/messages", "/v1/messages")
    finally:
        if not failover:
            env.stop()


def test_text_access_log_format(wasm, mocks):
    env = start(mocks, metrics_config(free_port()), access_log_format="text")
    try:
        status, _, raw = call(env, "team-e/text", {"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": "hi"}]})
        assert status == 200
        usage = json.loads(raw)["usage"]
        assert wait_for(lambda: env.access_log_lines())
        line = env.access_log_lines()[-1]
        assert re.match(r'^\[\S+\] "POST /v1/chat/completions" 200 \d+ms ', line), line
        fields = dict(kv.split("=", 1) for kv in line.split("ms ", 1)[1].split(" "))
        assert fields["upstream_path"] == "/v1/chat/completions"
        assert fields["response_flags"] == "-"
        assert fields["caller"] == "team-e/text"
        assert fields["provider"] == "openai"
        assert fields["request_model"] == fields["response_model"] == "gpt-4o-mini"
        assert fields["input_tokens"] == str(usage["prompt_tokens"])
        assert fields["output_tokens"] == str(usage["completion_tokens"])
        assert fields["ttft_ms"] == "-" and fields["tags"] == "-"

        # A translated call: the caller's path in the request, the provider's after it.
        status, _, _ = call(env, "team-e/text", {"model": "claude-sonnet", "messages": [
            {"role": "user", "content": "hi"}]})
        assert status == 200
        assert wait_for(lambda: "provider=anthropic" in env.access_log_lines()[-1])
        line = env.access_log_lines()[-1]
        assert re.match(r'^\[\S+\] "POST /v1/chat/completions" 200 \d+ms '
                        r'upstream_path=/v1/messages ', line), line
    finally:
        env.stop()


def test_labels_match_the_filter_and_the_shipped_stats_tags():
    import render
    source = (ROOT / "src" / "metrics.rs").read_text()
    block = source[source.index("pub const LABELS"):]
    block = block[:block.index("];")]
    assert re.findall(r'"(\w+)"', block) == render.METRIC_LABELS
    with open(ROOT / "envoy" / "meshllm.json") as f:
        cfg = json.load(f)
    tags = [t["tag_name"] for t in render.stats_tags(cfg)]
    assert tags[: len(render.METRIC_LABELS)] == render.METRIC_LABELS


# --- a real Prometheus server --------------------------------------------------


class Prometheus:
    """The Debian package's Prometheus, scraping one Envoy's admin port every
    second into a scratch directory; stopped by its PID."""

    def __init__(self, target_admin):
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: `make test-tools` installs it"
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="meshllm-prometheus-")
        config = os.path.join(self.dir, "prometheus.yml")
        with open(config, "w") as f:
            json.dump({  # JSON is YAML
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{
                    "job_name": "envoy",
                    "metrics_path": "/stats/prometheus",
                    "static_configs": [{"targets": [target_admin.split("//", 1)[1]]}],
                }],
            }, f)
        self.log = open(os.path.join(self.dir, "prometheus.log"), "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.dir}/data",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, open(self.log.name).read()[-3000:]
            try:
                if http("GET", self.url + "/-/ready", timeout=1)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("prometheus did not become ready")

    def query(self, expr):
        status, _, body = http("GET", self.url + "/api/v1/query?" +
                               urllib.parse.urlencode({"query": expr}))
        doc = json.loads(body)
        assert status == 200 and doc["status"] == "success", (expr, doc)
        return doc["data"]["result"]

    def stop(self):
        stop_process(self.proc, timeout=15)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def dashboard_queries():
    """Every PromQL expression of the shipped Grafana dashboard, with its
    template variables replaced as Grafana would for "All"."""
    with open(DASHBOARD) as f:
        board = json.load(f)
    exprs = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                exprs.append((p["title"], t["expr"]))
    walk(board["panels"])
    subst = {"$__rate_interval": "1m", "$__range": "1h", "$namespace": ".*",
             "$service": ".*", "$model": ".*", "$provider": ".*"}
    out = []
    for title, expr in exprs:
        for var in sorted(subst, key=len, reverse=True):
            expr = expr.replace("${" + var[1:] + "}", subst[var]).replace(var, subst[var])
        assert "$" not in expr, (title, expr)
        out.append((title, expr))
    return out


def test_prometheus_scrapes_envoy_and_finds_series_by_label(gw):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "scrape me"}]}
    for _ in range(2):
        assert call(gw, "scraped/svc", body, {"x-tier": "gold"})[0] == 200
    assert wait_for(lambda: gw.metric("gen_ai_server_request_duration_count",
                                      caller_namespace="scraped") == 2)
    prom = Prometheus(gw.admin).wait_ready()
    try:
        expr = 'sum by (caller_service) (meshllm_requests_total{caller_namespace="scraped"})'
        assert wait_for(lambda: prom.query(expr), timeout=30), "no scrape reached Prometheus"
        result = prom.query(expr)
        assert [(r["metric"], r["value"][1]) for r in result] == [({"caller_service": "svc"}, "2")]
        # The labels Envoy extracted are real Prometheus labels.
        tokens = prom.query('meshllm_tokens_total{caller_namespace="scraped",'
                            'gen_ai_token_type="input",tag_tier="gold"}')
        assert len(tokens) == 1
        assert tokens[0]["metric"]["gen_ai_request_model"] == "gpt-4o-mini"
        count = prom.query('sum(gen_ai_server_request_duration_count{caller_namespace="scraped"})')
        assert count[0]["value"][1] == "2"
        # Every query of the shipped dashboard runs on this data.
        for title, expr in dashboard_queries():
            prom.query(expr)
        # Traffic between scrapes shows in the dashboard's increase() panels.
        for _ in range(2):
            assert call(gw, "scraped/svc", body, {"x-tier": "gold"})[0] == 200
        spend = [e for t, e in dashboard_queries() if t.startswith("Spend (range")]
        assert len(spend) == 1

        def spent():
            result = prom.query(spend[0])
            return result and float(result[0]["value"][1]) > 0
        assert wait_for(spent, timeout=20)
    finally:
        prom.stop()


# --- what k8s/observability ships ----------------------------------------------


OBSERVABILITY = ROOT / "k8s" / "observability"


def test_istio_stats_bootstrap_is_current_and_valid(tmp_path):
    import render
    with open(ROOT / "envoy" / "meshllm.json") as f:
        cfg = json.load(f)
    shipped = json.loads((OBSERVABILITY / "stats-bootstrap.json").read_text())
    assert shipped == render.stats_bootstrap(cfg), "run `make envoy-config`"
    # Istio merges it into the proxy's bootstrap, as --config-yaml does here.
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"admin": {"address": {"socket_address": {
        "address": "127.0.0.1", "port_value": 0}}}}))
    from conftest import envoy_binary
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(base),
         "--config-yaml", json.dumps(shipped), "--disable-hot-restart"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_istio_stats_matcher_prefixes_keep_every_meshllm_metric(wasm, mocks):
    import yaml
    import render
    annotations = yaml.safe_load((OBSERVABILITY / "proxy-annotations.yaml").read_text())
    proxy_config = yaml.safe_load(annotations["proxy.istio.io/config"])
    prefixes = proxy_config["proxyStatsMatcher"]["inclusionPrefixes"]
    assert prefixes == render.METRIC_PREFIXES
    assert annotations["sidecar.istio.io/bootstrapOverride"] == "meshllm-stats-bootstrap"
    # An Envoy that keeps only those prefixes, as an Istio proxy would.
    env = start(mocks, metrics_config(free_port()), stats_inclusion_prefixes=prefixes)
    try:
        assert call(env, "team-f/kept", {"model": "chain", "stream": True, "messages": [
            {"role": "user", "content": "hi"}]})[0] == 200
        assert wait_for(lambda: env.metric("gen_ai_server_time_to_first_token_count",
                                           caller_namespace="team-f") == 1)
        names = {metric_name(re.match(r"^(\w+)", l).group(1))
                 for l in env.prometheus().splitlines() if l and not l.startswith("#")}
        for want in ["meshllm_requests_total", "meshllm_tokens_total", "meshllm_attempts_total",
                     "meshllm_fallbacks_total", "meshllm_route_decisions_total",
                     "meshllm_cost_micro_usd_total", "gen_ai_client_token_usage_count",
                     "gen_ai_server_request_duration_count"]:
            assert want in names, want
        assert not any(n.startswith("envoy_cluster_") for n in names), "the matcher applies"
    finally:
        env.stop()


def test_kustomize_renders_the_observability_config_maps():
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render k8s/"
    out = subprocess.run([kubectl, "kustomize", str(OBSERVABILITY)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import yaml
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(out.stdout)}
    assert set(docs) == {"meshllm-stats-bootstrap", "meshllm-grafana-dashboard"}
    assert json.loads(docs["meshllm-stats-bootstrap"]["data"]["custom_bootstrap.json"]) == \
        json.loads((OBSERVABILITY / "stats-bootstrap.json").read_text())
    board = docs["meshllm-grafana-dashboard"]
    assert board["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert json.loads(board["data"]["meshllm.json"])["uid"] == "meshllm"
