"""The native build's bootstrap (render.py --build native): the dynamic-module
filter in both halves, everything else as the Wasm build's, and Envoy's
`--mode validate` accepting it. Validate mode loads the module and creates
the filter configs, so a stub module stands in for libmeshllm.so here: these
tests need no working native build."""

import copy
import json
import subprocess
import sys

import pytest

from conftest import ROOT, envoy_binary, free_port, metric_name
import render  # noqa: E402  (envoy/tools, on sys.path through conftest)

DYNAMIC_FILTER = "envoy.filters.http.dynamic_modules"
# What Envoy 1.40 resolves in an HTTP filter module before it creates the
# filter config (the stub returns a non-null config and is never called on).
STUB_SYMBOLS = [
    f"envoy_dynamic_module_on_http_filter_{name}" for name in (
        "config_new", "config_destroy", "new", "request_headers", "request_body",
        "request_trailers", "response_headers", "response_body", "response_trailers",
        "stream_complete", "destroy", "http_callout_done", "http_stream_headers",
        "http_stream_data", "http_stream_trailers", "http_stream_complete",
        "http_stream_reset", "scheduled", "downstream_above_write_buffer_high_watermark",
        "downstream_below_write_buffer_low_watermark")
]


@pytest.fixture(scope="module")
def stub_module(tmp_path_factory):
    """A shared object with the module ABI's entry points and nothing
    behind them, built with the C compiler cargo links with."""
    d = tmp_path_factory.mktemp("stub-module")
    src = d / "stub.c"
    src.write_text(
        'const char *envoy_dynamic_module_on_program_init(void) { return "v0.2.0"; }\n'
        + "".join(f"void *{s}(void) {{ return (void *)1; }}\n" for s in STUB_SYMBOLS))
    so = d / "libmeshllm.so"
    out = subprocess.run(["cc", "-shared", "-fPIC", "-o", str(so), str(src)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return so


def example():
    with open(ROOT / "envoy" / "meshllm.json") as f:
        return json.load(f)


def configs():
    """The example (failover on, both halves), failover off (listener half
    only) and a shared quota store (its cluster beside the halves)."""
    failover_off = example()
    failover_off["failover"] = {"enabled": False}
    store = example()
    store["quotas"] = {"store": {"cluster": "quota_store"}, "limits": [
        {"name": "day", "match": {"namespace": "shop"}, "requests_per_day": 10, "shared": True}]}
    return {"example": example(), "failover-off": failover_off, "store": store}


def halves(bootstrap):
    """The meshllm filters of a bootstrap: (listener half, upstream half or None)."""
    (listener,) = bootstrap["static_resources"]["listeners"]
    (hcm,) = [f["typed_config"] for f in listener["filter_chains"][0]["filters"]]
    upstream = None
    for c in bootstrap["static_resources"]["clusters"]:
        opts = c.get("typed_extension_protocol_options", {}).get(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {})
        if opts.get("http_filters"):
            upstream = opts["http_filters"][0]
    return hcm["http_filters"][0], upstream


def validate(bootstrap, tmp_path):
    path = tmp_path / f"envoy-{free_port()}.json"
    path.write_text(json.dumps(bootstrap))
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path),
                           "--disable-hot-restart", "-l", "warning"],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest.mark.parametrize("name", list(configs()))
def test_native_bootstrap_passes_envoys_validation(name, fmt, stub_module, tmp_path):
    cfg = configs()[name]
    native = render.render(cfg, build="native", module=str(stub_module),
                           access_log_path=str(tmp_path / "access.log"), access_log_format=fmt)
    result = validate(native, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK" in result.stdout + result.stderr


def test_validation_loads_the_module(tmp_path):
    """Why the stub: validate mode refuses a module it cannot load."""
    native = render.render(example(), build="native", module=str(tmp_path / "missing.so"))
    result = validate(native, tmp_path)
    assert result.returncode != 0
    assert "Failed to load dynamic module" in result.stdout + result.stderr


@pytest.mark.parametrize("name", list(configs()))
def test_native_filters_carry_the_same_config_as_the_wasm_halves(name):
    cfg = configs()[name]
    native = render.render(cfg, build="native", module="/opt/meshllm/libmeshllm.so")
    wasm = render.render(cfg, build="wasm")
    listener, upstream = halves(native)
    assert (upstream is None) == (not render.failover_settings(cfg)["enabled"])
    for half, wasm_half, filter_name in [(listener, halves(wasm)[0], "meshllm"),
                                         (upstream, halves(wasm)[1], "meshllm.upstream")]:
        if half is None:
            continue
        # The listener half is off unless the LLM host's route enables it.
        assert half.pop("disabled", False) == (filter_name == "meshllm")
        assert half == {"name": DYNAMIC_FILTER, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3."
                     "DynamicModuleFilter",
            "dynamic_module_config": {
                "module": {"local": {"filename": "/opt/meshllm/libmeshllm.so"}},
                "metrics_namespace": render.NATIVE_METRICS_NAMESPACE,
            },
            "filter_name": filter_name,
            "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                              "value": json.dumps(cfg, separators=(",", ":"))},
        }}
        # The same policy string the Wasm half gets, the same half by name.
        wasm_config = wasm_half["typed_config"]["config"]
        assert half["typed_config"]["filter_config"]["value"] == \
            wasm_config["configuration"]["value"]
        assert filter_name == wasm_config["root_id"]
    # The module reads keys from the process environment.
    assert "host_env_keys" not in json.dumps(native)


@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest.mark.parametrize("name", list(configs()))
def test_only_the_filters_and_log_fields_differ_between_the_builds(name, fmt):
    cfg = configs()[name]
    kw = dict(access_log_path="/dev/stdout", access_log_format=fmt)
    native = render.render(cfg, build="native", module="/m/libmeshllm.so", **kw)
    wasm = render.render(cfg, build="wasm", **kw)

    def neutral(bootstrap):
        b = copy.deepcopy(bootstrap)
        for half in halves(b):
            if half is not None:
                half.clear()
        (listener,) = b["static_resources"]["listeners"]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["access_log"][0]["typed_config"]["log_format"] = None
        # The filters the LLM host's routes enable, by each build's names.
        for vhost in hcm["route_config"]["virtual_hosts"]:
            if "typed_per_filter_config" in vhost:
                vhost["typed_per_filter_config"] = len(vhost["typed_per_filter_config"])
        return b
    # And the runtime flag that keeps the module's stats under the Wasm
    # build's names.
    assert native.pop("layered_runtime") == render.NATIVE_RUNTIME
    assert neutral(native) == neutral(wasm)


def test_access_log_fields_have_the_same_keys_from_dynamic_metadata():
    native, wasm = render.access_log_format("native"), render.access_log_format("wasm")
    assert list(native) == list(wasm)
    for field in render.FILTER_STATE_FIELDS:
        assert wasm[field] == f"%FILTER_STATE(wasm.meshllm.{field}:PLAIN)%"
        assert native[field] == f"%DYNAMIC_METADATA(meshllm:{field})%"
    assert '"command":"DYNAMIC_METADATA","param":"meshllm:path"' in native["path"]
    assert "FILTER_STATE" not in json.dumps(native) and "wasm" not in json.dumps(native)
    text = render.access_log_text("native")
    assert text == render.access_log_text("wasm").replace(
        "FILTER_STATE", "DYNAMIC_METADATA").replace('"wasm.meshllm.path:PLAIN"', '"meshllm:path"') \
        .replace("(wasm.meshllm.", "(meshllm:").replace(":PLAIN)%", ")%")


def test_stats_config_buckets_cover_both_namespaces():
    settings = render.stats_config()["histogram_bucket_settings"]
    prefixes = {s["match"]["prefix"]: s["buckets"] for s in settings}
    for ns in ("wasmcustom", render.NATIVE_METRICS_NAMESPACE):
        assert prefixes[f"{ns}.gen_ai.client.token.usage"] == render.TOKEN_BUCKETS
        assert prefixes[f"{ns}.gen_ai.server."] == render.LATENCY_MS_BUCKETS
    assert render.metric_prefixes("native") == [
        f"{render.NATIVE_METRICS_NAMESPACE}.gen_ai.", f"{render.NATIVE_METRICS_NAMESPACE}.meshllm_"]
    # Istio proxies keep either build's stats.
    assert render.METRIC_PREFIXES == ["wasmcustom.gen_ai.", "wasmcustom.meshllm_",
                                      *render.metric_prefixes("native")]


@pytest.mark.parametrize("raw,name", [
    ("meshllm_requests_total", "meshllm_requests_total"),
    ("envoy_dynamicmodulescustom_meshllm_requests_total", "meshllm_requests_total"),
    ("dynamicmodulescustom_gen_ai_client_token_usage_bucket", "gen_ai_client_token_usage_bucket"),
    ("envoy_cluster_upstream_rq_total", "envoy_cluster_upstream_rq_total"),
])
def test_prometheus_names_read_the_same_for_both_builds(raw, name):
    assert metric_name(raw) == name


def test_cli_renders_the_native_build(tmp_path):
    cli = [sys.executable, str(ROOT / "envoy" / "tools" / "render.py"),
           str(ROOT / "envoy" / "meshllm.json"), "--json", "--access-log", ""]
    native = subprocess.run(cli + ["--build", "native", "--module", "target/native/x.so"],
                            cwd=tmp_path, capture_output=True, text=True, check=True)
    doc = json.loads(native.stdout)
    listener, upstream = halves(doc)
    assert listener["typed_config"]["dynamic_module_config"]["module"]["local"]["filename"] == \
        str(tmp_path / "target/native/x.so")
    assert upstream["typed_config"]["filter_name"] == "meshllm.upstream"
    # The Wasm build stays the default.
    default = json.loads(subprocess.run(cli, capture_output=True, text=True, check=True).stdout)
    assert halves(default)[0]["name"] == "envoy.filters.http.wasm"
    bad = subprocess.run(cli + ["--build", "elf"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
