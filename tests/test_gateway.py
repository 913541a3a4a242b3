"""Integration tests: raw HTTP through a real Envoy running meshllm.wasm,
asserting on what the mock providers received and what the client got."""

from http.client import HTTPConnection
import json
import subprocess
import time

import pytest

from conftest import KEYS, ROOT, Envoy, envoy_binary, http, wait_for

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello gateway"}]}


def chat(gateway, body, headers=None):
    return http("POST", gateway.url + "/v1/chat/completions", body, headers)


def error_of(body):
    doc = json.loads(body)
    assert set(doc) == {"error"}, doc
    assert set(doc["error"]) == {"message", "type", "param", "code"}, doc
    return doc["error"]


def only_request(mock):
    reqs = mock.take()
    assert len(reqs) == 1, reqs
    return reqs[0]


# --- models ------------------------------------------------------------------


def test_models_list_is_answered_from_config(gateway, mocks):
    status, headers, body = http("GET", gateway.url + "/v1/models")
    assert status == 200
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["object"] == "list"
    ids = [m["id"] for m in doc["data"]]
    expected = []
    for m in gateway.plugin_config["models"]:
        expected += [m["name"]] + m.get("aliases", [])
    expected += [r["name"] for r in gateway.plugin_config.get("routes", [])]
    assert ids == expected
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in doc["data"])
    owners = {m["id"]: m["owned_by"] for m in doc["data"]}
    assert owners["mini"] == "openai" and owners["llama-3.3-70b"] == "groq"
    assert owners["smart"] == "meshllm"
    assert all(not m.take() for m in mocks.values())


def test_single_model_and_unknown_model(gateway):
    status, _, body = http("GET", gateway.url + "/v1/models/azure-gpt-4o")
    assert status == 200
    assert json.loads(body) == {
        "id": "azure-gpt-4o", "object": "model", "created": 0, "owned_by": "azure"
    }
    status, _, body = http("GET", gateway.url + "/v1/models/nope")
    assert status == 404
    assert error_of(body)["code"] == "model_not_found"


# --- routing and rewriting -----------------------------------------------------


def test_openai_alias_is_rewritten_and_client_key_replaced(gateway, mocks):
    body = {"model": "mini", "messages": [{"role": "user", "content": "hi there"}],
            "temperature": 0.5, "metadata": {"model": "keep me"}}
    status, headers, resp = chat(gateway, body, {
        "authorization": "Bearer client-secret",
        "x-api-key": "client-secret-2",
        "openai-organization": "org-client",
        "x-meshllm-cluster": "groq",
        "accept-encoding": "gzip",
    })
    assert status == 200, resp
    assert headers["x-meshllm-provider"] == "openai"
    assert headers["x-meshllm-model"] == "gpt-4o-mini"
    answer = json.loads(resp)
    assert answer["choices"][0]["message"]["content"].endswith("You said: hi there")
    assert answer["usage"]["total_tokens"] > 0

    got = only_request(mocks["openai"])
    assert not mocks["groq"].take(), "a client header must not pick the cluster"
    assert got["path"] == "/v1/chat/completions"
    assert got["headers"]["host"] == "api.openai.com"
    assert got["headers"]["authorization"] == "Bearer " + KEYS["OPENAI_API_KEY"]
    for h in ("x-api-key", "openai-organization", "x-meshllm-cluster"):
        assert h not in got["headers"], h
    assert got["headers"]["accept-encoding"] == "identity"
    # A single target skips the upstream half, which removes Envoy's attempt
    # count for chained attempts; nothing else of Envoy's reaches providers.
    assert [h for h in got["headers"] if h.startswith("x-envoy")] in ([], ["x-envoy-attempt-count"])
    sent = json.loads(got["body"])
    assert sent["model"] == "gpt-4o-mini"
    assert sent["metadata"] == {"model": "keep me"}
    assert sent["temperature"] == 0.5
    assert int(got["headers"]["content-length"]) == len(got["body"].encode())


def test_body_is_forwarded_byte_for_byte_when_model_is_unchanged(gateway, mocks):
    raw = b'{ "model" : "gpt-4o",\n "messages":[{"role":"user","content":"caf\\u00e9 \xf0\x9f\x98\x80"}],"n":1}'
    status, _, _ = http("POST", gateway.url + "/v1/chat/completions", raw)
    assert status == 200
    got = only_request(mocks["openai"])
    assert got["body"].encode() == raw


def test_azure_deployment_path_and_api_key_header(gateway, mocks):
    status, headers, body = chat(gateway, {**CHAT, "model": "azure-gpt-4o"},
                                 {"api-key": "client-azure-key"})
    assert status == 200, body
    assert headers["x-meshllm-provider"] == "azure"
    got = only_request(mocks["azure"])
    assert got["path"] == "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    assert got["headers"]["host"] == "your-resource.openai.azure.com"
    assert got["headers"]["api-key"] == KEYS["AZURE_OPENAI_API_KEY"]
    assert "authorization" not in got["headers"]
    assert json.loads(got["body"])["model"] == "gpt-4o"


def test_openai_compatible_base_path(gateway, mocks):
    status, headers, body = chat(gateway, {**CHAT, "model": "llama-3.3-70b"})
    assert status == 200, body
    got = only_request(mocks["groq"])
    assert got["path"] == "/openai/v1/chat/completions"
    assert got["headers"]["host"] == "api.groq.com"
    assert got["headers"]["authorization"] == "Bearer " + KEYS["GROQ_API_KEY"]
    assert json.loads(got["body"])["model"] == "llama-3.3-70b-versatile"
    assert headers["x-meshllm-model"] == "llama-3.3-70b-versatile"


def test_embeddings_are_routed(gateway, mocks):
    status, _, body = http("POST", gateway.url + "/v1/embeddings",
                           {"model": "text-embedding-3-small", "input": ["a", "b"]})
    assert status == 200, body
    doc = json.loads(body)
    assert [d["index"] for d in doc["data"]] == [0, 1]
    got = only_request(mocks["openai"])
    assert got["path"] == "/v1/embeddings"


def test_chunked_request_body_is_buffered_and_rewritten(gateway, mocks):
    conn = HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    payload = json.dumps({**CHAT, "model": "mini"}).encode()
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("content-type", "application/json")
    conn.putheader("transfer-encoding", "chunked")
    conn.endheaders()
    for i in range(0, len(payload), 7):
        piece = payload[i:i + 7]
        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    conn.send(b"0\r\n\r\n")
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    resp.read()
    conn.close()
    got = only_request(mocks["openai"])
    assert json.loads(got["body"])["model"] == "gpt-4o-mini"
    assert int(got["headers"]["content-length"]) == len(got["body"].encode())


def test_header_values_that_are_not_utf8_are_handled(gateway, mocks):
    """HTTP allows obs-text bytes in header values and any client can send
    them; reading such a header must not trap the VM (which would fail every
    later request too). Client credentials are still removed."""
    payload = json.dumps({**CHAT, "model": "mini"}).encode()
    for _ in range(2):
        conn = HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("content-type", "application/json")
        conn.putheader("content-length", str(len(payload)))
        for name in ("authorization", "x-api-key", "anthropic-version", "x-trace-note"):
            conn.putheader(name, "caf\xe9 cr\xe8me".encode("latin-1"))
        conn.endheaders(payload)
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
        conn.close()
        got = only_request(mocks["openai"])
        assert got["headers"]["authorization"] == "Bearer " + KEYS["OPENAI_API_KEY"]
        assert "x-api-key" not in got["headers"]
        assert "anthropic-version" not in got["headers"]
    status, _, _ = chat(gateway, {**CHAT, "model": "mini"})
    assert status == 200


# --- streaming ---------------------------------------------------------------


def read_event(resp):
    lines = []
    while True:
        line = resp.readline()
        assert line, "stream ended early"
        line = line.rstrip(b"\r\n")
        if not line:
            if lines:
                return b"\n".join(lines)
            continue
        lines.append(line)


def test_stream_passes_through_event_by_event(gateway, mocks):
    """The mock holds the rest of the stream until the client has the first
    event; a gateway that buffered would never deliver it."""
    conn = HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    conn.request("POST", "/v1/chat/completions",
                 json.dumps({**CHAT, "model": "gated", "stream": True}),
                 {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("content-type") == "text/event-stream"
    first = json.loads(read_event(resp)[len(b"data: "):])
    assert first["choices"][0]["delta"]["role"] == "assistant"
    mocks["openai"].release()
    events = []
    while True:
        ev = read_event(resp)
        if ev == b"data: [DONE]":
            break
        events.append(json.loads(ev[len(b"data: "):]))
    conn.close()
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text.endswith("You said: hello gateway")
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert json.loads(only_request(mocks["openai"])["body"])["model"] == "mock-gated"


# --- errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,path,body,status,code,param",
    [
        ("POST", "/v1/chat/completions", b"{not json", 400, "invalid_json", None),
        ("POST", "/v1/chat/completions", {"messages": []}, 400, "missing_required_parameter", "model"),
        ("POST", "/v1/chat/completions", {"model": 4, "messages": []}, 400, "invalid_type", "model"),
        ("POST", "/v1/chat/completions", {"model": "gpt-4o"}, 400, "missing_required_parameter", "messages"),
        ("POST", "/v1/chat/completions", {"model": "gpt-4o", "messages": "hi"}, 400, "invalid_type", "messages"),
        ("POST", "/v1/chat/completions", b'{"model":"gpt-4o","model":"x","messages":[]}', 400, "duplicate_parameter", "model"),
        ("POST", "/v1/embeddings", {"model": "text-embedding-3-small"}, 400, "missing_required_parameter", "input"),
        ("POST", "/v1/chat/completions", {"model": "gpt-5-nope", "messages": []}, 404, "model_not_found", "model"),
        ("GET", "/v1/chat/completions", None, 405, "method_not_allowed", None),
        ("POST", "/v1/models", b"{}", 405, "method_not_allowed", None),
        ("GET", "/v1/vector_stores", None, 404, "unknown_url", None),
        ("POST", "/v2/chat/completions", b"{}", 404, "unknown_url", None),
        ("POST", "/v1/chat/completions", {"model": "mistral-small", "messages": []}, 500, "provider_key_missing", None),
    ],
)
def test_request_errors_are_openai_shaped(gateway, mocks, method, path, body, status, code, param):
    got_status, headers, resp = http(method, gateway.url + path, body)
    assert got_status == status, resp
    assert headers["content-type"] == "application/json"
    err = error_of(resp)
    assert err["code"] == code
    assert err["param"] == param
    assert err["message"]
    assert all(not m.take() for m in mocks.values()), "nothing may reach a provider"


def test_405_names_the_allowed_method(gateway):
    status, headers, _ = http("GET", gateway.url + "/v1/chat/completions")
    assert status == 405 and headers["allow"] == "POST"


def test_missing_key_error_names_the_variable(gateway):
    _, _, resp = chat(gateway, {**CHAT, "model": "mistral-small"})
    assert "MISTRAL_API_KEY" in error_of(resp)["message"]


def test_body_over_limit_is_413(gateway, mocks):
    big = {**CHAT, "padding": "x" * 300_000}
    status, _, resp = chat(gateway, big)
    assert status == 413
    err = error_of(resp)
    assert err["code"] == "request_too_large"
    assert "262144" in err["message"]
    assert not mocks["openai"].take()


def test_provider_openai_error_keeps_status_and_body(gateway, mocks):
    status, headers, resp = chat(gateway, {**CHAT, "model": "err-429"})
    assert status == 429
    err = error_of(resp)
    assert err["code"] == "rate_limit_exceeded"
    assert err["message"] == "Rate limit reached for requests"
    assert headers["retry-after"] == "1"
    assert headers["x-meshllm-provider"] == "openai"


def test_provider_text_error_is_normalised(gateway):
    status, headers, resp = chat(gateway, {**CHAT, "model": "err-text"})
    assert status == 500
    assert headers["content-type"] == "application/json"
    err = error_of(resp)
    assert err["type"] == "server_error"
    assert "upstream exploded" in err["message"] and "openai" in err["message"]


def test_provider_detail_error_is_normalised(gateway):
    status, _, resp = chat(gateway, {**CHAT, "model": "err-detail"})
    assert status == 400
    err = error_of(resp)
    assert err["type"] == "invalid_request_error"
    assert "temperature must be <= 2" in err["message"]


def test_provider_key_never_reaches_the_client(gateway):
    status, _, resp = chat(gateway, {**CHAT, "model": "leak"})
    assert status == 401
    text = resp.decode()
    assert KEYS["OPENAI_API_KEY"] not in text
    assert "[redacted]" in error_of(resp)["message"]


def test_unreachable_provider_is_503_json(gateway):
    status, headers, resp = chat(gateway, {**CHAT, "model": "dead-model"})
    assert status == 503
    assert headers["content-type"] == "application/json"
    err = error_of(resp)
    assert err["code"] == "provider_unavailable"
    assert err["type"] == "server_error"
    assert "deadend" in err["message"] and "could not be reached" in err["message"]


# --- metrics and logs ----------------------------------------------------------


def test_requests_are_counted_by_provider_model_and_error(gateway):
    labels_ok = dict(gen_ai_provider_name="groq", gen_ai_request_model="llama-3.3-70b",
                     gen_ai_response_model="llama-3.3-70b-versatile", error_type=None)
    labels_err = dict(gen_ai_provider_name="openai", gen_ai_request_model="err-429",
                      error_type="429")
    labels_none = dict(gen_ai_provider_name="none", gen_ai_request_model="_OTHER",
                       error_type="404")
    def counts():
        return [gateway.metric("meshllm_requests_total", **l)
                for l in (labels_ok, labels_err, labels_none)]
    before = counts()
    for _ in range(3):
        assert chat(gateway, {**CHAT, "model": "llama-3.3-70b"})[0] == 200
    assert chat(gateway, {**CHAT, "model": "err-429"})[0] == 429
    assert chat(gateway, {**CHAT, "model": "unknown-model"})[0] == 404
    want = [before[0] + 3, before[1] + 1, before[2] + 1]
    assert wait_for(lambda: counts() == want), (counts(), want)
    text = gateway.prometheus()
    assert "unknown-model" not in text, "unknown model names must not become labels"
    assert KEYS["OPENAI_API_KEY"] not in text


def test_secrets_stay_out_of_logs(gateway):
    chat(gateway, {**CHAT, "model": "leak"}, {"authorization": "Bearer client-secret-xyz"})
    logs = gateway.log_text() + "\n".join(gateway.access_log_lines())
    for secret in list(KEYS.values()) + ["client-secret-xyz"]:
        assert secret not in logs


# --- configuration -------------------------------------------------------------


def test_invalid_config_is_refused_with_field_path(wasm):
    with open(ROOT / "envoy" / "meshllm.json") as f:
        cfg = json.load(f)
    cfg["models"][2]["provider"] = "anthropc"
    env = Envoy(cfg)
    try:
        code = env.wait_exit(timeout=20)
        log = env.log_text()
        assert code is not None and code != 0, "envoy must not start half-configured"
        assert 'models[2].provider: unknown provider "anthropc"' in log
    finally:
        env.stop()


@pytest.mark.wasm_only("envoy/envoy.yaml is the Wasm example (test_native_config checks native)")
def test_shipped_envoy_yaml_is_current_and_valid(wasm):
    import render
    with open(ROOT / "envoy" / "meshllm.json") as f:
        cfg = json.load(f)
    with open(ROOT / "envoy" / "envoy.yaml") as f:
        shipped = f.read()
    assert shipped == render.to_yaml(render.render(cfg, access_log_path="/dev/stdout")), \
        "run `make envoy-config`"
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(ROOT / "envoy" / "envoy.yaml"),
         "--disable-hot-restart"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr
