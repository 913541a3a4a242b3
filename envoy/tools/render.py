#!/usr/bin/env python3
"""Render a complete Envoy bootstrap for meshllm from a plugin config.

One generator serves `make run`, the integration tests and the checked-in
example (envoy/envoy.yaml), so what is tested is what is shipped:

    python3 envoy/tools/render.py envoy/meshllm.json > envoy/envoy.yaml

Each provider in the plugin config becomes one Envoy cluster (named by its
`cluster`, default its `name`), addressed and TLS-configured from its
`base_url`. `upstreams` (tests) can point a cluster at another address while
the filter keeps sending the provider's real `:authority`.

Two builds of the same gateway: the Wasm filter (`--build wasm`, the
default) and the native Envoy dynamic module (`--build native`,
`libmeshllm.so`). Only the two filters, the access-log fields and the stat
prefixes differ between their bootstraps.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from urllib.parse import urlsplit

WASM_DEFAULT = "target/wasm32-wasip1/release/meshllm.wasm"
NATIVE_DEFAULT = "target/native/libmeshllm.so"
BUILDS = ("wasm", "native")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CLUSTER_HEADER = "x-meshllm-cluster"
# Failover (mirrors src/config/routing.rs and src/pipeline/filter.rs).
FAILOVER_CLUSTER = "meshllm"
POSITION_HEADER_PREFIX = "x-meshllm-p"
FAILOVER_DEFAULTS = {"enabled": True, "max_attempts": 3, "per_try_timeout_ms": 60000}
# The filter's own size limits (mirror src/config/mod.rs).
DEFAULT_MAX_REQUEST_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
# The listener half names the caller's API on requests it serves itself;
# header_to_metadata moves it into dynamic metadata (mirrors CALLER_API_HEADER
# in src/pipeline/filter.rs) for local_reply_config.
CALLER_API_HEADER = "x-meshllm-caller-api"
METADATA_NAMESPACE = "meshllm"
CALLER_API_KEY = "caller_api"

# Labels travel in metric names as ";key=value"; Envoy cuts them out again.
# Mirrors metrics::LABELS in src/metrics.rs (a test keeps them equal).
METRIC_LABELS = [
    "caller_namespace", "caller_service",
    "gen_ai_operation_name", "gen_ai_provider_name",
    "gen_ai_request_model", "gen_ai_response_model",
    "gen_ai_token_type", "error_type", "route_reason", "fallback_from",
    "limit", "reason", "kind", "scope", "outcome", "guardrail", "action", "stage",
]

# Envoy puts the stats a filter defines under a namespace of its own:
# `wasmcustom.` for Wasm, the module config's `metrics_namespace` for a
# dynamic module (rendered from this constant; Envoy's default).
WASM_METRICS_NAMESPACE = "wasmcustom"
NATIVE_METRICS_NAMESPACE = "dynamicmodulescustom"
# Envoy 1.40 prints a module's stats as `envoy_<namespace>_<name>` unless
# this runtime flag registers the namespace as a custom one (prefix cut, as
# for `wasmcustom.`): with it both builds export the same metric names.
NATIVE_RUNTIME = {"layers": [{"name": "meshllm", "static_layer": {
    "envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix": True}}]}
METRICS_NAMESPACES = {"wasm": WASM_METRICS_NAMESPACE, "native": NATIVE_METRICS_NAMESPACE}
# Every metric the filter defines starts with one of these after its namespace.
METRIC_BASE_PREFIXES = ["gen_ai.", "meshllm_"]


def metric_prefixes(build="wasm"):
    """The stat-name prefixes of every metric `build` defines."""
    return [f"{METRICS_NAMESPACES[build]}.{p}" for p in METRIC_BASE_PREFIXES]


# What Istio proxies keep (k8s/observability): either build's stats.
METRIC_PREFIXES = metric_prefixes("wasm") + metric_prefixes("native")

# Histogram buckets: tokens per request, and milliseconds for latencies.
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576]
LATENCY_MS_BUCKETS = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    120000, 300000, 600000,
]


def stats_tags(plugin_config=None):
    """Envoy's tag extractors for every label the filter puts in metric
    names, attribution tags (`tag_<name>`) included."""
    tags = (plugin_config or {}).get("attribution", {}).get("tags", [])
    labels = METRIC_LABELS + [f"tag_{t['name']}" for t in tags]
    return [{"tag_name": label, "regex": f"(;{label}=([^;]*))"} for label in labels]


def stats_config(plugin_config=None, inclusion_prefixes=None):
    """Envoy's `stats_config`: label extraction and histogram buckets (and,
    as Istio proxies have, an allow-list of stat name prefixes)."""
    matcher = (
        {"stats_matcher": {"inclusion_list": {"patterns": [
            {"prefix": p} for p in inclusion_prefixes]}}}
        if inclusion_prefixes
        else {}
    )
    return {
        **matcher,
        "stats_tags": stats_tags(plugin_config),
        # The same buckets under either build's namespace.
        "histogram_bucket_settings": [
            setting
            for ns in (WASM_METRICS_NAMESPACE, NATIVE_METRICS_NAMESPACE)
            for setting in (
                {"match": {"prefix": f"{ns}.gen_ai.client.token.usage"},
                 "buckets": list(TOKEN_BUCKETS)},
                {"match": {"prefix": f"{ns}.gen_ai.server."}, "buckets": list(LATENCY_MS_BUCKETS)},
            )
        ],
    }


def stats_bootstrap(plugin_config=None):
    """The bootstrap fragment an Istio proxy merges into its own (ConfigMap
    key `custom_bootstrap.json`, pod annotation
    `sidecar.istio.io/bootstrapOverride`): the same labels and buckets."""
    return {"stats_config": stats_config(plugin_config)}


# Access-log fields: Envoy's own, and those the filter leaves for the log.
# The Wasm build leaves them in filter state (Envoy shows Wasm filter state
# under `wasm.`), the native build in dynamic metadata under `meshllm`, each
# key a field name; absent fields are "-" either way.
FILTER_STATE_FIELDS = [
    "caller", "tags", "provider", "request_model", "response_model", "attempts",
    "route_reason", "input_tokens", "output_tokens", "cached_tokens",
    "tokens_estimated", "cost_micro_usd", "ttft_ms", "quota", "policy", "guardrails", "cache",
]
NATIVE_LOG_NAMESPACE = "meshllm"


def log_field(field, build="wasm"):
    """(command, param) of Envoy's format operator for a filter field."""
    if build == "native":
        return "DYNAMIC_METADATA", f"{NATIVE_LOG_NAMESPACE}:{field}"
    return "FILTER_STATE", f"wasm.meshllm.{field}:PLAIN"


def log_operator(field, build="wasm"):
    command, param = log_field(field, build)
    return f"%{command}({param})%"


def caller_path(build="wasm"):
    """The caller's path: the filter keeps it before pointing a call at a
    provider, whose path Envoy's :path holds from then on (Envoy 1.37+
    COALESCE; requests the filter did not forward keep the caller's :path)."""
    command, param = log_field("path", build)
    return "%COALESCE(" + json.dumps({"operators": [
        {"command": command, "param": param},
        {"command": "REQ", "param": ":path"},
    ]}, separators=(",", ":")) + ")%"


def access_log_format(build="wasm"):
    """The JSON access-log line: the same keys for both builds."""
    return {
        "start_time": "%START_TIME%",
        "method": "%REQ(:METHOD)%",
        "path": caller_path(build),
        "upstream_path": "%REQ(:PATH)%",
        "status": "%RESPONSE_CODE%",
        # Why Envoy ended the stream: UPE or UT on an answer cut after it began.
        "response_flags": "%RESPONSE_FLAGS%",
        "duration_ms": "%DURATION%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        **{f: log_operator(f, build) for f in FILTER_STATE_FIELDS},
    }


def access_log_text(build="wasm"):
    """The same fields as one text line (key=value, in this order)."""
    return (
        f"[%START_TIME%] \"%REQ(:METHOD)% {caller_path(build)}\" %RESPONSE_CODE% %DURATION%ms"
        " upstream_path=%REQ(:PATH)% response_flags=%RESPONSE_FLAGS%"
        + "".join(f" {f}={log_operator(f, build)}" for f in FILTER_STATE_FIELDS)
        + "\n"
    )


CALLER_PATH = caller_path()
ACCESS_LOG_FORMAT = access_log_format()
ACCESS_LOG_TEXT = access_log_text()


def access_log(path, fmt="json", build="wasm"):
    """A file access log with the meshllm fields, as JSON or text lines."""
    log_format = (
        {"json_format": access_log_format(build)}
        if fmt == "json"
        else {"text_format_source": {"inline_string": access_log_text(build)}}
    )
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path,
            "log_format": log_format,
        },
    }


# What each provider kind is by default: base URLs and the environment
# variables its credentials come from. providers.json is generated from the
# Rust code, and `cargo test` fails while the two differ.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "providers.json")) as _f:
    PROVIDER_KINDS = json.load(_f)["kinds"]

# The fields that name the variables a Bedrock provider signs with, unless it
# uses an API key (api_key_env) instead, and their defaults.
AWS_ENV_DEFAULTS = dict(PROVIDER_KINDS["bedrock"]["env_defaults"])


def provider_url(provider):
    """A provider's base_url, with the kind's default filled in (None where
    the kind has none: the filter refuses such a config)."""
    if provider.get("base_url"):
        return provider["base_url"]
    kind = PROVIDER_KINDS.get(provider.get("kind"), {})
    region = provider.get("region")
    if region in kind.get("default_base_url_by_region", {}):
        return kind["default_base_url_by_region"][region]
    template = kind.get("default_base_url")
    if template is None or ("{region}" in template and not region):
        return None
    return template.replace("{region}", region or "")


def provider_env_keys(provider):
    """The environment variables a provider's credentials come from."""
    if provider.get("api_key_env"):
        return [provider["api_key_env"]]
    defaults = PROVIDER_KINDS.get(provider.get("kind"), {}).get("env_defaults", [])
    return [provider.get(field, default) for field, default in defaults]


def env_keys(plugin_config):
    """Every environment variable the providers' credentials come from, each
    once, in config order."""
    keys = []
    for p in plugin_config["providers"]:
        for key in provider_env_keys(p):
            if key not in keys:
                keys.append(key)
    return keys


def provider_endpoint(provider):
    """(host, port, tls) of a provider, from its base_url."""
    parts = urlsplit(provider_url(provider))
    tls = parts.scheme == "https"
    return parts.hostname, parts.port or (443 if tls else 80), tls


# Envoy's default circuit breakers allow 1024 connections, pending and
# active requests per cluster and only 3 retries in flight: past those a
# failed attempt goes back to the caller instead of on to the next target
# (upstream_rq_retry_overflow), and a burst of long streams is refused.
# LLM calls are few and long; what limits them is the gateway's quotas and
# the providers' own 429s, not a connection count. So, as Istio does for
# its clusters, meshllm's clusters set every limit to the maximum.
UNLIMITED = 4294967295


def circuit_breakers():
    limits = {"max_connections": UNLIMITED, "max_pending_requests": UNLIMITED,
              "max_requests": UNLIMITED, "max_retries": UNLIMITED}
    return {"thresholds": [{"priority": p, **limits} for p in ("DEFAULT", "HIGH")]}


def cluster(name, host, port, tls, sni=None, connect_timeout="5s"):
    is_ip = all(c.isdigit() or c == "." for c in host) or ":" in host
    c = {
        "name": name,
        "type": "STATIC" if is_ip else "LOGICAL_DNS",
        "connect_timeout": connect_timeout,
        "circuit_breakers": circuit_breakers(),
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": host, "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if is_ip:
        del c["dns_lookup_family"]
    if tls:
        c["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": sni or host,
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"filename": CA_BUNDLE},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": sni or host}}
                        ],
                    }
                },
            },
        }
    return c


# webdis's own default address, where the bridge runs beside Envoy.
STORE_DEFAULT = ("127.0.0.1", 7379)


def store_cluster(store, host, port):
    """The shared quota store's bridge (webdis over HTTP/1.1): the filter
    calls it with dispatch_http_call; connections are kept and reused."""
    c = cluster(store["cluster"], host, port, False, connect_timeout="1s")
    c["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http_protocol_options": {}},
        }
    }
    return c


def guardrail_clusters(plugin_config, upstreams):
    """A cluster for each external guardrail (its `url`'s host; `upstreams`
    may map the cluster name elsewhere, as tests do)."""
    out = []
    for rule in (plugin_config.get("guardrails") or {}).get("rules", []):
        ext = rule.get("external")
        if not ext:
            continue
        name = ext.get("cluster") or f"guardrail-{rule['name']}"
        if any(c["name"] == name for c in out):
            continue
        if name in upstreams:
            host, port = upstreams[name]
            tls = False
        else:
            parts = urlsplit(ext["url"])
            tls = parts.scheme == "https"
            host, port = parts.hostname, parts.port or (443 if tls else 80)
        out.append(cluster(name, host, port, tls, connect_timeout="1s"))
    return out


def failover_settings(plugin_config):
    settings = dict(FAILOVER_DEFAULTS)
    settings.update(plugin_config.get("failover", {}))
    return settings


def tls_socket(sni):
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": sni,
            "common_tls_context": {
                "validation_context": {
                    "trusted_ca": {"filename": CA_BUNDLE},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": sni}}
                    ],
                }
            },
        },
    }


def position_clusters(plugin_config, upstreams, max_attempts, connect_timeout="5s"):
    """One cluster per attempt position, each holding every provider as an
    endpoint, and the aggregate cluster that tries them in order.

    The filter names each position's provider in a header; Envoy's
    header_to_metadata filter turns it into load-balancer metadata, and each
    position cluster's subset load balancer picks that provider. Retries move
    to the next position (previous_priorities), so a request's own chain of
    providers is tried in its own order.
    """
    providers = []
    seen = set()
    for p in plugin_config["providers"]:
        if p["name"] not in seen:
            seen.add(p["name"])
            providers.append(p)
    clusters = []
    for i in range(max_attempts):
        key = f"p{i}"
        endpoints, matches, all_ip = [], [], True
        for p in providers:
            cluster_name = p.get("cluster", p["name"])
            if cluster_name in upstreams:
                (host, port), tls = upstreams[cluster_name], False
            else:
                host, port, tls = provider_endpoint(p)
            all_ip = all_ip and (all(c.isdigit() or c == "." for c in host) or ":" in host)
            metadata = {
                "envoy.lb": {key: p["name"]},
                "meshllm": {"provider": p["name"], "position": str(i)},
            }
            if tls:
                metadata["envoy.transport_socket_match"] = {"provider": p["name"]}
                matches.append(
                    {"name": p["name"], "match": {"provider": p["name"]},
                     "transport_socket": tls_socket(host)}
                )
            endpoints.append(
                {
                    "endpoint": {
                        "address": {"socket_address": {"address": host, "port_value": port}}
                    },
                    "metadata": {"filter_metadata": metadata},
                }
            )
        # The request names every position; this cluster reads its own.
        selectors = [{"keys": [key]}]
        if max_attempts > 1:
            selectors.insert(0, {
                "keys": [f"p{j}" for j in range(max_attempts)],
                "fallback_policy": "KEYS_SUBSET",
                "fallback_keys_subset": [key],
            })
        c = {
            "name": f"{FAILOVER_CLUSTER}.{key}",
            "type": "STATIC" if all_ip else "STRICT_DNS",
            "connect_timeout": connect_timeout,
            "circuit_breakers": circuit_breakers(),
            "lb_subset_config": {
                "fallback_policy": "NO_FALLBACK",
                "subset_selectors": selectors,
            },
            "load_assignment": {
                "cluster_name": f"{FAILOVER_CLUSTER}.{key}",
                "endpoints": [{"lb_endpoints": endpoints}],
            },
        }
        if not all_ip:
            c["dns_lookup_family"] = "V4_PREFERRED"
        if matches:
            c["transport_socket_matches"] = matches
        clusters.append(c)
    clusters.append(
        {
            "name": FAILOVER_CLUSTER,
            "connect_timeout": connect_timeout,
            # Retries are counted against the route's cluster: this one.
            "circuit_breakers": circuit_breakers(),
            "lb_policy": "CLUSTER_PROVIDED",
            "cluster_type": {
                "name": "envoy.clusters.aggregate",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                    "clusters": [f"{FAILOVER_CLUSTER}.p{i}" for i in range(max_attempts)],
                },
            },
        }
    )
    return clusters


def route_action(failover, route_timeout):
    action = {"cluster_header": CLUSTER_HEADER, "timeout": route_timeout}
    if failover["enabled"]:
        action["retry_policy"] = {
            # What makes an attempt move on to the next target. The filter
            # sets the number of retries per request (x-envoy-max-retries).
            "retry_on": "5xx,reset,connect-failure,retriable-status-codes",
            "retriable_status_codes": [429],
            "num_retries": 0,
            "per_try_timeout": f"{failover['per_try_timeout_ms'] / 1000:g}s",
            "retry_priority": {
                "name": "envoy.retry_priorities.previous_priorities",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                    "update_frequency": 1,
                },
            },
            # The next target is another provider: no reason to wait long.
            "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.02s"},
        }
    return action


def meshllm_routes(plugin_config, route_timeout="600s"):
    """The route the filter steers to (it names the cluster in a header),
    then a refusal for anything it did not route, so nothing reaches a
    provider unseen."""
    not_routed = json.dumps(
        {
            "error": {
                "message": "The request was not routed by meshllm.",
                "type": "invalid_request_error",
                "param": None,
                "code": "not_routed",
            }
        }
    )
    return [
        {
            "name": "meshllm",
            "match": {
                "prefix": "/",
                "headers": [{"name": CLUSTER_HEADER, "present_match": True}],
            },
            "route": route_action(failover_settings(plugin_config), route_timeout),
            "request_headers_to_remove": [CLUSTER_HEADER],
        },
        {
            "name": "meshllm-not-routed",
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": not_routed}},
        },
    ]


def istio_agent_env(node, directory):
    """What Istio's agent gives the proxy process from which it writes the
    node's metadata; the native build reads these (the module ABI has no
    node), the Wasm build the node the agent wrote. Scalar metadata as
    `ISTIO_META_<KEY>`, the namespace as `POD_NAMESPACE`, the labels as a
    downward-API file in `directory`."""
    metadata = node.get("metadata", {})
    env = {f"ISTIO_META_{k}": str(v) for k, v in metadata.items() if not isinstance(v, dict)}
    if "NAMESPACE" in metadata:
        env["POD_NAMESPACE"] = str(metadata["NAMESPACE"])
    labels = metadata.get("LABELS")
    if isinstance(labels, dict):
        path = os.path.join(directory, "labels")
        with open(path, "w") as f:
            f.writelines(f'{k}="{v}"\n' for k, v in labels.items())
        env["MESHLLM_POD_LABELS_FILE"] = path
    return env


def put_route_metadata(listener, metadata):
    """The native build reads a namespace policy from the metadata of the
    route the request matched (the module ABI has no listener metadata):
    the same `filter_metadata.meshllm.policy` on every route of the
    listener's virtual hosts, so it is there before the filter routes."""
    for chain in listener["filter_chains"]:
        for f in chain["filters"]:
            config = f.get("typed_config", {}).get("route_config", {})
            for vhost in config.get("virtual_hosts", []):
                for route in vhost.get("routes", []):
                    if metadata:
                        route["metadata"] = metadata
                    else:
                        route.pop("metadata", None)


def position_metadata_filter(max_attempts):
    """Turns the filter's position headers into load-balancer metadata, and
    the caller's API into the metadata `local_reply_config` reads. Each
    header is removed: providers never see them."""
    caller_api = {
        "header": CALLER_API_HEADER,
        "on_header_present": {
            "metadata_namespace": METADATA_NAMESPACE,
            "key": CALLER_API_KEY,
            "type": "STRING",
        },
        "remove": True,
    }
    return {
        "name": "envoy.filters.http.header_to_metadata",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config",
            "request_rules": [caller_api] + [
                {
                    "header": f"{POSITION_HEADER_PREFIX}{i}",
                    "on_header_present": {
                        "metadata_namespace": "envoy.lb",
                        "key": f"p{i}",
                        "type": "STRING",
                    },
                    "remove": True,
                }
                for i in range(max_attempts)
            ],
        },
    }


def buffer_limit_bytes(plugin_config):
    """The listener's `per_connection_buffer_limit_bytes`: Envoy's limit on
    what any filter holds, in either half (the upstream half's buffers have
    the downstream connection's limit; the clusters' own limit only paces
    reads). One MiB above the filter's larger limit, so its own 413
    `request_too_large` and 502 `response_too_large` fire first."""
    largest = max(
        plugin_config.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES),
        plugin_config.get("max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES),
    )
    return largest + 1024 * 1024


# Envoy's own replies to a caller of each API, by status: OpenAI `type` and
# `code`, Anthropic `type`, Gemini `status` (as the filter writes them:
# error_type_for_status in src/core/api_error.rs and src/translate/
# anthropic_openai.rs, google_status in src/translate/gemini_openai.rs).
# None: any other status (Envoy answers its failures with 5xx).
LOCAL_REPLY_TYPES = {
    502: ("server_error", "provider_unavailable", "api_error", "UNAVAILABLE"),
    503: ("server_error", "provider_unavailable", "overloaded_error", "UNAVAILABLE"),
    504: ("server_error", "provider_timeout", "timeout_error", "DEADLINE_EXCEEDED"),
    None: ("server_error", None, "api_error", "INTERNAL"),
}


def local_reply_body(api, status):
    """The JSON body of Envoy's reply to a caller of `api`, with Envoy's
    own text as the message."""
    openai_type, openai_code, anthropic_type, gemini_status = LOCAL_REPLY_TYPES[status]
    message = "%LOCAL_REPLY_BODY%"
    if api == "anthropic":
        return {"type": "error", "error": {"type": anthropic_type, "message": message}}
    if api == "gemini":
        return {"error": {"code": "%RESPONSE_CODE%", "message": message, "status": gemini_status}}
    return {"error": {"message": message, "type": openai_type, "param": None, "code": openai_code}}


# Response flags of the failures Envoy answers itself (no host, connect
# failure, overflow, timeouts, resets, protocol errors, DNS, overload). Not
# URX: it only says the retries ran out, and the filter shapes that answer.
ENVOY_FAILURE_FLAGS = [
    "UH", "UF", "UO", "UT", "UC", "UR", "LR", "UPE", "UMSDR", "SI", "DT", "DF", "OM", "DO",
]


def local_reply_config():
    """Shapes the replies Envoy sends past the filter: once the listener
    half holds a provider's response headers (to translate the answer or
    rewrite an error), Envoy answers a failure that follows (a provider
    that closes mid-answer, a timeout) straight to the caller. A mapper
    applies only to requests the listener half marked with the caller's
    API and only to replies Envoy made for a failure (one of
    ENVOY_FAILURE_FLAGS is set); the filter's own replies pass untouched."""
    mappers = []
    for api in ("openai", "anthropic", "gemini"):
        marked = {
            "metadata_filter": {
                "matcher": {
                    "filter": METADATA_NAMESPACE,
                    "path": [{"key": CALLER_API_KEY}],
                    "value": {"string_match": {"exact": api}},
                },
                "match_if_key_not_found": False,
            }
        }
        envoys = {"response_flag_filter": {"flags": ENVOY_FAILURE_FLAGS}}
        for status in LOCAL_REPLY_TYPES:
            conditions = [marked, envoys]
            if status is not None:
                conditions.append({"status_code_filter": {"comparison": {
                    "op": "EQ",
                    "value": {"default_value": status, "runtime_key": "meshllm.local_reply.status"},
                }}})
            mappers.append({
                "filter": {"and_filter": {"filters": conditions}},
                "body_format_override": {
                    "json_format": local_reply_body(api, status),
                    "content_type": "application/json",
                },
            })
    return {"mappers": mappers}


def router_filter():
    config = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
        # Providers need not see Envoy's internal x-envoy-* headers.
        "suppress_envoy_headers": True,
    }
    return {"name": "envoy.filters.http.router", "typed_config": config}


WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
LISTENER_NAME = "meshllm"
UPSTREAM_NAME = "meshllm.upstream"


def local_code(path):
    """A Wasm module read from the proxy's disk."""
    return {"local": {"filename": path}}


def remote_code(uri, sha256=None, timeout="30s"):
    """A Wasm module fetched by URL. Istio's agent downloads it (https:// or
    oci://) and hands Envoy a local file; the cluster name only satisfies
    Envoy's schema."""
    remote = {"http_uri": {"uri": uri, "cluster": "meshllm-module", "timeout": timeout}}
    if sha256:
        remote["sha256"] = sha256
    return {"remote": remote}


def wasm_config(plugin_config, code, keys, upstream=False):
    """The Wasm filter's typed config: one module and one policy for both
    halves; the root id tells the module which half it is."""
    name = UPSTREAM_NAME if upstream else LISTENER_NAME
    vm_config = {"vm_id": "meshllm", "runtime": "envoy.wasm.runtime.v8", "code": code}
    if keys:
        # Provider keys reach the VM from the proxy's environment, never
        # from the plugin config.
        vm_config["environment_variables"] = {"host_env_keys": list(keys)}
    config = {
        "name": name,
        "root_id": name,
        # Both halves read the body before they rewrite headers.
        "allow_on_headers_stop_iteration": True,
        "fail_open": False,
        "configuration": {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": json.dumps(plugin_config, separators=(",", ":")),
        },
        "vm_config": vm_config,
    }
    return {"@type": WASM_TYPE, "config": config}


def wasm_filter(plugin_config, code, keys, upstream=False):
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": wasm_config(plugin_config, code, keys, upstream),
    }


DYNAMIC_MODULE_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
)


def native_config(plugin_config, module, upstream=False):
    """The dynamic-module filter's typed config: the same `.so` and policy
    for both halves; the filter name tells the module which half it is, as
    the root id does for Wasm. The module reads provider keys from the
    process environment (no host_env_keys)."""
    return {
        "@type": DYNAMIC_MODULE_TYPE,
        "dynamic_module_config": {
            # By absolute path: no ENVOY_DYNAMIC_MODULES_SEARCH_PATH needed.
            "module": {"local": {"filename": os.path.abspath(module)}},
            "metrics_namespace": NATIVE_METRICS_NAMESPACE,
        },
        "filter_name": UPSTREAM_NAME if upstream else LISTENER_NAME,
        "filter_config": {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": json.dumps(plugin_config, separators=(",", ":")),
        },
    }


def native_filter(plugin_config, module, upstream=False):
    return {
        "name": "envoy.filters.http.dynamic_modules",
        "typed_config": native_config(plugin_config, module, upstream),
    }


def meshllm_filter(plugin_config, build, wasm, module, keys, upstream=False):
    """One half of the gateway, in the build asked for."""
    if build == "native":
        return native_filter(plugin_config, module, upstream)
    if build != "wasm":
        raise ValueError(f"unknown build {build!r}: one of {', '.join(BUILDS)}")
    return wasm_filter(plugin_config, local_code(wasm), keys, upstream)


def upstream_http_filters(upstream_half):
    """An upstream filter chain: the upstream half, then the codec."""
    return [
        upstream_half,
        {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"
            },
        },
    ]


def upstream_protocol_options(http_filters):
    """Cluster protocol options that run `http_filters` on each attempt
    (the filters of an aggregate cluster run for all its clusters)."""
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http_protocol_options": {}},
            "http_filters": http_filters,
        }
    }


def render(
    plugin_config,
    *,
    build="wasm",
    wasm=WASM_DEFAULT,
    module=NATIVE_DEFAULT,
    port=10000,
    admin_port=9901,
    address="127.0.0.1",
    upstreams=None,
    route_timeout="600s",
    access_log_path=None,
    access_log_format="json",
    stats_flush_interval=None,
    stats_inclusion_prefixes=None,
    other_services=None,
    node=None,
    downstream_tls=None,
    listener_metadata=None,
):
    """The Envoy bootstrap (a dict) for `plugin_config` (a dict), with the
    Wasm filter `wasm` or, for `build="native"`, the dynamic module `module`.

    `listener_metadata` becomes the listener's `metadata` (for example
    `{"filter_metadata": {"meshllm": {"policy": "<json>"}}}`, a namespace
    policy as an Istio EnvoyFilter's LISTENER MERGE delivers it)."""
    upstreams = upstreams or {}
    failover = failover_settings(plugin_config)
    clusters = []
    keys = env_keys(plugin_config)
    seen = set()
    for p in plugin_config["providers"]:
        name = p.get("cluster", p["name"])
        if name in seen or failover["enabled"]:
            continue
        seen.add(name)
        if name in upstreams:
            host, uport = upstreams[name]
            clusters.append(cluster(name, host, uport, False))
        else:
            host, hport, tls = provider_endpoint(p)
            clusters.append(cluster(name, host, hport, tls))
    if failover["enabled"]:
        clusters.extend(position_clusters(plugin_config, upstreams, failover["max_attempts"]))

    listener_filter = meshllm_filter(plugin_config, build, wasm, module, keys)
    upstream_filters = []
    if failover["enabled"]:
        upstream_filters = upstream_http_filters(
            meshllm_filter(plugin_config, build, wasm, module, keys, upstream=True)
        )
        # The upstream half runs on the aggregate cluster only, so it sees
        # meshllm's attempts and nothing else.
        clusters[-1]["typed_extension_protocol_options"] = upstream_protocol_options(
            upstream_filters
        )
    # After the aggregate cluster (above, the last one so far): the
    # store's calls never pass the upstream half.
    store = (plugin_config.get("quotas") or {}).get("store")
    if store:
        clusters.append(store_cluster(store, *(upstreams.get(store["cluster"]) or STORE_DEFAULT)))
    clusters.extend(guardrail_clusters(plugin_config, upstreams))
    # Off unless a route turns them on, as in Istio: only the LLM host's
    # routes do, so a pod's other traffic never enters the filter.
    gateway_filters = [
        {**listener_filter, "disabled": True},
        {**position_metadata_filter(failover["max_attempts"] if failover["enabled"] else 0),
         "disabled": True},
    ]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "meshllm",
        "codec_type": "AUTO",
        "route_config": {
            "name": "meshllm",
            "virtual_hosts": [
                # Other services on the same listener, as a sidecar's outbound
                # listener carries a pod's other HTTP traffic (tests).
                *[
                    {
                        "name": f"svc_{name}",
                        "domains": [name, f"{name}:*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": f"svc_{name}"}}],
                    }
                    for name in (other_services or {})
                ],
                {
                    "name": "llm",
                    "domains": ["*"],
                    # The upstream half learns which attempt it serves.
                    "include_request_attempt_count": failover["enabled"],
                    "typed_per_filter_config": enable_filters(gateway_filters),
                    "routes": meshllm_routes(plugin_config, route_timeout),
                }
            ],
        },
        "http_filters": [*gateway_filters, router_filter()],
        "local_reply_config": local_reply_config(),
    }
    if access_log_path:
        hcm["access_log"] = [access_log(access_log_path, access_log_format, build)]
    for name, (svc_host, svc_port) in (other_services or {}).items():
        clusters.append(cluster(f"svc_{name}", svc_host, svc_port, False))
    filter_chain = {
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": hcm,
            }
        ]
    }
    if downstream_tls:
        filter_chain["transport_socket"] = mtls_transport_socket(**downstream_tls)
    listener = {
        "name": "meshllm",
        "address": {"socket_address": {"address": address, "port_value": port}},
        # Above the filter's own limits, so its clear 413 and 502 win.
        "per_connection_buffer_limit_bytes": buffer_limit_bytes(plugin_config),
        "filter_chains": [filter_chain],
    }
    if listener_metadata is not None:
        listener["metadata"] = listener_metadata
        if build == "native":
            put_route_metadata(listener, listener_metadata)
    bootstrap = {
        "node": node or {"id": "meshllm", "cluster": "meshllm"},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "stats_config": stats_config(plugin_config, stats_inclusion_prefixes),
        # Histograms reach /stats/prometheus when Envoy merges them, once per
        # flush interval (5 s unless set).
        **({"stats_flush_interval": stats_flush_interval} if stats_flush_interval else {}),
        **({"layered_runtime": NATIVE_RUNTIME} if build == "native" else {}),
        "static_resources": {
            "listeners": [listener],
            "clusters": clusters,
        },
    }
    return bootstrap


LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"


def enable_filters(filters):
    """Per-route config that turns these (disabled) HTTP filters on: an
    empty `config` runs a filter with its listener config."""
    return {f["name"]: {"@type": FILTER_CONFIG_TYPE, "config": {}} for f in filters}


def file_lds(bootstrap, lds_path):
    """Moves the bootstrap's listeners to a file-based LDS at `lds_path`,
    watched through its directory, so a new listener (new metadata, a new
    namespace policy) is picked up without restarting Envoy. Returns the
    bootstrap; write the listeners with `write_lds`."""
    listeners = bootstrap["static_resources"].pop("listeners")
    directory = os.path.dirname(os.path.abspath(lds_path))
    bootstrap["dynamic_resources"] = {
        "lds_config": {
            "resource_api_version": "V3",
            "path_config_source": {
                "path": os.path.abspath(lds_path),
                # Envoy reloads the file when something is moved into the
                # directory: write elsewhere in it, then rename over.
                "watched_directory": {"path": directory},
            },
        }
    }
    write_lds(lds_path, listeners)
    return bootstrap


def write_lds(lds_path, listeners):
    """Writes an LDS file atomically: a temporary file in the same
    directory, then a rename over the watched path."""
    doc = {
        "version_info": str(time.time_ns()),
        "resources": [{"@type": LISTENER_TYPE, **listener} for listener in listeners],
    }
    directory = os.path.dirname(os.path.abspath(lds_path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".lds-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, lds_path)


def mtls_transport_socket(cert, key, ca):
    """A listener that requires client certificates signed by `ca`, as an
    Istio egress gateway's mTLS does (the filter reads the peer's SPIFFE
    identity from it)."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificates": [
                    {"certificate_chain": {"filename": cert}, "private_key": {"filename": key}}
                ],
                "validation_context": {"trusted_ca": {"filename": ca}},
            },
        },
    }


def to_yaml(doc):
    import yaml

    header = (
        "# Generated by envoy/tools/render.py from envoy/meshllm.json; do not edit.\n"
        "# Regenerate: make envoy-config\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False, width=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plugin_config", help="meshllm plugin config (JSON)")
    ap.add_argument("--build", choices=BUILDS, default="wasm",
                    help="the Wasm filter or the native dynamic module (default wasm)")
    ap.add_argument("--wasm", default=WASM_DEFAULT, help="the Wasm filter (--build wasm)")
    ap.add_argument("--module", default=NATIVE_DEFAULT,
                    help="the native module, loaded by absolute path (--build native)")
    ap.add_argument("--port", type=int, default=10000)
    ap.add_argument("--admin-port", type=int, default=9901)
    ap.add_argument("--json", action="store_true", help="emit JSON instead of YAML")
    ap.add_argument("--store", default=None, metavar="HOST:PORT",
                    help="the quota store's bridge (webdis) when the config has quotas.store "
                         f"(default {STORE_DEFAULT[0]}:{STORE_DEFAULT[1]})")
    ap.add_argument("--access-log", default="/dev/stdout", help="access-log path ('' for none)")
    ap.add_argument("--access-log-format", choices=["json", "text"], default="json")
    ap.add_argument("--stats-bootstrap", action="store_true",
                    help="emit only the stats bootstrap fragment for Istio proxies (JSON)")
    args = ap.parse_args(argv)
    with open(args.plugin_config) as f:
        cfg = json.load(f)
    if args.stats_bootstrap:
        sys.stdout.write(json.dumps(stats_bootstrap(cfg), indent=2) + "\n")
        return
    upstreams = {}
    store = (cfg.get("quotas") or {}).get("store")
    if store and args.store:
        host, _, port = args.store.rpartition(":")
        upstreams[store["cluster"]] = (host, int(port))
    doc = render(
        cfg,
        upstreams=upstreams,
        build=args.build,
        wasm=args.wasm,
        module=args.module,
        port=args.port,
        admin_port=args.admin_port,
        access_log_path=args.access_log or None,
        access_log_format=args.access_log_format,
    )
    sys.stdout.write(json.dumps(doc, indent=2) + "\n" if args.json else to_yaml(doc))


if __name__ == "__main__":
    main()
