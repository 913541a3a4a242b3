"""The shared quota store in the Istio install (manifests.py --store), run:
two sidecars of the shop namespace, and the egress gateway, configured from
the generated overlays the way istiod and istio-agent would
(tests/istio_sim.py), count one shared rule in a real Redis through webdis,
started here on free ports with the bridge's generated webdis config. The bridge's own sidecar is stood in
for by an Envoy that terminates the mesh's mTLS and enforces the generated
AuthorizationPolicy (translated here, as istiod would, for the fields it
uses); the EnvoyFilter guard refuses the application's own calls."""

import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from http.client import HTTPSConnection

import pytest

import istio_sim as sim
from conftest import free_port, http, wait_for
from test_istio import GATEWAY_LABELS, HOSTS, SHOP_LABELS, chat_body, istio_proxy, mtls_post, run_envoy
from test_k8s import SHARED_POLICY, generate
from test_quotas import make_pki
from test_shared_quota import need

import manifests  # noqa: E402  (on sys.path through test_istio)

pytestmark = pytest.mark.wasm_only(
    "Istio (1.30) runs the Wasm build: the mesh's proxies load the .wasm")

PASSWORD = "bridge-secret"
ADMIN_PASSWORD = "test-admin"
# The Redis ACL user k8s/README.md tells users to create. webdis 0.1.9
# (Debian) logs in with a password only, so here it is `default`'s.
BRIDGE_ACL = ["~meshllm/quota/*", "-@all", "+eval", "+evalsha", "+get", "+incrby", "+set", "+exists",
              "+expireat", "+ping"]
LIMIT = 3


class Redis:
    def __init__(self):
        need("redis-server")
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--user", "default", "on", f">{PASSWORD}", *BRIDGE_ACL,
             "--user", "admin", "on", f">{ADMIN_PASSWORD}", "~*", "+@all"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(lambda: self.cli("PING") == "PONG", timeout=10), "redis did not start"

    def cli(self, *args):
        out = subprocess.run(["redis-cli", "-p", str(self.port), "--user", "admin", "--pass", ADMIN_PASSWORD,
                              "--no-auth-warning", *args], capture_output=True, text=True, timeout=5)
        return out.stdout.strip()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)


class Webdis:
    """webdis with the generated ConfigMap's config, but for what 0.1.9
    lacks (the ACL user's name, `$VAR` values) and where it listens."""

    def __init__(self, generated, redis_port):
        need("webdis")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="meshllm-bridge-")
        cfg = dict(generated, redis_host="127.0.0.1", redis_port=redis_port, redis_auth=PASSWORD,
                   http_host="127.0.0.1", http_port=self.port, logfile=os.path.join(self.dir, "webdis.log"))
        path = os.path.join(self.dir, "webdis.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        self.proc = subprocess.Popen(["webdis", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(lambda: self.get("/PING")[0] == 200, timeout=10), "webdis did not start"

    def get(self, path):
        try:
            return http("GET", f"http://127.0.0.1:{self.port}{path}", timeout=3)[::2]
        except OSError:
            return 0, b""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def rbac_policy(authorization_policy):
    """An ALLOW AuthorizationPolicy as Envoy RBAC (istiod's
    pilot/pkg/security/authz/builder), for the fields the generated one uses:
    source principals and namespaces, operation methods and paths."""
    policies = {}
    for i, rule in enumerate(authorization_policy["spec"]["rules"]):
        principals = []
        for source in (f["source"] for f in rule["from"]):
            for p in source.get("principals", []):
                # "*": any authenticated principal.
                match = {"safe_regex": {"regex": ".+"}} if p == "*" else {"exact": f"spiffe://{p}"}
                principals.append({"authenticated": {"principal_name": match}})
            for ns in source.get("namespaces", []):
                principals.append({"authenticated": {"principal_name": {
                    "safe_regex": {"regex": f".*/ns/{ns}/.*"}}}})
        permissions = []
        for op in (t["operation"] for t in rule["to"]):
            paths = [{"url_path": {"path": {"prefix": p[:-1]} if p.endswith("*") else {"exact": p}}}
                     for p in op["paths"]]
            methods = [{"header": {"name": ":method", "string_match": {"exact": m}}} for m in op["methods"]]
            permissions.append({"and_rules": {"rules": [{"or_rules": {"rules": methods}},
                                                        {"or_rules": {"rules": paths}}]}})
        policies[f"rule-{i}"] = {"permissions": permissions,
                                 "principals": [{"or_ids": {"ids": principals}}]}
    return {"action": "ALLOW", "policies": policies}


def bridge_sidecar(pki, authorization_policy, webdis_port, port, admin):
    """The bridge's inbound sidecar, reduced to what matters here: STRICT
    mTLS (a mesh client certificate required) and the AuthorizationPolicy."""
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "inbound",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{
                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                        "@type": sim.DOWNSTREAM_TLS_TYPE,
                        "require_client_certificate": True,
                        "common_tls_context": {
                            "tls_certificates": [{"certificate_chain": {"filename": pki["server"][0]},
                                                  "private_key": {"filename": pki["server"][1]}}],
                            "validation_context": {"trusted_ca": {"filename": pki["ca"]}}}}},
                    "filters": [{"name": sim.HCM_NAME, "typed_config": {
                        "@type": sim.HCM_TYPE,
                        "stat_prefix": "inbound",
                        "route_config": {"virtual_hosts": [{
                            "name": "inbound", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "webdis"}}]}]},
                        "http_filters": [
                            {"name": "envoy.filters.http.rbac", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                                "rules": rbac_policy(authorization_policy)}},
                            {"name": sim.ROUTER_NAME, "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                        ]}}],
                }],
            }],
            "clusters": [{"name": "webdis", "type": "STATIC", "connect_timeout": "1s",
                          "load_assignment": {"cluster_name": "webdis", "endpoints": [{"lb_endpoints": [
                              {"endpoint": {"address": {"socket_address": {
                                  "address": "127.0.0.1", "port_value": webdis_port}}}}]}]}}],
        },
    }


def one(docs, kind, name):
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def gateway_certificate(pki, directory):
    """The egress gateway's workload certificate (its service account's
    SPIFFE name), from the test CA: it serves callers and calls the bridge."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_cert = x509.load_pem_x509_certificate(open(pki["ca"], "rb").read())
    ca_key = serialization.load_pem_private_key(open(pki["ca"][:-len(".pem")] + ".key", "rb").read(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    account = f"spiffe://cluster.local/ns/{manifests.NAMESPACE}/sa/{manifests.GATEWAY}"
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.UniformResourceIdentifier(account)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = (os.path.join(directory, "gateway.pem"), os.path.join(directory, "gateway.key"))
    with open(paths[0], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


@contextlib.contextmanager
def store_install(mode, workdir, mocks, proxies=1, hidden=False, timeout_ms=200):
    """`proxies` proxies of `mode` from the overlay generated with --store,
    the bridge's sidecar stand-in, webdis and Redis. `hidden`: the proxies
    do not see the bridge's Service (a Sidecar resource or exportTo)."""
    policy = json.loads(SHARED_POLICY.read_text())
    policy["quotas"]["limits"] = [{"name": "shop-shared", "match": {"namespace": "shop"},
                                   "requests_per_day": LIMIT, "shared": True}]
    policy["quotas"]["store"]["timeout_ms"] = timeout_ms
    policy_path = workdir / "mesh.json"
    policy_path.write_text(json.dumps(policy))
    out_dir = workdir / "k8s"
    generate(out_dir, "--policy", str(policy_path), "--store", "redis.data.svc.cluster.local:6379",
             "--store-client-namespaces", "shop")
    text = subprocess.run(["kubectl", "kustomize", str(out_dir / "overlays" / mode)],
                          capture_output=True, text=True, check=True).stdout
    resources = sim.load_resources(text)
    seen = [r for r in resources if not (hidden and r["kind"] == "Service"
                                         and r["metadata"]["name"] == manifests.STORE_SERVICE)]
    config = json.loads(one(resources, "ConfigMap", manifests.STORE_CONFIG_MAP)["data"]["webdis.json"])
    pki = make_pki(str(workdir))
    if mode == "sidecar":
        # The shop pod's sidecar presents its workload certificate.
        own = pki["shop/chatbot"]
        namespace, labels = "shop", SHOP_LABELS
    else:
        own = pki["gateway"] = gateway_certificate(pki, str(workdir))
        namespace, labels = manifests.NAMESPACE, GATEWAY_LABELS
    mesh_tls = {"cert": own[0], "key": own[1], "ca": pki["ca"]}
    redis = Redis()
    webdis = Webdis(config, redis.port)
    try:
        front_port, front_admin = free_port(), free_port()
        front_dir = workdir / "bridge-sidecar"
        front_dir.mkdir()
        front = bridge_sidecar(pki, one(resources, "AuthorizationPolicy", manifests.STORE_SERVICE),
                               webdis.port, front_port, front_admin)
        addresses = {p: ("127.0.0.1", mocks[p].port) for p in HOSTS}
        store_endpoint = {manifests.STORE_HOST: ("127.0.0.1", front_port)}
        with run_envoy(front, front_port, front_admin, front_dir), contextlib.ExitStack() as stack:
            running = []
            for i in range(proxies):
                proxy_dir = workdir / f"{mode}-{i}"
                proxy_dir.mkdir()
                proxy = stack.enter_context(istio_proxy(mode, proxy_dir, namespace, labels, addresses,
                                                        resources=seen, mesh_tls=mesh_tls,
                                                        other_endpoints=store_endpoint))
                proxy["pki"] = pki
                running.append(proxy)
            yield {"proxies": running, "redis": redis, "webdis": webdis, "pki": pki,
                   "bridge_port": front_port, "bridge_admin": front_admin}
    finally:
        webdis.stop()
        redis.stop()


@pytest.fixture(scope="module")
def store_mesh(wasm, mocks, tmp_path_factory):
    with store_install("sidecar", tmp_path_factory.mktemp("store-sidecar"), mocks, proxies=2) as mesh:
        yield mesh


def shared_count(redis):
    keys = redis.cli("--scan", "--pattern", "meshllm/quota/v1/*").split()
    counts = {k: redis.cli("GET", k) for k in keys}
    return [int(v) for k, v in counts.items() if "#requests:day:" in k]


def chat(proxy):
    return http("POST", f"http://127.0.0.1:{proxy['port']}/v1/chat/completions", chat_body("mini"),
                headers={"host": "api.openai.com"})


def test_a_shared_rule_holds_across_two_sidecars_through_the_bridge(store_mesh):
    first, second = store_mesh["proxies"]
    statuses = [chat(proxy)[0] for proxy in (first, second, first, second, first, second)]
    assert sorted(statuses) == [200] * LIMIT + [429] * (6 - LIMIT), statuses
    # Both sidecars served some: the limit is one, counted in Redis.
    assert 200 in statuses[0::2] and 200 in statuses[1::2], statuses
    assert shared_count(store_mesh["redis"]) == [LIMIT]


def test_the_application_cannot_call_the_bridge(store_mesh):
    first, _ = store_mesh["proxies"]
    for host in ("meshllm-quota-store.meshllm", manifests.STORE_HOST):
        status, _, body = http("GET", f"http://127.0.0.1:{first['port']}/EVAL/return%201/0",
                               headers={"host": host})
        assert status == 403, body
        assert json.loads(body)["error"]["code"] == "quota_store_not_callable"


def bridge_get(store_mesh, workload, path):
    """A call to the bridge's sidecar with `workload`'s mesh certificate."""
    pki = store_mesh["pki"]
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.check_hostname = False
    ctx.load_cert_chain(*pki[workload])
    conn = HTTPSConnection("127.0.0.1", store_mesh["bridge_port"], context=ctx, timeout=10)
    try:
        conn.request("GET", path, headers={"host": manifests.STORE_HOST})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_only_the_allowed_identities_reach_the_bridge_on_its_paths(store_mesh):
    assert bridge_get(store_mesh, "shop/chatbot", "/EVAL/return%201/0") == (200, b'{"EVAL":1}')
    # Another namespace's workload, or a command outside the filter's paths:
    # refused by the generated AuthorizationPolicy before webdis.
    assert bridge_get(store_mesh, "other/batch", "/EVAL/return%201/0")[0] == 403
    assert bridge_get(store_mesh, "shop/chatbot", "/GET/meshllm%2Fquota%2Fv1%2Fx")[0] == 403


def stat(admin, name):
    _, _, body = http("GET", f"http://127.0.0.1:{admin}/stats?filter=^{re.escape(name)}$")
    (line,) = body.decode().splitlines()
    return int(line.rpartition(": ")[2])


def test_bridge_down_answers_each_rule_as_configured_without_retrying(store_mesh):
    store_mesh["webdis"].stop()
    sidecar = store_mesh["proxies"][0]
    calls_before = stat(store_mesh["bridge_admin"], "http.inbound.downstream_rq_total")
    status, headers, body = chat(sidecar)
    # The example's store fails closed: 503 in the caller's shape.
    assert status == 503, body
    assert json.loads(body)["error"]["code"] == "quota_store_unavailable"
    assert headers.get("retry-after") == "5"
    # The bridge's 503 reached the filter as it was: one call, not retried.
    assert wait_for(lambda: stat(store_mesh["bridge_admin"], "http.inbound.downstream_rq_total")
                    == calls_before + 1, timeout=5)
    for cluster in (manifests.STORE_CLUSTER, manifests.STORE_ISTIO_CLUSTER):
        assert stat(sidecar["admin"], f"cluster.{cluster}.upstream_rq_retry") == 0


def test_the_egress_gateway_counts_shared_rules_through_the_bridge(wasm, mocks, tmp_path):
    """Gateway mode: the bridge's cluster is added in the gateway, which
    calls it with its own service account's certificate."""
    with store_install("egress-gateway", tmp_path, mocks) as mesh:
        (gateway,) = mesh["proxies"]
        statuses = [mtls_post(gateway, "shop/chatbot", "api.openai.com", chat_body("mini"))[0]
                    for _ in range(LIMIT + 1)]
        assert statuses == [200] * LIMIT + [429], statuses
        assert shared_count(mesh["redis"]) == [LIMIT]
        # A sidecar's certificate is not the gateway's: refused at the bridge.
        assert bridge_get(mesh, "shop/chatbot", "/EVAL/return%201/0")[0] == 403
        assert bridge_get(mesh, "gateway", "/EVAL/return%201/0") == (200, b'{"EVAL":1}')


def test_a_sidecar_that_cannot_see_the_bridge_follows_the_rules_failure_mode(wasm, mocks, tmp_path):
    """No cluster behind meshllm.store: each call fails at once (no wait for
    the timeout) and the closed rule answers 503."""
    with store_install("sidecar", tmp_path, mocks, hidden=True, timeout_ms=3000) as mesh:
        (sidecar,) = mesh["proxies"]
        started = time.monotonic()
        status, headers, body = chat(sidecar)
        assert status == 503, body
        assert json.loads(body)["error"]["code"] == "quota_store_unavailable"
        assert time.monotonic() - started < 1.5
        assert shared_count(mesh["redis"]) == []
