"""The Istio install (k8s/base, k8s/overlays): the manifests are generated
from k8s/policy/mesh.json and current, the plugin configuration they carry is
the policy the tests run, and, put together the way istiod and istio-agent
would (tests/istio_sim.py), they run in a real Envoy with the built module."""

import contextlib
import json
import os
import re
import ssl
import subprocess
import sys
import time
from http.client import HTTPSConnection

import pytest
import yaml

import istio_sim as sim
from conftest import KEYS, ROOT, WASM, envoy_binary, free_port, http

sys.path.insert(0, str(ROOT / "k8s" / "tools"))
import manifests  # noqa: E402

OVERLAYS = {
    "sidecar": ("overlays/sidecar/envoyfilter.yaml", "SIDECAR_OUTBOUND"),
    "egress-gateway": ("overlays/egress-gateway/gateway.yaml", "GATEWAY"),
}


def load(rel):
    with open(ROOT / "k8s" / rel) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def envoy_filter(mode):
    rel, _ = OVERLAYS[mode]
    (ef,) = [d for d in load(rel) if d["kind"] == "EnvoyFilter"]
    return ef


def plugin_configs(mode):
    """The plugin configurations the manifests carry, by extension name."""
    out = {}
    for p in envoy_filter(mode)["spec"]["configPatches"]:
        if p["applyTo"] == "EXTENSION_CONFIG":
            value = p["patch"]["value"]
            conf = value["typed_config"]["config"]["configuration"]["value"]
            out[value["name"]] = json.loads(conf)
    return out


def test_manifests_are_current():
    stale = []
    for rel, text in manifests.files(manifests.load_policy()).items():
        path = ROOT / "k8s" / rel
        if not path.exists() or path.read_text() != text:
            stale.append(rel)
    assert not stale, f"run `make k8s`: {stale} differ from k8s/policy/mesh.json"


@pytest.mark.parametrize("mode", OVERLAYS)
def test_both_halves_carry_the_mesh_policy(mode):
    policy = manifests.load_policy()
    configs = plugin_configs(mode)
    assert set(configs) == {"meshllm", "meshllm.upstream"}
    for conf in configs.values():
        # The mesh policy, plus only what the mode sets.
        assert {k: v for k, v in conf.items() if k not in ("identity", "hosts")} == policy
        assert conf["identity"]["source"] == ("mesh_node" if mode == "sidecar" else "mesh_peer")
        assert "api.openai.com" in conf["hosts"] and manifests.ALIAS_HOST in conf["hosts"]


@pytest.mark.parametrize("mode", OVERLAYS)
def test_listener_half_is_configured_for_body_rewrites_and_keys(mode):
    for p in envoy_filter(mode)["spec"]["configPatches"]:
        if p["applyTo"] != "EXTENSION_CONFIG":
            continue
        config = p["patch"]["value"]["typed_config"]["config"]
        # What Istio's WasmPlugin cannot set, hence the EnvoyFilter.
        assert config["allow_on_headers_stop_iteration"] is True
        assert config["fail_open"] is False
        vm = config["vm_config"]
        assert vm["code"]["remote"]["http_uri"]["uri"].startswith(("oci://", "https://"))
        # Keys come from the proxy's environment, never from the config.
        assert vm["environment_variables"]["host_env_keys"] == [
            "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"]
        assert "sk-" not in json.dumps(config)


def test_gateway_keys_come_from_a_secret_in_the_gateway_namespace():
    (dep,) = [d for d in load("overlays/egress-gateway/gateway.yaml") if d["kind"] == "Deployment"]
    (proxy,) = dep["spec"]["template"]["spec"]["containers"]
    assert proxy["name"] == "istio-proxy"
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in proxy["env"]}
    assert set(refs) == {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"}
    assert {r["name"] for r in refs.values()} == {manifests.KEYS_SECRET}
    assert dep["metadata"]["namespace"] == manifests.NAMESPACE


def test_module_url_and_digest_reach_both_halves(tmp_path):
    url, digest = "oci://registry.test/meshllm:1.2.3", "sha256:" + "ab" * 32
    manifests.main(["--module-url", url, "--sha256", digest, "--out-dir", str(tmp_path)])
    for rel, _ in OVERLAYS.values():
        docs = list(yaml.safe_load_all((tmp_path / rel).read_text()))
        remotes = [
            p["patch"]["value"]["typed_config"]["config"]["vm_config"]["code"]["remote"]
            for d in docs if d and d["kind"] == "EnvoyFilter"
            for p in d["spec"]["configPatches"] if p["applyTo"] == "EXTENSION_CONFIG"
        ]
        assert len(remotes) == 2
        assert all(r["http_uri"]["uri"] == url and r["sha256"] == digest for r in remotes)


def test_namespace_policy_rides_on_the_listener(tmp_path, capsys):
    policy = {"allowed_models": ["gpt-4o-mini"]}
    path = tmp_path / "shop.json"
    path.write_text(json.dumps(policy))
    manifests.main(["namespace-policy", "--namespace", "shop", str(path)])
    (ef,) = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert ef["metadata"] == {"name": "meshllm-policy", "namespace": "shop"}
    (patch,) = ef["spec"]["configPatches"]
    assert patch["applyTo"] == "LISTENER" and patch["patch"]["operation"] == "MERGE"
    assert patch["match"]["context"] == "SIDECAR_OUTBOUND"
    carried = patch["patch"]["value"]["metadata"]["filter_metadata"]["meshllm"]["policy"]
    assert json.loads(carried) == policy


def test_mode_policy_refuses_a_conflicting_identity():
    policy = manifests.load_policy()
    policy["identity"] = {"source": "trusted_header", "header": "x-caller"}
    with pytest.raises(SystemExit, match="mesh_node"):
        manifests.mode_policy(policy, "sidecar")
    assert os.path.exists(manifests.MESH_POLICY)


# --- the overlays running in Envoy, configured as Istio would --------------


SHOP_LABELS = {"app": "chatbot", "service.istio.io/canonical-name": "chatbot",
               manifests.OPT_IN_LABEL: manifests.OPT_IN_VALUE}
GATEWAY_LABELS = dict(manifests.GATEWAY_LABELS)
HOSTS = {"openai": "api.openai.com", "anthropic": "api.anthropic.com",
         "gemini": "generativelanguage.googleapis.com"}
CONTEXTS = {"sidecar": "SIDECAR_OUTBOUND", "egress-gateway": "GATEWAY"}


def overlay(mode):
    """An overlay as `kubectl apply -k` would send it."""
    text = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / mode)],
                          capture_output=True, text=True, check=True).stdout
    return sim.load_resources(text)


def point_providers_at(bootstrap, addresses):
    """Stands in for DNS and the providers' TLS: meshllm's position clusters
    reach each provider's mock over plain HTTP on loopback. Everything else
    is as generated."""
    for c in bootstrap["static_resources"]["clusters"]:
        if not c["name"].startswith("meshllm.p"):
            continue
        c["type"] = "STATIC"
        c.pop("dns_lookup_family", None)
        c.pop("transport_socket_matches", None)
        for e in c["load_assignment"]["endpoints"][0]["lb_endpoints"]:
            meta = e["metadata"]["filter_metadata"]
            meta.pop("envoy.transport_socket_match", None)
            host, port = addresses[meta["meshllm"]["provider"]]
            e["endpoint"]["address"]["socket_address"] = {"address": host, "port_value": port}
    return bootstrap


@contextlib.contextmanager
def istio_proxy(mode, workdir, namespace, labels, addresses, extra=(), mesh_tls=None,
                other_endpoints=None):
    """One proxy of `mode`, configured from the rendered overlay (plus
    `extra` resources) the way istiod and istio-agent would, running the
    built module."""
    resources = overlay(mode) + list(extra)
    port, admin = free_port(), free_port()
    endpoints = {HOSTS[p]: addr for p, addr in addresses.items()}
    endpoints.update(other_endpoints or {})
    kw = dict(namespace=namespace, labels=labels, port=port, admin_port=admin, endpoints=endpoints)
    if mode == "sidecar":
        bootstrap = sim.sidecar_bootstrap(resources, mesh_tls=mesh_tls, **kw)
    else:
        bootstrap = sim.gateway_bootstrap(resources, mesh_tls=mesh_tls, **kw)
    filters = [r for r in resources if r["kind"] == "EnvoyFilter"]
    bootstrap, ext = sim.apply_envoy_filters(bootstrap, filters, context=CONTEXTS[mode],
                                             namespace=namespace, labels=labels)
    bootstrap = sim.agent_emulate(bootstrap, ext, str(WASM), workdir / "ecds")
    point_providers_at(bootstrap, addresses)
    config = workdir / "envoy.json"
    config.write_text(json.dumps(bootstrap, indent=1))
    validated = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)],
                               capture_output=True, text=True)
    assert validated.returncode == 0, validated.stdout[-3000:] + validated.stderr[-3000:]
    log_path = workdir / "envoy.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [envoy_binary(), "-c", str(config), "--concurrency", "1", "--base-id", str(port),
             "-l", "warning", "--component-log-level", "wasm:info"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **KEYS})
        try:
            deadline = time.time() + 30
            while True:
                assert proc.poll() is None, log_path.read_text()[-4000:]
                assert time.time() < deadline, "not ready:\n" + log_path.read_text()[-4000:]
                try:
                    if http("GET", f"http://127.0.0.1:{admin}/ready", timeout=1)[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            yield {"port": port, "admin": admin, "log": log_path, "proc": proc}
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def chat_body(model, text="hello"):
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def caller_counts(proxy):
    """meshllm_requests_total by caller, from Envoy's raw stat names."""
    _, _, body = http("GET", f"http://127.0.0.1:{proxy['admin']}/stats?filter=meshllm_requests_total")
    out = {}
    for line in body.decode().splitlines():
        name, _, value = line.rpartition(": ")
        ns = re.search(r";caller_namespace=([^;]*)", name)
        svc = re.search(r";caller_service=([^;]*)", name)
        if ns and svc:
            key = (ns.group(1), svc.group(1))
            out[key] = out.get(key, 0) + int(value)
    return out


@pytest.fixture(scope="module")
def sidecar_proxy(wasm, mocks, tmp_path_factory):
    echo = mocks["groq"]  # any HTTP server: stands for another service of the pod
    other = sim.load_resources("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: inventory, namespace: shop}
spec:
  hosts: [inventory.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
""")
    # The shop team's own policy, as k8s/examples/namespace-policy applies it.
    team = sim.load_resources(str(ROOT / "k8s" / "examples" / "namespace-policy" / "envoyfilter.yaml"))
    addresses = {p: ("127.0.0.1", mocks[p].port) for p in HOSTS}
    with istio_proxy("sidecar", tmp_path_factory.mktemp("sidecar"), "shop", SHOP_LABELS, addresses,
                     extra=other + team, other_endpoints={"inventory.example.com": ("127.0.0.1", echo.port)}) as p:
        yield p


def test_sidecar_routes_a_provider_host_with_the_mesh_key(sidecar_proxy, mocks):
    status, h, body = http("POST", f"http://127.0.0.1:{sidecar_proxy['port']}/v1/chat/completions",
                           chat_body("mini"), headers={"host": "api.openai.com",
                                                       "authorization": "Bearer app-has-no-key"})
    assert status == 200, body
    assert h["x-meshllm-provider"] == "openai" and h["x-meshllm-model"] == "gpt-4o-mini"
    (sent,) = mocks["openai"].take()
    assert sent["headers"]["authorization"] == f"Bearer {KEYS['OPENAI_API_KEY']}"
    assert json.loads(sent["body"])["model"] == "gpt-4o-mini"
    # The caller is the pod, from the proxy's node metadata.
    assert caller_counts(sidecar_proxy).get(("shop", "chatbot"), 0) >= 1


def test_sidecar_alias_host_translates_to_anthropic(sidecar_proxy, mocks):
    status, h, body = http("POST", f"http://127.0.0.1:{sidecar_proxy['port']}/v1/chat/completions",
                           chat_body("claude"), headers={"host": "llm.meshllm"})
    assert status == 200, body
    assert json.loads(body)["object"] == "chat.completion"
    (sent,) = mocks["anthropic"].take()
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == KEYS["ANTHROPIC_API_KEY"]


def test_sidecar_leaves_the_pods_other_traffic_alone(sidecar_proxy, mocks):
    payload = {"model": "anything", "messages": []}
    status, _, body = http("POST", f"http://127.0.0.1:{sidecar_proxy['port']}/v1/chat/completions",
                           payload, headers={"host": "inventory.example.com",
                                             "authorization": "Bearer the-apps-own"})
    assert status == 200, body
    (sent,) = mocks["groq"].take()
    assert sent["headers"]["authorization"] == "Bearer the-apps-own"
    assert json.loads(sent["body"]) == payload
    assert not mocks["openai"].take()


def test_sidecar_refuses_what_the_filter_did_not_route(sidecar_proxy):
    status, _, body = http("POST", f"http://127.0.0.1:{sidecar_proxy['port']}/v1/chat/completions",
                           chat_body("no-such-model"), headers={"host": "api.openai.com"})
    assert status == 404
    assert json.loads(body)["error"]["code"] in ("model_not_found", "not_routed")


def test_sidecar_follows_its_teams_namespace_policy(sidecar_proxy, mocks):
    url = f"http://127.0.0.1:{sidecar_proxy['port']}/v1/chat/completions"
    # shop.json allows gpt-4o-mini and claude-sonnet only ...
    status, _, body = http("POST", url, chat_body("gpt-4o"), headers={"host": "api.openai.com"})
    assert status == 403, body
    assert json.loads(body)["error"]["code"] == "model_not_allowed"
    assert not mocks["openai"].take()
    # ... and gives its callers an alias of their own.
    status, h, body = http("POST", url, chat_body("house"), headers={"host": "api.anthropic.com"})
    assert status == 200, body
    assert h["x-meshllm-provider"] == "anthropic"
    assert json.loads(mocks["anthropic"].take()[0]["body"])["model"] == "claude-sonnet-4-5"


@pytest.fixture(scope="module")
def gateway_proxy(wasm, mocks, tmp_path_factory):
    from test_quotas import make_pki

    workdir = tmp_path_factory.mktemp("gateway")
    pki = make_pki(str(workdir))
    mesh_tls = {"cert": pki["server"][0], "key": pki["server"][1], "ca": pki["ca"]}
    # OpenAI is down: the mesh route `smart` must fail over.
    addresses = {p: ("127.0.0.1", mocks[p].port) for p in HOSTS}
    addresses["openai"] = ("127.0.0.1", free_port())
    with istio_proxy("egress-gateway", workdir, manifests.NAMESPACE, GATEWAY_LABELS, addresses,
                     mesh_tls=mesh_tls) as p:
        p["pki"] = pki
        yield p


def mtls_post(proxy, workload, host, payload):
    ctx = ssl.create_default_context(cafile=proxy["pki"]["ca"])
    ctx.check_hostname = False
    if workload:
        ctx.load_cert_chain(*proxy["pki"][workload])
    conn = HTTPSConnection("127.0.0.1", proxy["port"], context=ctx, timeout=15)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(payload),
                     {"content-type": "application/json", "host": host})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_gateway_knows_callers_by_certificate_and_fails_over(gateway_proxy, mocks):
    status, h, body = mtls_post(gateway_proxy, "shop/chatbot", "api.openai.com:80", chat_body("smart"))
    assert status == 200, body
    headers = {k.lower(): v for k, v in h.items()}
    assert headers["x-meshllm-provider"] == "anthropic"
    assert json.loads(body)["object"] == "chat.completion"
    assert mocks["anthropic"].take()
    status, _, body = mtls_post(gateway_proxy, "other/batch", "llm.meshllm.svc.cluster.local",
                                chat_body("gemini"))
    assert status == 200, body
    counts = caller_counts(gateway_proxy)
    assert counts.get(("shop", "chatbot"), 0) >= 1 and counts.get(("other", "batch"), 0) >= 1


def test_gateway_applies_each_callers_namespace_policy(gateway_proxy, mocks):
    # mesh.json's `namespaces.other` allows gemini-flash and gpt-4o-mini only.
    status, _, body = mtls_post(gateway_proxy, "other/batch", "api.openai.com", chat_body("smart"))
    assert status == 403, body
    assert json.loads(body)["error"]["code"] == "model_not_allowed"
    # The mesh default lets shop use the route.
    status, _, body = mtls_post(gateway_proxy, "shop/chatbot", "api.openai.com", chat_body("smart"))
    assert status == 200, body


def test_gateway_refuses_callers_without_a_mesh_certificate(gateway_proxy):
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        mtls_post(gateway_proxy, None, "api.openai.com", chat_body("mini"))
