"""The native build's Istio install (k8s/overlays/*-native, `manifests.py
--build native`): generated and current, valid like the rest of k8s/, the same
as the Wasm install in everything but how the module is loaded, the filter
configs it serves by ECDS are accepted by a real Envoy 1.40 (`--mode
validate`, which loads the module: a tiny stand-in built here with cc), and
the install fails closed in a running Envoy 1.40 when the module cannot be
loaded (file-based ECDS standing in for istiod's)."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, envoy_binary, free_port, http, stop_process, wait_for
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


def extension_configs(docs):
    return {p["patch"]["value"]["name"]: p["patch"]["value"]["typed_config"]
            for p in patches(docs, "EXTENSION_CONFIG")}


@pytest.mark.parametrize("mode", MODES)
def test_native_filter_halves(installs, mode):
    """Both halves by ECDS, as for Wasm: the listener and the cluster only
    reference them, so a module that cannot be loaded fails these configs,
    not the listener or the cluster."""
    docs = installs[(mode, "native")]
    configs = extension_configs(docs)
    assert sorted(configs) == ["meshllm", "meshllm.upstream"]
    for name, config in configs.items():
        assert config["@type"] == manifests.DYNAMIC_MODULE_TYPE
        assert config["dynamic_module_config"] == {"name": "meshllm"}
        assert config["filter_name"] == name
        assert config["filter_config"]["@type"] == "type.googleapis.com/google.protobuf.StringValue"
    for half, name, disabled in ((listener_half(docs), "meshllm", True),
                                 (upstream_half(docs), "meshllm.upstream", False)):
        assert set(half) == {"name", "config_discovery"} | ({"disabled"} if disabled else set())
        discovery = half["config_discovery"]
        assert discovery["config_source"] == {"ads": {}, "initial_fetch_timeout": "0s"}
        # Nothing substitutes for a native config (the agent converts Wasm
        # only), so only the module's type.
        assert discovery["type_urls"] == [manifests.DYNAMIC_MODULE_TYPE]
    text = json.dumps(docs)
    assert "host_env_keys" not in text and WASM_TYPE_NAME not in text


WASM_TYPE_NAME = "envoy.extensions.filters.http.wasm.v3.Wasm"


@pytest.mark.parametrize("mode", MODES)
def test_native_config_document_is_the_wasm_one(installs, mode):
    native, wasm = extension_configs(installs[(mode, "native")]), extension_configs(installs[(mode, "wasm")])
    assert wasm["meshllm"]["config"]["configuration"] == wasm["meshllm.upstream"]["config"]["configuration"]
    for name, config in native.items():
        assert config["filter_config"] == wasm[name]["config"]["configuration"]


UNAVAILABLE_MESSAGES = (manifests.UNAVAILABLE_MESSAGE, manifests.GATEWAY_UNAVAILABLE_MESSAGE,
                        manifests.NATIVE_UNAVAILABLE_MESSAGE, manifests.NATIVE_GATEWAY_UNAVAILABLE_MESSAGE)


def without_module(docs):
    """The documents with what loads the module taken out: the ECDS
    configs, the type URLs the references accept, what the 503
    `meshllm_unavailable` says about the module, the pod's volumes and init
    container, its search path and the metric prefixes of the module's
    kind."""
    docs = copy.deepcopy(docs)
    ef = mesh_filter(docs)
    ef["spec"]["configPatches"] = [p for p in ef["spec"]["configPatches"]
                                   if p["applyTo"] != "EXTENSION_CONFIG"]
    for half in (listener_half(docs), upstream_half(docs)):
        half["config_discovery"].pop("type_urls")
    text = json.dumps(docs)
    for message in UNAVAILABLE_MESSAGES:
        text = text.replace(json.dumps(message)[1:-1], "(the module could not be loaded)")
    docs = json.loads(text)
    for doc in docs:
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]
            pod["metadata"]["annotations"].pop("proxy.istio.io/config")
            pod["spec"].pop("volumes", None)
            pod["spec"].pop("initContainers", None)
            (proxy,) = pod["spec"]["containers"]
            proxy.pop("volumeMounts", None)
            proxy["env"] = [e for e in proxy["env"] if e["name"] != manifests.SEARCH_PATH_ENV]
    return docs


@pytest.mark.parametrize("mode", MODES)
def test_native_install_is_the_wasm_one_but_for_loading(installs, mode):
    """Routes, guard, keys, identity, failover clusters, local replies,
    buffer limits: the same patches, from the same generator code."""
    assert without_module(installs[(mode, "native")]) == without_module(installs[(mode, "wasm")])


def module_volumes(image=manifests.PLACEHOLDER_MODULE_IMAGE):
    return [{"name": "meshllm-module-image", "image": {"reference": image, "pullPolicy": "IfNotPresent"}},
            {"name": "meshllm-module", "emptyDir": {"sizeLimit": "64Mi"}}]


def check_copy(pod_spec, copy_image=manifests.COPY_IMAGE):
    """The init container copies the module from the image volume (noexec)
    into the emptyDir istio-proxy mounts read-only."""
    assert pod_spec["volumes"][-2:] == module_volumes()
    (init,) = pod_spec["initContainers"]
    assert init["name"] == "meshllm-module" and init["image"] == copy_image
    assert init["command"] == ["cp", "/var/lib/meshllm-image/libmeshllm.so", "/var/lib/meshllm/libmeshllm.so"]
    assert init["volumeMounts"] == [
        {"name": "meshllm-module-image", "mountPath": "/var/lib/meshllm-image", "readOnly": True},
        {"name": "meshllm-module", "mountPath": "/var/lib/meshllm"}]
    # As the proxy's user (1337 in Istio's templates), nothing else.
    assert init["securityContext"]["runAsUser"] == 1337
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_native_gateway_mounts_the_module(installs):
    docs = installs[("egress-gateway", "native")]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    check_copy(pod)
    (proxy,) = pod["containers"]
    assert proxy["volumeMounts"] == [{"name": "meshllm-module", "mountPath": "/var/lib/meshllm",
                                      "readOnly": True}]
    env = {e["name"]: e for e in proxy["env"]}
    assert env["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"]["value"] == "/var/lib/meshllm"
    # Keys: from the Secret into the proxy's environment, as for Wasm.
    assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == manifests.KEYS_SECRET
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert "dynamicmodulescustom." in annotations["proxy.istio.io/config"]
    # Istio's gateway template injects istio-proxy as a regular container.
    assert annotations["inject.istio.io/templates"] == "gateway"


def test_native_sidecar_example_annotations():
    docs = render(K8S_ROOT / "examples" / "sidecar-app-native")
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    # The volumes are the pod's own (its init container mounts them); the
    # injector adds the mount to the istio-proxy it injects.
    assert "sidecar.istio.io/userVolume" not in annotations
    assert json.loads(annotations["sidecar.istio.io/userVolumeMount"]) == [
        {"name": "meshllm-module", "mountPath": "/var/lib/meshllm", "readOnly": True}]
    # istio-proxy as a regular container, started after the copy: as a
    # native sidecar Istio 1.31 orders it before the pod's init containers.
    assert annotations["sidecar.istio.io/nativeSidecar"] == "false"
    pod = deployment["spec"]["template"]["spec"]
    check_copy(pod)
    proxy = next(c for c in pod["containers"] if c["name"] == "istio-proxy")
    names = [e["name"] for e in proxy["env"]]
    assert "ENVOY_DYNAMIC_MODULES_SEARCH_PATH" in names and "OPENAI_API_KEY" in names
    # The opt-in label the sidecar-native EnvoyFilter selects on.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = mesh_filter(render(K8S_ROOT / "overlays" / "sidecar-native"))["spec"]["workloadSelector"]
    assert selector["labels"].items() <= labels.items()


def test_native_cli(tmp_path, capsys):
    out = tmp_path / "install"
    manifests.main(["--build", "native", "--module-image", NATIVE_IMAGE,
                    "--copy-image", "registry.example/istio/proxyv2:1.31.1", "--out-dir", str(out)])
    text = (out / "overlays" / "egress-gateway-native" / "gateway.yaml").read_text()
    assert NATIVE_IMAGE in text and manifests.PLACEHOLDER_MODULE_IMAGE not in text
    assert "registry.example/istio/proxyv2:1.31.1" in text and manifests.COPY_IMAGE not in text
    assert NATIVE_IMAGE in (out / "examples" / "sidecar-app-native" / "app.yaml").read_text()
    assert not (out / "overlays" / "sidecar").exists()
    assert (out / "observability" / "kustomization.yaml").exists()
    for bad in (["--build", "native", "--out-dir", str(tmp_path / "x")],
                ["--build", "native", "--module-image", NATIVE_IMAGE, "--module-url", "oci://x/y:1",
                 "--out-dir", str(tmp_path / "y")],
                ["--module-image", NATIVE_IMAGE, "--module-url", "oci://x/y:1",
                 "--out-dir", str(tmp_path / "z")],
                ["--module-url", "oci://x/y:1", "--copy-image", "x/proxyv2:1", "--out-dir", str(tmp_path / "w")]):
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


def bootstrap_from(docs, ecds_dir=None, port=18080):
    """A plain-Envoy bootstrap holding what the EnvoyFilter patches into the
    proxy: its listener filters before the router, the HCM's local replies,
    one handled host's virtual host with meshllm's routes and per-route
    config, and every cluster it adds (the upstream half on `meshllm`).
    The ECDS configs: inlined into their references (ecds_dir None), or
    each written to a file in `ecds_dir` that its reference reads
    (file-based ECDS in place of istiod's)."""
    ef = copy.deepcopy(mesh_filter(docs)["spec"]["configPatches"])
    http_filters = [p["patch"]["value"] for p in ef if p["applyTo"] == "HTTP_FILTER"]
    (hcm_merge,) = [p["patch"]["value"]["typed_config"] for p in ef if p["applyTo"] == "NETWORK_FILTER"]
    vhost_name = "api.openai.com:80"
    on_vhost = [p for p in ef if p.get("match", {}).get("routeConfiguration", {}).get("vhost", {}).get("name")
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
             "routes": routes, **vhost_merge},
            # Another service's host on the same listener: meshllm's
            # filters stay off there.
            {"name": "other.shop.svc.cluster.local:80", "domains": ["other.shop"],
             "routes": [{"name": "other", "match": {"prefix": "/"},
                         "direct_response": {"status": 200, "body": {"inline_string": "other"}}}]}]},
    }
    clusters = [p["patch"]["value"] for p in ef if p["applyTo"] == "CLUSTER"]
    bootstrap = {
        "static_resources": {
            "listeners": [{"name": "0.0.0.0_80",
                           "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                           "filter_chains": [{"filters": [{"name": manifests.HCM, "typed_config": hcm}]}]}],
            "clusters": clusters,
        }
    }
    configs = extension_configs(docs)
    for ref in ecds_references(bootstrap):
        if ecds_dir is None:
            ref["typed_config"] = configs[ref.pop("config_discovery") and ref["name"]]
        else:
            path = os.path.join(ecds_dir, ref["name"] + ".json")
            write_ecds(path, ref["name"], configs[ref["name"]])
            ref["config_discovery"]["config_source"] = {
                "path_config_source": {"path": path}, "initial_fetch_timeout": "0s"}
    return bootstrap


def ecds_references(node):
    """Every filter in `node` whose config comes by ECDS."""
    if isinstance(node, dict):
        if "config_discovery" in node:
            yield node
        for value in list(node.values()):
            yield from ecds_references(value)
    elif isinstance(node, list):
        for value in node:
            yield from ecds_references(value)


def write_ecds(path, name, typed_config):
    """An ECDS response with one config, as istiod would send it."""
    with open(path, "w") as f:
        json.dump({"version_info": "1", "resources": [{
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": name, "typed_config": typed_config}]}, f)


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
    """Validate mode loads the module: without it the filter's config is
    refused (a static one takes its listener with it: why the install
    serves it by ECDS, where only the filter's config is refused)."""
    (tmp_path / "empty").mkdir()
    result = envoy_validate(bootstrap_from(installs[("sidecar", "native")]), tmp_path, tmp_path / "empty")
    assert result.returncode != 0
    assert "Failed to load dynamic module" in result.stdout + result.stderr


NATIVE_BUILD = ROOT / "target" / "native" / manifests.NATIVE_MODULE_FILE
needs_native_build = pytest.mark.skipif(
    not NATIVE_BUILD.exists(), reason="no native build (cargo build --profile native --features native --lib)")


@needs_native_build
def test_envoy_loads_the_built_module_with_the_patches(installs, tmp_path):
    result = envoy_validate(bootstrap_from(installs[("egress-gateway", "native")]), tmp_path,
                            NATIVE_BUILD.parent)
    assert result.returncode == 0, result.stderr[-3000:]


# --- failing closed in a running Envoy (file-based ECDS) ----------------------

# The sidecar's node, as Istio's agent describes it: the filter takes the
# caller's identity from it in sidecar mode.
SIDECAR_NODE = {"id": "sidecar~10.0.0.7~chatbot-1.shop~shop.svc.cluster.local", "cluster": "chatbot.shop",
                "metadata": {"NAMESPACE": "shop", "NAME": "chatbot-1", "LABELS": {"app": "chatbot"}}}


class EcdsEnvoy:
    """A running Envoy 1.40 with the sidecar-native install's listener,
    routes and clusters, its two ECDS configs read from files, and the
    module looked up in `search_path`."""

    def __init__(self, docs, search_path):
        self.docs = docs
        self.dir = tempfile.mkdtemp(prefix="meshllm-native-ecds-")
        self.port, self.admin_port = free_port(), free_port()
        bootstrap = bootstrap_from(docs, ecds_dir=self.dir, port=self.port)
        bootstrap["node"] = SIDECAR_NODE
        bootstrap["admin"] = {"address": {"socket_address": {"address": "127.0.0.1",
                                                             "port_value": self.admin_port}}}
        config = os.path.join(self.dir, "envoy.json")
        with open(config, "w") as f:
            json.dump(bootstrap, f)
        self.log_path = os.path.join(self.dir, "envoy.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [envoy_binary(), "-c", config, "--concurrency", "1", "--disable-hot-restart", "-l", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT,
            env={"PATH": "/usr/bin:/bin", SEARCH_PATH_ENV: str(search_path)})
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"

    def ready(self):
        try:
            return http("GET", self.admin + "/ready", timeout=1)[0] == 200
        except OSError:
            return False

    def stat(self, name):
        body = http("GET", self.admin + "/stats?filter=" + re.escape(name), timeout=5)[2].decode()
        values = [int(v) for n, v in re.findall(r"^([^:]+): (\d+)$", body, re.M) if n == name]
        return values[0] if values else None

    def log_text(self):
        with open(self.log_path) as f:
            return f.read()

    def push(self, name, version, typed_config):
        """A new ECDS response for `name`, as istiod's next push: written
        beside the file, then moved over it (Envoy watches for the move)."""
        path = os.path.join(self.dir, name + ".json")
        write_ecds(path + ".new", name, typed_config)
        with open(path + ".new") as f:
            doc = json.load(f)
        doc["version_info"] = version
        with open(path + ".new", "w") as f:
            json.dump(doc, f)
        os.rename(path + ".new", path)

    def request(self, method, path, body=None, host="api.openai.com"):
        return http(method, self.url + path, body=body, headers={"host": host})

    def stop(self):
        stop_process(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


SEARCH_PATH_ENV = manifests.SEARCH_PATH_ENV


@pytest.fixture
def ecds_envoy(installs):
    started = []

    def start(search_path, mode="sidecar"):
        envoy = EcdsEnvoy(installs[(mode, "native")], search_path)
        started.append(envoy)
        assert wait_for(envoy.ready, timeout=30), envoy.log_text()[-3000:]
        return envoy

    yield start
    for envoy in started:
        envoy.stop()


@needs_native_build
def test_ecds_serves_the_module(ecds_envoy):
    """A module that loads: the listener half answers on meshllm's routes
    (GET /v1/models is the filter's own answer, never sent upstream)."""
    envoy = ecds_envoy(NATIVE_BUILD.parent)
    status, _, body = envoy.request("GET", "/v1/models")
    assert status == 200, body
    models = json.loads(body)
    assert models["object"] == "list" and models["data"], models
    assert envoy.stat("extension_config_discovery.http_filter.meshllm.update_success") == 1
    assert envoy.stat("extension_config_discovery.upstream_http_filter.meshllm.upstream.update_success") == 1
    assert envoy.request("GET", "/", host="other.shop")[2] == b"other"


SHAPED_REQUESTS = [
    # (method, path, body, how the caller's API shapes its errors)
    ("GET", "/v1/models", None, lambda b: b["error"]["code"] == "meshllm_unavailable"),
    ("POST", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
     lambda b: b["error"]["code"] == "meshllm_unavailable"),
    ("POST", "/v1/messages", {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
     lambda b: b["type"] == "error" and b["error"]["type"] == "api_error"),
    ("POST", "/v1beta/models/gemini-2.0-flash:generateContent", {"contents": [{"parts": [{"text": "hi"}]}]},
     lambda b: b["error"]["status"] == "UNAVAILABLE" and b["error"]["code"] == 503),
]


def unloadable(directory):
    """A libmeshllm.so that dlopen refuses (not an ELF file)."""
    directory.mkdir()
    (directory / manifests.NATIVE_MODULE_FILE).write_bytes(b"not a shared object\n")
    return directory


@pytest.mark.parametrize("mode,modules", [("sidecar", "missing"), ("sidecar", "unloadable"),
                                          ("egress-gateway", "missing")])
def test_ecds_fails_closed_without_the_module(ecds_envoy, tmp_path, mode, modules):
    """The module cannot be loaded: Envoy rejects the filter's ECDS config
    (not the listener: it serves), stays up, and meshllm's routes answer
    503 meshllm_unavailable in the caller's shape; nothing is sent. Other
    routes of the listener are unchanged."""
    directory = tmp_path / "empty" if modules == "missing" else unloadable(tmp_path / "bad")
    directory.mkdir(exist_ok=True)
    envoy = ecds_envoy(directory, mode)
    message = (manifests.NATIVE_UNAVAILABLE_MESSAGE if mode == "sidecar"
               else manifests.NATIVE_GATEWAY_UNAVAILABLE_MESSAGE)
    for method, path, body, shaped in SHAPED_REQUESTS:
        status, headers, answer = envoy.request(method, path, body)
        assert status == 503, (path, answer)
        parsed = json.loads(answer)
        assert shaped(parsed), parsed
        assert message in answer.decode()
    status, _, answer = envoy.request("GET", "/", host="other.shop")
    assert (status, answer) == (200, b"other")
    # Only the filter's config was refused; Envoy and its listener are up.
    assert envoy.stat("extension_config_discovery.http_filter.meshllm.update_rejected") == 1
    assert envoy.stat("extension_config_discovery.upstream_http_filter.meshllm.upstream.update_rejected") == 1
    assert envoy.stat("listener_manager.lds.update_rejected") in (None, 0)
    assert envoy.proc.poll() is None and envoy.ready()
    assert "Failed to load dynamic module" in envoy.log_text()


@needs_native_build
def test_ecds_module_copied_after_envoy_started(ecds_envoy, tmp_path):
    """The module arrives after Envoy rejected its config: nothing retries
    it, and the same config sent again is not applied either (Envoy keeps
    the filter without config though it counts the update a success); a
    changed config loads the module. Why the copy must run before the proxy
    starts (k8s/README.md)."""
    directory = tmp_path / "modules"
    directory.mkdir()
    envoy = ecds_envoy(directory)
    assert envoy.request("GET", "/v1/models")[0] == 503
    shutil.copy(NATIVE_BUILD, directory / manifests.NATIVE_MODULE_FILE)
    config = extension_configs(envoy.docs)["meshllm"]
    success = "extension_config_discovery.http_filter.meshllm.update_success"
    envoy.push("meshllm", "2", config)
    assert wait_for(lambda: envoy.stat(success) == 1, timeout=10)
    # Time for the workers to get it, had it been applied.
    time.sleep(1)
    assert envoy.request("GET", "/v1/models")[0] == 503
    changed = copy.deepcopy(config)
    changed["filter_config"]["value"] += " "
    envoy.push("meshllm", "3", changed)
    assert wait_for(lambda: envoy.stat(success) == 2, timeout=10)
    status, _, body = envoy.request("GET", "/v1/models")
    assert status == 200 and json.loads(body)["object"] == "list", body
