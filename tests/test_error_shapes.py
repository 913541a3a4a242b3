"""Every error a caller sees is in its own API's shape, with the right status,
through a real Envoy: OpenAI `{"error":{"message","type","param","code"}}`,
Anthropic `{"type":"error","error":{"type","message"}}`, Gemini
`{"error":{"code","message","status"}}`.

Failures come from a provider that misbehaves on purpose
(tests/hostile_provider.py) and from Envoy itself: an answer too large to
hold, a provider that closes before its `content-length`, the hostile error
bodies of tests/fixtures/hostile/errors passed through and translated, no
healthy upstream, circuit-breaker overflow, timeouts, refused connections
and Envoy's own request-size limit. Each is sent by each caller API, through
the listener half alone (one target) and through the upstream half (a
chain), and with failover off; then once more with the official SDKs, which
must raise their own error class with the message; and through an Istio
sidecar configured from the generated manifests.
"""

import json

import anthropic
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

import render
from conftest import KEYS, Envoy, free_port, http
from hostile_provider import HostileProvider, fixtures

CALLERS = ["openai", "anthropic", "gemini"]
# Each caller's requests go to a provider of another API (translated) or of
# its own (passed through).
TRANSLATED = {"openai": "anthropic", "anthropic": "gemini", "gemini": "openai"}
PROVIDERS = {
    "openai": {"kind": "openai_compatible", "path": "/v1"},
    "anthropic": {"kind": "anthropic", "path": "/v1", "api_key_env": "ANTHROPIC_API_KEY"},
    "gemini": {"kind": "gemini", "path": "/v1beta", "api_key_env": "GEMINI_API_KEY"},
}
FIXTURES = sorted(fixtures())
MAX_RESPONSE_BYTES = 1 << 20
# Over the filter's limit and under Envoy's (render.py puts it 1 MiB above).
TOO_BIG = MAX_RESPONSE_BYTES + (MAX_RESPONSE_BYTES // 2)
# A text whose translated answer still fits.
FITS = MAX_RESPONSE_BYTES - 4096
PER_TRY_TIMEOUT_MS = 2000
BEHAVIOURS = ["big", "short", "stall"] + [f"fixture-{f}" for f in FIXTURES]


def plugin_config(hostile_port, dead_port):
    providers = [
        {"name": f"h-{api}", "kind": p["kind"],
         "base_url": f"http://127.0.0.1:{hostile_port}{p['path']}",
         **({"api_key_env": p["api_key_env"]} if "api_key_env" in p else {})}
        for api, p in PROVIDERS.items()
    ] + [
        {"name": "dead", "kind": "openai_compatible", "base_url": f"http://127.0.0.1:{dead_port}/v1"},
        # Its endpoints are taken out of the bootstrap: Envoy has no host.
        {"name": "nohost", "kind": "openai_compatible", "base_url": f"http://127.0.0.1:{dead_port}/v1"},
        # Its cluster's circuit breaker admits no request.
        {"name": "full", "kind": "openai_compatible", "base_url": f"http://127.0.0.1:{hostile_port}/v1"},
    ]
    models, routes = [], []
    for api in PROVIDERS:
        for b in BEHAVIOURS:
            upstream = "hostile-big" if b == "big" else f"hostile-{b}"
            # Chains have targets of their own: health cool-downs from the
            # single-target tests do not shorten them.
            for suffix in ("", "-first", "-again"):
                models.append({"name": f"{api}-{b}{suffix}", "provider": f"h-{api}", "model": upstream})
            routes.append({"name": f"chain-{api}-{b}", "targets": [f"{api}-{b}-first", f"{api}-{b}-again"]})
    models.append({"name": "anthropic-fits", "provider": "h-anthropic", "model": f"hostile-big-{FITS}"})
    for name in ("dead", "nohost", "full"):
        models += [{"name": f"{name}{suffix}", "provider": name} for suffix in ("", "-first", "-again")]
        routes.append({"name": f"chain-{name}", "targets": [f"{name}-first", f"{name}-again"]})
    return {
        "providers": providers,
        "models": models,
        "routes": routes,
        "max_request_bytes": 262144,
        "max_response_bytes": MAX_RESPONSE_BYTES,
        "failover": {"max_attempts": 2, "per_try_timeout_ms": PER_TRY_TIMEOUT_MS},
    }


def start_envoy(cfg, patch, route_timeout=None):
    """An Envoy from render.py's bootstrap, changed by `patch` the way a
    failing mesh would be (no endpoints, a full circuit breaker, a lower
    buffer limit)."""
    original = render.render

    def patched(*args, **kwargs):
        if route_timeout:
            kwargs["route_timeout"] = route_timeout
        bootstrap = original(*args, **kwargs)
        patch(bootstrap)
        return bootstrap

    render.render = patched
    try:
        env = Envoy(cfg, env=KEYS)
    finally:
        render.render = original
    env.wait_ready()
    return env


def break_providers(bootstrap):
    """No endpoints for `nohost`; no request admitted for `full`."""
    for c in bootstrap["static_resources"]["clusters"]:
        for group in c.get("load_assignment", {}).get("endpoints", []):
            group["lb_endpoints"] = [
                e for e in group["lb_endpoints"]
                if e.get("metadata", {}).get("filter_metadata", {}).get("meshllm", {}).get("provider")
                != "nohost"
            ]
        if c["name"] == "nohost":
            c["load_assignment"]["endpoints"] = []
        if c["name"] == "full":
            c["circuit_breakers"] = {"thresholds": [{"max_requests": 0}]}


@pytest.fixture(scope="module")
def hostile():
    server = HostileProvider(big_bytes=TOO_BIG).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def envoy(wasm, hostile):
    env = start_envoy(plugin_config(hostile.port, free_port()), break_providers)
    yield env
    env.stop()


@pytest.fixture(scope="module")
def standalone(wasm, hostile):
    """Failover off, and Envoy's own buffer limit below max_request_bytes:
    Envoy, not the filter, refuses large requests here."""
    cfg = plugin_config(hostile.port, free_port())
    cfg["failover"] = {"enabled": False}
    cfg["max_response_bytes"] = 32768

    def patch(bootstrap):
        break_providers(bootstrap)
        bootstrap["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] = 131072

    env = start_envoy(cfg, patch, route_timeout=f"{PER_TRY_TIMEOUT_MS / 1000:g}s")
    yield env
    env.stop()


def call(env, caller, model, text="hi"):
    """(status, headers, body) of one non-streamed call in the caller's API."""
    if caller == "openai":
        return http("POST", env.url + "/v1/chat/completions",
                    {"model": model, "messages": [{"role": "user", "content": text}]}, timeout=30)
    if caller == "anthropic":
        return http("POST", env.url + "/v1/messages",
                    {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": text}]},
                    headers={"anthropic-version": "2023-06-01", "x-api-key": "client-key"}, timeout=30)
    return http("POST", env.url + f"/v1beta/models/{model}:generateContent",
                {"contents": [{"role": "user", "parts": [{"text": text}]}]}, timeout=30)


def shaped(caller, status, raw, complete=True):
    """Asserts `raw` is an error in `caller`'s shape for `status`; returns
    (OpenAI code / Anthropic type / Gemini status, message). `complete`:
    OpenAI's four fields are all there (a provider's own OpenAI error may
    pass with fewer)."""
    try:
        body = json.loads(raw)
    except ValueError:
        pytest.fail(f"{caller} caller got a body that is not JSON ({status}): {raw[:300]!r}")
    assert isinstance(body, dict), raw
    error = body.get("error")
    assert isinstance(error, dict), raw
    message = error.get("message")
    assert isinstance(message, str) and message, raw
    if caller == "openai":
        if complete:
            assert {"message", "type", "param", "code"} <= error.keys(), raw
            assert isinstance(error["type"], str), raw
        return error.get("code"), message
    if caller == "anthropic":
        assert body.get("type") == "error" and isinstance(error.get("type"), str), raw
        return error["type"], message
    assert error.get("code") == status and isinstance(error.get("status"), str), raw
    return error["status"], message


def models_for(provider_api, behaviour):
    """The single-target model and the two-target chain for a behaviour."""
    return [f"{provider_api}-{behaviour}", f"chain-{provider_api}-{behaviour}"]


# --- answers the filter must hold whole ---------------------------------------

@pytest.mark.parametrize("half", ["listener", "upstream"])
@pytest.mark.parametrize("caller", CALLERS)
def test_oversized_translated_answer_is_502_response_too_large(envoy, caller, half):
    model = models_for(TRANSLATED[caller], "big")[half == "upstream"]
    status, headers, raw = call(envoy, caller, model)
    assert status == 502, raw[:300]
    kind, message = shaped(caller, 502, raw)
    assert kind == {"openai": "response_too_large", "anthropic": "api_error",
                    "gemini": "UNAVAILABLE"}[caller]
    assert f"limit of {MAX_RESPONSE_BYTES} bytes (max_response_bytes)" in message
    assert headers["x-meshllm-provider"] == f"h-{TRANSLATED[caller]}"


def test_answers_within_the_limit_are_translated_and_passed_answers_are_not_held(envoy):
    # Just under the filter's limit: translated whole.
    status, _, raw = call(envoy, "openai", "anthropic-fits")
    assert status == 200, raw[:300]
    assert len(json.loads(raw)["choices"][0]["message"]["content"]) == FITS
    # Passed through (same API, not held): the limit does not apply.
    status, _, raw = call(envoy, "anthropic", "anthropic-big")
    assert status == 200, raw[:300]
    assert len(json.loads(raw)["content"][0]["text"]) == TOO_BIG


def test_standalone_filter_answers_oversized_answers_itself(standalone):
    for caller in CALLERS:
        status, _, raw = call(standalone, caller, f"{TRANSLATED[caller]}-big")
        assert status == 502, raw[:300]
        _, message = shaped(caller, 502, raw)
        assert "limit of 32768 bytes" in message


# --- a provider that closes before its content-length ---------------------------

@pytest.mark.parametrize("half", ["listener", "upstream"])
@pytest.mark.parametrize("caller", CALLERS)
def test_premature_close_on_a_translated_request(envoy, hostile, caller, half):
    model = models_for(TRANSLATED[caller], "short")[half == "upstream"]
    status, _, raw = call(envoy, caller, model)
    # One target: Envoy answers past the filter, shaped by local_reply_config.
    # A chain: Envoy retries the reset, then the filter shapes Envoy's reply.
    assert status == 502 if half == "listener" else status in (502, 503), raw[:300]
    kind, message = shaped(caller, status, raw)
    assert "reset" in message, message
    if caller == "gemini":
        assert kind == "UNAVAILABLE"


def test_premature_close_with_failover_off(standalone):
    for caller in CALLERS:
        status, _, raw = call(standalone, caller, f"{TRANSLATED[caller]}-short")
        assert status == 502, raw[:300]
        shaped(caller, 502, raw)


# --- provider error bodies, passed through and translated -----------------------

@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("caller", CALLERS)
def test_hostile_provider_errors_reach_each_caller_in_its_shape(envoy, caller, fixture):
    fixture_status, _, fixture_body = fixtures()[fixture]
    for provider_api in (caller, TRANSLATED[caller]):
        status, headers, raw = call(envoy, caller, f"{provider_api}-fixture-{fixture}")
        assert status == fixture_status, (provider_api, raw[:300])
        passthrough_openai = caller == provider_api == "openai"
        _, message = shaped(caller, status, raw, complete=not passthrough_openai)
        for key in KEYS.values():
            assert key.encode() not in raw, f"{key} leaked to the {caller} caller"
        assert headers["content-type"] == "application/json"
        already = {"openai": "openai-shaped", "anthropic": "anthropic-shaped",
                   "gemini": "gemini-shaped"}[caller]
        if provider_api == caller and already in fixture and "leak" not in fixture:
            # A provider's error in the caller's own shape passes untouched.
            assert raw == fixture_body
        if fixture.startswith("502-nginx"):
            assert "502 Bad Gateway" in message and "<" not in message


@pytest.mark.parametrize("fixture", ["503-plain-overloaded", "502-nginx-bad-gateway",
                                     "500-truncated-json", "502-empty"])
@pytest.mark.parametrize("caller", CALLERS)
def test_hostile_provider_errors_through_the_upstream_half(envoy, caller, fixture):
    fixture_status = fixtures()[fixture][0]
    for provider_api in (caller, TRANSLATED[caller]):
        status, headers, raw = call(envoy, caller, f"chain-{provider_api}-fixture-{fixture}")
        assert status == fixture_status, raw[:300]
        shaped(caller, status, raw)
        assert headers["x-meshllm-attempts"] == "2"


def test_bodiless_error_keeps_retry_after_free_headers(envoy):
    status, headers, raw = call(envoy, "gemini", "gemini-fixture-502-empty")
    assert status == 502
    kind, message = shaped("gemini", 502, raw)
    assert kind == "UNAVAILABLE" and "no details" in message
    assert headers["x-meshllm-provider"] == "h-gemini"


# --- Envoy's own failures ------------------------------------------------------

ENVOY_FAILURES = {
    # model: (status, OpenAI code)
    "nohost": (503, "provider_unavailable"),
    "dead": (503, "provider_unavailable"),
    "full": (503, "provider_unavailable"),
}


@pytest.fixture(scope="module")
def overflowing(wasm, hostile):
    """Failover on, and every position cluster's circuit breaker full:
    each provider is one endpoint in every position, so the overflow case
    needs an Envoy of its own. Its buffer limit is below max_request_bytes,
    like `standalone`'s."""
    def patch(bootstrap):
        for c in bootstrap["static_resources"]["clusters"]:
            if c["name"].startswith("meshllm.p"):
                c["circuit_breakers"] = {"thresholds": [{"max_requests": 0}]}
        bootstrap["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] = 131072

    env = start_envoy(plugin_config(hostile.port, free_port()), patch)
    yield env
    env.stop()


@pytest.mark.parametrize("half", ["listener", "upstream"])
@pytest.mark.parametrize("failure", sorted(ENVOY_FAILURES))
@pytest.mark.parametrize("caller", CALLERS)
def test_envoy_failures_reach_each_caller_in_its_shape(envoy, overflowing, caller, failure, half):
    model = failure if half == "listener" else f"chain-{failure}"
    expected, code = ENVOY_FAILURES[failure]
    status, _, raw = call(overflowing if failure == "full" else envoy, caller, model)
    assert status == expected, raw[:300]
    kind, message = shaped(caller, status, raw)
    if caller == "openai":
        assert kind == code
    if caller == "gemini":
        assert kind == "UNAVAILABLE"
    assert failure in message or "could not be reached" in message


@pytest.mark.parametrize("failure", sorted(ENVOY_FAILURES))
def test_envoy_failures_with_failover_off(standalone, failure):
    expected, code = ENVOY_FAILURES[failure]
    for caller in CALLERS:
        status, _, raw = call(standalone, caller, failure)
        assert status == expected, raw[:300]
        kind, _ = shaped(caller, status, raw)
        if caller == "openai":
            assert kind == code


@pytest.mark.parametrize("half", ["listener", "upstream"])
@pytest.mark.parametrize("caller", CALLERS)
def test_timeout_is_504_in_each_callers_shape(envoy, caller, half):
    model = models_for(TRANSLATED[caller], "stall")[half == "upstream"]
    status, _, raw = call(envoy, caller, model)
    assert status == 504, raw[:300]
    kind, message = shaped(caller, 504, raw)
    assert kind == {"openai": "provider_timeout", "anthropic": "timeout_error",
                    "gemini": "DEADLINE_EXCEEDED"}[caller]
    assert "did not answer in time" in message


def test_timeout_with_failover_off(standalone):
    status, _, raw = call(standalone, "anthropic", "gemini-stall")
    assert status == 504, raw[:300]
    assert shaped("anthropic", 504, raw)[0] == "timeout_error"


@pytest.mark.parametrize("mode", ["failover", "failover-off"])
def test_envoys_request_size_limit_is_413_in_each_callers_shape(overflowing, standalone, mode):
    env = overflowing if mode == "failover" else standalone
    # 200 KB: under max_request_bytes, over this Envoy's buffer limit.
    text = "x" * 200_000
    for caller in CALLERS:
        for model in ("openai-big", "chain-openai-big"):
            status, _, raw = call(env, caller, model, text=text)
            assert status == 413, raw[:300]
            kind, _ = shaped(caller, 413, raw)
            assert kind == {"openai": "request_too_large", "anthropic": "request_too_large",
                            "gemini": "INVALID_ARGUMENT"}[caller]


def test_the_caller_api_mark_never_reaches_a_provider(envoy, standalone, hostile):
    for env in (envoy, standalone):
        hostile.requests.clear()
        status, _, _ = call(env, "anthropic", "gemini-fixture-503-plain-overloaded")
        assert status == 503
        (sent,) = hostile.requests
        assert not [h for h in sent["headers"] if h.startswith("x-meshllm")], sent["headers"]


# --- the official SDKs raise their own error classes ----------------------------

def sdk_clients(env):
    return {
        "openai": openai.OpenAI(base_url=env.url + "/v1", api_key="sk-client", max_retries=0,
                                timeout=30),
        "anthropic": anthropic.Anthropic(base_url=env.url, api_key="sk-ant-client", max_retries=0,
                                         timeout=30),
        "gemini": genai.Client(api_key="client-gemini-key", http_options=types.HttpOptions(
            base_url=env.url, api_version="v1beta", timeout=30000,
            retry_options=types.HttpRetryOptions(attempts=1))),
    }


def sdk_call(clients, caller, model):
    if caller == "openai":
        clients["openai"].chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}])
    elif caller == "anthropic":
        clients["anthropic"].messages.create(
            model=model, max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    else:
        clients["gemini"].models.generate_content(model=model, contents="hi")


# (behaviour, provider api or None for the caller's own) -> (status, text in the message)
SDK_CASES = [
    ("big", "translated", 502, "max_response_bytes"),
    ("short", "translated", 502, "reset"),
    ("stall", "translated", 504, "did not answer in time"),
    ("fixture-503-plain-overloaded", "translated", 503, "upstream overloaded"),
    ("fixture-503-plain-overloaded", "own", 503, "upstream overloaded"),
    ("fixture-502-nginx-bad-gateway", "own", 502, "502 Bad Gateway"),
    ("fixture-422-fastapi-validation", "own", 422, "field required"),
    ("fixture-429-message-only", "translated", 429, "Too many requests"),
]
SDK_ERRORS = {
    "openai": {502: openai.InternalServerError, 503: openai.InternalServerError,
               504: openai.InternalServerError, 422: openai.UnprocessableEntityError,
               429: openai.RateLimitError},
    "anthropic": {502: anthropic.InternalServerError, 503: anthropic.ServiceUnavailableError,
                  504: anthropic.GatewayTimeoutError, 422: anthropic.UnprocessableEntityError,
                  429: anthropic.RateLimitError},
    "gemini": {502: genai_errors.ServerError, 503: genai_errors.ServerError,
               504: genai_errors.ServerError, 422: genai_errors.ClientError,
               429: genai_errors.ClientError},
}


@pytest.mark.parametrize("behaviour,target,status,text", SDK_CASES,
                         ids=[f"{b}-{t}" for b, t, _, _ in SDK_CASES])
@pytest.mark.parametrize("caller", CALLERS)
def test_each_sdk_raises_its_own_error_with_the_message(envoy, caller, behaviour, target, status,
                                                         text):
    provider_api = TRANSLATED[caller] if target == "translated" else caller
    clients = sdk_clients(envoy)
    with pytest.raises(SDK_ERRORS[caller][status]) as raised:
        sdk_call(clients, caller, f"{provider_api}-{behaviour}")
    e = raised.value
    if caller == "gemini":
        assert e.code == status and isinstance(e.status, str)
        assert text in e.message, e.message
    else:
        assert e.status_code == status
        assert isinstance(e.body, dict), e.body
        assert text in e.message, e.message


# --- an Istio sidecar configured from the generated manifests --------------------

ISTIO_WASM = pytest.mark.wasm_only("Istio (1.30) runs the Wasm build, fetched by its agent")

@pytest.fixture(scope="module")
def sidecar(wasm, tmp_path_factory):
    import test_istio

    server = HostileProvider(big_bytes=3 * 1024 * 1024).start()
    addresses = {api: ("127.0.0.1", server.port) for api in test_istio.HOSTS}
    with test_istio.istio_proxy("sidecar", tmp_path_factory.mktemp("sidecar-errors"), "shop",
                                test_istio.SHOP_LABELS, addresses) as proxy:
        proxy["url"] = f"http://127.0.0.1:{proxy['port']}"
        proxy["hostile"] = server
        yield proxy
    server.stop()


def sidecar_call(proxy, caller, model):
    """One call to the in-mesh alias host, in the caller's API."""
    url, host = proxy["url"], {"host": "llm.meshllm"}
    if caller == "openai":
        return http("POST", url + "/v1/chat/completions",
                    {"model": model, "messages": [{"role": "user", "content": "hi"}]},
                    headers=host, timeout=30)
    if caller == "anthropic":
        return http("POST", url + "/v1/messages",
                    {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
                    headers={**host, "anthropic-version": "2023-06-01"}, timeout=30)
    return http("POST", url + f"/v1beta/models/{model}:generateContent",
                {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
                headers=host, timeout=30)


@ISTIO_WASM
def test_sidecar_holds_answers_above_istios_default_buffer_limit(sidecar):
    # 3 MiB, translated: Istio's 1 MiB default would end it in Envoy's 500.
    sidecar["hostile"].behaviour = "hostile-big"
    status, _, raw = sidecar_call(sidecar, "openai", "claude")
    assert status == 200, raw[:300]
    assert len(json.loads(raw)["choices"][0]["message"]["content"]) == 3 * 1024 * 1024


@ISTIO_WASM
@pytest.mark.parametrize("caller,model", [("openai", "claude"), ("anthropic", "gemini"),
                                          ("gemini", "mini")])
def test_sidecar_shapes_envoys_reply_to_a_premature_close(sidecar, caller, model):
    sidecar["hostile"].behaviour = "hostile-short"
    status, _, raw = sidecar_call(sidecar, caller, model)
    assert status == 502, raw[:300]
    shaped(caller, 502, raw)


@ISTIO_WASM
@pytest.mark.parametrize("caller,model", [("anthropic", "claude"), ("gemini", "gemini")])
def test_sidecar_reshapes_a_same_api_plain_text_error(sidecar, caller, model):
    sidecar["hostile"].behaviour = "hostile-fixture-503-plain-overloaded"
    status, _, raw = sidecar_call(sidecar, caller, model)
    assert status == 503, raw[:300]
    _, message = shaped(caller, 503, raw)
    assert "upstream overloaded" in message


@pytest.mark.parametrize("mode", ["sidecar", "egress-gateway"])
def test_both_istio_modes_get_the_buffer_limit_and_the_reply_mappers(mode):
    import istio_sim as sim
    import manifests
    import test_istio

    namespace, labels = {"sidecar": ("shop", test_istio.SHOP_LABELS),
                         "egress-gateway": (manifests.NAMESPACE, test_istio.GATEWAY_LABELS)}[mode]
    resources = test_istio.overlay(mode)
    kw = dict(namespace=namespace, labels=labels, port=free_port(), admin_port=free_port(),
              endpoints={})
    if mode == "sidecar":
        bootstrap = sim.sidecar_bootstrap(resources, **kw)
    else:
        bootstrap = sim.gateway_bootstrap(resources, mesh_tls={"cert": "c", "key": "k", "ca": "a"}, **kw)
    filters = [r for r in resources if r["kind"] == "EnvoyFilter"]
    bootstrap, _ = sim.apply_envoy_filters(bootstrap, filters, context=test_istio.CONTEXTS[mode],
                                           namespace=namespace, labels=labels)
    (listener,) = bootstrap["static_resources"]["listeners"]
    policy = manifests.mode_policy(manifests.load_policy(), mode)
    assert listener["per_connection_buffer_limit_bytes"] == render.buffer_limit_bytes(policy)
    assert listener["per_connection_buffer_limit_bytes"] > render.DEFAULT_MAX_RESPONSE_BYTES
    (hcm,) = [f["typed_config"] for fc in listener["filter_chains"] for f in fc["filters"]
              if f["name"] == sim.HCM_NAME]
    # Beside the mappers for a module that cannot run (k8s/tools/manifests.py).
    mappers = hcm["local_reply_config"]["mappers"]
    assert all(m in mappers for m in render.local_reply_config()["mappers"])


def test_local_reply_config_covers_every_caller_api():
    mappers = render.local_reply_config()["mappers"]
    apis = set()
    for m in mappers:
        marked, flags = m["filter"]["and_filter"]["filters"][:2]
        apis.add(marked["metadata_filter"]["matcher"]["value"]["string_match"]["exact"])
        assert marked["metadata_filter"]["match_if_key_not_found"] is False
        # URX alone marks the filter's own reply after a provider's 5xx.
        assert "URX" not in flags["response_flag_filter"]["flags"]
        assert "%LOCAL_REPLY_BODY%" in json.dumps(m["body_format_override"]["json_format"])
    assert apis == set(CALLERS)
