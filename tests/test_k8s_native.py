"""The native build's Istio install (k8s/overlays/*-native, `manifests.py
--build native`): generated and current, valid like the rest of k8s/, the same
as the Wasm install in everything but how the module is loaded, and the
filter config it patches in is accepted by a real Envoy 1.40 (`--mode
validate`, which loads the module: a tiny stand-in built here with cc)."""

import copy
import json
import re
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, envoy_binary
from k8s_validate import CRDS, K8S_ROOT, istio_schemas, render, validate

sys.path.insert(0, str(K8S_ROOT / "tools"))
import manifests  # noqa: E402

MODES = {"sidecar": ("envoyfilter.yaml", "SIDECAR_OUTBOUND"),
         "egress-gateway": ("gateway.yaml", "GATEWAY")}
NATIVE_IMAGE = "registry.example/meshllm-native:0.1.0"
# Image volumes: beta in Kubernetes 1.33, on by default from 1.35.
IMAGE_VOLUME_KUBERNETES = "1.35"


def overlay_docs(mode, build):
    rel, _ = MODES[mode]
    text = manifests.files(manifests.load_policy(), build=build)[f"overlays/{mode}{build.suffix}/{rel}"]
    return [d for d in yaml.safe_load_all(text) if d]


def mesh_filter(docs):
    (found,) = [d for d in docs if d["kind"] == "EnvoyFilter" and d["metadata"]["name"] == "meshllm"]
    return found


def patches(docs, apply_to):
    return [p for p in mesh_filter(docs)["spec"]["configPatches"] if p["applyTo"] == apply_to]


def listener_half(docs):
    (value,) = [p["patch"]["value"] for p in patches(docs, "HTTP_FILTER")
                if p["patch"]["value"]["name"] == "meshllm"]
    return value


def upstream_half(docs):
    (cluster,) = [p["patch"]["value"] for p in patches(docs, "CLUSTER")
                  if p["patch"]["value"]["name"] == "meshllm"]
    options = cluster["typed_extension_protocol_options"]
    return options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"][0]


@pytest.fixture(scope="module")
def installs():
    """{(mode, build name): rendered overlay documents} from the generator."""
    return {(mode, build.name): overlay_docs(mode, build)
            for mode in MODES for build in (manifests.WasmBuild(), manifests.NativeBuild())}


def test_native_manifests_are_current():
    stale = [rel for rel, text in
             manifests.files(manifests.load_policy(), build=manifests.NativeBuild()).items()
             if not (K8S_ROOT / rel).exists() or (K8S_ROOT / rel).read_text() != text]
    assert not stale, f"run `make k8s`: {stale} differ from k8s/policy/mesh.json"


@pytest.mark.parametrize("directory", ["overlays/sidecar-native", "overlays/egress-gateway-native",
                                       "examples/sidecar-app-native"])
def test_native_kustomizations_validate(directory):
    """The same validation as every kustomize directory (test_k8s.py), and
    the pods' image volumes against a Kubernetes that serves them."""
    schemas = istio_schemas(CRDS)
    docs = render(K8S_ROOT / directory)
    assert [e for d in docs for e in validate(d, schemas)] == []
    for doc in docs:
        if doc["kind"] == "Deployment":
            kubernetes_validate.validate(doc, IMAGE_VOLUME_KUBERNETES, strict=True)


@pytest.mark.parametrize("mode", MODES)
def test_native_filter_halves(installs, mode):
    docs = installs[(mode, "native")]
    # Loaded inline: no ECDS, nothing for Istio's agent to fetch.
    assert patches(docs, "EXTENSION_CONFIG") == []
    text = json.dumps(docs)
    assert "config_discovery" not in text and "host_env_keys" not in text and WASM_TYPE_NAME not in text
    for half, name, disabled in ((listener_half(docs), "meshllm", True),
                                 (upstream_half(docs), "meshllm.upstream", False)):
        config = half["typed_config"]
        assert config["@type"] == manifests.DYNAMIC_MODULE_TYPE
        assert config["dynamic_module_config"] == {"name": "meshllm"}
        assert config["filter_name"] == name
        assert config["filter_config"]["@type"] == "type.googleapis.com/google.protobuf.StringValue"
        assert half.get("disabled", False) is disabled


WASM_TYPE_NAME = "envoy.extensions.filters.http.wasm.v3.Wasm"


@pytest.mark.parametrize("mode", MODES)
def test_native_config_document_is_the_wasm_one(installs, mode):
    native, wasm = installs[(mode, "native")], installs[(mode, "wasm")]
    wasm_docs = {p["patch"]["value"]["name"]: p["patch"]["value"]["typed_config"]["config"]["configuration"]
                 for p in patches(wasm, "EXTENSION_CONFIG")}
    assert wasm_docs["meshllm"]["value"] == wasm_docs["meshllm.upstream"]["value"]
    for half in (listener_half(native), upstream_half(native)):
        assert half["typed_config"]["filter_config"] == wasm_docs[half["name"]]


def without_module(docs):
    """The documents with what loads the module taken out: the Wasm
    install's ECDS configs, both halves' filter values, the pod's volume,
    its search path and the metric prefixes of the module's kind."""
    docs = copy.deepcopy(docs)
    ef = mesh_filter(docs)
    ef["spec"]["configPatches"] = [p for p in ef["spec"]["configPatches"]
                                   if p["applyTo"] != "EXTENSION_CONFIG"]
    listener_half(docs).clear()
    upstream_half(docs).clear()
    for doc in docs:
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]
            pod["metadata"]["annotations"].pop("proxy.istio.io/config")
            pod["spec"].pop("volumes", None)
            (proxy,) = pod["spec"]["containers"]
            proxy.pop("volumeMounts", None)
            proxy["env"] = [e for e in proxy["env"] if e["name"] != manifests.SEARCH_PATH_ENV]
    return docs


@pytest.mark.parametrize("mode", MODES)
def test_native_install_is_the_wasm_one_but_for_loading(installs, mode):
    """Routes, guard, keys, identity, failover clusters, local replies,
    buffer limits: the same patches, from the same generator code."""
    assert without_module(installs[(mode, "native")]) == without_module(installs[(mode, "wasm")])


def test_native_gateway_mounts_the_module(installs):
    docs = installs[("egress-gateway", "native")]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "meshllm-module", "image": {
        "reference": manifests.PLACEHOLDER_MODULE_IMAGE, "pullPolicy": "IfNotPresent"}}]
    (proxy,) = pod["containers"]
    assert proxy["volumeMounts"] == [{"name": "meshllm-module", "mountPath": "/var/lib/meshllm",
                                      "readOnly": True}]
    env = {e["name"]: e for e in proxy["env"]}
    assert env["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"]["value"] == "/var/lib/meshllm"
    # Keys: from the Secret into the proxy's environment, as for Wasm.
    assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == manifests.KEYS_SECRET
    assert "dynamicmodulescustom." in deployment["spec"]["template"]["metadata"]["annotations"][
        "proxy.istio.io/config"]


def test_native_sidecar_example_annotations():
    docs = render(K8S_ROOT / "examples" / "sidecar-app-native")
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert json.loads(annotations["sidecar.istio.io/userVolume"]) == [
        {"name": "meshllm-module", "image": {"reference": manifests.PLACEHOLDER_MODULE_IMAGE,
                                             "pullPolicy": "IfNotPresent"}}]
    assert json.loads(annotations["sidecar.istio.io/userVolumeMount"]) == [
        {"name": "meshllm-module", "mountPath": "/var/lib/meshllm", "readOnly": True}]
    proxy = next(c for c in deployment["spec"]["template"]["spec"]["containers"]
                 if c["name"] == "istio-proxy")
    names = [e["name"] for e in proxy["env"]]
    assert "ENVOY_DYNAMIC_MODULES_SEARCH_PATH" in names and "OPENAI_API_KEY" in names
    # The opt-in label the sidecar-native EnvoyFilter selects on.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = mesh_filter(render(K8S_ROOT / "overlays" / "sidecar-native"))["spec"]["workloadSelector"]
    assert selector["labels"].items() <= labels.items()


def test_native_cli(tmp_path, capsys):
    out = tmp_path / "install"
    manifests.main(["--build", "native", "--module-image", NATIVE_IMAGE, "--out-dir", str(out)])
    text = (out / "overlays" / "egress-gateway-native" / "gateway.yaml").read_text()
    assert NATIVE_IMAGE in text and manifests.PLACEHOLDER_MODULE_IMAGE not in text
    assert NATIVE_IMAGE in (out / "examples" / "sidecar-app-native" / "app.yaml").read_text()
    assert not (out / "overlays" / "sidecar").exists()
    assert (out / "observability" / "kustomization.yaml").exists()
    for bad in (["--build", "native", "--out-dir", str(tmp_path / "x")],
                ["--build", "native", "--module-image", NATIVE_IMAGE, "--module-url", "oci://x/y:1",
                 "--out-dir", str(tmp_path / "y")],
                ["--module-image", NATIVE_IMAGE, "--module-url", "oci://x/y:1",
                 "--out-dir", str(tmp_path / "z")]):
        with pytest.raises(SystemExit):
            manifests.main(bad)


# --- the patched config in a real Envoy -------------------------------------

def stand_in_module(directory):
    """A libmeshllm.so that exports every HTTP-filter entry point this Envoy
    looks up, each doing nothing, and reports Envoy 1.40's ABI version."""
    if not shutil.which("cc"):
        pytest.skip("no C compiler for the stand-in module")
    with open(envoy_binary(), "rb") as f:
        names = sorted(set(re.findall(rb"envoy_dynamic_module_on_http_filter_[a-z_]+", f.read())))
    lines = ["static char state;",
             'const char *envoy_dynamic_module_on_program_init(void) { return "v0.2.0"; }']
    for name in (n.decode() for n in names):
        if name.endswith("_new"):
            lines.append(f"void *{name}(void) {{ return &state; }}")
        else:
            lines.append(f"long {name}(void) {{ return 0; }}")
    source = directory / "stand_in.c"
    source.write_text("\n".join(lines) + "\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(directory / manifests.NATIVE_MODULE_FILE),
                    str(source)], check=True, capture_output=True)
    return directory


def bootstrap_from(docs):
    """A plain-Envoy bootstrap holding what the EnvoyFilter patches into the
    proxy: its listener filters before the router, the HCM's local replies,
    one handled host's virtual host with meshllm's routes and per-route
    config, and every cluster it adds (the upstream half on `meshllm`)."""
    ef = mesh_filter(docs)["spec"]["configPatches"]
    http_filters = [p["patch"]["value"] for p in ef if p["applyTo"] == "HTTP_FILTER"]
    (hcm_merge,) = [p["patch"]["value"]["typed_config"] for p in ef if p["applyTo"] == "NETWORK_FILTER"]
    vhost_name = "api.openai.com:80"
    on_vhost = [p for p in ef if p["match"].get("routeConfiguration", {}).get("vhost", {}).get("name")
                == vhost_name]
    (vhost_merge,) = [p["patch"]["value"] for p in on_vhost if p["applyTo"] == "VIRTUAL_HOST"]
    routes = []
    for p in on_vhost:
        if p["applyTo"] == "HTTP_ROUTE":
            routes.insert(0, p["patch"]["value"])  # INSERT_FIRST, in order
    hcm = {
        **hcm_merge,
        "stat_prefix": "outbound_0.0.0.0_80",
        "http_filters": http_filters + [{"name": manifests.ROUTER, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        "route_config": {"name": "80", "virtual_hosts": [
            {"name": vhost_name, "domains": ["api.openai.com", "api.openai.com:80"],
             "routes": routes, **vhost_merge}]},
    }
    clusters = [p["patch"]["value"] for p in ef if p["applyTo"] == "CLUSTER"]
    return {
        "static_resources": {
            "listeners": [{"name": "0.0.0.0_80",
                           "address": {"socket_address": {"address": "127.0.0.1", "port_value": 18080}},
                           "filter_chains": [{"filters": [{"name": manifests.HCM, "typed_config": hcm}]}]}],
            "clusters": clusters,
        }
    }


def envoy_validate(bootstrap, tmp_path, search_path):
    config = tmp_path / "bootstrap.yaml"
    config.write_text(yaml.safe_dump(bootstrap))
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config),
                           "--disable-hot-restart", "-l", "error"],
                          env={"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(search_path), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("mode", MODES)
def test_envoy_accepts_the_native_patches(installs, tmp_path, mode):
    (tmp_path / "modules").mkdir()
    modules = stand_in_module(tmp_path / "modules")
    bootstrap = bootstrap_from(installs[(mode, "native")])
    result = envoy_validate(bootstrap, tmp_path, modules)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_envoy_refuses_the_config_without_the_module(installs, tmp_path):
    """Validate mode loads the module: without it the listener's config is
    refused (via xDS: that listener update is rejected, a NACK)."""
    (tmp_path / "empty").mkdir()
    result = envoy_validate(bootstrap_from(installs[("sidecar", "native")]), tmp_path, tmp_path / "empty")
    assert result.returncode != 0
    assert "Failed to load dynamic module" in result.stdout + result.stderr


NATIVE_BUILD = ROOT / "target" / "native" / manifests.NATIVE_MODULE_FILE


@pytest.mark.skipif(not NATIVE_BUILD.exists(), reason="no native build (cargo build --profile native "
                    "--features native --lib)")
def test_envoy_loads_the_built_module_with_the_patches(installs, tmp_path):
    result = envoy_validate(bootstrap_from(installs[("egress-gateway", "native")]), tmp_path,
                            NATIVE_BUILD.parent)
    assert result.returncode == 0, result.stderr[-3000:]
