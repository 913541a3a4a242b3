"""Quotas, budgets and caller identity through a real Envoy running the
filter on two worker threads: admission reserves with compare-and-swap on
shared data, every reservation is settled with the real usage (streams and
abandoned requests included), and refusals look like OpenAI's own (or
Anthropic's and Gemini's for their callers)."""

import hashlib
import os
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import KEYS, Envoy, free_port, gateway_plugin_config, http

CALLER = "x-caller"

LIMITS = [
    {"name": "burst", "match": {"namespace": "burst", "service": "*"}, "requests_per_minute": 15},
    {"name": "tok", "match": {"namespace": "tok"}, "tokens_per_day": 3000},
    {"name": "h-ns", "match": {"namespace": "h"}, "requests_per_day": 5},
    {"name": "h-a", "match": {"namespace": "h", "service": "a"}, "requests_per_day": 3},
    {"name": "money", "match": {"namespace": "money"}, "usd_per_day": 0.0002},
    {"name": "free-tier", "match": {"namespace": "shop", "service": "chat", "tags": {"tier": "free"}},
     "requests_per_day": 2},
    {"name": "alerting", "match": {"namespace": "alert"}, "requests_per_day": 4},
    {"name": "down", "match": {"namespace": "down"}, "requests_per_day": 10,
     "downgrade": {"at_percent": 20, "models": {"gpt-4o": "gpt-4o-mini"}}},
    {"name": "anth", "match": {"namespace": "anth"}, "requests_per_day": 1},
    {"name": "gem", "match": {"namespace": "gem"}, "requests_per_day": 1},
    {"name": "stream", "match": {"namespace": "stream"}, "tokens_per_day": 100000},
    {"name": "abort", "match": {"namespace": "abort"}, "tokens_per_day": 100000},
]


def quota_config(dead_port, identity, limits, tags=None):
    cfg = gateway_plugin_config(dead_port)
    cfg["identity"] = identity
    cfg["attribution"] = {"tags": tags or [
        {"name": "tier", "header": "x-tier", "metric_values": ["free"]},
        {"name": "customer", "header": "x-customer"},
    ]}
    cfg["quotas"] = {"alerts": [50, 100], "limits": limits}
    return cfg


def start(mocks, cfg, node=None):
    upstreams = {name: ("127.0.0.1", m.port) for name, m in mocks.items()}
    env = Envoy(cfg, upstreams=upstreams, env=KEYS, concurrency=2, node=node)
    env.wait_ready()
    return env


@pytest.fixture(scope="module")
def quotas(wasm, mocks):
    cfg = quota_config(free_port(), {"source": "trusted_header", "header": CALLER}, LIMITS)
    env = start(mocks, cfg)
    yield env
    env.stop()


def body(model="gpt-4o", text="hello there", max_tokens=50, **extra):
    return {"model": model, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, **extra}


def chat(env, caller, payload=None, headers=None):
    h = {CALLER: caller} if caller else {}
    h.update(headers or {})
    return http("POST", env.url + "/v1/chat/completions", payload or body(), h)


def log_lines(env, needle, count=1, timeout=5):
    """Access-log lines (JSON) containing `needle`; Envoy flushes the file
    about once a second."""
    deadline = time.time() + timeout
    while True:
        lines = [json.loads(x) for x in env.access_log_lines() if needle in x]
        if len(lines) >= count or time.time() > deadline:
            return lines
        time.sleep(0.1)


def reservation(payload, bytes_per_token=4):
    """What the gateway reserves: request bytes / 4 plus max_tokens."""
    size = len(json.dumps(payload).encode())
    return -(-size // bytes_per_token) + payload["max_tokens"]


def test_unidentified_callers_are_refused_in_openai_shape(quotas):
    status, headers, raw = chat(quotas, None)
    assert status == 403
    err = json.loads(raw)["error"]
    assert err["type"] == "permission_error"
    assert err["code"] == "unidentified_caller"
    assert "trusted identity header" in err["message"]
    status, _, raw = chat(quotas, "Not A Name")
    assert status == 403


def test_identity_header_never_reaches_the_provider(quotas, mocks):
    status, _, _ = chat(quotas, "misc/app", headers={"x-tier": "pro", "x-customer": "acme"})
    assert status == 200
    seen = mocks["openai"].take()[-1]["headers"]
    assert CALLER not in seen and "x-tier" not in seen and "x-customer" not in seen


def test_requests_per_minute_never_overshoot_across_workers(quotas):
    # A fixed minute window: stay clear of its end so all requests share one.
    if time.time() % 60 > 40:
        time.sleep(61 - time.time() % 60)
    with ThreadPoolExecutor(max_workers=40) as pool:
        results = list(pool.map(lambda _: chat(quotas, "burst/api"), range(40)))
    statuses = sorted(r[0] for r in results)
    assert statuses.count(200) == 15, statuses
    assert statuses.count(429) == 25
    refused = next(r for r in results if r[0] == 429)
    err = json.loads(refused[2])["error"]
    assert err == {
        "message": err["message"], "type": "requests", "param": None,
        "code": "rate_limit_exceeded",
    }
    assert "requests_per_minute in limit 'burst': Limit 15, Used 15, Requested 1" in err["message"]
    h = refused[1]
    assert h["x-ratelimit-limit-requests"] == "15"
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-reset-requests"].endswith("s")
    assert 1 <= int(h["retry-after"]) <= 60
    # Each service has its own bucket under "*".
    assert chat(quotas, "burst/other")[0] == 200
    rejected = quotas.metric("meshllm_quota_rejections_total", caller_namespace="burst",
                             caller_service="api", limit="burst", reason="rate")
    assert rejected == 25


def test_token_budget_is_reconciled_exactly_under_concurrency(quotas):
    payloads = [body(text=f"request number {i} " + "word " * (i % 7), max_tokens=200)
                for i in range(30)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(lambda p: chat(quotas, "tok/svc", p), payloads))
    used = sum(json.loads(r[2])["usage"]["total_tokens"] for r in results if r[0] == 200)
    assert any(r[0] == 200 for r in results)
    assert used <= 3000
    # The bucket holds exactly the real usage: the next admission shows it.
    probe = body(text="probe", max_tokens=10)
    status, h, raw = chat(quotas, "tok/svc", probe)
    assert status == 200
    assert int(h["x-ratelimit-limit-tokens"]) == 3000
    assert int(h["x-ratelimit-remaining-tokens"]) == 3000 - used - reservation(probe)


def test_service_and_namespace_limits_both_apply(quotas):
    statuses_a = [chat(quotas, "h/a")[0] for _ in range(4)]
    assert statuses_a == [200, 200, 200, 429]
    statuses_b = [chat(quotas, "h/b")[0] for _ in range(3)]
    assert statuses_b == [200, 200, 429]
    status, _, raw = chat(quotas, "h/b")
    assert "'h-ns'" in json.loads(raw)["error"]["message"]


def test_dollar_budget_refuses_with_insufficient_quota(quotas):
    first = chat(quotas, "money/svc", body(max_tokens=10))
    assert first[0] == 200
    status, h, raw = chat(quotas, "money/svc", body(max_tokens=10))
    assert status == 429
    err = json.loads(raw)["error"]
    assert err["type"] == "insufficient_quota" and err["code"] == "insufficient_quota"
    assert "limit 'money' allows $0.000200 (usd_per_day)" in err["message"]
    assert h["x-should-retry"] == "false"
    assert int(h["retry-after"]) > 0
    # The cost of the first request is counted from its usage.
    usage = json.loads(first[2])["usage"]
    cost = quotas.metric("meshllm_cost_micro_usd_total", caller_namespace="money",
                         caller_service="svc")
    want = -(-(usage["prompt_tokens"] * 2_500_000 + usage["completion_tokens"] * 10_000_000)
             // 1_000_000)
    assert cost == want


def test_tag_budgets_narrow_but_never_move_the_bucket(quotas):
    free = {"x-tier": "free", "x-customer": "c1"}
    assert [chat(quotas, "shop/chat", headers=free)[0] for _ in range(3)] == [200, 200, 429]
    # Other tiers and untagged requests of the same service are not limited.
    assert chat(quotas, "shop/chat", headers={"x-tier": "pro"})[0] == 200
    assert chat(quotas, "shop/chat")[0] == 200
    # Named tag values show in metrics; others fold into "other".
    assert quotas.metric("meshllm_requests_total") > 0
    assert quotas.metric("meshllm_tokens_total", caller_namespace="shop", caller_service="chat",
                         tag_tier="free", tag_customer="other", gen_ai_token_type="input") > 0


def test_alerts_show_in_headers_logs_and_gauges(quotas):
    seen = [chat(quotas, "alert/svc")[1].get("x-meshllm-budget") for _ in range(4)]
    assert seen[0] is None
    assert seen[1] == "alerting:requests_per_day=50%"
    assert seen[3] == "alerting:requests_per_day=100%"
    time.sleep(0.3)
    alerts = [x for x in quotas.log_text().splitlines()
              if 'budget alert: limit "alerting" (requests_per_day)' in x]
    assert len(alerts) == 2
    assert "passed 50%" in alerts[0] and "passed 100%" in alerts[1]
    assert quotas.metric("meshllm_budget_used_percent", limit="alerting") == 100


def test_budget_threshold_downgrades_the_model(quotas):
    models = []
    for _ in range(4):
        status, h, _ = chat(quotas, "down/svc")
        assert status == 200
        models.append((h["x-meshllm-model"], h.get("x-meshllm-downgrade")))
    assert models[0] == ("gpt-4o", None)
    assert models[1] == ("gpt-4o", None)
    assert models[2] == ("gpt-4o-mini", "gpt-4o->gpt-4o-mini;limit=down")


def test_anthropic_and_gemini_callers_get_their_own_429(quotas):
    msg = {"model": "claude-sonnet", "max_tokens": 20,
           "messages": [{"role": "user", "content": "hi"}]}
    h = {CALLER: "anth/svc", "anthropic-version": "2023-06-01"}
    status, headers, _ = http("POST", quotas.url + "/v1/messages", msg, h)
    assert status == 200
    assert headers["anthropic-ratelimit-requests-limit"] == "1"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    status, headers, raw = http("POST", quotas.url + "/v1/messages", msg, h)
    assert status == 429
    err = json.loads(raw)
    assert err["type"] == "error" and err["error"]["type"] == "rate_limit_error"
    assert "retry-after" in headers

    g = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    url = quotas.url + "/v1beta/models/gemini-flash:generateContent"
    assert http("POST", url, g, {CALLER: "gem/svc"})[0] == 200
    status, headers, raw = http("POST", url, g, {CALLER: "gem/svc"})
    assert status == 429
    assert json.loads(raw)["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert "retry-after" in headers


def remaining_tokens(env, caller, probe):
    status, h, _ = chat(env, caller, probe)
    assert status == 200
    return int(h["x-ratelimit-remaining-tokens"])


def test_streamed_answers_are_settled_with_their_usage(quotas):
    payload = body(text="stream me please", max_tokens=500, stream=True,
                   stream_options={"include_usage": True})
    status, _, raw = chat(quotas, "stream/svc", payload)
    assert status == 200
    events = [json.loads(line[6:]) for line in raw.decode().splitlines()
              if line.startswith("data: {")]
    usage = events[-1]["usage"]
    probe = body(text="probe", max_tokens=10)
    left = remaining_tokens(quotas, "stream/svc", probe)
    assert left == 100000 - usage["total_tokens"] - reservation(probe)


def test_abandoned_streams_release_their_reservation(quotas, mocks):
    payload = body(model="gated", text="abandon me", max_tokens=5000, stream=True)
    data = json.dumps(payload).encode()
    with socket.create_connection(("127.0.0.1", quotas.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"{CALLER}: abort/svc\r\ncontent-length: {len(data)}\r\n\r\n".encode() + data
        )
        first = s.recv(4096)
        assert b" 200 " in first.split(b"\r\n")[0]
    mocks["openai"].release()
    time.sleep(0.5)
    probe = body(text="probe", max_tokens=10)
    used = 100000 - remaining_tokens(quotas, "abort/svc", probe) - reservation(probe)
    # Charged the prompt estimate and what was streamed, not the 5000
    # output tokens it reserved; and the reservation did not leak.
    assert 0 < used < 1000


def test_access_log_names_caller_tags_tokens_cost_and_decision(quotas):
    status, _, raw = chat(quotas, "logs/svc", headers={"x-customer": "acme"})
    assert status == 200
    usage = json.loads(raw)["usage"]
    line = log_lines(quotas, '"logs/svc"')[-1]
    assert line["caller"] == "logs/svc"
    assert line["tags"] == "customer=acme"
    assert (line["input_tokens"], line["output_tokens"], line["cached_tokens"]) == \
        (str(usage["prompt_tokens"]), str(usage["completion_tokens"]), "0")
    assert int(line["cost_micro_usd"]) > 0
    assert line["quota"] == "none"
    refused = log_lines(quotas, '"h/b"', count=4)[-1]
    assert refused["quota"] == "rejected:h-ns:rate"


# --- identity from the mesh, not from headers ------------------------------

NODE = {
    "id": "sidecar~10.0.0.7~svc-a-6d9f.mesh-ns~mesh-ns.svc.cluster.local",
    "cluster": "svc-a.mesh-ns",
    "metadata": {
        "NAMESPACE": "mesh-ns",
        "WORKLOAD_NAME": "svc-a-v1",
        "SERVICE_ACCOUNT": "svc-a",
        "LABELS": {"app": "svc-a", "service.istio.io/canonical-name": "svc-a"},
    },
}


@pytest.fixture(scope="module")
def sidecar(wasm, mocks):
    limits = [
        {"name": "mine", "match": {"namespace": "mesh-ns", "service": "svc-a"}, "requests_per_day": 2},
        {"name": "theirs", "match": {"namespace": "other"}, "requests_per_day": 100},
    ]
    cfg = quota_config(free_port(), {"source": "mesh_node"}, limits)
    env = start(mocks, cfg, node=NODE)
    yield env
    env.stop()


def test_sidecar_identity_comes_from_node_metadata_and_cannot_be_forged(sidecar):
    forged = {"x-caller": "other/x", "x-meshllm-caller": "other/x",
              "x-forwarded-client-cert": "By=spiffe://cluster.local/ns/other/sa/x"}
    statuses = [http("POST", sidecar.url + "/v1/chat/completions", body(), forged)[0]
                for _ in range(3)]
    assert statuses == [200, 200, 429]
    _, _, raw = http("POST", sidecar.url + "/v1/chat/completions", body(), forged)
    assert "'mine'" in json.loads(raw)["error"]["message"]
    lines = log_lines(sidecar, "path", count=4)
    assert len(lines) == 4
    assert {x["caller"] for x in lines} == {"mesh-ns/svc-a"}


@pytest.fixture(scope="module")
def keyed(wasm, mocks):
    identity = {"source": "virtual_key", "virtual_keys": [
        {"name": "team-a-bot", "sha256": hashlib.sha256(b"sk-mesh-team-a").hexdigest(),
         "namespace": "team-a", "service": "bot"},
    ]}
    limits = [{"name": "bot", "match": {"virtual_key": "team-a-bot"}, "requests_per_day": 1}]
    env = start(mocks, quota_config(free_port(), identity, limits))
    yield env
    env.stop()


def test_virtual_keys_name_the_tenant_and_stay_in_the_gateway(keyed, mocks):
    url = keyed.url + "/v1/chat/completions"
    status, _, raw = http("POST", url, body(), {"authorization": "Bearer sk-wrong"})
    assert status == 401
    assert json.loads(raw)["error"]["code"] == "invalid_api_key"
    status, _, raw = http("POST", url, body())
    assert status == 403
    good = {"authorization": "Bearer sk-mesh-team-a"}
    assert http("POST", url, body(), good)[0] == 200
    sent = mocks["openai"].take()[-1]["headers"]
    assert "sk-mesh-team-a" not in json.dumps(sent)
    assert sent["authorization"] == f"Bearer {KEYS['OPENAI_API_KEY']}"
    status, _, raw = http("POST", url, body(), good)
    assert status == 429 and "'bot'" in json.loads(raw)["error"]["message"]


# --- identity from the peer's mTLS certificate (egress-gateway mode) --------

def make_pki(directory):
    """A mesh CA, the gateway's server certificate, and two workload
    certificates with SPIFFE URI SANs, as Istio issues them."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name, issuer_key, issuer_name, sans, ca=False):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder()
                   .subject_name(subject)
                   .issuer_name(issuer_name or subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    def write(stem, key, cert):
        paths = (os.path.join(directory, stem + ".pem"), os.path.join(directory, stem + ".key"))
        with open(paths[0], "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(paths[1], "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        return paths

    ca_key, ca = issue("mesh-ca", None, None, None, ca=True)
    server = issue("egress", ca_key, ca.subject, [
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    pki = {"ca": write("ca", ca_key, ca)[0], "server": write("server", *server)}
    for ns, sa in [("shop", "chatbot"), ("other", "batch")]:
        uri = f"spiffe://cluster.local/ns/{ns}/sa/{sa}"
        pki[f"{ns}/{sa}"] = write(f"{ns}-{sa}", *issue(sa, ca_key, ca.subject,
                                                          [x509.UniformResourceIdentifier(uri)]))
    return pki


@pytest.fixture(scope="module")
def egress(wasm, mocks, tmp_path_factory):
    pki = make_pki(str(tmp_path_factory.mktemp("pki")))
    limits = [{"name": "chatbot", "match": {"namespace": "shop", "service": "chatbot"},
               "requests_per_day": 1}]
    cfg = quota_config(free_port(), {"source": "mesh_peer"}, limits)
    upstreams = {name: ("127.0.0.1", m.port) for name, m in mocks.items()}
    tls = {"cert": pki["server"][0], "key": pki["server"][1], "ca": pki["ca"]}
    env = Envoy(cfg, upstreams=upstreams, env=KEYS, concurrency=2, downstream_tls=tls)
    env.wait_ready()
    env.pki = pki
    yield env
    env.stop()


def mtls_chat(env, workload, headers=None):
    import http.client
    import ssl

    ctx = ssl.create_default_context(cafile=env.pki["ca"])
    ctx.load_cert_chain(*env.pki[workload])
    conn = http.client.HTTPSConnection("127.0.0.1", env.port, context=ctx, timeout=15)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body()),
                     {"content-type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_egress_identity_comes_from_the_peer_certificate(egress):
    forged = {"x-caller": "other/batch", "x-forwarded-client-cert": "URI=spiffe://x/ns/other/sa/batch"}
    assert mtls_chat(egress, "shop/chatbot", forged)[0] == 200
    status, raw = mtls_chat(egress, "shop/chatbot", forged)
    assert status == 429 and "'chatbot'" in json.loads(raw)["error"]["message"]
    # Another workload's certificate is another caller.
    assert mtls_chat(egress, "other/batch")[0] == 200
    callers = {x["caller"] for x in log_lines(egress, '"path"', count=3)}
    assert callers == {"shop/chatbot", "other/batch"}


# --- model rules bind whatever name leads to the model ----------------------

GPT4O_RULE = "gpt-4o-daily"


def bound_config(gpt4o_limit):
    """A rule on gpt-4o (and one on a failing model), with every kind of name
    that can lead to gpt-4o: its alias, a namespace alias, routes, and the
    caller's own fallbacks (failover is on, so the listener half reads
    x-meshllm-models)."""
    cfg = quota_config(free_port(), {"source": "trusted_header", "header": CALLER}, [
        {"name": GPT4O_RULE, "match": {"model": "gpt-4o"}, "requests_per_day": gpt4o_limit},
        {"name": "m500-daily", "match": {"model": "m500"}, "requests_per_day": 2},
    ])
    for m in cfg["models"]:
        if m["name"] == "gpt-4o":
            m["aliases"] = ["4o"]
    cfg["models"].append({"name": "m500", "provider": "openai", "model": "mock-500"})
    cfg["routes"] += [
        {"name": "only-4o", "targets": ["gpt-4o"]},
        {"name": "4o-first", "targets": ["gpt-4o", "claude-sonnet"]},
        {"name": "claude-first", "targets": ["claude-sonnet", "gpt-4o"]},
        {"name": "fail-first", "targets": ["m500", "gpt-4o"]},
    ]
    cfg["namespaces"] = {"team": {"aliases": {"house": "gpt-4o"}}}
    return cfg


@pytest.fixture
def bound(wasm, mocks):
    """Starts a fresh two-worker Envoy (empty buckets) with a gpt-4o limit."""
    started = []

    def start_with(gpt4o_limit):
        upstreams = {name: ("127.0.0.1", m.port) for name, m in mocks.items()}
        env = Envoy(bound_config(gpt4o_limit), upstreams=upstreams, env=KEYS, concurrency=2)
        started.append(env)
        return env.wait_ready()

    yield start_with
    for env in started:
        env.stop()


def upstream_models(mocks, provider):
    """The upstream model of every request a mock provider received."""
    return [json.loads(r["body"]).get("model") for r in mocks[provider].take()
            if r["method"] == "POST"]


# Names that can only be served by gpt-4o: (caller, body model, extra headers).
# mistral-small has no key here, so the gateway drops it and the caller's
# fallback is all that is left.
ONLY_GPT4O = [
    ("shop/app", "gpt-4o", {}),
    ("shop/app", "4o", {}),
    ("team/app", "house", {}),
    ("shop/app", "only-4o", {}),
    ("shop/app", "mistral-small", {"x-meshllm-models": "gpt-4o"}),
    ("team/app", "mistral-small", {"x-meshllm-models": "house, 4o"}),
]


def assert_gpt4o_refusal(status, h, raw, limit):
    assert status == 429, raw
    err = json.loads(raw)["error"]
    assert err == {"message": err["message"], "type": "requests", "param": None,
                   "code": "rate_limit_exceeded"}
    assert (f"requests_per_day in limit '{GPT4O_RULE}': Limit {limit}, Used {limit}, "
            "Requested 1") in err["message"]
    assert h["x-ratelimit-limit-requests"] == str(limit)
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-reset-requests"].endswith("s")
    assert int(h["retry-after"]) >= 1


def test_a_model_rule_binds_every_name_that_leads_to_the_model(bound, mocks):
    env = bound(3)
    # Three names spend the model's limit; each answer shows the model's state.
    for name, remaining in [("gpt-4o", "2"), ("4o", "1"), ("only-4o", "0")]:
        status, h, raw = chat(env, "shop/app", body(model=name))
        assert status == 200, raw
        assert h["x-meshllm-model"] == "gpt-4o"
        assert h["x-ratelimit-limit-requests"] == "3"
        assert h["x-ratelimit-remaining-requests"] == remaining, name
    # Every name that can only lead to the model is refused.
    for caller, model, headers in ONLY_GPT4O:
        status, h, raw = chat(env, caller, body(model=model), headers)
        assert_gpt4o_refusal(status, h, raw, 3)
    # Anthropic and Gemini callers get the refusal in their own shape.
    msg = {"model": "only-4o", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    status, h, raw = http("POST", env.url + "/v1/messages", msg,
                          {CALLER: "shop/app", "anthropic-version": "2023-06-01"})
    assert status == 429
    assert json.loads(raw)["error"]["type"] == "rate_limit_error"
    assert h["anthropic-ratelimit-requests-remaining"] == "0"
    g = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    status, h, raw = http("POST", env.url + "/v1beta/models/4o:generateContent", g,
                          {CALLER: "team/app"})
    assert status == 429
    assert json.loads(raw)["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert int(h["retry-after"]) >= 1
    # A chain with another target skips the spent model and says so.
    for model, headers, reason in [
        ("4o-first", {}, "ordered;over_quota=gpt-4o"),
        ("claude-first", {}, "ordered;over_quota=gpt-4o"),
        ("4o", {"x-meshllm-models": "claude-sonnet"}, "request;model;over_quota=gpt-4o"),
    ]:
        status, h, raw = chat(env, "shop/app", body(model=model), headers)
        assert status == 200, raw
        assert h["x-meshllm-model"] == "claude-sonnet-4-5"
        assert h["x-meshllm-route"] == reason
    assert upstream_models(mocks, "openai").count("gpt-4o") == 3
    assert upstream_models(mocks, "anthropic").count("claude-sonnet-4-5") == 3
    assert env.metric("meshllm_quota_rejections_total", limit=GPT4O_RULE, reason="rate") == 8
    assert env.metric("meshllm_route_decisions_total", route_reason="ordered+over_quota") == 2


def test_a_chain_is_charged_to_the_targets_it_reached(bound, mocks):
    env = bound(3)
    # claude-first reserves gpt-4o too (it may fail over there) and gives it
    # back when claude answers: five of them leave gpt-4o's limit whole.
    for _ in range(5):
        status, h, raw = chat(env, "shop/app", body(model="claude-first"))
        assert status == 200, raw
        assert (h["x-meshllm-model"], h["x-meshllm-route"]) == ("claude-sonnet-4-5", "ordered")
    # m500 fails and gpt-4o answers: each model counts the request it got.
    for remaining in ["1", "0"]:
        status, h, raw = chat(env, "shop/app", body(model="fail-first"))
        assert status == 200, raw
        assert (h["x-meshllm-model"], h["x-meshllm-attempts"]) == ("gpt-4o", "2")
        # The headers describe the first target's limit.
        assert h["x-ratelimit-limit-requests"] == "2"
        assert h["x-ratelimit-remaining-requests"] == remaining
    # m500 is spent: the chain goes to gpt-4o alone.
    status, h, raw = chat(env, "shop/app", body(model="fail-first"))
    assert status == 200, raw
    assert (h["x-meshllm-model"], h["x-meshllm-attempts"]) == ("gpt-4o", "1")
    assert h["x-meshllm-route"] == "ordered;over_quota=m500"
    assert h["x-ratelimit-remaining-requests"] == "0"
    # Both spent: 429 naming the first target's limit (both reset at midnight).
    status, h, raw = chat(env, "shop/app", body(model="fail-first"))
    assert status == 429
    assert "in limit 'm500-daily': Limit 2, Used 2" in json.loads(raw)["error"]["message"]
    status, h, raw = chat(env, "shop/app", body(model="gpt-4o"))
    assert_gpt4o_refusal(status, h, raw, 3)
    sent = upstream_models(mocks, "openai")
    assert (sent.count("gpt-4o"), sent.count("mock-500")) == (3, 2)


def test_concurrent_clients_on_every_name_of_a_model_get_exactly_its_limit(bound, mocks):
    limit = 10
    env = bound(limit)
    names = ONLY_GPT4O + [("shop/app", "4o-first", {})]
    plan = [names[i % len(names)] for i in range(64)]
    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(lambda c: chat(env, c[0], body(model=c[1]), c[2]), plan))
    served = [r[1].get("x-meshllm-model") if r[0] == 200 else r[0] for r in results]
    assert served.count("gpt-4o") == limit, served
    assert upstream_models(mocks, "openai").count("gpt-4o") == limit
    for (caller, model, _), (status, h, raw) in zip(plan, results):
        if model == "4o-first":
            # Never refused: the other target serves when the model is spent.
            assert status == 200 and h["x-meshllm-model"] in ("gpt-4o", "claude-sonnet-4-5")
        elif status != 200:
            assert_gpt4o_refusal(status, h, raw, limit)
    to_claude = served.count("claude-sonnet-4-5")
    assert upstream_models(mocks, "anthropic").count("claude-sonnet-4-5") == to_claude
    assert served.count(429) == 64 - limit - to_claude
    status, h, raw = chat(env, "shop/app", body(model="4o"))
    assert_gpt4o_refusal(status, h, raw, limit)


def test_openai_sdk_callers_cannot_escape_a_model_rule(bound, mocks):
    import openai

    env = bound(2)

    def client(caller):
        return openai.OpenAI(base_url=env.url + "/v1", api_key="sk-client", max_retries=0,
                             timeout=15, default_headers={CALLER: caller})

    shop, team = client("shop/app"), client("team/app")
    hi = [{"role": "user", "content": "hi"}]
    for model, remaining in [("4o", "1"), ("only-4o", "0")]:
        raw = shop.chat.completions.with_raw_response.create(model=model, messages=hi)
        assert raw.headers["x-meshllm-model"] == "gpt-4o"
        assert raw.headers["x-ratelimit-remaining-requests"] == remaining
        assert raw.parse().choices[0].message.content
    attempts = [
        (shop, {"model": "gpt-4o"}),
        (shop, {"model": "4o", "stream": True}),
        (team, {"model": "house"}),
        (shop, {"model": "only-4o"}),
        (shop, {"model": "mistral-small", "extra_headers": {"x-meshllm-models": "4o"}}),
    ]
    for c, kwargs in attempts:
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(messages=hi, **kwargs)
        assert e.value.status_code == 429
        assert e.value.code == "rate_limit_exceeded" and e.value.type == "requests"
        assert f"limit '{GPT4O_RULE}'" in e.value.message
        assert e.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    raw = shop.chat.completions.with_raw_response.create(model="4o-first", messages=hi)
    assert raw.headers["x-meshllm-model"] == "claude-sonnet-4-5"
    assert raw.headers["x-meshllm-route"] == "ordered;over_quota=gpt-4o"
    assert upstream_models(mocks, "openai").count("gpt-4o") == 2
