"""The Istio emulator (tests/istio_sim.py): names, selection and order of
EnvoyFilters, every supported patch operation, strictness, the agent's ECDS
and Wasm rewrite, and the generated configs in a real Envoy."""

import base64
import copy
import hashlib
import json
import os
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

import istio_sim as sim
from conftest import envoy_binary, free_port, http

pytestmark = pytest.mark.wasm_only(
    "the Istio simulation models WasmPlugin, the agent's Wasm fetch and ECDS")

NS = "app"
LABELS = {"app": "client", "version": "v1"}
GW_LABELS = {"istio": "egressgateway", "app": "istio-egressgateway"}
MESH_TLS = None  # filled by the mesh_tls fixture


# --------------------------------------------------------------------------
# Fixtures and helpers

BASE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: openai, namespace: app}
spec:
  hosts: [api.openai.com]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 443, name: https, protocol: HTTPS}
  resolution: DNS
  location: MESH_EXTERNAL
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: app}
spec:
  clusterIP: 10.0.0.7
  ports: [{name: http, port: 80, targetPort: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: other}
spec:
  ports: [{name: http-web, port: 80}, {name: tcp-db, port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: istio-egressgateway, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  ports: [{name: http2, port: 80, targetPort: 8080}, {name: https, port: 443, targetPort: 8443}]
"""

EGRESS = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: egress, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [api.openai.com]
    tls: {mode: ISTIO_MUTUAL}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: egress, namespace: istio-system}
spec:
  host: istio-egressgateway.istio-system.svc.cluster.local
  subsets:
  - name: openai
    trafficPolicy:
      portLevelSettings:
      - port: {number: 443}
        tls: {mode: ISTIO_MUTUAL, sni: api.openai.com}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: openai, namespace: istio-system}
spec:
  host: api.openai.com
  trafficPolicy:
    portLevelSettings:
    - port: {number: 443}
      tls: {mode: SIMPLE, sni: api.openai.com}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: openai, namespace: istio-system}
spec:
  hosts: [api.openai.com]
  gateways: [mesh, egress]
  http:
  - name: to-egress
    match: [{gateways: [mesh], port: 80}]
    route:
    - destination: {host: istio-egressgateway.istio-system.svc.cluster.local, subset: openai, port: {number: 443}}
  - name: to-openai
    match: [{gateways: [egress], port: 443}]
    route:
    - destination: {host: api.openai.com, port: {number: 443}}
"""


@pytest.fixture(scope="session")
def mesh_tls(tmp_path_factory):
    d = tmp_path_factory.mktemp("mesh-tls")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=sim",
                    "-addext", "subjectAltName=URI:spiffe://cluster.local/ns/app/sa/client"],
                   check=True, capture_output=True)
    return {"cert": str(cert), "key": str(key), "ca": str(cert)}


def validate(bootstrap):
    """`envoy --mode validate` on the bootstrap; fails the test if Envoy rejects it."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(bootstrap, f)
    try:
        r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", f.name, "-l", "error"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    finally:
        os.unlink(f.name)
    return bootstrap


def sidecar(extra="", endpoints=None, **kw):
    res = sim.load_resources(BASE + ("---\n" + extra if extra else ""))
    return sim.sidecar_bootstrap(res, namespace=NS, labels=LABELS, port=free_port(), admin_port=free_port(),
                                 endpoints=endpoints or {"api.openai.com": ("127.0.0.1", 1)}, **kw)


def gateway(extra, mesh_tls=None):
    res = sim.load_resources(BASE + "---\n" + extra)
    return sim.gateway_bootstrap(res, namespace="istio-system", labels=GW_LABELS, port=free_port(),
                                 admin_port=free_port(), endpoints={}, mesh_tls=mesh_tls)


def listener(b, i=0):
    return b["static_resources"]["listeners"][i]


def hcm(b, i=0):
    return listener(b, i)["filter_chains"][0]["filters"][0]["typed_config"]


def vhosts(b):
    return {v["name"]: v for v in hcm(b)["route_config"]["virtual_hosts"]}


def clusters(b):
    return {c["name"]: c for c in b["static_resources"]["clusters"]}


def filter_names(b):
    return [f["name"] for f in hcm(b)["http_filters"]]


def ef(name, patches, ns="istio-system", priority=None, selector=None):
    spec = {"configPatches": patches}
    if priority is not None:
        spec["priority"] = priority
    if selector is not None:
        spec["workloadSelector"] = {"labels": selector}
    return {"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def lua_free_filter(tag):
    """A header-adding filter of vanilla Envoy (header_mutation)."""
    return {"name": f"add-{tag}", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        "mutations": {"request_mutations": [{"append": {"header": {"key": "x-sim", "value": tag}}}]}}}


def insert_before_router(tag, **match):
    m = {"context": "SIDECAR_OUTBOUND", "listener": {"filterChain": {"filter": {
        "name": sim.HCM_NAME, "subFilter": {"name": "envoy.filters.http.router"}}}}}
    m.update(match)
    return {"applyTo": "HTTP_FILTER", "match": m, "patch": {"operation": "INSERT_BEFORE", "value": lua_free_filter(tag)}}


def patched(b, efs, context="SIDECAR_OUTBOUND", ns=NS, labels=LABELS):
    out, ext = sim.apply_envoy_filters(b, efs, context=context, namespace=ns, labels=labels)
    return out, ext


# --------------------------------------------------------------------------
# Loading


def test_load_resources_multi_doc_files_and_split(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(BASE + "---\n# empty\n---\napiVersion: v1\nkind: List\nitems:\n- {kind: Gateway, metadata: {name: g}}\n")
    res = sim.load_resources(str(p), EGRESS)
    kinds = sim.split_kinds(res)
    assert [len(kinds[k]) for k in ("ServiceEntry", "Service", "Gateway", "DestinationRule", "VirtualService")] \
        == [1, 3, 2, 2, 1]
    with pytest.raises(sim.IstioSimError):
        sim.load_resources("- just a list\n- of things\n")


# --------------------------------------------------------------------------
# Sidecar naming


def test_sidecar_listener_route_config_node():
    b = validate(sidecar(node_metadata={"ISTIO_VERSION": "1.30.3"}))
    lis = listener(b)
    assert lis["name"] == "0.0.0.0_80" and lis["address"]["socket_address"]["address"] == "127.0.0.1"
    h = hcm(b)
    assert h["stat_prefix"] == "outbound_0.0.0.0_80"
    assert h["route_config"]["name"] == "80" and h["route_config"]["ignore_port_in_host_matching"] is True
    # The metadata exchange filter first (its Lua stand-in), as istiod orders them.
    assert filter_names(b) == ["istio.metadata_exchange", "envoy.filters.http.grpc_stats",
                               "envoy.filters.http.fault", "envoy.filters.http.cors", "envoy.filters.http.router"]
    node = b["node"]
    assert node["id"] == "sidecar~127.0.0.1~client-0.app~app.svc.cluster.local"
    assert node["cluster"] == "client.app"
    md = node["metadata"]
    assert (md["NAMESPACE"], md["LABELS"], md["WORKLOAD_NAME"], md["CLUSTER_ID"], md["ISTIO_VERSION"]) == \
        ("app", LABELS, "client", "Kubernetes", "1.30.3")


@pytest.mark.parametrize("name,domains,cluster", [
    ("api.openai.com:80", ["api.openai.com", "api.openai.com."], "outbound|80||api.openai.com"),
    # Same namespace: all short names, plus the cluster IP.
    ("reviews.app.svc.cluster.local:80",
     ["reviews.app.svc.cluster.local", "reviews.app.svc.cluster.local.", "reviews", "reviews.app.svc",
      "reviews.app", "10.0.0.7"], "outbound|80||reviews.app.svc.cluster.local"),
    # Another namespace: name.ns and name.ns.svc only.
    ("ratings.other.svc.cluster.local:80",
     ["ratings.other.svc.cluster.local", "ratings.other.svc.cluster.local.", "ratings.other",
      "ratings.other.svc"], "outbound|80||ratings.other.svc.cluster.local"),
])
def test_sidecar_vhost_names_domains_default_route(name, domains, cluster):
    b = sidecar()
    vh = vhosts(b)[name]
    assert vh["domains"] == domains
    (route,) = vh["routes"]
    assert route["name"] == "default" and route["route"]["cluster"] == cluster
    assert route["route"]["retry_policy"]["num_retries"] == 2
    assert route["decorator"]["operation"] == name + "/*"


def test_sidecar_vhost_order_allow_any_last_and_clusters():
    b = sidecar()
    names = [v["name"] for v in hcm(b)["route_config"]["virtual_hosts"]]
    assert names[-1] == "allow_any" and names[:-1] == sorted(names[:-1])
    allow = vhosts(b)["allow_any"]
    assert allow["domains"] == ["*"] and allow["routes"][0]["route"]["cluster"] == "PassthroughCluster"
    cs = clusters(b)
    # Every port of every service, not only port 80; the TCP port too.
    for n in ("outbound|443||api.openai.com", "outbound|5432||ratings.other.svc.cluster.local",
              "outbound|443||istio-egressgateway.istio-system.svc.cluster.local",
              "BlackHoleCluster", "PassthroughCluster"):
        assert n in cs
    ep = cs["outbound|80||api.openai.com"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert ep["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 1}
    assert cs["outbound|80||reviews.app.svc.cluster.local"]["load_assignment"]["endpoints"] == []


def test_sidecar_virtual_service_routes_to_egress_subset_with_istio_mtls(mesh_tls):
    b = validate(sidecar(EGRESS, mesh_tls=mesh_tls))
    (route,) = vhosts(b)["api.openai.com:80"]["routes"]
    assert route["name"] == "to-egress"
    assert route["route"]["cluster"] == "outbound|443|openai|istio-egressgateway.istio-system.svc.cluster.local"
    assert route["metadata"]["filter_metadata"]["istio"]["config"] == \
        "/apis/networking.istio.io/v1/namespaces/istio-system/virtual-service/openai"
    cs = clusters(b)
    tls = cs["outbound|443|openai|istio-egressgateway.istio-system.svc.cluster.local"]["transport_socket"]
    ctx = tls["typed_config"]
    assert ctx["sni"] == "api.openai.com"
    assert ctx["common_tls_context"]["tls_certificates"][0]["certificate_chain"]["filename"] == mesh_tls["cert"]
    assert ctx["common_tls_context"]["alpn_protocols"] == ["istio-peer-exchange", "istio"]
    # Port-level settings apply to their port only; the plain subset cluster has no TLS.
    assert "transport_socket" not in cs["outbound|80|openai|istio-egressgateway.istio-system.svc.cluster.local"]
    simple = cs["outbound|443||api.openai.com"]["transport_socket"]["typed_config"]
    assert simple["sni"] == "api.openai.com"
    assert simple["common_tls_context"]["validation_context"]["trusted_ca"]["filename"] == sim.SYSTEM_CA


def test_sidecar_istio_mutual_needs_mesh_tls():
    with pytest.raises(sim.IstioSimError, match="mesh_tls"):
        sidecar(EGRESS)


def sidecar_resource(hosts, ns="app", selector=None, outbound=None):
    spec = {"egress": [{"hosts": hosts}]}
    if selector:
        spec["workloadSelector"] = {"labels": selector}
    if outbound:
        spec["outboundTrafficPolicy"] = {"mode": outbound}
    return yaml.safe_dump({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
                           "metadata": {"name": f"s-{len(hosts)}", "namespace": ns}, "spec": spec})


SERVICE_VHOSTS = {"api.openai.com:80", "reviews.app.svc.cluster.local:80", "ratings.other.svc.cluster.local:80",
                  "istio-egressgateway.istio-system.svc.cluster.local:80"}


@pytest.mark.parametrize("hosts,visible", [
    (["*/*"], SERVICE_VHOSTS),
    (["./*"], {"api.openai.com:80", "reviews.app.svc.cluster.local:80"}),
    (["./reviews.app.svc.cluster.local"], {"reviews.app.svc.cluster.local:80"}),
    (["other/*", "istio-system/*"], {"ratings.other.svc.cluster.local:80",
                                     "istio-egressgateway.istio-system.svc.cluster.local:80"}),
    (["*/api.openai.com"], {"api.openai.com:80"}),
    (["*/*.svc.cluster.local"], SERVICE_VHOSTS - {"api.openai.com:80"}),
    (["~/*"], set()),
])
def test_sidecar_resource_scopes_what_the_proxy_sees(hosts, visible):
    """pilot/pkg/model/sidecar.go: egress hosts import services by
    namespace/host; the catch-all virtual host stays."""
    b = sidecar(sidecar_resource(hosts))
    assert set(vhosts(b)) - {"allow_any"} == visible
    assert list(vhosts(b))[-1] == "allow_any"
    cs = clusters(b)
    assert ("outbound|80||api.openai.com" in cs) is ("api.openai.com:80" in visible)


def test_sidecar_resource_selection_and_root_default():
    """PushContext.getSidecarScope: a selector that matches wins over the
    namespace's default; the root namespace's applies to namespaces
    without their own; other namespaces' do not apply."""
    wide, narrow = sidecar_resource(["*/*"]), sidecar_resource(["./*"], selector={"app": "client"})
    assert set(vhosts(sidecar(narrow + "---\n" + wide))) == {"api.openai.com:80", "reviews.app.svc.cluster.local:80",
                                                                "allow_any"}
    other = sidecar_resource(["./*"], selector={"app": "someone-else"})
    assert set(vhosts(sidecar(other + "---\n" + sidecar_resource(["~/*"])))) == {"allow_any"}
    root = sidecar_resource(["istio-system/*"], ns="istio-system")
    assert set(vhosts(sidecar(root))) == {"istio-egressgateway.istio-system.svc.cluster.local:80", "allow_any"}
    assert set(vhosts(sidecar(sidecar_resource(["~/*"], ns="other")))) == SERVICE_VHOSTS | {"allow_any"}


def test_sidecar_resource_imports_virtual_services_and_their_destinations(mesh_tls):
    """A VirtualService in an imported namespace brings its routes, and the
    services it routes to (collectImportedServices), even when the
    Sidecar's hosts do not name them."""
    b = sidecar(EGRESS + "---\n" + sidecar_resource(["istio-system/*"]), mesh_tls=mesh_tls)
    (route,) = vhosts(b)["api.openai.com:80"]["routes"]
    assert route["route"]["cluster"] == "outbound|443|openai|istio-egressgateway.istio-system.svc.cluster.local"
    assert "outbound|80||api.openai.com" in clusters(b)
    hidden = sidecar(EGRESS + "---\n" + sidecar_resource(["./reviews.app.svc.cluster.local"]), mesh_tls=mesh_tls)
    assert "api.openai.com:80" not in vhosts(hidden)


def test_export_to_hides_a_service_from_other_namespaces():
    narrowed = BASE.replace("  location: MESH_EXTERNAL\n", "  location: MESH_EXTERNAL\n  exportTo: [.]\n")
    res = sim.load_resources(narrowed)
    kw = dict(labels=LABELS, port=1, admin_port=2, endpoints={})
    assert "api.openai.com:80" in vhosts(sim.sidecar_bootstrap(res, namespace="app", **kw))
    assert "api.openai.com:80" not in vhosts(sim.sidecar_bootstrap(res, namespace="other", **kw))


@pytest.mark.parametrize("mesh,sidecar_mode,catch_all", [
    ("ALLOW_ANY", None, "allow_any"),
    ("REGISTRY_ONLY", None, "block_all"),
    ("ALLOW_ANY", "REGISTRY_ONLY", "block_all"),
    ("REGISTRY_ONLY", "ALLOW_ANY", "allow_any"),
])
def test_outbound_traffic_policy_picks_the_catch_all(mesh, sidecar_mode, catch_all):
    """buildCatchAllVirtualHost: PassthroughCluster, or a 502 of its own."""
    extra = sidecar_resource(["*/*"], outbound=sidecar_mode) if sidecar_mode else ""
    b = validate(sidecar(extra, outbound_traffic_policy=mesh))
    last = hcm(b)["route_config"]["virtual_hosts"][-1]
    assert last["name"] == catch_all and last["domains"] == ["*"]
    (route,) = last["routes"]
    if catch_all == "allow_any":
        assert route["route"]["cluster"] == "PassthroughCluster"
    else:
        assert route["direct_response"] == {"status": 502}


def test_istio_clusters_lift_envoys_circuit_breakers_and_mark_external_services():
    """getDefaultCircuitBreakerThresholds: MaxUint32 on every cluster
    istiod builds, PassthroughCluster too; MESH_EXTERNAL ServiceEntries'
    clusters carry istio.external; no buffer limit anywhere (Envoy's 1 MiB)."""
    b = sidecar(passthrough=("127.0.0.1", 9))
    cs = clusters(b)
    for name in ("outbound|80||api.openai.com", "outbound|80||reviews.app.svc.cluster.local", "PassthroughCluster"):
        (t,) = cs[name]["circuit_breakers"]["thresholds"]
        assert t["max_retries"] == t["max_requests"] == t["max_connections"] == 2 ** 32 - 1
    assert cs["outbound|80||api.openai.com"]["metadata"]["filter_metadata"]["istio"]["external"] is True
    assert "external" not in cs["outbound|80||reviews.app.svc.cluster.local"]["metadata"]["filter_metadata"]["istio"]
    ep = cs["PassthroughCluster"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert ep["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9}
    assert "per_connection_buffer_limit_bytes" not in json.dumps(b)


DR_NO_SNI = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: app}
spec:
  host: reviews
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}, loadBalancer: {simple: ROUND_ROBIN}}
  subsets: [{name: v2, labels: {version: v2}, trafficPolicy: {tls: {mode: SIMPLE}}}]
"""


def test_destination_rule_default_sni_subsets_and_auto_sni(mesh_tls):
    b = validate(sidecar(DR_NO_SNI, mesh_tls=mesh_tls))
    cs = clusters(b)
    base = cs["outbound|80||reviews.app.svc.cluster.local"]
    assert base["lb_policy"] == "ROUND_ROBIN"
    assert base["transport_socket"]["typed_config"]["sni"] == "outbound_.80_._.reviews.app.svc.cluster.local"
    v2 = cs["outbound|80|v2|reviews.app.svc.cluster.local"]
    assert "sni" not in v2["transport_socket"]["typed_config"]
    upstream = v2["typed_extension_protocol_options"][sim.HTTP_OPTIONS_KEY]["upstream_http_protocol_options"]
    assert upstream == {"auto_sni": True, "auto_san_validation": True}


DR_POOL = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: app}
spec:
  host: reviews.app.svc.cluster.local
  trafficPolicy:
    connectionPool: {tcp: {connectTimeout: 200ms}, http: {idleTimeout: 60s}}
    portLevelSettings:
    - port: {number: 80}
      connectionPool: {tcp: {connectTimeout: 1.5s}}
"""


def test_destination_rule_connection_pool_timeouts():
    cs = clusters(validate(sidecar(DR_POOL)))
    base = cs["outbound|80||reviews.app.svc.cluster.local"]
    # The port's settings replace the top level's connectionPool whole.
    assert base["connect_timeout"] == "1.500s"
    assert "typed_extension_protocol_options" not in base
    pooled = clusters(validate(sidecar(DR_POOL.split("    portLevelSettings:")[0])))["outbound|80||reviews.app.svc.cluster.local"]
    assert pooled["connect_timeout"] == "0.200s"
    assert pooled["typed_extension_protocol_options"][sim.HTTP_OPTIONS_KEY] == {
        "@type": sim.HTTP_OPTIONS_TYPE, "explicit_http_config": {"http_protocol_options": {}},
        "common_http_protocol_options": {"idle_timeout": "60.000s"}}
    with pytest.raises(NotImplementedError, match="maxRetries"):
        sidecar(DR_POOL.replace("idleTimeout: 60s", "maxRetries: 0"))


VS_HEADERS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: app}
spec:
  hosts: [reviews, llm.internal]
  http:
  - name: canary
    match: [{name: hdr, headers: {x-canary: {exact: "1"}}, uri: {prefix: /v1}}]
    route:
    - {destination: {host: reviews.app.svc.cluster.local, subset: v2}, weight: 10}
    - {destination: {host: reviews.app.svc.cluster.local, subset: v1}, weight: 90}
  - route: [{destination: {host: reviews}}]
    timeout: 5s
    retries: {attempts: 0}
"""


def test_virtual_service_matches_weights_and_non_registry_host():
    b = validate(sidecar(VS_HEADERS))
    vh = vhosts(b)["reviews.app.svc.cluster.local:80"]
    first, last = vh["routes"]
    assert first["name"] == "canary.hdr"
    assert first["match"] == {"prefix": "/v1", "case_sensitive": True,
                              "headers": [{"name": "x-canary", "string_match": {"exact": "1"}}]}
    assert first["route"]["weighted_clusters"]["clusters"] == [
        {"name": "outbound|80|v2|reviews.app.svc.cluster.local", "weight": 10},
        {"name": "outbound|80|v1|reviews.app.svc.cluster.local", "weight": 90}]
    # Short destination hosts are not resolved by Istio for the cluster name.
    assert last["route"]["cluster"] == "outbound|80||reviews"
    assert last["route"]["timeout"] == "5s" and "retry_policy" not in last["route"]
    # A VirtualService host that is no service still gets a vhost on port 80.
    assert vhosts(b)["llm.internal:80"]["domains"] == ["llm.internal"]


# --------------------------------------------------------------------------
# Gateway naming


def test_gateway_istio_mutual_listener_route_name_and_vhosts(mesh_tls):
    b = validate(gateway(EGRESS, mesh_tls))
    lis = listener(b)
    assert lis["name"] == "0.0.0.0_8443"  # the Service's targetPort
    chain = lis["filter_chains"][0]
    assert chain["filter_chain_match"] == {"server_names": ["api.openai.com"]}
    tls = chain["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"] == mesh_tls["ca"]
    rc = hcm(b)["route_config"]
    assert rc["name"] == "https.443.https.egress.istio-system"
    (vh,) = rc["virtual_hosts"]
    assert vh["name"] == "api.openai.com:443" and vh["domains"] == ["api.openai.com"]
    assert [r["name"] for r in vh["routes"]] == ["to-openai"]
    assert vh["routes"][0]["route"]["cluster"] == "outbound|443||api.openai.com"
    assert b["node"]["id"].startswith("router~") and "PassthroughCluster" not in clusters(b)


GW_HTTP = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: plain, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: two-hosts, namespace: app}
spec:
  hosts: [b.example.com, a.example.com]
  gateways: [istio-system/plain]
  http: [{route: [{destination: {host: api.openai.com, port: {number: 443}}}]}]
"""


def test_gateway_plain_http_names_and_route_collapse():
    b = validate(gateway(GW_HTTP))
    assert listener(b)["name"] == "0.0.0.0_8080" and hcm(b)["stat_prefix"] == "outbound_0.0.0.0_8080"
    rc = hcm(b)["route_config"]
    assert rc["name"] == "http.8080"
    (vh,) = rc["virtual_hosts"]  # one VS, two hosts: collapsed under the first name
    assert vh["name"] == "a.example.com:80" and vh["domains"] == ["a.example.com", "b.example.com"]


def test_gateway_without_virtual_services_gets_blackhole():
    b = validate(gateway(GW_HTTP.split("---")[0]))
    (vh,) = hcm(b)["route_config"]["virtual_hosts"]
    assert vh == {"name": "blackhole:80", "domains": ["*"], "routes": []}


# --------------------------------------------------------------------------
# EnvoyFilter selection and order


@pytest.mark.parametrize("filters,expected", [
    # Root namespace before the workload's, at equal priority, whatever the list order.
    ([ef("ns", [insert_before_router("ns")], ns=NS), ef("root", [insert_before_router("root")])],
     ["add-root", "add-ns"]),
    # Priority orders across namespaces (push_context.go sorts by priority first).
    ([ef("root", [insert_before_router("root")]), ef("ns", [insert_before_router("ns")], ns=NS, priority=-1)],
     ["add-ns", "add-root"]),
    # Within a namespace: priority, then creation (list) order.
    ([ef("b", [insert_before_router("b")], ns=NS, priority=2), ef("a", [insert_before_router("a")], ns=NS),
      ef("c", [insert_before_router("c")], ns=NS)], ["add-a", "add-c", "add-b"]),
    # Other namespaces are skipped.
    ([ef("x", [insert_before_router("x")], ns="elsewhere")], []),
    # workloadSelector: subset match; a root-namespace selector reaches every namespace.
    ([ef("sel", [insert_before_router("sel")], ns=NS, selector={"app": "client"}),
      ef("nosel", [insert_before_router("nosel")], ns=NS, selector={"app": "other"}),
      ef("rootsel", [insert_before_router("rootsel")], selector={"version": "v1"})], ["add-rootsel", "add-sel"]),
])
def test_envoy_filter_selection_and_order(filters, expected):
    b, _ = patched(sidecar(), filters)
    names = filter_names(b)
    added = [n for n in names if n.startswith("add-")]
    assert added == expected
    assert names[-1] == "envoy.filters.http.router"
    validate(b)


@pytest.mark.parametrize("context,applied", [
    ("ANY", True), ("SIDECAR_OUTBOUND", True), ("SIDECAR_INBOUND", False), ("GATEWAY", False)])
def test_envoy_filter_context(context, applied):
    p = insert_before_router("ctx")
    p["match"]["context"] = context
    b, _ = patched(sidecar(), [ef("ctx", [p])])
    assert ("add-ctx" in filter_names(b)) == applied


# --------------------------------------------------------------------------
# Patch operations


def hf_patch(op, value=None, sub=None, **listener_match):
    lm = {"filterChain": {"filter": {"name": sim.HCM_NAME}}}
    if sub:
        lm["filterChain"]["filter"]["subFilter"] = {"name": sub}
    lm.update(listener_match)
    patch = {"operation": op}
    if value is not None:
        patch["value"] = value
    return {"applyTo": "HTTP_FILTER", "match": {"listener": lm}, "patch": patch}


FAULT, CORS, ROUTER = "envoy.filters.http.fault", "envoy.filters.http.cors", "envoy.filters.http.router"
GRPC = "envoy.filters.http.grpc_stats"
MX = sim.MX_FILTER


@pytest.mark.parametrize("patch,expected", [
    (hf_patch("INSERT_BEFORE", lua_free_filter("x"), ROUTER), [MX, GRPC, FAULT, CORS, "add-x", ROUTER]),
    (hf_patch("INSERT_AFTER", lua_free_filter("x"), FAULT), [MX, GRPC, FAULT, "add-x", CORS, ROUTER]),
    (hf_patch("INSERT_FIRST", lua_free_filter("x"), ROUTER), ["add-x", MX, GRPC, FAULT, CORS, ROUTER]),
    # Without a subFilter INSERT_BEFORE means first, INSERT_AFTER means last.
    (hf_patch("INSERT_BEFORE", lua_free_filter("x")), ["add-x", MX, GRPC, FAULT, CORS, ROUTER]),
    (hf_patch("REMOVE", sub=CORS), [MX, GRPC, FAULT, ROUTER]),
    (hf_patch("REPLACE", lua_free_filter("x"), CORS), [MX, GRPC, FAULT, "add-x", ROUTER]),
    # Port and name matches: the sidecar listener is port 80, 0.0.0.0_80.
    (hf_patch("INSERT_BEFORE", lua_free_filter("x"), ROUTER, portNumber=80), [MX, GRPC, FAULT, CORS, "add-x", ROUTER]),
    (hf_patch("INSERT_BEFORE", lua_free_filter("x"), ROUTER, portNumber=8080), [MX, GRPC, FAULT, CORS, ROUTER]),
    (hf_patch("INSERT_BEFORE", lua_free_filter("x"), ROUTER, name="0.0.0.0_80"), [MX, GRPC, FAULT, CORS, "add-x", ROUTER]),
    (hf_patch("INSERT_BEFORE", lua_free_filter("x"), "envoy.filters.http.nope"), [MX, GRPC, FAULT, CORS, ROUTER]),
])
def test_http_filter_operations(patch, expected):
    b, _ = patched(sidecar(), [ef("op", [patch])])
    assert filter_names(b) == expected
    validate(b)


def test_http_filter_add_lands_after_router_and_envoy_rejects_it():
    b, _ = patched(sidecar(), [ef("op", [hf_patch("ADD", lua_free_filter("x"))])])
    assert filter_names(b)[-2:] == [ROUTER, "add-x"]
    with pytest.raises(AssertionError, match="must be the last filter"):
        validate(b)


def test_http_filter_merge_appends_lists_and_merges_any():
    b, _ = patched(sidecar(), [ef("op", [
        hf_patch("INSERT_BEFORE", lua_free_filter("x"), ROUTER),
        hf_patch("MERGE", {"typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [{"remove": "x-drop"}]}}}, "add-x"),
    ])])
    (f,) = [f for f in hcm(b)["http_filters"] if f["name"] == "add-x"]
    assert f["typed_config"]["mutations"]["request_mutations"] == [
        {"append": {"header": {"key": "x-sim", "value": "x"}}}, {"remove": "x-drop"}]
    validate(b)


def test_http_filter_merge_of_other_type_raises():
    with pytest.raises(sim.IstioSimError, match="panics"):
        patched(sidecar(), [ef("op", [hf_patch("MERGE", {"typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}}, FAULT)])])


def test_network_filter_merge_on_hcm():
    p = {"applyTo": "NETWORK_FILTER", "match": {"listener": {"filterChain": {"filter": {"name": sim.HCM_NAME}}}},
         "patch": {"operation": "MERGE", "value": {"typed_config": {
             "@type": sim.HCM_TYPE, "server_name": "sim",
             "upgrade_configs": [{"upgrade_type": "CONNECT"}]}}}}
    b, _ = patched(sidecar(), [ef("nf", [p])])
    h = hcm(b)
    assert h["server_name"] == "sim"
    assert [u["upgrade_type"] for u in h["upgrade_configs"]] == ["websocket", "CONNECT"]
    validate(b)


def test_listener_merge_metadata_replaces_map_entries():
    p = {"applyTo": "LISTENER", "match": {"listener": {"portNumber": 80}},
         "patch": {"operation": "MERGE", "value": {"metadata": {"filter_metadata": {"meshllm": {"role": "sidecar"}}},
                                                   "per_connection_buffer_limit_bytes": 65536}}}
    p2 = copy.deepcopy(p)
    p2["patch"]["value"] = {"metadata": {"filter_metadata": {"meshllm": {"tier": "2"}}}}
    b, _ = patched(sidecar(), [ef("l", [p, p2])])
    lis = listener(b)
    # Map values (a Struct per key) are replaced, not merged.
    assert lis["metadata"]["filter_metadata"] == {"meshllm": {"tier": "2"}}
    assert lis["per_connection_buffer_limit_bytes"] == 65536
    validate(b)
    other = copy.deepcopy(p)
    other["match"]["listener"]["portNumber"] = 443
    b, _ = patched(sidecar(), [ef("l", [other])])
    assert "metadata" not in listener(b)


def route_patch(apply_to, op, value=None, vhost=None, route=None, **rc):
    m = dict(rc)
    if vhost is not None:
        m["vhost"] = {"name": vhost}
        if route is not None:
            m["vhost"]["route"] = {"name": route}
    patch = {"operation": op}
    if value is not None:
        patch["value"] = value
    return {"applyTo": apply_to, "match": {"context": "SIDECAR_OUTBOUND", "routeConfiguration": m}, "patch": patch}


DIRECT = {"name": "sim-direct", "match": {"prefix": "/sim"}, "direct_response": {"status": 418}}


def test_http_route_insert_first_only_in_named_vhost():
    b, _ = patched(sidecar(), [ef("r", [route_patch("HTTP_ROUTE", "INSERT_FIRST", DIRECT, vhost="api.openai.com:80")])])
    vh = vhosts(b)
    assert [r["name"] for r in vh["api.openai.com:80"]["routes"]] == ["sim-direct", "default"]
    assert [r["name"] for r in vh["reviews.app.svc.cluster.local:80"]["routes"]] == ["default"]
    validate(b)


@pytest.mark.parametrize("patch,vhost,names", [
    (route_patch("HTTP_ROUTE", "INSERT_BEFORE", DIRECT, vhost="api.openai.com:80", route="default"),
     "api.openai.com:80", ["sim-direct", "default"]),
    (route_patch("HTTP_ROUTE", "INSERT_AFTER", DIRECT, vhost="api.openai.com:80", route="default"),
     "api.openai.com:80", ["default", "sim-direct"]),
    # INSERT_FIRST with a route match that finds nothing inserts nothing.
    (route_patch("HTTP_ROUTE", "INSERT_FIRST", DIRECT, vhost="api.openai.com:80", route="missing"),
     "api.openai.com:80", ["default"]),
    # vhost name matching is exact: "api.openai.com" is not "api.openai.com:80".
    (route_patch("HTTP_ROUTE", "INSERT_FIRST", DIRECT, vhost="api.openai.com"), "api.openai.com:80", ["default"]),
    (route_patch("HTTP_ROUTE", "REMOVE", vhost="api.openai.com:80", route="default"), "api.openai.com:80", []),
    # A portNumber that is not the route config's port: no match.
    (route_patch("HTTP_ROUTE", "INSERT_FIRST", DIRECT, vhost="api.openai.com:80", portNumber=443),
     "api.openai.com:80", ["default"]),
])
def test_http_route_operations(patch, vhost, names):
    b, _ = patched(sidecar(), [ef("r", [patch])])
    assert [r.get("name") for r in vhosts(b)[vhost]["routes"]] == names
    validate(b)


def test_http_route_merge_oneof_and_route_config_merge():
    b, _ = patched(sidecar(), [ef("r", [
        route_patch("HTTP_ROUTE", "MERGE", {"direct_response": {"status": 204}}, vhost="api.openai.com:80",
                    route="default"),
        route_patch("ROUTE_CONFIGURATION", "MERGE", {"request_headers_to_add": [
            {"header": {"key": "x-rc", "value": "1"}}]}, name="80"),
        route_patch("VIRTUAL_HOST", "MERGE", {"request_headers_to_add": [{"header": {"key": "x-vh", "value": "1"}}]},
                    vhost="reviews.app.svc.cluster.local:80"),
        route_patch("VIRTUAL_HOST", "ADD", {"name": "sim:80", "domains": ["sim.local"], "routes": [DIRECT]}),
    ])])
    (r,) = vhosts(b)["api.openai.com:80"]["routes"]
    assert r["direct_response"] == {"status": 204} and "route" not in r  # oneof: route cleared
    assert hcm(b)["route_config"]["request_headers_to_add"][0]["header"]["key"] == "x-rc"
    assert vhosts(b)["reviews.app.svc.cluster.local:80"]["request_headers_to_add"][0]["header"]["key"] == "x-vh"
    assert list(vhosts(b))[-1] == "sim:80"
    validate(b)


def test_cluster_add_merge_remove():
    new = {"name": "sim-extra", "type": "STATIC", "connect_timeout": "1s",
           "load_assignment": {"cluster_name": "sim-extra", "endpoints": []}}
    b, _ = patched(sidecar(), [ef("c", [
        {"applyTo": "CLUSTER", "match": {"context": "SIDECAR_OUTBOUND"}, "patch": {"operation": "ADD", "value": new}},
        {"applyTo": "CLUSTER", "match": {"cluster": {"service": "api.openai.com", "portNumber": 443}},
         "patch": {"operation": "MERGE", "value": {"connect_timeout": "3s"}}},
        {"applyTo": "CLUSTER", "match": {"cluster": {"name": "outbound|5432||ratings.other.svc.cluster.local"}},
         "patch": {"operation": "REMOVE"}},
    ])])
    cs = clusters(b)
    assert list(cs)[-1] == "sim-extra"
    assert cs["outbound|443||api.openai.com"]["connect_timeout"] == "3s"
    assert cs["outbound|80||api.openai.com"]["connect_timeout"] == "10s"
    assert "outbound|5432||ratings.other.svc.cluster.local" not in cs
    validate(b)


def test_cluster_add_with_context_any_skips_inbound():
    new = {"name": "sim-extra", "type": "STATIC", "connect_timeout": "1s"}
    p = {"applyTo": "CLUSTER", "patch": {"operation": "INSERT_FIRST", "value": new}}  # INSERT_* on CLUSTER is ADD
    assert "sim-extra" in clusters(patched(sidecar(), [ef("c", [p])])[0])
    assert "sim-extra" not in clusters(patched(sidecar(), [ef("c", [p])], context="SIDECAR_INBOUND")[0])


def wasm_ext(name="meshllm", uri="oci://ghcr.io/example/meshllm:1", sha=None):
    remote = {"http_uri": {"uri": uri, "cluster": "x", "timeout": "10s"}}
    if sha:
        remote["sha256"] = sha
    return {"name": name, "typed_config": {"@type": sim.WASM_TYPE, "config": {
        "name": name, "root_id": name, "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                                         "value": "{}"},
        "vm_config": {"runtime": "envoy.wasm.runtime.v8", "code": {"remote": remote}}}}}


def ecds_filter(name="meshllm"):
    return {"name": name, "config_discovery": {"config_source": {"ads": {}, "initial_fetch_timeout": "0s"},
                                               "type_urls": [sim.WASM_TYPE]}}


def test_extension_config_collected_regardless_of_context():
    b, ext = patched(sidecar(), [ef("e", [
        {"applyTo": "EXTENSION_CONFIG", "match": {"context": "GATEWAY"}, "patch": {"operation": "ADD",
                                                                                   "value": wasm_ext()}},
    ]), ef("skipped", [{"applyTo": "EXTENSION_CONFIG", "patch": {"operation": "ADD", "value": wasm_ext("other")}}],
           ns="elsewhere")])
    assert [e["name"] for e in ext] == ["meshllm"]
    assert ext[0]["typed_config"]["@type"] == sim.WASM_TYPE


def test_gateway_route_configuration_port_matching(mesh_tls):
    # RDS portNumber on gateways is the server port (443), listener portNumber the targetPort (8443).
    b = gateway(EGRESS, mesh_tls)
    direct = dict(DIRECT)
    efs = [ef("g", [
        {"applyTo": "HTTP_ROUTE", "match": {"context": "GATEWAY", "routeConfiguration": {
            "portNumber": 443, "vhost": {"name": "api.openai.com:443"}}},
         "patch": {"operation": "INSERT_FIRST", "value": direct}},
        {"applyTo": "HTTP_ROUTE", "match": {"context": "GATEWAY", "routeConfiguration": {"portNumber": 8443}},
         "patch": {"operation": "INSERT_FIRST", "value": dict(direct, name="wrong-port")}},
        {"applyTo": "VIRTUAL_HOST", "match": {"context": "GATEWAY", "routeConfiguration": {
            "gateway": "istio-system/egress", "portName": "https"}},
         "patch": {"operation": "MERGE", "value": {"request_headers_to_add": [
             {"header": {"key": "x-gw", "value": "1"}}]}}},
        {"applyTo": "HTTP_FILTER", "match": {"context": "GATEWAY", "listener": {"portNumber": 8443, "filterChain": {
            "filter": {"name": sim.HCM_NAME, "subFilter": {"name": ROUTER}}}}},
         "patch": {"operation": "INSERT_BEFORE", "value": lua_free_filter("gw")}},
        {"applyTo": "HTTP_FILTER", "match": {"context": "GATEWAY", "listener": {"portNumber": 443}},
         "patch": {"operation": "INSERT_FIRST", "value": lua_free_filter("wrong")}},
    ])]
    out, _ = sim.apply_envoy_filters(b, efs, context="GATEWAY", namespace="istio-system", labels=GW_LABELS)
    (vh,) = hcm(out)["route_config"]["virtual_hosts"]
    assert [r["name"] for r in vh["routes"]] == ["sim-direct", "to-openai"]
    assert vh["request_headers_to_add"][0]["header"]["key"] == "x-gw"
    assert filter_names(out) == [MX, GRPC, FAULT, CORS, "add-gw", ROUTER]
    validate(out)


# --------------------------------------------------------------------------
# Strictness


@pytest.mark.parametrize("patch,error", [
    ({"applyTo": "LISTENER_FILTER", "patch": {"operation": "ADD", "value": {}}}, NotImplementedError),
    ({"applyTo": "FILTER_CHAIN", "patch": {"operation": "MERGE", "value": {}}}, NotImplementedError),
    ({"applyTo": "LISTENER", "patch": {"operation": "ADD", "value": {"name": "x"}}}, NotImplementedError),
    ({"applyTo": "NETWORK_FILTER", "patch": {"operation": "INSERT_FIRST", "value": {"name": "x"}}},
     NotImplementedError),
    ({"applyTo": "HTTP_FILTER", "patch": {"operation": "MERGE_AND_REPLACE_LIST", "value": {}}}, NotImplementedError),
    ({"applyTo": "ROUTE_CONFIGURATION", "patch": {"operation": "ADD", "value": {}}}, NotImplementedError),
    ({"applyTo": "HTTP_FILTER", "match": {"proxy": {"proxyVersion": "^1.2.*"}},
      "patch": {"operation": "ADD", "value": lua_free_filter("x")}}, NotImplementedError),
    ({"applyTo": "HTTP_FILTER", "match": {"listener": {"filterChain": {"transportProtocol": "tls"}}},
      "patch": {"operation": "ADD", "value": lua_free_filter("x")}}, NotImplementedError),
    ({"applyTo": "HTTP_ROUTE", "match": {"routeConfiguration": {"vhost": {"route": {"weird": 1}}}},
      "patch": {"operation": "MERGE", "value": {"name": "x"}}}, NotImplementedError),
    ({"applyTo": "CLUSTER", "match": {"cluster": {"name": "x"}},
      "patch": {"operation": "MERGE", "value": {"connectTimeout": "1s"}}}, NotImplementedError),
    ({"applyTo": "CLUSTER", "match": {"cluster": {"name": "x"}},
      "patch": {"operation": "MERGE", "value": {"respect_dns_ttl": False}}}, NotImplementedError),
    ({"applyTo": "HTTP_FILTER", "patch": {"operation": "ADD", "value": lua_free_filter("x"), "filterClass": "AUTHZ"}},
     NotImplementedError),
    ({"applyTo": "CLUSTER", "match": {"listener": {"name": "x"}}, "patch": {"operation": "MERGE", "value": {}}},
     sim.IstioSimError),
    ({"applyTo": "HTTP_FILTER", "patch": {"operation": "ADD"}}, sim.IstioSimError),
])
def test_unsupported_or_invalid_patches_raise(patch, error):
    # Even in a namespace that does not select the proxy: manifests can't hide them.
    with pytest.raises(error):
        patched(sidecar(), [ef("bad", [patch], ns="elsewhere")])


@pytest.mark.parametrize("extra,match", [
    ("kind: Sidecar\nmetadata: {name: s, namespace: app}\nspec:\n  egress: [{port: {number: 80, protocol: HTTP,"
     " name: http}, hosts: ['./*']}, {hosts: ['*/*']}]", "several egress"),
    ("kind: VirtualService\nmetadata: {name: v, namespace: app}\nspec:\n  hosts: [reviews]\n"
     "  http: [{fault: {abort: {httpStatus: 500}}, route: [{destination: {host: reviews}}]}]", "fault"),
    ("kind: VirtualService\nmetadata: {name: v, namespace: app}\nspec:\n  hosts: [reviews]\n"
     "  http: [{route: [{destination: {host: reviews}, headers: {request: {set: {a: b}}}}]}]", "headers"),
    ("kind: DestinationRule\nmetadata: {name: d, namespace: app}\nspec:\n  host: reviews\n"
     "  trafficPolicy: {outlierDetection: {consecutive5xxErrors: 1}}", "outlierDetection"),
    ("kind: DestinationRule\nmetadata: {name: d, namespace: app}\nspec:\n  host: reviews\n"
     "  trafficPolicy: {tls: {mode: MUTUAL}}", "MUTUAL"),
    ("kind: ServiceEntry\nmetadata: {name: w, namespace: app}\nspec: {hosts: ['*.example.com'], "
     "ports: [{number: 80, name: http, protocol: HTTP}]}", "wildcard"),
])
def test_unsupported_resources_raise(extra, match):
    with pytest.raises(NotImplementedError, match=match):
        sidecar(extra)


def test_unsupported_gateway_servers_raise():
    simple = EGRESS.replace("tls: {mode: ISTIO_MUTUAL}", "tls: {mode: SIMPLE, credentialName: openai}")
    with pytest.raises(NotImplementedError):
        gateway(simple, None)
    with pytest.raises(sim.IstioSimError, match="no Gateway"):
        sim.gateway_bootstrap(sim.load_resources(EGRESS), namespace="istio-system", labels={"istio": "ingress"},
                              port=1, admin_port=2, endpoints={})


# --------------------------------------------------------------------------
# istio-agent emulation


def cluster_with_upstream_ecds(b):
    b = copy.deepcopy(b)
    c = clusters(b)["outbound|443||api.openai.com"]
    c["typed_extension_protocol_options"] = {sim.HTTP_OPTIONS_KEY: {
        "@type": sim.HTTP_OPTIONS_TYPE, "explicit_http_config": {"http_protocol_options": {}},
        "http_filters": [ecds_filter("meshllm.upstream"), {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}}]}}
    return b


def test_agent_emulate_rewrites_ecds_sources_and_remote_code(tmp_path):
    module = tmp_path / "m.wasm"
    module.write_bytes(b"\0asm")
    sha = hashlib.sha256(b"\0asm").hexdigest()
    efs = [ef("w", [hf_patch("INSERT_BEFORE", ecds_filter(), ROUTER),
                    {"applyTo": "EXTENSION_CONFIG", "patch": {"operation": "ADD", "value": wasm_ext()}},
                    {"applyTo": "EXTENSION_CONFIG", "patch": {"operation": "ADD", "value": wasm_ext(
                        "meshllm.upstream", "file://" + str(module), sha)}}])]
    b, ext = patched(cluster_with_upstream_ecds(sidecar()), efs)
    out = sim.agent_emulate(b, ext, str(module), tmp_path / "ecds")
    (hf,) = [f for f in hcm(out)["http_filters"] if f["name"] == "meshllm"]
    src = hf["config_discovery"]["config_source"]
    assert "ads" not in src and src["initial_fetch_timeout"] == "0s"
    doc = json.loads(open(src["path_config_source"]["path"]).read())
    (res,) = doc["resources"]
    assert res["@type"] == sim.TEC_TYPE and res["name"] == "meshllm"
    assert res["typed_config"]["config"]["vm_config"]["code"] == {"local": {"filename": str(module)}}
    up = clusters(out)["outbound|443||api.openai.com"]["typed_extension_protocol_options"][sim.HTTP_OPTIONS_KEY]
    up_src = up["http_filters"][0]["config_discovery"]["config_source"]["path_config_source"]["path"]
    assert json.loads(open(up_src).read())["resources"][0]["name"] == "meshllm.upstream"
    # The input is untouched.
    assert "ads" in [f for f in hcm(b)["http_filters"] if f["name"] == "meshllm"][0]["config_discovery"][
        "config_source"]


def test_agent_emulate_missing_config(tmp_path):
    b, _ = patched(sidecar(), [ef("w", [hf_patch("INSERT_BEFORE", ecds_filter(), ROUTER)])])
    with pytest.raises(sim.IstioSimError, match="no EXTENSION_CONFIG"):
        sim.agent_emulate(b, [], "/m.wasm", tmp_path)


def ecds_resource(out):
    (hf,) = [f for f in hcm(out)["http_filters"] if f["name"] == "meshllm"]
    path = hf["config_discovery"]["config_source"]["path_config_source"]["path"]
    (res,) = json.loads(open(path).read())["resources"]
    return res


@pytest.mark.parametrize("fetch", ["bad sha", "no registry", "not wasm", "unknown scheme", "empty pull secret"])
def test_agent_substitutes_deny_all_rbac_when_the_module_cannot_be_fetched(tmp_path, fetch):
    """pkg/wasm/convert.go: a fetch failure replaces the whole resource by a
    deny-all RBAC filter of the same name (allow-all when the plugin fails open)."""
    module = tmp_path / "m.wasm"
    module.write_bytes(b"\0asm")
    not_wasm = tmp_path / "x.wasm"
    not_wasm.write_bytes(b"<html>")
    ext = {
        "bad sha": wasm_ext(uri="file://" + str(module), sha="0" * 64),
        "no registry": wasm_ext(uri="oci://registry.test/m:1"),
        "not wasm": wasm_ext(uri="https://downloads.test/m.wasm"),
        "unknown scheme": wasm_ext(uri="s3://bucket/m.wasm"),
        "empty pull secret": wasm_ext(uri="oci://registry.test/m:1"),
    }[fetch]
    if fetch == "empty pull secret":
        ext["typed_config"]["config"]["vm_config"]["environment_variables"] = {
            "key_values": {sim.WASM_SECRET_ENV: ""}}
    modules = {"no registry": None, "not wasm": str(not_wasm)}.get(fetch, str(module))
    b, _ = patched(sidecar(), [ef("w", [hf_patch("INSERT_BEFORE", ecds_filter(), ROUTER)])])
    log = []
    res = ecds_resource(sim.agent_emulate(b, [ext], modules, tmp_path, log=log))
    assert res["name"] == "meshllm"
    assert res["typed_config"] == {"@type": sim.RBAC_TYPE, "rules": {}, "rules_stat_prefix": "wasm-default-deny"}
    assert "applying deny RBAC filter" in log[0]
    ext["typed_config"]["config"]["fail_open"] = True
    res = ecds_resource(sim.agent_emulate(b, [ext], modules, tmp_path))
    assert res["typed_config"] == {"@type": sim.RBAC_TYPE, "rules_stat_prefix": "wasm-default-allow"}


def test_agent_strips_its_own_variables_and_keeps_host_env_keys(tmp_path):
    module = tmp_path / "m.wasm"
    module.write_bytes(b"\0asm")
    ext = wasm_ext(uri="oci://registry.test/m:1")
    ext["typed_config"]["config"]["vm_config"]["environment_variables"] = {
        "key_values": {sim.WASM_SECRET_ENV: "docker-config", "ISTIO_META_WASM_IMAGE_PULL_POLICY": "Always"},
        "host_env_keys": ["OPENAI_API_KEY"]}
    b, _ = patched(sidecar(), [ef("w", [hf_patch("INSERT_BEFORE", ecds_filter(), ROUTER)])])
    vm = ecds_resource(sim.agent_emulate(b, [ext], str(module), tmp_path))["typed_config"]["config"]["vm_config"]
    assert vm["environment_variables"] == {"host_env_keys": ["OPENAI_API_KEY"]}
    assert vm["code"] == {"local": {"filename": str(module)}}


# --------------------------------------------------------------------------
# A live run in the real Envoy


class _Echo(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


LIVE_FILTERS = """
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: sim-header, namespace: istio-system}
spec:
  configPatches:
  - applyTo: HTTP_FILTER
    match:
      context: SIDECAR_OUTBOUND
      listener:
        portNumber: 80
        filterChain:
          filter:
            name: envoy.filters.network.http_connection_manager
            subFilter: {name: envoy.filters.http.router}
    patch:
      operation: INSERT_BEFORE
      value:
        name: sim-header
        config_discovery:
          config_source: {ads: {}}
          type_urls: [type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation]
  - applyTo: EXTENSION_CONFIG
    patch:
      operation: ADD
      value:
        name: sim-header
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
          mutations:
            request_mutations:
            - append: {header: {key: x-sim, value: ecds}}
---
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: sim-route, namespace: app}
spec:
  workloadSelector: {labels: {app: client}}
  configPatches:
  - applyTo: HTTP_ROUTE
    match:
      context: SIDECAR_OUTBOUND
      routeConfiguration:
        vhost: {name: "api.example.com:80"}
    patch:
      operation: INSERT_FIRST
      value:
        name: teapot
        match: {prefix: /teapot}
        direct_response: {status: 418, body: {inline_string: short and stout}}
"""

LIVE_SE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: example, namespace: app}
spec:
  hosts: [api.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
"""


def test_live_sidecar_with_envoy_filters(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port, admin = free_port(), free_port()
    b = sim.sidecar_bootstrap(sim.load_resources(LIVE_SE), namespace=NS, labels=LABELS, port=port, admin_port=admin,
                              endpoints={"api.example.com": ("127.0.0.1", server.server_address[1])})
    b, ext = sim.apply_envoy_filters(b, list(yaml.safe_load_all(LIVE_FILTERS)), context="SIDECAR_OUTBOUND",
                                     namespace=NS, labels=LABELS)
    b = sim.agent_emulate(b, ext, "/unused.wasm", tmp_path)
    cfg = tmp_path / "envoy.json"
    cfg.write_text(json.dumps(b))
    log = open(tmp_path / "envoy.log", "w")
    proc = subprocess.Popen([envoy_binary(), "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart",
                             "-l", "warning"], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            assert proc.poll() is None, (tmp_path / "envoy.log").read_text()[-3000:]
            try:
                if http("GET", f"http://127.0.0.1:{admin}/ready", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        # The ServiceEntry's vhost routes to its cluster; the ECDS filter adds a header.
        status, _, body = http("GET", url + "/v1/models", headers={"host": "api.example.com"})
        assert status == 200, body
        seen = json.loads(body)
        assert seen["path"] == "/v1/models" and seen["headers"]["x-sim"] == "ecds"
        # Istio's metadata exchange (its stand-in) names the proxy to every upstream.
        assert seen["headers"]["x-envoy-peer-metadata-id"] == b["node"]["id"]
        peer = json.loads(base64.b64decode(seen["headers"]["x-envoy-peer-metadata"]))
        assert (peer["NAMESPACE"], peer["LABELS"]) == (NS, LABELS)
        # The port is ignored in host matching, as in Istio.
        assert http("GET", url + "/x", headers={"host": "api.example.com:80"})[0] == 200
        # The HTTP_ROUTE patch answers in that vhost only.
        status, _, body = http("GET", url + "/teapot", headers={"host": "api.example.com"})
        assert (status, body) == (418, b"short and stout")
        # Unknown hosts hit allow_any -> PassthroughCluster, which has no endpoints here.
        assert http("GET", url + "/teapot", headers={"host": "unknown.example"})[0] == 503
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
        server.shutdown()
        server.server_close()


def test_gateway_two_listeners_need_a_port_map(mesh_tls):
    res = sim.load_resources(BASE, EGRESS, GW_HTTP)
    kw = dict(namespace="istio-system", labels=GW_LABELS, admin_port=free_port(), endpoints={}, mesh_tls=mesh_tls)
    with pytest.raises(sim.IstioSimError, match="port="):
        sim.gateway_bootstrap(res, port=free_port(), **kw)
    b = validate(sim.gateway_bootstrap(res, port={8080: free_port(), 8443: free_port()}, **kw))
    assert [lis["name"] for lis in b["static_resources"]["listeners"]] == ["0.0.0.0_8080", "0.0.0.0_8443"]
    assert [hcm(b, i)["route_config"]["name"] for i in (0, 1)] == ["http.8080", "https.443.https.egress.istio-system"]
    # Port 80 of the gateway Service is named http2: its clusters speak HTTP/2, and mesh mTLS offers h2.
    c = clusters(b)["outbound|80|openai|istio-egressgateway.istio-system.svc.cluster.local"]
    assert "http2_protocol_options" in c["typed_extension_protocol_options"][sim.HTTP_OPTIONS_KEY]["explicit_http_config"]


@pytest.mark.parametrize("type_urls,status", [
    # The reference accepts Wasm only: Envoy refuses the agent's substitute,
    # the filter has no config, and every stream through it fails (500).
    ([sim.WASM_TYPE], 500),
    # Istio's own WasmPlugin references also accept RBAC: the deny-all
    # substitute applies (403).
    ([sim.WASM_TYPE, sim.RBAC_TYPE], 403),
])
def test_live_agent_substitute_and_the_type_url_restriction(tmp_path, type_urls, status):
    """What a module the agent cannot fetch does to a listener whose HTTP
    filter references it (issue 19): the agent's deny-all RBAC replaces the
    Wasm config, and the reference's type_urls decide whether Envoy takes it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port, admin = free_port(), free_port()
    b = sim.sidecar_bootstrap(sim.load_resources(LIVE_SE), namespace=NS, labels=LABELS, port=port, admin_port=admin,
                              endpoints={"api.example.com": ("127.0.0.1", server.server_address[1])})
    ref = ecds_filter()
    ref["config_discovery"]["type_urls"] = type_urls
    b, ext = patched(b, [ef("w", [hf_patch("INSERT_BEFORE", ref, ROUTER),
                                  {"applyTo": "EXTENSION_CONFIG", "patch": {"operation": "ADD",
                                                                            "value": wasm_ext()}}])])
    b = sim.agent_emulate(b, ext, None, tmp_path)  # no registry reachable
    cfg = tmp_path / "envoy.json"
    cfg.write_text(json.dumps(b))
    log = open(tmp_path / "envoy.log", "w")
    proc = subprocess.Popen([envoy_binary(), "-c", str(cfg), "--concurrency", "1", "--base-id", str(port),
                             "-l", "warning"], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            assert proc.poll() is None, (tmp_path / "envoy.log").read_text()[-3000:]
            try:
                if http("GET", f"http://127.0.0.1:{admin}/ready", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert http("GET", f"http://127.0.0.1:{port}/x", headers={"host": "api.example.com"})[0] == status
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
        server.shutdown()
        server.server_close()
    if status == 500:
        assert "rejected" in (tmp_path / "envoy.log").read_text()
