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

pytestmark = pytest.mark.wasm_only(
    "Istio (1.30) runs the Wasm build: its EnvoyFilter loads the .wasm through the agent's fetch")

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


def test_namespace_policy_rides_on_the_listener_and_the_llm_routes(tmp_path, capsys):
    policy = {"allowed_models": ["gpt-4o-mini"]}
    path = tmp_path / "shop.json"
    path.write_text(json.dumps(policy))
    manifests.main(["namespace-policy", "--namespace", "shop", str(path)])
    (ef,) = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert ef["metadata"] == {"name": "meshllm-policy", "namespace": "shop"}
    listener, *routes = ef["spec"]["configPatches"]
    # The Wasm build reads the listener's metadata, the native build the
    # matched route's: one EnvoyFilter serves both.
    assert listener["applyTo"] == "LISTENER"
    assert {r["applyTo"] for r in routes} == {"HTTP_ROUTE"}
    vhosts = {r["match"]["routeConfiguration"]["vhost"]["name"] for r in routes}
    assert vhosts == set(manifests.handled_vhosts(manifests.load_policy()))
    for patch in [listener, *routes]:
        assert patch["patch"]["operation"] == "MERGE"
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


def istio_config(mode, workdir, namespace, labels, addresses, extra=(), mesh_tls=None, other_endpoints=None,
                 resources=None, passthrough=None, modules=None, as_sidecar=False, agent_log=None):
    """The Envoy configuration Istio would give one proxy of `mode` (a
    sidecar of the egress-gateway overlay with `as_sidecar`) from the
    rendered overlay (or `resources`) plus `extra`. `modules`: what the
    agent can fetch (istio_sim._fetch; default: the built module)."""
    resources = (overlay(mode) if resources is None else list(resources)) + list(extra)
    port, admin = free_port(), free_port()
    endpoints = {HOSTS[p]: addr for p, addr in addresses.items()}
    endpoints.update(other_endpoints or {})
    kw = dict(namespace=namespace, labels=labels, port=port, admin_port=admin, endpoints=endpoints)
    sidecar = mode == "sidecar" or as_sidecar
    if sidecar:
        bootstrap = sim.sidecar_bootstrap(resources, mesh_tls=mesh_tls, passthrough=passthrough, **kw)
    else:
        bootstrap = sim.gateway_bootstrap(resources, mesh_tls=mesh_tls, **kw)
    filters = [r for r in resources if r["kind"] == "EnvoyFilter"]
    bootstrap, ext = sim.apply_envoy_filters(bootstrap, filters, context="SIDECAR_OUTBOUND" if sidecar else "GATEWAY",
                                             namespace=namespace, labels=labels)
    bootstrap = sim.agent_emulate(bootstrap, ext, str(WASM) if modules is None else modules, workdir / "ecds",
                                  log=agent_log)
    point_providers_at(bootstrap, addresses)
    return bootstrap, port, admin


@contextlib.contextmanager
def run_envoy(bootstrap, port, admin, workdir):
    """Validates and runs `bootstrap` with the provider keys in Envoy's
    environment, until it is ready."""
    config = workdir / "envoy.json"
    config.write_text(json.dumps(bootstrap, indent=1))
    validated = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)],
                               capture_output=True, text=True)
    assert validated.returncode == 0, validated.stdout[-3000:] + validated.stderr[-3000:]
    log_path = workdir / "envoy.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [envoy_binary(), "-c", str(config), "--concurrency", "1", "--disable-hot-restart",
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


@contextlib.contextmanager
def istio_proxy(mode, workdir, namespace, labels, addresses, **kw):
    """One proxy of `mode`, configured from the rendered overlay (plus
    `extra` resources) the way istiod and istio-agent would, running the
    built module."""
    bootstrap, port, admin = istio_config(mode, workdir, namespace, labels, addresses, **kw)
    with run_envoy(bootstrap, port, admin, workdir) as proxy:
        yield proxy


# What names the pod or its caller: never sent to a provider.
IDENTITY_HEADERS = {"x-envoy-peer-metadata", "x-envoy-peer-metadata-id", "x-forwarded-client-cert",
                    "x-forwarded-for"}


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
    # Istio's metadata exchange named the pod on the way in; not to OpenAI.
    assert not IDENTITY_HEADERS & set(sent["headers"])
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
    # Istio's own behaviour, untouched: the metadata exchange names the pod
    # to the services it calls.
    assert sent["headers"]["x-envoy-peer-metadata-id"].startswith("sidecar~")
    assert "x-envoy-peer-metadata" in sent["headers"]
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
    (sent,) = mocks["anthropic"].take()
    # The gateway's metadata exchange, the caller's certificate (XFCC) and
    # address (XFF) stay in the mesh.
    assert not IDENTITY_HEADERS & set(sent["headers"])
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


# --- a provider's virtual host missing: nothing leaves (issue 19, item 1) ---


SIDECAR_SCOPE = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: shop}
spec:
  egress:
  - hosts: ["./*", "istio-system/*"]
"""


def drop(resources, kind, *names):
    return [r for r in resources if not (r["kind"] == kind and r["metadata"]["name"] in names)]


def exported_to_own_namespace(resources):
    """The meshllm namespace's hosts narrowed to itself (exportTo: ".")."""
    out = []
    for r in resources:
        r = json.loads(json.dumps(r))
        if r["metadata"].get("namespace") == manifests.NAMESPACE:
            if r["kind"] == "ServiceEntry":
                r["spec"]["exportTo"] = ["."]
            elif r["kind"] == "Service":
                r["metadata"].setdefault("annotations", {})["networking.istio.io/exportTo"] = "."
        out.append(r)
    return out


def without_guards(resources):
    """meshllm's EnvoyFilter without the routes that refuse what cannot reach
    its clusters: what the install did before (issue 19)."""
    guards = {manifests.ROUTE_MISSING, manifests.HOST_NOT_IN_MESH}
    out = []
    for r in resources:
        if r["kind"] == "EnvoyFilter":
            r = json.loads(json.dumps(r))
            r["spec"]["configPatches"] = [p for p in r["spec"]["configPatches"]
                                          if (p["patch"].get("value") or {}).get("name") not in guards]
        out.append(r)
    return out


LLM_ONLY = {"app": "chatbot", manifests.OPT_IN_LABEL: manifests.OPT_IN_VALUE}


def post(proxy, host, path, payload):
    return http("POST", f"http://127.0.0.1:{proxy['port']}{path}", payload,
                headers={"host": host, "authorization": "Bearer app-has-no-key"})


def anthropic_body(model="claude"):
    return {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]}


GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}


def assert_refused(status, body, shape, code, says):
    """A 503 in the caller's API shape that says why."""
    assert status == 503, body
    doc = json.loads(body)
    if shape == "anthropic":
        assert doc["type"] == "error" and says in doc["error"]["message"], doc
    elif shape == "gemini":
        assert doc["error"]["code"] == 503 and doc["error"]["status"] == "UNAVAILABLE", doc
        assert says in doc["error"]["message"], doc
    else:
        assert says in doc["error"]["message"], doc
        assert doc["error"]["code"] in code, doc


@pytest.fixture
def passthrough(mocks):
    """Whatever PassthroughCluster would reach (the provider's own address
    on port 80, in clear text): it must receive nothing."""
    from mock_provider import MockProvider

    recorder = MockProvider(label="passthrough").start()
    yield recorder
    recorder.stop()


@pytest.mark.parametrize("hidden", ["no ServiceEntry", "Sidecar scope", "Sidecar scope, REGISTRY_ONLY",
                                    "exportTo"])
def test_sidecar_without_the_providers_route_sends_nothing(hidden, wasm, mocks, passthrough, tmp_path):
    resources = overlay("sidecar")
    if hidden == "no ServiceEntry":
        # OpenAI's and Anthropic's not (yet) applied; Gemini's and the alias are.
        resources = drop(resources, "ServiceEntry", "api-openai-com", "api-anthropic-com")
    elif hidden == "Sidecar scope":
        resources += sim.load_resources(SIDECAR_SCOPE)
    elif hidden == "Sidecar scope, REGISTRY_ONLY":
        # Istio's catch-all is then block_all (a 502 of its own).
        resources += sim.load_resources(SIDECAR_SCOPE + "  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n")
    else:
        resources = exported_to_own_namespace(resources)
    addresses = {p: ("127.0.0.1", mocks[p].port) for p in HOSTS}
    with istio_proxy("sidecar", tmp_path, "shop", LLM_ONLY, addresses, resources=resources,
                     passthrough=("127.0.0.1", passthrough.port)) as proxy:
        says = "not sent"
        status, _, body = post(proxy, "api.openai.com", "/v1/chat/completions", chat_body("mini"))
        assert_refused(status, body, "openai", ("provider_unavailable",), says)
        status, _, body = post(proxy, "api.anthropic.com", "/v1/messages", anthropic_body())
        assert_refused(status, body, "anthropic", (), says)
        if hidden == "no ServiceEntry":
            # The alias is routed, and meshllm attaches Anthropic's key for
            # its one target; the request steered to api.anthropic.com then
            # finds no route of meshllm's and is refused, key and all.
            status, _, body = post(proxy, "llm.meshllm", "/v1/chat/completions", chat_body("claude"))
            assert_refused(status, body, "openai", ("provider_unavailable",), says)
            # A provider this proxy does see is served through the alias.
            status, h, body = post(proxy, "llm.meshllm", "/v1/chat/completions", chat_body("gemini"))
            assert status == 200, body
            assert h["x-meshllm-provider"] == "gemini" and mocks["gemini"].take()
        else:
            status, _, body = post(proxy, "generativelanguage.googleapis.com",
                                   "/v1beta/models/gemini-flash:generateContent", GEMINI_BODY)
            assert_refused(status, body, "gemini", (), says)
    assert passthrough.take() == []
    assert mocks["openai"].take() == [] and mocks["anthropic"].take() == []


def test_without_the_guards_the_key_leaves_in_clear_text(wasm, mocks, passthrough, tmp_path):
    """The emulator reproduces what issue 19 found, so the test above is no
    vacuous pass: without meshllm's guard routes, a request meshllm steered
    to a provider the proxy has no route for leaves on PassthroughCluster
    with the real key."""
    resources = without_guards(drop(overlay("sidecar"), "ServiceEntry", "api-anthropic-com"))
    addresses = {p: ("127.0.0.1", mocks[p].port) for p in HOSTS}
    with istio_proxy("sidecar", tmp_path, "shop", LLM_ONLY, addresses, resources=resources,
                     passthrough=("127.0.0.1", passthrough.port)) as proxy:
        post(proxy, "llm.meshllm", "/v1/chat/completions", chat_body("claude"))
    (leaked,) = passthrough.take()
    assert leaked["headers"]["x-api-key"] == KEYS["ANTHROPIC_API_KEY"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from test_quotas import make_pki

    workdir = tmp_path_factory.mktemp("pki")
    pki = make_pki(str(workdir))
    pki["mesh_tls"] = {"cert": pki["server"][0], "key": pki["server"][1], "ca": pki["ca"]}
    return pki


def test_gateway_mode_sidecar_without_the_gateways_route_sends_nothing(wasm, mocks, passthrough, pki,
                                                                       tmp_path):
    """Egress-gateway mode: a sidecar whose Sidecar resource hides the
    meshllm namespace has no route to the gateway for the LLM hosts; the
    guard every sidecar carries refuses them in the caller's shape instead
    of Istio's PassthroughCluster sending them out in clear text."""
    app = {"app": "chatbot"}  # gateway mode needs nothing on the pod
    visible, _, _ = istio_config("egress-gateway", tmp_path / "visible", "shop", app, {},
                                 mesh_tls=pki["mesh_tls"], as_sidecar=True)
    vhosts = {v["name"]: v for v in listener_vhosts(visible)}
    assert vhosts["api.openai.com:80"]["routes"][0]["route"]["cluster"] == f"outbound|80||{manifests.GATEWAY_HOST}"
    # The alias's short names reach the gateway under its full name.
    alias = vhosts[f"{manifests.ALIAS_HOST}:80"]
    assert "llm.meshllm" in alias["domains"]
    assert alias["routes"][0]["route"]["host_rewrite_literal"] == manifests.ALIAS_HOST
    with istio_proxy("egress-gateway", tmp_path, "shop", app, {}, extra=sim.load_resources(SIDECAR_SCOPE),
                     mesh_tls=pki["mesh_tls"], as_sidecar=True,
                     passthrough=("127.0.0.1", passthrough.port)) as proxy:
        says = "not sent"
        status, _, body = post(proxy, "api.openai.com", "/v1/chat/completions", chat_body("mini"))
        assert_refused(status, body, "openai", ("no_gateway_route",), says)
        status, _, body = post(proxy, "api.anthropic.com:80", "/v1/messages", anthropic_body())
        assert_refused(status, body, "anthropic", (), says)
        status, _, body = post(proxy, "generativelanguage.googleapis.com",
                               "/v1beta/models/gemini-flash:generateContent", GEMINI_BODY)
        assert_refused(status, body, "gemini", (), says)
        # Other hosts still go where Istio sends them.
        post(proxy, "elsewhere.example", "/", {"a": 1})
    (other,) = passthrough.take()
    assert other["headers"]["host"] == "elsewhere.example"


def listener_vhosts(bootstrap):
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["route_config"]["virtual_hosts"]


def test_gateway_without_a_hosts_virtual_service_sends_nothing(wasm, mocks, pki, tmp_path):
    resources = drop(overlay("egress-gateway"), "VirtualService", f"{manifests.GATEWAY}-api-anthropic-com")
    addresses = {p: ("127.0.0.1", mocks[p].port) for p in HOSTS}
    with istio_proxy("egress-gateway", tmp_path, manifests.NAMESPACE, GATEWAY_LABELS, addresses,
                     resources=resources, mesh_tls=pki["mesh_tls"]) as proxy:
        proxy["pki"] = pki
        status, _, body = mtls_post(proxy, "shop/chatbot", "api.anthropic.com", chat_body("claude"))
        assert_refused(status, body, "openai", ("no_gateway_route",), "not sent")
        # Through the alias meshllm routes it, and its request to Anthropic
        # finds no route at the gateway.
        status, _, body = mtls_post(proxy, "shop/chatbot", manifests.ALIAS_HOST, chat_body("claude"))
        assert_refused(status, body, "openai", ("provider_unavailable",), "not sent")
    assert mocks["anthropic"].take() == []


# --- the module missing or broken: LLM hosts fail closed, nothing else (item 4)


@pytest.mark.parametrize("module", ["missing", "broken"])
def test_sidecar_without_its_module_fails_closed_on_llm_hosts_only(module, wasm, mocks, passthrough, tmp_path):
    """As the checked-in overlays are (their module URL is a placeholder
    that never resolves), or with a module Envoy cannot load: the agent
    substitutes a deny-all RBAC filter (missing) or Envoy refuses the config
    (broken); either way only meshllm's routes are affected, and they answer
    503 in the caller's shape."""
    other = sim.load_resources("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: inventory, namespace: shop}
spec:
  hosts: [inventory.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
""")
    if module == "missing":
        modules = None  # no registry answers
    else:
        modules = tmp_path / "broken.wasm"
        modules.write_bytes(b"\0asm" + b"\x01\x00\x00\x00" + b"not a module")
    agent_log = []
    addresses = {p: ("127.0.0.1", mocks[p].port) for p in HOSTS}
    with istio_proxy("sidecar", tmp_path, "shop", LLM_ONLY, addresses, extra=other,
                     modules=str(modules) if modules else {}, agent_log=agent_log,
                     other_endpoints={"inventory.example.com": ("127.0.0.1", mocks["groq"].port)},
                     passthrough=("127.0.0.1", passthrough.port)) as proxy:
        # The pod's other traffic: as Istio alone would send it.
        status, _, body = post(proxy, "inventory.example.com", "/v1/chat/completions", {"any": "thing"})
        assert status == 200, body
        (sent,) = mocks["groq"].take()
        assert sent["headers"]["authorization"] == "Bearer app-has-no-key"
        # Unknown hosts too.
        post(proxy, "elsewhere.example", "/", {"a": 1})
        assert [r["headers"]["host"] for r in passthrough.take()] == ["elsewhere.example"]
        says = "meshllm is not running in this proxy"
        status, _, body = post(proxy, "api.openai.com", "/v1/chat/completions", chat_body("mini"))
        assert_refused(status, body, "openai", ("meshllm_unavailable",), says)
        status, _, body = post(proxy, "llm.meshllm", "/v1/messages", anthropic_body())
        assert_refused(status, body, "anthropic", (), says)
        status, _, body = post(proxy, "generativelanguage.googleapis.com",
                               "/v1beta/models/gemini-flash:generateContent", GEMINI_BODY)
        assert_refused(status, body, "gemini", (), says)
    assert not any(mocks[p].take() for p in HOSTS)
    assert passthrough.take() == []
    if module == "missing":
        assert len(agent_log) == 2 and all("applying deny RBAC filter" in m for m in agent_log)
        assert manifests.PLACEHOLDER_MODULE_URL in agent_log[0]
    else:
        assert "rejected" in proxy["log"].read_text()


def test_gateway_without_its_module_fails_closed(wasm, mocks, pki, tmp_path):
    addresses = {p: ("127.0.0.1", mocks[p].port) for p in HOSTS}
    with istio_proxy("egress-gateway", tmp_path, manifests.NAMESPACE, GATEWAY_LABELS, addresses,
                     mesh_tls=pki["mesh_tls"], modules={}) as proxy:
        proxy["pki"] = pki
        status, _, body = mtls_post(proxy, "shop/chatbot", "api.openai.com", chat_body("mini"))
        assert_refused(status, body, "openai", ("meshllm_unavailable",), "module could not be fetched")
    assert not any(mocks[p].take() for p in HOSTS)


def test_pods_without_the_label_are_not_touched():
    """Sidecar mode is opt-in: a pod without the label gets none of meshllm's
    patches (its LLM calls are Istio's plain egress, TLS by the
    DestinationRules)."""
    resources = overlay("sidecar")
    filters = [r for r in resources if r["kind"] == "EnvoyFilter"]
    kw = dict(namespace="shop", port=1, admin_port=2, endpoints={})
    for labels, touched in (({"app": "chatbot"}, False), (LLM_ONLY, True)):
        istio = sim.sidecar_bootstrap(resources, labels=labels, **kw)
        b, ext = sim.apply_envoy_filters(istio, filters, context="SIDECAR_OUTBOUND", namespace="shop",
                                         labels=labels)
        assert (b != istio) is touched and bool(ext) is touched


def test_checked_in_overlays_cannot_be_applied_by_mistake(tmp_path):
    """Generating manifests for a cluster needs the module's URL; the
    checked-in copy names a host that never resolves (RFC 2606 .invalid)."""
    with pytest.raises(SystemExit):
        manifests.main(["--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())
    assert manifests.PLACEHOLDER_MODULE_URL.split("/")[2].endswith(".invalid")
    remote = envoy_filter("sidecar")["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["config"][
        "vm_config"]["code"]["remote"]
    assert remote["http_uri"]["uri"] == manifests.PLACEHOLDER_MODULE_URL


# --- bodies above 1 MiB (item 2) ----------------------------------------------


def big_prompt(model, size=2 * 1024 * 1024):
    """A vision-style request: a 2 MB base64 image in the prompt."""
    image = "A" * size
    return {"model": model, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}]}


def roomy_overlay(mode):
    """The overlay for mesh.json with room for a 2 MB prompt in its token
    rate (quotas reserve a byte-based estimate, about 525,000 tokens here,
    against the policy's 400,000 a minute)."""
    policy = manifests.load_policy()
    for rule in policy["quotas"]["limits"]:
        if "tokens_per_minute" in rule:
            rule["tokens_per_minute"] = 10_000_000
    out = manifests.base_resources(policy)
    if mode == "sidecar":
        out += manifests.sidecar_resources(
            policy, manifests.WasmBuild(manifests.PLACEHOLDER_MODULE_URL, None))
    else:
        out += manifests.gateway_resources(
            policy, manifests.WasmBuild(manifests.PLACEHOLDER_MODULE_URL, None))
    return sim.load_resources(manifests.dump(out))


def without_listener_patches(resources):
    out = []
    for r in resources:
        if r["kind"] == "EnvoyFilter":
            r = json.loads(json.dumps(r))
            r["spec"]["configPatches"] = [p for p in r["spec"]["configPatches"] if p["applyTo"] != "LISTENER"]
        out.append(r)
    return out


@pytest.mark.parametrize("istio_defaults", [False, True])
def test_sidecar_carries_a_2mb_prompt(istio_defaults, wasm, mocks, tmp_path):
    """With meshllm's buffer limits a 2 MB prompt goes through; with Istio's
    defaults (none set, as the emulator models istiod: Envoy's 1 MiB) the
    proxy refuses it before meshllm has it whole."""
    resources = roomy_overlay("sidecar")
    if istio_defaults:
        resources = without_listener_patches(resources)
    addresses = {p: ("127.0.0.1", mocks[p].port) for p in HOSTS}
    with istio_proxy("sidecar", tmp_path, "shop", LLM_ONLY, addresses, resources=resources) as proxy:
        status, _, body = post(proxy, "api.openai.com", "/v1/chat/completions", big_prompt("mini"))
    if istio_defaults:
        assert status == 413, body[:300]
        assert mocks["openai"].take() == []
    else:
        assert status == 200, body[:300]
        (sent,) = mocks["openai"].take()
        assert len(sent["body"]) > 2 * 1024 * 1024


def test_gateway_carries_a_2mb_prompt(wasm, mocks, pki, tmp_path):
    addresses = {p: ("127.0.0.1", mocks[p].port) for p in HOSTS}
    with istio_proxy("egress-gateway", tmp_path, manifests.NAMESPACE, GATEWAY_LABELS, addresses,
                     resources=roomy_overlay("egress-gateway"), mesh_tls=pki["mesh_tls"]) as proxy:
        proxy["pki"] = pki
        # Translated for Anthropic on the way.
        status, _, body = mtls_post(proxy, "shop/chatbot", "api.anthropic.com", big_prompt("claude"))
    assert status == 200, body[:300]
    (sent,) = mocks["anthropic"].take()
    assert len(sent["body"]) > 2 * 1024 * 1024


@pytest.mark.parametrize("mode", OVERLAYS)
def test_buffer_limits_are_above_the_filters_own(mode):
    limit = manifests.load_policy().get("max_request_bytes", 10 * 1024 * 1024)
    patches = envoy_filter(mode)["spec"]["configPatches"]
    (lis,) = [p for p in patches if p["applyTo"] == "LISTENER"]
    assert lis["patch"]["value"]["per_connection_buffer_limit_bytes"] > limit
    clusters = [p["patch"]["value"] for p in patches if p["applyTo"] == "CLUSTER"]
    assert len(clusters) == 4
    assert all(c["per_connection_buffer_limit_bytes"] > limit for c in clusters)


# --- circuit breakers (item 3) ---------------------------------------------------


@pytest.mark.parametrize("mode", OVERLAYS)
def test_meshllm_clusters_carry_deliberate_circuit_breakers(mode):
    """Like Istio's own clusters (MaxUint32, which istio_sim models), not
    Envoy's default of 3 concurrent retries."""
    for p in envoy_filter(mode)["spec"]["configPatches"]:
        if p["applyTo"] == "CLUSTER":
            for t in p["patch"]["value"]["circuit_breakers"]["thresholds"]:
                assert t["max_retries"] == t["max_requests"] == t["max_pending_requests"] == 2 ** 32 - 1


# --- no pod metadata to providers (item 5) ---------------------------------------


@pytest.mark.parametrize("mode", OVERLAYS)
def test_metadata_exchange_runs_before_meshllm_which_runs_only_where_enabled(mode, pki, tmp_path):
    """Istio puts its metadata exchange first; meshllm goes in just before
    the router, so its entrance strips what the exchange added (x-envoy-*),
    and meshllm's route removes it again with the caller's certificate and
    address. Both listener filters are off unless a route turns them on."""
    labels = LLM_ONLY if mode == "sidecar" else GATEWAY_LABELS
    ns = "shop" if mode == "sidecar" else manifests.NAMESPACE
    b, _, _ = istio_config(mode, tmp_path, ns, labels, {p: ("127.0.0.1", 1) for p in HOSTS},
                           mesh_tls=pki["mesh_tls"])
    hcm = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names[0] == sim.MX_FILTER
    assert names[-3:] == ["meshllm", manifests.POSITIONS_FILTER, "envoy.filters.http.router"]
    meshllm, positions = hcm["http_filters"][-3:-1]
    assert meshllm["disabled"] and positions["disabled"]
    assert meshllm["config_discovery"]["type_urls"] == [sim.WASM_TYPE, sim.RBAC_TYPE]
    for vhost in hcm["route_config"]["virtual_hosts"]:
        enabled = set(vhost.get("typed_per_filter_config", {}))
        handled = vhost["name"] in manifests.handled_vhosts(manifests.load_policy())
        assert (enabled == {"meshllm", manifests.POSITIONS_FILTER}) is handled
        if handled:
            routed = vhost["routes"][0]
            assert routed["name"] == "meshllm"
            assert IDENTITY_HEADERS <= set(routed["request_headers_to_remove"])


def test_the_example_app_opts_in():
    docs = sim.load_resources(str(ROOT / "k8s" / "examples" / "sidecar-app" / "app.yaml"))
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    selector = envoy_filter("sidecar")["spec"]["workloadSelector"]["labels"]
    assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()


# --- an egress gateway a platform team can run (item 7) --------------------------


def test_gateway_survives_a_drain_and_a_rollout():
    docs = load("overlays/egress-gateway/gateway.yaml")
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    (budget,) = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    spec = dep["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    (proxy,) = spec["template"]["spec"]["containers"]
    assert set(proxy["resources"]) == {"requests", "limits"}
    probe = proxy["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/healthz/ready", 15021)
