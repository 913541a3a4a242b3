"""A small, strict Istio emulator for tests: Istio resources in, an Envoy
bootstrap for one proxy out, as istiod + istio-agent would configure it.

No cluster or istiod runs here, so tests build the configuration Istio
would push to one proxy and run it in a real Envoy. The behaviour follows
istio/istio (read, not copied):

- pilot/pkg/networking/core/envoyfilter/{listener_patch,rc_patch,cluster_patch,
  extension_configuration_patch,util}.go: patch operations and match rules;
- pkg/proto/merge/merge.go, pilot/pkg/networking/util/util.go
  (MergeAnyWithAny): MERGE semantics;
- pilot/pkg/model/push_context.go (EnvoyFilters, sortEnvoyFilters),
  pilot/pkg/model/envoyfilter.go (convertToEnvoyFilterWrapper),
  pilot/pkg/model/policyattachment.go: which EnvoyFilters apply, in what order;
- pilot/pkg/networking/core/httproute.go, route/route.go, route/retry/retry.go:
  sidecar route config "80", virtual hosts, domains, default and VS routes;
- pilot/pkg/networking/core/gateway.go, pilot/pkg/model/gateway.go: gateway
  listeners (`0.0.0.0_<targetPort>`), RDS names (`http.<targetPort>`,
  `https.<port>.<portName>.<gateway>.<ns>`), vhosts, port maps;
- pilot/pkg/networking/core/cluster_tls.go, pilot/pkg/model/service.go:
  cluster names (`outbound|<port>|<subset>|<host>`), DestinationRule TLS;
- pilot/pkg/networking/core/listener_builder.go: HCM settings and filter order;
- pkg/bootstrap/config.go: node id and cluster; pkg/wasm/convert.go: the
  agent's rewrite of remote Wasm code to a local file, and its fail-closed
  substitute when the module cannot be fetched;
- pilot/pkg/model/sidecar.go, push_context.go: Sidecar scope and exportTo;
- pilot/pkg/networking/core/cluster_traffic_policy.go, cluster_builder.go:
  default circuit breakers, external-service metadata;
- pilot/pkg/xds/filters/filters.go, istio/proxy source/extensions/filters/
  http/peer_metadata/filter.cc: the metadata exchange filter.

Emulated
--------
* Sidecar outbound HTTP port 80 (`sidecar_bootstrap`): listener `0.0.0.0_80`
  (bound to 127.0.0.1:<port>), HCM stat prefix `outbound_0.0.0.0_80`, filters
  istio.metadata_exchange (a Lua stand-in, see _metadata_exchange), grpc_stats,
  fault, cors, router (Istio's order, minus its proprietary istio.alpn /
  istio.stats, which vanilla Envoy lacks); inline route config `80` standing
  for RDS, `ignore_port_in_host_matching`.
  One vhost `<host>:80` per ServiceEntry / Kubernetes Service host with an HTTP
  (or sniffed) port 80, domains as current Istio makes them: the host, its
  absolute form `<host>.`, for Kubernetes services the short names
  (`name`, `name.ns`, `name.ns.svc` in the same namespace; `name.ns`,
  `name.ns.svc` from another), the cluster IP / SE addresses; no `:80` variants
  (Istio >= 1.2x ignores the port in host matching). VirtualService-only hosts
  get a vhost too (domains: the host). Catch-all vhost (httproute.go
  buildCatchAllVirtualHost): `allow_any` (domains `*`, route `allow_any` to
  `PassthroughCluster`) under ALLOW_ANY, `block_all` (a 502 direct response)
  under REGISTRY_ONLY (`outbound_traffic_policy`, or the Sidecar's).
* Visibility (pilot/pkg/model/sidecar.go, push_context.go getSidecarScope):
  exportTo of ServiceEntries, Services (annotation), DestinationRules and
  VirtualServices; a Sidecar resource (one egress listener without port)
  chosen by workloadSelector, then the namespace's default, then the root
  namespace's: its egress hosts `ns/host` import services and
  VirtualServices, and the services those VirtualServices route to.
* VirtualServices (mesh-bound on the sidecar, gateway-bound on gateways):
  http[].match uri exact/prefix/regex, headers exact/prefix/regex, port,
  gateways, sourceLabels, name, ignoreUriCase; route[].destination
  host/port/subset with weights (weighted_clusters), timeout, retries
  (attempts, perTryTimeout, retryOn without status codes), rewrite uri/authority.
  Route names (`<http.name>[.<match.name>]`, `default`), metadata, decorators,
  the default retry policy and "0s" timeouts follow Istio.
* Clusters `outbound|<port>||<host>` for every port of every visible service
  plus `outbound|<port>|<subset>|<host>` for every DestinationRule subset;
  BlackHoleCluster (and PassthroughCluster on sidecars). Istio's default
  circuit breakers (MaxUint32, cluster_traffic_policy.go) on every service
  cluster and PassthroughCluster; `istio.external` metadata on MESH_EXTERNAL
  ServiceEntries' clusters (cluster_builder.go). No
  per_connection_buffer_limit_bytes anywhere, as in Istio (pilot sets none):
  Envoy's 1 MiB applies. DestinationRule
  trafficPolicy (top level, portLevelSettings, subset level) `tls` modes
  DISABLE, SIMPLE (sni, subjectAltNames, system CA; no sni -> auto_sni and
  auto_san_validation like Istio) and ISTIO_MUTUAL (client cert from `mesh_tls`,
  default SNI `outbound_.<port>_.<subset>_.<host>`, ALPN istio-peer-exchange,
  istio); `loadBalancer.simple`; `connectionPool` tcp.connectTimeout and
  http.idleTimeout only.
* Gateways (`gateway_bootstrap`): Gateway resources whose selector matches the
  labels; HTTP servers and HTTPS servers with tls.mode ISTIO_MUTUAL. Port
  translation through a Kubernetes Service selecting the gateway (server port ->
  targetPort, as `resolvePorts` does with legacy selectors). Vhosts
  `<host>:<server port>`, collapsed when they share routes (as Istio's
  collapseDuplicateRoutes does), `blackhole:<port>` when nothing binds.
  Gateways use the default scope (no Sidecar resource applies to them).
* EnvoyFilters (`apply_envoy_filters`): selection (root namespace + workload
  namespace, workloadSelector subset match), Istio's order (priority, then root
  namespace first, then creation order = list order, then name), and the
  patches listed in `apply_envoy_filters`, with Istio's match and MERGE rules.
* istio-agent ECDS + Wasm (`agent_emulate`, pkg/wasm/convert.go, cache.go):
  remote code fetched (or not: `modules`) and rewritten to a local file;
  a module that cannot be had (unreachable, wrong sha256, not Wasm, an empty
  pull secret, an unknown URL scheme) replaces the whole ECDS resource with
  a deny-all RBAC filter (allow-all when the plugin fails open); Envoy then
  applies or rejects each resource by its reference's type_urls.

Not emulated (raises NotImplementedError or ValueError)
-------------------------------------------------------
Inbound listeners, ports other than 80 on sidecars, TCP/TLS routes, Sidecar
resources with several or port-bound egress listeners or ingress,
PeerAuthentication/auto-mTLS, DNS (endpoints come from the test),
ServiceEntry workloadSelector/wildcard hosts, VirtualService delegation, header
manipulation, redirects, direct responses, faults, mirrors, CORS, Gateway TLS
modes other than ISTIO_MUTUAL, credentialName, EnvoyFilter targetRefs,
proxy/proxyVersion matches, filterClass, LISTENER_FILTER, FILTER_CHAIN,
LISTENER ADD/REMOVE, NETWORK_FILTER operations other than MERGE,
MERGE_AND_REPLACE_LIST, MERGE values holding proto3 zero values (Istio's merge
ignores them for plain scalars and we cannot tell them from wrappers),
camelCase field names in patch values, the agent's pull policies and cache.

Simplifications (documented, not errors)
----------------------------------------
* Every cluster is STATIC with the endpoint the test gives (`endpoints`:
  `{host: (ip, port)}` or `{(host, port): (ip, port)}`); clusters of hosts
  without one have no endpoints (like an empty EDS). PassthroughCluster is
  ORIGINAL_DST in Istio; with no iptables here its original destination
  would be the listener itself, so it reaches `passthrough` (ip, port) when
  the test gives one (standing for the app's own destination), and answers
  503 otherwise.
* SDS is replaced by files: the system CA path, and `mesh_tls` {cert, key, ca}
  for Istio mTLS. ISTIO_MUTUAL SAN checks only use subjectAltNames given in the
  resources (Istio would also add the destination's service accounts).
* Listener `portNumber` matches the port in the Istio listener name
  (`0.0.0.0_<port>`), since the real listener binds to a test port.
  For gateways that is the targetPort, as in Istio; RDS `portNumber` on gateways
  matches the server (Service) port through the port map, as in Istio (the map
  is rebuilt from the `<host>:<port>` vhost names of the route config).
* MERGE knows these map fields (merged by key, values replaced):
  filter_metadata, typed_filter_metadata, typed_per_filter_config,
  typed_extension_protocol_options, key_values; Struct values (TypedStruct
  value, Any of google.protobuf.Struct) merge by top-level key. Any nested in a
  merged message is replaced, as proto merge of Any bytes does. Known oneofs are
  honoured (setting `direct_response` clears `route`, and so on).
* ECDS is served from files (path_config_source): Envoy rejects a resource of
  a type its reference does not list exactly as it NACKs one over ADS, and
  the filter is left without config (requests on its routes get 500, NFCF).
"""

import base64
import copy
import hashlib
import json
import os
import re
from pathlib import Path

import yaml

DOMAIN = "cluster.local"
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
MESH_ID = "cluster.local"
CLUSTER_ID = "Kubernetes"
CONNECT_TIMEOUT = "10s"
MAX_DIRECT_RESPONSE_BODY = 1048576

HCM_NAME = "envoy.filters.network.http_connection_manager"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_NAME = "envoy.filters.http.router"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_OPTIONS_TYPE = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
TLS_SOCKET = "envoy.transport_sockets.tls"
UPSTREAM_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
DOWNSTREAM_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
TEC_TYPE = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
STRUCT_TYPE = "type.googleapis.com/google.protobuf.Struct"
TYPED_STRUCT_TYPES = ("type.googleapis.com/udpa.type.v1.TypedStruct", "type.googleapis.com/xds.type.v3.TypedStruct")

PASSTHROUGH = "allow_any"
BLACKHOLE = "block_all"
PASSTHROUGH_CLUSTER = "PassthroughCluster"
MX_FILTER = "istio.metadata_exchange"
MAX_UINT32 = 4294967295
BLACKHOLE_CLUSTER = "BlackHoleCluster"
MESH_GATEWAY = "mesh"

DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"

CONTEXTS = ("ANY", "SIDECAR_OUTBOUND", "SIDECAR_INBOUND", "GATEWAY")


class IstioSimError(ValueError):
    """A resource Istio would reject, or that would break Istio at runtime."""


def _unsupported(what):
    raise NotImplementedError(f"istio_sim does not emulate {what}")


# --------------------------------------------------------------------------
# Loading


def load_resources(*sources):
    """Every resource in `sources`: paths to YAML files, or YAML text
    (multi-document). `kind: List` documents are expanded; empty ones skipped."""
    out = []
    for src in sources:
        if isinstance(src, Path) or (isinstance(src, str) and "\n" not in src and os.path.isfile(src)):
            text = Path(src).read_text()
        else:
            text = src
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc:
                raise IstioSimError(f"not a Kubernetes resource: {doc!r:.80}")
            if doc["kind"] == "List":
                out.extend(doc.get("items") or [])
            else:
                out.append(doc)
    return out


def split_kinds(resources):
    """{kind: [resources]} in input order."""
    out = {}
    for r in resources:
        out.setdefault(r["kind"], []).append(r)
    return out


def _meta(r):
    m = r.get("metadata") or {}
    if not m.get("name"):
        raise IstioSimError(f"{r.get('kind')} without metadata.name")
    return m["name"], m.get("namespace") or "default"


def _config_path(r):
    name, ns = _meta(r)
    group_version = r.get("apiVersion", "networking.istio.io/v1")
    kebab = re.sub(r"(?<!^)([A-Z])", r"-\1", r["kind"]).lower()
    return f"/apis/{group_version}/namespaces/{ns}/{kebab}/{name}"


def _visible(export_to, resource_ns, proxy_ns):
    """exportTo visibility (absent or `*`: everywhere; `.`: own namespace)."""
    if not export_to:
        return True
    for e in export_to:
        if e == "*" or (e == "." and resource_ns == proxy_ns) or e == proxy_ns:
            return True
    return False


def _check_keys(obj, allowed, where):
    extra = set(obj or {}) - set(allowed)
    if extra:
        _unsupported(f"{where} field(s) {sorted(extra)}")


# --------------------------------------------------------------------------
# Service registry


_HTTP_PROTOCOLS = {"HTTP", "HTTP2", "GRPC", "GRPC-WEB", "HTTP_PROXY"}
_KNOWN_PROTOCOLS = _HTTP_PROTOCOLS | {"HTTPS", "TCP", "TLS", "MONGO", "REDIS", "MYSQL", "UDP"}


def _port_protocol(name, protocol=None, app_protocol=None):
    """Istio protocol of a port: explicit, appProtocol, or name prefix;
    "" when it would be sniffed."""
    for cand in (protocol, app_protocol):
        if cand and cand.upper() in _KNOWN_PROTOCOLS:
            return cand.upper()
    prefix = (name or "").split("-")[0].upper()
    return prefix if prefix in _KNOWN_PROTOCOLS else ""


def _http_or_sniffed(protocol):
    return protocol == "" or protocol in _HTTP_PROTOCOLS


class _Service:
    def __init__(self, host, namespace, ports, registry, addresses=(), sans=(), export_to=None, source=None,
                 external=False):
        self.host = host
        self.external = external
        self.namespace = namespace
        self.ports = ports  # [{"number", "protocol", "name", "target"}]
        self.registry = registry  # "Kubernetes" | "External"
        self.addresses = list(addresses)
        self.sans = list(sans)
        self.export_to = export_to
        self.source = source

    def port(self, number):
        for p in self.ports:
            if p["number"] == number:
                return p
        return None


def _services(kinds, proxy_ns, scope=None):
    """Visible services by host, in creation (list) order: exported to the
    proxy's namespace and, for a sidecar under a Sidecar resource, imported
    by its egress hosts (`scope`, see _sidecar_scope)."""
    out = {}
    for se in kinds.get("ServiceEntry", []):
        name, ns = _meta(se)
        spec = se.get("spec") or {}
        _check_keys(spec, {"hosts", "ports", "resolution", "location", "exportTo", "addresses",
                           "subjectAltNames", "endpoints"}, f"ServiceEntry {ns}/{name} spec")
        ports = []
        for p in spec.get("ports") or []:
            ports.append({"number": int(p["number"]), "protocol": _port_protocol(p.get("name"), p.get("protocol")),
                          "name": p.get("name", ""), "target": p.get("targetPort")})
        for h in spec.get("hosts") or []:
            if "*" in h:
                _unsupported(f"wildcard ServiceEntry host {h!r}")
            svc = _Service(h.lower(), ns, ports, "External", spec.get("addresses") or [],
                           spec.get("subjectAltNames") or [], spec.get("exportTo"), se,
                           external=spec.get("location") == "MESH_EXTERNAL")
            if _visible(svc.export_to, ns, proxy_ns) and _imported(scope, svc.namespace, svc.host):
                out.setdefault(svc.host, svc)
    for ks in kinds.get("Service", []):
        name, ns = _meta(ks)
        spec = ks.get("spec") or {}
        if spec.get("type") == "ExternalName":
            _unsupported(f"ExternalName Service {ns}/{name}")
        ports = []
        for p in spec.get("ports") or []:
            ports.append({"number": int(p["port"]),
                          "protocol": _port_protocol(p.get("name"), None, p.get("appProtocol")),
                          "name": p.get("name", ""), "target": p.get("targetPort", p["port"])})
        export = (ks["metadata"].get("annotations") or {}).get("networking.istio.io/exportTo")
        export_to = [e.strip() for e in export.split(",")] if export else None
        ip = spec.get("clusterIP")
        addresses = [ip] if ip and ip != "None" else []
        svc = _Service(f"{name}.{ns}.svc.{DOMAIN}", ns, ports, "Kubernetes", addresses, (), export_to, ks)
        if _visible(export_to, ns, proxy_ns) and _imported(scope, svc.namespace, svc.host):
            out.setdefault(svc.host, svc)
    return out


def _sidecar_scope(kinds, proxy_ns, labels, root_namespace):
    """The Sidecar resource that scopes a sidecar (PushContext.getSidecarScope:
    one of its namespace whose workloadSelector matches, else its
    namespace's one without selector, else the root namespace's), as
    (egress hosts by namespace, outbound traffic policy mode or None).
    None: no Sidecar, everything exported to the namespace is visible.
    Egress hosts follow pilot/pkg/model/sidecar.go
    (convertIstioListenerToWrapper): `ns/host`, `.` the proxy's namespace,
    `*` any namespace, host `*` or `*.suffix` wildcards; `~` imports nothing."""
    def pick(candidates):
        with_selector = [sc for sc in candidates if (sc.get("spec") or {}).get("workloadSelector")]
        for sc in with_selector:
            sel = (sc["spec"]["workloadSelector"] or {}).get("labels") or {}
            if all(labels.get(k) == v for k, v in sel.items()):
                return sc
        plain = [sc for sc in candidates if not (sc.get("spec") or {}).get("workloadSelector")]
        return plain[0] if plain else None

    sidecars = kinds.get("Sidecar", [])
    chosen = pick([sc for sc in sidecars if _meta(sc)[1] == proxy_ns])
    if chosen is None:
        chosen = pick([sc for sc in sidecars if _meta(sc)[1] == root_namespace
                       and not (sc.get("spec") or {}).get("workloadSelector")])
    if chosen is None:
        return None
    name, ns = _meta(chosen)
    spec = chosen.get("spec") or {}
    _check_keys(spec, {"workloadSelector", "egress", "outboundTrafficPolicy"}, f"Sidecar {ns}/{name} spec")
    egress = spec.get("egress") or [{"hosts": ["*/*"]}]
    if len(egress) != 1:
        _unsupported(f"Sidecar {ns}/{name} with several egress listeners")
    _check_keys(egress[0], {"hosts"}, f"Sidecar {ns}/{name} egress")
    hosts = {}
    for h in egress[0].get("hosts") or []:
        if h.count("/") != 1:
            raise IstioSimError(f"Sidecar {ns}/{name}: host {h!r} is not namespace/dnsName")
        host_ns, host = h.split("/")
        hosts.setdefault(proxy_ns if host_ns == "." else host_ns, []).append(host.lower())
    policy = spec.get("outboundTrafficPolicy") or {}
    _check_keys(policy, {"mode"}, f"Sidecar {ns}/{name} outboundTrafficPolicy")
    return {"hosts": hosts, "outbound": policy.get("mode")}


def _imported(scope, namespace, host):
    """selectServices/SelectVirtualServices: an explicit `ns/...` import of
    the config's namespace, or a `*/...` one, whose host matches."""
    if scope is None:
        return True
    for ns in (namespace, "*"):
        for pattern in scope["hosts"].get(ns, []):
            if _host_matches(pattern, host) or _host_matches(host, pattern):
                return True
    return False


def _fqdn(host, ns):
    """ResolveShortnameToFQDN: names without a dot are Kubernetes short names."""
    if host == "*" or "." in host or re.fullmatch(r"[0-9.:]+", host):
        return host
    return f"{host}.{ns}.svc.{DOMAIN}"


def _host_matches(pattern, host):
    """host.Name.Matches: `*` and `*.suffix` wildcards."""
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        if host.startswith("*"):
            return host.endswith(pattern[1:]) and len(host) >= len(pattern)
        return host.endswith(pattern[1:])
    return pattern == host


# --------------------------------------------------------------------------
# DestinationRules and clusters


def _destination_rules(kinds, proxy_ns):
    out = {}
    for dr in kinds.get("DestinationRule", []):
        name, ns = _meta(dr)
        spec = dr.get("spec") or {}
        _check_keys(spec, {"host", "trafficPolicy", "subsets", "exportTo"}, f"DestinationRule {ns}/{name} spec")
        if not _visible(spec.get("exportTo"), ns, proxy_ns):
            continue
        host = _fqdn(spec["host"], ns)
        if "*" in host:
            _unsupported(f"wildcard DestinationRule host {host!r}")
        if host in out:
            raise IstioSimError(f"two DestinationRules for {host}: Istio merges or ignores them; the emulator refuses")
        out[host] = dr
    return out


def _check_policy(policy, where):
    _check_keys(policy, {"tls", "loadBalancer", "portLevelSettings", "connectionPool"}, where)
    lb = policy.get("loadBalancer")
    if lb is not None:
        _check_keys(lb, {"simple"}, f"{where}.loadBalancer")
    pool = policy.get("connectionPool")
    if pool is not None:
        _check_keys(pool, {"tcp", "http"}, f"{where}.connectionPool")
        _check_keys(pool.get("tcp"), {"connectTimeout"}, f"{where}.connectionPool.tcp")
        _check_keys(pool.get("http"), {"idleTimeout"}, f"{where}.connectionPool.http")


_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def _duration(value, where):
    """An Istio duration ("200ms", "1.5s", "1h") as Envoy's JSON ("0.200s")."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)", str(value))
    if not m:
        raise IstioSimError(f"{where}: {value!r} is not a duration")
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    return f"{seconds:.3f}s"


def _connection_pool(pool, cluster, http2):
    """applyConnectionPool (cluster_traffic_policy.go): tcp.connectTimeout is
    the cluster's connect_timeout; http.idleTimeout its upstream HTTP
    protocol options' idle_timeout."""
    if not pool:
        return
    connect = (pool.get("tcp") or {}).get("connectTimeout")
    if connect is not None:
        cluster["connect_timeout"] = _duration(connect, "connectionPool.tcp.connectTimeout")
    idle = (pool.get("http") or {}).get("idleTimeout")
    if idle is not None:
        opts = cluster.setdefault("typed_extension_protocol_options", {}).setdefault(
            HTTP_OPTIONS_KEY, {"@type": HTTP_OPTIONS_TYPE})
        if not any(k in opts for k in ("explicit_http_config", "use_downstream_protocol_config",
                                       "auto_config")):
            opts["explicit_http_config"] = {"http2_protocol_options" if http2 else "http_protocol_options": {}}
        opts["common_http_protocol_options"] = {"idle_timeout": _duration(idle, "connectionPool.http.idleTimeout")}


def _effective_policy(dr, port, subset):
    """MergeTrafficPolicy: subset policy over top level; port-level settings
    (of the winning level) override per field."""
    spec = (dr or {}).get("spec") or {}
    policy = {}
    levels = [spec.get("trafficPolicy") or {}]
    if subset is not None:
        levels.append(subset.get("trafficPolicy") or {})
    for level in levels:
        _check_policy(level, "DestinationRule trafficPolicy")
        for key in ("tls", "loadBalancer", "connectionPool"):
            if key in level:
                policy[key] = level[key]
        for pls in level.get("portLevelSettings") or []:
            _check_keys(pls, {"port", "tls", "loadBalancer", "connectionPool"}, "DestinationRule portLevelSettings")
            if int((pls.get("port") or {}).get("number", -1)) == port:
                for key in ("tls", "loadBalancer", "connectionPool"):
                    if key in pls:
                        policy[key] = pls[key]
    return policy


_LB = {"ROUND_ROBIN": "ROUND_ROBIN", "LEAST_REQUEST": "LEAST_REQUEST", "LEAST_CONN": "LEAST_REQUEST",
       "RANDOM": "RANDOM", "UNSPECIFIED": "LEAST_REQUEST"}


def _san_matchers(sans):
    return [{"san_type": "URI" if s.startswith("spiffe://") else "DNS", "matcher": {"exact": s}} for s in sans]


def _upstream_tls(tls, svc, port, subset_name, cluster, mesh_tls, http2=False):
    mode = (tls or {}).get("mode", "DISABLE")
    if tls:
        _check_keys(tls, {"mode", "sni", "subjectAltNames"}, f"DestinationRule tls for {svc.host}")
    tls_params = {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"}
    if mode == "DISABLE":
        return
    if mode == "SIMPLE":
        sans = tls.get("subjectAltNames") or (svc.sans if svc.registry == "External" else [])
        validation = {"trusted_ca": {"filename": SYSTEM_CA}}
        if sans:
            validation["match_typed_subject_alt_names"] = _san_matchers(sans)
        ctx = {"@type": UPSTREAM_TLS_TYPE,
               "common_tls_context": {"tls_params": tls_params, "validation_context": validation}}
        if http2:
            ctx["common_tls_context"]["alpn_protocols"] = ["h2"]
        if tls.get("sni"):
            ctx["sni"] = tls["sni"]
        else:
            # setAutoSniAndAutoSanValidation
            upstream = {"auto_sni": True}
            if not tls.get("subjectAltNames"):
                upstream["auto_san_validation"] = True
            opts = cluster.setdefault("typed_extension_protocol_options", {}).setdefault(
                HTTP_OPTIONS_KEY, {"@type": HTTP_OPTIONS_TYPE, "use_downstream_protocol_config": {}})
            opts["upstream_http_protocol_options"] = upstream
    elif mode == "ISTIO_MUTUAL":
        if not mesh_tls:
            raise IstioSimError(f"{cluster['name']} needs ISTIO_MUTUAL but no mesh_tls={{cert,key,ca}} was given")
        validation = {"trusted_ca": {"filename": mesh_tls["ca"]}}
        if tls.get("subjectAltNames"):
            validation["match_typed_subject_alt_names"] = _san_matchers(tls["subjectAltNames"])
        ctx = {
            "@type": UPSTREAM_TLS_TYPE,
            "sni": tls.get("sni") or f"outbound_.{port}_.{subset_name}_.{svc.host}",
            "common_tls_context": {
                "tls_params": tls_params,
                "alpn_protocols": ["istio-peer-exchange", "istio"] + (["h2"] if http2 else []),
                "tls_certificates": [{"certificate_chain": {"filename": mesh_tls["cert"]},
                                      "private_key": {"filename": mesh_tls["key"]}}],
                "validation_context": validation,
            },
        }
    else:
        _unsupported(f"DestinationRule tls mode {mode}")
    cluster["transport_socket"] = {"name": TLS_SOCKET, "typed_config": ctx}


def _endpoint(endpoints, host, port):
    ep = endpoints.get((host, port)) or endpoints.get(host)
    if ep is None:
        return []
    ip, p = ep
    return [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": ip, "port_value": int(p)}}}}]}]


def _circuit_breakers():
    """getDefaultCircuitBreakerThresholds (cluster_traffic_policy.go): Istio
    lifts Envoy's defaults (3 retries, 1024 requests in flight) on every
    cluster it builds, PassthroughCluster included."""
    return {"thresholds": [{"max_connections": MAX_UINT32, "max_pending_requests": MAX_UINT32,
                            "max_requests": MAX_UINT32, "max_retries": MAX_UINT32, "track_remaining": True}]}


def _clusters(services, drs, endpoints, mesh_tls, sidecar, passthrough=None):
    """Istio's outbound clusters. Like Istio (cluster_builder.go), they set
    no per_connection_buffer_limit_bytes: Envoy's default of 1 MiB applies
    to every listener and cluster unless an EnvoyFilter raises it."""
    out = []
    for svc in services.values():
        dr = drs.get(svc.host)
        subsets = ((dr or {}).get("spec") or {}).get("subsets") or []
        for p in svc.ports:
            for subset in [None] + subsets:
                subset_name = "" if subset is None else subset["name"]
                if subset is not None:
                    _check_keys(subset, {"name", "labels", "trafficPolicy"}, "DestinationRule subset")
                name = f"outbound|{p['number']}|{subset_name}|{svc.host}"
                policy = _effective_policy(dr, p["number"], subset)
                cluster = {
                    "name": name,
                    "type": "STATIC",
                    "connect_timeout": CONNECT_TIMEOUT,
                    "lb_policy": _LB[(policy.get("loadBalancer") or {}).get("simple", "UNSPECIFIED")],
                    "common_lb_config": {},
                    "load_assignment": {"cluster_name": name, "endpoints": _endpoint(endpoints, svc.host, p["number"])},
                    "circuit_breakers": _circuit_breakers(),
                    "metadata": {"filter_metadata": {"istio": {
                        # buildCluster: MESH_EXTERNAL services are marked
                        # external (read by the metadata exchange filter).
                        **({"external": True} if svc.external else {}),
                        "services": [{"host": svc.host, "name": svc.host if svc.registry == "External" else _meta(svc.source)[0],
                                      "namespace": svc.namespace}],
                        **({"config": _config_path(dr)} if dr else {}),
                        **({"subset": subset_name} if subset_name else {}),
                    }}},
                }
                http2 = p["protocol"] in ("HTTP2", "GRPC", "GRPC-WEB")
                if http2:
                    cluster["typed_extension_protocol_options"] = {HTTP_OPTIONS_KEY: {
                        "@type": HTTP_OPTIONS_TYPE, "explicit_http_config": {"http2_protocol_options": {}}}}
                _upstream_tls(policy.get("tls"), svc, p["number"], subset_name, cluster, mesh_tls, http2)
                _connection_pool(policy.get("connectionPool"), cluster, http2)
                out.append(cluster)
    out.append({"name": BLACKHOLE_CLUSTER, "type": "STATIC", "connect_timeout": CONNECT_TIMEOUT,
                "load_assignment": {"cluster_name": BLACKHOLE_CLUSTER}})
    if sidecar:
        # ORIGINAL_DST in Istio: wherever the app connected. `passthrough`
        # stands for that address (with no iptables here, the original
        # destination would be the listener itself).
        load = {"cluster_name": PASSTHROUGH_CLUSTER}
        if passthrough is not None:
            load["endpoints"] = _endpoint({PASSTHROUGH_CLUSTER: passthrough}, PASSTHROUGH_CLUSTER, 0)
        out.append({"name": PASSTHROUGH_CLUSTER, "type": "STATIC", "connect_timeout": CONNECT_TIMEOUT,
                    "circuit_breakers": _circuit_breakers(), "load_assignment": load})
    return out


# --------------------------------------------------------------------------
# VirtualService routes


def _resolve_gateway(name, ns):
    """resolveGatewayName: `name` -> `ns/name`, `./name` -> `ns/name`."""
    if name == MESH_GATEWAY:
        return name
    if "/" in name:
        first, rest = name.split("/", 1)
        return f"{ns}/{rest}" if first == "." else name
    if "." in name:
        first, rest = name.split(".", 1)
        return f"{rest.split('.')[0]}/{first}"
    return f"{ns}/{name}"


def _vs_gateways(vs):
    name, ns = _meta(vs)
    gws = (vs.get("spec") or {}).get("gateways") or [MESH_GATEWAY]
    return {_resolve_gateway(g, ns) for g in gws}


def _virtual_services(kinds, proxy_ns, scope=None):
    out = []
    for vs in kinds.get("VirtualService", []):
        name, ns = _meta(vs)
        spec = vs.get("spec") or {}
        _check_keys(spec, {"hosts", "gateways", "http", "exportTo"}, f"VirtualService {ns}/{name} spec")
        hosts = [_fqdn(h.lower(), ns) for h in spec.get("hosts") or []]
        if _visible(spec.get("exportTo"), ns, proxy_ns) and any(_imported(scope, ns, h) for h in hosts):
            out.append(vs)
    return out


def _vs_destinations(kinds, vss, proxy_ns, services):
    """collectImportedServices: a sidecar also sees the services its
    imported VirtualServices route to (exported to its namespace)."""
    wanted = set()
    for vs in vss:
        _, ns = _meta(vs)
        for http in (vs.get("spec") or {}).get("http") or []:
            for d in http.get("route") or []:
                wanted.add(_fqdn(d["destination"]["host"].lower(), ns))
    extra = _services(kinds, proxy_ns)
    for host in wanted - set(services):
        if host in extra:
            services[host] = extra[host]
    return services


def _string_match(m, where):
    _check_keys(m, {"exact", "prefix", "regex"}, where)
    if len(m) != 1:
        raise IstioSimError(f"{where}: exactly one of exact/prefix/regex")
    (kind, value), = m.items()
    return {"safe_regex": {"regex": value}} if kind == "regex" else {kind: value}


def _route_match(match, where):
    if match is None:
        return {"prefix": "/"}
    out = {"prefix": "/"}
    headers = []
    for hname, hm in sorted((match.get("headers") or {}).items()):
        headers.append({"name": hname, "string_match": _string_match(hm, f"{where}.headers.{hname}")})
    uri = match.get("uri")
    if uri is not None:
        sm = _string_match(uri, f"{where}.uri")
        out = {"path": sm["exact"]} if "exact" in sm else sm
    out["case_sensitive"] = not match.get("ignoreUriCase", False)
    if headers:
        out["headers"] = headers
    return out


def _is_catch_all(route):
    m = route["match"]
    return (m.get("prefix") == "/" or (m.get("safe_regex") or {}).get("regex") == ".*") and not m.get("headers") \
        and not m.get("query_parameters")


def _retry_policy(retries, where):
    policy = {
        "retry_on": DEFAULT_RETRY_ON,
        "num_retries": 2,
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": "5",
    }
    if retries is None:
        return policy
    _check_keys(retries, {"attempts", "perTryTimeout", "retryOn"}, f"{where}.retries")
    if int(retries.get("attempts", 0)) <= 0:
        return None
    policy["num_retries"] = int(retries["attempts"])
    if retries.get("retryOn"):
        if any(part.strip().isdigit() for part in retries["retryOn"].split(",")):
            _unsupported(f"{where}.retries.retryOn status codes")
        policy["retry_on"] = retries["retryOn"]
    if retries.get("perTryTimeout"):
        policy["per_try_timeout"] = retries["perTryTimeout"]
    return policy


def _cluster_for(dest, services, listen_port, where):
    _check_keys(dest, {"host", "port", "subset"}, f"{where}.destination")
    host = dest["host"]
    svc = services.get(host)
    if dest.get("port"):
        port = int(dest["port"]["number"])
    elif svc is not None and len(svc.ports) == 1:
        port = svc.ports[0]["number"]
    else:
        port = listen_port
    return f"outbound|{port}|{dest.get('subset', '')}|{host}"


def _translate_routes(vs, services, listen_port, gateway_names, labels, proxy_ns):
    """BuildHTTPRoutesForVirtualService for one port; [] when nothing applies."""
    name, ns = _meta(vs)
    spec = vs.get("spec") or {}
    out = []
    for i, http in enumerate(spec.get("http") or []):
        where = f"VirtualService {ns}/{name} http[{i}]"
        _check_keys(http, {"name", "match", "route", "timeout", "retries", "rewrite"}, where)
        matches = http.get("match") or [None]
        catch_all = not http.get("match")
        for match in matches:
            if match is not None:
                _check_keys(match, {"name", "uri", "headers", "port", "gateways", "sourceLabels", "ignoreUriCase"},
                            f"{where}.match")
                if match.get("port") and int(match["port"]) != listen_port:
                    continue
                if match.get("gateways"):
                    if not {_resolve_gateway(g, ns) for g in match["gateways"]} & gateway_names:
                        continue
                elif not all(labels.get(k) == v for k, v in (match.get("sourceLabels") or {}).items()):
                    continue
            route_name = http.get("name", "")
            if match is not None and match.get("name"):
                route_name = f"{route_name}.{match['name']}"
            action = {"timeout": http.get("timeout", "0s"), "max_grpc_timeout": http.get("timeout", "0s")}
            rewrite = http.get("rewrite")
            if rewrite:
                _check_keys(rewrite, {"uri", "authority"}, f"{where}.rewrite")
                if rewrite.get("uri"):
                    action["prefix_rewrite"] = rewrite["uri"]
                if rewrite.get("authority"):
                    action["host_rewrite_literal"] = rewrite["authority"]
            dests = http.get("route") or []
            if not dests:
                _unsupported(f"{where} without route (redirect/directResponse)")
            if len(dests) == 1:
                _check_keys(dests[0], {"destination", "weight"}, f"{where}.route[0]")
                action["cluster"] = _cluster_for(dests[0]["destination"], services, listen_port, where)
            else:
                weighted = []
                for d in dests:
                    _check_keys(d, {"destination", "weight"}, f"{where}.route[]")
                    if int(d.get("weight", 0)) == 0:
                        continue
                    weighted.append({"name": _cluster_for(d["destination"], services, listen_port, where),
                                     "weight": int(d["weight"])})
                action["weighted_clusters"] = {"clusters": weighted}
            retry = _retry_policy(http.get("retries"), where)
            if retry:
                action["retry_policy"] = retry
            r = {"match": _route_match(match, f"{where}.match"), "route": action,
                 "metadata": {"filter_metadata": {"istio": {"config": _config_path(vs)}}}}
            if route_name:
                r = {"name": route_name, **r}
            path = r["match"].get("prefix", "/") + "*" if "prefix" in r["match"] else \
                r["match"].get("path") or r["match"].get("safe_regex", {}).get("regex")
            if "cluster" in action:
                _, p, _, h = action["cluster"].split("|", 3)
                r["decorator"] = {"operation": f"{h}:{p}{path}"}
            else:
                r["decorator"] = {"operation": f"{name}:{listen_port}{path}"}
            out.append(r)
            if _is_catch_all(r):
                catch_all = True
                break
        if catch_all:
            break
    return out


def _default_route(cluster, host, port):
    return {
        "name": "default",
        "match": {"prefix": "/"},
        "route": {"cluster": cluster, "timeout": "0s", "max_grpc_timeout": "0s", "retry_policy": _retry_policy(None, "")},
        "decorator": {"operation": f"{host}:{port}/*"},
    }


def _domains(svc, proxy_ns):
    """generateVirtualHostDomains with ignore-port (listener port != 0)."""
    domains = [svc.host, svc.host + "."]
    if svc.host.endswith(f".svc.{DOMAIN}"):
        name, ns = svc.host.split(".")[:2]
        if ns == proxy_ns:
            domains += [name, f"{name}.{ns}.svc", f"{name}.{ns}"]
        else:
            domains += [f"{name}.{ns}", f"{name}.{ns}.svc"]
    domains += [a for a in svc.addresses if a and a != "0.0.0.0"]
    return domains


def _sidecar_vhosts(services, vss, labels, proxy_ns, outbound="ALLOW_ANY"):
    port = 80
    wrappers = []  # (vs hosts without service, services, routes)
    covered = set()
    for vs in vss:
        name, ns = _meta(vs)
        if MESH_GATEWAY not in _vs_gateways(vs):
            continue
        routes = _translate_routes(vs, services, port, {MESH_GATEWAY}, labels, proxy_ns)
        if not routes:
            continue
        other_hosts, svcs = [], []
        for h in (vs.get("spec") or {}).get("hosts") or []:
            h = _fqdn(h.lower(), ns)
            if "*" in h:
                _unsupported(f"wildcard VirtualService host {h!r} on the sidecar")
            if h in services:
                svcs.append(services[h])
            else:
                other_hosts.append(h)
        http_ports = {p["number"] for s in svcs for p in s.ports if _http_or_sniffed(p["protocol"])}
        covered.update(s.host for s in svcs)
        if port in http_ports:
            wrappers.append((other_hosts, [s for s in svcs if s.port(port) and _http_or_sniffed(s.port(port)["protocol"])],
                             routes))
        elif not http_ports:
            wrappers.append((other_hosts, [], routes))
    for svc in services.values():
        if svc.host in covered:
            continue
        p = svc.port(port)
        if p and _http_or_sniffed(p["protocol"]):
            wrappers.append(([], [svc], [_default_route(f"outbound|{port}||{svc.host}", svc.host, port)]))
    vhosts, names, seen_domains = [], set(), set()
    for other_hosts, svcs, routes in wrappers:
        for host, svc in [(h, None) for h in other_hosts] + [(s.host, s) for s in svcs]:
            vname = f"{host}:{port}"
            if vname in names:
                raise IstioSimError(f"duplicate virtual host {vname}: Istio would keep only the first")
            names.add(vname)
            domains = [d for d in ([host] if svc is None else _domains(svc, proxy_ns)) if d.lower() not in seen_domains]
            seen_domains.update(d.lower() for d in domains)
            if domains:
                vhosts.append({"name": vname, "domains": domains, "routes": copy.deepcopy(routes)})
    vhosts.sort(key=lambda v: v["name"])
    vhosts.append(_catch_all_vhost(outbound))
    return vhosts


def _catch_all_vhost(outbound):
    """buildCatchAllVirtualHost (httproute.go): ALLOW_ANY sends unknown hosts
    to PassthroughCluster, REGISTRY_ONLY answers them 502 itself."""
    if outbound == "ALLOW_ANY":
        return {
            "name": PASSTHROUGH,
            "domains": ["*"],
            "routes": [{"name": PASSTHROUGH, "match": {"prefix": "/"},
                        "route": {"cluster": PASSTHROUGH_CLUSTER, "timeout": "0s", "max_grpc_timeout": "0s"}}],
        }
    if outbound != "REGISTRY_ONLY":
        raise IstioSimError(f"outbound traffic policy {outbound!r} is ALLOW_ANY or REGISTRY_ONLY")
    return {"name": BLACKHOLE, "domains": ["*"],
            "routes": [{"name": BLACKHOLE, "match": {"prefix": "/"}, "direct_response": {"status": 502}}]}


# --------------------------------------------------------------------------
# Listeners and bootstrap


def _metadata_exchange(node):
    """Istio's metadata exchange filter for outbound traffic, as istiod puts
    it first in every sidecar and gateway HCM (listener_builder.go
    appendMxFilter: SidecarOutboundMetadataFilter, xds/filters/filters.go).
    Its decodeHeaders adds the proxy's own node id and workload metadata to
    every request (istio/proxy source/extensions/filters/http/peer_metadata/
    filter.cc, MXPropagationMethod::inject). It skips clusters marked
    `istio.disable_mx` (HBONE only, none here), and `istio.external` or
    PassthroughCluster only with proxyHeaders.metadataExchangeHeaders
    IN_MESH, which is not the default; so it always adds them here.
    Vanilla Envoy lacks the filter: a Lua filter of the same name sets the
    same two headers (the value is base64 JSON where Istio's is a
    serialized protobuf Struct)."""
    md = node["metadata"]
    workload = {"NAME": md["NAME"], "NAMESPACE": md["NAMESPACE"], "LABELS": md["LABELS"],
                "WORKLOAD_NAME": md["WORKLOAD_NAME"], "CLUSTER_ID": md["CLUSTER_ID"]}
    value = base64.b64encode(json.dumps(workload, sort_keys=True).encode()).decode()
    code = ("function envoy_on_request(handle)\n"
            f"  handle:headers():replace('x-envoy-peer-metadata-id', {json.dumps(node['id'])})\n"
            f"  handle:headers():replace('x-envoy-peer-metadata', {json.dumps(value)})\n"
            "end\n")
    return {"name": MX_FILTER, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": code}}}


def _http_filters(node):
    return [
        _metadata_exchange(node),
        {"name": "envoy.filters.http.grpc_stats", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
            "emit_filter_state": True, "stats_for_all_methods": False}},
        {"name": "envoy.filters.http.fault",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
        {"name": "envoy.filters.http.cors",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
        {"name": ROUTER_NAME,
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
    ]


def _hcm(stat_prefix, route_config, gateway, node):
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "route_config": route_config,
        "http_filters": _http_filters(node),
        "use_remote_address": gateway,
        "normalize_path": True,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "upgrade_configs": [{"upgrade_type": "websocket"}],
        "stream_idle_timeout": "0s",
    }
    if gateway:
        hcm["forward_client_cert_details"] = "SANITIZE_SET"
        hcm["set_current_client_cert_details"] = {"subject": True, "cert": True, "dns": True, "uri": True}
        hcm["http_protocol_options"] = {}
    return {"name": HCM_NAME, "typed_config": hcm}


def _route_config(name, vhosts):
    return {"name": name, "virtual_hosts": vhosts, "validate_clusters": False,
            "max_direct_response_body_size_bytes": MAX_DIRECT_RESPONSE_BODY,
            "ignore_port_in_host_matching": True}


def _node(kind, namespace, labels, node_metadata, pod_name=None, ip="127.0.0.1"):
    workload = labels.get("app") or labels.get("app.kubernetes.io/name") or "workload"
    pod = pod_name or f"{workload}-0"
    app = labels.get("app") or labels.get("app.kubernetes.io/name")
    metadata = {"NAME": pod, "NAMESPACE": namespace, "LABELS": dict(labels), "WORKLOAD_NAME": workload,
                "CLUSTER_ID": CLUSTER_ID, "MESH_ID": MESH_ID}
    metadata.update(node_metadata or {})
    return {"id": f"{kind}~{ip}~{pod}.{namespace}~{namespace}.svc.{DOMAIN}",
            "cluster": f"{app or workload}.{namespace}", "metadata": metadata}


def _bootstrap(node, admin_port, listeners, clusters):
    return {
        "node": node,
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _normalize_endpoints(endpoints):
    return dict(endpoints or {})


def sidecar_bootstrap(resources, *, namespace, labels, port, admin_port, endpoints, node_metadata=None,
                      mesh_tls=None, pod_name=None, passthrough=None, outbound_traffic_policy="ALLOW_ANY",
                      root_namespace="istio-system"):
    """Envoy bootstrap for a sidecar's outbound HTTP port 80, as istiod would
    push it (see the module docstring). `port`: where the listener binds on
    127.0.0.1; `endpoints`: {host or (host, port): (ip, port)}; `passthrough`:
    (ip, port) standing for wherever PassthroughCluster's original
    destination would be; `outbound_traffic_policy`: the mesh's
    (meshConfig.outboundTrafficPolicy.mode), which a Sidecar may override."""
    kinds = split_kinds(resources)
    scope = _sidecar_scope(kinds, namespace, labels, root_namespace)
    services = _services(kinds, namespace, scope)
    drs = _destination_rules(kinds, namespace)
    vss = _virtual_services(kinds, namespace, scope)
    services = _vs_destinations(kinds, vss, namespace, services)
    outbound = (scope or {}).get("outbound") or outbound_traffic_policy
    vhosts = _sidecar_vhosts(services, vss, labels, namespace, outbound)
    node = _node("sidecar", namespace, labels, node_metadata, pod_name)
    listener = {
        "name": "0.0.0.0_80",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "traffic_direction": "OUTBOUND",
        "filter_chains": [{"filters": [_hcm("outbound_0.0.0.0_80", _route_config("80", vhosts), gateway=False,
                                            node=node)]}],
    }
    clusters = _clusters(services, drs, _normalize_endpoints(endpoints), mesh_tls, sidecar=True,
                         passthrough=passthrough)
    return _bootstrap(node, admin_port, [listener], clusters)


def _gateway_target_port(number, kinds, labels):
    """resolvePorts with a legacy selector: the first Service selecting the
    gateway with that port gives its targetPort; else the number as is."""
    for svc in kinds.get("Service", []):
        sel = (svc.get("spec") or {}).get("selector") or {}
        if not sel or any(labels.get(k) != v for k, v in sel.items()):
            continue
        for p in (svc.get("spec") or {}).get("ports") or []:
            if int(p["port"]) == number:
                target = p.get("targetPort", p["port"])
                if not isinstance(target, int):
                    _unsupported(f"named targetPort {target!r} on gateway Service")
                return target
    return number


def _server_hosts_for(server_hosts, gw_ns, vs_ns):
    out = []
    for h in server_hosts:
        if "/" in h:
            ns, h = h.split("/", 1)
            ns = gw_ns if ns == "." else ns
            if ns not in ("*", vs_ns):
                continue
        out.append(h.lower())
    return out


def _intersect_hosts(server_hosts, vs_hosts):
    out = []
    for v in vs_hosts:
        for s in server_hosts:
            if _host_matches(s, v):
                h = v
            elif _host_matches(v, s):
                h = s
            else:
                continue
            if h not in out:
                out.append(h)
    return out


def gateway_bootstrap(resources, *, namespace, labels, port, admin_port, endpoints, mesh_tls=None,
                      node_metadata=None, pod_name=None):
    """Envoy bootstrap for a gateway workload (e.g. an egress gateway) with
    these `labels`, from the Gateways that select it: one listener per
    (target) port, bound to 127.0.0.1:`port`; with several listeners `port`
    is a dict {Istio listener port: local port}."""
    kinds = split_kinds(resources)
    services = _services(kinds, namespace)
    drs = _destination_rules(kinds, namespace)
    vss = _virtual_services(kinds, namespace)
    # Gather servers by listener port (MergeGateways).
    by_port = {}
    for gw in kinds.get("Gateway", []):
        gname, gns = _meta(gw)
        spec = gw.get("spec") or {}
        _check_keys(spec, {"selector", "servers"}, f"Gateway {gns}/{gname} spec")
        sel = spec.get("selector") or {}
        if any(labels.get(k) != v for k, v in sel.items()):
            continue
        for s in spec.get("servers") or []:
            _check_keys(s, {"port", "hosts", "tls", "name"}, f"Gateway {gns}/{gname} server")
            sp = s["port"]
            protocol = sp.get("protocol", "").upper()
            tls = s.get("tls")
            if protocol in ("HTTP", "HTTP2", "GRPC") and not tls:
                route = None  # set below
                kind = "http"
            elif protocol == "HTTPS" and tls and tls.get("mode") == "ISTIO_MUTUAL":
                _check_keys(tls, {"mode", "subjectAltNames"}, f"Gateway {gns}/{gname} server tls")
                kind = "https"
            else:
                _unsupported(f"Gateway server protocol {protocol} with tls {tls!r} ({gns}/{gname})")
            target = _gateway_target_port(int(sp["number"]), kinds, labels)
            if kind == "http":
                route = f"http.{target}"
            else:
                route = f"https.{sp['number']}.{sp['name']}.{gname}.{gns}"
            entry = by_port.setdefault(target, {"kind": kind, "servers": []})
            if entry["kind"] != kind:
                _unsupported(f"plain and TLS servers on the same port {target}")
            entry["servers"].append({"server": s, "gateway": f"{gns}/{gname}", "route": route, "gw_ns": gns})
    if not by_port:
        raise IstioSimError(f"no Gateway selects labels {labels}")
    if not isinstance(port, dict):
        if len(by_port) > 1:
            raise IstioSimError(f"gateway listeners {sorted(by_port)} need port={{listener port: local port}}")
        port = {next(iter(by_port)): port}
    if set(port) != set(by_port):
        raise IstioSimError(f"port must map exactly the gateway listener ports {sorted(by_port)}, got {sorted(port)}")
    node = _node("router", namespace, labels, node_metadata, pod_name)
    listeners = [_gateway_listener(target, entry, port[target], vss, services, labels, namespace, mesh_tls, node)
                 for target, entry in sorted(by_port.items())]
    clusters = _clusters(services, drs, _normalize_endpoints(endpoints), mesh_tls, sidecar=False)
    return _bootstrap(node, admin_port, listeners, clusters)


def _gateway_listener(target, entry, local_port, vss, services, labels, namespace, mesh_tls, node):
    routes_by_name = {}
    for srv in entry["servers"]:
        routes_by_name.setdefault(srv["route"], []).append(srv)
    if entry["kind"] == "https" and len(routes_by_name) > 1:
        _unsupported("several HTTPS servers on one port (SNI filter chains)")
    filter_chains, listener_filters = [], []
    for route_name, servers in routes_by_name.items():
        vhosts = _gateway_vhosts(servers, vss, services, labels, namespace)
        rc = _route_config(route_name, vhosts)
        if entry["kind"] == "http":
            hcm = _hcm(f"outbound_0.0.0.0_{target}", rc, gateway=True, node=node)
            filter_chains.append({"filters": [hcm]})
        else:
            srv = servers[0]
            if not mesh_tls:
                raise IstioSimError("an ISTIO_MUTUAL gateway server needs mesh_tls={cert,key,ca}")
            s = srv["server"]
            hcm = _hcm(s.get("name") or f"outbound_0.0.0.0_{target}", rc, gateway=True, node=node)
            validation = {"trusted_ca": {"filename": mesh_tls["ca"]}}
            if s["tls"].get("subjectAltNames"):
                validation["match_typed_subject_alt_names"] = _san_matchers(s["tls"]["subjectAltNames"])
            chain = {
                "filters": [hcm],
                "transport_socket": {"name": TLS_SOCKET, "typed_config": {
                    "@type": DOWNSTREAM_TLS_TYPE,
                    "require_client_certificate": True,
                    "common_tls_context": {
                        "alpn_protocols": ["h2", "http/1.1"],
                        "tls_certificates": [{"certificate_chain": {"filename": mesh_tls["cert"]},
                                              "private_key": {"filename": mesh_tls["key"]}}],
                        "validation_context": validation,
                    }}},
            }
            sni = sorted({h.split("/", 1)[-1] for h in s.get("hosts") or []})
            if sni and "*" not in sni:
                chain["filter_chain_match"] = {"server_names": sni}
            listener_filters = [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}]
            filter_chains.append(chain)
    listener = {
        "name": f"0.0.0.0_{target}",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": local_port}},
        "traffic_direction": "OUTBOUND",
        "filter_chains": filter_chains,
    }
    if listener_filters:
        listener["listener_filters"] = listener_filters
    return listener


def _gateway_vhosts(servers, vss, services, labels, proxy_ns):
    """buildGatewayHTTPRouteConfig for one route name."""
    dedup = {}  # host -> vhost (routes as lists of shared dicts)
    for srv in servers:
        s, gw = srv["server"], srv["gateway"]
        sport = int(s["port"]["number"])
        for vs in vss:
            if gw not in _vs_gateways(vs):
                continue
            vname, vns = _meta(vs)
            vs_hosts = [_fqdn(h.lower(), vns) for h in (vs.get("spec") or {}).get("hosts") or []]
            hosts = _intersect_hosts(_server_hosts_for(s.get("hosts") or [], srv["gw_ns"], vns), vs_hosts)
            if not hosts:
                continue
            routes = _translate_routes(vs, services, sport, {gw}, labels, proxy_ns)
            if not routes:
                continue
            for h in hosts:
                if h in dedup:
                    dedup[h]["routes"].extend(routes)
                else:
                    dedup[h] = {"name": f"{h}:{sport}", "domains": [h], "routes": list(routes)}
    if not dedup:
        sport = int(servers[0]["server"]["port"]["number"])
        return [{"name": f"blackhole:{sport}", "domains": ["*"], "routes": []}]
    # collapseDuplicateRoutes: identical route lists (same objects) share one vhost.
    collapsed, known = {}, {}
    for h in sorted(dedup):
        vh = dedup[h]
        key = tuple(id(r) for r in vh["routes"])
        if key in known:
            collapsed[known[key]]["domains"].extend(vh["domains"])
        else:
            known[key] = h
            collapsed[h] = vh
    out = []
    for vh in collapsed.values():
        plain = [r for r in vh["routes"] if not _is_catch_all(r)]
        vh["routes"] = copy.deepcopy(plain + [r for r in vh["routes"] if _is_catch_all(r)])
        out.append(vh)
    out.sort(key=lambda v: v["name"])
    return out


# --------------------------------------------------------------------------
# EnvoyFilter: selection and order


_APPLY_TO_OPS = {
    "LISTENER": {"MERGE"},
    "NETWORK_FILTER": {"MERGE"},
    "HTTP_FILTER": {"INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST", "ADD", "MERGE", "REMOVE", "REPLACE"},
    "ROUTE_CONFIGURATION": {"MERGE"},
    "VIRTUAL_HOST": {"ADD", "MERGE", "REMOVE", "REPLACE"},
    "HTTP_ROUTE": {"INSERT_FIRST", "INSERT_BEFORE", "INSERT_AFTER", "ADD", "MERGE", "REMOVE"},
    "CLUSTER": {"ADD", "MERGE", "REMOVE"},
    "EXTENSION_CONFIG": {"ADD"},
}
# convertToEnvoyFilterWrapper: INSERT_* is only meaningful for filters and
# routes; elsewhere Istio turns it into ADD.
_INSERT_OPS = {"INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST"}
_INSERT_KEEPERS = {"HTTP_FILTER", "NETWORK_FILTER", "HTTP_ROUTE", "LISTENER_FILTER"}

_LISTENER_MATCH = {"name", "portNumber", "filterChain"}
_FILTER_CHAIN_MATCH = {"name", "sni", "filter"}
_FILTER_MATCH = {"name", "subFilter"}
_RC_MATCH = {"name", "portNumber", "portName", "gateway", "vhost"}
_VHOST_MATCH = {"name", "domainName", "route"}
_ROUTE_MATCH = {"name", "action"}
_CLUSTER_MATCH = {"name", "service", "portNumber", "subset"}


class _Patch:
    def __init__(self, ef_key, apply_to, match, op, value):
        self.key = ef_key
        self.apply_to = apply_to
        self.match = match
        self.op = op
        self.value = value

    @property
    def context(self):
        return self.match.get("context", "ANY")

    def context_ok(self, context):
        return self.context in ("ANY", context)

    def sub(self, *path):
        m = self.match
        for p in path:
            m = (m or {}).get(p)
        return m


def _validate_patch(where, cp):
    _check_keys(cp, {"applyTo", "match", "patch"}, where)
    apply_to = cp.get("applyTo")
    patch = cp.get("patch") or {}
    _check_keys(patch, {"operation", "value"}, f"{where}.patch")
    op = patch.get("operation")
    if apply_to not in _APPLY_TO_OPS:
        _unsupported(f"EnvoyFilter applyTo {apply_to} ({where})")
    if op in _INSERT_OPS and apply_to not in _INSERT_KEEPERS:
        op = "ADD"
    if op not in _APPLY_TO_OPS[apply_to]:
        _unsupported(f"EnvoyFilter {apply_to} operation {op} ({where})")
    match = cp.get("match") or {"context": "ANY"}
    _check_keys(match, {"context", "listener", "routeConfiguration", "cluster"}, f"{where}.match")
    if match.get("context", "ANY") not in CONTEXTS:
        raise IstioSimError(f"{where}: unknown context {match.get('context')}")
    if "listener" in match:
        if apply_to not in ("LISTENER", "NETWORK_FILTER", "HTTP_FILTER"):
            raise IstioSimError(f"{where}: listener match with applyTo {apply_to}")
        lm = match["listener"] or {}
        _check_keys(lm, _LISTENER_MATCH, f"{where}.match.listener")
        fc = lm.get("filterChain") or {}
        _check_keys(fc, _FILTER_CHAIN_MATCH, f"{where}.match.listener.filterChain")
        f = fc.get("filter") or {}
        _check_keys(f, _FILTER_MATCH, f"{where}.match.listener.filterChain.filter")
        _check_keys(f.get("subFilter") or {}, {"name"}, f"{where}.match.listener.filterChain.filter.subFilter")
    if "routeConfiguration" in match:
        if apply_to not in ("ROUTE_CONFIGURATION", "VIRTUAL_HOST", "HTTP_ROUTE"):
            raise IstioSimError(f"{where}: routeConfiguration match with applyTo {apply_to}")
        rm = match["routeConfiguration"] or {}
        _check_keys(rm, _RC_MATCH, f"{where}.match.routeConfiguration")
        vm = rm.get("vhost") or {}
        _check_keys(vm, _VHOST_MATCH, f"{where}.match.routeConfiguration.vhost")
        _check_keys(vm.get("route") or {}, _ROUTE_MATCH, f"{where}.match.routeConfiguration.vhost.route")
    if "cluster" in match:
        if apply_to != "CLUSTER":
            raise IstioSimError(f"{where}: cluster match with applyTo {apply_to}")
        _check_keys(match["cluster"], _CLUSTER_MATCH, f"{where}.match.cluster")
    value = patch.get("value")
    if op != "REMOVE" and value is None:
        raise IstioSimError(f"{where}: {op} without patch.value")
    if value is not None:
        _check_snake_case(value, f"{where}.patch.value")
    if op == "MERGE":
        _check_no_zero_values(value, f"{where}.patch.value")
    if apply_to == "EXTENSION_CONFIG":
        _check_keys(value, {"name", "typed_config"}, f"{where}.patch.value")
        if not value.get("name") or "@type" not in (value.get("typed_config") or {}):
            raise IstioSimError(f"{where}: EXTENSION_CONFIG needs name and typed_config.@type")
    return apply_to, match, op, copy.deepcopy(value)


def _ordered_envoy_filters(envoy_filters, namespace, labels, root_namespace):
    """PushContext.EnvoyFilters: root-namespace and workload-namespace filters
    whose selector matches, sorted by priority, then root namespace first, then
    creation (list) order, then name."""
    chosen = []
    for idx, ef in enumerate(envoy_filters):
        if ef.get("kind") != "EnvoyFilter":
            raise IstioSimError(f"not an EnvoyFilter: {ef.get('kind')}")
        name, ns = _meta(ef)
        spec = ef.get("spec") or {}
        _check_keys(spec, {"workloadSelector", "configPatches", "priority"}, f"EnvoyFilter {ns}/{name} spec")
        if ns not in (root_namespace, namespace):
            continue
        sel = (spec.get("workloadSelector") or {})
        _check_keys(sel, {"labels"}, f"EnvoyFilter {ns}/{name} workloadSelector")
        if any(labels.get(k) != v for k, v in (sel.get("labels") or {}).items()):
            continue
        chosen.append((int(spec.get("priority", 0)), 0 if ns == root_namespace else 1, idx, f"{name}.{ns}", ef))
    chosen.sort(key=lambda t: t[:4])
    return [t[4] for t in chosen]


def _patches(envoy_filters, namespace, labels, root_namespace):
    by_type = {}
    # Validate all (even unselected) so manifests can't hide unsupported bits.
    for ef in envoy_filters:
        name, ns = _meta(ef)
        for i, cp in enumerate((ef.get("spec") or {}).get("configPatches") or []):
            _validate_patch(f"EnvoyFilter {ns}/{name} configPatches[{i}]", cp)
    for ef in _ordered_envoy_filters(envoy_filters, namespace, labels, root_namespace):
        name, ns = _meta(ef)
        for i, cp in enumerate((ef.get("spec") or {}).get("configPatches") or []):
            apply_to, match, op, value = _validate_patch(f"EnvoyFilter {ns}/{name} configPatches[{i}]", cp)
            by_type.setdefault(apply_to, []).append(_Patch(f"{ns}/{name}", apply_to, match, op, value))
    return by_type


# --------------------------------------------------------------------------
# MERGE (pkg/proto/merge with Istio's Duration replace; MergeAnyWithAny)


_MAP_FIELDS = {"filter_metadata", "typed_filter_metadata", "typed_per_filter_config",
               "typed_extension_protocol_options", "key_values"}
_OPAQUE_FIELDS = {"filter_metadata", "typed_filter_metadata", "key_values"}
_ONEOFS = [
    {"route", "redirect", "direct_response", "filter_action", "non_forwarding_action"},
    {"prefix", "path", "safe_regex", "connect_matcher", "path_separated_prefix", "path_match_policy"},
    {"exact", "prefix", "suffix", "safe_regex", "contains", "custom"},
    {"typed_config", "config_discovery"},
    {"cluster", "cluster_header", "weighted_clusters", "cluster_specifier_plugin", "inline_cluster_specifier_plugin"},
    {"host_rewrite_literal", "auto_host_rewrite", "host_rewrite_header", "host_rewrite_path_regex"},
    {"rds", "route_config", "scoped_routes"},
    {"type", "cluster_type"},
    {"validation_context", "validation_context_sds_secret_config", "combined_validation_context"},
    {"local", "remote"},
    {"filename", "inline_bytes", "inline_string", "environment_variable"},
    {"string_match", "present_match", "range_match", "exact_match", "prefix_match", "suffix_match",
     "safe_regex_match", "contains_match"},
]
_CAMEL = re.compile(r"^[a-z0-9]+[A-Z]")


def _opaque(key, value):
    return key in _OPAQUE_FIELDS or key == "value" or key == "configuration" or (
        isinstance(value, dict) and value.get("@type") == STRUCT_TYPE)


def _check_snake_case(value, where):
    if isinstance(value, dict):
        for k, v in value.items():
            if _CAMEL.match(k):
                _unsupported(f"camelCase field {k!r} in {where} (use snake_case)")
            if not _opaque(k, v):
                _check_snake_case(v, f"{where}.{k}")
    elif isinstance(value, list):
        for v in value:
            _check_snake_case(v, where)


def _check_no_zero_values(value, where):
    if isinstance(value, dict):
        for k, v in value.items():
            if _opaque(k, v) or k == "@type":
                continue
            if v is False or v == 0 and not isinstance(v, bool) or v == "" or v is None:
                _unsupported(f"MERGE of the zero value {k}: {v!r} at {where} (Istio's proto merge skips unset "
                             "proto3 scalars, so it may not apply)")
            if k not in _MAP_FIELDS:  # list elements and map values start fresh
                _check_no_zero_values(v, f"{where}.{k}")


def _merge_struct(dst, src):
    for k, v in src.items():
        dst[k] = copy.deepcopy(v)


def merge_message(dst, src):
    """Istio's MERGE of `src` into `dst` (JSON-form protobuf messages), in place."""
    for k, v in src.items():
        for group in _ONEOFS:
            if k in group:
                for other in group - {k}:
                    dst.pop(other, None)
        if k in _MAP_FIELDS:
            if not isinstance(v, dict):
                raise IstioSimError(f"map field {k} must be an object")
            m = dst.setdefault(k, {})
            for mk, mv in v.items():
                m[mk] = copy.deepcopy(mv)  # map merge replaces entries
        elif isinstance(v, list):
            dst.setdefault(k, [])
            if not isinstance(dst[k], list):
                raise IstioSimError(f"{k}: list merged into non-list")
            dst[k].extend(copy.deepcopy(v))
        elif isinstance(v, dict):
            if "@type" in v:
                dst[k] = copy.deepcopy(v)  # an Any's type_url and bytes are replaced
            elif k == "value" and dst.get("@type") in TYPED_STRUCT_TYPES:
                _merge_struct(dst.setdefault(k, {}), v)
            else:
                if not isinstance(dst.get(k), dict):
                    dst[k] = {}
                merge_message(dst[k], v)
        else:
            dst[k] = v
    return dst


def merge_any(dst, src, where):
    """MergeAnyWithAny: both typed configs must have the same @type."""
    if dst.get("@type") != src.get("@type"):
        raise IstioSimError(f"{where}: MERGE of {src.get('@type')} into {dst.get('@type')}: Istio's merge panics "
                            "and drops every patch of this kind for the proxy")
    out = copy.deepcopy(dst)
    body = {k: v for k, v in src.items() if k != "@type"}
    if dst["@type"] == STRUCT_TYPE:
        _merge_struct(out, body)
    else:
        merge_message(out, body)
    return out


# --------------------------------------------------------------------------
# EnvoyFilter: applying


def _listener_port(listener):
    m = re.search(r"_(\d+)$", listener.get("name", ""))
    return int(m.group(1)) if m else None


def _listener_match(listener, p):
    lm = p.sub("listener")
    if lm is None:
        return True
    if lm.get("name") and lm["name"] != listener.get("name"):
        return False
    if lm.get("portNumber") and int(lm["portNumber"]) != _listener_port(listener):
        return False
    return True


def _filter_chain_match(fc, p):
    m = p.sub("listener", "filterChain")
    if not m:
        return True
    if m.get("name") and m["name"] != fc.get("name"):
        return False
    if m.get("sni") and m["sni"] not in ((fc.get("filter_chain_match") or {}).get("server_names") or []):
        return False
    return True


def _network_filter_match(f, p):
    m = p.sub("listener", "filterChain", "filter")
    return not m or m.get("name") is None or m["name"] == f.get("name")


def _has_http_filter_match(p):
    return p.sub("listener", "filterChain", "filter", "subFilter") is not None


def _http_filter_match(hf, p):
    m = p.sub("listener", "filterChain", "filter", "subFilter")
    return m is None or m.get("name") == hf.get("name")


def _patch_http_filters(hcm, listener, fc, f, patches, context):
    filters = hcm.setdefault("http_filters", [])
    for p in patches.get("HTTP_FILTER", []):
        if not (p.context_ok(context) and _listener_match(listener, p) and _filter_chain_match(fc, p)
                and _network_filter_match(f, p)):
            continue
        value = copy.deepcopy(p.value)
        if p.op == "ADD":
            filters.append(value)
        elif p.op == "INSERT_FIRST":
            filters.insert(0, value)
        elif p.op in ("INSERT_AFTER", "INSERT_BEFORE"):
            if not _has_http_filter_match(p):
                filters.insert(len(filters) if p.op == "INSERT_AFTER" else 0, value)
                continue
            for i, hf in enumerate(filters):
                if _http_filter_match(hf, p):
                    filters.insert(i + 1 if p.op == "INSERT_AFTER" else i, value)
                    break
        elif p.op == "REPLACE":
            if _has_http_filter_match(p):
                for i, hf in enumerate(filters):
                    if _http_filter_match(hf, p):
                        filters[i] = value
                        break
        elif p.op == "REMOVE":
            if _has_http_filter_match(p):
                filters[:] = [hf for hf in filters if not _http_filter_match(hf, p)]
    for hf in filters:
        for p in patches.get("HTTP_FILTER", []):
            if p.op != "MERGE" or not (p.context_ok(context) and _listener_match(listener, p)
                                      and _filter_chain_match(fc, p) and _network_filter_match(f, p)
                                      and _http_filter_match(hf, p)):
                continue
            if "typed_config" not in hf:
                continue  # Istio skips filters without typed_config (e.g. ECDS ones)
            _check_keys(p.value, {"name", "typed_config"}, f"{p.key} HTTP_FILTER MERGE value")
            if p.value.get("typed_config"):
                hf["typed_config"] = merge_any(hf["typed_config"], p.value["typed_config"], p.key)
            if p.value.get("name"):
                hf["name"] = p.value["name"]


def _patch_listener(listener, patches, context):
    for p in patches.get("LISTENER", []):
        if p.context_ok(context) and _listener_match(listener, p):
            if "name" in p.value or "address" in p.value:
                _unsupported(f"LISTENER MERGE of name/address ({p.key})")
            merge_message(listener, p.value)
    for fc in listener.get("filter_chains", []):
        for f in fc.get("filters", []):
            for p in patches.get("NETWORK_FILTER", []):
                if not (p.context_ok(context) and _listener_match(listener, p) and _filter_chain_match(fc, p)
                        and _network_filter_match(f, p)):
                    continue
                if "typed_config" not in f:
                    continue
                _check_keys(p.value, {"name", "typed_config"}, f"{p.key} NETWORK_FILTER MERGE value")
                tc = p.value.get("typed_config") or {}
                if {"rds", "route_config", "scoped_routes"} & set(tc):
                    _unsupported(f"NETWORK_FILTER MERGE of the HCM route specifier ({p.key})")
                if tc:
                    f["typed_config"] = merge_any(f["typed_config"], tc, p.key)
                if p.value.get("name"):
                    f["name"] = p.value["name"]
            if f.get("name") == HCM_NAME and "typed_config" in f:
                _patch_http_filters(f["typed_config"], listener, fc, f, patches, context)


def _gateway_port_map(rc):
    """getTargetPortMap, rebuilt from the `<host>:<server port>` vhost names."""
    ports = set()
    for vh in rc.get("virtual_hosts", []):
        m = re.search(r":(\d+)$", vh.get("name", ""))
        if m:
            ports.add(int(m.group(1)))
    return ports


def _parse_gateway_rds(name):
    """ParseGatewayRDSRouteName -> (port, port name, "ns/gateway")."""
    if name.startswith("http."):
        rest = name[len("http."):]
        return (int(rest) if rest.isdigit() else 0), "", ""
    if name.startswith("https.") and name.count(".") == 4:
        _, port, pname, gw, ns = name.split(".")
        return int(port), pname, f"{ns}/{gw}"
    return 0, "", ""


def _rc_match(rc, p, context, port_map):
    m = p.sub("routeConfiguration")
    if m is None:
        return True
    if m.get("name") and m["name"] != rc.get("name"):
        return False
    if context != "GATEWAY":
        if m.get("portNumber"):
            name = rc.get("name", "")
            if not name.isdigit() or int(name) != int(m["portNumber"]):
                return False
        return True
    port, pname, gateway = _parse_gateway_rds(rc.get("name", ""))
    if m.get("portName") and m["portName"] != pname:
        return False
    if m.get("gateway") and m["gateway"] != gateway:
        return False
    if m.get("portNumber"):
        want = int(m["portNumber"])
        if port_map is not None and port_map:
            if want not in port_map:
                return False
        elif want != port:
            return False
    return True


def _vhost_match(vh, p):
    m = p.sub("routeConfiguration", "vhost")
    if m is None:
        return True
    if vh is None:
        return False
    return (not m.get("name") or m["name"] == vh.get("name")) and (
        not m.get("domainName") or m["domainName"] in vh.get("domains", []))


def _has_route_match(p):
    return p.sub("routeConfiguration", "vhost", "route") is not None


def _route_action_kind(r):
    for k, kind in (("route", "ROUTE"), ("redirect", "REDIRECT"), ("direct_response", "DIRECT_RESPONSE")):
        if k in r:
            return kind
    return None


def _http_route_matches(r, p):
    m = p.sub("routeConfiguration", "vhost", "route")
    if m is None:
        return True
    if r is None:
        return False
    if m.get("name") and m["name"] != r.get("name"):
        return False
    action = m.get("action", "ANY")
    return action == "ANY" or _route_action_kind(r) == action


def _patch_routes(vh, rc, patches, context, port_map):
    routes = vh.setdefault("routes", [])
    for i in range(len(routes)):
        for p in patches.get("HTTP_ROUTE", []):
            if routes[i] is None:
                break
            if not (p.context_ok(context) and _rc_match(rc, p, context, port_map) and _vhost_match(vh, p)
                    and _http_route_matches(routes[i], p)):
                continue
            if p.op == "REMOVE":
                routes[i] = None
            elif p.op == "MERGE":
                merge_message(routes[i], p.value)
    for p in patches.get("HTTP_ROUTE", []):
        if not (p.context_ok(context) and _rc_match(rc, p, context, port_map) and _vhost_match(vh, p)):
            continue
        value = copy.deepcopy(p.value)
        if p.op == "ADD":
            routes.append(value)
        elif p.op in ("INSERT_AFTER", "INSERT_BEFORE"):
            if not _has_route_match(p):
                routes.insert(len(routes) if p.op == "INSERT_AFTER" else 0, value)
                continue
            for i, r in enumerate(routes):
                if _http_route_matches(r, p):
                    routes.insert(i + 1 if p.op == "INSERT_AFTER" else i, value)
                    break
        elif p.op == "INSERT_FIRST":
            if not _has_route_match(p) or any(_http_route_matches(r, p) for r in routes):
                routes.insert(0, value)
    routes[:] = [r for r in routes if r is not None]


def _patch_route_config(rc, patches, context):
    port_map = _gateway_port_map(rc) if context == "GATEWAY" else None
    for p in patches.get("ROUTE_CONFIGURATION", []):
        if p.context_ok(context) and _rc_match(rc, p, context, port_map):
            if "name" in p.value or "virtual_hosts" in p.value:
                _unsupported(f"ROUTE_CONFIGURATION MERGE of name/virtual_hosts ({p.key})")
            merge_message(rc, p.value)
    vhosts = rc.setdefault("virtual_hosts", [])
    removed = set()
    for i in range(len(vhosts)):
        for p in patches.get("VIRTUAL_HOST", []):
            if not (p.context_ok(context) and _rc_match(rc, p, context, port_map) and _vhost_match(vhosts[i], p)):
                continue
            if p.op == "REMOVE":
                removed.add(vhosts[i]["name"])
                break
            if p.op == "MERGE":
                merge_message(vhosts[i], p.value)
            elif p.op == "REPLACE":
                vhosts[i] = copy.deepcopy(p.value)
        else:
            _patch_routes(vhosts[i], rc, patches, context, port_map)
    for p in patches.get("VIRTUAL_HOST", []):
        if p.op == "ADD" and p.context_ok(context) and _rc_match(rc, p, context, port_map):
            vhosts.append(copy.deepcopy(p.value))
    vhosts[:] = [v for v in vhosts if v.get("name") not in removed]


def _parse_cluster_name(name):
    """ParseSubsetKey: (direction, subset, host, port)."""
    sep = "_." if name.startswith(("outbound_.", "inbound_.")) else "|"
    parts = name.split(sep, 3)
    if len(parts) != 4:
        return "", "", "", 0
    direction, port, subset, host = parts
    return direction, subset, host, int(port) if port.isdigit() else 0


def _cluster_match(c, p):
    m = p.sub("cluster")
    if m is None:
        return True
    if m.get("name"):
        return m["name"] == c.get("name")
    _, subset, host, port = _parse_cluster_name(c.get("name", ""))
    if m.get("subset") and m["subset"] != subset:
        return False
    if m.get("service") and m["service"] != host:
        return False
    if m.get("portNumber") and int(m["portNumber"]) != port:
        return False
    return True


def _merge_cluster(c, p):
    ts = p.value.get("transport_socket")
    if ts is not None:
        # mergeTransportSocketCluster: same-named socket merges its typed
        # config; otherwise the patch's socket replaces it.
        if "transport_socket_matches" in c:
            _unsupported("CLUSTER MERGE of transport_socket into transport_socket_matches")
        cur = c.get("transport_socket")
        if cur and cur.get("name") == ts.get("name") and cur.get("typed_config") and ts.get("typed_config"):
            cur["typed_config"] = merge_any(cur["typed_config"], ts["typed_config"], p.key)
        else:
            c["transport_socket"] = copy.deepcopy(ts)
        return  # Istio does not merge the rest of the value in this case
    merge_message(c, p.value)


def apply_envoy_filters(bootstrap, envoy_filters, *, context, namespace, labels, root_namespace="istio-system"):
    """Applies EnvoyFilters (dicts) to `bootstrap` as istiod would for a proxy
    in `namespace` with `labels`, in patch context `context`
    (SIDECAR_OUTBOUND, SIDECAR_INBOUND or GATEWAY). Returns (new bootstrap,
    extension configs from EXTENSION_CONFIG ADD patches).

    Supported: LISTENER MERGE; NETWORK_FILTER MERGE; HTTP_FILTER ADD,
    INSERT_FIRST/BEFORE/AFTER, REPLACE, REMOVE, MERGE; ROUTE_CONFIGURATION
    MERGE; VIRTUAL_HOST ADD/MERGE/REMOVE/REPLACE; HTTP_ROUTE ADD,
    INSERT_FIRST/BEFORE/AFTER, MERGE, REMOVE; CLUSTER ADD/MERGE/REMOVE;
    EXTENSION_CONFIG ADD (INSERT_* on listener/cluster/vhost/extension config
    count as ADD, as in Istio). Anything else raises NotImplementedError."""
    if context not in CONTEXTS[1:]:
        raise IstioSimError(f"context must be one of {CONTEXTS[1:]}")
    patches = _patches(envoy_filters, namespace, labels, root_namespace)
    out = copy.deepcopy(bootstrap)
    static = out.setdefault("static_resources", {})
    # Clusters: REMOVE/MERGE on generated clusters, then ADDs.
    clusters = []
    for c in static.get("clusters", []):
        keep = True
        for p in patches.get("CLUSTER", []):
            if not (p.context_ok(context) and _cluster_match(c, p)):
                continue
            if p.op == "REMOVE":
                keep = False
                break
            if p.op == "MERGE":
                _merge_cluster(c, p)
        if keep:
            clusters.append(c)
    for p in patches.get("CLUSTER", []):
        if p.op != "ADD":
            continue
        if p.context == "ANY" and context not in ("SIDECAR_OUTBOUND", "GATEWAY"):
            continue
        if p.context_ok(context):
            clusters.append(copy.deepcopy(p.value))
    names = [c.get("name") for c in clusters]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise IstioSimError(f"duplicate clusters after patching: {sorted(dup)}")
    static["clusters"] = clusters
    # Listeners, then their (inline, RDS-standing) route configs.
    for listener in static.get("listeners", []):
        _patch_listener(listener, patches, context)
        for fc in listener.get("filter_chains", []):
            for f in fc.get("filters", []):
                rc = (f.get("typed_config") or {}).get("route_config")
                if f.get("name") == HCM_NAME and rc is not None:
                    _patch_route_config(rc, patches, context)
    # ECDS resources: every EXTENSION_CONFIG ADD of the selected filters
    # (Istio does not check the patch context here).
    ext = []
    for p in patches.get("EXTENSION_CONFIG", []):
        if any(e["name"] == p.value["name"] for e in ext):
            raise IstioSimError(f"two EXTENSION_CONFIG patches named {p.value['name']}")
        ext.append(copy.deepcopy(p.value))
    return out, ext


# --------------------------------------------------------------------------
# istio-agent: ECDS over files, remote Wasm code to local


def _ecds_filters(bootstrap):
    """Every HTTP filter list of the bootstrap: HCMs' and clusters' upstream ones."""
    static = bootstrap.get("static_resources", {})
    for listener in static.get("listeners", []):
        for fc in listener.get("filter_chains", []):
            for f in fc.get("filters", []):
                if f.get("name") == HCM_NAME:
                    yield from (f.get("typed_config") or {}).get("http_filters", [])
    for c in static.get("clusters", []):
        opts = (c.get("typed_extension_protocol_options") or {}).get(HTTP_OPTIONS_KEY) or {}
        yield from opts.get("http_filters", [])


RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
WASM_SECRET_ENV = "ISTIO_META_WASM_IMAGE_PULL_SECRET"
ISTIO_META_PREFIX = "ISTIO_META_"


class _FetchFailed(Exception):
    """The agent could not get a module (pkg/wasm/cache.go Get)."""


def _fetch(uri, sha256, modules):
    """Where the agent's cache puts the module for `uri`. `modules`: a path
    (every oci://, https:// and http:// URL serves it), a dict {uri: path},
    or None (no registry reachable). file:// URLs read the file itself."""
    if uri.startswith("file://"):
        path = uri[len("file://"):]
        if not os.path.isfile(path):
            raise _FetchFailed(f"{uri}: no such file")
        got = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        if sha256 and sha256 != got:
            raise _FetchFailed(f"module downloaded from {uri} has checksum {got}, which does not match: {sha256}")
    elif not uri.startswith(("oci://", "https://", "http://")):
        raise _FetchFailed(f"unsupported Wasm module downloading URL scheme: {uri}")
    elif isinstance(modules, dict):
        if uri not in modules:
            raise _FetchFailed(f"{uri}: not found")
        path = modules[uri]
    elif modules is None:
        raise _FetchFailed(f"{uri}: could not reach the registry")
    else:
        path = modules
    # isValidWasmBinary: the agent checks the magic number and nothing else.
    with open(path, "rb") as f:
        if f.read(4) != b"\0asm":
            raise _FetchFailed(f"{uri}: fetched Wasm binary from {uri} is invalid")
    return str(path)


def _agent_convert(ec, modules, log):
    """MaybeConvertWasmExtensionConfig (pkg/wasm/convert.go) for one ECDS
    resource: a Wasm config with remote code gets a local file; when the
    module cannot be had (rewriteVMConfig fails) the whole resource is
    replaced by an RBAC filter of the same name, deny-all unless the plugin
    fails open (createHTTPDefaultFilter). Other configs pass unchanged."""
    tc = ec["typed_config"]
    if tc.get("@type") != WASM_TYPE:
        return ec
    tc = copy.deepcopy(tc)
    config = tc.get("config") or {}
    vm = config.get("vm_config") or {}
    code = vm.get("code") or {}
    remote = code.get("remote")
    if remote is None:
        if "local" not in code:
            # tryUnmarshal's error: the agent NACKs, nothing reaches Envoy.
            raise IstioSimError(f"{ec['name']}: no remote and local load found in Wasm HTTP filter")
        return {"name": ec["name"], "typed_config": tc}
    try:
        envs = vm.get("environment_variables") or {}
        values = envs.get("key_values") or {}
        if WASM_SECRET_ENV in values and not values[WASM_SECRET_ENV]:
            raise _FetchFailed(f"cannot fetch Wasm module {config.get('name')}: missing image pulling secret")
        # Istio's own variables are for the agent only.
        for k in [k for k in values if k.startswith(ISTIO_META_PREFIX)]:
            del values[k]
        if "key_values" in envs and not values:
            del envs["key_values"]
        uri = (remote.get("http_uri") or {}).get("uri", "")
        path = _fetch(uri, "" if remote.get("sha256") == "nil" else remote.get("sha256", ""), modules)
    except _FetchFailed as e:
        policy = config.get("failure_policy", "UNSPECIFIED")
        fail_open = policy == "FAIL_OPEN" if policy != "UNSPECIFIED" else bool(config.get("fail_open"))
        log.append(f"error in converting the wasm config to local: cannot fetch Wasm module: {e}. "
                   f"applying {'allow' if fail_open else 'deny'} RBAC filter")
        rbac = ({"@type": RBAC_TYPE, "rules_stat_prefix": "wasm-default-allow"} if fail_open else
                # An empty rule set denies everything.
                {"@type": RBAC_TYPE, "rules": {}, "rules_stat_prefix": "wasm-default-deny"})
        return {"name": ec["name"], "typed_config": rbac}
    code.pop("remote")
    code["local"] = {"filename": path}
    return {"name": ec["name"], "typed_config": tc}


def agent_emulate(bootstrap, extension_configs, modules, workdir, log=None):
    """What istio-agent and ADS do for ECDS: every HTTP filter whose
    config_discovery source is `ads` reads its extension config from a file in
    `workdir` (path_config_source), as the agent rewrote it (_agent_convert;
    `modules` as in _fetch). Envoy then applies each resource or rejects it
    (a type its reference's type_urls do not list): a file source rejects
    an update exactly as an ADS NACK does, and the filter is left without
    config. `log` (a list) receives the agent's errors. Raises when a
    referenced config is missing (istiod would never answer, and the
    listener would never warm)."""
    log = [] if log is None else log
    out = copy.deepcopy(bootstrap)
    by_name = {e["name"]: e for e in extension_configs}
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    written = {}
    for hf in _ecds_filters(out):
        cd = hf.get("config_discovery")
        if cd is None:
            continue
        if "ads" not in (cd.get("config_source") or {}):
            _unsupported(f"config_discovery source {cd.get('config_source')} for {hf.get('name')}")
        name = hf["name"]
        if name not in by_name:
            raise IstioSimError(f"ECDS config {name!r} is referenced but no EXTENSION_CONFIG provides it")
        if name not in written:
            converted = _agent_convert(by_name[name], modules, log)
            resource = {"@type": TEC_TYPE, **converted}
            path = workdir / ("ecds-" + re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".json")
            path.write_text(json.dumps({"version_info": "1", "resources": [resource]}, indent=1))
            written[name] = str(path)
        source = {k: v for k, v in cd["config_source"].items() if k != "ads"}
        source["path_config_source"] = {"path": written[name]}
        source.setdefault("resource_api_version", "V3")
        cd["config_source"] = source
    return out
