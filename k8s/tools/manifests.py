#!/usr/bin/env python3
"""Generate meshllm's Istio manifests from the mesh policy.

    python3 k8s/tools/manifests.py                  # rewrite k8s/base and k8s/overlays (placeholder URL)
    python3 k8s/tools/manifests.py --module-url oci://REGISTRY/meshllm:TAG \\
        --sha256 DIGEST --out-dir /tmp/meshllm-k8s  # the same for your registry
    python3 k8s/tools/manifests.py --module-url ... --store REDIS_HOST:PORT \\
        --policy k8s/examples/shared-quota/mesh.json --out-dir ...  # + the shared quota store
    python3 k8s/tools/manifests.py --build native --module-image REGISTRY/meshllm-native:TAG \\
        --out-dir /tmp/meshllm-k8s  # the native build (Istio 1.31+): overlays/*-native
    python3 k8s/tools/manifests.py namespace-policy --namespace shop shop.json

The Envoy pieces inside the EnvoyFilters (the Wasm filter config, the position
and aggregate clusters, the failover route, header_to_metadata) come from
envoy/tools/render.py, the generator of the Envoy configs the integration
tests run, so the manifests carry what is tested. The plugin configuration is
k8s/policy/mesh.json with two things set per mode: `identity` (the proxy's
own workload in sidecar mode, the caller's mTLS certificate at the egress
gateway) and `hosts` (the provider hosts and the in-mesh alias).

Two builds load that configuration: `wasm` (default; Istio's agent fetches
the module, ECDS serves both halves' configs) and `native` (the Envoy dynamic
module libmeshllm.so on the proxy's disk, its configs served by ECDS like the Wasm one, so a module that cannot be
loaded fails meshllm's routes only; an init container copies it from an image
volume). Everything else in the manifests is the same.
"""

import argparse
import copy
import json
import os
import re
import shutil
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "envoy", "tools"))
import render  # noqa: E402

MESH_POLICY = os.path.join(ROOT, "k8s", "policy", "mesh.json")
K8S_DIR = os.path.join(ROOT, "k8s")

# Where things live. The root namespace is Istio's default config root.
ROOT_NAMESPACE = "istio-system"
NAMESPACE = "meshllm"
GATEWAY = "meshllm-egress"
GATEWAY_LABELS = {"istio": GATEWAY, "app": GATEWAY}
GATEWAY_HOST = f"{GATEWAY}.{NAMESPACE}.svc.cluster.local"
# Applications call providers over plain HTTP on port 80 inside the mesh.
MESH_PORT = 80
# The gateway's container port (an unprivileged port) behind service port 80.
GATEWAY_TARGET_PORT = 8080
# The in-mesh alias: a Service without endpoints whose name resolves in
# every namespace; the filter answers for it.
ALIAS_SERVICE = "llm"
ALIAS_HOST = f"{ALIAS_SERVICE}.{NAMESPACE}.svc.cluster.local"
ALIAS_NAMES = [ALIAS_HOST, f"{ALIAS_SERVICE}.{NAMESPACE}", f"{ALIAS_SERVICE}.{NAMESPACE}.svc"]
KEYS_SECRET = "meshllm-provider-keys"
# The checked-in overlays' module URL. `.invalid` never resolves (RFC 2606),
# so a proxy given these manifests as they are fails closed on the LLM hosts
# (see "What can go wrong" in k8s/README.md) and its log names this URL.
PLACEHOLDER_MODULE_URL = "oci://module-url-not-set.invalid/meshllm:0.1.0"
# Sidecar mode is opt-in: only pods with this label run the filter.
OPT_IN_LABEL = "meshllm.io/sidecar"
OPT_IN_VALUE = "enabled"
WASM_TYPE = render.WASM_TYPE
# The native build: Envoy's dynamic-module HTTP filter (Istio 1.31+ proxies)
# loads lib<name>.so from $ENVOY_DYNAMIC_MODULES_SEARCH_PATH. By name, not
# by `module.local.filename`: that field is newer than the name lookup and
# was not checked in the Envoy Istio 1.31 ships.
DYNAMIC_MODULE_TYPE = ("type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3."
                       "DynamicModuleFilter")
STRING_VALUE_TYPE = "type.googleapis.com/google.protobuf.StringValue"
NATIVE_MODULE_NAME = "meshllm"
NATIVE_MODULE_FILE = f"lib{NATIVE_MODULE_NAME}.so"
SEARCH_PATH_ENV = "ENVOY_DYNAMIC_MODULES_SEARCH_PATH"
# Where istio-proxy finds the module: an emptyDir (exec allowed) mounted
# read-only, which the init container COPY_CONTAINER fills from the module
# image, mounted in it only (image volumes are typically noexec). k8s/tools/
# oci.py --native puts the module at the image's root.
NATIVE_MODULE_DIR = "/var/lib/meshllm"
NATIVE_VOLUME = "meshllm-module"
NATIVE_VOLUME_SIZE = "64Mi"
NATIVE_IMAGE_DIR = "/var/lib/meshllm-image"
NATIVE_IMAGE_VOLUME = "meshllm-module-image"
COPY_CONTAINER = "meshllm-module"
# The copy runs in Istio's proxy image (the default, Ubuntu-based variant
# has cp; the distroless one does not). Istio's injector replaces `image:
# auto` only in the containers its template injects (istio-proxy), so the
# init container names its image: give your mesh's proxy image (--copy-image).
COPY_IMAGE = "docker.io/istio/proxyv2:1.31.0"
COPY_RESOURCES = {"requests": {"cpu": "10m", "memory": "16Mi"},
                  "limits": {"cpu": "100m", "memory": "64Mi"}}
# istio-proxy's user and group in Istio's injection templates.
PROXY_UID = 1337
# The checked-in native overlays' module image: never resolves, so a pod
# given them as they are does not start (the kubelet cannot pull it).
PLACEHOLDER_MODULE_IMAGE = "module-image-not-set.invalid/meshllm-native:0.1.0"
NATIVE_SIDECAR_ANNOTATION = "sidecar.istio.io/nativeSidecar"
# What Istio's agent substitutes for a Wasm config whose module it cannot
# fetch (deny-all RBAC, pkg/wasm/convert.go). The ECDS references accept it
# as Istio's own WasmPlugin references do (extension/extensionfilter.go), so
# the substitute is applied instead of rejected.
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
FILTER_CONFIG_TYPE = render.FILTER_CONFIG_TYPE
CEL_FILTER_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter"
POSITIONS_FILTER = "meshllm.positions"
# Istio's catch-all virtual hosts (pilot/pkg/networking/util/util.go:
# Passthrough "allow_any" under ALLOW_ANY, BlackHole "block_all" otherwise).
CATCH_ALL_VHOSTS = ("allow_any", "block_all")
# Routes of meshllm's own, for requests that cannot reach its clusters.
ROUTE_MISSING = "meshllm-route-missing"
HOST_NOT_IN_MESH = "meshllm-host-not-in-mesh"
# Headers that name the pod or its caller: Istio's metadata exchange
# (x-envoy-peer-metadata*), the gateway's client certificate and address.
# Never sent to a provider.
IDENTITY_HEADERS = ["x-envoy-peer-metadata", "x-envoy-peer-metadata-id",
                    "x-forwarded-client-cert", "x-forwarded-for"]
# Egress gateway sizing: two replicas so a node drain or a rollout keeps one.
GATEWAY_REPLICAS = 2
GATEWAY_RESOURCES = {"requests": {"cpu": "500m", "memory": "512Mi"},
                     "limits": {"cpu": "2", "memory": "1Gi"}}
ROUTER = "envoy.filters.http.router"
HCM = "envoy.filters.network.http_connection_manager"
HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
LISTENER_POLICY_KEY = "policy"

# The shared quota store (quotas.store, off unless --store): the user's
# Redis behind a webdis bridge in this namespace, reached over the mesh.
STORE_SERVICE = "meshllm-quota-store"
STORE_HOST = f"{STORE_SERVICE}.{NAMESPACE}.svc.cluster.local"
STORE_LABELS = {"app": STORE_SERVICE}
# Service port 80 (HTTP): sidecars' route config "80" gets its virtual
# host, where the guard below refuses applications' own calls.
STORE_PORT = MESH_PORT
STORE_TARGET_PORT = 7379  # webdis's own default
# Istio's cluster for the Service (EDS endpoints, mTLS, the DestinationRule).
STORE_ISTIO_CLUSTER = f"outbound|{STORE_PORT}||{STORE_HOST}"
# The filter's quotas.store.cluster: an aggregate cluster over Istio's, since
# the filter accepts no '|' in a cluster name. Callouts go straight to a
# cluster (dispatch_http_call: no route, so no route's retry policy).
STORE_CLUSTER = "meshllm.store"
STORE_SECRET = "meshllm-quota-store-redis"
STORE_SECRET_KEY = "password"
STORE_DEFAULT_USER = "meshllm-quota"
# Not pulled here (no registry access): 0.1.12 or later reads the Redis ACL
# user and `$VAR` values in its config; the tests run Debian's 0.1.9.
STORE_BRIDGE_IMAGE = "nicolas/webdis:0.1.22"
STORE_REPLICAS = 2
STORE_RESOURCES = {"requests": {"cpu": "50m", "memory": "32Mi"},
                   "limits": {"cpu": "500m", "memory": "128Mi"}}
STORE_CONFIG_MAP = f"{STORE_SERVICE}-config"
STORE_CONFIG_DIR = "/etc/webdis"
# The filter's default quotas.store.timeout_ms (envoy/README.md).
STORE_DEFAULT_TIMEOUT_MS = 200
# Below Envoy's 1 h on the bridge sidecar's side: a kept connection is never
# used just as the other end closes it (a reserve is not retried).
STORE_IDLE_TIMEOUT = "60s"
# The only commands the filter sends: the quota script's (store.rs), and
# with `cache.shared` the response cache's (cache/shared.rs).
CACHE_COMMANDS = ["GET", "SET", "APPEND", "RENAME"]


def store_commands(doc):
    """The commands the filter sends to the bridge for this policy."""
    shared_cache = bool((doc.get("cache") or {}).get("shared"))
    return ["EVALSHA", "EVAL"] + (CACHE_COMMANDS if shared_cache else [])


HEADER = (
    "# Generated by k8s/tools/manifests.py from k8s/policy/mesh.json; do not edit.\n"
    "# Regenerate: make k8s (or run the tool with your --module-url).\n"
)


def provider_hosts(policy):
    """The provider hosts, in config order, each once."""
    hosts = []
    for p in policy["providers"]:
        host, _, tls = render.provider_endpoint(p)
        if not tls:
            raise SystemExit(f"provider {p['name']}: the mesh reaches providers over https")
        if host not in hosts:
            hosts.append(host)
    return hosts


def mode_policy(policy, mode):
    """The plugin configuration for one mode."""
    doc = copy.deepcopy(policy)
    source = "mesh_node" if mode == "sidecar" else "mesh_peer"
    if doc.get("identity", {}).get("source", source) != source:
        raise SystemExit(f"identity.source must be {source} in {mode} mode (or left out)")
    doc.setdefault("identity", {})["source"] = source
    doc["hosts"] = provider_hosts(policy) + ALIAS_NAMES
    return doc


def ecds_ref(name, type_urls, disabled=False):
    """An HTTP filter whose config Envoy asks istiod for by name (ECDS).
    `type_urls`: the config types it accepts (a config of another type is
    refused). `disabled`: off unless a route enables it
    (typed_per_filter_config)."""
    ref = {
        "name": name,
        "config_discovery": {
            # Requests wait for the filter's config: never served without it.
            "config_source": {"ads": {}, "initial_fetch_timeout": "0s"},
            "type_urls": list(type_urls),
        },
    }
    if disabled:
        ref["disabled"] = True
    return ref


def enable_filters():
    """Per-route config that turns meshllm's (disabled) listener filters on
    (an empty `config` enables a filter with its listener config)."""
    return render.enable_filters([{"name": n} for n in (render.LISTENER_NAME, POSITIONS_FILTER)])


def openai_error(message, code, kind="server_error"):
    return {"error": {"message": message, "type": kind, "code": code}}


# The three APIs' error shapes, by the caller's path (Anthropic's Messages,
# Gemini's generateContent, else OpenAI's).
ANTHROPIC_PATH = "/v1/messages"
GEMINI_PATH_REGEX = ".*:(stream)?[gG]enerate[cC]ontent.*"


def shaped_errors(status, message, code):
    """[(CEL path condition, route path match, body)] per API shape."""
    return [
        ("request.url_path.startsWith('/v1/messages')", {"prefix": ANTHROPIC_PATH},
         {"type": "error", "error": {"type": "api_error", "message": message}}),
        ("request.url_path.matches('%s')" % GEMINI_PATH_REGEX, {"safe_regex": {"regex": GEMINI_PATH_REGEX}},
         {"error": {"code": status, "message": message, "status": "UNAVAILABLE"}}),
        ("true", {"prefix": "/"}, openai_error(message, code)),
    ]


def cel(expression):
    return {"extension_filter": {"name": "envoy.access_loggers.extension_filters.cel",
                                 "typed_config": {"@type": CEL_FILTER_TYPE, "expression": expression}}}


UNAVAILABLE_MESSAGE = (
    "meshllm is not running in this proxy: its Wasm module could not be fetched or "
    "loaded (the istio-proxy container's log says why). The request was not sent.")
# At the gateway an AuthorizationPolicy that allows nothing for the caller
# ends in the same reply as the agent's substitute; the message names both.
GATEWAY_UNAVAILABLE_MESSAGE = (
    "The egress gateway refused the request before meshllm ran, so it was not sent: "
    "meshllm's Wasm module could not be fetched or loaded (the gateway's log says why), "
    "or an AuthorizationPolicy on the gateway allows nothing for this caller.")
# The native build's: Envoy refused the filter's config (the module could
# not be loaded), so the filter has none on meshllm's routes.
NATIVE_UNAVAILABLE_MESSAGE = (
    "meshllm is not running in this proxy: its native module (libmeshllm.so) could not be "
    "loaded (the istio-proxy container's log says why). The request was not sent.")
NATIVE_GATEWAY_UNAVAILABLE_MESSAGE = (
    "The egress gateway refused the request before meshllm ran, so it was not sent: "
    "meshllm's native module (libmeshllm.so) could not be loaded (the gateway's log says why), "
    "or an AuthorizationPolicy on the gateway allows nothing for this caller.")
NO_GATEWAY_VHOST_MESSAGE = (
    "The meshllm egress gateway has no route for this host, so the request was not sent: "
    "the host's VirtualService in the meshllm namespace is missing")


def unavailable_replies(gateway, build):
    """The HCM's local_reply_config: when meshllm cannot run on one of its
    routes, the caller gets a 503 in its API's shape instead of Envoy's bare
    403 (the agent's deny-all substitute, pkg/wasm/convert.go: an RBAC
    filter whose empty rules match no policy), 500 (no filter config:
    Envoy refused the one it got) or 503 (a failed VM). Only those replies
    on meshllm's routes match; every other local reply is left as it is.
    At the egress gateway, which serves LLM hosts only, a host without a
    route (its VirtualService missing) gets the same treatment as Envoy's
    bare 404."""
    on_route = "xds.route_name.startsWith('meshllm')"
    # Envoy records the RBAC filter's metadata after its reply, so the
    # substitute is known by its reply's details.
    refused = ("response.code_details == 'rbac_access_denied_matched_policy[none]' || "
               "response.code_details == 'wasm_fail_stream'")
    message = build.gateway_unavailable_message if gateway else build.unavailable_message
    mappers = []
    for path, _, body in shaped_errors(503, message, "meshllm_unavailable"):
        mappers.append({
            "filter": {"or_filter": {"filters": [
                cel(f"{on_route} && {path} && ({refused})"),
                {"and_filter": {"filters": [
                    cel(f"{on_route} && {path}"),
                    # No config for the filter (Envoy refused the one it got).
                    {"response_flag_filter": {"flags": ["NFCF"]}},
                ]}},
            ]}},
            "status_code": 503,
            "body_format_override": {"json_format": body, "content_type": "application/json"},
        })
    if gateway:
        for path, _, body in shaped_errors(503, NO_GATEWAY_VHOST_MESSAGE, "no_gateway_route"):
            mappers.append({
                "filter": {"and_filter": {"filters": [
                    cel(path), {"response_flag_filter": {"flags": ["NR"]}}]}},
                "status_code": 503,
                "body_format_override": {"json_format": body, "content_type": "application/json"},
            })
    return {"mappers": mappers}


def authority_is(host):
    """A header matcher for an :authority naming `host`, with or without a
    port (one regex per host: Envoy refuses RE2 programs past 100)."""
    return {"name": ":authority", "string_match": {"safe_regex": {"regex": re.escape(host) + "(:[0-9]+)?"}}}


def direct_error(name, match, status, body):
    return {"name": name, "match": match,
            "direct_response": {"status": status, "body": {"inline_string": json.dumps(body)}}}


# The listener half quotes these inside its own sentence: no closing period.
ROUTE_MISSING_MESSAGE = (
    "meshllm has no route to the provider in this proxy, so the request was not sent: "
    "the provider's ServiceEntry is not visible here; it is not applied, narrowed by "
    "exportTo, or left out by a Sidecar resource's egress hosts")


def route_missing_route():
    """In every virtual host: a request meshllm has steered (it named a
    cluster) that did not land on meshllm's own route is refused, so it
    never leaves on another cluster (Istio's PassthroughCluster, another
    ServiceEntry's). meshllm's own routes come before it where they exist.

    A route, because the filter cannot tell: after it changes a request
    header, the route properties it reads in the same callback
    (xds.route_name, xds.route_metadata, xds.virtual_host_name,
    xds.cluster_name) still describe the route chosen before the change
    (measured in Envoy 1.40); Envoy picks the new route only when the next
    filter asks for it."""
    return direct_error(
        ROUTE_MISSING,
        {"prefix": "/", "headers": [{"name": render.CLUSTER_HEADER, "present_match": True}]},
        503, openai_error(ROUTE_MISSING_MESSAGE, "provider_not_in_mesh"))


def host_not_in_mesh_routes(hosts):
    """In Istio's catch-all virtual host: a request to an LLM host whose
    own virtual host this proxy lacks runs meshllm (which answers in the
    caller's shape, or serves it when the provider it picks is visible);
    the direct response is what is left should meshllm not run."""
    routes = []
    for host in hosts:
        route = direct_error(HOST_NOT_IN_MESH, {"prefix": "/", "headers": [authority_is(host)]},
                             503, openai_error(ROUTE_MISSING_MESSAGE, "provider_not_in_mesh"))
        route["typed_per_filter_config"] = enable_filters()
        routes.append(route)
    return routes


class WasmBuild:
    """The Wasm module, fetched by Istio's agent from `module_url` (ECDS
    serves both halves' configs, so the agent can substitute its fail-closed
    deny-all filter when the fetch fails). Keys reach the VM by
    `host_env_keys`. Nothing on the pod."""

    name = "wasm"
    suffix = ""
    # RBAC: the agent's fail-closed substitute when the module cannot be
    # fetched; without it Envoy rejects the substitute and the filter has no
    # config at all.
    type_urls = [WASM_TYPE, RBAC_TYPE]
    unavailable_message = UNAVAILABLE_MESSAGE
    gateway_unavailable_message = GATEWAY_UNAVAILABLE_MESSAGE

    def __init__(self, module_url=PLACEHOLDER_MODULE_URL, sha256=None):
        self.module_url = module_url
        self.sha256 = sha256

    def extension_configs(self, doc):
        code = render.remote_code(self.module_url, self.sha256)
        keys = render.env_keys(doc)
        return [
            {"name": render.LISTENER_NAME, "typed_config": render.wasm_config(doc, code, keys)},
            {
                "name": render.UPSTREAM_NAME,
                "typed_config": render.wasm_config(doc, code, keys, upstream=True),
            },
        ]

    def listener_filter(self, doc):
        return ecds_ref(render.LISTENER_NAME, self.type_urls, disabled=True)

    def upstream_filter(self, doc):
        return ecds_ref(render.UPSTREAM_NAME, self.type_urls)

    def proxy_env(self):
        return []

    def volumes(self):
        return []

    def volume_mounts(self):
        return []

    def init_containers(self):
        return []

    def metric_prefixes(self):
        return render.metric_prefixes("wasm")

    def proxy_config(self):
        """What the module needs in the proxy's ProxyConfig."""
        return {"proxyStatsMatcher": {"inclusionPrefixes": self.metric_prefixes()}}


class NativeBuild(WasmBuild):
    """The Envoy dynamic module libmeshllm.so (Istio 1.31+). Both halves'
    configs come by ECDS as for Wasm, so a module that cannot be loaded
    fails those configs (meshllm's routes answer 503), never the listener or
    the cluster. The module reaches the proxy's disk from the image
    `module_image`: a Kubernetes image volume is mounted in an init
    container (`copy_image`, which has `cp`) that copies the file into an
    emptyDir, which istio-proxy mounts read-only (image volumes are
    typically mounted noexec, where dlopen fails). The module reads the
    keys from the proxy's environment itself, so no `host_env_keys`."""

    name = "native"
    suffix = "-native"
    type_urls = [DYNAMIC_MODULE_TYPE]
    unavailable_message = NATIVE_UNAVAILABLE_MESSAGE
    gateway_unavailable_message = NATIVE_GATEWAY_UNAVAILABLE_MESSAGE

    def __init__(self, module_image=PLACEHOLDER_MODULE_IMAGE, copy_image=COPY_IMAGE):
        super().__init__()
        self.module_image = module_image
        self.copy_image = copy_image

    def extension_configs(self, doc):
        return [native_filter(doc, name) for name in (render.LISTENER_NAME, render.UPSTREAM_NAME)]

    def proxy_env(self):
        return [{"name": SEARCH_PATH_ENV, "value": NATIVE_MODULE_DIR}]

    def volumes(self):
        return [{"name": NATIVE_IMAGE_VOLUME,
                 "image": {"reference": self.module_image, "pullPolicy": "IfNotPresent"}},
                {"name": NATIVE_VOLUME, "emptyDir": {"sizeLimit": NATIVE_VOLUME_SIZE}}]

    def volume_mounts(self):
        return [{"name": NATIVE_VOLUME, "mountPath": NATIVE_MODULE_DIR, "readOnly": True}]

    def init_containers(self):
        return [{
            "name": COPY_CONTAINER,
            "image": self.copy_image,
            # No shell needed: the proxy image's cp.
            "command": ["cp", f"{NATIVE_IMAGE_DIR}/{NATIVE_MODULE_FILE}",
                        f"{NATIVE_MODULE_DIR}/{NATIVE_MODULE_FILE}"],
            "resources": COPY_RESOURCES,
            # As istio-proxy's user, so the proxy reads what it wrote.
            "securityContext": {
                "runAsNonRoot": True, "runAsUser": PROXY_UID, "runAsGroup": PROXY_UID,
                "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [
                {"name": NATIVE_IMAGE_VOLUME, "mountPath": NATIVE_IMAGE_DIR, "readOnly": True},
                {"name": NATIVE_VOLUME, "mountPath": NATIVE_MODULE_DIR},
            ],
        }]

    def metric_prefixes(self):
        return render.metric_prefixes("native")

    def proxy_config(self):
        # The runtime flag that gives the module's stats the Wasm build's
        # names (render.NATIVE_RUNTIME), through Istio's runtimeValues.
        runtime = render.NATIVE_RUNTIME["layers"][0]["static_layer"]
        return {**super().proxy_config(),
                "runtimeValues": {k: str(v).lower() for k, v in runtime.items()}}


def native_filter(doc, filter_name):
    """One half of the native module as an ECDS config, with the same
    configuration document the Wasm plugin gets, under the Wasm config's
    name (so the same references and per-route config use it)."""
    return {
        "name": filter_name,
        "typed_config": {
            "@type": DYNAMIC_MODULE_TYPE,
            "dynamic_module_config": {"name": NATIVE_MODULE_NAME},
            "filter_name": filter_name,
            "filter_config": {"@type": STRING_VALUE_TYPE,
                              "value": json.dumps(doc, separators=(",", ":"))},
        },
    }


def stats_matcher(build):
    """The proxy.istio.io/config annotation that keeps the module's metrics
    in the proxy's stats (Istio drops other Envoy stats)."""
    return yaml.safe_dump(build.proxy_config(), default_flow_style=True, width=1000).strip()


def pod_annotations(build):
    """Sidecar mode, the application's pod template: Istio's injector adds
    these mounts to the istio-proxy container it injects (the volumes are
    the pod's own: its init container mounts them too), and injects
    istio-proxy as a regular container, started after the pod's init
    containers: as a native sidecar (an init container) Istio puts it
    before them (reorderPod in pkg/kube/inject/webhook.go, 1.31), so it
    would start before the module is copied."""
    if not build.volume_mounts():
        return {}
    return {"sidecar.istio.io/userVolumeMount": json.dumps(build.volume_mounts(), separators=(",", ":")),
            NATIVE_SIDECAR_ANNOTATION: "false"}


def handled_hosts(doc):
    """Every name the filter answers for: provider hosts and the alias."""
    return provider_hosts(doc) + ALIAS_NAMES


def handled_vhosts(doc):
    """The virtual hosts Istio makes for the hosts the filter handles."""
    return [f"{h}:{MESH_PORT}" for h in provider_hosts(doc) + [ALIAS_HOST]]


def config_patches(doc, context, build):
    """Every patch meshllm needs in one proxy, for `context` (SIDECAR_OUTBOUND
    or GATEWAY)."""
    failover = render.failover_settings(doc)
    if not failover["enabled"]:
        raise SystemExit("the Istio install runs the filter in two halves: failover.enabled must be true")
    sidecar = context == "SIDECAR_OUTBOUND"
    listener = {"filterChain": {"filter": {"name": HCM, "subFilter": {"name": ROUTER}}}}
    hcm = {"filterChain": {"filter": {"name": HCM}}}
    if sidecar:
        listener["portNumber"] = MESH_PORT
        hcm["portNumber"] = MESH_PORT
    buffer_limit = render.buffer_limit_bytes(doc)
    patches = [
        {"applyTo": "EXTENSION_CONFIG", "patch": {"operation": "ADD", "value": ext}}
        for ext in build.extension_configs(doc)
    ]
    # Both listener filters are off unless a route turns them on: only
    # meshllm's routes do, so other traffic never enters the Wasm VM, and a
    # module that cannot be fetched or loaded fails those routes only.
    positions = {**render.position_metadata_filter(failover["max_attempts"]),
                 "name": POSITIONS_FILTER, "disabled": True}
    for http_filter in (build.listener_filter(doc), positions):
        patches.append(
            {
                "applyTo": "HTTP_FILTER",
                "match": {"context": context, "listener": listener},
                "patch": {"operation": "INSERT_BEFORE", "value": http_filter},
            }
        )
    patches.append({
        "applyTo": "NETWORK_FILTER",
        "match": {"context": context, "listener": hcm},
        "patch": {"operation": "MERGE", "value": {"name": HCM, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
                     ".v3.HttpConnectionManager",
            # Module missing or broken (Istio's agent), then Envoy's own
            # replies past the filter (render.local_reply_config).
            "local_reply_config": {"mappers": unavailable_replies(not sidecar, build)["mappers"]
                                   + render.local_reply_config()["mappers"]}}}},
    })
    # Istio sets no buffer limit (Envoy's default is 1 MiB); the filter holds
    # whole request bodies up to max_request_bytes and translated answers up
    # to max_response_bytes, and answers larger ones itself (413, 502 in the
    # caller's shape).
    listener_match = {"portNumber": MESH_PORT if sidecar else GATEWAY_TARGET_PORT}
    patches.append({
        "applyTo": "LISTENER",
        "match": {"context": context, "listener": listener_match},
        "patch": {"operation": "MERGE", "value": {"per_connection_buffer_limit_bytes": buffer_limit}},
    })
    clusters = render.position_clusters(doc, {}, failover["max_attempts"])
    clusters[-1]["typed_extension_protocol_options"] = render.upstream_protocol_options(
        render.upstream_http_filters(build.upstream_filter(doc))
    )
    for c in clusters:
        c["per_connection_buffer_limit_bytes"] = buffer_limit
        patches.append(
            {
                "applyTo": "CLUSTER",
                "match": {"context": context},
                "patch": {"operation": "ADD", "value": c},
            }
        )
    if (doc.get("quotas") or {}).get("store"):
        patches.append({
            "applyTo": "CLUSTER",
            "match": {"context": context},
            "patch": {"operation": "ADD", "value": store_cluster()},
        })
    route_config = {"portNumber": MESH_PORT} if sidecar else {}
    # Patches on one virtual host apply in order and INSERT_FIRST puts each
    # first: the guards go in before meshllm's own routes, which so end up
    # ahead of them.
    if sidecar:
        for vhost in CATCH_ALL_VHOSTS:
            for route in host_not_in_mesh_routes(handled_hosts(doc)):
                patches.append({
                    "applyTo": "HTTP_ROUTE",
                    "match": {"context": context,
                              "routeConfiguration": {**route_config, "vhost": {"name": vhost}}},
                    "patch": {"operation": "INSERT_FIRST", "value": route},
                })
    patches.append({
        "applyTo": "HTTP_ROUTE",
        "match": {"context": context, "routeConfiguration": dict(route_config)},
        "patch": {"operation": "INSERT_FIRST", "value": route_missing_route()},
    })
    routed, not_routed = render.meshllm_routes(doc)
    # The pod's and its caller's identity stay in the mesh.
    routed["request_headers_to_remove"] = routed["request_headers_to_remove"] + IDENTITY_HEADERS
    for vhost in handled_vhosts(doc):
        match = {"context": context, "routeConfiguration": {**route_config, "vhost": {"name": vhost}}}
        patches.append(
            {
                "applyTo": "VIRTUAL_HOST",
                "match": match,
                # The upstream half learns which attempt it serves; the
                # filters run on this host's routes.
                "patch": {"operation": "MERGE", "value": {"include_request_attempt_count": True,
                                                          "typed_per_filter_config": enable_filters()}},
            }
        )
        # INSERT_FIRST twice: the routed route ends up first, the refusal second.
        for route in (not_routed, routed):
            patches.append(
                {
                    "applyTo": "HTTP_ROUTE",
                    "match": match,
                    "patch": {"operation": "INSERT_FIRST", "value": route},
                }
            )
    return patches


class LiteralText(str):
    """Text written as a YAML literal block (a config file in a ConfigMap)."""


yaml.SafeDumper.add_representer(
    LiteralText, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|"))


class StoreOptions:
    """--store: the user's Redis (host, port), the ACL user the bridge logs
    in as (its password in the Secret STORE_SECRET), the bridge's image, and
    the namespaces whose sidecars may call it in sidecar mode (None: any
    workload with a mesh certificate)."""

    def __init__(self, redis_host, redis_port, user=STORE_DEFAULT_USER, image=STORE_BRIDGE_IMAGE,
                 client_namespaces=None):
        self.redis_host = redis_host
        self.redis_port = int(redis_port)
        self.user = user
        self.image = image
        self.client_namespaces = client_namespaces

    @classmethod
    def parse(cls, address, **kw):
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise SystemExit(f"--store {address!r}: give the Redis address as HOST:PORT")
        return cls(host, int(port), **kw)


def shared_rules(policy):
    """The names of the rules that say `shared`, mesh and namespaces'."""
    limit_lists = [(policy.get("quotas") or {}).get("limits") or []]
    for ns in (policy.get("namespaces") or {}).values():
        limit_lists.append((ns.get("quotas") or {}).get("limits") or [])
    return [rule.get("name") for limits in limit_lists for rule in limits if rule.get("shared")]


def with_store(policy, store):
    """The policy with `quotas.store` naming the bridge's cluster (the
    policy's own timeout_ms and on_failure kept); without `store`, the policy
    as it is, which must not need one."""
    if store is None:
        if (policy.get("quotas") or {}).get("store") or shared_rules(policy):
            raise SystemExit("the policy has shared quota rules or quotas.store: give --store "
                             "REDIS_HOST:PORT so the bridge to the shared store is installed")
        return policy
    doc = copy.deepcopy(policy)
    quotas = doc.setdefault("quotas", {})
    quotas["store"] = {**quotas.get("store", {}), "cluster": STORE_CLUSTER, "authority": STORE_HOST}
    return doc


def store_timeout_ms(doc):
    return doc["quotas"]["store"].get("timeout_ms", STORE_DEFAULT_TIMEOUT_MS)


def store_cluster():
    """The cluster the filter's store calls name: an alias (aggregate
    cluster) of Istio's own cluster for the bridge's Service, which carries
    its endpoints, mTLS and the DestinationRule's timeouts. A proxy that
    cannot see the Service gets no endpoints here: the calls fail at once
    and each shared rule follows its on_store_failure."""
    return {
        "name": STORE_CLUSTER,
        "connect_timeout": "1s",
        # Like Istio's own clusters: Envoy's default of 1024 requests in
        # flight would refuse store calls of a busy gateway.
        "circuit_breakers": render.circuit_breakers(),
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {
            "name": "envoy.clusters.aggregate",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                "clusters": [STORE_ISTIO_CLUSTER],
            },
        },
    }


STORE_REFUSED_MESSAGE = ("The meshllm quota store is called by meshllm's filter only; "
                         "this request was not sent.")


def store_guard():
    """Every sidecar: an application's own request to the bridge is refused
    at its sidecar (the filter's calls take no route, so this never touches
    them). In sidecar mode the bridge cannot tell the two apart otherwise:
    both carry the pod's certificate."""
    return resource("networking.istio.io/v1alpha3", "EnvoyFilter", f"{STORE_SERVICE}-guard", ROOT_NAMESPACE, {
        "configPatches": [{
            "applyTo": "HTTP_ROUTE",
            "match": {"context": "SIDECAR_OUTBOUND",
                      "routeConfiguration": {"portNumber": STORE_PORT,
                                             "vhost": {"name": f"{STORE_HOST}:{STORE_PORT}"}}},
            "patch": {"operation": "INSERT_FIRST", "value": direct_error(
                f"{STORE_SERVICE}-refused", {"prefix": "/"}, 403,
                openai_error(STORE_REFUSED_MESSAGE, "quota_store_not_callable", "permission_error"))},
        }],
    })


def webdis_config(store, commands=("EVALSHA", "EVAL")):
    """The bridge's webdis.json: every command refused but those the
    filter sends, and PING (the readiness probe; the Redis ACL decides what
    it may do). Any source address: the sidecar's inbound calls come from
    127.0.0.6 or the caller's address depending on Istio's interception
    mode; the mesh (STRICT mTLS, the AuthorizationPolicy, the guard) decides
    who reaches it."""
    return {
        "redis_host": store.redis_host,
        "redis_port": store.redis_port,
        "redis_auth": [store.user, "$REDIS_PASSWORD"],
        "http_host": "0.0.0.0",
        "http_port": STORE_TARGET_PORT,
        "threads": 2,
        "daemonize": False,
        "database": 0,
        "acl": [
            {"disabled": ["*"]},
            {"enabled": [*commands, "PING"]},
        ],
        "verbosity": 3,
        "logfile": "/dev/stderr",
    }


def store_resources(doc, store, mode):
    """The bridge (webdis) beside the mesh for `mode`: its Deployment,
    Service, PodDisruptionBudget and config; mTLS only (PeerAuthentication
    STRICT), callable only by the filter's proxies (AuthorizationPolicy) on
    the filter's paths; the DestinationRule for the callers' side; the guard
    against applications' own calls."""
    timeout_ms = store_timeout_ms(doc)
    pod_labels = {**STORE_LABELS, "sidecar.istio.io/inject": "true"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": STORE_SERVICE, "namespace": NAMESPACE, "labels": STORE_LABELS},
        "spec": {
            "replicas": STORE_REPLICAS,
            "selector": {"matchLabels": STORE_LABELS},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "serviceAccountName": STORE_SERVICE,
                    "topologySpreadConstraints": [{
                        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "ScheduleAnyway",
                        "labelSelector": {"matchLabels": STORE_LABELS},
                    }],
                    "containers": [{
                        "name": "webdis",
                        "image": store.image,
                        "command": ["/usr/local/bin/webdis", f"{STORE_CONFIG_DIR}/webdis.json"],
                        "ports": [{"containerPort": STORE_TARGET_PORT, "name": "http"}],
                        "env": [{"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {
                            "name": STORE_SECRET, "key": STORE_SECRET_KEY}}}],
                        "resources": STORE_RESOURCES,
                        # webdis answers PING 503 while Redis is unreachable:
                        # a replica without Redis takes no calls.
                        "readinessProbe": {
                            "httpGet": {"path": "/PING", "port": STORE_TARGET_PORT},
                            "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 2,
                        },
                        "livenessProbe": {
                            "tcpSocket": {"port": STORE_TARGET_PORT},
                            "periodSeconds": 10, "failureThreshold": 3,
                        },
                        # In the container, not the pod: Istio's init
                        # container runs as root.
                        "securityContext": {
                            "runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "volumeMounts": [{"name": "config", "mountPath": STORE_CONFIG_DIR,
                                          "readOnly": True}],
                    }],
                    "volumes": [{"name": "config", "configMap": {"name": STORE_CONFIG_MAP}}],
                },
            },
        },
    }
    if mode == "sidecar":
        # The filter runs in labelled pods of any namespace; the guard keeps
        # their applications out.
        if store.client_namespaces:
            source = {"namespaces": list(store.client_namespaces)}
        else:
            source = {"principals": ["*"]}
    else:
        source = {"principals": [f"cluster.local/ns/{NAMESPACE}/sa/{GATEWAY}"]}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": STORE_SERVICE, "namespace": NAMESPACE}},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": STORE_CONFIG_MAP, "namespace": NAMESPACE},
         "data": {"webdis.json": LiteralText(json.dumps(webdis_config(store, store_commands(doc)), indent=2) + "\n")}},
        deployment,
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
         "metadata": {"name": STORE_SERVICE, "namespace": NAMESPACE},
         "spec": {"minAvailable": 1, "selector": {"matchLabels": STORE_LABELS}}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": STORE_SERVICE, "namespace": NAMESPACE, "labels": STORE_LABELS},
         "spec": {"selector": STORE_LABELS,
                  "ports": [{"name": "http", "port": STORE_PORT, "targetPort": STORE_TARGET_PORT}]}},
        resource("security.istio.io/v1", "PeerAuthentication", STORE_SERVICE, NAMESPACE, {
            "selector": {"matchLabels": STORE_LABELS},
            "mtls": {"mode": "STRICT"},
        }),
        resource("security.istio.io/v1", "AuthorizationPolicy", STORE_SERVICE, NAMESPACE, {
            "selector": {"matchLabels": STORE_LABELS},
            "action": "ALLOW",
            "rules": [{"from": [{"source": source}],
                       "to": [{"operation": {"methods": ["GET"], "paths": [f"/{c}/*" for c in store_commands(doc)]}}]}],
        }),
        resource("networking.istio.io/v1", "DestinationRule", STORE_SERVICE, NAMESPACE, {
            "host": STORE_HOST,
            "trafficPolicy": {
                "tls": {"mode": "ISTIO_MUTUAL"},
                "connectionPool": {
                    # A connect slower than a call's whole budget is of no use.
                    "tcp": {"connectTimeout": f"{timeout_ms}ms"},
                    "http": {"idleTimeout": STORE_IDLE_TIMEOUT},
                },
            },
        }),
        store_guard(),
    ]


def resource(api, kind, name, namespace, spec):
    return {
        "apiVersion": api,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def slug(host):
    """A resource name for a host: `api.openai.com` → `api-openai-com`, the
    alias → its service name."""
    return ALIAS_SERVICE if host == ALIAS_HOST else host.replace(".", "-")


def base_resources(policy):
    """Provider hosts as ServiceEntries (port 80 inside the mesh, 443
    outside) with TLS origination, and the alias Service."""
    out = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE,
                                                               "labels": {"istio-injection": "enabled"}}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": ALIAS_SERVICE, "namespace": NAMESPACE},
            # No selector and no endpoints: only the filter answers it.
            "spec": {"ports": [{"name": "http", "port": MESH_PORT, "protocol": "TCP"}]},
        },
    ]
    for host in provider_hosts(policy):
        name = slug(host)
        out.append(resource(
            "networking.istio.io/v1", "ServiceEntry", name, NAMESPACE,
            {
                "hosts": [host],
                "location": "MESH_EXTERNAL",
                "resolution": "DNS",
                # Only plain HTTP on port 80: no https entry, so with
                # REGISTRY_ONLY egress nothing goes around the filter.
                "ports": [{"number": MESH_PORT, "name": "http", "protocol": "HTTP",
                           "targetPort": 443}],
            },
        ))
        out.append(resource(
            "networking.istio.io/v1", "DestinationRule", name, NAMESPACE,
            {
                "host": host,
                "trafficPolicy": {"portLevelSettings": [
                    {"port": {"number": MESH_PORT}, "tls": {"mode": "SIMPLE", "sni": host}}
                ]},
            },
        ))
    return out


def sidecar_resources(policy, build):
    doc = mode_policy(policy, "sidecar")
    return [resource(
        "networking.istio.io/v1alpha3", "EnvoyFilter", "meshllm", ROOT_NAMESPACE,
        {
            # In the root namespace with a selector: the labelled pods of
            # every namespace, and no others.
            "workloadSelector": {"labels": {OPT_IN_LABEL: OPT_IN_VALUE}},
            "configPatches": config_patches(doc, "SIDECAR_OUTBOUND", build),
        },
    )]


NO_GATEWAY_ROUTE_MESSAGE = (
    "This pod's proxy has no route to the meshllm egress gateway for this host, so the "
    "request was not sent: the VirtualService that sends it there is not visible here "
    "(not applied, exportTo, or a Sidecar resource's egress hosts that do not import the "
    "meshllm namespace).")


def egress_guard(policy):
    """Egress-gateway mode, every sidecar: an LLM host that reaches Istio's
    catch-all virtual host (its VirtualService to the gateway is not visible
    here) is refused in the caller's API shape rather than sent out as it is
    in clear text. Routes only: nothing here can fail to load."""
    patches = []
    for vhost in CATCH_ALL_VHOSTS:
        for host in handled_hosts(policy):
            # INSERT_FIRST in reverse: the shapes end up in order, OpenAI's last.
            for _, path, body in reversed(shaped_errors(503, NO_GATEWAY_ROUTE_MESSAGE, "no_gateway_route")):
                patches.append({
                    "applyTo": "HTTP_ROUTE",
                    "match": {"context": "SIDECAR_OUTBOUND",
                              "routeConfiguration": {"portNumber": MESH_PORT, "vhost": {"name": vhost}}},
                    "patch": {"operation": "INSERT_FIRST", "value": direct_error(
                        HOST_NOT_IN_MESH, {**path, "headers": [authority_is(host)]}, 503, body)},
                })
    return resource("networking.istio.io/v1alpha3", "EnvoyFilter", f"{GATEWAY}-guard", ROOT_NAMESPACE,
                    {"configPatches": patches})


def gateway_resources(policy, build):
    doc = mode_policy(policy, "egress-gateway")
    keys = render.env_keys(doc)
    hosts = provider_hosts(doc) + [ALIAS_HOST]
    pod_labels = {**GATEWAY_LABELS, "sidecar.istio.io/inject": "true"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": GATEWAY, "namespace": NAMESPACE},
        "spec": {
            # Quotas are kept per replica (see k8s/README.md).
            "replicas": GATEWAY_REPLICAS,
            "selector": {"matchLabels": GATEWAY_LABELS},
            # A new replica serves before an old one stops.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {
                        # Istio's gateway injection fills in the proxy.
                        "inject.istio.io/templates": "gateway",
                        "sidecar.istio.io/bootstrapOverride": "meshllm-stats-bootstrap",
                        "proxy.istio.io/config": stats_matcher(build),
                    },
                },
                "spec": {
                    "serviceAccountName": GATEWAY,
                    # Replicas on different nodes where the cluster allows.
                    "topologySpreadConstraints": [{
                        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "ScheduleAnyway",
                        "labelSelector": {"matchLabels": GATEWAY_LABELS},
                    }],
                    # The gateway template injects istio-proxy as a
                    # regular container: it starts after these.
                    **({"initContainers": build.init_containers()} if build.init_containers() else {}),
                    "containers": [{
                        "name": "istio-proxy",
                        "image": "auto",
                        "ports": [{"containerPort": GATEWAY_TARGET_PORT, "name": "https-mesh"}],
                        # Two Envoy workers, each with its own Wasm VM, and
                        # request bodies up to max_request_bytes in flight.
                        "resources": GATEWAY_RESOURCES,
                        # Istio's own gateway probe, stated: a replica takes
                        # traffic once its Envoy is ready, which waits for
                        # meshllm's config (the module, or the agent's
                        # fail-closed substitute).
                        "readinessProbe": {
                            "httpGet": {"path": "/healthz/ready", "port": 15021},
                            "periodSeconds": 2, "timeoutSeconds": 3, "failureThreshold": 30,
                        },
                        # Provider keys: from the Secret into the proxy's
                        # environment, which the filter reads; only this
                        # namespace's admins can read the Secret.
                        "env": [
                            {"name": k, "valueFrom": {"secretKeyRef": {
                                "name": KEYS_SECRET, "key": k, "optional": True}}}
                            for k in keys
                        ] + build.proxy_env(),
                        **({"volumeMounts": build.volume_mounts()} if build.volume_mounts() else {}),
                    }],
                    **({"volumes": build.volumes()} if build.volumes() else {}),
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": GATEWAY, "namespace": NAMESPACE, "labels": GATEWAY_LABELS},
        "spec": {
            "selector": GATEWAY_LABELS,
            "ports": [{"name": "https-mesh", "port": MESH_PORT, "targetPort": GATEWAY_TARGET_PORT}],
        },
    }
    budget = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": GATEWAY, "namespace": NAMESPACE},
        # A drain never takes the last replica.
        "spec": {"minAvailable": 1, "selector": {"matchLabels": GATEWAY_LABELS}},
    }
    out = [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": GATEWAY, "namespace": NAMESPACE}},
        deployment,
        budget,
        service,
        resource("networking.istio.io/v1", "Gateway", GATEWAY, NAMESPACE, {
            "selector": GATEWAY_LABELS,
            "servers": [{
                "port": {"number": MESH_PORT, "name": "https-mesh", "protocol": "HTTPS"},
                # Callers present their workload certificate: the filter
                # reads their identity from it.
                "tls": {"mode": "ISTIO_MUTUAL"},
                # Any host of this namespace's VirtualServices: no SNI match,
                # since sidecars' mTLS carries the gateway's SNI, not the
                # provider's.
                "hosts": ["./*"],
            }],
        }),
        resource("networking.istio.io/v1", "DestinationRule", GATEWAY, NAMESPACE, {
            "host": GATEWAY_HOST,
            "trafficPolicy": {"portLevelSettings": [
                {"port": {"number": MESH_PORT}, "tls": {"mode": "ISTIO_MUTUAL"}}
            ]},
        }),
    ]
    for host in hosts:
        out.append(resource(
            "networking.istio.io/v1", "VirtualService", f"{GATEWAY}-{slug(host)}",
            NAMESPACE,
            {
                "hosts": [host],
                "gateways": ["mesh", GATEWAY],
                "http": [
                    {   # From every sidecar to the egress gateway, over mTLS.
                        "match": [{"gateways": ["mesh"], "port": MESH_PORT}],
                        "route": [{"destination": {"host": GATEWAY_HOST,
                                                   "port": {"number": MESH_PORT}}}],
                        # The alias's short names (llm.meshllm) match only
                        # in sidecars; the gateway knows its full name.
                        **({"rewrite": {"authority": ALIAS_HOST}} if host == ALIAS_HOST else {}),
                    },
                    {   # At the gateway the filter's route comes first; this
                        # one only names the host for Istio.
                        "match": [{"gateways": [GATEWAY], "port": MESH_PORT}],
                        "route": [{"destination": {"host": host, "port": {"number": MESH_PORT}}}],
                    },
                ],
            },
        ))
    out.append(resource(
        "networking.istio.io/v1alpha3", "EnvoyFilter", "meshllm", NAMESPACE,
        {
            "workloadSelector": {"labels": {"istio": GATEWAY}},
            "configPatches": config_patches(doc, "GATEWAY", build),
        },
    ))
    return out


def namespace_policy(namespace, policy, mesh):
    """A team's namespace-scoped EnvoyFilter: its policy rides on its own
    sidecars' outbound listener as metadata, where the Wasm build reads it,
    and on the routes of the LLM hosts' virtual hosts (`mesh`'s), where the
    native build reads it (the module ABI has no listener metadata)."""
    def metadata():  # a fresh copy per patch: no YAML anchors in the output
        return {"metadata": {"filter_metadata": {
            "meshllm": {LISTENER_POLICY_KEY: json.dumps(policy, separators=(",", ":"))}
        }}}
    listener = {
        "applyTo": "LISTENER",
        "match": {"context": "SIDECAR_OUTBOUND", "listener": {"portNumber": MESH_PORT}},
        "patch": {"operation": "MERGE", "value": metadata()},
    }
    routes = [{
        "applyTo": "HTTP_ROUTE",
        "match": {"context": "SIDECAR_OUTBOUND",
                  "routeConfiguration": {"portNumber": MESH_PORT, "vhost": {"name": vhost}}},
        "patch": {"operation": "MERGE", "value": metadata()},
    } for vhost in handled_vhosts(mesh)]
    return resource(
        "networking.istio.io/v1alpha3", "EnvoyFilter", "meshllm-policy", namespace,
        {"configPatches": [listener, *routes]},
    )


def dump(docs, header=HEADER):
    return header + "---\n".join(yaml.safe_dump(d, sort_keys=False, width=100) for d in docs)


def kustomization(resources, comment, **extra):
    body = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            **extra, "resources": resources}
    return HEADER + "".join(f"# {line}\n" if line else "#\n" for line in comment) + \
        yaml.safe_dump(body, sort_keys=False)


EXAMPLE_NAMESPACE = "shop"
EXAMPLE_POLICY = os.path.join(K8S_DIR, "examples", "namespace-policy", "shop.json")


def namespace_policy_yaml(namespace, policy, source, mesh):
    header = (
        f"# Generated by k8s/tools/manifests.py namespace-policy from {source}; do not edit.\n"
        f"# The policy of namespace {namespace}, owned by its team (see k8s/README.md).\n"
    )
    return dump([namespace_policy(namespace, policy, mesh)], header)


SIDECAR_EXAMPLE = os.path.join(K8S_DIR, "examples", "sidecar-app", "app.yaml")


def sidecar_example(build):
    """examples/sidecar-app with what `build` needs on the pod: the module's
    volumes and the init container that copies it, the mount for the
    injected istio-proxy (annotations), its search path in the proxy's
    environment beside the keys, and its metrics in the proxy's stats."""
    with open(SIDECAR_EXAMPLE) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    annotations.update(pod_annotations(build))
    annotations["proxy.istio.io/config"] = stats_matcher(build)
    proxy = next(c for c in pod["spec"]["containers"] if c["name"] == "istio-proxy")
    proxy["env"] = proxy["env"] + build.proxy_env()
    pod["spec"]["initContainers"] = pod["spec"].get("initContainers", []) + build.init_containers()
    pod["spec"]["volumes"] = pod["spec"].get("volumes", []) + build.volumes()
    return docs


def overlay_files(policy, build, with_bridge):
    """Both modes' overlays for one build (the native ones under
    overlays/<mode>-native)."""
    sidecar, gateway = f"overlays/sidecar{build.suffix}", f"overlays/egress-gateway{build.suffix}"
    note = [] if build.name == "wasm" else [
        f"Native build (Istio 1.31+): the dynamic module {NATIVE_MODULE_FILE}, configs by ECDS,",
        "copied from an image volume by an init container."]
    return {
        f"{sidecar}/envoyfilter.yaml": dump(sidecar_resources(policy, build)),
        f"{sidecar}/kustomization.yaml": kustomization(
            ["../../base", "envoyfilter.yaml"] + with_bridge,
            [f"Sidecar mode: the outbound port-80 listener of pods labelled {OPT_IN_LABEL}: {OPT_IN_VALUE}",
             "runs meshllm on the LLM hosts' routes (EnvoyFilter in the root namespace).",
             "See k8s/README.md.", *note]),
        f"{gateway}/gateway.yaml": dump(gateway_resources(policy, build)),
        f"{gateway}/guard.yaml": dump([egress_guard(mode_policy(policy, "egress-gateway"))]),
        f"{gateway}/observability/kustomization.yaml": kustomization(
            ["../../../observability"],
            ["The observability ConfigMaps, in the gateway's namespace."],
            namespace=NAMESPACE),
        f"{gateway}/kustomization.yaml": kustomization(
            ["../../base", "gateway.yaml", "guard.yaml", "observability"] + with_bridge,
            ["Egress-gateway mode: sidecars send LLM calls to the meshllm-egress",
             "gateway over mTLS; the filter runs there once for the mesh; every sidecar",
             "refuses an LLM host it has no route to the gateway for (guard.yaml, in the",
             "root namespace). See k8s/README.md.", *note]),
    }


def files(policy, module_url=PLACEHOLDER_MODULE_URL, sha256=None, store=None, build=None):
    """Every generated file, path relative to k8s/ → text. `store`
    (StoreOptions): the shared quota store's bridge in both overlays and
    `quotas.store` in the plugin configuration; None: neither. `build`: a
    NativeBuild for the native overlays (and their example app) instead of
    the Wasm ones at module_url."""
    policy = with_store(policy, store)
    build = build or WasmBuild(module_url, sha256)
    with open(EXAMPLE_POLICY) as f:
        example = json.load(f)
    with_bridge = ["store.yaml"] if store else []
    out = {
        "examples/namespace-policy/envoyfilter.yaml": namespace_policy_yaml(
            EXAMPLE_NAMESPACE, example, "shop.json", policy),
        "examples/namespace-policy/kustomization.yaml": kustomization(
            ["envoyfilter.yaml"],
            ["Example: the shop team's own policy for its sidecars, from shop.json."]),
        "base/resources.yaml": dump(base_resources(policy)),
        "base/kustomization.yaml": kustomization(
            ["resources.yaml"],
            ["Provider hosts (ServiceEntry + TLS-originating DestinationRule) and the",
             "in-mesh alias Service; both modes build on this."]),
        **overlay_files(policy, build, with_bridge),
    }
    if build.name == "native":
        out["examples/sidecar-app-native/app.yaml"] = dump(
            sidecar_example(build),
            "# Generated by k8s/tools/manifests.py --build native from examples/sidecar-app/app.yaml;\n"
            "# do not edit. The sidecar-mode example app with the native module: an init\n"
            "# container copies it from the module image into an emptyDir, which istio-proxy\n"
            f"# mounts at {NATIVE_MODULE_DIR} (its search path). See k8s/README.md.\n")
        out["examples/sidecar-app-native/kustomization.yaml"] = kustomization(
            ["app.yaml"], ["Example: an application in sidecar mode, native build (Istio 1.31+)."])
    if store:
        for mode in ("sidecar", "egress-gateway"):
            out[f"overlays/{mode}{build.suffix}/store.yaml"] = dump(
                store_resources(mode_policy(policy, mode), store, mode))
    return out


def load_policy(path=MESH_POLICY):
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command")
    ns = sub.add_parser("namespace-policy", help="a namespace's policy as an EnvoyFilter (YAML)")
    ns.add_argument("--namespace", required=True)
    ns.add_argument("policy", help="the namespace policy (JSON)")
    ap.add_argument("--policy", default=MESH_POLICY, help="the mesh policy (JSON)")
    ap.add_argument("--module-url",
                    help="where proxies fetch the module: oci://... or https://... "
                         "(required, except to regenerate the checked-in k8s/ copy)")
    ap.add_argument("--sha256", help="oci://: the manifest digest; https://: the module's sha256")
    ap.add_argument("--build", choices=("wasm", "native"), default="wasm",
                    help="wasm (default): overlays/sidecar and overlays/egress-gateway, Istio 1.28+; "
                         "native: overlays/*-native, the Envoy dynamic module, Istio 1.31+")
    ap.add_argument("--module-image",
                    help="--build native: the image holding libmeshllm.so (make oci pushes it), "
                         "mounted as an image volume (required, except for the checked-in copy)")
    ap.add_argument("--copy-image", default=COPY_IMAGE,
                    help="--build native: the image of the init container that copies the module "
                         "out of its image volume; your mesh's proxy image, not its distroless "
                         f"variant (default {COPY_IMAGE})")
    ap.add_argument("--out-dir", default=K8S_DIR)
    ap.add_argument("--store", metavar="REDIS_HOST:PORT",
                    help="count shared quota rules in this Redis: installs the bridge (webdis) "
                         "and sets quotas.store (default: no shared store)")
    ap.add_argument("--store-user", default=STORE_DEFAULT_USER,
                    help=f"the Redis ACL user the bridge logs in as (default {STORE_DEFAULT_USER}); "
                         f"its password: Secret {STORE_SECRET}, key {STORE_SECRET_KEY}")
    ap.add_argument("--store-bridge-image", default=STORE_BRIDGE_IMAGE,
                    help=f"webdis 0.1.12 or later (default {STORE_BRIDGE_IMAGE})")
    ap.add_argument("--store-client-namespaces", metavar="NS,NS",
                    help="sidecar mode: only these namespaces' workloads may call the bridge "
                         "(default: any workload with a mesh certificate)")
    args = ap.parse_args(argv)
    if args.command == "namespace-policy":
        with open(args.policy) as f:
            policy = json.load(f)
        sys.stdout.write(namespace_policy_yaml(args.namespace, policy, os.path.basename(args.policy),
                                               load_policy()))
        return
    # Only `make k8s` may write the placeholders, and only into k8s/.
    checked_in = os.path.abspath(args.out_dir) == os.path.abspath(K8S_DIR)
    if args.build == "native":
        if args.module_url or args.sha256:
            ap.error("--build native takes --module-image, not --module-url/--sha256")
        if args.module_image is None and not checked_in:
            ap.error("--module-image is required: the image holding libmeshllm.so "
                     "(make oci prints it)")
        build = NativeBuild(args.module_image or PLACEHOLDER_MODULE_IMAGE, args.copy_image)
    else:
        if args.module_image or args.copy_image != COPY_IMAGE:
            ap.error("--module-image and --copy-image are for --build native")
        if args.module_url is None and not checked_in:
            ap.error("--module-url is required: where your proxies fetch the module "
                     "(make oci prints it)")
        build = WasmBuild(args.module_url or PLACEHOLDER_MODULE_URL, args.sha256)
    store = None
    if args.store:
        namespaces = [n for n in (args.store_client_namespaces or "").split(",") if n]
        store = StoreOptions.parse(args.store, user=args.store_user, image=args.store_bridge_image,
                                   client_namespaces=namespaces or None)
    for rel, text in files(load_policy(args.policy), store=store, build=build).items():
        path = os.path.join(args.out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        print(path)
    # The egress-gateway overlay includes the observability ConfigMaps by a
    # relative path: an install written elsewhere carries its own copy.
    if os.path.abspath(args.out_dir) != os.path.abspath(K8S_DIR):
        target = os.path.join(args.out_dir, "observability")
        shutil.copytree(os.path.join(K8S_DIR, "observability"), target, dirs_exist_ok=True)
        print(target)


if __name__ == "__main__":
    main()
